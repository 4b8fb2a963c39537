//! Raw config → typed [`Config`], collecting every problem with its position.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

mod health;

use super::raw::{OneOrMany, RawConfig, RawListener, RawPool, RawUpstream, S};
use super::*;

/// Weights are capped so that a weighted round-robin cycle stays small.
const MAX_WEIGHT: i64 = super::MAX_WEIGHT as i64;
/// More attempts than this only delay the client's error.
const MAX_CONNECT_ATTEMPTS: i64 = 16;
/// Replay is for a protocol's opening bytes (a handshake, a first request); a larger
/// bound would let every unanswered client pin that much memory.
const MAX_REPLAY_UNANSWERED: usize = 1024 * 1024;

/// The range a duration key accepts. Every duration ends up added to a clock reading or
/// handed to the kernel, so each key has a floor that keeps it meaningful and a ceiling
/// that keeps the arithmetic and the syscall valid; `check` rejects anything outside.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    min: Duration,
    max: Duration,
    /// The kernel takes this value in whole seconds: a fraction would be dropped silently.
    whole_seconds: bool,
}

/// Longer than any timeout worth waiting for, and short enough that adding it to a clock
/// reading can never overflow.
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Timeouts, grace periods, hold-downs, ejections and drains.
const SPAN: Bounds = Bounds {
    min: Duration::from_millis(1),
    max: DAY,
    whole_seconds: false,
};

/// Health check intervals: below 10 ms a pool's checks become a connect flood against
/// its own upstreams (and a busy loop in the proxy).
const CHECK_INTERVAL: Bounds = Bounds {
    min: Duration::from_millis(10),
    max: DAY,
    whole_seconds: false,
};

/// A PROXY header or a TLS handshake needs a few round trips and a little CPU; below
/// 10 ms every client on a loaded host would be refused.
const HANDSHAKE: Bounds = Bounds {
    min: Duration::from_millis(10),
    max: DAY,
    whole_seconds: false,
};

/// TCP_KEEPIDLE: whole seconds from 1 to 32767 on Linux; setsockopt refuses anything
/// else, which would leave keepalive silently off.
/// How often DNS entries are resolved again: below a second a pool would query its DNS
/// server in a near loop.
const RESOLVE_INTERVAL: Bounds = Bounds {
    min: Duration::from_secs(1),
    max: DAY,
    whole_seconds: false,
};

/// At most this many DNS servers per pool.
const MAX_RESOLVERS: usize = 8;

/// Each DNS question at load gives up after this long; a dead server then delays
/// `check`, a start or a reload by seconds, not forever.
pub(super) const DNS_TIMEOUT: Duration = Duration::from_secs(3);

const KEEPALIVE: Bounds = Bounds {
    min: Duration::from_secs(1),
    max: Duration::from_secs(32767),
    whole_seconds: true,
};

/// What an upstream's `address` or `srv` names.
enum Target {
    Address(SocketAddr),
    Dns(crate::dns::Query),
}

/// One validated upstream entry: an upstream, or a DNS entry (with where it is written)
/// whose members are known once resolved.
enum Entry {
    Static(UpstreamConfig),
    Dns(DnsEntry, Range<usize>),
}

struct Validator<'a> {
    file: &'a Path,
    /// Relative paths in the file (certificates, keys) resolve against its folder.
    base: std::path::PathBuf,
    text: &'a str,
    problems: Vec<Problem>,
    /// Whether the file has an `[admin]` table (manual failback needs one).
    has_admin: bool,
}

pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut v = Validator {
        file: path,
        base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        text,
        problems: Vec::new(),
        has_admin: false,
    };
    let config = v.read_raw().and_then(|raw| v.config(raw, path));
    if let (true, Some(config)) = (v.problems.is_empty(), config) {
        return Ok(config);
    }
    v.problems.sort_by_key(|p| (p.line, p.column));
    Err(ConfigError::Invalid {
        problems: v.problems,
    })
}

/// Most unknown keys and wrong types reported in one pass; each costs one more
/// deserialization of the document.
const MAX_SHAPE_PROBLEMS: usize = 64;

/// A step in a key path: a table key or an array index.
#[derive(Debug, Clone)]
enum PathStep<'i> {
    Key(S<toml::de::DeString<'i>>),
    Index(usize),
}

// === impl Validator ===

