//! Recognising a TLS ClientHello and its server name (SNI).
//!
//! [`parse_client_hello`] reads the bytes a client has sent so far (peeked by the
//! caller) and says whether they are an incomplete ClientHello, a complete one (with its
//! server name and ALPN protocols), or not a ClientHello at all. Choosing a route by the
//! name is `crate::names::SniRoutes`.
//!
//! It must not do I/O or keep state between calls: the caller peeks, calls again with
//! more bytes, and owns the timeout. It never modifies or consumes bytes either, because
//! passthrough routing forwards the ClientHello to the upstream unchanged, and the
//! upstream's handshake transcript must match what the client sent.
//!
//! Everything here reads input from an untrusted client before any authentication, so
//! every length is checked against both the bytes present and the length that encloses
//! it, the reassembly buffer is capped, and garbage is refused as soon as it is visible
//! rather than after waiting for more bytes.

use std::borrow::Cow;

use crate::names::dns_name_problem;

/// Largest ClientHello handshake message accepted, in bytes, 4-byte handshake header
/// included. TLS allows 2^24, but real clients send a few KiB (a few more with
/// post-quantum key shares); the cap bounds the reassembly buffer.
pub const MAX_CLIENT_HELLO_LEN: usize = 64 * 1024;

/// Most TLS records the ClientHello may be split across. Real clients use one, rarely
/// two; anti-censorship tools split it into a few dozen at most. The cap stops a client
/// that sends an endless run of tiny records.
pub const MAX_RECORDS: usize = 64;

/// Bytes a caller may need to peek before [`parse_client_hello`] stops answering
/// `Ok(None)`: the largest ClientHello plus one record header per allowed record. With
/// this many bytes (or more) the answer is always `Ok(Some(_))` or `Err(_)`.
pub const MAX_PEEK_LEN_HAND: usize = MAX_CLIENT_HELLO_LEN + MAX_RECORDS * RECORD_HEADER_LEN;

/// TLS record header: content type (1), legacy version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_LEN: usize = 1 << 14;
/// Handshake header: message type (1), length (3).
const HANDSHAKE_HEADER_LEN: usize = 4;

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// How much of an invalid server name an error message quotes.
const QUOTED_NAME_LEN: usize = 64;

/// What routing needs from a complete ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `host_name` from the server_name extension, validated as a DNS name and
    /// lowercased; `None` when the client sent no server name.
    pub server_name: Option<String>,
    /// Protocols offered in the ALPN extension, in the client's order; empty without the
    /// extension. Registered protocol ids are ASCII; other bytes are replaced by U+FFFD.
    pub alpn: Vec<String>,
    /// Bytes of the TLS records that carried the ClientHello, from the start of the
    /// buffer. Bytes after it (e.g. early data) are not counted.
    pub len: usize,
}

/// Why the bytes a client sent are not a ClientHello this proxy can route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error(
        "not a TLS client: the first byte is {byte:#04x}, a TLS ClientHello starts with a handshake record (0x16)"
    )]
    NotTls { byte: u8 },
    #[error("SSL 2.0-format ClientHello is not supported; the client must speak TLS 1.0 or later")]
    Sslv2,
    #[error("TLS record version {major}.x is not supported; the major version must be 3")]
    RecordVersion { major: u8 },
    #[error("TLS record length {len} is outside 1..=16384")]
    RecordLength { len: usize },
    #[error(
        "a TLS record of content type {content_type} arrived in the middle of the ClientHello; only handshake records (22) may carry it"
    )]
    Interleaved { content_type: u8 },
    #[error("the first handshake message has type {msg_type}, expected ClientHello (1)")]
    NotClientHello { msg_type: u8 },
    #[error("ClientHello of {len} bytes exceeds the {MAX_CLIENT_HELLO_LEN}-byte limit")]
    Oversized { len: usize },
    #[error("ClientHello is split across more than {MAX_RECORDS} TLS records")]
    TooManyRecords,
    #[error("malformed ClientHello: the {field} field runs past the length that encloses it")]
    Overrun { field: &'static str },
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("invalid server name \"{name}\" in the ClientHello: it {why}")]
    InvalidServerName { name: String, why: &'static str },
}

