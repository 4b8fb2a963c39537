use std::path::Path;
use std::time::Duration;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("t.toml"))
}

fn problems(text: &str) -> Vec<Problem> {
    match parse(text) {
        Err(ConfigError::Invalid { problems }) => problems,
        other => panic!("expected invalid config, got {other:?}"),
    }
}

const MINIMAL: &str = r#"
[listeners.db]
bind = "127.0.0.1:5432"
pool = "pg"

[pools.pg]
upstreams = [{ address = "127.0.0.1:6000" }, { address = "127.0.0.1:6001", priority = 1, weight = 3, name = "dr" }]
"#;

#[test]
fn every_shipped_config_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files = vec![root.join("switchyard.toml")];
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        files.push(entry.unwrap().path());
    }
    for file in files {
        // No private keys or admin tokens ship, so an example terminating TLS or with
        // a token cannot load here; the CLI tests check it beside generated files.
        let text = std::fs::read_to_string(&file).unwrap();
        if text
            .lines()
            .any(|l| l.starts_with("[listeners.") && l.trim_end().ends_with(".tls]"))
            || text.lines().any(|l| l.starts_with("token_file"))
        {
            continue;
        }
        if let Err(e) = Config::load(&file) {
            panic!("{} does not parse:\n{e}", file.display());
        }
    }
}

#[test]
fn defaults_follow_the_spec() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.runtime.shutdown_grace, Duration::from_secs(30));
    assert!(config.runtime.worker_threads >= 1);
    assert_eq!(config.runtime.scheduler, Scheduler::PerThread);
    assert_eq!(config.runtime.pid_file, None);
    assert_eq!(config.log.level, "info");
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.admin, None);
    let l = &config.listeners[0];
    assert_eq!(l.max_connections, None);
    assert_eq!(l.backlog, 1024);
    let p = &config.pools[0];
    assert_eq!(p.balance, Balance::RoundRobin);
    assert_eq!(p.connect_timeout, Duration::from_secs(2));
    assert_eq!(p.connect_attempts, 3);
    assert_eq!(p.hedge_after, None);
    assert_eq!(p.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(p.failback, Failback::Immediate);
    assert_eq!(p.on_upstream_down, OnUpstreamDown::Close);
    assert_eq!(p.drain_after_failback, None);
    assert_eq!(p.slow_start, None);
    assert_eq!(p.min_usable, 1);
    assert_eq!(p.when_all_down, WhenAllDown::TryAll);
    assert_eq!(p.tcp_keepalive, Some(Duration::from_secs(60)));
    let h = &p.health;
    assert!(h.enabled);
    assert_eq!(
        (h.interval, h.fast_interval, h.timeout, h.rise, h.fall),
        (
            Duration::from_secs(2),
            Duration::from_millis(250),
            Duration::from_secs(1),
            2,
            3
        )
    );
    assert_eq!(
        (&h.kind, &h.target),
        (&CheckKind::Tcp, &CheckTarget::Upstream)
    );
    let o = &p.outlier;
    assert_eq!(
        (o.consecutive_failures, o.base_ejection, o.max_ejection),
        (3, Duration::from_secs(10), Duration::from_secs(300))
    );
    assert_eq!(p.upstreams[1].weight, 3);
    assert_eq!(p.upstreams[1].label(), "dr");
    assert_eq!(p.upstreams[0].label(), "127.0.0.1:6000");
    assert_eq!(p.priorities(), vec![0, 1]);
}

#[test]
fn choices_and_durations_are_typed() {
    let text = MINIMAL.replace(
        "[pools.pg]",
        "[pools.pg]\nbalance = \"source_hash\"\nfailback = \"90s\"\nhedge_after = \"50ms\"\nidle_timeout = \"off\"\ntcp_keepalive = \"off\"\nwhen_all_down = \"reject\"\non_upstream_down = \"keep\"\nslow_start = \"2s\"",
    );
    let config = parse(&text).unwrap();
    let p = &config.pools[0];
    assert_eq!(p.balance, Balance::SourceHash);
    assert_eq!(p.failback, Failback::After(Duration::from_secs(90)));
    assert_eq!(p.hedge_after, Some(Duration::from_millis(50)));
    assert_eq!(p.idle_timeout, None);
    assert_eq!(p.tcp_keepalive, None);
    assert_eq!(p.when_all_down, WhenAllDown::Reject);
    assert_eq!(p.on_upstream_down, OnUpstreamDown::Keep);
    assert_eq!(p.slow_start, Some(Duration::from_secs(2)));
    assert!(config.summary().contains("\n  slow_start 2s\n"));
}

