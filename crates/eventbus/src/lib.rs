//! Event fan-out with name filters, bounded queues and replay
