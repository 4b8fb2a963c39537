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
//! [`decode`] is incremental in the style of mini-redis's frame check: `Ok(None)` means "a
//! valid beginning, read more", and it must never panic, never allocate, and never look
//! past the size caps, because its input comes from an unauthenticated peer.
//!
//! Reference: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The longest v1 header, CRLF included, that the protocol allows (107 bytes).
pub const V1_MAX_LEN: usize = 107;

/// The twelve bytes that open every v2 header. They were chosen so that no text protocol
/// (HTTP, SMTP, ...) can begin with them, which is what lets [`Accept::Any`] tell v1 and v2
/// apart by the first byte.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

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

/// The longest v1 line without its CRLF.
const V1_MAX_LINE: usize = V1_MAX_LEN - 2;

/// What a v1 line must start with.
const V1_PREFIX: &[u8] = b"PROXY ";

/// Byte 13 of a v2 header for TCP over IPv4 and IPv6 (family nibble, transport nibble).
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

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

/// The v2 command (byte 12, low nibble).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The connection was made by the proxy itself (a health check): use the real peer.
    Local,
    /// The connection is relayed for a client, whose addresses the header may carry.
    Proxy,
}

/// The original client's connection as the sending proxy saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client.
    pub source: SocketAddr,
    /// The address the client connected to on the sending proxy.
    pub destination: SocketAddr,
}

/// A decoded header. `addresses` is `None` whenever the header does not carry a TCP client
/// over IPv4/IPv6 (v1 `UNKNOWN`; v2 `LOCAL`, `AF_UNSPEC`, `AF_UNIX` or UDP): the receiver
/// then uses the real peer address, as the protocol requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// `PROXY TCP4 …`/`PROXY TCP6 …` (the protocol word follows from the address family,
    /// which [`decode`] checks against it) or `PROXY UNKNOWN` (`addresses: None`).
    V1 { addresses: Option<Addresses> },
    /// A binary header. TLVs are checked for framing and skipped; they are not kept.
    /// [`Header::encode`] sends a `Local` header without addresses whatever `addresses` says.
    V2 {
        command: Command,
        addresses: Option<Addresses>,
    },
}

/// Why a header was refused. The peer is closed and counted under [`DecodeError::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
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
    #[error("PROXY v1 header longer than 107 bytes")]
    V1Oversized,
    #[error("PROXY v1 header line must end with \"\\r\\n\"")]
    V1BadTerminator,
    #[error("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN (uppercase)")]
    V1BadProtocol,
    #[error("PROXY v1 header fields must be separated by exactly one space")]
    V1BadSpacing,
    #[error(
        "PROXY v1 header ends early: after PROXY it needs TCP4, TCP6 or UNKNOWN, and for TCP4/TCP6 two addresses and two ports"
    )]
    V1MissingFields,
    #[error("PROXY v1 header has extra fields after the destination port")]
    V1ExtraFields,
    #[error("PROXY v1 {endpoint} address is not a valid {family} address")]
    V1BadAddress {
        endpoint: &'static str,
        family: &'static str,
    },
    #[error("PROXY v1 {endpoint} port must be a decimal number 0-65535 without leading zeros")]
    V1BadPort { endpoint: &'static str },
    #[error("PROXY v2 header has version {0}, expected 2")]
    V2BadVersion(u8),
    #[error("PROXY v2 command must be LOCAL (0) or PROXY (1), got {0}")]
    V2BadCommand(u8),
    #[error("PROXY v2 address family/transport byte 0x{0:02x} is not one the protocol defines")]
    V2BadFamily(u8),
    #[error("PROXY v2 header of {length} bytes exceeds the {MAX_HEADER_LEN}-byte limit")]
    V2Oversized { length: usize },
    #[error(
        "PROXY v2 address block too short for {family}: {length} bytes, needs at least {needed}"
    )]
    V2AddressBlockTooShort {
        family: &'static str,
        length: usize,
        needed: usize,
    },
    #[error("PROXY v2 TLV overruns the end of the header")]
    V2BadTlv,
}

/// The v1 protocol word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V1Protocol {
    Tcp4,
    Tcp6,
    Unknown,
}

/// Two addresses brought into one family, as both header versions need.
enum IpPair {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

/// The fields of a v1 line, by position after splitting on single spaces.
const V1_WORD: usize = 0;
const V1_PROTOCOL: usize = 1;
const V1_SOURCE: usize = 2;
const V1_DESTINATION: usize = 3;
const V1_SOURCE_PORT: usize = 4;
const V1_DESTINATION_PORT: usize = 5;

/// Names for error messages, indexed by field position minus `V1_SOURCE`/`V1_SOURCE_PORT`.
const ENDPOINTS: [&str; 2] = ["source", "destination"];

/// Sends `source` and `destination` in a v1 header.
///
/// v1 has no way to mix families, so when exactly one address is IPv4 it is sent as its
/// IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) and the line says `TCP6`: the client's address
/// survives, which `UNKNOWN` would throw away.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (sp, dp) = (source.port(), destination.port());
    match IpPair::new(source.ip(), destination.ip()) {
        IpPair::V4(s, d) => format!("PROXY TCP4 {s} {d} {sp} {dp}\r\n"),
        IpPair::V6(s, d) => format!("PROXY TCP6 {s} {d} {sp} {dp}\r\n"),
    }
    .into_bytes()
}

/// A v1 header without addresses, `PROXY UNKNOWN\r\n`; health checks send it.
pub fn encode_v1_unknown() -> Vec<u8> {
    b"PROXY UNKNOWN\r\n".to_vec()
}

