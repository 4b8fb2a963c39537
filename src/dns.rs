//! DNS lookups for upstreams given by host name or SRV record: one question, its
//! answer as socket addresses with stable labels, bounded in size and in time.
//!
//! Below the config (which resolves at load) and discovery (which resolves again every
//! interval), so that both read DNS the same way.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;

/// At most this many upstreams from one name: a hostile or broken server answering
/// thousands of records must not start thousands of health checkers.
pub const MAX_RECORDS: usize = 64;

/// An answer is trusted for at least this long, whatever its TTL (dnsmasq answers from
/// its hosts files with TTL 0), so a pool never re-resolves in a busy loop.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// What to ask: the addresses of a host name (each an upstream on `port`: its A
/// records, or its AAAA records when it has no A record), or an SRV name (each target
/// an upstream on the target's port, with its weight).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Query {
    Host { host: String, port: u16 },
    Srv { name: String },
}

/// One upstream found in DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub address: SocketAddr,
    /// Stable across answers for as long as the record exists, for metrics and the
    /// admin API: the IP address of a host name's record (`10.0.0.3`, `fd00::3`), or
    /// `target:port` of an SRV target. Never holds a `/` (the admin API's paths).
    pub label: String,
    /// The SRV weight; `None` for address records.
    pub weight: Option<u16>,
}

/// A non-empty answer, sorted by label, at most [`MAX_RECORDS`] long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub records: Vec<Record>,
    /// The shortest TTL of the records, at least [`MIN_TTL`].
    pub ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("cannot set up a DNS resolver: {0}")]
    Setup(String),
    #[error("{0}")]
    Lookup(String),
    #[error("no address record")]
    Empty,
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// A resolver asking either the given servers or those of /etc/resolv.conf.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
    timeout: Duration,
}

// === impl Query ===

impl Query {
    /// `host:port` where host is a name (not an IP address); `None` otherwise.
    pub fn host(text: &str) -> Option<Self> {
        if text.parse::<SocketAddr>().is_ok() {
            return None;
        }
        let (host, port) = text.rsplit_once(':')?;
        let port = port.parse::<u16>().ok()?;
        if !is_plain_name(host) || host.parse::<IpAddr>().is_ok() {
            return None;
        }
        Some(Self::Host {
            host: host.to_string(),
            port,
        })
    }
}

// === impl Resolver ===

impl Resolver {
    /// Asks `servers` (over UDP, falling back to TCP on truncation), or the system's
    /// configuration when empty. Every query gives up after `timeout`.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Self, DnsError> {
        let provider = TokioConnectionProvider::default();
        let mut builder = if servers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| DnsError::Setup(e.to_string()))?
        } else {
            let mut config = ResolverConfig::new();
            for server in servers {
                config.add_name_server(NameServerConfig::new(*server, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(*server, Protocol::Tcp));
            }
            let mut builder = TokioResolver::builder_with_config(config, provider);
            // Named servers are asked alone: the operator chose them over the hosts file.
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        };
        let options: &mut ResolverOpts = builder.options_mut();
        // One address family per name: a dual-stack server has an A and an AAAA record,
        // and counting it twice would double its share of clients (and of source_hash)
        // and check it twice.
        options.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        options.timeout = timeout;
        options.attempts = 1;
        // Every resolution asks again; the TTL decides when, not a cache.
        options.cache_size = 0;
        options.try_tcp_on_error = true;
        // Names are written whole in the config; no search-domain guessing.
        options.ndots = 0;
        Ok(Self {
            inner: builder.build(),
            timeout,
        })
    }

    /// One answer to `query`, within about twice the query timeout in all (an SRV name
    /// then its targets).
    pub async fn resolve(&self, query: &Query) -> Result<Answer, DnsError> {
        let bound = self.timeout.saturating_mul(2);
        let answer = tokio::time::timeout(bound, self.ask(query))
            .await
            .map_err(|_| DnsError::Timeout(bound))??;
        if answer.records.is_empty() {
            return Err(DnsError::Empty);
        }
        Ok(answer)
    }

    async fn ask(&self, query: &Query) -> Result<Answer, DnsError> {
        let (records, valid_until) = match query {
            Query::Host { host, port } => {
                let found = self.lookup(host).await?;
                let records = found
                    .0
                    .into_iter()
                    .map(|ip| Record {
                        address: SocketAddr::new(ip, *port),
                        label: ip.to_string(),
                        weight: None,
                    })
                    .collect();
                (records, found.1)
            }
            Query::Srv { name } => self.srv(name).await?,
        };
        Ok(Answer::new(records, valid_until))
    }

    /// Every target of an SRV name at its lowest address; targets that do not resolve,
    /// or whose name is not a plain host name (a label must stay addressable in the
    /// admin API), are left out.
    async fn srv(&self, name: &str) -> Result<(Vec<Record>, Instant), DnsError> {
        let found = self
            .inner
            .srv_lookup(name)
            .await
            .map_err(|e| DnsError::Lookup(e.to_string()))?;
        let mut valid_until = found.as_lookup().valid_until();
        let targets: Vec<(String, u16, u16)> = found
            .iter()
            .map(|srv| {
                let target = srv.target().to_utf8();
                let target = target.trim_end_matches('.').to_string();
                (target, srv.port(), srv.weight())
            })
            .filter(|(target, _, _)| is_plain_name(target))
            .take(MAX_RECORDS)
            .collect();
        let lookups = targets.iter().map(|(target, _, _)| self.lookup(target));
        let resolved = futures_util::future::join_all(lookups).await;
        let mut records = Vec::new();
        for ((target, port, weight), found) in targets.into_iter().zip(resolved) {
            let Ok((ips, until)) = found else { continue };
            let Some(ip) = ips.into_iter().min() else {
                continue;
            };
            valid_until = valid_until.min(until);
            records.push(Record {
                address: SocketAddr::new(ip, port),
                label: format!("{target}:{port}"),
                weight: Some(weight),
            });
        }
        Ok((records, valid_until))
    }

    async fn lookup(&self, host: &str) -> Result<(Vec<IpAddr>, Instant), DnsError> {
        let found = self
            .inner
            .lookup_ip(host)
            .await
            .map_err(|e| DnsError::Lookup(e.to_string()))?;
        let ips = found.iter().take(MAX_RECORDS).collect();
        Ok((ips, found.valid_until()))
    }
}

