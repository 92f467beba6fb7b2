//! Manager tests (no QEMU needed).