impl Validator<'_> {
    /// The raw config, with every unknown key and wrong type reported, not only the
    /// first: serde stops at the first, so each offending entry is reported with its
    /// full key path, removed from the parsed document, and the rest read again.
    /// `None` only for a TOML syntax error (nothing after it can be trusted).
    fn read_raw(&mut self) -> Option<RawConfig> {
        use serde::Deserialize;
        let parse = || toml::de::DeTable::parse(self.text);
        let document = match parse() {
            Ok(document) => document,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let key = self.enclosing_table(span.start);
                self.report(span, &key, e.message().trim().replace('\n', "; "));
                return None;
            }
        };
        // A valid file is read once, without copies (a 1,000-pool file is reloaded in
        // tens of milliseconds, and copies of its document were a fifth of that).
        if let Ok(raw) = RawConfig::deserialize(toml::de::Deserializer::from(document)) {
            return Some(raw);
        }
        // Names come from the document as written: removing an array element shifts
        // the indices of the working copy.
        let mut document = parse().ok()?;
        let original = document.clone();
        let mut removed: Vec<String> = Vec::new();
        for _ in 0..MAX_SHAPE_PROBLEMS {
            let e = match RawConfig::deserialize(toml::de::Deserializer::from(document.clone())) {
                Ok(raw) => return Some(raw),
                Err(e) => e,
            };
            let span = e.span().unwrap_or(0..0);
            let steps = locate(document.get_ref(), &span);
            let key = key_path(&locate(original.get_ref(), &span));
            // A table that lost a wrongly typed key may now miss a required one: that
            // is the same problem again, already reported.
            let consequence = removed
                .iter()
                .any(|r| r.starts_with(&key) && !key.is_empty());
            if !consequence {
                self.report(span, &key, e.message().trim().replace('\n', "; "));
            }
            if steps.is_empty() || !remove(document.get_mut(), &steps) {
                return None;
            }
            removed.push(key);
        }
        None
    }

    fn report(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    /// Serde errors do not carry the key path; the nearest table header above does.
    fn enclosing_table(&self, offset: usize) -> String {
        let before = &self.text[..offset.min(self.text.len())];
        before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
            .unwrap_or_default()
    }

    fn config(&mut self, raw: RawConfig, path: &Path) -> Option<Config> {
        let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();

        let worker_threads = self.int(
            &raw.runtime.worker_threads,
            "runtime.worker_threads",
            0,
            1024,
        );
        let scheduler = self.word(
            &raw.runtime.scheduler,
            "runtime.scheduler",
            Scheduler::WORDS,
        );
        let shutdown_grace =
            self.duration(&raw.runtime.shutdown_grace, "runtime.shutdown_grace", SPAN);
        let level = self.choice(
            &raw.log.level,
            "log.level",
            &["error", "warn", "info", "debug", "trace"],
        );
        let format = self.word(&raw.log.format, "log.format", LogFormat::WORDS);

        self.has_admin = raw.admin.is_some();
        let admin = raw.admin.as_ref().map(|admin| {
            let admin = admin.get_ref();
            let listen = self.socket_addr(&admin.listen, "admin.listen");
            let token_file = admin.token_file.as_ref().map(|f| {
                let path = base_dir.join(f.get_ref());
                // `run` needs the token before it serves: `check` must fail the same way.
                if let Err(problem) = token_problem(&path) {
                    self.report(f.span(), "admin.token_file", problem);
                }
                path
            });
            if let (Some(addr), None) = (listen, &token_file)
                && !addr.ip().is_loopback()
            {
                self.report(
                    admin.listen.span(),
                    "admin.listen",
                    format!("{addr} is reachable from other hosts, so the admin API needs a token_file (anyone who can connect could drain, fail back and reload); set token_file or listen on 127.0.0.1 or [::1]"),
                );
            }
            (listen, token_file)
        });

        let pool_names: HashSet<&str> = raw.pools.keys().map(|k| k.get_ref().as_str()).collect();
        let mut pools = Vec::new();
        for (name, pool) in &raw.pools {
            self.name(name, "pools");
            if let Some(pool) = self.pool(name.get_ref(), pool) {
                pools.push(Arc::new(pool));
            }
        }

        if raw.listeners.is_empty() {
            self.report(
                0..0,
                "listeners",
                "no listener is defined; add a [listeners.NAME] table with `bind` and `pool`",
            );
        }
        let mut binds_seen: HashMap<SocketAddr, String> = HashMap::new();
        let mut listeners = Vec::new();
        for (name, listener) in &raw.listeners {
            self.name(name, "listeners");
            if let Some(listener) =
                self.listener(name.get_ref(), listener, &pool_names, &mut binds_seen)
            {
                listeners.push(listener);
            }
        }

        if let (Some(raw_admin), Some((Some(listen), _))) = (&raw.admin, &admin) {
            self.admin_collisions(*listen, &raw_admin.get_ref().listen, &binds_seen);
        }

        let worker_threads = worker_threads? as usize;
        Some(Config {
            source: path.to_path_buf(),
            runtime: RuntimeConfig {
                worker_threads: if worker_threads == 0 {
                    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
                } else {
                    worker_threads
                },
                scheduler: scheduler?,
                shutdown_grace: shutdown_grace?,
                pid_file: (!raw.runtime.pid_file.is_empty())
                    .then(|| base_dir.join(&raw.runtime.pid_file)),
            },
            log: LogConfig {
                level: level?.to_string(),
                format: format?,
                connections: raw.log.connections,
            },
            admin: match admin {
                None => None,
                Some((listen, token_file)) => Some(AdminConfig {
                    listen: listen?,
                    token_file,
                }),
            },
            listeners,
            pools,
        })
    }

    /// `run` binds the admin API after the listeners: an address one of them holds would
    /// fail it then, so `check` refuses it now.
    fn admin_collisions(
        &mut self,
        listen: SocketAddr,
        raw: &S<String>,
        binds: &HashMap<SocketAddr, String>,
    ) {
        let mut clashes: Vec<(&SocketAddr, &String)> = binds
            .iter()
            .filter(|(bind, _)| sockets_collide(listen, **bind))
            .collect();
        clashes.sort();
        for (bind, listener) in clashes {
            self.report(
                raw.span(),
                "admin.listen",
                format!("{listen} collides with bind {bind} of listener {listener:?}; give the admin API a port of its own"),
            );
        }
    }

    fn name(&mut self, name: &S<String>, table: &str) {
        let valid = !name.get_ref().is_empty()
            && name
                .get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            self.report(
                name.span(),
                &format!("{table}.{}", name.get_ref()),
                format!(
                    "{:?} is not a valid name; names use only letters, digits, '_', '.' and '-'",
                    name.get_ref()
                ),
            );
        }
    }

    fn listener(
        &mut self,
        name: &str,
        raw: &S<RawListener>,
        pools: &HashSet<&str>,
        binds_seen: &mut HashMap<SocketAddr, String>,
    ) -> Option<ListenerConfig> {
        let key = |field: &str| dotted(&["listeners", name, field]);
        let l = raw.get_ref();

        let bind_key = key("bind");
        let entries: Vec<(String, Range<usize>)> = match l.bind.get_ref() {
            OneOrMany::One(addr) => vec![(addr.clone(), l.bind.span())],
            OneOrMany::Many(list) => list
                .iter()
                .map(|a| (a.get_ref().clone(), a.span()))
                .collect(),
        };
        if entries.is_empty() {
            self.report(
                l.bind.span(),
                &bind_key,
                "the bind list is empty; give at least one address like \"0.0.0.0:5432\"",
            );
        }
        let mut binds = Vec::new();
        let mut ok = !entries.is_empty();
        for (text, span) in entries {
            match text.parse::<SocketAddr>() {
                Ok(addr) => {
                    // Port 0 asks the kernel for a free port: two of them never collide.
                    let taken = if addr.port() == 0 {
                        None
                    } else {
                        binds_seen.insert(addr, name.to_string())
                    };
                    if let Some(other) = taken {
                        self.report(span, &bind_key, format!("address {addr} is already bound by listener {other:?}; each address may be bound once"));
                        ok = false;
                    }
                    binds.push(addr);
                }
                Err(_) => {
                    self.report(span, &bind_key, format!("{text:?} is not a bind address; use ip:port, e.g. \"0.0.0.0:5432\" or \"[::]:5432\""));
                    ok = false;
                }
            }
        }

        let mut defined: Vec<&str> = pools.iter().copied().collect();
        defined.sort_unstable();
        let defined = if defined.is_empty() {
            "none".to_string()
        } else {
            defined.join(", ")
        };
        let pool_exists = |v: &mut Self, pool: &S<String>, key: &str| {
            if pools.contains(pool.get_ref().as_str()) {
                return true;
            }
            v.report(
                pool.span(),
                key,
                format!(
                    "pool {:?} is not defined; defined pools: {defined}",
                    pool.get_ref()
                ),
            );
            false
        };
        if let Some(pool) = &l.pool {
            ok &= pool_exists(self, pool, &key("pool"));
        } else if l.routes.is_empty() {
            self.report(raw.span(), &key("pool"), "a listener needs `pool`, or SNI `routes` (then `pool` is where clients without a matching name go)");
            ok = false;
        }
        let mut routes = Vec::new();
        for (pattern, pool) in &l.routes {
            let route_key = format!("listeners.{name}.routes.{}", pattern.get_ref());
            if let Err(message) = crate::names::validate_pattern(pattern.get_ref()) {
                self.report(pattern.span(), &route_key, message);
                ok = false;
            }
            ok &= pool_exists(self, pool, &route_key);
            routes.push((pattern.get_ref().to_lowercase(), pool.get_ref().clone()));
        }
        let max_connections = self.int(
            &l.max_connections,
            &key("max_connections"),
            0,
            i64::from(u32::MAX),
        );
        let backlog = self.int(&l.backlog, &key("backlog"), 1, 65535);
        let handshake_timeout =
            self.duration(&l.handshake_timeout, &key("handshake_timeout"), HANDSHAKE);
        let allow = self.networks(&l.allow, &key("allow"));
        let deny = self.networks(&l.deny, &key("deny"));
        let accept_proxy_protocol = self.optional_word(
            &l.accept_proxy_protocol,
            &key("accept_proxy_protocol"),
            ProxyProtocolAccept::WORDS,
        );
        let proxy_protocol_from =
            self.networks(&l.proxy_protocol_from, &key("proxy_protocol_from"));
        if let (Some(None), Some(first)) = (accept_proxy_protocol, l.proxy_protocol_from.first()) {
            self.report(
                first.span(),
                &key("proxy_protocol_from"),
                "has no effect while accept_proxy_protocol = \"off\"; set accept_proxy_protocol to v1, v2 or any, or remove it",
            );
            ok = false;
        }

        let tls = match &l.tls {
            None => Some(None),
            Some(tls) => self.server_tls(tls, &key("tls")).map(Some),
        };
        ok &= tls.is_some();
        let tls = tls.flatten();
        if !ok {
            return None;
        }
        Some(ListenerConfig {
            name: name.to_string(),
            binds,
            pool: l.pool.as_ref().map(|p| p.get_ref().clone()),
            routes,
            tls,
            max_connections: NonZeroUsize::new(max_connections? as usize),
            backlog: backlog? as u32,
            handshake_timeout: handshake_timeout?,
            allow: allow?,
            deny: deny?,
            accept_proxy_protocol: accept_proxy_protocol?,
            proxy_protocol_from: proxy_protocol_from?,
        })
    }

    fn pool(&mut self, name: &str, raw: &S<RawPool>) -> Option<PoolConfig> {
        let key = |field: &str| dotted(&["pools", name, field]);
        let p = raw.get_ref();

        let balance = self.word(&p.balance, &key("balance"), Balance::WORDS);
        let connect_timeout = self.duration(&p.connect_timeout, &key("connect_timeout"), SPAN);
        let connect_attempts = self.int(
            &p.connect_attempts,
            &key("connect_attempts"),
            1,
            MAX_CONNECT_ATTEMPTS,
        );
        let hedge_after = self.optional_duration(&p.hedge_after, &key("hedge_after"), SPAN);
        let idle_timeout = self.optional_duration(&p.idle_timeout, &key("idle_timeout"), SPAN);
        let failback = match p.failback.get_ref().as_str() {
            "immediate" => Some(Failback::Immediate),
            "manual" if !self.has_admin => {
                self.report(p.failback.span(), &key("failback"), format!("\"manual\" needs the admin API to ever fail back (POST /pools/{name}/failback); add an [admin] table, or use \"immediate\" or a hold-down duration such as \"30s\""));
                None
            }
            "manual" => Some(Failback::Manual),
            other => match read_duration(other, SPAN) {
                Ok(d) => Some(Failback::After(d)),
                Err(e) => {
                    let message = e.message(other, SPAN, "\"immediate\", \"manual\" or ");
                    self.report(p.failback.span(), &key("failback"), message);
                    None
                }
            },
        };
        let on_upstream_down = self.word(
            &p.on_upstream_down,
            &key("on_upstream_down"),
            OnUpstreamDown::WORDS,
        );
        let drain_after_failback =
            self.optional_duration(&p.drain_after_failback, &key("drain_after_failback"), SPAN);
        let slow_start = self.optional_duration(&p.slow_start, &key("slow_start"), SPAN);
        let min_usable = self.int(&p.min_usable, &key("min_usable"), 1, 1024);
        let when_all_down = self.word(&p.when_all_down, &key("when_all_down"), WhenAllDown::WORDS);
        let tcp_keepalive =
            self.optional_duration(&p.tcp_keepalive, &key("tcp_keepalive"), KEEPALIVE);
        let proxy_protocol = self.optional_word(
            &p.proxy_protocol,
            &key("proxy_protocol"),
            ProxyProtocolVersion::WORDS,
        );
        let first_byte_timeout =
            self.optional_duration(&p.first_byte_timeout, &key("first_byte_timeout"), SPAN);
        let replay_unanswered = self.optional_size(
            &p.replay_unanswered,
            &key("replay_unanswered"),
            MAX_REPLAY_UNANSWERED,
        );

        let resolve_interval = self.duration(
            &p.resolve_interval,
            &key("resolve_interval"),
            RESOLVE_INTERVAL,
        );
        let resolvers = self.resolvers(&p.resolvers, &key("resolvers"));

        let tls = match &p.tls {
            None => Some(None),
            Some(tls) => self.client_tls(tls, &key("tls")).map(Some),
        };
        let upstreams = self.upstreams(name, p, raw.span(), resolvers.as_deref());
        let health = self.health(name, p);
        let outlier = self.outlier(name, p);

        Some(PoolConfig {
            name: name.to_string(),
            balance: balance?,
            connect_timeout: connect_timeout?,
            connect_attempts: connect_attempts? as usize,
            hedge_after: hedge_after?,
            idle_timeout: idle_timeout?,
            failback: failback?,
            on_upstream_down: on_upstream_down?,
            drain_after_failback: drain_after_failback?,
            slow_start: slow_start?,
            min_usable: min_usable? as usize,
            when_all_down: when_all_down?,
            tcp_keepalive: tcp_keepalive?,
            proxy_protocol: proxy_protocol?,
            first_byte_timeout: first_byte_timeout?,
            replay_unanswered: replay_unanswered?,
            tls: tls?,
            upstreams: upstreams.as_ref()?.0.clone(),
            dns: upstreams?.1,
            resolve_interval: resolve_interval?,
            resolvers: resolvers?,
            health: health?,
            outlier: outlier?,
        })
    }

    /// The pool's upstreams (those of DNS entries as resolved now) and its DNS entries.
    /// `resolvers` is `None` when the pool's resolver list is wrong: DNS entries are
    /// then checked for form but not resolved.
    fn upstreams(
        &mut self,
        pool: &str,
        p: &RawPool,
        pool_span: Range<usize>,
        resolvers: Option<&[SocketAddr]>,
    ) -> Option<(Vec<UpstreamConfig>, Vec<DnsEntry>)> {
        let key = format!("pools.{pool}.upstreams");
        if p.upstreams.get_ref().is_empty() {
            let span = if p.upstreams.span().is_empty() {
                pool_span
            } else {
                p.upstreams.span()
            };
            self.report(span, &key, "the upstream list is empty; give at least one, e.g. upstreams = [{ address = \"10.0.0.1:5432\" }]");
            return None;
        }
        let mut addresses = HashSet::new();
        let mut names = HashSet::new();
        let mut entries = Vec::new();
        let mut ok = true;
        for (i, raw) in p.upstreams.get_ref().iter().enumerate() {
            let index = format!("{key}[{i}]");
            match self.upstream(&key, &index, raw, &mut addresses, &mut names) {
                Some(entry) => entries.push(entry),
                None => ok = false,
            }
        }
        let queries: Vec<_> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Dns(entry, _) => Some(entry.query.clone()),
                Entry::Static(_) => None,
            })
            .collect();
        let mut answers = match resolvers {
            Some(servers) if !queries.is_empty() => {
                crate::dns::resolve_blocking(servers, &queries, DNS_TIMEOUT)
            }
            _ => Vec::new(),
        }
        .into_iter();
        // In file order, so that the first upstream written is the first one listed.
        let mut all = Vec::new();
        let mut dns = Vec::new();
        for entry in entries {
            let (entry, span) = match entry {
                Entry::Static(upstream) => {
                    all.push(upstream);
                    continue;
                }
                Entry::Dns(entry, span) => (entry, span),
            };
            match answers.next() {
                // An address already in the pool stays the one upstream it was.
                Some(Ok(answer)) => all.extend(
                    entry
                        .members(&answer)
                        .into_iter()
                        .filter(|m| addresses.insert(m.address)),
                ),
                Some(Err(crate::dns::DnsError::Empty)) => {
                    let message = format!("{:?} resolved to no address", entry.target);
                    self.report(span, &format!("{key}.address"), message);
                    ok = false;
                }
                Some(Err(e)) => {
                    let message = format!("cannot resolve {:?}: {e}", entry.target);
                    self.report(span, &format!("{key}.address"), message);
                    ok = false;
                }
                // Not resolved: the resolver list is wrong, already reported.
                None => ok = false,
            }
            dns.push(entry);
        }
        ok.then_some((all, dns))
    }

    /// One upstream entry; `addresses` and `names` are those seen earlier in the pool,
    /// checked for duplicates even when another field of this upstream is wrong, so
    /// that one `check` shows every problem.
    fn upstream(
        &mut self,
        key: &str,
        index: &str,
        entry: &S<RawUpstream>,
        addresses: &mut HashSet<SocketAddr>,
        names: &mut HashSet<String>,
    ) -> Option<Entry> {
        let raw = entry.get_ref();
        let (value, field) = match (&raw.address, &raw.srv) {
            (Some(address), None) => (address, "address"),
            (None, Some(srv)) => (srv, "srv"),
            // A misspelt key was removed and reported already; this is its consequence.
            (None, None) if self.problems.iter().any(|p| p.key.starts_with(index)) => {
                return None;
            }
            _ => {
                self.report(entry.span(), index, "give each upstream either an address (\"ip:port\" or \"host:port\") or an srv name, e.g. { srv = \"_postgresql._tcp.db.service.consul\" }");
                return None;
            }
        };
        let target = match field {
            "address" => self.upstream_target(value, &format!("{key}.address")),
            _ => self.srv_name(value, &format!("{key}.srv")),
        };
        let mut target = target;
        if let Some(Target::Address(addr)) = target
            && !addresses.insert(addr)
        {
            self.report(
                value.span(),
                &format!("{key}.{field}"),
                format!("{addr} appears twice in this pool; each upstream address may appear once"),
            );
            target = None;
        }
        let priority = self.int(&raw.priority, &format!("{key}.priority"), 0, 1000);
        let weight = self.int(&raw.weight, &format!("{key}.weight"), 1, MAX_WEIGHT);
        let mut name_ok = true;
        if let Some(name) = &raw.name {
            self.name(name, &format!("{key}.name"));
            if !names.insert(name.get_ref().clone()) {
                self.report(
                    name.span(),
                    &format!("{key}.name"),
                    format!(
                        "upstream name {:?} appears twice in this pool; names must be unique",
                        name.get_ref()
                    ),
                );
                name_ok = false;
            }
        }
        if !name_ok {
            return None;
        }
        let name = raw.name.as_ref().map(|n| n.get_ref().clone());
        let (priority, weight) = (priority? as u32, weight? as u32);
        Some(match target? {
            Target::Address(address) => Entry::Static(UpstreamConfig {
                address,
                target: value.get_ref().clone(),
                discovered: None,
                name,
                priority,
                weight,
            }),
            Target::Dns(query) => Entry::Dns(
                DnsEntry {
                    query,
                    target: value.get_ref().clone(),
                    name,
                    priority,
                    weight,
                },
                value.span(),
            ),
        })
    }

    fn outlier(&mut self, pool: &str, p: &RawPool) -> Option<OutlierConfig> {
        let key = |field: &str| dotted(&["pools", pool, "outlier", field]);
        let o = &p.outlier;
        let consecutive_failures = self.int(
            &o.consecutive_failures,
            &key("consecutive_failures"),
            1,
            1000,
        );
        let base_ejection = self.duration(&o.base_ejection, &key("base_ejection"), SPAN);
        let max_ejection = self.duration(&o.max_ejection, &key("max_ejection"), SPAN);
        if let (Some(base), Some(max)) = (base_ejection, max_ejection)
            && max < base
        {
            self.report(
                o.max_ejection.span(),
                &key("max_ejection"),
                format!(
                    "must be at least base_ejection ({})",
                    humantime::format_duration(base)
                ),
            );
            return None;
        }
        Some(OutlierConfig {
            consecutive_failures: consecutive_failures? as u32,
            base_ejection: base_ejection?,
            max_ejection: max_ejection?,
        })
    }

    // --- value checks; each reports its own problem and returns None on failure ---

    fn int(&mut self, value: &S<i64>, key: &str, min: i64, max: i64) -> Option<i64> {
        let v = *value.get_ref();
        if (min..=max).contains(&v) {
            Some(v)
        } else {
            self.report(
                value.span(),
                key,
                format!("{v} is out of range; allowed: {min} to {max}"),
            );
            None
        }
    }

    /// The value a config word means, from its enum's one table of words.
    fn word<T: Copy>(&mut self, value: &S<String>, key: &str, words: &[(&str, T)]) -> Option<T> {
        let allowed: Vec<&str> = words.iter().map(|(word, _)| *word).collect();
        let found = self.choice(value, key, &allowed)?;
        words
            .iter()
            .find(|(word, _)| *word == found)
            .map(|(_, value)| *value)
    }

    /// Like [`word`](Self::word), with `"off"` meaning `None`.
    fn optional_word<T: Copy>(
        &mut self,
        value: &S<String>,
        key: &str,
        words: &[(&str, T)],
    ) -> Option<Option<T>> {
        let mut with_off: Vec<(&str, Option<T>)> = vec![("off", None)];
        with_off.extend(words.iter().map(|(word, value)| (*word, Some(*value))));
        self.word(value, key, &with_off)
    }

    fn choice<'c>(&mut self, value: &S<String>, key: &str, allowed: &[&'c str]) -> Option<&'c str> {
        let found = allowed
            .iter()
            .find(|a| **a == value.get_ref().as_str())
            .copied();
        if found.is_none() {
            self.report(
                value.span(),
                key,
                format!(
                    "{:?} is not allowed; use one of: {}",
                    value.get_ref(),
                    allowed.join(", ")
                ),
            );
        }
        found
    }

    fn duration(&mut self, value: &S<String>, key: &str, bounds: Bounds) -> Option<Duration> {
        let text = value.get_ref();
        match read_duration(text, bounds) {
            Ok(d) => Some(d),
            Err(e) => {
                self.report(value.span(), key, e.message(text, bounds, ""));
                None
            }
        }
    }

    /// A duration, or `"off"`.
    fn optional_duration(
        &mut self,
        value: &S<String>,
        key: &str,
        bounds: Bounds,
    ) -> Option<Option<Duration>> {
        let text = value.get_ref();
        if text == "off" {
            return Some(None);
        }
        match read_duration(text, bounds) {
            Ok(d) => Some(Some(d)),
            Err(e) => {
                self.report(value.span(), key, e.message(text, bounds, "\"off\" or "));
                None
            }
        }
    }

    /// `"off"` or a byte size with a unit (`B`, `KiB`, `MiB`), from 1 byte to `max`.
    fn optional_size(&mut self, value: &S<String>, key: &str, max: usize) -> Option<Option<usize>> {
        let text = value.get_ref();
        if text == "off" {
            return Some(None);
        }
        let range = format!("\"off\" or 1B to {}KiB", max / 1024);
        let Some(size) = read_size(text) else {
            let message = format!(
                "{text:?} is not a size; use a number with a unit, e.g. \"512B\", \"16KiB\", \"1MiB\"; allowed: {range}"
            );
            self.report(value.span(), key, message);
            return None;
        };
        if !(1..=max).contains(&size) {
            self.report(
                value.span(),
                key,
                format!("{text:?} is out of range; allowed: {range}"),
            );
            return None;
        }
        Some(Some(size))
    }

    fn path(&self, value: &str) -> std::path::PathBuf {
        self.base.join(value)
    }

    fn server_tls(
        &mut self,
        raw: &S<super::raw::RawListenerTls>,
        key: &str,
    ) -> Option<crate::tls::ServerTls> {
        use crate::tls::{CertFiles, ServerSettings, ServerTls};
        let t = raw.get_ref();
        let mut certs = Vec::new();
        match (&t.cert, &t.key) {
            (Some(cert), Some(key_file)) => certs.push(CertFiles {
                cert: self.path(cert.get_ref()),
                key: self.path(key_file.get_ref()),
                names: Vec::new(),
            }),
            (None, None) => {}
            _ => {
                self.report(raw.span(), key, "`cert` and `key` go together; give both, or use `certs = [{ cert, key, names }]`");
                return None;
            }
        }
        let mut named: HashSet<String> = HashSet::new();
        for entry in &t.certs {
            let e = entry.get_ref();
            let mut names = Vec::new();
            for name in &e.names {
                if let Err(message) = crate::names::validate_pattern(name.get_ref()) {
                    self.report(name.span(), &format!("{key}.certs.names"), message);
                    return None;
                }
                let lower = name.get_ref().to_ascii_lowercase();
                // Which certificate a client gets must not depend on the order of entries.
                if !named.insert(lower.clone()) {
                    self.report(
                        name.span(),
                        &format!("{key}.certs.names"),
                        format!("{:?} is listed for two certificates; give each name to one certificate (names are case-insensitive)", name.get_ref()),
                    );
                    return None;
                }
                names.push(lower);
            }
            certs.push(CertFiles {
                cert: self.path(e.cert.get_ref()),
                key: self.path(e.key.get_ref()),
                names,
            });
        }
        if certs.is_empty() {
            self.report(
                raw.span(),
                key,
                "no certificate; set `cert` and `key`, or `certs = [{ cert, key, names }]`",
            );
            return None;
        }
        let tls13_only = self.choice(
            &t.min_version,
            &format!("{key}.min_version"),
            &["1.2", "1.3"],
        )? == "1.3";
        let settings = ServerSettings {
            certs,
            tls13_only,
            alpn: t.alpn.iter().map(|a| a.get_ref().clone()).collect(),
            client_ca: (!t.client_ca.get_ref().is_empty())
                .then(|| self.path(t.client_ca.get_ref())),
        };
        match ServerTls::load(settings) {
            Ok(tls) => Some(tls),
            Err(e) => {
                self.report(raw.span(), key, e.to_string());
                None
            }
        }
    }

    fn client_tls(
        &mut self,
        raw: &S<super::raw::RawPoolTls>,
        key: &str,
    ) -> Option<crate::tls::ClientTls> {
        use crate::tls::{ClientSettings, ClientTls};
        let t = raw.get_ref();
        let client_cert = match (
            t.client_cert.get_ref().is_empty(),
            t.client_key.get_ref().is_empty(),
        ) {
            (true, true) => None,
            (false, false) => Some((
                self.path(t.client_cert.get_ref()),
                self.path(t.client_key.get_ref()),
            )),
            _ => {
                self.report(
                    raw.span(),
                    key,
                    "`client_cert` and `client_key` go together; give both or neither",
                );
                return None;
            }
        };
        if let Some(name) = &t.server_name
            && rustls::pki_types::ServerName::try_from(name.get_ref().as_str()).is_err()
        {
            self.report(
                name.span(),
                &format!("{key}.server_name"),
                format!("{:?} is not a DNS name or IP address", name.get_ref()),
            );
            return None;
        }
        if !t.verify {
            tracing::warn!(
                key,
                "TLS verification of upstream certificates is OFF: any certificate is accepted"
            );
        }
        let settings = ClientSettings {
            server_name: t.server_name.as_ref().map(|n| n.get_ref().clone()),
            ca: t.ca.as_ref().map(|c| self.path(c.get_ref())),
            client_cert,
            verify: t.verify,
        };
        match ClientTls::load(settings) {
            Ok(tls) => Some(tls),
            Err(e) => {
                self.report(raw.span(), key, e.to_string());
                None
            }
        }
    }

    /// A list of networks in CIDR notation; a bare address is a single-host network.
    fn networks(&mut self, values: &[S<String>], key: &str) -> Option<Vec<IpNet>> {
        let mut all = Vec::new();
        let mut ok = true;
        for value in values {
            let text = value.get_ref();
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => all.push(net.trunc()),
                Err(_) => {
                    self.report(value.span(), key, format!("{text:?} is not a network; use CIDR notation like \"10.0.0.0/8\", \"192.168.1.7/32\" or \"2001:db8::/32\""));
                    ok = false;
                }
            }
        }
        ok.then_some(all)
    }

    fn socket_addr(&mut self, value: &S<String>, key: &str) -> Option<SocketAddr> {
        let parsed = value.get_ref().parse::<SocketAddr>().ok();
        if parsed.is_none() {
            self.report(
                value.span(),
                key,
                format!(
                    "{:?} is not an address; use ip:port, e.g. \"127.0.0.1:9900\"",
                    value.get_ref()
                ),
            );
        }
        parsed
    }

    /// A host name resolved once, to its first address (a check's `address`).
    fn upstream_addr(&mut self, value: &S<String>, key: &str) -> Option<SocketAddr> {
        let text = value.get_ref();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(addr);
        }
        let has_port = text
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !has_port {
            self.report(value.span(), key, format!("{text:?} is not an address; use ip:port or host:port, e.g. \"10.0.0.1:5432\" or \"db1.internal:5432\""));
            return None;
        }
        match text.to_socket_addrs().map(|mut addrs| addrs.next()) {
            Ok(Some(addr)) => Some(addr),
            Ok(None) => {
                self.report(
                    value.span(),
                    key,
                    format!("host of {text:?} resolved to no address"),
                );
                None
            }
            Err(e) => {
                self.report(value.span(), key, format!("cannot resolve {text:?}: {e}"));
                None
            }
        }
    }

    /// An upstream's address: an IP literal, or a host name for DNS discovery.
    fn upstream_target(&mut self, value: &S<String>, key: &str) -> Option<Target> {
        let text = value.get_ref();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(Target::Address(addr));
        }
        match crate::dns::Query::host(text) {
            Some(query) => Some(Target::Dns(query)),
            None => {
                self.report(value.span(), key, format!("{text:?} is not an address; use ip:port or host:port, e.g. \"10.0.0.1:5432\" or \"db1.internal:5432\""));
                None
            }
        }
    }

    fn srv_name(&mut self, value: &S<String>, key: &str) -> Option<Target> {
        let text = value.get_ref();
        let valid = !text.is_empty()
            && text.len() <= 253
            && text
                .split('.')
                .filter(|label| !label.is_empty())
                .all(|label| label.len() <= 63)
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            self.report(value.span(), key, format!("{text:?} is not an SRV name; use a DNS name such as \"_postgresql._tcp.db.service.consul\""));
            return None;
        }
        Some(Target::Dns(crate::dns::Query::Srv { name: text.clone() }))
    }

    /// DNS servers as `ip` (port 53) or `ip:port`.
    fn resolvers(&mut self, values: &[S<String>], key: &str) -> Option<Vec<SocketAddr>> {
        if values.len() > MAX_RESOLVERS {
            let span = values.first().map(|v| v.span()).unwrap_or_default();
            self.report(
                span,
                key,
                format!("at most {MAX_RESOLVERS} DNS servers per pool"),
            );
            return None;
        }
        let mut servers = Vec::new();
        let mut ok = true;
        for value in values {
            let text = value.get_ref();
            let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
                text.parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            match parsed {
                Some(server) => servers.push(server),
                None => {
                    self.report(value.span(), key, format!("{text:?} is not a DNS server address; use ip or ip:port, e.g. \"127.0.0.1:8600\""));
                    ok = false;
                }
            }
        }
        ok.then_some(servers)
    }

    fn bytes(&mut self, value: &S<String>, key: &str) -> Option<Vec<u8>> {
        // In a double-quoted TOML string, TOML itself decodes `\xD2` to the character
        // U+00D2, two bytes in UTF-8: the check would send the wrong bytes silently.
        let written = self.text.get(value.span()).unwrap_or_default();
        if written.starts_with('"')
            && !written.starts_with("\"\"\"")
            && let Some(escape) = high_hex_escape(written)
        {
            self.report(
                value.span(),
                key,
                format!("{escape} in a double-quoted string is decoded by TOML to a character (two bytes in UTF-8), not one byte; write the value in single quotes ('...') so that {escape} is the byte it says"),
            );
            return None;
        }
        match unescape(value.get_ref()) {
            Ok(bytes) => Some(bytes),
            Err(message) => {
                self.report(value.span(), key, message);
                None
            }
        }
    }
}

