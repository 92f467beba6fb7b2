//! Config loading, telemetry, shutdown and the gRPC serve scaffold every qvirt service shares