/// Sends `source` and `destination` in a v2 `PROXY` header over TCP, without TLVs. Mixed
/// families are sent as IPv6, the IPv4 one mapped, as in [`encode_v1`].
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (sp, dp) = (
        source.port().to_be_bytes(),
        destination.port().to_be_bytes(),
    );
    let (family, block): (u8, [&[u8]; 4]) = match IpPair::new(source.ip(), destination.ip()) {
        IpPair::V4(s, d) => (V2_TCP4, [&s.octets(), &d.octets(), &sp, &dp]),
        IpPair::V6(s, d) => (V2_TCP6, [&s.octets(), &d.octets(), &sp, &dp]),
    };
    v2_header(Command::Proxy, family, &block)
}

/// A v2 `LOCAL` header with no address block; health checks send it.
pub fn encode_v2_local() -> Vec<u8> {
    v2_header(Command::Local, 0x00, &[])
}

/// Sends `source` and `destination` in a header of the given version.
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    match version {
        Version::V1 => encode_v1(source, destination),
        Version::V2 => encode_v2(source, destination),
    }
}

/// A header that carries no client, for connections the proxy makes itself (health checks,
/// SPEC §8): v1 `UNKNOWN`, v2 `LOCAL`.
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => encode_v1_unknown(),
        Version::V2 => encode_v2_local(),
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
    if received != accepted {
        // Name the other version only while the bytes really look like it, so that a
        // plain-text client on a v2 listener reads as "no header", not "wrong header".
        let signature = match received {
            Version::V1 => V1_PREFIX,
            Version::V2 => &V2_SIGNATURE[..],
        };
        let n = buf.len().min(signature.len());
        return Err(if buf[..n] == signature[..n] {
            DecodeError::VersionNotAccepted { received, accepted }
        } else {
            DecodeError::NotProxy
        });
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
    if line.len() > V1_MAX_LINE {
        // A bad field says more to the operator than "too long", so check those first.
        parse_v1_line(line, false)?;
        return Err(DecodeError::V1Oversized);
    }
    let Some(end) = end else {
        parse_v1_line(line, false)?;
        return Ok(None);
    };
    if window[end] == b'\n' {
        return Err(DecodeError::V1BadTerminator);
    }
    // The line is known to be whole: judge it before waiting for the LF.
    let header = parse_v1_line(line, true)?;
    match buf.get(end + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(header.map(|header| (header, end + 2))),
        Some(_) => Err(DecodeError::V1BadTerminator),
    }
}

/// Checks a v1 line (CRLF excluded) and returns its header when `complete`. Otherwise the
/// line may stop anywhere: every field but the last is checked in full and the last only as
/// the start of a valid field, and the result is `Ok(None)`.
fn parse_v1_line(line: &[u8], complete: bool) -> Result<Option<Header>, DecodeError> {
    let mut protocol = V1Protocol::Unknown;
    let mut ips = [None; 2];
    let mut ports = [None; 2];
    let mut fields = line.split(|&b| b == b' ').enumerate().peekable();
    while let Some((index, field)) = fields.next() {
        if !complete && fields.peek().is_none() {
            check_v1_partial_field(index, field, protocol)?;
            return Ok(None);
        }
        // The first field starts with the 'P' that chose v1, so only later ones can be empty.
        if field.is_empty() {
            return Err(DecodeError::V1BadSpacing);
        }
        match index {
            V1_WORD if field != b"PROXY" => return Err(DecodeError::NotProxy),
            V1_WORD => {}
            V1_PROTOCOL => {
                protocol = match field {
                    b"TCP4" => V1Protocol::Tcp4,
                    b"TCP6" => V1Protocol::Tcp6,
                    // The protocol says to ignore whatever follows UNKNOWN on the line.
                    b"UNKNOWN" => {
                        return Ok(complete.then_some(Header::V1 { addresses: None }));
                    }
                    _ => return Err(DecodeError::V1BadProtocol),
                }
            }
            V1_SOURCE | V1_DESTINATION => {
                let i = index - V1_SOURCE;
                ips[i] = Some(parse_v1_ip(field, protocol, ENDPOINTS[i])?);
            }
            V1_SOURCE_PORT | V1_DESTINATION_PORT => {
                let i = index - V1_SOURCE_PORT;
                ports[i] = Some(parse_v1_port(field, false, ENDPOINTS[i])?);
            }
            _ => return Err(DecodeError::V1ExtraFields),
        }
    }
    match (ips, ports) {
        ([Some(source), Some(destination)], [Some(source_port), Some(destination_port)]) => {
            Ok(Some(Header::V1 {
                addresses: Some(Addresses {
                    source: SocketAddr::new(source, source_port),
                    destination: SocketAddr::new(destination, destination_port),
                }),
            }))
        }
        _ => Err(DecodeError::V1MissingFields),
    }
}

