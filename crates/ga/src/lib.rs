//! A qemu-ga compatible guest agent
