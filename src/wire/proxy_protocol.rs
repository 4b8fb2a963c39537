//! PROXY protocol v1 (text) and v2 (binary) wire format: turning a client's address into
//! header bytes and header bytes back into addresses.
//!
//! This module owns the bytes only. As in sozu's `proxy_protocol` module, the roles that do
//! I/O live elsewhere: the listener side *expects* a header (reads into a buffer capped at
//! [`MAX_HEADER_LEN`] under `handshake_timeout`, calls [`decode`] after each read, and hands
//! the bytes after `consumed` to the upstream before the copy starts), and the connect and
//! health-check sides *send* one ([`encode`], [`encode_local`]). Nothing here reads a
//! socket, looks at a clock, logs, or decides whether a peer is trusted to send a header
//! (`proxy_protocol_from` is checked before [`decode`] is ever called).
//!
//! The `ppp` crate parses and builds the headers. Around it sit the few checks it does not
//! make and a receiver facing an unauthenticated peer needs: the size caps, refusing a
//! header as soon as its bytes show it can never become valid (ppp waits for whole fields),
//! the v2 family/transport bytes the protocol leaves undefined, TLV framing, and accepting
//! everything the protocol allows after `UNKNOWN` and in a `LOCAL` header.
//!
//! Reference: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, SocketAddr};
use std::num::IntErrorKind;

use ppp::PartialResult;
use ppp::v1;
use ppp::v2;

/// The longest v1 header, CRLF included, that the protocol allows (107 bytes).
pub const V1_MAX_LEN: usize = 107;

/// The longest header [`decode`] accepts, in bytes: a v2 header whose length field announces
/// more than `MAX_HEADER_LEN - 16` bytes is refused as oversized.
///
/// 4096 covers the 16-byte fixed part, the 216-byte AF_UNIX address block and ~3.8 KiB of
/// TLVs (cloud load balancers send endpoint ids and TLS details there), while bounding what
/// an unauthenticated peer can make us buffer. [`decode`] never returns `Ok(None)` for a
/// buffer this long, so the reader can use it as its buffer's capacity.
pub const MAX_HEADER_LEN: usize = 4096;

/// Bytes before a v2 header's address block: signature, version/command, family, length.
const V2_FIXED_LEN: usize = 16;

/// The family/transport bytes the protocol defines (UNSPEC, then STREAM and DGRAM over
/// INET, INET6 and UNIX); it says receivers must refuse every other one.
const V2_FAMILIES: [u8; 7] = [0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32];

/// A v1 line without addresses; the protocol says to ignore whatever follows it up to the
/// CRLF.
const V1_UNKNOWN: &[u8] = b"PROXY UNKNOWN";

/// Which header versions a listener accepts (SPEC §8 `accept_proxy_protocol`; `off` is the
/// absence of a value: such a listener never calls [`decode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    V1,
    V2,
    /// Either version, told apart by the first byte.
    Any,
}

/// A PROXY protocol version; also what a pool sends upstream (SPEC §8 `proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The original client's connection as the sending proxy saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client.
    pub source: SocketAddr,
    /// The address the client connected to on the sending proxy.
    pub destination: SocketAddr,
}

/// A decoded header. It carries addresses only for a TCP client over IPv4/IPv6; v1
/// `UNKNOWN` and v2 `LOCAL`, `AF_UNSPEC`, `AF_UNIX` and UDP headers carry none, and the
/// receiver then uses the real peer address, as the protocol requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    version: Version,
    addresses: Option<Addresses>,
}

/// Why a header was refused. The peer is closed and counted under the `proxy_protocol`
/// reject reason.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "not a PROXY protocol header: the first bytes match neither \"PROXY \" (v1) nor the v2 signature"
    )]
    NotProxy,
    #[error("PROXY {received} header received, but this listener accepts only {accepted}")]
    VersionNotAccepted {
        received: Version,
        accepted: Version,
    },
    #[error("PROXY v1 header longer than {V1_MAX_LEN} bytes")]
    V1Oversized,
    #[error("PROXY v1 header line must end with \"\\r\\n\"")]
    V1BadTerminator,
    #[error("PROXY v1 header holds byte 0x{0:02x}, which no field of its protocol can")]
    V1BadByte(u8),
    #[error("PROXY v1 header: {0}")]
    V1(v1::BinaryParseError),
    #[error("PROXY v2 header has version {0}, expected 2")]
    V2BadVersion(u8),
    #[error("PROXY v2 command must be LOCAL (0) or PROXY (1), got {0}")]
    V2BadCommand(u8),
    #[error("PROXY v2 address family/transport byte 0x{0:02x} is not one the protocol defines")]
    V2BadFamily(u8),
    #[error("PROXY v2 header of {length} bytes exceeds the {MAX_HEADER_LEN}-byte limit")]
    V2Oversized { length: usize },
    #[error("PROXY v2 header: {0}")]
    V2(v2::ParseError),
}