#[test]
fn the_scheduler_is_a_word_and_anything_else_is_reported_where_it_stands() {
    let with =
        |value: &str| format!("[runtime]\nworker_threads = 3\nscheduler = {value}\n{MINIMAL}");
    let config = parse(&with("\"per_thread\"")).unwrap();
    assert_eq!(config.runtime.scheduler, Scheduler::PerThread);
    assert_eq!(
        config.runtime.worker_threads, 3,
        "its meaning is the same in both"
    );
    assert!(
        config
            .summary()
            .contains("runtime: worker_threads 3, scheduler per_thread, ")
    );
    assert_eq!(
        parse(&with("\"shared\"")).unwrap().runtime.scheduler,
        Scheduler::Shared
    );
    let allowed = "use one of: shared, per_thread";
    let long = format!("\"{}\"", "per_thread".repeat(10_000));
    for hostile in [
        "\"per-thread\"",
        "\"PER_THREAD\"",
        "\" shared\"",
        "\"\"",
        "\"shared\\u0000\"",
        long.as_str(),
    ] {
        let problem = only_problem(&with(hostile));
        assert!(
            problem.starts_with("3:13 runtime.scheduler: ") && problem.ends_with(allowed),
            "{hostile}: {problem}"
        );
    }
    // Not a string at all: serde's type error, still at the key.
    for wrong_type in ["1", "true", "[\"shared\"]", "{ kind = \"shared\" }"] {
        let found = problems(&with(wrong_type));
        assert_eq!(found.len(), 1, "{wrong_type}: {found:#?}");
        assert_eq!(
            (found[0].line, found[0].key.as_str()),
            (3, "runtime.scheduler"),
            "{wrong_type}: {found:#?}"
        );
    }
}

#[test]
fn bind_accepts_a_list_including_ipv6() {
    let text = MINIMAL.replace(
        "bind = \"127.0.0.1:5432\"",
        "bind = [\"127.0.0.1:5432\", \"[::1]:5432\"]",
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.listeners[0].binds.len(), 2);
    assert!(config.listeners[0].binds[1].is_ipv6());
}

#[test]
fn all_problems_are_reported_at_once_in_file_order() {
    let text = r#"
[listeners.db]
bind = "nowhere"
pool = "missing"

[pools.pg]
connect_timeout = "fast"
connect_attempts = 0
upstreams = [{ address = "127.0.0.1:1", weight = 0 }]
"#;
    let found = problems(text);
    let summary: Vec<(usize, usize, &str)> = found
        .iter()
        .map(|p| (p.line, p.column, p.key.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (3, 8, "listeners.db.bind"),
            (4, 8, "listeners.db.pool"),
            (7, 19, "pools.pg.connect_timeout"),
            (8, 20, "pools.pg.connect_attempts"),
            (9, 50, "pools.pg.upstreams.weight"),
        ]
    );
    let message = parse(text).unwrap_err().to_string();
    assert!(
        message.starts_with("t.toml:3:8: listeners.db.bind: \"nowhere\" is not a bind address"),
        "{message}"
    );
    assert!(message.contains("allowed: 1 to 16"), "{message}");
}

#[test]
fn unknown_keys_are_errors_with_their_name_and_line() {
    let found = problems(&MINIMAL.replace("pool = \"pg\"", "pool = \"pg\"\nmax_conns = 5"));
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].line, found[0].column), (5, 1));
    assert!(
        found[0].message.contains("unknown field `max_conns`"),
        "{}",
        found[0].message
    );
    assert!(
        found[0].message.contains("`max_connections`"),
        "lists what is allowed"
    );

    let found = problems("[logging]\nlevel = \"info\"\n");
    assert!(
        found
            .iter()
            .any(|p| p.key == "logging" && p.message.contains("unknown field `logging`")),
        "{found:?}"
    );
}

