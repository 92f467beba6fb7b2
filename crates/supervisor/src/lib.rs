//! The QEMU driver: domain definitions, QEMU processes, QMP, lifecycle
pub mod launch;
pub mod qmp;
