//! Command line: parse, set up logging, load config, bind, run. No proxy logic here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use switchyard::config::{Config, LogFormat, Scheduler};
use switchyard::shutdown::Shutdown;

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SWITCHYARD_GIT_COMMIT"), ")"),
    about = "A TCP proxy with built-in failover"
)]
struct Cli {
    /// Log output format (overrides the config's log.format).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Log level (error, warn, info, debug, trace, off) or comma-separated
    /// target=level directives, e.g. "info,switchyard::health=debug" (overrides RUST_LOG
    /// and the config's log.level).
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The configuration file.
        #[arg(short = 'c', long = "config", default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print what it sets up (exit 0 means `run` starts).
    Check {
        /// The configuration file.
        #[arg(short = 'c', long = "config", default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
    /// Ask a running instance's admin API for its pools and upstreams.
    Status {
        /// The admin API's address (host:port).
        #[arg(long, default_value = "127.0.0.1:9900")]
        admin: String,
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Self-contained failover demonstration on loopback.
    Demo {
        /// Fail back with a slow start of this long (e.g. "2s"): the demo then shows the
        /// primary's share of new clients growing through the ramp.
        #[arg(long, value_parser = humantime::parse_duration)]
        slow_start: Option<std::time::Duration>,
    },
    /// Failover drill against a live instance: probe traffic through the pool's listener
    /// while its active tier is taken out, held out, restored and failed back; exit 1
    /// when an objective is missed.
    Drill(Box<DrillArgs>),
}

#[derive(Debug, clap::Args)]
struct DrillArgs {
    /// The admin API's address (host:port).
    #[arg(long, default_value = "127.0.0.1:9900")]
    admin: String,
    /// The pool to drill.
    #[arg(long)]
    pool: String,
    /// A file holding the admin API's bearer token (needed for its writes).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where probes connect; default: the first listener of the pool.
    #[arg(long)]
    through: Option<std::net::SocketAddr>,
    /// How the active tier is taken out: maint or drain on its upstreams through the
    /// admin API, or --fault-cmd (undone by --restore-cmd).
    #[arg(long, value_enum, default_value = "maint")]
    fault: FaultArg,
    /// The fault command (run with sh -c), e.g. "systemctl stop postgresql".
    #[arg(long)]
    fault_cmd: Option<String>,
    /// The command that undoes --fault-cmd.
    #[arg(long)]
    restore_cmd: Option<String>,
    /// New probe connections per second, e.g. 200/s.
    #[arg(long, default_value = "200/s", value_parser = parse_rate)]
    rate: u32,
    /// tcp: served when the proxy keeps the connection open; send_expect: --send, and
    /// the reply must start with --expect.
    #[arg(long, value_enum, default_value = "tcp")]
    probe: ProbeArg,
    /// Bytes a send_expect probe sends (escapes \r \n \t \\ \xNN).
    #[arg(long, default_value = "")]
    send: String,
    /// What the reply must start with (same escapes; empty: any byte).
    #[arg(long, default_value = "")]
    expect: String,
    /// How long the tier stays out.
    #[arg(long, default_value = "10s", value_parser = parse_drill_duration)]
    hold: std::time::Duration,
    /// How long to wait for the failback after the restore.
    #[arg(long, default_value = "60s", value_parser = parse_drill_duration)]
    failback_limit: std::time::Duration,
    /// Objective: at most this many failed probes.
    #[arg(long)]
    max_failed: Option<usize>,
    /// Objective: the active tier switches within this, e.g. 1s.
    #[arg(long, value_parser = parse_drill_duration)]
    max_switch: Option<std::time::Duration>,
    /// Objective: the failback completes within this after the restore, e.g. 5s.
    #[arg(long, value_parser = parse_drill_duration)]
    max_failback: Option<std::time::Duration>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FaultArg {
    Maint,
    Drain,
    Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProbeArg {
    Tcp,
    SendExpect,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = log_filter_text(&cli).and_then(|text| parse_log_filter(&text)) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Check { ref config } => check(config),
        Command::Run { ref config } => run(&cli, config),
        Command::Demo { slow_start } => {
            init_logging(&cli, "error", LogFormat::Text);
            exit_code(switchyard::demo::main(slow_start))
        }
        Command::Status { ref admin, json } => status(admin, json),
        Command::Drill(ref args) => drill(args),
    }
}

/// How long a `tcp` probe must stay open to count as served.
const TCP_PROBE_SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

fn drill(args: &DrillArgs) -> ExitCode {
    use switchyard::drill::Probe;
    use switchyard::drill::exercise::{self, DrillError, Fault, Objectives, Options};
    let usage = |message: String| {
        eprintln!("error: {message}");
        ExitCode::from(2)
    };
    let fault = match (args.fault, &args.fault_cmd, &args.restore_cmd) {
        (FaultArg::Command, Some(fault), Some(restore)) => Fault::Command {
            fault: fault.clone(),
            restore: restore.clone(),
        },
        (FaultArg::Command, _, _) => {
            return usage(
                "--fault command needs --fault-cmd and --restore-cmd (the drill must be able to undo its fault)".to_string(),
            );
        }
        (_, Some(_), _) | (_, _, Some(_)) => {
            return usage("--fault-cmd and --restore-cmd go with --fault command".to_string());
        }
        (FaultArg::Maint, None, None) => Fault::Maint,
        (FaultArg::Drain, None, None) => Fault::Drain,
    };
    let probe = match args.probe {
        ProbeArg::Tcp if !args.send.is_empty() || !args.expect.is_empty() => {
            return usage("--send and --expect go with --probe send_expect".to_string());
        }
        ProbeArg::Tcp => Probe::Tcp {
            settle: TCP_PROBE_SETTLE,
        },
        ProbeArg::SendExpect => match Probe::send_expect(&args.send, &args.expect) {
            Ok(probe) => probe,
            Err(e) => return usage(e),
        },
    };
    let token = match &args.token_file {
        None => None,
        Some(path) => match switchyard::admin::read_token(path) {
            Ok(token) => Some(token),
            Err(e) => return usage(format!("--token-file {}: {e}", path.display())),
        },
    };
    let options = Options {
        admin: args.admin.clone(),
        pool: args.pool.clone(),
        token,
        through: args.through,
        fault,
        rate: args.rate,
        probe,
        hold: args.hold,
        failback_limit: args.failback_limit,
        objectives: Objectives {
            max_failed: args.max_failed,
            max_switch: args.max_switch,
            max_failback: args.max_failback,
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(exercise::run(&options, interrupted()));
    let report = match outcome {
        Ok(report) => report,
        Err(DrillError::Refused(why)) => {
            eprintln!("error: {why}");
            return ExitCode::from(1);
        }
        Err(DrillError::Failed { message, report }) => {
            print_out(report.render().trim_end());
            write_drill_json(args, &report);
            eprintln!("error: the drill did not complete: {message}");
            return ExitCode::from(1);
        }
    };
    print_out(report.render().trim_end());
    write_drill_json(args, &report);
    let missed = report.missed();
    if missed.is_empty() {
        return ExitCode::SUCCESS;
    }
    for o in missed {
        eprintln!(
            "objective {} missed: limit {}, measured {}",
            o.name, o.limit, o.measured
        );
    }
    ExitCode::from(1)
}

fn write_drill_json(args: &DrillArgs, report: &switchyard::drill::exercise::Report) {
    if let Some(path) = &args.json
        && let Err(e) = switchyard::drill::exercise::write_json(report, path)
    {
        eprintln!("error: {e}");
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn parse_rate(text: &str) -> Result<u32, String> {
    let number = text.trim().trim_end_matches("/s");
    match number.parse::<u32>() {
        Ok(rate @ 1..=10_000) => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a rate; use new connections per second from 1 to 10000, e.g. 200/s"
        )),
    }
}

fn parse_drill_duration(text: &str) -> Result<std::time::Duration, String> {
    let limit = std::time::Duration::from_secs(24 * 3600);
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d <= limit => Ok(d),
        Ok(_) => Err(format!("{text:?} is longer than 24h")),
        Err(_) => Err(format!(
            "{text:?} is not a duration; use a number with a unit, e.g. 500ms, 10s, 1m"
        )),
    }
}

fn status(admin: &str, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let (code, body) = match runtime.block_on(switchyard::admin::get(admin, "/status")) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if code != 200 {
        eprintln!(
            "error: the admin API at {admin} answered {code}: {}",
            body.trim()
        );
        return ExitCode::from(1);
    }
    if json {
        print_out(&body);
        return ExitCode::SUCCESS;
    }
    match serde_json::from_str::<switchyard::status::StatusView>(&body) {
        Ok(view) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            print_out(view.render(now).trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: the admin API at {admin} sent a status this version cannot read: {e}"
            );
            ExitCode::from(1)
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            print_out(config.summary().trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli, path: &Path) -> ExitCode {
    switchyard::shutdown::ignore_hangup_until_handled();
    switchyard::upgrade::ignore_upgrade_until_handled();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    init_logging(cli, &config.log.level, config.log.format);
    // Started by a binary upgrade: the previous process hands over its sockets.
    let mut inherited = match switchyard::upgrade::inherit() {
        Ok(inherited) => inherited,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(1);
        }
    };
    // With per-thread runtimes the connections have threads of their own; this runtime
    // keeps the controller, health checks, admin API and signals, for which one thread
    // is plenty.
    let main_threads = match config.runtime.scheduler {
        Scheduler::Shared => config.runtime.worker_threads,
        Scheduler::PerThread => 1,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(main_threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let sockets = match inherited.as_mut().map(|i| i.take_sockets()).transpose() {
            Ok(sockets) => sockets.unwrap_or_default(),
            Err(e) => {
                error!(error = %e, "the sockets the previous process handed over are not usable");
                return ExitCode::from(1);
            }
        };
        let mut listening = match switchyard::Listening::bind(&config, sockets) {
            Ok(listening) => listening,
            Err(e) => {
                error!("{e}");
                return ExitCode::from(1);
            }
        };
        if let Some(inherited) = inherited.as_mut() {
            listening.health = std::mem::take(&mut inherited.health);
        }
        // Held until `run` returns: dropping it removes the file (while it is still ours).
        let _pid_file = match &config.runtime.pid_file {
            None => None,
            Some(path) => match switchyard::upgrade::PidFile::write(path) {
                Ok(pid_file) => Some(pid_file),
                Err(e) => {
                    error!(path = %path.display(), error = %e, "cannot write the pid file (runtime.pid_file)");
                    return ExitCode::from(1);
                }
            },
        };
        let shutdown = Shutdown::new();
        if let Err(e) = watch_signals(shutdown.clone()) {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::from(1);
        }
        info!(config = %config.source.display(), "switchyard started");
        match switchyard::run(config, listening, shutdown, inherited).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e}");
                ExitCode::from(1)
            }
        }
    })
}

/// The first SIGTERM/SIGINT begins a graceful shutdown; a second one means "now": the
/// process exits at once, closing whatever is still open (SIGHUP, reload, is
/// `switchyard::run`'s).
fn watch_signals(shutdown: Shutdown) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM received"),
            _ = interrupt.recv() => info!("SIGINT received"),
        }
        shutdown.begin();
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        warn!(
            open = shutdown.open_connections(),
            "second stop signal: exiting now without waiting for open connections"
        );
        std::process::exit(1);
    });
    Ok(())
}