/// Sends `source` and `destination` in a header of the given version.
///
/// Neither version can mix families, so when exactly one address is IPv4 it is sent as its
/// IPv4-mapped IPv6 form (`::ffff:a.b.c.d`): the client's address survives, which v1
/// `UNKNOWN` or v2 `AF_UNSPEC` would throw away.
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let pair = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (source, destination)
        }
        _ => (mapped(source), mapped(destination)),
    };
    match version {
        Version::V1 => v1::Addresses::from(pair).to_string().into_bytes(),
        Version::V2 => build_v2(v2::Command::Proxy, v2::Protocol::Stream, pair.into()),
    }
}

/// A header that carries no client, for connections the proxy makes itself (health checks,
/// SPEC §8): v1 `UNKNOWN`, v2 `LOCAL`.
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => v1::Addresses::Unknown.to_string().into_bytes(),
        Version::V2 => build_v2(
            v2::Command::Local,
            v2::Protocol::Unspecified,
            v2::Addresses::Unspecified,
        ),
    }
}

fn build_v2(command: v2::Command, protocol: v2::Protocol, addresses: v2::Addresses) -> Vec<u8> {
    v2::Builder::with_addresses(v2::Version::Two | command, protocol, addresses)
        .build()
        // The builder fails only past 64 KiB; an address block is at most 36 bytes.
        .expect("a v2 header without TLVs fits its length field")
}

fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

/// Reads a PROXY header from the start of `buf`.
///
/// - `Ok(Some((header, consumed)))`: the first `consumed` bytes are the header; the rest of
///   `buf` is the client's own data and must be forwarded.
/// - `Ok(None)`: `buf` is a valid beginning of a header; read more and call again with the
///   whole buffer. Never returned once `buf` holds [`MAX_HEADER_LEN`] bytes.
/// - `Err(_)`: not an acceptable header, whatever follows; close the client.
///
/// It looks at no more than [`MAX_HEADER_LEN`] bytes and allocates nothing.
pub fn decode(buf: &[u8], accept: Accept) -> Result<Option<(Header, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // The v1 and v2 signatures differ in their first byte, so one byte decides.
    let received = match first {
        b'P' => Version::V1,
        b'\r' => Version::V2,
        _ => return Err(DecodeError::NotProxy),
    };
    let accepted = match accept {
        Accept::V1 => Version::V1,
        Accept::V2 => Version::V2,
        Accept::Any => received,
    };
    let signature = match received {
        Version::V1 => &b"PROXY "[..],
        Version::V2 => v2::PROTOCOL_PREFIX,
    };
    let n = buf.len().min(signature.len());
    if buf[..n] != signature[..n] {
        return Err(DecodeError::NotProxy);
    }
    // Named only once the bytes really look like the other version, so that a plain-text
    // client on a v2 listener reads as "no header", not "wrong header".
    if received != accepted {
        return Err(DecodeError::VersionNotAccepted { received, accepted });
    }
    match received {
        Version::V1 => decode_v1(buf),
        Version::V2 => decode_v2(buf),
    }
}

fn decode_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, DecodeError> {
    // Bytes past the cap can only make a line too long, so they are never looked at.
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let end = window.iter().position(|&b| b == b'\r' || b == b'\n');
    let line = &window[..end.unwrap_or(window.len())];
    // ppp would stop at the sixth space; the protocol ignores anything after UNKNOWN.
    let unknown = line
        .strip_prefix(V1_UNKNOWN)
        .is_some_and(|rest| rest.first().is_none_or(|&b| b == b' '));
    if !unknown {
        check_v1_prefix(line)?;
    }
    if line.len() > V1_MAX_LEN - 2 {
        return Err(DecodeError::V1Oversized);
    }
    let Some(end) = end else {
        return Ok(None);
    };
    match (window[end], buf.get(end + 1)) {
        (b'\r', None) => Ok(None),
        (b'\r', Some(b'\n')) => {
            let consumed = end + 2;
            let addresses = if unknown {
                None
            } else {
                let header = v1::Header::try_from(&buf[..consumed]).map_err(DecodeError::V1)?;
                match header.addresses {
                    v1::Addresses::Tcp4(a) => Some(a.into()),
                    v1::Addresses::Tcp6(a) => Some(a.into()),
                    v1::Addresses::Unknown => None,
                }
            };
            let header = Header {
                version: Version::V1,
                addresses,
            };
            Ok(Some((header, consumed)))
        }
        _ => Err(DecodeError::V1BadTerminator),
    }
}

