//! Recognising a TLS ClientHello and its server name (SNI) in the bytes a client has sent
//! so far.
//!
//! The caller peeks (never consumes: passthrough forwards the hello unchanged, and the
//! upstream's handshake transcript must match what the client sent), calls
//! [`parse_client_hello`] with everything peeked, and calls again with more bytes while
//! the answer is `Ok(None)`. The parsing is rustls's own `Acceptor`, the same code that
//! reads the hello when this proxy terminates TLS; a fresh one per call keeps this a pure
//! function of the bytes. Choosing a route by the name is `crate::names::SniRoutes`.

use rustls::PeerIncompatible::SignatureAlgorithmsExtensionRequired;
use rustls::server::Acceptor;

use crate::names::dns_name_problem;

/// Bytes after which [`parse_client_hello`] no longer answers `Ok(None)`. rustls buffers
/// at most 64 KiB - 1 of a handshake flight, record headers included: the bound on how
/// much a client can make the proxy hold before routing. Real hellos take a few KiB.
pub const MAX_PEEK_LEN: usize = 64 * 1024;

/// First byte of a TLS record carrying a handshake message.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;

/// What routing needs from a complete ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `host_name` from the server_name extension, lowercased; `None` when the client
    /// sent none (or, as rustls reads RFC 6066, an IP address in its place).
    pub server_name: Option<String>,
    /// Protocols offered in the ALPN extension, in the client's order; empty without the
    /// extension. Registered protocol ids are ASCII; other bytes are replaced by U+FFFD.
    pub alpn: Vec<String>,
}

/// Why the bytes a client sent are not a ClientHello this proxy can route.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SniError {
    #[error(
        "not a TLS client: the first byte is {byte:#04x}, a TLS ClientHello starts with a handshake record (0x16)"
    )]
    NotTls { byte: u8 },
    #[error("SSL 2.0-format ClientHello is not supported; the client must speak TLS 1.0 or later")]
    Sslv2,
    #[error("no complete ClientHello within the first {MAX_PEEK_LEN} bytes")]
    Oversized,
    #[error("malformed ClientHello: {0}")]
    Malformed(rustls::Error),
    #[error("invalid server name \"{name}\" in the ClientHello: it {why}")]
    InvalidServerName { name: String, why: &'static str },
}

/// Parses the first bytes a client sent on a TLS connection.
///
/// Returns `Ok(None)` while `buf` is a valid but incomplete prefix of a ClientHello
/// (never once it holds [`MAX_PEEK_LEN`] bytes), `Ok(Some(_))` once the whole ClientHello
/// has arrived, whatever follows it, and `Err(_)` when the bytes cannot be one. A first
/// byte that cannot start a TLS record is refused at once.
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<ClientHelloInfo>, SniError> {
    match buf.first() {
        None | Some(&CONTENT_TYPE_HANDSHAKE) => {}
        Some(_) => return Err(SniError::not_tls(buf)),
    }
    let mut acceptor = Acceptor::default();
    let mut rest = buf;
    // rustls takes a few KiB per read, and makes room for a hello spanning records only
    // once it has seen that hello start: hand it the bytes in turns.
    while !rest.is_empty() {
        if acceptor.read_tls(&mut rest).is_err() {
            return Err(SniError::Oversized);
        }
        match acceptor.accept() {
            Ok(None) => {}
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let alpn = hello.alpn().into_iter().flatten().map(alpn_id).collect();
                // rustls reads an IP address in the server name as no name (RFC 6066
                // forbids it) but clients send one, and a route may name it.
                let server_name = match hello.server_name() {
                    Some(name) => checked_name(name.as_bytes())?,
                    None => fallback::fields(buf)?.server_name,
                };
                return Ok(Some(ClientHelloInfo { server_name, alpn }));
            }
            // The last check rustls makes, after parsing the whole hello: TLS 1.0 and 1.1
            // clients send no signature_algorithms, and this proxy only routes them.
            Err((rustls::Error::PeerIncompatible(SignatureAlgorithmsExtensionRequired), _)) => {
                return fallback::fields(buf).map(Some);
            }
            Err((e, _alert)) => return Err(SniError::Malformed(e)),
        }
    }
    if buf.len() >= MAX_PEEK_LEN {
        return Err(SniError::Oversized);
    }
    Ok(None)
}