#[test]
fn semantic_rules() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[pools.pg]",
            "[pools.pg]\nfailback = \"sometimes\"",
            "use \"immediate\", \"manual\" or a duration",
        ),
        (
            "[pools.pg]",
            "[pools.pg]\nbalance = \"fastest\"",
            "use one of: round_robin, least_connections, random_two, source_hash",
        ),
        (
            "[pools.pg]",
            "[pools.pg]\nmin_usable = 0",
            "0 is out of range; allowed: 1 to 1024",
        ),
        (
            "[pools.pg]",
            "[pools.pg]\nidle_timeout = \"0s\"",
            "\"0s\" is out of range; allowed: \"off\" or 1ms to 24h",
        ),
        (
            "[pools.pg]",
            "[pools.pg]\nhealth = { fall = 0 }",
            "pools.pg.health.fall",
        ),
        (
            "[pools.pg]",
            "[pools.pg]\nhealth = { send = '\\q' }",
            "\\q is not a valid escape",
        ),
        (
            "[pools.pg]",
            "[pools.pg]\noutlier = { base_ejection = \"1m\", max_ejection = \"10s\" }",
            "must be at least base_ejection (1m)",
        ),
        (
            "6000\" }",
            "6001\" }",
            "127.0.0.1:6001 appears twice in this pool",
        ),
        ("name = \"dr\"", "name = \"d r\"", "is not a valid name"),
        (
            "[listeners.db]",
            "[listeners.\"d b\"]",
            "is not a valid name",
        ),
        (
            "\"127.0.0.1:6000\"",
            "\"127.0.0.1:99999\"",
            "is not an address",
        ),
    ];
    for (from, to, expected) in cases {
        let text = MINIMAL.replace(from, to);
        let found = problems(&text);
        assert!(
            found.iter().any(|p| p.to_string().contains(expected)),
            "{to}: expected {expected:?} in {found:#?}"
        );
    }
}

#[test]
fn no_listener_is_an_error() {
    let found = problems("[pools.pg]\nupstreams = [{ address = \"127.0.0.1:1\" }]\n");
    assert!(found[0].message.contains("no listener is defined"));
}

#[test]
fn host_names_are_resolved_at_load() {
    let config = parse(&MINIMAL.replace("127.0.0.1:6000", "localhost:6000")).unwrap();
    let pool = &config.pools[0];
    // One address family per name: localhost has an A record, so its AAAA (::1) is
    // not a second upstream.
    let found: Vec<_> = pool
        .upstreams
        .iter()
        .filter(|u| u.target == "localhost:6000")
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].address, "127.0.0.1:6000".parse().unwrap());
    assert_eq!(found[0].label(), "localhost:6000@127.0.0.1");
}

#[test]
fn dns_members_are_labelled_by_name_and_address_and_never_with_a_slash() {
    use crate::dns::{Answer, Query, Record};
    let entry = |query: Query, target: &str, name: Option<&str>| DnsEntry {
        query,
        target: target.to_string(),
        name: name.map(str::to_string),
        priority: 0,
        weight: 1,
    };
    let host = Query::Host {
        host: "db.service.consul".to_string(),
        port: 5432,
    };
    let srv = Query::Srv {
        name: "_pg._tcp.dr.service.consul".to_string(),
    };
    let addresses = Answer {
        records: ["10.0.0.3:5432", "[fd00::3]:5432"]
            .iter()
            .map(|a| {
                let address: std::net::SocketAddr = a.parse().unwrap();
                Record {
                    address,
                    label: address.ip().to_string(),
                    weight: None,
                }
            })
            .collect(),
        ttl: Duration::from_secs(30),
    };
    let targets = Answer {
        records: vec![Record {
            address: "10.0.1.7:5433".parse().unwrap(),
            label: "pg1.node.consul:5433".to_string(),
            weight: Some(0),
        }],
        ttl: Duration::from_secs(30),
    };
    let labels = |entry: DnsEntry, answer: &Answer| -> Vec<String> {
        entry
            .members(answer)
            .iter()
            .map(|m| m.label().to_string())
            .collect()
    };
    let cases = [
        (
            labels(
                entry(host.clone(), "db.service.consul:5432", None),
                &addresses,
            ),
            vec![
                "db.service.consul:5432@10.0.0.3",
                "db.service.consul:5432@fd00::3",
            ],
        ),
        (
            labels(
                entry(host, "db.service.consul:5432", Some("dr-site")),
                &addresses,
            ),
            vec!["dr-site@10.0.0.3", "dr-site@fd00::3"],
        ),
        (
            labels(
                entry(srv.clone(), "_pg._tcp.dr.service.consul", None),
                &targets,
            ),
            vec!["pg1.node.consul:5433"],
        ),
        (
            labels(
                entry(srv, "_pg._tcp.dr.service.consul", Some("dr-site")),
                &targets,
            ),
            vec!["dr-site@pg1.node.consul:5433"],
        ),
    ];
    for (found, want) in cases {
        assert_eq!(found, want);
        assert!(found.iter().all(|l| !l.contains('/')), "{found:?}");
    }
}

