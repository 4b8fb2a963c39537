//! PROXY protocol v1 and v2 wire format (being written).
