//! Command line: parse, set up logging, load config, bind, run. No proxy logic here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use switchyard::config::{Config, LogFormat};
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
    Demo,
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
        Command::Demo => {
            init_logging(&cli, "error", LogFormat::Text);
            exit_code(switchyard::demo::main())
        }
        Command::Status { ref admin, json } => status(admin, json),
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
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    init_logging(cli, &config.log.level, config.log.format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime.worker_threads)
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
        let listening = match switchyard::bind_all(&config) {
            Ok(listening) => listening,
            Err(e) => {
                error!("{e}");
                return ExitCode::from(1);
            }
        };
        let shutdown = Shutdown::new();
        if let Err(e) = watch_signals(shutdown.clone()) {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::from(1);
        }
        info!(config = %config.source.display(), "switchyard started");
        match switchyard::run(config, listening, shutdown).await {
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
