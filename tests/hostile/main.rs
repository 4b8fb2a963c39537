//! Hostile clients, operators and environments: each test attacks one input or limit
//! and asserts that the proxy keeps serving a well-behaved client (and answering
//! `/livez`) meanwhile. Run alone with `cargo test --test hostile`.

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod config_bounds;
mod handshake;
mod limits;