#[test]
fn escapes_decode_to_bytes() {
    use super::validate::unescape;
    assert_eq!(unescape(r"PING\r\n").unwrap(), b"PING\r\n");
    assert_eq!(
        unescape(r"\x00\xff\t\\").unwrap(),
        vec![0, 0xff, b'\t', b'\\']
    );
    assert!(unescape(r"\x0").is_err());
    assert!(unescape(r"\xzz").is_err());
    assert!(unescape("trailing\\").is_err());
}

#[test]
fn durations_need_a_unit_and_must_be_positive() {
    use super::validate::{DurationError, parse_duration};
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("5"), Err(DurationError::Unreadable));
    assert_eq!(parse_duration("-1s"), Err(DurationError::Unreadable));
    assert_eq!(parse_duration("0s"), Err(DurationError::OutOfRange));
    assert_eq!(
        parse_duration("300000000000y"),
        Err(DurationError::OutOfRange),
        "parses, but far beyond a day"
    );
    assert_eq!(
        parse_duration("99999999999999999999y"),
        Err(DurationError::OutOfRange),
        "too large even to parse"
    );
}

/// Each duration key at its bounds. `(key, table, min, below, max, above)`.
const DURATION_BOUNDS: &[(&str, &str, &str, &str, &str, &str)] = &[
    (
        "shutdown_grace",
        "[runtime]",
        "1ms",
        "999us",
        "24h",
        "86401s",
    ),
    (
        "handshake_timeout",
        "[listeners.db]",
        "10ms",
        "9ms",
        "24h",
        "86401s",
    ),
    (
        "connect_timeout",
        "[pools.pg]",
        "1ms",
        "999us",
        "24h",
        "86401s",
    ),
    ("hedge_after", "[pools.pg]", "1ms", "999us", "24h", "86401s"),
    (
        "idle_timeout",
        "[pools.pg]",
        "1ms",
        "999us",
        "24h",
        "86401s",
    ),
    ("failback", "[pools.pg]", "1ms", "999us", "24h", "86401s"),
    (
        "drain_after_failback",
        "[pools.pg]",
        "1ms",
        "999us",
        "24h",
        "86401s",
    ),
    ("slow_start", "[pools.pg]", "1ms", "999us", "24h", "86401s"),
    (
        "tcp_keepalive",
        "[pools.pg]",
        "1s",
        "999ms",
        "32767s",
        "32768s",
    ),
    (
        "interval",
        "[pools.pg.health]",
        "10ms",
        "9ms",
        "24h",
        "86401s",
    ),
    (
        "fast_interval",
        "[pools.pg.health]",
        "10ms",
        "9ms",
        "24h",
        "86401s",
    ),
    (
        "timeout",
        "[pools.pg.health]",
        "1ms",
        "999us",
        "24h",
        "86401s",
    ),
    (
        "base_ejection",
        "[pools.pg.outlier]",
        "1ms",
        "999us",
        "24h",
        "86401s",
    ),
    (
        "max_ejection",
        "[pools.pg.outlier]",
        "1ms",
        "999us",
        "24h",
        "86401s",
    ),
];

/// MINIMAL with `key = "value"` under `table` (a table header MINIMAL has, or one
/// appended), so that the value sits on a known line.
fn with_duration(table: &str, key: &str, value: &str) -> String {
    let line = format!("{key} = \"{value}\"");
    // base_ejection must not exceed max_ejection: move the other one out of the way.
    let partner = match key {
        "base_ejection" => "\nmax_ejection = \"24h\"",
        "max_ejection" => "\nbase_ejection = \"1ms\"",
        _ => "",
    };
    if MINIMAL.contains(table) {
        MINIMAL.replacen(table, &format!("{table}\n{line}{partner}"), 1)
    } else {
        format!("{MINIMAL}\n{table}\n{line}{partner}\n")
    }
}