/// Why parsing stopped before the end of a ClientHello.
enum Stop {
    /// The bytes so far are a valid prefix; more are needed.
    Incomplete,
    Invalid(SniError),
}

/// The handshake bytes gathered from the records present in the buffer.
struct Handshake<'a> {
    /// Handshake bytes that have arrived, never more than `msg_len`. Borrowed from the
    /// buffer while they come from one record, so the common case copies nothing.
    bytes: Cow<'a, [u8]>,
    /// Length of the whole handshake message once its header has arrived.
    msg_len: Option<usize>,
    /// Bytes of the records carrying the message, once the last of them is complete.
    records_len: Option<usize>,
}

/// A cursor over a length-prefixed structure that may not have fully arrived.
///
/// `data` holds the bytes present, `end` is the length the enclosing field declared.
/// Reading past `end` is malformed; reading past `data` (but within `end`) is merely
/// incomplete. Checking `end` first is what makes a bad length fail at once instead
/// of waiting for bytes that a valid ClientHello would never need.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    end: usize,
}

/// What the ClientHello body parse extracts.
#[derive(Default)]
struct Fields {
    server_name: Option<String>,
    alpn: Vec<String>,
}

/// Parses the first bytes a client sent on a TLS connection.
///
/// Returns `Ok(None)` while `buf` is a valid but incomplete prefix of a ClientHello,
/// `Ok(Some(_))` once the whole ClientHello (and the record carrying its last byte) has
/// arrived, and `Err(_)` as soon as the bytes present cannot start a ClientHello. Never
/// needs more than [`MAX_PEEK_LEN_HAND`] bytes; the work is linear in the bytes it looks at.
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<ClientHelloInfo>, SniError> {
    let handshake = Handshake::reassemble(buf)?;
    let (Some(msg_len), Some(body)) = (
        handshake.msg_len,
        handshake.bytes.get(HANDSHAKE_HEADER_LEN..),
    ) else {
        return Ok(None);
    };
    let reader = Reader::new(body, msg_len - HANDSHAKE_HEADER_LEN);
    match (parse_body(reader), handshake.records_len) {
        (Ok(fields), Some(len)) => Ok(Some(ClientHelloInfo {
            server_name: fields.server_name,
            alpn: fields.alpn,
            len,
        })),
        // The body parsed up to its declared end, but the data of an extension this
        // module skips without reading has not all arrived yet.
        (Ok(_), None) | (Err(Stop::Incomplete), _) => Ok(None),
        (Err(Stop::Invalid(e)), _) => Err(e),
    }
}

// === impl SniError ===

impl SniError {
    /// Short label for the `reason` of `switchyard_connections_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotTls { .. } => "not_tls",
            Self::Sslv2 => "tls_unsupported",
            Self::Oversized { .. } | Self::TooManyRecords => "tls_oversized",
            Self::InvalidServerName { .. } => "tls_bad_server_name",
            Self::RecordVersion { .. }
            | Self::RecordLength { .. }
            | Self::Interleaved { .. }
            | Self::NotClientHello { .. }
            | Self::Overrun { .. }
            | Self::Malformed(_) => "tls_malformed",
        }
    }

    /// The error for a first byte that is not a handshake record. An SSL 2.0 hello has
    /// the high bit of its 2-byte length set and message type 1 in its third byte.
    fn not_tls(buf: &[u8]) -> Self {
        match (buf.first(), buf.get(2)) {
            (Some(&b0), Some(&1)) if b0 & 0x80 != 0 => Self::Sslv2,
            (Some(&byte), _) => Self::NotTls { byte },
            (None, _) => Self::NotTls { byte: 0 },
        }
    }

    fn invalid_name(name: &[u8], why: &'static str) -> Self {
        // The name comes from an unauthenticated client: quote a bounded, escaped part.
        let quoted = name.get(..QUOTED_NAME_LEN).unwrap_or(name);
        let ellipsis = if quoted.len() < name.len() { "..." } else { "" };
        Self::InvalidServerName {
            name: format!("{}{ellipsis}", quoted.escape_ascii()),
            why,
        }
    }
}

