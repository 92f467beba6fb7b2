//! A virsh-like command-line client of the qvirt gateway
