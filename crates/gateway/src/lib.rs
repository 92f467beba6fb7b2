//! The public endpoint: authentication, per-method roles, audit, forwarding