#[test]
fn every_duration_key_is_accepted_at_its_bounds_and_rejected_beyond() {
    for (key, table, min, below, max, above) in DURATION_BOUNDS {
        for value in [min, max] {
            if let Err(e) = parse(&with_duration(table, key, value)) {
                panic!("{key} = {value:?} must be accepted:\n{e}");
            }
        }
        let range = format!("allowed: {}{min} to {max}", alternatives(key));
        for value in [below, above, &"300000000000y"] {
            let found = problems(&with_duration(table, key, value));
            assert_eq!(found.len(), 1, "{key} = {value:?}: {found:#?}");
            let p = &found[0];
            assert!(p.key.ends_with(&format!(".{key}")), "{p}");
            assert_eq!(p.column, key.len() + 4, "{p}: column of the value");
            assert!(
                p.message
                    .starts_with(&format!("\"{value}\" is out of range; {range}")),
                "{p}"
            );
        }
    }
}

fn alternatives(key: &str) -> &'static str {
    match key {
        "failback" => "\"immediate\", \"manual\" or ",
        "hedge_after"
        | "idle_timeout"
        | "drain_after_failback"
        | "tcp_keepalive"
        | "slow_start" => "\"off\" or ",
        _ => "",
    }
}

#[test]
fn keepalive_takes_whole_seconds() {
    let found = problems(&with_duration("[pools.pg]", "tcp_keepalive", "1500ms"));
    assert!(
        found[0]
            .message
            .contains("is not a whole number of seconds"),
        "{}",
        found[0]
    );
    let config = parse(&with_duration("[pools.pg]", "tcp_keepalive", "2m")).unwrap();
    assert_eq!(
        config.pools[0].tcp_keepalive,
        Some(Duration::from_secs(120))
    );
}

#[test]
fn admin_listen_must_not_collide_with_a_listener_bind() {
    let collide = [
        ("127.0.0.1:5432", "127.0.0.1:5432"),
        ("0.0.0.0:5432", "127.0.0.1:5432"),
        ("127.0.0.1:5432", "0.0.0.0:5432"),
        ("[::1]:5432", "[::]:5432"),
        ("[::]:5432", "[::1]:5432"),
        // The admin socket is dual-stack on [::].
        ("[::]:5432", "127.0.0.1:5432"),
    ];
    for (admin, bind) in collide {
        let text = format!(
            "[admin]\nlisten = \"{admin}\"\n{}",
            MINIMAL.replace("127.0.0.1:5432", bind)
        );
        // A wildcard admin address also needs a token: that is the other problem.
        let found: Vec<Problem> = problems(&text)
            .into_iter()
            .filter(|p| !p.message.contains("needs a token_file"))
            .collect();
        assert_eq!(found.len(), 1, "{admin} vs {bind}: {found:#?}");
        assert_eq!(
            (found[0].line, found[0].column, found[0].key.as_str()),
            (2, 10, "admin.listen")
        );
        assert!(
            found[0].message.contains(&format!(
                "{admin} collides with bind {bind} of listener \"db\""
            )),
            "{}",
            found[0]
        );
    }
    let apart = [
        ("127.0.0.1:9900", "127.0.0.1:5432"),
        ("127.0.0.2:5432", "127.0.0.1:5432"),
        ("127.0.0.1:5432", "[::]:5432"),
        ("127.0.0.1:0", "127.0.0.1:0"),
    ];
    for (admin, bind) in apart {
        let text = format!(
            "[admin]\nlisten = \"{admin}\"\n{}",
            MINIMAL.replace("127.0.0.1:5432", bind)
        );
        if let Err(e) = parse(&text) {
            panic!("{admin} vs {bind} must be accepted:\n{e}");
        }
    }
}

#[test]
fn duplicate_upstreams_are_reported_beside_their_other_problems() {
    let text = MINIMAL.replace(
        "upstreams = [",
        "upstreams = [{ address = \"127.0.0.1:6000\", weight = 0, name = \"dr\" }, ",
    );
    let found = problems(&text);
    let mut messages: Vec<String> = found.iter().map(ToString::to_string).collect();
    messages.sort();
    assert_eq!(found.len(), 3, "{messages:#?}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains("weight: 0 is out of range")),
        "{messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("127.0.0.1:6000 appears twice in this pool")),
        "{messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("upstream name \"dr\" appears twice in this pool")),
        "{messages:#?}"
    );
}