/// Whether `name` is a host name as written in configs and SRV targets: letters,
/// digits, '-', '_' and '.' only (no '/', '@' or ':' to confuse a label or a path).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Resolves `queries` from outside any runtime or inside one (a reload validates its
/// file on a runtime thread): on a thread of its own with its own small runtime.
pub fn resolve_blocking(
    servers: &[SocketAddr],
    queries: &[Query],
    timeout: Duration,
) -> Vec<Result<Answer, DnsError>> {
    let run = || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        runtime.block_on(async {
            let resolver = Resolver::new(servers, timeout)?;
            let answers = queries.iter().map(|q| resolver.resolve(q));
            Ok(futures_util::future::join_all(answers).await)
        })
    };
    let answered = std::thread::scope(|scope| match scope.spawn(run).join() {
        Ok(answered) => answered,
        Err(_) => Err(DnsError::Setup("the resolver thread failed".to_string())),
    });
    match answered {
        Ok(answers) => answers,
        Err(e) => queries.iter().map(|_| Err(e.clone())).collect(),
    }
}

// === impl Answer ===

impl Answer {
    fn new(mut records: Vec<Record>, valid_until: Instant) -> Self {
        records.sort_by(|a, b| a.label.cmp(&b.label));
        records.dedup_by(|a, b| a.address == b.address);
        records.truncate(MAX_RECORDS);
        let ttl = valid_until.saturating_duration_since(Instant::now());
        Self {
            records,
            ttl: ttl.max(MIN_TTL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_are_host_queries() {
        assert_eq!(
            Query::host("db.internal:5432"),
            Some(Query::Host {
                host: "db.internal".to_string(),
                port: 5432
            })
        );
        assert_eq!(Query::host("10.0.0.1:5432"), None);
        assert_eq!(Query::host("[::1]:5432"), None);
        assert_eq!(Query::host("db.internal"), None);
        assert_eq!(Query::host("db.internal:99999"), None);
        assert_eq!(Query::host(":5432"), None);
        // Nothing that would break a label or an admin API path.
        assert_eq!(Query::host("a/b:5432"), None);
        assert_eq!(Query::host("a@b:5432"), None);
        assert_eq!(Query::host("a:b:5432"), None);
        assert_eq!(Query::host(&format!("{}:5432", "a".repeat(254))), None);
        assert!(Query::host("my_db.internal.:5432").is_some());
    }

    #[test]
    fn srv_targets_that_would_break_a_label_are_not_plain_names() {
        assert!(is_plain_name("pg1.node.dc1.consul"));
        for hostile in [
            "",
            "a/b",
            "a\\/b",
            "a@b",
            "a:b",
            "a b",
            "é.test",
            &"a".repeat(254),
        ] {
            assert!(!is_plain_name(hostile), "{hostile:?}");
        }
    }

    #[test]
    fn answers_are_sorted_bounded_and_never_trusted_for_less_than_a_second() {
        let records: Vec<Record> = (0..300u32)
            .rev()
            .map(|i| {
                let address = SocketAddr::from(([127, 0, (i / 250) as u8, (i % 250) as u8], 80));
                Record {
                    address,
                    label: address.to_string(),
                    weight: None,
                }
            })
            .collect();
        let answer = Answer::new(records, Instant::now());
        assert_eq!(answer.records.len(), MAX_RECORDS);
        assert!(answer.records.windows(2).all(|w| w[0].label < w[1].label));
        assert_eq!(answer.ttl, MIN_TTL);
    }
}