// === impl Stop ===

impl From<SniError> for Stop {
    fn from(e: SniError) -> Self {
        Self::Invalid(e)
    }
}

// === impl Handshake ===

impl<'a> Handshake<'a> {
    /// Walks the records in `buf`, checking each header byte as soon as it is present,
    /// and gathers the handshake bytes they carry up to the end of the ClientHello.
    fn reassemble(buf: &'a [u8]) -> Result<Self, SniError> {
        let mut handshake = Self {
            bytes: Cow::Borrowed(&[]),
            msg_len: None,
            records_len: None,
        };
        let mut pos = 0;
        // Handshake bytes announced by the record headers seen so far.
        let mut announced = 0;
        for record in 0..MAX_RECORDS {
            let header = buf.get(pos..).unwrap_or_default();
            match header.first() {
                None => return Ok(handshake),
                Some(&CONTENT_TYPE_HANDSHAKE) => {}
                Some(_) if record == 0 => return Err(SniError::not_tls(buf)),
                Some(&content_type) => return Err(SniError::Interleaved { content_type }),
            }
            match header.get(1) {
                None => return Ok(handshake),
                Some(&3) => {}
                Some(&major) => return Err(SniError::RecordVersion { major }),
            }
            let (Some(&hi), Some(&lo)) = (header.get(3), header.get(4)) else {
                return Ok(handshake);
            };
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            // RFC 8446 §5.1: no empty handshake fragments, plaintext at most 2^14.
            if len == 0 || len > MAX_RECORD_LEN {
                return Err(SniError::RecordLength { len });
            }
            announced += len;
            let start = pos + RECORD_HEADER_LEN;
            let end = start + len;
            let fragment = buf.get(start..end.min(buf.len())).unwrap_or_default();
            handshake.append(fragment);
            handshake.check_header()?;
            if let Some(msg_len) = handshake.msg_len {
                if announced > msg_len {
                    // A client must wait for the ServerHello before sending any other
                    // handshake message, so nothing may share a record with its hello.
                    return Err(SniError::Malformed(
                        "a record carries more handshake bytes after the ClientHello",
                    ));
                }
                if announced == msg_len && end <= buf.len() {
                    handshake.records_len = Some(end);
                    return Ok(handshake);
                }
            }
            if end > buf.len() {
                return Ok(handshake);
            }
            pos = end;
        }
        Err(SniError::TooManyRecords)
    }

    /// Adds a record's fragment. The caller has checked that the bytes gathered stay
    /// within the announced message length (or that the header is not known yet, in
    /// which case at most 3 bytes were gathered before), so the copy is capped.
    fn append(&mut self, fragment: &'a [u8]) {
        self.bytes = match std::mem::take(&mut self.bytes) {
            Cow::Borrowed([]) => Cow::Borrowed(fragment),
            gathered => {
                let mut owned = gathered.into_owned();
                owned.extend_from_slice(fragment);
                Cow::Owned(owned)
            }
        };
    }

    /// Checks the handshake header as far as it has arrived.
    fn check_header(&mut self) -> Result<(), SniError> {
        match self.bytes.first() {
            None | Some(&HANDSHAKE_CLIENT_HELLO) => {}
            Some(&msg_type) => return Err(SniError::NotClientHello { msg_type }),
        }
        if let Some(&[_, a, b, c]) = self.bytes.get(..HANDSHAKE_HEADER_LEN) {
            let len = HANDSHAKE_HEADER_LEN + be24([a, b, c]);
            if len > MAX_CLIENT_HELLO_LEN {
                return Err(SniError::Oversized { len });
            }
            self.msg_len = Some(len);
        }
        Ok(())
    }
}