/// A server name as this proxy routes by it: a DNS host name (rustls also lets through
/// underscores and a trailing dot, which no route can name), lowercased.
fn checked_name(name: &[u8]) -> Result<Option<String>, SniError> {
    match dns_name_problem(name) {
        None => Ok(Some(name.to_ascii_lowercase().escape_ascii().to_string())),
        Some(why) => Err(SniError::InvalidServerName {
            name: name.escape_ascii().to_string(),
            why,
        }),
    }
}

fn alpn_id(id: &[u8]) -> String {
    String::from_utf8_lossy(id).into_owned()
}

// === impl SniError ===

impl SniError {
    /// The error for a first byte that is not a handshake record. An SSL 2.0 hello has
    /// the high bit of its 2-byte length set and message type 1 in its third byte.
    fn not_tls(buf: &[u8]) -> Self {
        match (buf.first(), buf.get(2)) {
            (Some(&b0), Some(&1)) if b0 & 0x80 != 0 => Self::Sslv2,
            (Some(&byte), _) => Self::NotTls { byte },
            (None, _) => Self::NotTls { byte: 0 },
        }
    }
}

/// Reading the two fields from a hello rustls has parsed but will not hand over.
mod fallback {
    use super::*;

    /// The fields of the ClientHello at the start of `buf`, which rustls has parsed: its
    /// framing and lengths are known to be sound, so a `None` here is not expected.
    pub(super) fn fields(buf: &[u8]) -> Result<ClientHelloInfo, SniError> {
        let message = handshake_message(buf).unwrap_or_default();
        let mut info = ClientHelloInfo {
            server_name: None,
            alpn: Vec::new(),
        };
        for (kind, mut data) in extensions(&message).unwrap_or_default() {
            match kind {
                0 => {
                    if let Some(name) = server_name(&mut data) {
                        info.server_name = checked_name(name)?;
                    }
                }
                16 => info.alpn = alpn(&mut data).unwrap_or_default(),
                _ => {}
            }
        }
        Ok(info)
    }

    /// The handshake message, gathered from the records that carry it.
    fn handshake_message(mut buf: &[u8]) -> Option<Vec<u8>> {
        let mut message = Vec::new();
        loop {
            let len = usize::from(u16::from_be_bytes([*buf.get(3)?, *buf.get(4)?]));
            message.extend_from_slice(buf.get(5..5 + len)?);
            buf = &buf[5 + len..];
            let [_, a, b, c, ..] = message[..] else {
                continue;
            };
            let wanted = 4 + usize::from(u16::from_be_bytes([b, c])) + (usize::from(a) << 16);
            if message.len() >= wanted {
                message.truncate(wanted);
                return Some(message);
            }
        }
    }

    /// `(type, data)` of each extension of a ClientHello handshake message.
    fn extensions(message: &[u8]) -> Option<Vec<(u16, &[u8])>> {
        let mut body = message.get(4 + 2 + 32..)?;
        take(&mut body, 1)?; // session_id
        take(&mut body, 2)?; // cipher_suites
        take(&mut body, 1)?; // compression_methods
        let mut block = take(&mut body, 2)?;
        let mut out = Vec::new();
        while !block.is_empty() {
            let kind = u16::from_be_bytes([*block.first()?, *block.get(1)?]);
            block = block.get(2..)?;
            out.push((kind, take(&mut block, 2)?));
        }
        Some(out)
    }

    /// The `host_name` of a server_name extension.
    fn server_name<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
        let mut list = take(data, 2)?;
        while !list.is_empty() {
            let kind = *list.first()?;
            list = list.get(1..)?;
            let name = take(&mut list, 2)?;
            if kind == 0 {
                return Some(name);
            }
        }
        None
    }

    fn alpn(data: &mut &[u8]) -> Option<Vec<String>> {
        let mut list = take(data, 2)?;
        let mut out = Vec::new();
        while !list.is_empty() {
            out.push(alpn_id(take(&mut list, 1)?));
        }
        Some(out)
    }

    /// Splits off a field whose length prefix is `prefix` bytes long.
    fn take<'a>(buf: &mut &'a [u8], prefix: usize) -> Option<&'a [u8]> {
        let len = buf
            .get(..prefix)?
            .iter()
            .fold(0, |len, &b| len << 8 | usize::from(b));
        let field = buf.get(prefix..prefix + len)?;
        *buf = &buf[prefix + len..];
        Some(field)
    }
}

