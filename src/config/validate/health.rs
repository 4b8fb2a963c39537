//! `[pools.x.health]`: timing, the check target and each check kind's own keys.

use std::ops::{Range, RangeInclusive};

use super::super::health::{
    CheckKind, CheckTarget, HealthConfig, HttpCheck, HttpMethod, Password, PostgresCheck,
    PostgresRole, RedisCheck, RedisRole,
};
use super::super::raw::{RawHealth, RawPool, S};
use super::{CHECK_INTERVAL, SPAN, Validator};

/// Longest HTTP check path: a request line the proxy writes on every check.
pub const MAX_HTTP_PATH: usize = 1024;
/// Longest HTTP `Host` value: a DNS name with a port.
pub const MAX_HTTP_HOST: usize = 261;
/// Longest `body_contains`: it must fit in the part of the body a check reads.
pub const MAX_BODY_CONTAINS: usize = 1024;
/// Most entries in `status`.
const MAX_STATUS_RANGES: usize = 32;
/// PostgreSQL truncates identifiers to 63 bytes (NAMEDATALEN - 1).
const MAX_PG_NAME: usize = 63;

/// Which kinds a kind-specific key belongs to.
const KEY_KINDS: &[(&str, &[&str])] = &[
    ("send", &["send_expect"]),
    ("expect", &["send_expect"]),
    ("method", &["http"]),
    ("path", &["http"]),
    ("host", &["http"]),
    ("status", &["http"]),
    ("body_contains", &["http"]),
    ("user", &["postgres"]),
    ("database", &["postgres"]),
    ("role", &["postgres", "redis"]),
    ("password_file", &["postgres", "redis"]),
];

