//! Feeds arbitrary bytes to the PROXY protocol decoder (the `ppp` crate and the checks
//! around it) under every accept mode and checks the promises the listener relies on: no
//! panic, `consumed` within the input and the cap, a header is decided by its own bytes
//! (shorter is incomplete, longer changes nothing), "incomplete" never outlasts the cap, an
//! error stays an error whatever follows, and a decoded header re-encodes to bytes that
//! decode to an equal header.
//!
//! Run: `cargo fuzz run proxy_protocol_decode` from the repository root (nightly, or
//! `RUSTC_BOOTSTRAP=1` on stable).

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::wire::proxy_protocol::{Accept, MAX_HEADER_LEN, decode};

fuzz_target!(|input: &[u8]| {
    for accept in [Accept::V1, Accept::V2, Accept::Any] {
        let result = decode(input, accept);
        match result {
            Ok(Some((header, consumed))) => {
                assert!(consumed > 0 && consumed <= input.len().min(MAX_HEADER_LEN));
                assert_eq!(decode(&input[..consumed], accept), result);
                // Every shorter prefix is incomplete (headers are at most 4 KiB, so this
                // stays cheap enough for the fuzzer).
                for k in 0..consumed {
                    assert_eq!(decode(&input[..k], accept), Ok(None), "prefix {k}");
                }
                let again = header.encode();
                assert_eq!(decode(&again, accept), Ok(Some((header, again.len()))));
                assert_eq!(decode(&again, Accept::Any), Ok(Some((header, again.len()))));
            }
            Ok(None) => assert!(input.len() < MAX_HEADER_LEN),
            Err(error) => {
                assert!(!error.to_string().is_empty());
                for suffix in [&b"\r\n"[..], b" ", b"\0"] {
                    let longer = [input, suffix].concat();
                    assert!(decode(&longer, accept).is_err());
                }
            }
        }
    }
});
