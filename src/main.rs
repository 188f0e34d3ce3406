//! The `immich-guard` binary: the daemon (`run`) and its clients. anyhow lives here only.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use immich_guard::config::{self, Config, LogFormat};
use immich_guard::control::{Request, Response, client};
use immich_guard::{daemon, discover, docker, render};

#[derive(Parser)]
#[command(
    name = "immich-guard",
    version,
    about = "Keeps a self-hosted Immich stack safe through upgrades"
)]
struct Cli {
    /// Config file (TOML). Default: /etc/immich-guard/config.toml, if it exists.
    #[arg(long, global = true, env = "IMMICH_GUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Control socket to talk to (overrides control.socket).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (what the systemd unit starts).
    Run {
        /// Log format: text (journald-friendly) or json.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Find the Immich stack from Docker and print what was found.
    Discover {
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon what it is doing.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Take a snapshot of database and storage now; returns when it is sealed.
    Snapshot {
        /// A note stored with the snapshot.
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the sealed snapshots.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Let a frozen or held Immich server go. Without --force the snapshot is retried first
    /// and the server released only when it is sealed; a refused downgrade needs --force.
    Release {
        /// A service halted for crash-looping (e.g. immich-server): restore its restart
        /// policy and start it.
        service: Option<String>,
        /// Release without a snapshot (recorded and notified).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show the newest incident (crash loop), or the one named: diagnosis, decision, bundle.
    Incident {
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check the config file and print the effective settings.
    CheckConfig,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

fn main() -> ExitCode {
    immich_guard::memory::configure();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("immich-guard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let explicit = cli.config.is_some();
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_PATH));
    // A bad config stops everything before anything starts.
    let mut config = Config::load(&path, explicit)?;
    if let Some(socket) = cli.socket {
        config.control.socket = socket;
    }
    // The daemon mostly waits: two workers keep a start event answered while another task
    // blocks, whatever the core count (each thread costs a stack and malloc state); blocking
    // threads of a snapshot go soon after it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Run { log_format } => {
            if let Some(f) = log_format {
                config.daemon.log_format = match f {
                    LogFormatArg::Text => LogFormat::Text,
                    LogFormatArg::Json => LogFormat::Json,
                };
            }
            init_logging(&config);
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = %path.display(),
                config_found = path.exists(),
                "immich-guard starting"
            );
            runtime.block_on(daemon::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Discover { json } => runtime.block_on(discover_cmd(&config, json)),
        Command::Status { json } => runtime.block_on(status_cmd(&config, json)),
        Command::Snapshot { label, json } => runtime.block_on(snapshot_cmd(&config, label, json)),
        Command::List { json } => runtime.block_on(list_cmd(&config, json)),
        Command::Incident { id, json } => runtime.block_on(incident_cmd(&config, id, json)),
        Command::Release {
            service,
            force,
            json,
        } => runtime.block_on(release_cmd(&config, service, force, json)),
        Command::CheckConfig => {
            println!("{}: OK", path.display());
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IMMICH_GUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.daemon.log_level));
    // Colours only for a person at a terminal, never into journald or a log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.daemon.log_format {
        LogFormat::Json => builder.json().init(),
        // journald stamps every line itself; a second timestamp is noise there.
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            builder.without_time().init()
        }
        LogFormat::Text => builder.init(),
    }
}

async fn discover_cmd(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let host = docker::engine_host(config.docker.host.as_deref());
    let docker = docker::connect(&host).await?;
    let stack = discover::discover(&docker, &host, config).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stack)?);
    } else {
        print!("{}", render::stack(&stack));
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon's final answer, or its error as ours.
fn expect<T>(response: Response, pick: impl FnOnce(Response) -> Option<T>) -> anyhow::Result<T> {
    match response {
        Response::Error { message } => bail!("{message}"),
        other => {
            let text = format!("{other:?}");
            pick(other).with_context(|| format!("unexpected answer from the daemon: {text}"))
        }
    }
}

async fn status_cmd(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let response = client::request(&config.control.socket, &Request::Status {}).await?;
    let report = expect(response, |r| match r {
        Response::Status(report) => Some(report),
        _ => None,
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render::status(&report));
    }
    Ok(ExitCode::SUCCESS)
}

async fn snapshot_cmd(
    config: &Config,
    label: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // A bar over the snapshot's steps for a person at a terminal; plain lines for logs and
    // scripts.
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(immich_guard::snapshot::STEPS);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{bar:24}] {pos}/{len} {wide_msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    let request = Request::Snapshot { label };
    let response =
        client::request_with_progress(&config.control.socket, &request, |line| match &bar {
            Some(bar) => {
                bar.set_position((bar.position() + 1).min(immich_guard::snapshot::STEPS));
                bar.set_message(line.to_string());
            }
            None => eprintln!("{line}"),
        })
        .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let meta = expect(response?, |r| match r {
        Response::Snapshot(meta) => Some(meta),
        _ => None,
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&meta)?);
    } else {
        println!("sealed snapshot {}", meta.id);
        print!("{}", render::snapshots(std::slice::from_ref(&meta)));
    }
    Ok(ExitCode::SUCCESS)
}

async fn incident_cmd(config: &Config, id: Option<String>, json: bool) -> anyhow::Result<ExitCode> {
    let response = client::request(&config.control.socket, &Request::Incidents { id }).await?;
    let incidents = expect(response, |r| match r {
        Response::Incidents { incidents } => Some(incidents),
        _ => None,
    })?;
    let Some(incident) = incidents.last() else {
        println!("no incidents");
        return Ok(ExitCode::SUCCESS);
    };
    if json {
        println!("{}", serde_json::to_string_pretty(incident)?);
    } else {
        print!("{}", render::incident(incident));
    }
    Ok(ExitCode::SUCCESS)
}

async fn release_cmd(
    config: &Config,
    service: Option<String>,
    force: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let request = Request::Release { force, service };
    let response = client::request(&config.control.socket, &request).await?;
    let message = expect(response, |r| match r {
        Response::Released { message } => Some(message),
        _ => None,
    })?;
    if json {
        println!("{}", serde_json::json!({ "released": message }));
    } else {
        println!("{message}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn list_cmd(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let response = client::request(&config.control.socket, &Request::List {}).await?;
    let snapshots = expect(response, |r| match r {
        Response::List { snapshots } => Some(snapshots),
        _ => None,
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshots)?);
    } else {
        print!("{}", render::snapshots(&snapshots));
    }
    Ok(ExitCode::SUCCESS)
}