/// Whether `field`, cut short, can still become a valid field at `index`. Every full field
/// must also pass these checks, so a line refused early is never one that would have been
/// accepted whole.
fn check_v1_partial_field(
    index: usize,
    field: &[u8],
    protocol: V1Protocol,
) -> Result<(), DecodeError> {
    match index {
        V1_WORD => check(b"PROXY".starts_with(field), DecodeError::NotProxy),
        V1_PROTOCOL => check(
            [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
                .iter()
                .any(|word| word.starts_with(field)),
            DecodeError::V1BadProtocol,
        ),
        V1_SOURCE | V1_DESTINATION => {
            // The longest forms: "255.255.255.255" and "ffff:…:ffff:255.255.255.255".
            let (max_len, allowed): (usize, fn(&u8) -> bool) = match protocol {
                V1Protocol::Tcp6 => (45, |b| b.is_ascii_hexdigit() || b":.".contains(b)),
                V1Protocol::Tcp4 | V1Protocol::Unknown => {
                    (15, |b| b.is_ascii_digit() || *b == b'.')
                }
            };
            check(
                field.len() <= max_len && field.iter().all(allowed),
                DecodeError::V1BadAddress {
                    endpoint: ENDPOINTS[index - V1_SOURCE],
                    family: protocol.family(),
                },
            )
        }
        V1_SOURCE_PORT | V1_DESTINATION_PORT => {
            parse_v1_port(field, true, ENDPOINTS[index - V1_SOURCE_PORT]).map(drop)
        }
        _ => Err(DecodeError::V1ExtraFields),
    }
}

fn check(ok: bool, error: DecodeError) -> Result<(), DecodeError> {
    if ok { Ok(()) } else { Err(error) }
}

fn parse_v1_ip(
    field: &[u8],
    protocol: V1Protocol,
    endpoint: &'static str,
) -> Result<IpAddr, DecodeError> {
    let text = std::str::from_utf8(field).ok();
    // The std parsers are as strict as the protocol: dotted quads without leading zeros,
    // no zone ids, no brackets.
    match protocol {
        V1Protocol::Tcp6 => text
            .and_then(|t| t.parse::<Ipv6Addr>().ok())
            .map(IpAddr::V6),
        V1Protocol::Tcp4 | V1Protocol::Unknown => text
            .and_then(|t| t.parse::<Ipv4Addr>().ok())
            .map(IpAddr::V4),
    }
    .ok_or(DecodeError::V1BadAddress {
        endpoint,
        family: protocol.family(),
    })
}

/// Parses a decimal port, 0-65535 with no leading zeros. With `partial`, the digits may be
/// the start of a longer port (so none at all is fine); the value is still checked, since
/// more digits only make it larger.
fn parse_v1_port(field: &[u8], partial: bool, endpoint: &'static str) -> Result<u16, DecodeError> {
    let error = DecodeError::V1BadPort { endpoint };
    let leading_zero = field.len() > 1 && field.first() == Some(&b'0');
    if (field.is_empty() && !partial) || field.len() > 5 || leading_zero {
        return Err(error);
    }
    let mut value: u32 = 0;
    for &b in field {
        if !b.is_ascii_digit() {
            return Err(error);
        }
        value = value * 10 + u32::from(b - b'0');
    }
    u16::try_from(value).map_err(|_| error)
}

fn decode_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, DecodeError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(DecodeError::NotProxy);
    }
    let Some(&version_command) = buf.get(12) else {
        return Ok(None);
    };
    let version = version_command >> 4;
    if version != 2 {
        return Err(DecodeError::V2BadVersion(version));
    }
    let command = match version_command & 0x0F {
        0 => Command::Local,
        1 => Command::Proxy,
        other => return Err(DecodeError::V2BadCommand(other)),
    };
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    // LOCAL discards the whole block, family included, as the protocol requires.
    let (family_name, needed) = match command {
        Command::Local => ("LOCAL", 0),
        Command::Proxy => v2_family(family)?,
    };
    let (Some(&high), Some(&low)) = (buf.get(14), buf.get(15)) else {
        return Ok(None);
    };
    let block_len = usize::from(u16::from_be_bytes([high, low]));
    let length = V2_FIXED_LEN + block_len;
    if length > MAX_HEADER_LEN {
        return Err(DecodeError::V2Oversized { length });
    }
    let too_short = || DecodeError::V2AddressBlockTooShort {
        family: family_name,
        length: block_len,
        needed,
    };
    // Refused as soon as the length is known, without waiting for the block itself.
    if block_len < needed {
        return Err(too_short());
    }
    let Some(block) = buf.get(V2_FIXED_LEN..length) else {
        return Ok(None);
    };
    let addresses = match command {
        // LOCAL and AF_UNSPEC blocks have no layout to check.
        Command::Local => None,
        Command::Proxy if family == 0x00 => None,
        Command::Proxy => {
            let Some((addresses, tlvs)) = block.split_at_checked(needed) else {
                return Err(too_short());
            };
            check_v2_tlvs(tlvs)?;
            v2_addresses(family, addresses)
        }
    };
    Ok(Some((Header::V2 { command, addresses }, length)))
}

/// The family's name and the address block size it needs, for the seven family/transport
/// bytes the protocol defines; it says every other value must be refused.
fn v2_family(family: u8) -> Result<(&'static str, usize), DecodeError> {
    match family {
        0x00 => Ok(("AF_UNSPEC", 0)),
        0x11 | 0x12 => Ok(("AF_INET", 12)),
        0x21 | 0x22 => Ok(("AF_INET6", 36)),
        0x31 | 0x32 => Ok(("AF_UNIX", 216)),
        other => Err(DecodeError::V2BadFamily(other)),
    }
}