/// The log filter asked for on the command line or in RUST_LOG, if any.
fn log_filter_text(cli: &Cli) -> Result<String, String> {
    if let Some(level) = &cli.log_level {
        return Ok(level.clone());
    }
    match std::env::var("RUST_LOG") {
        Ok(env) => Ok(env),
        Err(std::env::VarError::NotPresent) => Ok(String::new()),
        Err(std::env::VarError::NotUnicode(_)) => Err("RUST_LOG is not valid UTF-8".into()),
    }
}

const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// A level, or comma-separated `target=level` directives. Stricter than `EnvFilter`,
/// which reads an unknown word such as "verbose" as a target name and silently logs
/// nothing useful: a typo must be a usage error, as it is in the config file.
fn parse_log_filter(text: &str) -> Result<Option<EnvFilter>, String> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "unknown log level {level:?} in {text:?}; use one of {} or target=level directives such as \"info,switchyard::health=debug\"",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::try_new(text)
        .map(Some)
        .map_err(|e| format!("invalid log filter {text:?}: {e}"))
}

fn init_logging(cli: &Cli, config_level: &str, config_format: LogFormat) {
    // Validated in `main`; the config's level was validated with the config.
    let filter = log_filter_text(cli)
        .ok()
        .and_then(|text| parse_log_filter(&text).ok().flatten())
        .unwrap_or_else(|| EnvFilter::new(config_level));
    let json = match cli.log_format {
        Some(LogFormatArg::Json) => true,
        Some(LogFormatArg::Text) => false,
        None => config_format == LogFormat::Json,
    };
    // Colour codes only for a person at a terminal: in a file or a journal they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder
            .fmt_fields(switchyard::log_format::JsonSpanFields)
            .event_format(switchyard::log_format::JsonLines)
            .init();
    } else {
        builder.init();
    }
}

fn exit_code(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Prints to stdout; a closed pipe (`| head`) is the reader's choice, not an error.
fn print_out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}");
}