/// Whether binding the admin API on `admin` fails while a listener holds `bind`
/// (port 0 never collides: the kernel picks a free port). An unspecified address
/// (0.0.0.0, [::]) holds its port on every address of its family; the admin socket is a
/// plain one, so on [::] it is dual-stack (Linux's default) and holds IPv4 too, while
/// listeners set IPV6_V6ONLY.
fn sockets_collide(admin: SocketAddr, bind: SocketAddr) -> bool {
    if admin.port() == 0 || admin.port() != bind.port() {
        return false;
    }
    let (a, b) = (admin.ip(), bind.ip());
    a == b
        || (a.is_ipv4() == b.is_ipv4() && (a.is_unspecified() || b.is_unspecified()))
        || (a.is_ipv6() && a.is_unspecified() && b.is_ipv4())
}

/// Why a duration value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DurationError {
    /// Not a number with a unit at all.
    Unreadable,
    /// A duration, but outside the key's bounds (zero and overflowing values included).
    OutOfRange,
    /// A duration in range with a fraction of a second the key cannot express.
    Fractional,
}

/// A duration with a unit (`"250ms"`, `"2s"`, `"5m"`, `"1h"`) within `bounds`.
/// A byte count with a binary unit: `B`, `KiB` or `MiB`. `None` when unreadable or too
/// large to count.
fn read_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let scale = match unit.trim_start() {
        "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        _ => return None,
    };
    number.parse::<usize>().ok()?.checked_mul(scale)
}