/// The client's addresses from an address block of the size `family` needs. Only TCP over
/// IPv4/IPv6 yields addresses; UDP and AF_UNIX blocks are skipped.
fn v2_addresses(family: u8, mut block: &[u8]) -> Option<Addresses> {
    match family {
        V2_TCP4 => {
            let (s, d) = (take::<4>(&mut block)?, take::<4>(&mut block)?);
            let (sp, dp) = (take::<2>(&mut block)?, take::<2>(&mut block)?);
            Some(Addresses {
                source: SocketAddrV4::new(s.into(), u16::from_be_bytes(sp)).into(),
                destination: SocketAddrV4::new(d.into(), u16::from_be_bytes(dp)).into(),
            })
        }
        V2_TCP6 => {
            let (s, d) = (take::<16>(&mut block)?, take::<16>(&mut block)?);
            let (sp, dp) = (take::<2>(&mut block)?, take::<2>(&mut block)?);
            Some(Addresses {
                source: SocketAddrV6::new(s.into(), u16::from_be_bytes(sp), 0, 0).into(),
                destination: SocketAddrV6::new(d.into(), u16::from_be_bytes(dp), 0, 0).into(),
            })
        }
        _ => None,
    }
}

/// TLVs are type (1 byte), length (2 bytes, big-endian), value. Their contents are not
/// used, but one that runs past the header means the sender's framing is broken.
fn check_v2_tlvs(mut tlvs: &[u8]) -> Result<(), DecodeError> {
    while !tlvs.is_empty() {
        let Some([_type, high, low]) = take::<3>(&mut tlvs) else {
            return Err(DecodeError::V2BadTlv);
        };
        let value_len = usize::from(u16::from_be_bytes([high, low]));
        let Some((_value, rest)) = tlvs.split_at_checked(value_len) else {
            return Err(DecodeError::V2BadTlv);
        };
        tlvs = rest;
    }
    Ok(())
}

/// Takes the first `N` bytes off `bytes`, if there are that many.
fn take<const N: usize>(bytes: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = bytes.split_first_chunk::<N>()?;
    *bytes = rest;
    Some(*head)
}

/// Builds a v2 header from its command, family byte and address block parts.
fn v2_header(command: Command, family: u8, block: &[&[u8]]) -> Vec<u8> {
    let length: usize = block.iter().map(|part| part.len()).sum();
    let mut out = Vec::with_capacity(V2_FIXED_LEN + length);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(match command {
        Command::Local => 0x20,
        Command::Proxy => 0x21,
    });
    out.push(family);
    // Callers pass at most 36 bytes, so the length always fits the 16-bit field.
    out.extend_from_slice(&u16::try_from(length).unwrap_or(u16::MAX).to_be_bytes());
    for part in block {
        out.extend_from_slice(part);
    }
    out
}

// === impl Header ===

impl Header {
    pub fn version(&self) -> Version {
        match self {
            Header::V1 { .. } => Version::V1,
            Header::V2 { .. } => Version::V2,
        }
    }

    /// `Proxy` for every v1 header (`UNKNOWN` included: only [`Header::addresses`] tells).
    pub fn command(&self) -> Command {
        match *self {
            Header::V1 { .. } => Command::Proxy,
            Header::V2 { command, .. } => command,
        }
    }

    /// The client's addresses, or `None` when the real peer address must be used.
    pub fn addresses(&self) -> Option<Addresses> {
        match *self {
            Header::V1 { addresses } => addresses,
            Header::V2 {
                command: Command::Proxy,
                addresses,
            } => addresses,
            Header::V2 {
                command: Command::Local,
                ..
            } => None,
        }
    }

    /// The original client, when the header names one.
    pub fn source(&self) -> Option<SocketAddr> {
        self.addresses().map(|a| a.source)
    }

    /// The header's bytes. A header from [`decode`] encodes to bytes that decode to an
    /// equal header; v2 TLVs, and the addresses of UDP and AF_UNIX headers, are not kept,
    /// so such a `PROXY` header is re-sent as `AF_UNSPEC`.
    pub fn encode(&self) -> Vec<u8> {
        match (self.version(), self.command(), self.addresses()) {
            (Version::V1, _, Some(a)) => encode_v1(a.source, a.destination),
            (Version::V1, _, None) => encode_v1_unknown(),
            (Version::V2, _, Some(a)) => encode_v2(a.source, a.destination),
            (Version::V2, Command::Local, None) => encode_v2_local(),
            (Version::V2, Command::Proxy, None) => v2_header(Command::Proxy, 0x00, &[]),
        }
    }
}

// === impl V1Protocol ===

impl V1Protocol {
    /// The family named in address errors. Addresses are only parsed after TCP4 or TCP6,
    /// so `Unknown` never reaches a message.
    fn family(self) -> &'static str {
        match self {
            V1Protocol::Tcp6 => "IPv6",
            V1Protocol::Tcp4 | V1Protocol::Unknown => "IPv4",
        }
    }
}

// === impl IpPair ===

impl IpPair {
    /// Maps the IPv4 address into IPv6 when the families differ, since neither header
    /// version can carry one of each.
    fn new(source: IpAddr, destination: IpAddr) -> Self {
        let v6 = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        match (source, destination) {
            (IpAddr::V4(s), IpAddr::V4(d)) => IpPair::V4(s, d),
            (s, d) => IpPair::V6(v6(s), v6(d)),
        }
    }
}

// === impl DecodeError ===

impl DecodeError {
    /// Every value [`DecodeError::reason`] returns, for pre-registering metric series.
    pub const REASONS: [&'static str; 3] = [
        "proxy_protocol_missing",
        "proxy_protocol_malformed",
        "proxy_protocol_oversized",
    ];