impl Validator<'_> {
    pub(super) fn health(&mut self, pool: &str, p: &RawPool) -> Option<HealthConfig> {
        let key = |field: &str| super::dotted(&["pools", pool, "health", field]);
        let h = &p.health;
        let interval = self.duration(&h.interval, &key("interval"), CHECK_INTERVAL);
        let fast_interval = self.duration(&h.fast_interval, &key("fast_interval"), CHECK_INTERVAL);
        let timeout = self.duration(&h.timeout, &key("timeout"), SPAN);
        let rise = self.int(&h.rise, &key("rise"), 1, 1000);
        let fall = self.int(&h.fall, &key("fall"), 1, 1000);
        let target = self.check_target(h, &key);
        let kind = self.check_kind(h, &key);
        Some(HealthConfig {
            enabled: h.enabled,
            interval: interval?,
            fast_interval: fast_interval?,
            timeout: timeout?,
            rise: rise? as u32,
            fall: fall? as u32,
            target: target?,
            kind: kind?,
        })
    }

    fn check_target(&mut self, h: &RawHealth, key: &dyn Fn(&str) -> String) -> Option<CheckTarget> {
        // Written at their defaults (as the reference config lists every key), neither
        // names a target.
        let port = h.port.as_ref().filter(|p| *p.get_ref() != 0);
        let address = h.address.as_ref().filter(|a| !a.get_ref().is_empty());
        match (port, address) {
            (Some(port), Some(_)) => {
                self.report(
                    port.span(),
                    &key("port"),
                    "give `port` (the upstream's host on another port) or `address` (another host:port), not both",
                );
                None
            }
            (Some(port), None) => match self.int(port, &key("port"), 0, 65535)? {
                0 => Some(CheckTarget::Upstream),
                port => Some(CheckTarget::Port(port as u16)),
            },
            (None, Some(address)) => {
                let resolved = self.upstream_addr(address, &key("address"))?;
                Some(CheckTarget::Address {
                    address: resolved,
                    target: address.get_ref().clone(),
                })
            }
            (None, None) => Some(CheckTarget::Upstream),
        }
    }

    fn check_kind(&mut self, h: &RawHealth, key: &dyn Fn(&str) -> String) -> Option<CheckKind> {
        let kind = match &h.kind {
            Some(kind) => self.choice(kind, &key("kind"), CheckKind::WORDS)?,
            None if written(&h.send) || written(&h.expect) => "send_expect",
            None => "tcp",
        };
        let mut misplaced = false;
        for (name, span) in given_kind_keys(h) {
            let kinds = KEY_KINDS
                .iter()
                .find(|(k, _)| *k == name)
                .map_or(&[][..], |(_, kinds)| *kinds);
            if !kinds.contains(&kind) {
                let owners: Vec<String> = kinds.iter().map(|k| format!("\"{k}\"")).collect();
                self.report(
                    span,
                    &key(name),
                    format!(
                        "`{name}` is a setting of kind = {}, and this check is kind = \"{kind}\"",
                        owners.join(" or ")
                    ),
                );
                misplaced = true;
            }
        }
        let checked = match kind {
            "tcp" => Some(CheckKind::Tcp),
            "send_expect" => self.send_expect(h, key),
            "http" => self.http(h, key).map(CheckKind::Http),
            "postgres" => self.postgres(h, key).map(CheckKind::Postgres),
            "redis" => self.redis(h, key).map(CheckKind::Redis),
            _ => Some(CheckKind::Mysql),
        };
        if misplaced { None } else { checked }
    }

    fn send_expect(&mut self, h: &RawHealth, key: &dyn Fn(&str) -> String) -> Option<CheckKind> {
        let send = match &h.send {
            Some(send) => self.bytes(send, &key("send")),
            None => Some(Vec::new()),
        };
        let expect = match &h.expect {
            Some(expect) => self.bytes(expect, &key("expect")),
            None => Some(Vec::new()),
        };
        let (send, expect) = (send?, expect?);
        if send.is_empty() && expect.is_empty() {
            let span = h.kind.as_ref().map_or(0..0, |k| k.span());
            self.report(
                span,
                &key("kind"),
                "kind = \"send_expect\" needs `send` (bytes to send), `expect` (the reply's first bytes) or both; to check the connect alone, use kind = \"tcp\"",
            );
            return None;
        }
        Some(CheckKind::SendExpect { send, expect })
    }

    fn http(&mut self, h: &RawHealth, key: &dyn Fn(&str) -> String) -> Option<HttpCheck> {
        let method = match &h.method {
            Some(method) => self.word(method, &key("method"), HttpMethod::WORDS),
            None => Some(HttpMethod::Get),
        };
        let path = match &h.path {
            None => Some("/".to_string()),
            Some(path) => {
                let text = path.get_ref();
                let ok = text.starts_with('/')
                    && text.len() <= MAX_HTTP_PATH
                    && text.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    self.report(
                        path.span(),
                        &key("path"),
                        format!("{text:?} is not a request path; it starts with '/', has at most {MAX_HTTP_PATH} characters and no spaces or control characters (percent-encode them), e.g. \"/primary\""),
                    );
                }
                ok.then(|| text.clone())
            }
        };
        let host = match &h.host {
            None => Some(None),
            Some(host) if host.get_ref().is_empty() => Some(None),
            Some(host) => {
                let text = host.get_ref();
                let ok = text.len() <= MAX_HTTP_HOST && text.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    self.report(
                        host.span(),
                        &key("host"),
                        format!("{text:?} is not a Host header value; use a host name with an optional port, at most {MAX_HTTP_HOST} characters, e.g. \"db1.internal:8008\""),
                    );
                }
                ok.then(|| Some(text.clone()))
            }
        };
        let status = match &h.status {
            None => Some(vec![200..=299]),
            Some(list) => self.status_ranges(list, &key("status")),
        };
        let body_contains = match &h.body_contains {
            None => Some(Vec::new()),
            Some(body) => {
                let bytes = body.get_ref().as_bytes().to_vec();
                if bytes.len() > MAX_BODY_CONTAINS {
                    self.report(
                        body.span(),
                        &key("body_contains"),
                        format!(
                            "{} bytes is too long; at most {MAX_BODY_CONTAINS}",
                            bytes.len()
                        ),
                    );
                    None
                } else {
                    Some(bytes)
                }
            }
        };
        let (method, body_contains) = (method?, body_contains?);
        if method == HttpMethod::Head
            && !body_contains.is_empty()
            && let Some(body) = &h.body_contains
        {
            self.report(
                body.span(),
                &key("body_contains"),
                "a HEAD request gets no body to search; use method = \"GET\"",
            );
            return None;
        }
        Some(HttpCheck {
            method,
            path: path?,
            host: host?,
            status: status?,
            body_contains,
        })
    }

    fn status_ranges(
        &mut self,
        list: &S<Vec<S<String>>>,
        key: &str,
    ) -> Option<Vec<RangeInclusive<u16>>> {
        if list.get_ref().is_empty() || list.get_ref().len() > MAX_STATUS_RANGES {
            self.report(
                list.span(),
                key,
                format!("give 1 to {MAX_STATUS_RANGES} statuses or ranges, e.g. [\"200-299\"] or [\"200\", \"301-302\"]"),
            );
            return None;
        }
        let mut ranges = Vec::new();
        let mut ok = true;
        for entry in list.get_ref() {
            match status_range(entry.get_ref()) {
                Some(range) => ranges.push(range),
                None => {
                    self.report(
                        entry.span(),
                        key,
                        format!("{:?} is not a status or range; use a status from 100 to 599 (\"200\") or a range of them (\"200-299\")", entry.get_ref()),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(ranges)
    }

    fn postgres(&mut self, h: &RawHealth, key: &dyn Fn(&str) -> String) -> Option<PostgresCheck> {
        let user = self.pg_name(h.user.as_ref(), "switchyard", &key("user"));
        let database = self.pg_name(h.database.as_ref(), "postgres", &key("database"));
        let role = match &h.role {
            Some(role) => self.word(role, &key("role"), PostgresRole::WORDS),
            None => Some(PostgresRole::Any),
        };
        let password = self.password(h.password_file.as_ref(), &key("password_file"));
        let (role, user, database) = (role?, user?, database?);
        if role != PostgresRole::Any
            && h.user.is_none()
            && let Some(written) = &h.role
        {
            self.report(
                written.span(),
                &key("role"),
                format!("role = \"{role}\" logs in to ask pg_is_in_recovery() and no login is configured: set `user` to a role that may connect to database \"{database}\" (and `password_file`, unless pg_hba.conf trusts it from this host)"),
            );
            return None;
        }
        Some(PostgresCheck {
            user,
            database,
            role,
            password: password?,
        })
    }

    fn pg_name(&mut self, value: Option<&S<String>>, default: &str, key: &str) -> Option<String> {
        let Some(value) = value else {
            return Some(default.to_string());
        };
        let text = value.get_ref();
        if text.is_empty() || text.len() > MAX_PG_NAME || text.contains('\0') {
            self.report(
                value.span(),
                key,
                format!(
                    "{text:?} is not a PostgreSQL name; give 1 to {MAX_PG_NAME} bytes without NUL"
                ),
            );
            return None;
        }
        Some(text.clone())
    }

    fn redis(&mut self, h: &RawHealth, key: &dyn Fn(&str) -> String) -> Option<RedisCheck> {
        let role = match &h.role {
            Some(role) => self.word(role, &key("role"), RedisRole::WORDS),
            None => Some(RedisRole::Any),
        };
        let password = self.password(h.password_file.as_ref(), &key("password_file"));
        Some(RedisCheck {
            password: password?,
            role: role?,
        })
    }

    /// The password in `password_file`, read now: `check` fails on a file `run` could
    /// not read.
    fn password(&mut self, file: Option<&S<String>>, key: &str) -> Option<Option<Password>> {
        let Some(file) = file.filter(|f| !f.get_ref().is_empty()) else {
            return Some(None);
        };
        let path = self.path(file.get_ref());
        let problem = match super::super::read_bounded(&path, super::super::MAX_SECRET_FILE) {
            Ok(contents) => match Password::from_file(path.clone(), &contents) {
                Some(password) => return Some(Some(password)),
                None => format!(
                    "{} has an empty first line; write the password on it",
                    path.display()
                ),
            },
            Err(e) => format!(
                "cannot read {}: {e}; write the password on its first line",
                path.display()
            ),
        };
        self.report(file.span(), key, problem);
        None
    }
}

/// Whether a text key is given a value; `""` is every text key's default.
fn written(value: &Option<S<String>>) -> bool {
    value.as_ref().is_some_and(|v| !v.get_ref().is_empty())
}

/// The kind-specific keys written in the file, with their positions.
fn given_kind_keys(h: &RawHealth) -> Vec<(&'static str, Range<usize>)> {
    let text = |name, value: &Option<S<String>>| {
        value
            .as_ref()
            .filter(|v| !v.get_ref().is_empty())
            .map(|v| (name, v.span()))
    };
    [
        text("send", &h.send),
        text("expect", &h.expect),
        text("method", &h.method),
        text("path", &h.path),
        text("host", &h.host),
        h.status.as_ref().map(|v| ("status", v.span())),
        text("body_contains", &h.body_contains),
        text("user", &h.user),
        text("database", &h.database),
        text("role", &h.role),
        text("password_file", &h.password_file),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// `"200"` or `"200-299"`, statuses from 100 to 599.
fn status_range(text: &str) -> Option<RangeInclusive<u16>> {
    let status = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|n| (100..=599).contains(n))
    };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (status(low)?, status(high)?),
        None => {
            let one = status(text)?;
            (one, one)
        }
    };
    (low <= high).then_some(low..=high)
}
