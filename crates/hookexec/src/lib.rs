//! Runs operator hook scripts with libvirt's argv, stdin and failure semantics
