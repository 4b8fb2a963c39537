//! Wire formats read from or written for the network, as pure functions over bytes: no
//! I/O, no state between calls, fuzzed. The lowest layer, below config and the proxy.

pub mod client_hello;
pub mod proxy_protocol;