#[cfg(test)]
#[path = "client_hello_hand.rs"]
mod hand;

#[cfg(test)]
mod differential {
    use super::*;

    fn record(content_type: u8, fragment: &[u8]) -> Vec<u8> {
        let len = u16::try_from(fragment.len()).unwrap().to_be_bytes();
        [&[content_type, 3, 1, len[0], len[1]][..], fragment].concat()
    }

    /// The handshake message inside `hello` (single record assumed) re-split into records of `size`.
    fn refragment(hello: &[u8], size: usize) -> Option<Vec<u8>> {
        let mut msg = Vec::new();
        let mut pos = 0;
        while pos + 5 <= hello.len() && hello[pos] == 22 {
            let len = usize::from(u16::from_be_bytes([hello[pos + 3], hello[pos + 4]]));
            msg.extend_from_slice(hello.get(pos + 5..pos + 5 + len)?);
            pos += 5 + len;
        }
        Some(msg.chunks(size).flat_map(|c| record(22, c)).collect())
    }

    type Outcome = Result<Option<(Option<String>, Vec<String>)>, String>;

    fn new(buf: &[u8]) -> Outcome {
        parse_client_hello(buf)
            .map(|o| o.map(|i| (i.server_name, i.alpn)))
            .map_err(|e| e.to_string())
    }

    fn old(buf: &[u8]) -> Outcome {
        hand::parse_client_hello(buf)
            .map(|o| o.map(|i| (i.server_name, i.alpn)))
            .map_err(|e| e.to_string())
    }

    fn same_kind(a: &Outcome, b: &Outcome) -> bool {
        match (a, b) {
            (Ok(x), Ok(y)) => x == y,
            (Err(_), Err(_)) => true,
            _ => false,
        }
    }

    #[test]
    fn compare_on_captures() {
        let mut diffs = Vec::new();
        let mut cases = 0;
        let mut dir: Vec<_> = std::fs::read_dir(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/client_hello"
        ))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
        dir.sort();
        for path in dir {
            let bytes = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let (a, b) = (new(&bytes), old(&bytes));
            eprintln!("{name}: new {a:?}\n{name}: old {b:?}");
            let mut inputs: Vec<(String, Vec<u8>)> = vec![(name.clone(), bytes.clone())];
            for size in [1, 2, 7, 64, 100, 1000] {
                if let Some(f) = refragment(&bytes, size) {
                    inputs.push((format!("{name}/frag{size}"), f));
                }
            }
            let mut trailing = bytes.clone();
            trailing.extend(record(20, &[1]));
            trailing.extend(record(23, &[0x55; 40]));
            inputs.push((format!("{name}/ccs+data"), trailing));
            let mut garbage = bytes.clone();
            garbage.extend(b"GET / HTTP/1.1\r\n");
            inputs.push((format!("{name}/garbage"), garbage));
            // Pseudo-random single byte changes.
            let mut seed = 0x9e37_79b9_u64;
            for i in 0..300 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let at = (seed >> 33) as usize % bytes.len();
                let mut m = bytes.clone();
                m[at] = (seed >> 13) as u8;
                inputs.push((format!("{name}/flip{i}@{at}={:#x}", m[at]), m));
            }
            for (label, input) in inputs {
                let start = if label.contains("flip") {
                    input.len()
                } else {
                    0
                };
                for n in start..=input.len() {
                    cases += 1;
                    let (a, b) = (new(&input[..n]), old(&input[..n]));
                    // Incomplete on one side and an answer on the other is a real
                    // difference only for the whole input.
                    let partial =
                        n < input.len() && (matches!(a, Ok(None)) || matches!(b, Ok(None)));
                    let too_many = b == Err(hand::SniError::TooManyRecords.to_string());
                    if !same_kind(&a, &b) && !partial {
                        assert!(
                            label.contains("flip") || too_many,
                            "{label}[..{n}]: new {a:?} old {b:?}"
                        );
                        diffs.push(format!("{label}[..{n}]: new {a:?} old {b:?}"));
                    }
                }
            }
        }
        eprintln!("{cases} cases, {} differences", diffs.len());
        for d in diffs.iter().take(400) {
            eprintln!("{d}");
        }
    }
}
