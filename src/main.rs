//! The `immich-guard` binary: the daemon (`run`) and its clients. anyhow lives here only.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use immich_guard::config::{self, Config, LogFormat};
use immich_guard::control::client::{self, ClientError};
use immich_guard::control::{Request, Response};
use immich_guard::progress::Progress;
use immich_guard::snapshot::store::{Meta, Store};
use immich_guard::{daemon, discover, docker, incident, pin, render, restore};

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
    /// Restore drill: replay a snapshot's dump (the newest without ID) into a scratch
    /// database from the live database's image, compare migrations and counts, check its
    /// originals; the result is recorded in its meta.json. Through the daemon when it runs,
    /// else here. Exits non-zero when the drill fails.
    Drill {
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the sealed snapshots (read from the snapshot dir when the daemon is down).
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
    /// Acknowledge a DEGRADED stack (the verify after an upgrade failed): `status` stops
    /// showing it. Nothing is changed on the stack; a later passing verify clears it as well.
    Ack {
        #[arg(long)]
        json: bool,
    },
    /// Show the newest incident (crash loop), or the one named: diagnosis, decision, bundle.
    /// Read from the data dir when the daemon is down.
    Incident {
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check that the stack is whole: containers, ping, version, counts, originals, markers,
    /// schema. Runs here, not in the daemon (it must work while the daemon is down). Exits
    /// non-zero when a check fails.
    Verify {
        /// Compare with this snapshot (default: the newest of the running version, if any).
        #[arg(long)]
        against: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Pin the Immich version compose runs (IMMICH_VERSION in .env, or the image: tags):
    /// a rollback without a restore. Refused when the database holds migrations the version
    /// never had (judged from the snapshots); runs here, not in the daemon.
    Pin {
        version: String,
        /// Print what would change and the judgement; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Pin even when refused or not judgeable (recorded in the data dir's pins.jsonl).
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Immich's documented upgrade constraints as immich-guard checks them (the table this
    /// build carries): from, to, what must hold, hold or warn, the source, the way through.
    Paths {
        #[arg(long)]
        json: bool,
    },
    /// Diagnose logs collected without the daemon (before it was installed, or from another
    /// machine) with the engine incidents use: `docker compose logs | immich-guard diagnose -`,
    /// or `--logs FILE [--service NAME]` (repeatable; the Nth --service names the Nth file when
    /// it is one container's `docker logs`). Needs neither the daemon nor Docker.
    Diagnose {
        /// `-`: read standard input.
        input: Option<String>,
        /// A log file (`-` for standard input): `docker compose logs` output or one
        /// container's log.
        #[arg(long = "logs", value_name = "FILE")]
        logs: Vec<PathBuf>,
        /// The service of the --logs file in the same position (default: the file's name).
        #[arg(long = "service", value_name = "NAME")]
        services: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Bring the stack back to a sealed snapshot: keep the current state (a pre-restore
    /// snapshot), stop the stack, restore database and storage, pin the snapshot's version,
    /// start, verify. Resumable: after an interruption, run the same command again. Done by
    /// the daemon when it runs (its protection stands back for the restore's own steps), else
    /// here.
    Restore {
        #[arg(required_unless_present = "abandon")]
        snapshot: Option<String>,
        /// End an unfinished restore without finishing it: says what state the stack is in,
        /// then records it in the restore history and turns protection back on. Touches no
        /// data.
        #[arg(long, conflicts_with_all = ["snapshot", "dry_run", "no_preserve", "force"])]
        abandon: bool,
        /// Print every step; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Do not keep the current state first (needs --yes; recorded).
        #[arg(long)]
        no_preserve: bool,
        /// Stored files whose content no longer matches the snapshot's content hashes are
        /// left as they are (and listed) instead of refusing the whole restore.
        #[arg(long)]
        force: bool,
    },
    /// Check the config file as `run` would (also the paths, the socket's group and the
    /// Docker host on this machine) and print the effective settings.
    CheckConfig,
    /// Record the content hashes of a sealed snapshot now (the daemon does it after each
    /// seal, in the background): every stored file read and its SHA-256 written beside the
    /// manifest, for restore and `verify --against`. Without an id: every snapshot that has
    /// none yet, newest first. Resumes an interrupted pass.
    Hash { snapshot: Option<String> },
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
    // Before any thread or file exists: the daemon's files are its owner's alone.
    if matches!(cli.command, Command::Run { .. }) {
        immich_guard::owner_only::restrict_umask();
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
            for warning in config.check_environment(&path)? {
                tracing::warn!("{warning}");
            }
            runtime.block_on(daemon::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Discover { json } => runtime.block_on(discover_cmd(&config, json)),
        Command::Status { json } => runtime.block_on(status_cmd(&config, json)),
        Command::Snapshot { label, json } => runtime.block_on(snapshot_cmd(&config, label, json)),
        Command::List { json } => runtime.block_on(list_cmd(&config, json)),
        Command::Drill { id, json } => runtime.block_on(drill_cmd(&config, id, json)),
        Command::Incident { id, json } => runtime.block_on(incident_cmd(&config, id, json)),
        Command::Release {
            service,
            force,
            json,
        } => runtime.block_on(release_cmd(&config, service, force, json)),
        Command::Ack { json } => runtime.block_on(ack_cmd(&config, json)),
        Command::Verify { against, json } => runtime.block_on(verify_cmd(&config, against, json)),
        Command::Pin {
            version,
            dry_run,
            force,
            yes,
            json,
        } => runtime.block_on(pin_cmd(
            &config,
            &version,
            PinFlags {
                dry_run,
                force,
                yes,
                json,
            },
        )),
        Command::Diagnose {
            input,
            logs,
            services,
            json,
        } => diagnose_cmd(input, logs, services, json),
        Command::Paths { json } => {
            let rows = immich_guard::paths::table();
            if json {
                println!("{}", serde_json::to_string_pretty(rows)?);
            } else {
                print!("{}", immich_guard::paths::render(rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            abandon: true, yes, ..
        } => runtime.block_on(abandon_cmd(&config, yes)),
        Command::Restore {
            snapshot,
            dry_run,
            yes,
            no_preserve,
            force,
            ..
        } => runtime.block_on(restore_cmd(
            &config,
            &snapshot.unwrap_or_default(),
            dry_run,
            yes,
            restore::Options { no_preserve, force },
        )),
        Command::Hash { snapshot } => hash_cmd(&config, snapshot.as_deref()),
        Command::CheckConfig => {
            for warning in config.check_environment(&path)? {
                eprintln!("immich-guard: warning: {warning}");
            }
            println!("{}: OK", path.display());
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Per-target levels (`info`, `immich_guard=debug,bollard=warn`): a `Targets` filter parses
    // them without the regex engine an `EnvFilter` links in (its code would stay resident).
    let filter = std::env::var("IMMICH_GUARD_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .or_else(|| config.daemon.log_level.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    // Colours only for a person at a terminal, never into journald or a log file.
    // The builder's own level (INFO by default) would drop debug lines before the `Targets`
    // filter saw them: that filter alone decides.
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.daemon.log_format {
        LogFormat::Json => builder.json().finish().with(filter).init(),
        // journald stamps every line itself; a second timestamp is noise there.
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            builder.without_time().finish().with(filter).init()
        }
        LogFormat::Text => builder.finish().with(filter).init(),
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
    // An unfinished restore is said whether or not the daemon runs (it does not protect
    // while one is unfinished, and may not run at all).
    let restore = immich_guard::restore::journal::incomplete(&config.daemon.data_dir);
    let response = match client::request(&config.control.socket, &Request::Status {}).await {
        Ok(r) => r,
        Err(e @ (ClientError::NotRunning { .. } | ClientError::Refused { .. }))
            if restore.is_some() =>
        {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "daemon": format!("not running: {e}"),
                        "restore_incomplete": restore,
                    }))?
                );
            } else {
                println!("RESTORE INCOMPLETE: {}", restore.unwrap_or_default());
                println!("daemon: not running ({e})");
            }
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    let report = expect(response, |r| match r {
        Response::Status(report) => Some(report),
        _ => None,
    })?;
    // A restore the daemon is running has an unfinished journal by definition; its status
    // line says RESTORING.
    let restore = restore.filter(|_| report.state.restoring.is_none());
    if json {
        let mut value = serde_json::to_value(&report)?;
        if let (Some(text), Some(obj)) = (&restore, value.as_object_mut()) {
            obj.insert("restore_incomplete".into(), text.clone().into());
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        if let Some(text) = &restore {
            println!("RESTORE INCOMPLETE: {text}");
        }
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
    let bar = (!json && std::io::stderr().is_terminal())
        .then(|| render::step_bar(immich_guard::snapshot::STEPS));
    let request = Request::Snapshot { label };
    // Steps move the bar; notes (joining a running snapshot, waiting for the database) and
    // lines of an older daemon are said above it.
    let response = client::request_with_progress(&config.control.socket, &request, |line| {
        match (&bar, Progress::parse(line)) {
            (Some(bar), Some(p)) => render::advance(bar, &p),
            (Some(bar), None) => bar.println(line),
            (None, _) => eprintln!("{line}"),
        }
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

/// The daemon's answer, or `None` when no daemon listens on the socket: the caller then reads
/// `dir` itself (a recovery tool must work while the daemon is down), and this says so.
async fn ask_or_read(
    config: &Config,
    request: &Request,
    dir: &Path,
) -> anyhow::Result<Option<Response>> {
    let why = match client::request(&config.control.socket, request).await {
        Ok(response) => return Ok(Some(response)),
        Err(ClientError::NotRunning { path }) => format!("no socket at {}", path.display()),
        Err(ClientError::Refused { path }) => format!("connect to {} refused", path.display()),
        Err(e) => return Err(e.into()),
    };
    eprintln!(
        "immich-guard: daemon not running ({why}); read {} directly",
        dir.display()
    );
    Ok(None)
}

fn diagnose_cmd(
    input: Option<String>,
    mut files: Vec<PathBuf>,
    services: Vec<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::Read;
    match input.as_deref() {
        Some("-") => files.insert(0, PathBuf::from("-")),
        Some(other) => bail!(
            "diagnose: unexpected argument {other:?}: use `-` for standard input, or --logs FILE"
        ),
        None if files.is_empty() => {
            bail!(
                "diagnose: no logs: pipe them in with `-` (`docker compose logs | immich-guard diagnose -`) or give --logs FILE"
            )
        }
        None => {}
    }
    if services.len() > files.len() {
        bail!(
            "diagnose: {} --service given for {} log file(s)",
            services.len(),
            files.len()
        );
    }
    let mut inputs = Vec::new();
    for (n, file) in files.iter().enumerate() {
        let mut text = String::new();
        if file == Path::new("-") {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("diagnose: reading standard input")?;
        } else {
            let bytes = std::fs::read(file)
                .with_context(|| format!("diagnose: reading {}", file.display()))?;
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        let service = services.get(n).cloned().unwrap_or_else(|| {
            file.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| s != "-")
                .unwrap_or_else(|| "unknown".into())
        });
        inputs.push((text, service));
    }
    let mut evidence = immich_guard::compose_logs::evidence(&inputs);
    // The first service named is the one that failed, if the admin said.
    evidence.looping = services.first().cloned();
    let diagnosis = immich_guard::diagnose::diagnose(&evidence);
    if json {
        println!("{}", serde_json::to_string_pretty(&diagnosis)?);
    } else {
        print!("{}", render::diagnosis(&diagnosis));
    }
    Ok(ExitCode::SUCCESS)
}

async fn incident_cmd(config: &Config, id: Option<String>, json: bool) -> anyhow::Result<ExitCode> {
    let dir = config.daemon.data_dir.join(incident::DIR);
    let request = Request::Incidents { id: id.clone() };
    let incidents = match ask_or_read(config, &request, &dir).await? {
        Some(response) => expect(response, |r| match r {
            Response::Incidents { incidents } => Some(incidents),
            _ => None,
        })?,
        None => incident::find(&dir, id.as_deref()).map_err(anyhow::Error::msg)?,
    };
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

async fn ack_cmd(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let response = client::request(&config.control.socket, &Request::Ack {}).await?;
    let message = expect(response, |r| match r {
        Response::Acknowledged { message } => Some(message),
        _ => None,
    })?;
    if json {
        println!("{}", serde_json::json!({ "acknowledged": message }));
    } else {
        println!("{message}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn drill_cmd(config: &Config, id: Option<String>, json: bool) -> anyhow::Result<ExitCode> {
    let request = Request::Drill { id: id.clone() };
    let asked =
        client::request_with_progress(&config.control.socket, &request, |line| eprintln!("{line}"))
            .await;
    let (id, result) = match asked {
        Ok(response) => expect(response, |r| match r {
            Response::Drilled { id, result } => Some((id, *result)),
            _ => None,
        })?,
        Err(ClientError::NotRunning { .. } | ClientError::Refused { .. }) => {
            drill_here(config, id).await?
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", render::drill(&id, &result));
    }
    Ok(if result.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A drill in this process, the daemon being down: under its data-dir lock, so a daemon
/// starting meanwhile cannot take this drill's container for a leftover.
async fn drill_here(
    config: &Config,
    id: Option<String>,
) -> anyhow::Result<(String, immich_guard::snapshot::store::DrillResult)> {
    use immich_guard::drill;
    let _lock = immich_guard::lock::acquire(config)?;
    let id = match id {
        Some(id) => id,
        None => drill::newest(&config.snapshot_dir())?,
    };
    eprintln!("immich-guard: daemon not running; drilling {id} here");
    let host = docker::engine_host(config.docker.host.as_deref());
    let docker = docker::connect(&host).await?;
    // Holding the lock, like a starting daemon: a drill a killed run left is ours to remove.
    for name in drill::scratch::remove_leftovers(&docker, &config.daemon.data_dir).await {
        eprintln!("immich-guard: removed a drill container an earlier run left behind: {name}");
    }
    // The live database container gives the image and its settings; without a stack the
    // image the snapshot recorded is used.
    let stack = match discover::discover(&docker, &host, config).await {
        Ok(stack) => Some(stack),
        Err(e) => {
            eprintln!(
                "immich-guard: no stack found ({e}); using the database image the snapshot recorded"
            );
            None
        }
    };
    let live = drill::Live::of(stack.as_ref());
    let ctx = drill::Context {
        docker: &docker,
        host: &host,
        config,
        live: &live,
    };
    let result = drill::run(&ctx, &id, None, &|line| eprintln!("{line}")).await?;
    Ok((id, result))
}

async fn list_cmd(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let dir = config.snapshot_dir();
    let snapshots = match ask_or_read(config, &Request::List {}, &dir).await? {
        Some(response) => expect(response, |r| match r {
            Response::List { snapshots } => Some(snapshots),
            _ => None,
        })?,
        None => read_snapshots(&dir)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshots)?);
    } else {
        print!("{}", render::snapshots(&snapshots));
    }
    Ok(ExitCode::SUCCESS)
}

/// The sealed snapshots in `dir`, as the daemon lists them; a dir never created has none (and
/// is not created by looking). One that cannot be read is an error, never "none".
fn read_snapshots(dir: &Path) -> anyhow::Result<Vec<Meta>> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => bail!("cannot read the snapshots in {}: {e}", dir.display()),
        Ok(_) => Ok(Store::open(dir)?.list()?),
    }
}

async fn verify_cmd(
    config: &Config,
    against: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use immich_guard::verify;
    let host = docker::engine_host(config.docker.host.as_deref());
    let docker = docker::connect(&host).await?;
    let stack = discover::discover(&docker, &host, config).await?;
    let plan = verify::choose_plan(&config.snapshot_dir(), against.as_deref(), &stack)?;
    let mut report = verify::verify(&docker, &host, &stack, &plan).await;
    // After a finished restore of this stack (the journal is kept until the next one): what
    // only its pre-restore snapshot holds.
    if let Ok(Some(j)) = immich_guard::restore::journal::load(&config.daemon.data_dir)
        && j.is_complete()
        && j.project == stack.project
        && against.as_ref().is_none_or(|a| *a == j.snapshot)
        && let (Some(id), Some(access)) = (&j.pre_restore, &stack.db)
    {
        report.not_restored =
            Some(verify::not_restored::compare(&config.snapshot_dir(), id, access).await);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render::verify(&report));
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

struct PinFlags {
    dry_run: bool,
    force: bool,
    yes: bool,
    json: bool,
}

/// `pin`: discover the stack, plan the edit, judge it from the snapshots and the live
/// database, print every change, confirm, apply, record.
async fn pin_cmd(config: &Config, version: &str, flags: PinFlags) -> anyhow::Result<ExitCode> {
    let host = docker::engine_host(config.docker.host.as_deref());
    let docker = docker::connect(&host).await?;
    let stack = discover::discover(&docker, &host, config).await?;
    let plan = pin::plan_for(&stack, version)?;
    let snapshots = read_snapshots(&config.snapshot_dir())?;
    let current = match &stack.db {
        Some(access) => immich_guard::snapshot::db::facts(access)
            .await
            .map(|f| f.migrations)
            .map_err(|e| e.to_string()),
        None => Err("database access unknown (no database container found)".to_string()),
    };
    let verdict = pin::judge(
        &plan.version,
        Some(&stack.project),
        &snapshots,
        current.as_deref().map_err(Clone::clone),
    );
    let go = verdict.allows() || flags.force;
    let say = |line: String| {
        // With --json, stdout is the one JSON document; the account goes to stderr.
        if flags.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    // A refusal is said once, as the error at the end.
    say(format!(
        "pin {} to {}: {}",
        stack.project,
        plan.version,
        if go {
            verdict.describe(&plan.version)
        } else {
            "refused (below); the changes it would make:".to_string()
        }
    ));
    for line in plan.lines() {
        say(line);
    }
    let report = |applied: Option<&pin::Applied>, log: Option<&Path>| {
        serde_json::json!({
            "project": stack.project,
            "version": plan.version,
            "verdict": verdict,
            "plan": plan,
            "dry_run": flags.dry_run,
            "forced": flags.force && !verdict.allows(),
            "applied": applied,
            "log": log,
        })
    };
    if !go {
        if flags.json {
            println!("{}", serde_json::to_string_pretty(&report(None, None))?);
        }
        bail!(
            "refusing to pin {}: {}; `--force` pins anyway (recorded)",
            plan.version,
            verdict.describe(&plan.version)
        );
    }
    if plan.edits.is_empty() {
        say(format!(
            "the compose config already names {}; nothing to change{}",
            plan.version,
            if flags.dry_run {
                ""
            } else {
                " (the judgement is recorded: a running daemon lets this rollback start)"
            }
        ));
    }
    if flags.dry_run {
        if !plan.edits.is_empty() {
            say("dry run: nothing changed".to_string());
        }
        if flags.json {
            println!("{}", serde_json::to_string_pretty(&report(None, None))?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Nothing to edit: only the record is made, which changes no file.
    if !flags.yes && !plan.edits.is_empty() {
        if !std::io::stdin().is_terminal() {
            bail!("no terminal to confirm on; run again with --yes to pin");
        }
        eprint!(
            "pin {} to {}{}? [y/N] ",
            stack.project,
            plan.version,
            if verdict.allows() {
                ""
            } else {
                " against the judgement above"
            }
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            say("not pinned".to_string());
            return Ok(ExitCode::FAILURE);
        }
    }
    let at = chrono::Utc::now();
    let applied = pin::apply(&plan, &pin::Backup::Beside, at)?;
    for (file, backup) in &applied.backups {
        say(format!(
            "kept the previous {} as {} (owner-only)",
            file.display(),
            backup.display()
        ));
    }
    for file in &applied.written {
        say(format!("wrote {}", file.display()));
    }
    let log = pin::record(
        &config.daemon.data_dir,
        &pin::PinRecord {
            at,
            project: stack.project.clone(),
            version: plan.version.clone(),
            forced: !verdict.allows(),
            verdict: verdict.clone(),
            files: applied.written.clone(),
            backups: applied.backups.iter().map(|(_, b)| b.clone()).collect(),
            by: pin::who(),
        },
    )?;
    say(format!("recorded in {}", log.display()));
    if !plan.edits.is_empty() {
        say(format!(
            "a running immich-guard daemon sees this edit as a version change and takes a pre-update snapshot first; then start {} with `docker compose up -d` in {}",
            plan.version,
            stack
                .compose_dir
                .as_deref()
                .unwrap_or(Path::new("the compose dir"))
                .display()
        ));
    }
    let running = stack.version.as_ref().map(|v| v.name());
    if let Some(running) = &running
        && let (Some(to), Some(from)) = (
            immich_guard::version::parse_version(&plan.version),
            immich_guard::version::parse_version(running),
        )
        && to < from
    {
        say(format!(
            "{} is older than the running {running}: the daemon lets this rollback start because it is recorded here (a server it already holds: `immich-guard release`); a downgrade not recorded by `pin` stays held",
            plan.version
        ));
    }
    if flags.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report(Some(&applied), Some(&log)))?
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `hash`: the content-hash pass of one snapshot, or of every one without it, here and now
/// (at the lowest priority and `snapshots.hash_rate_mb`, as the daemon runs it).
fn hash_cmd(config: &Config, id: Option<&str>) -> anyhow::Result<ExitCode> {
    use immich_guard::snapshot::hashes::{self, Finished, Flow, PassOptions};
    let root = config.snapshot_dir();
    let ids = match id {
        Some(id) => vec![id.to_string()],
        None => hashes::unhashed(&root),
    };
    if ids.is_empty() {
        println!("every sealed snapshot in {} is hashed", root.display());
        return Ok(ExitCode::SUCCESS);
    }
    for failed in hashes::lower_thread_priority() {
        eprintln!("immich-guard: note: could not lower the priority ({failed})");
    }
    let options = PassOptions {
        rate: config.snapshots.hash_rate_mb * 1_000_000,
    };
    let mut code = ExitCode::SUCCESS;
    for id in ids {
        let dir = root.join(&id);
        if id.is_empty() || id.starts_with('.') || id.contains('/') || !dir.is_dir() {
            bail!(
                "no snapshot {id} in {}; `immich-guard list` shows the sealed ones",
                root.display()
            );
        }
        match hashes::run_pass(&dir, &options, &|| Flow::Go)? {
            Finished::Done { check, .. } => {
                println!(
                    "{id}: {}: {}",
                    if check.passed { "passed" } else { "FAILED" },
                    check.summary
                );
                if !check.passed {
                    code = ExitCode::FAILURE;
                }
            }
            Finished::Gone => println!("{id}: deleted meanwhile"),
            Finished::Stopped { .. } => unreachable!("this gate never stops"),
        }
    }
    Ok(code)
}

/// `restore`: checks the snapshot, prints every step, confirms, then runs the restore: through
/// the daemon when it answers (protection stands back for the restore's own stops and
/// starts, README.md "How to recover"), else here under the daemon's data-dir lock so none
/// can start meanwhile. Steps show as a bar (a terminal) or plain lines; the verify
/// checklist ends it.
async fn restore_cmd(
    config: &Config,
    id: &str,
    dry_run: bool,
    yes: bool,
    options: restore::Options,
) -> anyhow::Result<ExitCode> {
    let no_preserve = options.no_preserve;
    if no_preserve && !yes && !dry_run {
        bail!(
            "--no-preserve needs --yes: without a pre-restore snapshot the current database and files are not kept"
        );
    }
    let daemon = !dry_run
        && client::request(&config.control.socket, &Request::Status {})
            .await
            .is_ok();
    // Held for the whole restore: a daemon started meanwhile refuses to run.
    let _lock = if dry_run || daemon {
        None
    } else {
        Some(immich_guard::lock::acquire(config).map_err(|e| match e {
            immich_guard::lock::LockError::Held { .. } => anyhow::anyhow!(
                "{e}; if the daemon is starting or stopping, run the restore again once it answers `immich-guard status` or has stopped"
            ),
            other => other.into(),
        })?)
    };
    // Made when the steps begin: its tick would draw over the confirmation prompt.
    let new_bar = || {
        std::io::stderr()
            .is_terminal()
            .then(|| render::step_bar(restore::journal::Step::ALL.len() as u64))
    };
    if daemon && yes {
        // The daemon checks, plans and says every step itself.
        return restore_through_daemon(config, id, options, false, new_bar()).await;
    }
    let host = docker::engine_host(config.docker.host.as_deref());
    let docker = docker::connect(&host).await?;
    let stack = discover::discover(&docker, &host, config).await?;
    let ctx = restore::Ctx {
        docker: &docker,
        host: &host,
        config,
        stack: &stack,
    };
    let plan = restore::plan(&ctx, id, options).await?;
    for line in plan.lines(&stack) {
        println!("{line}");
    }
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(ExitCode::SUCCESS);
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!("no terminal to confirm on; run again with --yes to restore");
        }
        eprint!("restore {} to {}? [y/N] ", stack.project, plan.meta.id);
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("not restored; nothing changed");
            return Ok(ExitCode::FAILURE);
        }
    }
    if daemon {
        return restore_through_daemon(config, id, options, true, new_bar()).await;
    }
    let bar = new_bar();
    let mut progress = |p: Progress| show_restore_progress(bar.as_ref(), p);
    let result = restore::run(&ctx, &plan, &mut progress).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let outcome = result
        .map_err(|e| anyhow::anyhow!(restore::failure_message(&config.daemon.data_dir, &e)))?;
    Ok(restore_finished(
        &outcome.verify,
        &outcome.summary(&stack.project),
        &outcome.journal,
    ))
}

/// `restore --abandon`: shows what the unfinished restore did and what the stack is left
/// with, confirms, then ends it: through the daemon when it answers (protection back on at
/// once), else here under the daemon's data-dir lock.
async fn abandon_cmd(config: &Config, yes: bool) -> anyhow::Result<ExitCode> {
    use immich_guard::restore::abandon;
    let data_dir = &config.daemon.data_dir;
    let journal = abandon::unfinished(data_dir)?;
    let host = docker::engine_host(config.docker.host.as_deref());
    let containers = match docker::connect(&host).await {
        Ok(docker) => discover::discover(&docker, &host, config)
            .await
            .ok()
            .map(|stack| {
                stack
                    .services()
                    .map(|s| {
                        (
                            s.container_name.clone(),
                            format!("{:?}", s.state).to_lowercase(),
                        )
                    })
                    .collect::<Vec<_>>()
            }),
        Err(_) => None,
    };
    for line in abandon::describe(&journal, containers.as_deref()) {
        println!("{line}");
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!("no terminal to confirm on; run again with --yes to abandon the restore");
        }
        eprint!("abandon the restore of {}? [y/N] ", journal.snapshot);
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("not abandoned; nothing changed");
            return Ok(ExitCode::FAILURE);
        }
    }
    match client::request(&config.control.socket, &Request::AbandonRestore {}).await {
        Ok(response) => {
            let message = expect(response, |r| match r {
                Response::Abandoned { message } => Some(message),
                _ => None,
            })?;
            println!("{message}");
        }
        Err(_) => {
            let _lock = immich_guard::lock::acquire(config)?;
            let j = abandon::abandon(data_dir)?;
            println!(
                "the unfinished restore of {} is abandoned (kept in the restore history); the daemon protects again when it starts",
                j.snapshot
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A restore step or note, on the bar or as a plain line.
fn show_restore_progress(bar: Option<&indicatif::ProgressBar>, p: Progress) {
    match bar {
        Some(bar) => render::advance(bar, &p),
        None => println!("{}", p.line()),
    }
}

/// The `restore` verb: the daemon's lines shown as the restore here would show them. The
/// plan's lines are printed unless `planned` (already shown before the confirmation).
async fn restore_through_daemon(
    config: &Config,
    id: &str,
    options: restore::Options,
    planned: bool,
    bar: Option<indicatif::ProgressBar>,
) -> anyhow::Result<ExitCode> {
    let request = Request::Restore {
        snapshot: id.to_string(),
        no_preserve: options.no_preserve,
        force: options.force,
    };
    let response =
        client::request_with_progress(
            &config.control.socket,
            &request,
            |line| match Progress::parse(line) {
                Some(p) => show_restore_progress(bar.as_ref(), p),
                None if planned => {}
                None => match &bar {
                    Some(bar) => bar.println(line),
                    None => println!("{line}"),
                },
            },
        )
        .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let (verify, summary, journal) = expect(response?, |r| match r {
        Response::Restored {
            verify,
            summary,
            journal,
        } => Some((verify, summary, journal)),
        _ => None,
    })?;
    Ok(restore_finished(&verify, &summary, &journal))
}

/// The verify checklist and what was done; failure when the verify failed.
fn restore_finished(
    verify: &immich_guard::verify::Report,
    summary: &str,
    journal: &Path,
) -> ExitCode {
    print!("{}", render::verify(verify));
    println!("{summary}");
    if verify.passed() {
        ExitCode::SUCCESS
    } else {
        println!(
            "verify failed after the restore: the lines above say what; the journal is {}",
            journal.display()
        );
        ExitCode::FAILURE
    }
}