// === impl Reader ===

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], end: usize) -> Self {
        let data = data.get(..end).unwrap_or(data);
        Self { data, pos: 0, end }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.end
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Stop> {
        let end = self.pos + n;
        if end > self.end {
            return Err(SniError::Overrun { field }.into());
        }
        let bytes = self.data.get(self.pos..end).ok_or(Stop::Incomplete)?;
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, Stop> {
        match self.take(1, field)? {
            &[b] => Ok(b),
            _ => Err(Stop::Incomplete),
        }
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, Stop> {
        match self.take(2, field)? {
            &[hi, lo] => Ok(u16::from_be_bytes([hi, lo])),
            _ => Err(Stop::Incomplete),
        }
    }

    /// A 2-byte length prefix.
    fn len16(&mut self, field: &'static str) -> Result<usize, Stop> {
        self.u16(field).map(usize::from)
    }

    /// A reader over the next `n` bytes, which need not have arrived yet; this reader
    /// moves past them.
    fn sub(&mut self, n: usize, field: &'static str) -> Result<Reader<'a>, Stop> {
        let end = self.pos + n;
        if end > self.end {
            return Err(SniError::Overrun { field }.into());
        }
        let present = self
            .data
            .get(self.pos..end.min(self.data.len()))
            .unwrap_or_default();
        self.pos = end;
        Ok(Reader::new(present, n))
    }
}

/// Parses a ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2) as far as it has
/// arrived, keeping only the server name and ALPN.
fn parse_body(mut hello: Reader<'_>) -> Result<Fields, Stop> {
    hello.take(2, "legacy_version")?;
    hello.take(32, "random")?;
    let session_id = hello.u8("session_id length")?;
    if session_id > 32 {
        return Err(SniError::Malformed("session_id is longer than 32 bytes").into());
    }
    hello.take(usize::from(session_id), "session_id")?;
    let suites = hello.len16("cipher_suites length")?;
    if suites == 0 || suites % 2 != 0 {
        return Err(SniError::Malformed("cipher_suites length is zero or odd").into());
    }
    hello.take(suites, "cipher_suites")?;
    let compression = hello.u8("compression_methods length")?;
    if compression == 0 {
        return Err(SniError::Malformed("compression_methods is empty").into());
    }
    hello.take(usize::from(compression), "compression_methods")?;
    let mut fields = Fields::default();
    // TLS 1.2 and earlier may omit the extensions block entirely.
    if hello.at_end() {
        return Ok(fields);
    }
    let len = hello.len16("extensions length")?;
    let mut extensions = hello.sub(len, "extensions")?;
    if !hello.at_end() {
        return Err(SniError::Malformed("bytes follow the extensions").into());
    }
    let (mut seen_server_name, mut seen_alpn) = (false, false);
    while !extensions.at_end() {
        let kind = extensions.u16("extension type")?;
        let len = extensions.len16("extension length")?;
        let data = extensions.sub(len, "extension data")?;
        match kind {
            EXTENSION_SERVER_NAME => {
                // RFC 8446 §4.2 forbids repeats; for this one a repeat could also make
                // the proxy and the upstream disagree on the name.
                if std::mem::replace(&mut seen_server_name, true) {
                    return Err(SniError::Malformed("two server_name extensions").into());
                }
                fields.server_name = parse_server_name(data)?;
            }
            EXTENSION_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(SniError::Malformed("two ALPN extensions").into());
                }
                fields.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(fields)
}

/// The server_name extension (RFC 6066 §3): a non-empty list of typed names, at most
/// one of them a `host_name`.
fn parse_server_name(mut ext: Reader<'_>) -> Result<Option<String>, Stop> {
    let len = ext.len16("server_name list length")?;
    let mut list = ext.sub(len, "server_name list")?;
    if !ext.at_end() {
        return Err(SniError::Malformed("bytes follow the server_name list").into());
    }
    if len == 0 {
        return Err(SniError::Malformed("the server_name list is empty").into());
    }
    let mut host_name = None;
    while !list.at_end() {
        let kind = list.u8("server name type")?;
        let len = list.len16("server name length")?;
        let name = list.take(len, "server name")?;
        if kind == NAME_TYPE_HOST_NAME {
            if host_name.is_some() {
                return Err(SniError::Malformed("the server_name list has two host names").into());
            }
            if let Some(why) = dns_name_problem(name) {
                return Err(SniError::invalid_name(name, why).into());
            }
            host_name = Some(
                name.iter()
                    .map(|&b| char::from(b.to_ascii_lowercase()))
                    .collect(),
            );
        }
    }
    Ok(host_name)
}

/// The ALPN extension (RFC 7301 §3.1): a non-empty list of non-empty protocol ids.
fn parse_alpn(mut ext: Reader<'_>) -> Result<Vec<String>, Stop> {
    let len = ext.len16("ALPN list length")?;
    let mut list = ext.sub(len, "ALPN list")?;
    if !ext.at_end() {
        return Err(SniError::Malformed("bytes follow the ALPN list").into());
    }
    if len == 0 {
        return Err(SniError::Malformed("the ALPN list is empty").into());
    }
    let mut protocols = Vec::new();
    while !list.at_end() {
        let len = list.u8("ALPN protocol length")?;
        if len == 0 {
            return Err(SniError::Malformed("an ALPN protocol id is empty").into());
        }
        let id = list.take(usize::from(len), "ALPN protocol id")?;
        protocols.push(String::from_utf8_lossy(id).into_owned());
    }
    Ok(protocols)
}

fn be24([a, b, c]: [u8; 3]) -> usize {
    (usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello captured byte-for-byte from `openssl s_client -servername Example.COM
    /// -alpn h2,http/1.1` (OpenSSL 3.0) against a plain listener: one record, 335 bytes.
    const OPENSSL_HELLO: &str = concat!(
        "160301014a010001460303058c01b4219c4ff1c76d6f0f1d02fc3aeb5f7e7bd6",
        "cb87a051ecf2c0d63403b720a83d2f2153a5145e7376871625d66aa26b8afaed",
        "f121ae640394ca377baa5eb0003e130213031301c02cc030009fcca9cca8ccaa",
        "c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d",
        "009c003d003c0035002f00ff010000bf00000010000e00000b4578616d706c65",
        "2e434f4d000b000403000102000a00160014001d0017001e0019001801000101",
        "010201030104002300000010000e000c02683208687474702f312e3100160000",
        "00170000000d002a0028040305030603080708080809080a080b080408050806",
        "040105010601030303010302040205020602002b000908030403030302030100",
        "2d00020101003300260024001d00204da1c0bd8e4b576b720b3af4babe415878",
        "03770604f824f02c4c9ef73300835d",
    );

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
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
        sni_ext_entries(&[(NAME_TYPE_HOST_NAME, name)])
    }

    fn sni_ext_entries(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let list: Vec<u8> = entries
            .iter()
            .flat_map(|(kind, name)| [&[*kind][..], &vec16(name)].concat())
            .collect();
        extension(EXTENSION_SERVER_NAME, &vec16(&list))
    }

    fn alpn_ext(protocols: &[&[u8]]) -> Vec<u8> {
        let list: Vec<u8> = protocols
            .iter()
            .flat_map(|p| [&[u8::try_from(p.len()).unwrap()][..], p].concat())
            .collect();
        extension(EXTENSION_ALPN, &vec16(&list))
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

    fn hello_with(extensions: &[Vec<u8>]) -> Vec<u8> {
        records(&handshake(1, &hello_body(Some(extensions))), &[])
    }

    fn typical_hello() -> Vec<u8> {
        hello_with(&[
            extension(0x000a, &[0x00, 0x02, 0x00, 0x1d]),
            sni_ext(b"db.example.com"),
            alpn_ext(&[b"h2", b"http/1.1"]),
            extension(0x002b, &[0x02, 0x03, 0x04]),
        ])
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
    fn captured_openssl_hello() {
        let hello = unhex(OPENSSL_HELLO);
        let info = parse(&hello);
        assert_eq!(info.server_name.as_deref(), Some("example.com"));
        assert_eq!(info.alpn, ["h2", "http/1.1"]);
        assert_eq!(info.len, 335);
        assert_every_prefix_incomplete(&hello);
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
                len: hello.len(),
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
    fn hello_without_extensions_block() {
        let hello = records(&handshake(1, &hello_body(None)), &[]);
        let info = parse(&hello);
        assert_eq!((info.server_name, info.alpn.len()), (None, 0));
        assert_every_prefix_incomplete(&hello);
    }

    #[test]
    fn server_name_is_lowercased_and_other_name_types_skipped() {
        let hello = hello_with(&[sni_ext_entries(&[
            (7, &b"\xff\xfe"[..]),
            (0, b"API.Example.COM"),
        ])]);
        assert_eq!(
            parse(&hello).server_name.as_deref(),
            Some("api.example.com")
        );
    }

    #[test]
    fn hello_split_across_two_and_three_records() {
        let message = handshake(1, &hello_body(Some(&[sni_ext(b"a.example.org")])));
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
            assert_eq!(info.len, hello.len(), "{sizes:?}");
            assert_every_prefix_incomplete(&hello);
        }
    }

    #[test]
    fn bytes_after_the_hello_are_not_counted() {
        let hello = typical_hello();
        // A TLS 1.3 middlebox-compatibility change_cipher_spec and early data may follow.
        let mut buf = hello.clone();
        buf.extend(record(20, &[1]));
        buf.extend(record(23, &[0x55; 40]));
        assert_eq!(parse(&buf).len, hello.len());
        let mut garbage = hello.clone();
        garbage.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(&garbage).len, hello.len());
    }

    #[test]
    fn large_hello_across_records_within_the_cap() {
        let padding = extension(0x0015, &vec![0; 40_000]);
        let message = handshake(
            1,
            &hello_body(Some(&[sni_ext(b"big.example.com"), padding])),
        );
        let hello = records(&message, &[16_384, 16_384]);
        let info = parse(&hello);
        assert_eq!(info.server_name.as_deref(), Some("big.example.com"));
        assert_eq!(info.len, hello.len());
        assert!(info.len <= MAX_PEEK_LEN_HAND);
    }

    #[test]
    fn not_tls_is_refused_from_the_first_byte() {
        assert_eq!(error(b"G"), SniError::NotTls { byte: b'G' });
        let http = error(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(http, SniError::NotTls { byte: b'G' });
        assert_eq!(http.reason(), "not_tls");
        // An application-data record where the hello should be.
        assert_eq!(error(&record(23, b"x")), SniError::NotTls { byte: 23 });
        assert_eq!(error(b"\x00"), SniError::NotTls { byte: 0 });
    }

    #[test]
    fn sslv2_hello_is_refused() {
        // SSL 2.0-format CLIENT-HELLO offering TLS 1.0, as old clients sent for compatibility.
        let v2 = b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10";
        assert_eq!(error(v2), SniError::Sslv2);
        assert_eq!(SniError::Sslv2.reason(), "tls_unsupported");
    }

    #[test]
    fn bad_record_headers() {
        let hello = typical_hello();
        assert_eq!(error(&[22, 2]), SniError::RecordVersion { major: 2 });
        assert_eq!(
            error(&patched(&hello, 1, 0x7f)),
            SniError::RecordVersion { major: 0x7f }
        );
        assert_eq!(error(&[22, 3, 1, 0, 0]), SniError::RecordLength { len: 0 });
        assert_eq!(
            error(&[22, 3, 1, 0x40, 0x01]),
            SniError::RecordLength { len: 16_385 }
        );
        assert_eq!(
            error(&[22, 3, 1, 0xff, 0xff]),
            SniError::RecordLength { len: 65_535 }
        );
    }

    #[test]
    fn other_records_between_hello_records_are_refused() {
        let message = handshake(1, &hello_body(Some(&[sni_ext(b"x.example")])));
        let mut buf = record(CONTENT_TYPE_HANDSHAKE, &message[..20]);
        buf.extend(record(21, &[2, 40]));
        assert_eq!(error(&buf), SniError::Interleaved { content_type: 21 });
    }

    #[test]
    fn handshake_must_be_a_client_hello() {
        let server_hello = records(&handshake(2, &hello_body(None)), &[]);
        assert_eq!(
            error(&server_hello),
            SniError::NotClientHello { msg_type: 2 }
        );
        // Refused from the first handshake byte, without waiting for the rest.
        assert_eq!(
            error(&server_hello[..6]),
            SniError::NotClientHello { msg_type: 2 }
        );
    }

    #[test]
    fn inconsistent_handshake_length() {
        let body = hello_body(Some(&[sni_ext(b"a.example")]));
        assert_eq!(body.len(), 97);
        // The handshake header claims one byte less than the record carries.
        let mut claims_less = handshake(1, &body);
        claims_less[3] -= 1;
        let err = error(&records(&claims_less, &[]));
        assert!(matches!(err, SniError::Malformed(_)), "{err:?}");
        // It claims one more: the extensions block no longer ends the body.
        let mut claims_more = handshake(1, &body);
        claims_more[3] += 1;
        let err = error(&records(&claims_more, &[]));
        assert_eq!(err, SniError::Malformed("bytes follow the extensions"));
        // Too short for even the fixed fields.
        let tiny = records(&handshake(1, &[3, 3, 0]), &[]);
        assert_eq!(error(&tiny), SniError::Overrun { field: "random" });
    }

    #[test]
    fn truncated_and_overrunning_fields() {
        let mut body = hello_body(Some(&[sni_ext(b"a.example")]));
        // session_id longer than 32.
        let sid = patched(&body, 34, 33);
        assert!(matches!(
            error(&records(&handshake(1, &sid), &[])),
            SniError::Malformed(_)
        ));
        // Odd cipher_suites length.
        let odd = patched(&body, 68, 5);
        assert!(matches!(
            error(&records(&handshake(1, &odd), &[])),
            SniError::Malformed(_)
        ));
        // Empty compression methods.
        let comp = patched(&body, 75, 0);
        assert!(matches!(
            error(&records(&handshake(1, &comp), &[])),
            SniError::Malformed(_)
        ));
        // The extensions block claims more than the body holds.
        let ext_len = patched(&body, 78, 0xff);
        assert_eq!(
            error(&records(&handshake(1, &ext_len), &[])),
            SniError::Overrun {
                field: "extensions"
            }
        );
        // An extension's length runs past the extensions block: refused even when the
        // hello is cut short, because its declared length already tells.
        let ext_data = patched(&body, 82, 0xff);
        let buf = records(&handshake(1, &ext_data), &[]);
        assert_eq!(
            error(&buf),
            SniError::Overrun {
                field: "extension data"
            }
        );
        assert_eq!(
            error(&buf[..95]),
            SniError::Overrun {
                field: "extension data"
            }
        );
        // Bytes after the extensions block.
        body.push(0);
        assert!(matches!(
            error(&records(&handshake(1, &body), &[])),
            SniError::Malformed(_)
        ));
    }

    #[test]
    fn malformed_server_name_extensions() {
        let twice = hello_with(&[sni_ext(b"a.example"), sni_ext(b"b.example")]);
        assert_eq!(
            error(&twice),
            SniError::Malformed("two server_name extensions")
        );
        let two_hosts = hello_with(&[sni_ext_entries(&[(0, b"a.example"), (0, b"b.example")])]);
        assert!(matches!(error(&two_hosts), SniError::Malformed(_)));
        let empty_list = hello_with(&[extension(EXTENSION_SERVER_NAME, &[0, 0])]);
        assert!(matches!(error(&empty_list), SniError::Malformed(_)));
        // Empty extension data, as a server sends it in its hello.
        let empty_ext = hello_with(&[extension(EXTENSION_SERVER_NAME, &[])]);
        assert!(matches!(error(&empty_ext), SniError::Overrun { .. }));
        // The list length is shorter than the extension.
        let mut ext = sni_ext(b"a.example");
        ext.push(0);
        ext[3] += 1;
        assert!(matches!(error(&hello_with(&[ext])), SniError::Malformed(_)));
        // The name length runs past the list.
        let mut ext = sni_ext(b"a.example");
        ext[8] += 1;
        assert!(matches!(
            error(&hello_with(&[ext])),
            SniError::Overrun { .. }
        ));
    }

    #[test]
    fn malformed_alpn_extensions() {
        let empty = hello_with(&[extension(EXTENSION_ALPN, &[0, 0])]);
        assert!(matches!(error(&empty), SniError::Malformed(_)));
        let empty_id = hello_with(&[extension(EXTENSION_ALPN, &[0, 1, 0])]);
        assert!(matches!(error(&empty_id), SniError::Malformed(_)));
        let twice = hello_with(&[alpn_ext(&[b"h2"]), alpn_ext(&[b"h2"])]);
        assert!(matches!(error(&twice), SniError::Malformed(_)));
        let overrun = hello_with(&[extension(EXTENSION_ALPN, &[0, 3, 5, b'h', b'2'])]);
        assert!(matches!(error(&overrun), SniError::Overrun { .. }));
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
            b"example.com.",
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
                matches!(err, SniError::InvalidServerName { .. }),
                "{name:?}: {err:?}"
            );
            assert_eq!(err.reason(), "tls_bad_server_name");
        }
        let max = format!("{}.c", vec!["a".repeat(62); 4].join("."));
        assert_eq!(max.len(), 253);
        assert_eq!(
            parse(&hello_with(&[sni_ext(max.as_bytes())])).server_name,
            Some(max)
        );
        let message = error(&hello_with(&[sni_ext(b"a..b")])).to_string();
        assert!(
            message.contains("\"a..b\"") && message.contains("empty label"),
            "{message}"
        );
        let quoted = error(&hello_with(&[sni_ext(too_long.as_bytes())])).to_string();
        assert!(quoted.contains("...") && quoted.len() < 200, "{quoted}");
    }

    #[test]
    fn oversized_hello_is_refused_from_its_header() {
        let header = [22, 3, 1, 0x40, 0x00, 1, 0x01, 0x00, 0x00];
        assert_eq!(error(&header), SniError::Oversized { len: 65_540 });
        assert_eq!(error(&header).reason(), "tls_oversized");
        let largest = [22, 3, 1, 0x40, 0x00, 1, 0x00, 0xff, 0xfc];
        assert_eq!(parse_client_hello(&largest), Ok(None));
    }

    #[test]
    fn endless_tiny_records_are_cut_off() {
        let message = handshake(1, &hello_body(Some(&[sni_ext(b"a.example")])));
        let buf = records(&message, &[1; MAX_RECORDS]);
        assert_eq!(error(&buf), SniError::TooManyRecords);
        // Refused once the last allowed record has arrived, not after more bytes.
        let at_cap = (RECORD_HEADER_LEN + 1) * MAX_RECORDS;
        assert_eq!(error(&buf[..at_cap]), SniError::TooManyRecords);
        assert_eq!(parse_client_hello(&buf[..at_cap - 1]), Ok(None));
        // A hello in exactly the allowed number of records is fine.
        let fits = records(&message, &[1; MAX_RECORDS - 1]);
        assert_eq!(parse(&fits).len, fits.len());
    }

    #[test]
    fn the_largest_incomplete_prefix_is_below_max_peek_len() {
        // The worst case: the largest hello over the most records, each header counted.
        let message = handshake(1, &hello_body(Some(&[extension(0x15, &vec![0; 65_449])])));
        assert_eq!(message.len(), MAX_CLIENT_HELLO_LEN);
        let mut sizes = vec![16_384; 3];
        sizes.resize(MAX_RECORDS - 1, 10);
        let hello = records(&message, &sizes);
        assert_eq!(hello.len(), MAX_PEEK_LEN_HAND);
        assert_eq!(parse(&hello).len, MAX_PEEK_LEN_HAND);
        assert_eq!(
            parse_client_hello(&hello[..MAX_PEEK_LEN_HAND - 1]),
            Ok(None)
        );
    }

    #[test]
    fn reasons_are_metric_labels() {
        let malformed = SniError::Malformed("x");
        assert_eq!(malformed.reason(), "tls_malformed");
        assert_eq!(SniError::TooManyRecords.reason(), "tls_oversized");
        assert_eq!(
            SniError::Interleaved { content_type: 21 }.reason(),
            "tls_malformed"
        );
    }
}
