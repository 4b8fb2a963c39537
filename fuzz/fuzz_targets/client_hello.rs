//! Fuzzes the ClientHello reading used for SNI routing (rustls's `Acceptor` over the
//! peeked bytes, plus the fallback that reads TLS 1.0/1.1 hellos and IP-address names).
//!
//! The first input byte picks how the rest is fed: as raw bytes (the client's first
//! bytes, exactly as peeked), or as a ClientHello body wrapped in correct handshake and
//! record framing split into records of a chosen size, so that the fuzzer spends its time
//! inside the body rather than rediscovering the framing.
//!
//! Invariants the proxy relies on: no panic on any input; a caller that peeks more bytes
//! never sees an error turn into success or a complete hello change; `MAX_PEEK_LEN` bytes
//! are always enough for an answer; and a server name is always a valid, lowercase route
//! name.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::names::validate_pattern;
use switchyard::wire::client_hello::{MAX_PEEK_LEN, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((&mode, body)) if mode & 1 == 1 => check(&framed(body, mode >> 1)),
        Some((_, raw)) => check(raw),
        None => check(data),
    }
});

/// `body` as a ClientHello handshake message in records of `chunk * 16` bytes (one
/// record when `chunk` is 0).
fn framed(body: &[u8], chunk: u8) -> Vec<u8> {
    let body = &body[..body.len().min(0xffff)];
    let len = u32::try_from(body.len()).unwrap().to_be_bytes();
    let message = [&[1, len[1], len[2], len[3]][..], body].concat();
    let size = match chunk {
        0 => 1 << 14,
        n => usize::from(n) * 16,
    };
    let mut out = Vec::with_capacity(message.len() + message.len() / size * 5 + 5);
    for fragment in message.chunks(size) {
        out.extend([22, 3, 1]);
        out.extend(u16::try_from(fragment.len()).unwrap().to_be_bytes());
        out.extend(fragment);
    }
    out
}

fn check(input: &[u8]) {
    let whole = parse_client_hello(input);
    match &whole {
        Ok(Some(info)) => {
            if let Some(name) = &info.server_name {
                assert_eq!(validate_pattern(name), Ok(()), "{name:?}");
                assert!(!name.bytes().any(|b| b.is_ascii_uppercase()), "{name:?}");
            }
        }
        Ok(None) => assert!(
            input.len() < MAX_PEEK_LEN,
            "no answer after {}",
            input.len()
        ),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    // What a caller peeking fewer bytes saw must agree with the longer peek.
    for cut in [input.len() / 2, input.len().saturating_sub(1)] {
        let prefix = parse_client_hello(&input[..cut]);
        match &prefix {
            Err(e) => assert!(
                whole.is_err(),
                "prefix of {cut} failed ({e}), whole: {whole:?}"
            ),
            Ok(Some(_)) => assert_eq!(prefix, whole, "prefix of {cut} was complete"),
            Ok(None) => {}
        }
    }
}
