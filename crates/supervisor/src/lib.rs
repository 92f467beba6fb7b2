//! The QEMU driver: domain definitions, QEMU processes, QMP, lifecycle