/// Refuses a v1 line (CRLF excluded, possibly cut short) that no more bytes can make valid.
fn check_v1_prefix(line: &[u8]) -> Result<(), DecodeError> {
    match v1::Header::try_from(line) {
        // Cut right after the space before the destination port, ppp judges the empty
        // port, its last check, as a bad one.
        Err(v1::BinaryParseError::Parse(v1::ParseError::InvalidDestinationPort(Some(e))))
            if *e.kind() == IntErrorKind::Empty => {}
        Err(e) if !e.is_incomplete() => return Err(DecodeError::V1(e)),
        _ => {}
    }
    // ppp judges an address only once all four fields are in, and takes "+1" as a port;
    // the characters each protocol's fields can hold settle both at the first bad byte.
    let (fields, allowed): (_, fn(&u8) -> bool) =
        if let Some(fields) = line.strip_prefix(b"PROXY TCP4 ") {
            (fields, |&b| b.is_ascii_digit() || b == b'.' || b == b' ')
        } else if let Some(fields) = line.strip_prefix(b"PROXY TCP6 ") {
            (fields, |&b| b.is_ascii_hexdigit() || b":. ".contains(&b))
        } else {
            (line, |&b| {
                b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' '
            })
        };
    match fields.iter().find(|b| !allowed(b)) {
        Some(&bad) => Err(DecodeError::V1BadByte(bad)),
        None => Ok(()),
    }
}

fn decode_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, DecodeError> {
    // ppp judges the fixed part once all 16 bytes are in; each byte is judged as it comes.
    let local = match buf.get(12) {
        None => return Ok(None),
        Some(0x20) => true,
        Some(0x21) => false,
        Some(&b) if b >> 4 != 2 => return Err(DecodeError::V2BadVersion(b >> 4)),
        Some(&b) => return Err(DecodeError::V2BadCommand(b & 0x0F)),
    };
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    // LOCAL discards the whole block, family included, as the protocol requires.
    if !local && !V2_FAMILIES.contains(&family) {
        return Err(DecodeError::V2BadFamily(family));
    }
    let Some(&[high, low]) = buf.get(14..V2_FIXED_LEN) else {
        return Ok(None);
    };
    let length = V2_FIXED_LEN + usize::from(u16::from_be_bytes([high, low]));
    if length > MAX_HEADER_LEN {
        return Err(DecodeError::V2Oversized { length });
    }
    let v2_header = |addresses| Header {
        version: Version::V2,
        addresses,
    };
    if local {
        return Ok((buf.len() >= length).then_some((v2_header(None), length)));
    }
    let header = match v2::Header::try_from(buf) {
        Ok(header) => header,
        Err(e) if e.is_incomplete() => return Ok(None),
        Err(e) => return Err(DecodeError::V2(e)),
    };
    // TLV contents are not used, but one that runs past the header means the sender's
    // framing is broken. An AF_UNSPEC block has no layout to check.
    if header.address_family() != v2::AddressFamily::Unspecified {
        header
            .tlvs()
            .try_for_each(|tlv| tlv.map(drop))
            .map_err(DecodeError::V2)?;
    }
    let addresses = match (header.protocol, header.addresses) {
        (v2::Protocol::Stream, v2::Addresses::IPv4(a)) => Some(a.into()),
        (v2::Protocol::Stream, v2::Addresses::IPv6(a)) => Some(a.into()),
        _ => None,
    };
    Ok(Some((v2_header(addresses), header.len())))
}

// === impl Addresses ===

// ppp's v1 and v2 share these two address types.
impl From<ppp::v1::IPv4> for Addresses {
    fn from(a: ppp::v1::IPv4) -> Self {
        Addresses {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        }
    }
}

impl From<ppp::v1::IPv6> for Addresses {
    fn from(a: ppp::v1::IPv6) -> Self {
        Addresses {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        }
    }
}

// === impl Header ===

impl Header {
    pub fn version(&self) -> Version {
        self.version
    }

    /// The client's addresses, or `None` when the real peer address must be used.
    pub fn addresses(&self) -> Option<Addresses> {
        self.addresses
    }