#[test]
fn unknown_keys_and_wrong_types_are_reported_together_with_value_errors() {
    let text = r#"
[runtime]
worker_thread = 2

[listeners.db]
bind = "127.0.0.1:5432"
pool = "pg"
max_conections = 5

[pools.pg]
connect_timeout = 2
upstreams = [{ adress = "127.0.0.1:6000" }, { address = "127.0.0.1:6001", weight = "heavy" }]

[pools.pg.health]
fall = 0
"#;
    let found: Vec<(usize, usize, String)> = problems(text)
        .into_iter()
        .map(|p| (p.line, p.column, p.key))
        .collect();
    assert_eq!(
        found,
        vec![
            (3, 1, "runtime.worker_thread".to_string()),
            (8, 1, "listeners.db.max_conections".to_string()),
            (11, 19, "pools.pg.connect_timeout".to_string()),
            (12, 16, "pools.pg.upstreams[0].adress".to_string()),
            (12, 84, "pools.pg.upstreams[1].weight".to_string()),
            (15, 8, "pools.pg.health.fall".to_string()),
        ]
    );
}

#[test]
fn a_syntax_error_is_reported_alone_with_its_position() {
    let found = problems("[listeners.db\nbind = 1\n");
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].line, found[0].column), (1, 14));
}

#[test]
fn the_admin_token_file_must_be_readable_and_not_empty() {
    let dir = std::env::temp_dir().join(format!("switchyard-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let with_token = |file: &str| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:9900\"\ntoken_file = \"{}\"\n{MINIMAL}",
            dir.join(file).display()
        )
    };
    let found = problems(&with_token("missing"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].line, found[0].key.as_str()),
        (3, "admin.token_file")
    );
    assert!(found[0].message.contains("cannot read"), "{}", found[0]);
    std::fs::write(dir.join("empty"), "\n").unwrap();
    assert!(
        problems(&with_token("empty"))[0]
            .message
            .contains("is empty")
    );
    std::fs::write(dir.join("good"), "s3cret\n").unwrap();
    assert!(parse(&with_token("good")).is_ok());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_non_loopback_admin_api_needs_a_token() {
    for listen in ["0.0.0.0:9900", "10.1.2.3:9900", "[::]:9900"] {
        let found = problems(&format!("[admin]\nlisten = \"{listen}\"\n{MINIMAL}"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "admin.listen");
        assert!(found[0].message.contains("needs a token_file"));
    }
    for listen in ["127.0.0.1:9900", "[::1]:9900"] {
        assert!(parse(&format!("[admin]\nlisten = \"{listen}\"\n{MINIMAL}")).is_ok());
    }
}

#[test]
fn manual_failback_without_an_admin_api_could_never_fail_back() {
    let manual = MINIMAL.replace("[pools.pg]", "[pools.pg]\nfailback = \"manual\"");
    let found = problems(&manual);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].key, "pools.pg.failback");
    assert!(found[0].message.contains("needs the admin API"));
    assert!(parse(&format!("[admin]\nlisten = \"127.0.0.1:9900\"\n{manual}")).is_ok());
}

#[test]
fn a_certificate_name_given_to_two_certificates_is_an_error() {
    let text = MINIMAL.replace(
        "pool = \"pg\"\n",
        "pool = \"pg\"\n[listeners.db.tls]\ncerts = [\n  { cert = \"a.pem\", key = \"a.key\", names = [\"db.example.com\"] },\n  { cert = \"b.pem\", key = \"b.key\", names = [\"DB.example.com\"] },\n]\n",
    );
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].key, "listeners.db.tls.certs.names");
    assert!(
        found[0].message.contains("listed for two certificates"),
        "{}",
        found[0]
    );
}