fn read_duration(text: &str, bounds: Bounds) -> Result<Duration, DurationError> {
    let text = text.trim();
    if !text.ends_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(DurationError::Unreadable);
    }
    let d = match humantime::parse_duration(text) {
        Ok(d) => d,
        Err(humantime::DurationError::NumberOverflow) => return Err(DurationError::OutOfRange),
        Err(_) => return Err(DurationError::Unreadable),
    };
    if !(bounds.min..=bounds.max).contains(&d) {
        return Err(DurationError::OutOfRange);
    }
    if bounds.whole_seconds && d.subsec_nanos() != 0 {
        return Err(DurationError::Fractional);
    }
    Ok(d)
}

/// A duration with a unit within the widest bounds any key has (what `read_duration`
/// accepts for a timeout).
#[cfg(test)]
pub(crate) fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    read_duration(text, SPAN)
}

// === impl DurationError ===

impl DurationError {
    /// The problem with `text` for a key with `bounds`; `alternatives` lists the key's
    /// words allowed besides a duration, e.g. `"off" or `.
    fn message(self, text: &str, bounds: Bounds, alternatives: &str) -> String {
        let range = bounds.range();
        match self {
            DurationError::Unreadable if alternatives.is_empty() => format!(
                "{text:?} is not a duration; use a number with a unit, e.g. \"250ms\", \"2s\", \"5m\", \"1h\"; allowed: {range}"
            ),
            DurationError::Unreadable => format!(
                "{text:?} is not allowed; use {alternatives}a duration with a unit, e.g. \"250ms\", \"2s\", \"5m\", \"1h\"; allowed: {alternatives}{range}"
            ),
            DurationError::OutOfRange => {
                format!("{text:?} is out of range; allowed: {alternatives}{range}")
            }
            DurationError::Fractional => format!(
                "{text:?} is not a whole number of seconds, which the kernel needs here; allowed: {alternatives}{range}"
            ),
        }
    }
}

