//! The host side of guest agents: the qvirt.v1.GuestAgent gRPC service
