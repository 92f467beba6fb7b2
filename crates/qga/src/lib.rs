//! The QEMU guest agent wire protocol: streaming JSON framing, values, encoding