// === impl Bounds ===

impl Bounds {
    /// `"1ms to 24h"`, in units an operator can paste back into the file.
    fn range(&self) -> String {
        format!("{} to {}", shown(self.min), shown(self.max))
    }
}

/// `d` in the largest of h, m, s, ms that shows it exactly.
fn shown(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// The first `\xHH` escape at or above 0x80 in `written` (TOML source text), if any.
fn high_hex_escape(written: &str) -> Option<&str> {
    let bytes = written.as_bytes();
    let mut i = 0;
    while i + 3 < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes[i + 1] == b'x'
                && let Some(hex) = written.get(i + 2..i + 4)
                && u8::from_str_radix(hex, 16).is_ok_and(|b| b >= 0x80)
            {
                return written.get(i..i + 4);
            }
            // Skip the escaped character, so that `\\x80` is not read as an escape.
            i += 2;
            continue;
        }
        i += 1;
    }
    None
}

/// Decodes the escapes of health `send`/`expect`: `\r \n \t \\ \xNN`.
pub(crate) fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(b) if hex.len() == 2 => out.push(b),
                    _ => {
                        return Err(format!(
                            "\\x{hex} is not a valid escape; \\x takes two hex digits, e.g. \\x00"
                        ));
                    }
                }
            }
            other => {
                let shown = other.map(String::from).unwrap_or_default();
                return Err(format!(
                    "\\{shown} is not a valid escape; allowed: \\r \\n \\t \\\\ \\xNN"
                ));
            }
        }
    }
    Ok(out)
}