    /// The `reason` label of `switchyard_connections_rejected_total`: `missing` when the
    /// peer sent no PROXY header at all (usually a client that bypassed the load balancer,
    /// or a load balancer not set up to send one), `oversized` past the size caps, and
    /// `malformed` otherwise, a header of a version the listener does not accept included.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::NotProxy => Self::REASONS[0],
            DecodeError::V1Oversized | DecodeError::V2Oversized { .. } => Self::REASONS[2],
            _ => Self::REASONS[1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCEPTS: [Accept; 3] = [Accept::V1, Accept::V2, Accept::Any];

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn v1_tcp(source: &str, destination: &str) -> Header {
        Header::V1 {
            addresses: Some(Addresses {
                source: addr(source),
                destination: addr(destination),
            }),
        }
    }

    fn v2_proxy(source: &str, destination: &str) -> Header {
        Header::V2 {
            command: Command::Proxy,
            addresses: Some(Addresses {
                source: addr(source),
                destination: addr(destination),
            }),
        }
    }

    /// The accept modes under which a header of `version` must decode.
    fn accepting(version: Version) -> [Accept; 2] {
        match version {
            Version::V1 => [Accept::V1, Accept::Any],
            Version::V2 => [Accept::V2, Accept::Any],
        }
    }

    /// A v2 header by hand: fixed part with the given bytes 12-13, then `block`.
    fn v2_raw(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    /// Hand-built TCP4 header for 192.168.0.1:56324 -> 192.168.0.11:443.
    const V2_TCP4_EXAMPLE: [u8; 28] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, // version 2, PROXY
        0x11, // AF_INET, STREAM
        0x00, 0x0C, // 12 bytes of addresses
        192, 168, 0, 1, // source
        192, 168, 0, 11, // destination
        0xDC, 0x04, // 56324
        0x01, 0xBB, // 443
    ];

    /// Every valid header used by the generic tests, with what it decodes to.
    fn valid_headers() -> Vec<(Vec<u8>, Header)> {
        let tcp4 = v2_proxy("192.168.0.1:56324", "192.168.0.11:443");
        let with_tlvs = {
            let mut block = vec![10, 0, 0, 1, 10, 0, 0, 2, 0x30, 0x39, 0x01, 0xBB];
            block.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]); // PP2_TYPE_NOOP, 3 bytes
            block.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // PP2_TYPE_ALPN
            block.extend_from_slice(&[0xEE, 0x00, 0x00]); // custom type, empty value
            v2_raw(0x21, 0x11, &block)
        };
        let unknown_max = {
            let ffff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
            format!("PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n").into_bytes()
        };
        vec![
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec(),
                v1_tcp("192.168.0.1:56324", "192.168.0.11:443"),
            ),
            (
                b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n".to_vec(),
                v1_tcp("[2001:db8::1]:65535", "[::1]:0"),
            ),
            (
                b"PROXY TCP6 ::ffff:10.0.0.1 fe80::1 1 2\r\n".to_vec(),
                v1_tcp("[::ffff:10.0.0.1]:1", "[fe80::1]:2"),
            ),
            (
                b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n".to_vec(),
                v1_tcp("0.0.0.0:0", "255.255.255.255:65535"),
            ),
            (
                b"PROXY UNKNOWN\r\n".to_vec(),
                Header::V1 { addresses: None },
            ),
            (unknown_max, Header::V1 { addresses: None }),
            (
                b"PROXY UNKNOWN anything  at\tall\r\n".to_vec(),
                Header::V1 { addresses: None },
            ),
            (V2_TCP4_EXAMPLE.to_vec(), tcp4),
            (
                encode_v2(addr("[2001:db8::1]:1234"), addr("[2001:db8::2]:80")),
                v2_proxy("[2001:db8::1]:1234", "[2001:db8::2]:80"),
            ),
            (with_tlvs, v2_proxy("10.0.0.1:12345", "10.0.0.2:443")),
            (
                encode_v2_local(),
                Header::V2 {
                    command: Command::Local,
                    addresses: None,
                },
            ),
            (
                // UDP over IPv4: addresses are skipped.
                v2_raw(0x21, 0x12, &[0; 12]),
                Header::V2 {
                    command: Command::Proxy,
                    addresses: None,
                },
            ),
            (
                // AF_UNIX stream, 216 bytes of paths, then a TLV.
                v2_raw(
                    0x21,
                    0x31,
                    &[&[0u8; 216][..], &[0x04, 0x00, 0x01, 0]].concat(),
                ),
                Header::V2 {
                    command: Command::Proxy,
                    addresses: None,
                },
            ),
            (
                v2_raw(0x21, 0x00, &[1, 2, 3]),
                Header::V2 {
                    command: Command::Proxy,
                    addresses: None,
                },
            ),
            (
                // LOCAL ignores the family byte and the block, whatever they hold.
                v2_raw(0x20, 0xFF, &[0xAB; 7]),
                Header::V2 {
                    command: Command::Local,
                    addresses: None,
                },
            ),
        ]
    }

    #[test]
    fn spec_v1_example_decodes() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        let (header, consumed) = decode(line, Accept::V1).unwrap().unwrap();
        assert_eq!(consumed, line.len());
        assert_eq!(header.version(), Version::V1);
        assert_eq!(header.command(), Command::Proxy);
        assert_eq!(header.source(), Some(addr("192.168.0.1:56324")));
        assert_eq!(
            header.addresses().map(|a| a.destination),
            Some(addr("192.168.0.11:443"))
        );
    }

    #[test]
    fn hand_built_v2_tcp4_decodes_and_matches_encoder() {
        let (header, consumed) = decode(&V2_TCP4_EXAMPLE, Accept::V2).unwrap().unwrap();
        assert_eq!(consumed, 28);
        assert_eq!(header, v2_proxy("192.168.0.1:56324", "192.168.0.11:443"));
        assert_eq!(
            encode_v2(addr("192.168.0.1:56324"), addr("192.168.0.11:443")),
            V2_TCP4_EXAMPLE
        );
    }

    #[test]
    fn valid_headers_decode_in_every_accepting_mode() {
        for (bytes, expected) in valid_headers() {
            for accept in accepting(expected.version()) {
                assert_eq!(
                    decode(&bytes, accept),
                    Ok(Some((expected, bytes.len()))),
                    "{accept:?} {:?}",
                    bytes.escape_ascii().to_string()
                );
            }
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
                        "{accept:?} prefix {k} of {:?}",
                        bytes.escape_ascii().to_string()
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
                &V2_SIGNATURE,
                b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n",
                &[0xFF; 5000],
            ] {
                let input = [&bytes[..], trailer].concat();
                for accept in accepting(expected.version()) {
                    assert_eq!(
                        decode(&input, accept),
                        Ok(Some((expected, bytes.len()))),
                        "{accept:?} {:?}",
                        input.escape_ascii().to_string()
                    );
                }
            }
        }
    }

    #[test]
    fn encode_round_trips_in_both_versions() {
        let pairs = [
            ("192.0.2.1:40000", "198.51.100.7:443"),
            ("[2001:db8::dead:beef]:1", "[2001:db8::1]:65535"),
            ("[::]:0", "[::ffff:192.0.2.1]:8080"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
        ];
        for (source, destination) in pairs {
            let (source, destination) = (addr(source), addr(destination));
            for version in [Version::V1, Version::V2] {
                let bytes = encode(version, source, destination);
                let (header, consumed) = decode(&bytes, Accept::Any).unwrap().unwrap();
                assert_eq!(consumed, bytes.len());
                assert_eq!(header.version(), version);
                assert_eq!(header.source(), Some(source));
                assert_eq!(header.addresses().map(|a| a.destination), Some(destination));
                assert_eq!(header.encode(), bytes);
            }
        }
    }

    #[test]
    fn v1_encoding_is_the_documented_text() {
        assert_eq!(
            encode_v1(addr("192.168.0.1:56324"), addr("192.168.0.11:443")),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        assert_eq!(
            encode_v1(addr("[2001:db8::1]:1"), addr("[::1]:2")),
            b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"
        );
        assert_eq!(encode_v1_unknown(), b"PROXY UNKNOWN\r\n");
        assert_eq!(encode_local(Version::V1), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn mixed_families_are_sent_as_mapped_ipv6() {
        let (v4, v6) = (addr("192.0.2.1:1000"), addr("[2001:db8::1]:443"));
        let mapped = addr("[::ffff:192.0.2.1]:1000");
        assert_eq!(
            encode_v1(v4, v6),
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1000 443\r\n"
        );
        for version in [Version::V1, Version::V2] {
            let bytes = encode(version, v4, v6);
            let (header, _) = decode(&bytes, Accept::Any).unwrap().unwrap();
            assert_eq!(header.source(), Some(mapped));
            let bytes = encode(version, v6, v4);
            let (header, _) = decode(&bytes, Accept::Any).unwrap().unwrap();
            assert_eq!(header.addresses().map(|a| a.destination), Some(mapped));
        }
    }

    #[test]
    fn local_headers_round_trip_without_addresses() {
        assert_eq!(
            encode_v2_local(),
            [&V2_SIGNATURE[..], &[0x20, 0x00, 0x00, 0x00]].concat()
        );
        assert_eq!(encode_local(Version::V2), encode_v2_local());
        for version in [Version::V1, Version::V2] {
            let bytes = encode_local(version);
            let (header, consumed) = decode(&bytes, Accept::Any).unwrap().unwrap();
            assert_eq!(consumed, bytes.len());
            assert_eq!(header.addresses(), None);
            assert_eq!(header.source(), None);
            assert_eq!(header.encode(), bytes);
        }
    }

    #[test]
    fn headers_without_client_addresses_re_encode_to_equal_headers() {
        for (bytes, expected) in valid_headers() {
            let (header, _) = decode(&bytes, Accept::Any).unwrap().unwrap();
            assert_eq!(header, expected);
            let again = header.encode();
            assert_eq!(decode(&again, Accept::Any), Ok(Some((header, again.len()))));
        }
    }

    #[test]
    fn a_local_header_never_reports_addresses() {
        let header = Header::V2 {
            command: Command::Local,
            addresses: Some(Addresses {
                source: addr("10.0.0.1:1"),
                destination: addr("10.0.0.2:2"),
            }),
        };
        assert_eq!(header.addresses(), None);
        assert_eq!(header.encode(), encode_v2_local());
    }

    #[test]
    fn malformed_v1_lines_are_refused() {
        use DecodeError::*;
        let port = |endpoint| V1BadPort { endpoint };
        let ip = |endpoint, family| V1BadAddress { endpoint, family };
        let cases: &[(&[u8], DecodeError)] = &[
            (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", NotProxy),
            (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", NotProxy),
            (b"PROXY\r\n", V1MissingFields),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", V1BadProtocol),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", V1BadProtocol),
            (b"PROXY UNKNOWNX\r\n", V1BadProtocol),
            (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", V1BadSpacing),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", V1BadSpacing),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", V1BadSpacing),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\t2\r\n", port("source")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", V1ExtraFields),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", V1MissingFields),
            (b"PROXY TCP4 1.2.3.4\r\n", V1MissingFields),
            (b"PROXY TCP4\r\n", V1MissingFields),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", V1BadTerminator),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", V1BadTerminator),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", V1BadTerminator),
            (b"PROXY UNKNOWN\n", V1BadTerminator),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", port("source")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", port("destination")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", port("source")),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
                port("destination"),
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", port("source")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", port("source")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n", port("source")),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", ip("source", "IPv4")),
            (
                b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n",
                ip("source", "IPv4"),
            ),
            (
                b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n",
                ip("source", "IPv4"),
            ),
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", ip("source", "IPv4")),
            (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", ip("destination", "IPv4")),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", ip("source", "IPv6")),
            (b"PROXY TCP6 ::1 [::1] 1 2\r\n", ip("destination", "IPv6")),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", ip("source", "IPv6")),
            (
                b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n",
                ip("source", "IPv6"),
            ),
            (b"PROXY TCP6 ::g ::1 1 2\r\n", ip("source", "IPv6")),
            (
                b"PROXY TCP4 \xc3\xa9.2.3.4 5.6.7.8 1 2\r\n",
                ip("source", "IPv4"),
            ),
        ];
        for &(input, expected) in cases {
            for accept in [Accept::V1, Accept::Any] {
                assert_eq!(
                    decode(input, accept),
                    Err(expected),
                    "{:?}",
                    input.escape_ascii().to_string()
                );
            }
        }
    }

    #[test]
    fn v1_errors_are_reported_before_the_line_ends() {
        use DecodeError::*;
        let cases: &[(&[u8], DecodeError)] = &[
            (b"PROXZ", NotProxy),
            (b"PROXY X", V1BadProtocol),
            (b"PROXY TCP4  ", V1BadSpacing),
            (
                b"PROXY TCP4 1.2.3.4x",
                V1BadAddress {
                    endpoint: "source",
                    family: "IPv4",
                },
            ),
            (
                b"PROXY TCP4 1111111111111111",
                V1BadAddress {
                    endpoint: "source",
                    family: "IPv4",
                },
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536",
                V1BadPort { endpoint: "source" },
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", V1ExtraFields),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 01",
                V1BadPort { endpoint: "source" },
            ),
        ];
        for &(input, expected) in cases {
            assert_eq!(
                decode(input, Accept::V1),
                Err(expected),
                "{:?}",
                input.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn v1_line_of_107_bytes_is_accepted_and_108_refused() {
        let ffff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let max = format!("PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n");
        assert_eq!(max.len(), V1_MAX_LEN);
        assert!(matches!(
            decode(max.as_bytes(), Accept::V1),
            Ok(Some((_, 107)))
        ));

        let over = format!("PROXY UNKNOWN {ffff} {ffff} 65535 655350\r\n");
        assert_eq!(
            decode(over.as_bytes(), Accept::V1),
            Err(DecodeError::V1Oversized)
        );
        // Refused as soon as the 106th byte shows the CRLF cannot fit, not after.
        assert_eq!(
            decode(&over.as_bytes()[..106], Accept::V1),
            Err(DecodeError::V1Oversized)
        );
        assert_eq!(decode(&over.as_bytes()[..105], Accept::V1), Ok(None));

        let endless = [&b"PROXY UNKNOWN "[..], &[b'x'; 10_000]].concat();
        assert_eq!(decode(&endless, Accept::Any), Err(DecodeError::V1Oversized));
        assert_eq!(
            DecodeError::V1Oversized.to_string(),
            "PROXY v1 header longer than 107 bytes"
        );
    }

    #[test]
    fn malformed_v2_headers_are_refused() {
        use DecodeError::*;
        let mut bad_signature = V2_TCP4_EXAMPLE;
        bad_signature[7] = b'q';
        let tcp4_block = &V2_TCP4_EXAMPLE[16..];
        let too_short = |family, length, needed| V2AddressBlockTooShort {
            family,
            length,
            needed,
        };
        let cases: Vec<(Vec<u8>, DecodeError)> = vec![
            (bad_signature.to_vec(), NotProxy),
            (v2_raw(0x11, 0x11, tcp4_block), V2BadVersion(1)),
            (v2_raw(0x31, 0x11, tcp4_block), V2BadVersion(3)),
            (v2_raw(0x01, 0x11, tcp4_block), V2BadVersion(0)),
            (v2_raw(0x22, 0x11, tcp4_block), V2BadCommand(2)),
            (v2_raw(0x2F, 0x11, tcp4_block), V2BadCommand(15)),
            (v2_raw(0x21, 0x13, tcp4_block), V2BadFamily(0x13)),
            (v2_raw(0x21, 0x10, tcp4_block), V2BadFamily(0x10)),
            (v2_raw(0x21, 0x01, tcp4_block), V2BadFamily(0x01)),
            (v2_raw(0x21, 0x41, tcp4_block), V2BadFamily(0x41)),
            (
                v2_raw(0x21, 0x11, &tcp4_block[..11]),
                too_short("AF_INET", 11, 12),
            ),
            (v2_raw(0x21, 0x21, &[0; 20]), too_short("AF_INET6", 20, 36)),
            (v2_raw(0x21, 0x22, &[0; 35]), too_short("AF_INET6", 35, 36)),
            (
                v2_raw(0x21, 0x31, &[0; 100]),
                too_short("AF_UNIX", 100, 216),
            ),
            (
                v2_raw(0x21, 0x11, &[tcp4_block, &[0x04]].concat()),
                V2BadTlv,
            ),
            (
                v2_raw(0x21, 0x11, &[tcp4_block, &[0x04, 0x00]].concat()),
                V2BadTlv,
            ),
            (
                v2_raw(0x21, 0x11, &[tcp4_block, &[0x04, 0x00, 0x02, 0]].concat()),
                V2BadTlv,
            ),
            (
                v2_raw(0x21, 0x21, &[&[0; 36][..], &[1, 0xFF, 0xFF]].concat()),
                V2BadTlv,
            ),
            (
                v2_raw(0x21, 0x11, &[0; MAX_HEADER_LEN - 15]),
                V2Oversized { length: 4097 },
            ),
        ];
        for (input, expected) in cases {
            for accept in [Accept::V2, Accept::Any] {
                assert_eq!(
                    decode(&input, accept),
                    Err(expected),
                    "{:?}",
                    input.escape_ascii().to_string()
                );
            }
        }
    }

    #[test]
    fn v2_errors_are_reported_from_the_fixed_part_alone() {
        let fixed = |version_command, family, length: u16| {
            [
                &V2_SIGNATURE[..],
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
            Err(DecodeError::V2AddressBlockTooShort {
                family: "AF_INET6",
                length: 20,
                needed: 36
            })
        );
        assert_eq!(
            decode(&fixed(0x21, 0x11, u16::MAX), Accept::Any),
            Err(DecodeError::V2Oversized { length: 65551 })
        );
        assert_eq!(
            DecodeError::V2AddressBlockTooShort {
                family: "AF_INET6",
                length: 20,
                needed: 36
            }
            .to_string(),
            "PROXY v2 address block too short for AF_INET6: 20 bytes, needs at least 36"
        );
    }

    #[test]
    fn v2_header_at_the_size_cap_is_accepted() {
        let tlv_len = MAX_HEADER_LEN - V2_FIXED_LEN - 12 - 3;
        let block = [
            &V2_TCP4_EXAMPLE[16..],
            &[0x04],
            &u16::try_from(tlv_len).unwrap().to_be_bytes(),
            &vec![0; tlv_len],
        ]
        .concat();
        let header = v2_raw(0x21, 0x11, &block);
        assert_eq!(header.len(), MAX_HEADER_LEN);
        let expected = v2_proxy("192.168.0.1:56324", "192.168.0.11:443");
        assert_eq!(
            decode(&header, Accept::V2),
            Ok(Some((expected, MAX_HEADER_LEN)))
        );
        assert_eq!(decode(&header[..MAX_HEADER_LEN - 1], Accept::V2), Ok(None));
    }

    #[test]
    fn accept_mismatches_name_the_version_received() {
        let v1 = encode_v1(addr("10.0.0.1:1"), addr("10.0.0.2:2"));
        let v2 = encode_v2(addr("10.0.0.1:1"), addr("10.0.0.2:2"));
        let v1_on_v2 = DecodeError::VersionNotAccepted {
            received: Version::V1,
            accepted: Version::V2,
        };
        let v2_on_v1 = DecodeError::VersionNotAccepted {
            received: Version::V2,
            accepted: Version::V1,
        };
        assert_eq!(decode(&v1, Accept::V2), Err(v1_on_v2));
        assert_eq!(decode(&v2, Accept::V1), Err(v2_on_v1));
        // Even one byte of the other signature is enough to refuse.
        assert_eq!(decode(b"P", Accept::V2), Err(v1_on_v2));
        assert_eq!(decode(b"\r", Accept::V1), Err(v2_on_v1));
        assert_eq!(
            v2_on_v1.to_string(),
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
                    "{input:?}"
                );
            }
        }
        for accept in ACCEPTS {
            assert_eq!(decode(b"", accept), Ok(None));
        }
    }

    #[test]
    fn every_error_maps_to_a_known_reason() {
        assert_eq!(DecodeError::NotProxy.reason(), "proxy_protocol_missing");
        assert_eq!(
            DecodeError::V1Oversized.reason(),
            "proxy_protocol_oversized"
        );
        assert_eq!(
            DecodeError::V2Oversized { length: 5000 }.reason(),
            "proxy_protocol_oversized"
        );
        assert_eq!(DecodeError::V2BadTlv.reason(), "proxy_protocol_malformed");
        assert_eq!(
            DecodeError::VersionNotAccepted {
                received: Version::V1,
                accepted: Version::V2
            }
            .reason(),
            "proxy_protocol_malformed"
        );
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

    /// What `fuzz/fuzz_targets/proxy_protocol_decode.rs` also checks.
    fn check_invariants(input: &[u8], accept: Accept) {
        let result = decode(input, accept);
        let shown = || input.escape_ascii().to_string();
        match result {
            Ok(Some((header, consumed))) => {
                assert!(consumed > 0 && consumed <= input.len().min(MAX_HEADER_LEN));
                assert_eq!(decode(&input[..consumed], accept), result, "{}", shown());
                assert_eq!(
                    decode(&input[..consumed - 1], accept),
                    Ok(None),
                    "{}",
                    shown()
                );
                let again = header.encode();
                assert_eq!(decode(&again, accept), Ok(Some((header, again.len()))));
            }
            Ok(None) => assert!(input.len() < MAX_HEADER_LEN, "{}", shown()),
            Err(error) => {
                assert!(DecodeError::REASONS.contains(&error.reason()));
                let longer = [input, b"\r\n"].concat();
                assert!(decode(&longer, accept).is_err(), "{}", shown());
            }
        }
    }
}
