//! Access lists: which client networks a listener serves, decided from the TCP peer's
//! address at accept, before a single byte is read.

use std::net::IpAddr;

use crate::config::{IpNet, ListenerConfig};

/// `deny` wins; an empty `allow` allows everyone not denied.
pub fn is_allowed(listener: &ListenerConfig, peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    if listener.deny.iter().any(|net| net.contains(&peer)) {
        return false;
    }
    listener.allow.is_empty() || listener.allow.iter().any(|net| net.contains(&peer))
}

/// Whether `peer` may send a PROXY protocol header (an empty list trusts every peer).
pub fn may_send_proxy_header(listener: &ListenerConfig, peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    listener.proxy_protocol_from.is_empty() || contains(&listener.proxy_protocol_from, peer)
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn listener(extra: &str) -> ListenerConfig {
        let text = format!(
            "[listeners.l]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n{extra}\n[pools.p]\nupstreams = [{{ address = \"127.0.0.1:2\" }}]\n"
        );
        Config::parse(&text, Path::new("t.toml")).unwrap().listeners[0].clone()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn allow_and_deny_table() {
        let open = listener("");
        assert!(is_allowed(&open, ip("203.0.113.9")));

        let l = listener(
            "allow = [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.7\"]\ndeny = [\"10.9.0.0/16\"]",
        );
        let cases = [
            ("10.1.2.3", true),
            ("10.9.0.1", false),
            ("11.0.0.1", false),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("2001:db8::1", true),
            ("2001:db9::1", false),
            ("::ffff:10.1.2.3", true),
            ("::ffff:10.9.1.1", false),
        ];
        for (addr, expected) in cases {
            assert_eq!(is_allowed(&l, ip(addr)), expected, "{addr}");
        }

        let deny_only = listener("deny = [\"127.0.0.0/8\"]");
        assert!(!is_allowed(&deny_only, ip("127.0.0.1")));
        assert!(is_allowed(&deny_only, ip("10.0.0.1")));
    }

    #[test]
    fn proxy_header_trust() {
        let any = listener("accept_proxy_protocol = \"v1\"");
        assert!(may_send_proxy_header(&any, ip("198.51.100.1")));
        let some =
            listener("accept_proxy_protocol = \"any\"\nproxy_protocol_from = [\"10.0.0.0/8\"]");
        assert!(may_send_proxy_header(&some, ip("10.0.0.5")));
        assert!(!may_send_proxy_header(&some, ip("198.51.100.1")));
    }
}