/// The entry (table key or array element) most deeply nested in `table` whose key or
/// value covers the start of `span`: where a serde error points. Every entry is
/// searched, since a table's own span need not cover its keys (a `[a.b]` header
/// and the keys under it are far apart, and `a` has no text of its own).
fn locate<'i>(table: &toml::de::DeTable<'i>, span: &Range<usize>) -> Vec<PathStep<'i>> {
    let mut best = Vec::new();
    let mut path = Vec::new();
    search_table(table, span.start, &mut path, &mut best);
    best
}

fn search_table<'i>(
    table: &toml::de::DeTable<'i>,
    offset: usize,
    path: &mut Vec<PathStep<'i>>,
    best: &mut Vec<PathStep<'i>>,
) {
    for (key, value) in table.iter() {
        path.push(PathStep::Key(key.clone()));
        if (covers(&key.span(), offset) || covers(&value.span(), offset)) && path.len() > best.len()
        {
            best.clone_from(path);
        }
        search_value(value.get_ref(), offset, path, best);
        path.pop();
    }
}

fn search_value<'i>(
    value: &toml::de::DeValue<'i>,
    offset: usize,
    path: &mut Vec<PathStep<'i>>,
    best: &mut Vec<PathStep<'i>>,
) {
    match value {
        toml::de::DeValue::Table(table) => search_table(table, offset, path, best),
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(PathStep::Index(i));
                if covers(&item.span(), offset) && path.len() > best.len() {
                    best.clone_from(path);
                }
                search_value(item.get_ref(), offset, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

fn covers(range: &Range<usize>, offset: usize) -> bool {
    range.start <= offset && offset < range.end.max(range.start + 1)
}

/// `pools.db.upstreams[1].weight`, as validation names keys.
/// `parts` joined by dots: a key path such as `pools.NAME.connect_timeout`. Every
/// setting of every pool gets one whether or not it is wrong, so without `format!`
/// (a 1,000-pool file spent a quarter of its reading time formatting key paths).
pub(super) fn dotted(parts: &[&str]) -> String {
    let mut path = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            path.push('.');
        }
        path.push_str(part);
    }
    path
}

fn key_path(steps: &[PathStep<'_>]) -> String {
    let mut path = String::new();
    for step in steps {
        match step {
            PathStep::Key(key) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key.get_ref());
            }
            PathStep::Index(i) => path.push_str(&format!("[{i}]")),
        }
    }
    path
}