#[test]
fn a_high_hex_escape_in_a_double_quoted_check_string_is_an_error() {
    let with_send = |send: &str| MINIMAL.to_string() + "\n[pools.pg.health]\nsend = " + send + "\n";
    let found = problems(&with_send(r#""\x00\x04\xd2\x16""#));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].key, "pools.pg.health.send");
    assert!(found[0].message.contains("single quotes"), "{}", found[0]);
    // Single quotes keep the escape for the check; low escapes are one byte either way.
    let config = parse(&with_send(r"'\x00\x04\xd2\x16'")).unwrap();
    assert!(matches!(
        &config.pools[0].health.kind,
        CheckKind::SendExpect { send, .. } if send == &[0x00, 0x04, 0xd2, 0x16]
    ));
    assert!(parse(&with_send(r#""PING\r\n\x00""#)).is_ok());
}

fn with_health(lines: &str) -> String {
    MINIMAL.to_string() + "\n[pools.pg.health]\n" + lines + "\n"
}

/// The one problem of `text`, as `line:column key: message`.
fn only_problem(text: &str) -> String {
    let found = problems(text);
    assert_eq!(found.len(), 1, "{found:#?}");
    let p = &found[0];
    format!("{}:{} {}: {}", p.line, p.column, p.key, p.message)
}

#[test]
fn check_kinds_take_their_defaults() {
    let kind = |lines: &str| {
        parse(&with_health(lines)).unwrap().pools[0]
            .health
            .kind
            .clone()
    };
    assert_eq!(kind(""), CheckKind::Tcp);
    assert_eq!(kind("send = \"\"\nexpect = \"\""), CheckKind::Tcp);
    assert_eq!(
        kind("expect = \"+OK\""),
        CheckKind::SendExpect {
            send: Vec::new(),
            expect: b"+OK".to_vec()
        }
    );
    assert_eq!(
        kind("kind = \"http\""),
        CheckKind::Http(HttpCheck {
            method: HttpMethod::Get,
            path: "/".to_string(),
            host: None,
            status: vec![200..=299],
            body_contains: Vec::new(),
        })
    );
    assert_eq!(
        kind("kind = \"postgres\""),
        CheckKind::Postgres(PostgresCheck {
            user: "switchyard".to_string(),
            database: "postgres".to_string(),
            role: PostgresRole::Any,
            password: None,
        })
    );
    assert_eq!(
        kind("kind = \"redis\""),
        CheckKind::Redis(RedisCheck {
            password: None,
            role: RedisRole::Any
        })
    );
    assert_eq!(kind("kind = \"mysql\""), CheckKind::Mysql);
    let http = kind(
        "kind = \"http\"\nmethod = \"HEAD\"\npath = \"/primary\"\nstatus = [\"200\", \"301-302\"]",
    );
    let CheckKind::Http(http) = http else {
        panic!("{http:?}")
    };
    assert_eq!(
        (http.method, http.path.as_str(), http.status),
        (HttpMethod::Head, "/primary", vec![200..=200, 301..=302])
    );
}

#[test]
fn check_targets_are_a_port_or_an_address_not_both() {
    let target = |lines: &str| {
        parse(&with_health(lines)).unwrap().pools[0]
            .health
            .target
            .clone()
    };
    assert_eq!(target("port = 0"), CheckTarget::Upstream);
    assert_eq!(target("port = 8008"), CheckTarget::Port(8008));
    assert_eq!(target("address = \"\""), CheckTarget::Upstream);
    // Both at their defaults, as config/switchyard.toml lists them.
    assert_eq!(target("port = 0\naddress = \"\""), CheckTarget::Upstream);
    assert_eq!(
        target("port = 8008\naddress = \"\""),
        CheckTarget::Port(8008)
    );
    assert_eq!(
        target("address = \"127.0.0.1:8008\""),
        CheckTarget::Address {
            address: "127.0.0.1:8008".parse().unwrap(),
            target: "127.0.0.1:8008".to_string()
        }
    );
    let resolved = CheckTarget::Port(8008).resolve("10.0.0.1:5432".parse().unwrap(), "db1:5432");
    assert_eq!(
        resolved,
        ("10.0.0.1:8008".parse().unwrap(), "db1:8008".to_string())
    );
    assert_eq!(
        only_problem(&with_health("port = 8008\naddress = \"127.0.0.1:8008\"")),
        "10:8 pools.pg.health.port: give `port` (the upstream's host on another port) or `address` (another host:port), not both"
    );
    assert_eq!(
        only_problem(&with_health("port = 65536")),
        "10:8 pools.pg.health.port: 65536 is out of range; allowed: 0 to 65535"
    );
    assert!(only_problem(&with_health("address = \"nowhere\"")).contains("is not an address"));
}

#[test]
fn check_kind_errors_name_what_is_allowed() {
    assert_eq!(
        only_problem(&with_health("kind = \"pgsql\"")),
        "10:8 pools.pg.health.kind: \"pgsql\" is not allowed; use one of: tcp, send_expect, http, postgres, redis, mysql"
    );
    assert_eq!(
        only_problem(&with_health("kind = \"tcp\"\npath = \"/primary\"")),
        "11:8 pools.pg.health.path: `path` is a setting of kind = \"http\", and this check is kind = \"tcp\""
    );
    assert_eq!(
        only_problem(&with_health("kind = \"mysql\"\nrole = \"master\"")),
        "11:8 pools.pg.health.role: `role` is a setting of kind = \"postgres\" or \"redis\", and this check is kind = \"mysql\""
    );
    assert!(only_problem(&with_health("kind = \"send_expect\"")).contains("needs `send`"),);
    assert_eq!(
        only_problem(&with_health("kind = \"http\"\nmethod = \"DELETE\"")),
        "11:10 pools.pg.health.method: \"DELETE\" is not allowed; use one of: GET, HEAD, OPTIONS"
    );
    for path in ["\"primary\"", "\"/a b\"", "\"/a\\r\\nX: y\""] {
        let problem = only_problem(&with_health(&format!("kind = \"http\"\npath = {path}")));
        assert!(problem.contains("is not a request path"), "{problem}");
    }
    let long = format!("kind = \"http\"\npath = \"/{}\"", "a".repeat(1024));
    assert!(only_problem(&with_health(&long)).contains("at most 1024"));
    for status in ["[]", "[\"2xx\"]", "[\"99\"]", "[\"600\"]", "[\"300-200\"]"] {
        let problem = only_problem(&with_health(&format!("kind = \"http\"\nstatus = {status}")));
        assert!(problem.contains("pools.pg.health.status"), "{problem}");
    }
    assert!(
        only_problem(&with_health(
            "kind = \"http\"\nmethod = \"HEAD\"\nbody_contains = \"x\""
        ))
        .contains("HEAD request gets no body")
    );
    let long = format!("kind = \"http\"\nbody_contains = \"{}\"", "a".repeat(1025));
    assert!(only_problem(&with_health(&long)).contains("at most 1024"));
    assert_eq!(
        only_problem(&with_health("kind = \"redis\"\nrole = \"primary\"")),
        "11:8 pools.pg.health.role: \"primary\" is not allowed; use one of: any, master, replica"
    );
    assert!(
        only_problem(&with_health("kind = \"postgres\"\nuser = \"\""))
            .contains("not a PostgreSQL name")
    );
}

#[test]
fn a_postgres_role_needs_a_login() {
    assert_eq!(
        only_problem(&with_health("kind = \"postgres\"\nrole = \"primary\"")),
        "11:8 pools.pg.health.role: role = \"primary\" logs in to ask pg_is_in_recovery() and no login is configured: set `user` to a role that may connect to database \"postgres\" (and `password_file`, unless pg_hba.conf trusts it from this host)"
    );
    assert!(
        parse(&with_health(
            "kind = \"postgres\"\nrole = \"standby\"\nuser = \"monitor\""
        ))
        .is_ok()
    );
    assert!(parse(&with_health("kind = \"postgres\"\nrole = \"any\"")).is_ok());
}

#[test]
fn password_files_are_read_at_load_and_never_printed() {
    let dir =
        std::env::temp_dir().join(format!("switchyard-config-password-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pw");
    std::fs::write(&file, "hunter2\r\nsecond line ignored\n").unwrap();
    let lines = format!(
        "kind = \"redis\"\npassword_file = {:?}",
        file.display().to_string()
    );
    let config = parse(&with_health(&lines)).unwrap();
    let CheckKind::Redis(redis) = &config.pools[0].health.kind else {
        panic!()
    };
    let password = redis.password.as_ref().unwrap();
    assert_eq!(password.expose(), b"hunter2");
    assert!(!format!("{config:?}").contains("hunter2"));
    assert!(!config.summary().contains("hunter2"));
    std::fs::write(&file, "\n").unwrap();
    assert!(only_problem(&with_health(&lines)).contains("empty first line"));
    let missing = lines.replace("pw\"", "absent\"");
    assert!(only_problem(&with_health(&missing)).contains("cannot read"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_summary_prints_the_effective_check() {
    let summary = |lines: &str| parse(&with_health(lines)).unwrap().summary();
    assert!(summary("").contains("  check: tcp (the connect alone), at the upstream\n"));
    assert!(
        summary("kind = \"http\"\nport = 8008\npath = \"/primary\"").contains(
            "  check: http, GET /primary, host (the check target), status [200-299], body_contains \"\", at port 8008\n"
        ),
        "{}",
        summary("kind = \"http\"\nport = 8008\npath = \"/primary\"")
    );
    assert!(summary("kind = \"postgres\"\nuser = \"monitor\"\nrole = \"standby\"").contains(
        "  check: postgres, user monitor, database postgres, role standby, password_file none, at the upstream\n"
    ));
    assert!(
        summary("kind = \"redis\"\nrole = \"master\"")
            .contains("  check: redis, role master, password_file none")
    );
    assert!(
        summary("send = \"PING\\r\\n\"\nexpect = \"+PONG\"")
            .contains("  check: send_expect, send \"PING\\r\\n\", expect \"+PONG\"")
    );
}