    /// The header's bytes. A header from [`decode`] encodes to bytes that decode to an
    /// equal header; v2 TLVs are not kept, and a header without addresses is sent as v1
    /// `UNKNOWN` or v2 `LOCAL`.
    pub fn encode(&self) -> Vec<u8> {
        match self.addresses {
            Some(a) => encode(self.version, a.source, a.destination),
            None => encode_local(self.version),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCEPTS: [Accept; 3] = [Accept::V1, Accept::V2, Accept::Any];

    const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn with(version: Version, source: &str, destination: &str) -> Header {
        Header {
            version,
            addresses: Some(Addresses {
                source: addr(source),
                destination: addr(destination),
            }),
        }
    }

    fn without(version: Version) -> Header {
        Header {
            version,
            addresses: None,
        }
    }

    /// The accept modes under which a header of `version` must decode.
    fn accepting(version: Version) -> [Accept; 2] {
        match version {
            Version::V1 => [Accept::V1, Accept::Any],
            Version::V2 => [Accept::V2, Accept::Any],
        }
    }

    /// A v2 header by hand: the signature, bytes 12-13 as given, the length, `block`.
    fn v2_raw(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let length = u16::try_from(block.len()).expect("test block fits");
        [
            V2_SIGNATURE,
            &[version_command, family],
            &length.to_be_bytes(),
            block,
        ]
        .concat()
    }

    fn shown(bytes: &[u8]) -> String {
        bytes.escape_ascii().to_string()
    }

    /// The worked example of the protocol text, section 2.1.
    const V1_SPEC_EXAMPLE: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";

    /// The protocol text's longest lines (section 2.1): 56 bytes for TCP4, 104 for TCP6 and
    /// 107, the cap, for UNKNOWN with addresses.
    const V1_WORST_TCP4: &[u8] = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
    const V1_WORST_TCP6: &[u8] = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    const V1_WORST_UNKNOWN: &[u8] = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";

    /// PROXY, TCP over IPv4, 192.168.0.1:56324 -> 192.168.0.11:443.
    const V2_TCP4: [u8; 28] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, // version 2, PROXY
        0x11, // AF_INET, STREAM
        0x00, 0x0C, // 12 bytes of addresses
        192, 168, 0, 1, // source
        192, 168, 0, 11, // destination
        0xDC, 0x04, // 56324
        0x01, 0xBB, // 443
    ];

    /// PROXY, TCP over IPv6, [2001:db8::1]:1234 -> [2001:db8::2]:80.
    const V2_TCP6: [u8; 52] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, // version 2, PROXY
        0x21, // AF_INET6, STREAM
        0x00, 0x24, // 36 bytes of addresses
        0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // source
        0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, // destination
        0x04, 0xD2, // 1234
        0x00, 0x50, // 80
    ];