/// Removes the entry `steps` leads to; false when it is not there.
fn remove<'i>(table: &mut toml::de::DeTable<'i>, steps: &[PathStep<'i>]) -> bool {
    let Some((PathStep::Key(key), rest)) = steps.split_first() else {
        return false;
    };
    if rest.is_empty() {
        return table.remove(key).is_some();
    }
    let Some(value) = table.get_mut(key) else {
        return false;
    };
    remove_in(value.get_mut(), rest)
}

fn remove_in<'i>(value: &mut toml::de::DeValue<'i>, steps: &[PathStep<'i>]) -> bool {
    match (value, steps.split_first()) {
        (toml::de::DeValue::Table(table), Some((PathStep::Key(_), _))) => remove(table, steps),
        (toml::de::DeValue::Array(items), Some((PathStep::Index(i), rest))) => {
            if rest.is_empty() {
                if *i >= items.len() {
                    return false;
                }
                let all = std::mem::replace(items, toml::de::DeArray::new());
                *items = all
                    .into_iter()
                    .enumerate()
                    .filter(|(j, _)| j != i)
                    .map(|(_, item)| item)
                    .collect();
                return true;
            }
            items
                .get_mut(*i)
                .is_some_and(|item| remove_in(item.get_mut(), rest))
        }
        _ => false,
    }
}

/// Why the admin token file cannot serve, if it cannot: `run` reads it at start and
/// on every write request.
fn token_problem(path: &Path) -> Result<(), String> {
    match super::read_bounded(path, super::MAX_SECRET_FILE) {
        Ok(text) if text.trim_ascii().is_empty() => Err(format!(
            "{} is empty; write the token on one line (e.g. head -c 24 /dev/urandom | base64 > {})",
            path.display(),
            path.display()
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "cannot read {}: {e}; create it with the token on one line (e.g. head -c 24 /dev/urandom | base64 > {})",
            path.display(),
            path.display()
        )),
    }
}
