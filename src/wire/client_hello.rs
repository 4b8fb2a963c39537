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

/// Bytes after which [`parse_client_hello`] no longer answers `Ok(None)`: the bound on
/// what a client can make the proxy hold before routing. rustls takes a handshake message
/// of up to 64 KiB; this leaves room for the headers of the records carrying the largest
/// in full records, or a real hello (a few KiB) in many small ones.
pub const MAX_PEEK_LEN: usize = 64 * 1024 + 64 * 5;

/// First byte of a TLS record carrying a handshake message.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;

/// What routing needs from a complete ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `host_name` from the server_name extension, validated as a DNS name (an IPv4
    /// address passes) and lowercased; `None` when the client sent none.
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
/// underscores, which no route can name), lowercased.
fn checked_name(name: &[u8]) -> Result<Option<String>, SniError> {
    match dns_name_problem(name) {
        None => Ok(Some(
            String::from_utf8_lossy(&name.to_ascii_lowercase()).into_owned(),
        )),
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
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Hellos captured from real clients against a plain loopback listener, named by
    /// client and options (see tests/data/client_hello/README.md), with what they carry.
    const CAPTURED: &[(&str, Option<&str>, &[&str])] = &[
        ("ossl_sni_alpn", Some("example.com"), &["h2", "http/1.1"]),
        ("ossl_tls1", Some("a.example"), &[]),
        ("ossl_tls1_1", Some("a.example"), &[]),
        ("ossl_tls1_2", Some("a.example"), &[]),
        ("ossl_tls1_3", Some("a.example"), &[]),
        ("ossl_ip", Some("127.0.0.1"), &[]),
        ("ossl_split", Some("split.example"), &[]),
        ("curl_name", Some("db.example.com"), &["h2", "http/1.1"]),
        ("curl_ip", None, &["h2", "http/1.1"]),
    ];

    fn captured(file: &str) -> Vec<u8> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/client_hello");
        std::fs::read(format!("{dir}/{file}.bin")).expect("captured hello")
    }

    fn u16be(n: usize) -> [u8; 2] {
        u16::try_from(n).unwrap().to_be_bytes()
    }

    /// Prefixes `body` with a 2-byte length.
    fn vec16(body: &[u8]) -> Vec<u8> {
        [&u16be(body.len())[..], body].concat()
    }

    fn extension(kind: u16, data: &[u8]) -> Vec<u8> {
        [&kind.to_be_bytes()[..], &vec16(data)].concat()
    }

    fn sni_ext(name: &[u8]) -> Vec<u8> {
        sni_ext_entries(&[(0, name)])
    }

    fn sni_ext_entries(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let list: Vec<u8> = entries
            .iter()
            .flat_map(|(kind, name)| [&[*kind][..], &vec16(name)].concat())
            .collect();
        extension(0, &vec16(&list))
    }

    fn alpn_ext(protocols: &[&[u8]]) -> Vec<u8> {
        let list: Vec<u8> = protocols
            .iter()
            .flat_map(|p| [&[u8::try_from(p.len()).unwrap()][..], p].concat())
            .collect();
        extension(16, &vec16(&list))
    }

    /// signature_algorithms, which rustls requires of a TLS 1.2 or 1.3 hello.
    fn sig_algs_ext() -> Vec<u8> {
        extension(13, &vec16(&[0x08, 0x04, 0x04, 0x03]))
    }

    /// A ClientHello body as a TLS 1.3 client sends it; `None` omits the extensions block.
    fn hello_body(extensions: Option<&[Vec<u8>]>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([0xab; 32]);
        body.push(32);
        body.extend([0xcd; 32]);
        body.extend(vec16(&[0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]));
        body.extend([1, 0]);
        if let Some(extensions) = extensions {
            body.extend(vec16(&extensions.concat()));
        }
        body
    }

    fn handshake(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        [&[msg_type, len[1], len[2], len[3]][..], body].concat()
    }

    fn record(content_type: u8, fragment: &[u8]) -> Vec<u8> {
        [&[content_type, 3, 1][..], &vec16(fragment)].concat()
    }

    /// Splits `message` into handshake records whose fragments have the given sizes,
    /// the rest going into a last record.
    fn records(message: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = message;
        for &size in sizes {
            let (fragment, tail) = rest.split_at(size);
            out.extend(record(CONTENT_TYPE_HANDSHAKE, fragment));
            rest = tail;
        }
        if !rest.is_empty() {
            out.extend(record(CONTENT_TYPE_HANDSHAKE, rest));
        }
        out
    }

    /// A hello with signature_algorithms and `extensions`.
    fn hello_with(extensions: &[Vec<u8>]) -> Vec<u8> {
        let all = [&[sig_algs_ext()][..], extensions].concat();
        records(&handshake(1, &hello_body(Some(&all))), &[])
    }

    fn typical_hello() -> Vec<u8> {
        hello_with(&[
            extension(0x000a, &[0x00, 0x02, 0x00, 0x1d]),
            sni_ext(b"db.example.com"),
            alpn_ext(&[b"h2", b"http/1.1"]),
            extension(0x002b, &[0x02, 0x03, 0x04]),
        ])
    }

    /// The first flight of a rustls client: its ClientHello.
    fn rustls_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = name.to_owned().try_into().unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        out
    }

    fn parse(buf: &[u8]) -> ClientHelloInfo {
        parse_client_hello(buf)
            .expect("valid hello")
            .expect("complete hello")
    }

    fn error(buf: &[u8]) -> SniError {
        parse_client_hello(buf).expect_err("malformed hello")
    }

    fn assert_every_prefix_incomplete(buf: &[u8]) {
        for n in 0..buf.len() {
            assert_eq!(
                parse_client_hello(&buf[..n]),
                Ok(None),
                "prefix of {n} bytes"
            );
        }
    }

    /// Replaces the byte at `at` in a copy of `buf`.
    fn patched(buf: &[u8], at: usize, byte: u8) -> Vec<u8> {
        let mut out = buf.to_vec();
        out[at] = byte;
        out
    }

    #[test]
    fn captured_hellos_of_real_clients() {
        for &(file, name, alpn) in CAPTURED {
            let hello = captured(file);
            let info = parse(&hello);
            assert_eq!(info.server_name.as_deref(), name, "{file}");
            assert_eq!(info.alpn, alpn, "{file}");
            assert_every_prefix_incomplete(&hello);
        }
        let underscore = captured("ossl_underscore");
        assert!(matches!(
            error(&underscore),
            SniError::InvalidServerName { .. }
        ));
    }

    #[test]
    fn hello_of_a_rustls_client() {
        let hello = rustls_hello("Rustls.Example.NET", &[b"h2", b"http/1.1"]);
        let info = parse(&hello);
        assert_eq!(info.server_name.as_deref(), Some("rustls.example.net"));
        assert_eq!(info.alpn, ["h2", "http/1.1"]);
        assert_every_prefix_incomplete(&hello);
        // An IP address is no server name for rustls: it sends none.
        assert_eq!(parse(&rustls_hello("10.1.2.3", &[])).server_name, None);
    }

    #[test]
    fn built_hello_with_sni_and_alpn() {
        let hello = typical_hello();
        let info = parse(&hello);
        assert_eq!(
            info,
            ClientHelloInfo {
                server_name: Some("db.example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()],
            }
        );
        assert_every_prefix_incomplete(&hello);
    }

    #[test]
    fn hello_without_sni() {
        let hello = hello_with(&[alpn_ext(&[b"h2"])]);
        let info = parse(&hello);
        assert_eq!(info.server_name, None);
        assert_eq!(info.alpn, ["h2"]);
    }

    #[test]
    fn tls_1_0_style_hellos_without_signature_algorithms() {
        let old =
            |extensions: &[Vec<u8>]| records(&handshake(1, &hello_body(Some(extensions))), &[]);
        let hello = old(&[sni_ext(b"Legacy.Example"), alpn_ext(&[b"http/1.1"])]);
        let info = parse(&hello);
        assert_eq!(info.server_name.as_deref(), Some("legacy.example"));
        assert_eq!(info.alpn, ["http/1.1"]);
        assert_every_prefix_incomplete(&hello);
        // Split across records, and with an IP address for a name.
        let split = records(
            &handshake(1, &hello_body(Some(&[sni_ext(b"10.0.0.1")]))),
            &[5, 40],
        );
        assert_eq!(parse(&split).server_name.as_deref(), Some("10.0.0.1"));
        // No extensions block at all, as TLS 1.2 and earlier allow.
        let bare = records(&handshake(1, &hello_body(None)), &[]);
        assert_eq!(
            parse(&bare),
            ClientHelloInfo {
                server_name: None,
                alpn: vec![]
            }
        );
        assert_every_prefix_incomplete(&bare);
        // What rustls refuses in them is still refused.
        let bad = old(&[sni_ext(b"a..b")]);
        assert!(matches!(error(&bad), SniError::Malformed(_)));
        let bad = old(&[sni_ext(b"under_score.example")]);
        assert!(matches!(error(&bad), SniError::InvalidServerName { .. }));
        let bad = old(&[alpn_ext(&[b"h2"]), alpn_ext(&[b"h2"])]);
        assert!(matches!(error(&bad), SniError::Malformed(_)));
    }

    #[test]
    fn ip_addresses_as_server_names() {
        let v4 = hello_with(&[sni_ext(b"192.0.2.7")]);
        assert_eq!(parse(&v4).server_name.as_deref(), Some("192.0.2.7"));
        // No route can name an IPv6 address.
        let v6 = hello_with(&[sni_ext(b"2001:db8::1")]);
        assert!(matches!(error(&v6), SniError::InvalidServerName { .. }));
    }

    #[test]
    fn grease_unknown_and_ech_outer_extensions_are_skipped() {
        // RFC 8701 GREASE values as Chrome sends them, an unknown extension type, and an
        // outer encrypted_client_hello (RFC 9849) whose outer server name is routed.
        let mut ech = vec![0, 0, 1, 0, 1, 0x2a];
        ech.extend(vec16(&[7; 32]));
        ech.extend(vec16(&[9; 120]));
        let hello = hello_with(&[
            extension(0x0a0a, &[]),
            extension(0x1234, b"anything"),
            sni_ext(b"public.example"),
            extension(0xfe0d, &ech),
            extension(0x000a, &[0x00, 0x04, 0x1a, 0x1a, 0x00, 0x1d]),
            extension(0x2a2a, &[0]),
        ]);
        assert_eq!(parse(&hello).server_name.as_deref(), Some("public.example"));
    }

    #[test]
    fn hello_split_across_two_and_three_records() {
        let message = handshake(
            1,
            &hello_body(Some(&[sig_algs_ext(), sni_ext(b"a.example.org")])),
        );
        for sizes in [
            &[10][..],
            &[1],
            &[2],
            &[4],
            &[message.len() - 1],
            &[1, 1],
            &[3, 40],
            &[50, 50],
        ] {
            let hello = records(&message, sizes);
            let info = parse(&hello);
            assert_eq!(
                info.server_name.as_deref(),
                Some("a.example.org"),
                "{sizes:?}"
            );
            assert_every_prefix_incomplete(&hello);
        }
        // Well past the 64 records the hand-written parser allowed: only bytes count.
        let tiny = records(&message, &vec![1; message.len() - 1]);
        assert_eq!(parse(&tiny).server_name.as_deref(), Some("a.example.org"));
    }

    #[test]
    fn bytes_after_the_hello_do_not_change_the_answer() {
        let hello = typical_hello();
        let expected = parse(&hello);
        // A TLS 1.3 middlebox-compatibility change_cipher_spec and early data may follow.
        let mut buf = hello.clone();
        buf.extend(record(20, &[1]));
        buf.extend(record(23, &[0x55; 40]));
        assert_eq!(parse(&buf), expected);
        let mut garbage = hello.clone();
        garbage.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(&garbage), expected);
        // But no second handshake message: a client waits for the ServerHello.
        let mut two = handshake(1, &hello_body(Some(&[sig_algs_ext()])));
        two.extend(handshake(1, &hello_body(Some(&[sig_algs_ext()]))));
        assert!(matches!(error(&records(&two, &[])), SniError::Malformed(_)));
    }

    #[test]
    fn large_hello_across_records_within_the_cap() {
        let padding = extension(0x0015, &vec![0; 40_000]);
        let message = handshake(
            1,
            &hello_body(Some(&[
                sig_algs_ext(),
                sni_ext(b"big.example.com"),
                padding,
            ])),
        );
        let hello = records(&message, &[16_384, 16_384]);
        assert_eq!(
            parse(&hello).server_name.as_deref(),
            Some("big.example.com")
        );
    }

    #[test]
    fn not_tls_is_refused_from_the_first_byte() {
        assert_eq!(error(b"G"), SniError::NotTls { byte: b'G' });
        let http = error(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(http, SniError::NotTls { byte: b'G' });
        // An application-data record where the hello should be.
        assert_eq!(error(&record(23, b"x")), SniError::NotTls { byte: 23 });
        assert_eq!(error(b"\x00"), SniError::NotTls { byte: 0 });
    }

    #[test]
    fn sslv2_hello_is_refused() {
        // SSL 2.0-format CLIENT-HELLO offering TLS 1.0, as old clients sent for compatibility.
        let v2 = b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10";
        assert_eq!(error(v2), SniError::Sslv2);
    }

    #[test]
    fn bad_record_headers_are_refused_once_the_header_is_complete() {
        let hello = typical_hello();
        for bad in [
            patched(&hello, 1, 2),
            patched(&hello, 1, 0x7f),
            vec![22, 3, 1, 0, 0],
            vec![22, 3, 1, 0x48, 0x01],
            vec![22, 3, 1, 0xff, 0xff],
        ] {
            assert!(
                matches!(error(&bad[..5]), SniError::Malformed(_)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn other_records_between_hello_records_are_refused() {
        let message = handshake(
            1,
            &hello_body(Some(&[sig_algs_ext(), sni_ext(b"x.example")])),
        );
        let mut buf = record(CONTENT_TYPE_HANDSHAKE, &message[..20]);
        buf.extend(record(21, &[2, 40]));
        buf.extend(record(CONTENT_TYPE_HANDSHAKE, &message[20..]));
        assert!(matches!(error(&buf), SniError::Malformed(_)));
    }

    #[test]
    fn handshake_must_be_a_client_hello() {
        let server_hello = records(&handshake(2, &hello_body(None)), &[]);
        assert!(matches!(error(&server_hello), SniError::Malformed(_)));
    }

    #[test]
    fn inconsistent_handshake_length() {
        let body = hello_body(Some(&[sig_algs_ext(), sni_ext(b"a.example")]));
        // The handshake header claims one byte less than the record carries.
        let mut claims_less = handshake(1, &body);
        claims_less[3] -= 1;
        assert!(matches!(
            error(&records(&claims_less, &[])),
            SniError::Malformed(_)
        ));
        // It claims one more: rustls waits for the byte, which completes no hello.
        let mut claims_more = handshake(1, &body);
        claims_more[3] += 1;
        let mut buf = records(&claims_more, &[]);
        assert_eq!(parse_client_hello(&buf), Ok(None));
        buf.extend(record(CONTENT_TYPE_HANDSHAKE, &[0]));
        assert!(matches!(error(&buf), SniError::Malformed(_)));
        // Too short for even the fixed fields.
        let tiny = records(&handshake(1, &[3, 3, 0]), &[]);
        assert!(matches!(error(&tiny), SniError::Malformed(_)));
    }

    #[test]
    fn truncated_and_overrunning_fields() {
        let mut body = hello_body(Some(&[sig_algs_ext(), sni_ext(b"a.example")]));
        for (at, byte, what) in [
            (34, 33, "session_id longer than 32"),
            (68, 5, "odd cipher_suites length"),
            (75, 0, "empty compression_methods"),
            (78, 0xff, "extensions block longer than the body"),
            (82, 0xff, "extension longer than the block"),
        ] {
            let bad = records(&handshake(1, &patched(&body, at, byte)), &[]);
            assert!(matches!(error(&bad), SniError::Malformed(_)), "{what}");
        }
        // Bytes after the extensions block.
        body.push(0);
        assert!(matches!(
            error(&records(&handshake(1, &body), &[])),
            SniError::Malformed(_)
        ));
    }

    #[test]
    fn malformed_server_name_extensions() {
        let mut bad = vec![
            hello_with(&[sni_ext(b"a.example"), sni_ext(b"b.example")]),
            hello_with(&[sni_ext_entries(&[(0, b"a.example"), (0, b"b.example")])]),
            hello_with(&[extension(0, &[0, 0])]),
            // Empty extension data, as a server sends it in its hello.
            hello_with(&[extension(0, &[])]),
            // A name type other than host_name: its encoding is unknown, so nothing after
            // it can be read (RFC 6066 §3), and no host name comes first.
            hello_with(&[sni_ext_entries(&[(7, b"\xff\xfe"), (0, b"a.example")])]),
        ];
        // The list length is shorter than the extension.
        let mut ext = sni_ext(b"a.example");
        ext.push(0);
        ext[3] += 1;
        bad.push(hello_with(&[ext]));
        // The name length runs past the list.
        let mut ext = sni_ext(b"a.example");
        ext[8] += 1;
        bad.push(hello_with(&[ext]));
        for (i, hello) in bad.iter().enumerate() {
            assert!(matches!(error(hello), SniError::Malformed(_)), "case {i}");
        }
    }

    #[test]
    fn malformed_alpn_extensions() {
        for hello in [
            hello_with(&[extension(16, &[0, 0])]),
            hello_with(&[extension(16, &[0, 1, 0])]),
            hello_with(&[alpn_ext(&[b"h2"]), alpn_ext(&[b"h2"])]),
            hello_with(&[extension(16, &[0, 3, 5, b'h', b'2'])]),
        ] {
            assert!(matches!(error(&hello), SniError::Malformed(_)));
        }
    }

    #[test]
    fn duplicate_extensions_are_refused() {
        let twice = hello_with(&[extension(0x1234, &[]), extension(0x1234, &[])]);
        assert!(matches!(error(&twice), SniError::Malformed(_)));
    }

    #[test]
    fn invalid_server_names() {
        let long_label = "a".repeat(64);
        let too_long = format!("{}.co", vec!["a".repeat(62); 4].join("."));
        assert_eq!(too_long.len(), 254);
        for name in [
            &b""[..],
            b"a..b",
            b".example.com",
            b"example.com..",
            b"-",
            b"-a.example",
            b"a-.example",
            b"under_score.example",
            b"sp ace.example",
            b"caf\xc3\xa9.example",
            b"\xff",
            b"*.example.com",
            long_label.as_bytes(),
            too_long.as_bytes(),
        ] {
            let err = error(&hello_with(&[sni_ext(name)]));
            assert!(
                matches!(
                    err,
                    SniError::InvalidServerName { .. } | SniError::Malformed(_)
                ),
                "{name:?}: {err:?}"
            );
        }
        let max = format!("{}.c", vec!["a".repeat(62); 4].join("."));
        assert_eq!(max.len(), 253);
        assert_eq!(
            parse(&hello_with(&[sni_ext(max.as_bytes())])).server_name,
            Some(max)
        );
        // rustls takes these; a route cannot name them.
        let message = error(&hello_with(&[sni_ext(b"Under_Score.example")])).to_string();
        assert!(
            message.contains("\"under_score.example\"") && message.contains("other than ASCII"),
            "{message}"
        );
        // One trailing dot, as `openssl s_client -servername db.example.com.` sends it, names
        // the same host (rustls drops it; curl leaves it out).
        let dot = hello_with(&[sni_ext(b"DB.example.com.")]);
        assert_eq!(parse(&dot).server_name.as_deref(), Some("db.example.com"));
    }

    #[test]
    fn oversized_hello_is_refused_by_its_first_record() {
        let mut buf = vec![22, 3, 1, 0x40, 0x00, 1, 0x01, 0x00, 0x00];
        buf.resize(5 + 16_384, 0);
        assert_eq!(parse_client_hello(&buf[..buf.len() - 1]), Ok(None));
        assert!(matches!(error(&buf), SniError::Malformed(_)));
    }

    #[test]
    fn an_endless_hello_is_refused_by_max_peek_len() {
        // A hello that announces the largest size rustls takes, in records of one byte.
        let message = handshake(1, &vec![0; 0xffff]);
        let buf = records(&message, &vec![1; message.len() - 1]);
        assert_eq!(parse_client_hello(&buf[..60_000]), Ok(None));
        assert_eq!(error(&buf[..MAX_PEEK_LEN]), SniError::Oversized);
        assert_eq!(error(&buf), SniError::Oversized);
        // In full records, a hello close to the largest rustls takes fits.
        let pad = 65_500 - hello_body(Some(&[sig_algs_ext()])).len() - 4;
        let message = handshake(
            1,
            &hello_body(Some(&[sig_algs_ext(), extension(0x15, &vec![0; pad])])),
        );
        assert_eq!(message.len(), 4 + 65_500);
        let hello = records(&message, &[16_384, 16_384, 16_384]);
        assert!(hello.len() <= MAX_PEEK_LEN, "{}", hello.len());
        assert_eq!(parse(&hello).server_name, None);
    }
}