    /// LOCAL with AF_UNSPEC and no block: what HAProxy's `check-send-proxy` and Envoy send.
    const V2_LOCAL: [u8; 16] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0x00,
        0x00,
    ];

    /// Every valid header the generic tests use, with what it decodes to.
    fn valid_headers() -> Vec<(Vec<u8>, Header)> {
        use Version::{V1, V2};
        let ffff = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        // AWS NLB behind a PrivateLink endpoint: PP2_TYPE_AWS (0xEA), subtype 0x01, the
        // endpoint id.
        let aws = [
            &V2_TCP4[16..],
            &[0xEA, 0x00, 0x17, 0x01],
            b"vpce-0123456789abcdef0",
        ]
        .concat();
        // What HAProxy's send-proxy-v2-ssl adds: ALPN, authority, then PP2_TYPE_SSL with a
        // client byte, a verify word and a PP2_SUBTYPE_SSL_VERSION sub-TLV; NOOP padding and
        // an empty custom type last.
        let haproxy = [
            &V2_TCP6[16..],
            &[0x01, 0x00, 0x02, b'h', b'2'],
            &[0x02, 0x00, 0x0B],
            b"example.com",
            &[0x20, 0x00, 0x0F, 0x07, 0, 0, 0, 0, 0x21, 0x00, 0x07],
            b"TLSv1.3",
            &[0x04, 0x00, 0x03, 0, 0, 0],
            &[0xEE, 0x00, 0x00],
        ]
        .concat();
        vec![
            (
                V1_SPEC_EXAMPLE.to_vec(),
                with(V1, "192.168.0.1:56324", "192.168.0.11:443"),
            ),
            (
                V1_WORST_TCP4.to_vec(),
                with(V1, "255.255.255.255:65535", "255.255.255.255:65535"),
            ),
            (V1_WORST_TCP6.to_vec(), with(V1, ffff, ffff)),
            (
                b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n".to_vec(),
                with(V1, "[2001:db8::1]:65535", "[::1]:0"),
            ),
            (
                b"PROXY TCP6 ::ffff:10.0.0.1 fe80::1 1 2\r\n".to_vec(),
                with(V1, "[::ffff:10.0.0.1]:1", "[fe80::1]:2"),
            ),
            (
                b"PROXY TCP4 0.0.0.0 10.0.0.1 0 65535\r\n".to_vec(),
                with(V1, "0.0.0.0:0", "10.0.0.1:65535"),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), without(V1)),
            (V1_WORST_UNKNOWN.to_vec(), without(V1)),
            (b"PROXY UNKNOWN anything  at\tall\r\n".to_vec(), without(V1)),
            // More fields than ppp splits a line into: still ignored after UNKNOWN.
            (b"PROXY UNKNOWN a b c d e f g h\r\n".to_vec(), without(V1)),
            (
                V2_TCP4.to_vec(),
                with(V2, "192.168.0.1:56324", "192.168.0.11:443"),
            ),
            (
                V2_TCP6.to_vec(),
                with(V2, "[2001:db8::1]:1234", "[2001:db8::2]:80"),
            ),
            (
                v2_raw(0x21, 0x11, &aws),
                with(V2, "192.168.0.1:56324", "192.168.0.11:443"),
            ),
            (
                v2_raw(0x21, 0x21, &haproxy),
                with(V2, "[2001:db8::1]:1234", "[2001:db8::2]:80"),
            ),
            (V2_LOCAL.to_vec(), without(V2)),
            // LOCAL with the connection's own addresses, as some balancers send on checks.
            (v2_raw(0x20, 0x11, &V2_TCP4[16..]), without(V2)),
            // LOCAL ignores the family byte and the block, whatever they hold.
            (v2_raw(0x20, 0xFF, &[0xAB; 7]), without(V2)),
            // UDP over IPv4 and IPv6: no TCP client to report.
            (v2_raw(0x21, 0x12, &V2_TCP4[16..]), without(V2)),
            (v2_raw(0x21, 0x22, &V2_TCP6[16..]), without(V2)),
            // AF_UNIX stream, 216 bytes of paths, then a TLV.
            (
                v2_raw(
                    0x21,
                    0x31,
                    &[&[0u8; 216][..], &[0x04, 0x00, 0x01, 0]].concat(),
                ),
                without(V2),
            ),
            // AF_UNSPEC: the block has no layout and is skipped.
            (v2_raw(0x21, 0x00, &[1, 2, 3]), without(V2)),
        ]
    }

    #[test]
    fn golden_headers_decode_in_every_accepting_mode() {
        for (bytes, expected) in valid_headers() {
            for accept in accepting(expected.version()) {
                assert_eq!(
                    decode(&bytes, accept),
                    Ok(Some((expected, bytes.len()))),
                    "{accept:?} {}",
                    shown(&bytes)
                );
            }
        }
    }

    #[test]
    fn encoding_gives_the_golden_bytes() {
        let (s4, d4) = (addr("192.168.0.1:56324"), addr("192.168.0.11:443"));
        let (s6, d6) = (addr("[2001:db8::1]:1234"), addr("[2001:db8::2]:80"));
        assert_eq!(encode(Version::V1, s4, d4), V1_SPEC_EXAMPLE);
        assert_eq!(
            encode(Version::V1, s6, d6),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n"
        );
        assert_eq!(encode(Version::V2, s4, d4), V2_TCP4);
        assert_eq!(encode(Version::V2, s6, d6), V2_TCP6);
        assert_eq!(encode_local(Version::V1), b"PROXY UNKNOWN\r\n");
        assert_eq!(encode_local(Version::V2), V2_LOCAL);
    }

    #[test]
    fn mixed_families_are_sent_as_mapped_ipv6() {
        let (v4, v6) = (addr("192.0.2.1:1000"), addr("[2001:db8::1]:443"));
        assert_eq!(
            encode(Version::V1, v4, v6),
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1000 443\r\n"
        );
        let v2 = encode(Version::V2, v6, v4);
        assert_eq!(&v2[12..16], [0x21, 0x21, 0x00, 0x24]);
        assert_eq!(
            &v2[32..48],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 192, 0, 2, 1]
        );
        let mapped = addr("[::ffff:192.0.2.1]:1000");
        for version in [Version::V1, Version::V2] {
            let (header, _) = decode(&encode(version, v4, v6), Accept::Any)
                .unwrap()
                .unwrap();
            assert_eq!(header.addresses().map(|a| a.source), Some(mapped));
        }
    }

    #[test]
    fn every_truncation_is_incomplete() {
        for (bytes, expected) in valid_headers() {
            for accept in accepting(expected.version()) {
                for k in 0..bytes.len() {
                    assert_eq!(
                        decode(&bytes[..k], accept),
                        Ok(None),
                        "{accept:?} prefix {k} of {}",
                        shown(&bytes)
                    );
                }
            }
        }
    }

    #[test]
    fn bytes_after_the_header_are_left_to_the_client() {
        for (bytes, expected) in valid_headers() {
            for trailer in [
                &b"GET / HTTP/1.1\r\n\r\n"[..],
                b"\r\n",
                b"\n",
                V2_SIGNATURE,
                b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n",
                &[0xFF; 5000],
            ] {
                let input = [&bytes[..], trailer].concat();
                for accept in accepting(expected.version()) {
                    assert_eq!(
                        decode(&input, accept),
                        Ok(Some((expected, bytes.len()))),
                        "{accept:?} {}",
                        shown(&input)
                    );
                }
            }
        }
    }

    #[test]
    fn decoded_headers_re_encode_to_equal_headers() {
        for (bytes, expected) in valid_headers() {
            let again = expected.encode();
            assert_eq!(
                decode(&again, Accept::Any),
                Ok(Some((expected, again.len()))),
                "{}",
                shown(&bytes)
            );
        }
    }

    /// Errors from ppp carry its own detail; only which of our variants matters here.
    fn same_kind(actual: &DecodeError, expected: &DecodeError) -> bool {
        match (actual, expected) {
            (DecodeError::V1(_), DecodeError::V1(_)) | (DecodeError::V2(_), DecodeError::V2(_)) => {
                true
            }
            _ => actual == expected,
        }
    }

    fn assert_refused(input: &[u8], accepts: &[Accept], expected: &DecodeError) {
        for &accept in accepts {
            match decode(input, accept) {
                Err(actual) if same_kind(&actual, expected) => {}
                other => panic!(
                    "{accept:?} {}: {other:?}, expected {expected:?}",
                    shown(input)
                ),
            }
        }
    }

    #[test]
    fn malformed_v1_lines_are_refused() {
        use DecodeError::*;
        let ppp = || V1(v1::ParseError::InvalidPrefix.into());
        let cases: &[(&[u8], DecodeError)] = &[
            (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", NotProxy),
            (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", NotProxy),
            (b"PROXY\r\n", NotProxy),
            (b"PROXY \r\n", ppp()),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", ppp()),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", ppp()),
            (b"PROXY UNKNOWNX\r\n", ppp()),
            (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\t2\r\n", V1BadByte(b'\t')),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4\r\n", ppp()),
            (b"PROXY TCP4\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", V1BadTerminator),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", V1BadTerminator),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", V1BadTerminator),
            (b"PROXY UNKNOWN\n", V1BadTerminator),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", ppp()),
            // Rust's integer parser takes a leading '+'; the protocol's ports have none.
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", V1BadByte(b'+')),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n", ppp()),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", ppp()),
            (b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n", ppp()),
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", ppp()),
            (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", ppp()),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", ppp()),
            (b"PROXY TCP6 ::1 [::1] 1 2\r\n", ppp()),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", ppp()),
            (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", ppp()),
            (b"PROXY TCP6 ::g ::1 1 2\r\n", ppp()),
            (b"PROXY TCP4 \xc3\xa9.2.3.4 5.6.7.8 1 2\r\n", ppp()),
        ];
        for (input, expected) in cases {
            assert_refused(input, &[Accept::V1, Accept::Any], expected);
        }
    }

    #[test]
    fn v1_errors_are_reported_before_the_line_ends() {
        use DecodeError::*;
        let ppp = || V1(v1::ParseError::InvalidPrefix.into());
        let cases: &[(&[u8], DecodeError)] = &[
            (b"PROXZ", NotProxy),
            (b"PROXY X", ppp()),
            (b"PROXY  ", ppp()),
            (b"PROXY TCP4 1.2.3.4x", V1BadByte(b'x')),
            (b"PROXY TCP6 ::1]", V1BadByte(b']')),
            (b"PROXY TCP6 fe80::1%", V1BadByte(b'%')),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +", V1BadByte(b'+')),
            (b"PROXY TCP4 \xc3", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 01", ppp()),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r", V1BadTerminator),
        ];
        for (input, expected) in cases {
            assert_refused(input, &[Accept::V1], expected);
        }
    }

    #[test]
    fn v1_line_of_107_bytes_is_accepted_and_108_refused() {
        assert_eq!(V1_WORST_UNKNOWN.len(), V1_MAX_LEN);
        let over = [&V1_WORST_UNKNOWN[..V1_MAX_LEN - 2], b"0\r\n"].concat();
        assert_eq!(decode(&over, Accept::V1), Err(DecodeError::V1Oversized));
        // Refused as soon as the 106th byte shows the CRLF cannot fit, not after.
        assert_eq!(
            decode(&over[..106], Accept::V1),
            Err(DecodeError::V1Oversized)
        );
        assert_eq!(decode(&over[..105], Accept::V1), Ok(None));
        let tcp6 = [&V1_WORST_TCP6[..V1_WORST_TCP6.len() - 2], b" 1\r\n"].concat();
        assert!(decode(&tcp6, Accept::V1).is_err());

        let endless = [&b"PROXY UNKNOWN "[..], &[b'x'; 10_000]].concat();
        assert_eq!(decode(&endless, Accept::Any), Err(DecodeError::V1Oversized));
        assert_eq!(
            decode(&[b'P'; 300], Accept::Any),
            Err(DecodeError::NotProxy)
        );
        assert_eq!(
            DecodeError::V1Oversized.to_string(),
            "PROXY v1 header longer than 107 bytes"
        );
    }

    #[test]
    fn malformed_v2_headers_are_refused() {
        use DecodeError::*;
        let ppp = || V2(v2::ParseError::Prefix);
        let mut bad_signature = V2_TCP4;
        bad_signature[7] = b'q';
        let tcp4 = &V2_TCP4[16..];
        let cases: Vec<(Vec<u8>, DecodeError)> = vec![
            (bad_signature.to_vec(), NotProxy),
            (v2_raw(0x11, 0x11, tcp4), V2BadVersion(1)),
            (v2_raw(0x31, 0x11, tcp4), V2BadVersion(3)),
            (v2_raw(0x01, 0x11, tcp4), V2BadVersion(0)),
            (v2_raw(0x22, 0x11, tcp4), V2BadCommand(2)),
            (v2_raw(0x2F, 0x11, tcp4), V2BadCommand(15)),
            (v2_raw(0x21, 0x13, tcp4), V2BadFamily(0x13)),
            // ppp takes these three; the protocol says to refuse them.
            (v2_raw(0x21, 0x10, tcp4), V2BadFamily(0x10)),
            (v2_raw(0x21, 0x01, tcp4), V2BadFamily(0x01)),
            (v2_raw(0x21, 0x20, tcp4), V2BadFamily(0x20)),
            (v2_raw(0x21, 0x41, tcp4), V2BadFamily(0x41)),
            (v2_raw(0x21, 0x11, &tcp4[..11]), ppp()),
            (v2_raw(0x21, 0x21, &[0; 20]), ppp()),
            (v2_raw(0x21, 0x22, &[0; 35]), ppp()),
            (v2_raw(0x21, 0x31, &[0; 100]), ppp()),
            // TLVs cut short: type only, type and half a length, a value past the end.
            (v2_raw(0x21, 0x11, &[tcp4, &[0x04]].concat()), ppp()),
            (v2_raw(0x21, 0x11, &[tcp4, &[0x04, 0x00]].concat()), ppp()),
            (
                v2_raw(0x21, 0x11, &[tcp4, &[0x04, 0x00, 0x02, 0]].concat()),
                ppp(),
            ),
            (
                v2_raw(0x21, 0x21, &[&[0; 36][..], &[1, 0xFF, 0xFF]].concat()),
                ppp(),
            ),
            (
                v2_raw(0x21, 0x11, &[0; MAX_HEADER_LEN - 15]),
                V2Oversized { length: 4097 },
            ),
        ];
        for (input, expected) in &cases {
            assert_refused(input, &[Accept::V2, Accept::Any], expected);
        }
    }

    #[test]
    fn v2_errors_are_reported_from_the_fixed_part_alone() {
        let fixed = |version_command, family, length: u16| {
            [
                V2_SIGNATURE,
                &[version_command, family],
                &length.to_be_bytes(),
            ]
            .concat()
        };
        assert_eq!(
            decode(&fixed(0x31, 0x11, 12)[..13], Accept::V2),
            Err(DecodeError::V2BadVersion(3))
        );
        assert_eq!(
            decode(&fixed(0x21, 0x99, 12)[..14], Accept::V2),
            Err(DecodeError::V2BadFamily(0x99))
        );
        assert_eq!(
            decode(&fixed(0x21, 0x21, 20), Accept::V2),
            Err(DecodeError::V2(v2::ParseError::InvalidAddresses(20, 36)))
        );
        assert_eq!(
            decode(&fixed(0x21, 0x11, u16::MAX), Accept::Any),
            Err(DecodeError::V2Oversized { length: 65551 })
        );
        assert_eq!(
            decode(&fixed(0x20, 0x00, u16::MAX), Accept::Any),
            Err(DecodeError::V2Oversized { length: 65551 })
        );
    }

    #[test]
    fn v2_header_at_the_size_cap_is_accepted() {
        let tlv_len = MAX_HEADER_LEN - V2_FIXED_LEN - 12 - 3;
        let block = [
            &V2_TCP4[16..],
            &[0x04],
            &u16::try_from(tlv_len).unwrap().to_be_bytes(),
            &vec![0; tlv_len],
        ]
        .concat();
        let header = v2_raw(0x21, 0x11, &block);
        assert_eq!(header.len(), MAX_HEADER_LEN);
        let expected = with(Version::V2, "192.168.0.1:56324", "192.168.0.11:443");
        assert_eq!(
            decode(&header, Accept::V2),
            Ok(Some((expected, MAX_HEADER_LEN)))
        );
        assert_eq!(decode(&header[..MAX_HEADER_LEN - 1], Accept::V2), Ok(None));
    }

    #[test]
    fn accept_mismatches_name_the_version_received() {
        let v1_on_v2 = || DecodeError::VersionNotAccepted {
            received: Version::V1,
            accepted: Version::V2,
        };
        let v2_on_v1 = || DecodeError::VersionNotAccepted {
            received: Version::V2,
            accepted: Version::V1,
        };
        assert_eq!(decode(V1_SPEC_EXAMPLE, Accept::V2), Err(v1_on_v2()));
        assert_eq!(decode(&V2_TCP4, Accept::V1), Err(v2_on_v1()));
        // Even one byte of the other signature is enough to refuse.
        assert_eq!(decode(b"P", Accept::V2), Err(v1_on_v2()));
        assert_eq!(decode(b"\r", Accept::V1), Err(v2_on_v1()));
        assert_eq!(
            v2_on_v1().to_string(),
            "PROXY v2 header received, but this listener accepts only v1"
        );
        // A client speaking something else is "no header", not "wrong version".
        assert_eq!(
            decode(b"POST / HTTP/1.1\r\n", Accept::V2),
            Err(DecodeError::NotProxy)
        );
        assert_eq!(decode(b"\r\nHELLO", Accept::V1), Err(DecodeError::NotProxy));
    }

    #[test]
    fn other_protocols_are_not_proxy_headers() {
        let inputs: [&[u8]; 6] = [
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"\0",
            b" PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"\r\n\r\n\0\r\nQUIT\r",
        ];
        for input in inputs {
            for accept in ACCEPTS {
                assert_eq!(
                    decode(input, accept),
                    Err(DecodeError::NotProxy),
                    "{}",
                    shown(input)
                );
            }
        }
        for accept in ACCEPTS {
            assert_eq!(decode(b"", accept), Ok(None));
        }
    }

    /// A tiny deterministic fuzzer (the real one lives in `fuzz/`): every one-byte change of
    /// every valid header, under every accept mode, keeps the decoder's promises.
    #[test]
    fn single_byte_mutations_keep_the_invariants() {
        for (bytes, _) in valid_headers() {
            for i in 0..bytes.len().min(300) {
                for value in [
                    0x00, b' ', b'\r', b'\n', b'0', b'9', b'P', b'f', b':', 0x21, 0xFF,
                ] {
                    let mut input = bytes.clone();
                    input[i] = value;
                    for accept in ACCEPTS {
                        check_invariants(&input, accept);
                    }
                }
            }
        }
    }

    /// Inputs the fuzzer found, kept so they stay fixed.
    #[test]
    fn fuzz_findings_keep_the_invariants() {
        // One more space made a refused line "incomplete" again (an empty destination
        // port was taken for a cut right after a space, whatever came before).
        let findings: [&[u8]; 1] = [b"PROXY TCP6P POYX TCY "];
        for input in findings {
            for accept in ACCEPTS {
                check_invariants(input, accept);
            }
        }
    }

    /// What `fuzz/fuzz_targets/proxy_protocol_decode.rs` also checks.
    fn check_invariants(input: &[u8], accept: Accept) {
        let result = decode(input, accept);
        match &result {
            Ok(Some((header, consumed))) => {
                let consumed = *consumed;
                assert!(consumed > 0 && consumed <= input.len().min(MAX_HEADER_LEN));
                assert_eq!(
                    decode(&input[..consumed], accept),
                    result,
                    "{}",
                    shown(input)
                );
                for k in 0..consumed {
                    assert_eq!(decode(&input[..k], accept), Ok(None), "{}", shown(input));
                }
                let again = header.encode();
                assert_eq!(decode(&again, accept), Ok(Some((*header, again.len()))));
            }
            Ok(None) => assert!(input.len() < MAX_HEADER_LEN, "{}", shown(input)),
            Err(_) => {
                for suffix in [&b"\r\n"[..], b" ", b"\0"] {
                    let longer = [input, suffix].concat();
                    assert!(decode(&longer, accept).is_err(), "{}", shown(input));
                }
            }
        }
    }
}
