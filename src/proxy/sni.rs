//! TLS ClientHello peeking for SNI routing (being written).
