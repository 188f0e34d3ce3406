//! `immich-guard run`: connects to Docker (and keeps reconnecting), discovers the stack,
//! follows Docker events to re-discover when containers or images change, serves the control
//! socket and keeps systemd informed. It never gives up on Docker: an unreachable engine is a
//! state to report, not a reason to exit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptionsBuilder;
use chrono::Utc;
use futures_util::StreamExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::control::server::{Control, ControlError, ControlServer};
use crate::discover::{self, DiscoverError};
use crate::docker::{self, DockerError};
use crate::drill::queue::{Activity as DrillActivity, DrillQueue};
use crate::notification::{EventKind, Notifier};
use crate::protect::{ContainerEvent, Guard, GuardHandle, Input, ProtectState};
use crate::snapshot::hash_queue::HashQueue;
use crate::snapshot::queue::{self, Activity, DockerHandle, SnapshotQueue};
use crate::snapshot::store::{Leftover, Store, StoreError};
use crate::snapshot::{SnapshotFailure, Taken};
use crate::status::{DaemonState, DrillSeen, EventSeen, SnapshotSeen};
use crate::systemd::ServiceManager;

/// Events arrive in bursts (a recreate is destroy+create+start+...): one discovery per burst.
const DISCOVERY_DEBOUNCE: Duration = Duration::from_millis(250);
/// READY=1 waits at most this long for the first discovery attempt.
const FIRST_DISCOVERY_WAIT: Duration = Duration::from_secs(30);
/// Partial snapshots that could not be removed are tried again this often (and whenever a
/// snapshot begins): an admin who clears the cause sees them go without a restart.
const PARTIAL_RETRY: Duration = Duration::from_secs(300);

const CONTAINER_ACTIONS: &[&str] = &[
    "create", "start", "restart", "die", "stop", "kill", "destroy", "rename", "pause", "unpause",
    "update",
];
const IMAGE_ACTIONS: &[&str] = &["pull", "tag", "untag", "delete", "import", "load"];

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error(transparent)]
    Private(#[from] crate::private::TightenError),
}

type State = Arc<watch::Sender<DaemonState>>;
type DockerTx = Arc<watch::Sender<Option<(Docker, String)>>>;

pub async fn run(config: Config) -> Result<(), DaemonError> {
    let service_manager = ServiceManager::from_env();
    crate::control::limits::raise_fd_limit();
    let host = docker::engine_host(config.docker.host.as_deref());
    let (tx, rx) = watch::channel(DaemonState::new(host.clone()));
    let state: State = Arc::new(tx);

    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;

    // Before touching anything another daemon may be using.
    let _lock = crate::lock::acquire(&config)?;
    // Owner-only data and snapshot dirs, tightened if an earlier run left them wider.
    crate::private::secure_start(&config)?;

    // A snapshot interrupted by a crash or a kill is never usable: remove it before anything
    // can list it. Sealed snapshots are not touched. What cannot be removed is named and
    // retried later; it never keeps the daemon from protecting.
    let snapshot_dir = config.snapshot_dir();
    let store = Store::open(&snapshot_dir)?;
    match store.clean_partials() {
        Ok(cleanup) => {
            for name in &cleanup.removed {
                tracing::warn!(dir = %snapshot_dir.display(), partial = %name, "removed an interrupted snapshot");
            }
            for left in &cleanup.left {
                tracing::error!(path = %left.path.display(), error = %left.error, "cannot remove a partial snapshot; protecting anyway, retried later");
            }
            state.send_modify(|s| s.partials_left = cleanup.left);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot look for partial snapshots; protecting anyway")
        }
    }

    let (docker_tx, docker_rx) = watch::channel(None);
    let docker_tx: DockerTx = Arc::new(docker_tx);
    let notifier = Notifier::new(&config.notify);
    let hashing = start_hash_queue(&config, &state);
    // The newest snapshot's drill, as recorded, until a drill or a seal says more.
    if let Some(newest) = store.list().ok().and_then(|all| {
        all.into_iter()
            .max_by(|a, b| (a.sealed_at, &a.id).cmp(&(b.sealed_at, &b.id)))
    }) {
        state.send_modify(|s| s.drill = Some(drill_seen(&newest)));
    }
    let drills = start_drill_queue(&config, docker_rx.clone(), state.clone(), notifier.clone());
    tokio::spawn(remove_drill_leftovers(
        docker_rx.clone(),
        config.daemon.data_dir.clone(),
    ));
    let queue = snapshot_queue_hashing(
        config.clone(),
        docker_rx.clone(),
        state.clone(),
        notifier.clone(),
        Some(hashing),
        Some(drills.clone()),
    );
    let guard = Guard::start(
        config.clone(),
        show_in_status(state.clone()),
        docker_rx.clone(),
        queue.clone(),
        Some(drills.clone()),
        notifier,
    );
    // A restore left unfinished: its stops and starts must not be judged as crashes or
    // upgrades, and its half-restored state must not become a snapshot. The daemon runs and
    // says so in its status until the restore is finished, by the same command through the
    // daemon or with it stopped (README.md, "How to recover"). Sent before any other input.
    if let Some(text) = crate::restore::journal::incomplete(&config.daemon.data_dir) {
        state.send_modify(|s| s.restore_incomplete = Some(text.clone()));
        guard.restore_unfinished(text);
    }

    let control = ControlServer::bind(&config.control)?;
    tracing::info!(socket = %control.path().display(), "control socket listening");
    let socket_path = control.path().to_path_buf();
    let control_task = tokio::spawn(control.serve(Control {
        state: rx.clone(),
        queue,
        drills,
        snapshot_dir,
        incident_dir: config.daemon.data_dir.join(crate::incident::DIR),
        guard: guard.clone(),
        config: config.clone(),
        docker: docker_rx,
    }));

    let supervisor = tokio::spawn(supervise_docker(
        config.clone(),
        host,
        state.clone(),
        docker_tx,
        guard,
    ));

    // READY once the socket listens and the first discovery attempt has an outcome, whether
    // a stack or a reason why not. A stop asked for meanwhile is obeyed at once: systemd
    // would otherwise wait out FIRST_DISCOVERY_WAIT before its stop could even begin.
    let mut first = rx.clone();
    let stop_early = tokio::select! {
        waited = tokio::time::timeout(
            FIRST_DISCOVERY_WAIT,
            first.wait_for(|s| {
                s.docker.error.is_some() || s.discovered_at.is_some() || s.discovery_error.is_some()
            }),
        ) => {
            // `wait_for` hands back a read guard on the state: drop it at once, or every
            // writer blocks on it.
            if waited.is_err() {
                tracing::warn!("first discovery is taking long; reporting ready anyway");
            }
            false
        }
        _ = sigterm.recv() => { tracing::info!("SIGTERM before ready: stopping"); true }
        _ = sigint.recv() => { tracing::info!("SIGINT before ready: stopping"); true }
    };
    if !stop_early {
        let line = rx.borrow().status_line();
        service_manager.ready(&line);
        tracing::info!(status = %line, "ready");
        serve_until_stopped(
            &service_manager,
            rx.clone(),
            line,
            &mut sigterm,
            &mut sigint,
        )
        .await;
    }
    service_manager.stopping();
    supervisor.abort();
    control_task.abort();
    let _ = supervisor.await;
    let _ = control_task.await;
    std::fs::remove_file(&socket_path).ok();
    tracing::info!("stopped");
    Ok(())
}

/// The main loop after READY=1: watchdog pings, STATUS= on every change, until a signal.
async fn serve_until_stopped(
    service_manager: &ServiceManager,
    mut changes: watch::Receiver<DaemonState>,
    mut last_line: String,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) {
    let mut watchdog = service_manager.watchdog_interval().map(|period| {
        tracing::info!(
            period_ms = period.as_millis() as u64,
            "systemd watchdog enabled"
        );
        tokio::time::interval(period)
    });
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            // The ping comes from this loop, so a wedged runtime stops pinging and systemd
            // restarts us.
            _ = async { watchdog.as_mut().unwrap().tick().await }, if watchdog.is_some() => {
                service_manager.watchdog();
            }
            changed = changes.changed() => {
                if changed.is_err() { break; }
                let line = changes.borrow_and_update().status_line();
                if line != last_line {
                    tracing::info!(status = %line, "status");
                    service_manager.status(&line);
                    last_line = line;
                    if quiet(&changes.borrow()) {
                        // Back to waiting after a snapshot or an incident.
                        crate::memory::release();
                    }
                }
            }
        }
    }
}

/// The snapshot queue, wired to the daemon's state: a snapshot that waits for a starting
/// database retries with the stack as published here (by discovery, and as protection
/// updates its `.env` version), and what the queue does shows in `status` (the activity,
/// the last snapshot sealed or why the last one failed) before any waiter hears the result.
/// What protection shows goes into the published state.
pub fn show_in_status(state: State) -> crate::protect::Show {
    use crate::protect::Shown;
    Box::new(move |shown: Shown<'_>| {
        state.send_modify(|s| match shown {
            Shown::Protection(p) => s.protection = p.clone(),
            Shown::Stack(stack) => {
                if let Some(published) = &mut s.stack
                    && published.project == stack.project
                {
                    published.env_version = stack.env_version.clone();
                    published.notes = stack.notes.clone();
                }
            }
            Shown::Restoring(line) => s.restoring = line,
            Shown::Incomplete(line) => s.restore_incomplete = line,
            Shown::Uploads(seen) => s.uploads = Some(seen.clone()),
        })
    })
}

/// The content-hash passes: paused while the daemon snapshots, holds a frozen server, or
/// restores (snapshot/hash_queue.rs).
pub fn start_hash_queue(config: &Config, state: &State) -> HashQueue {
    let seen = state.subscribe();
    let busy = Box::new(move || {
        let s = seen.borrow();
        // Not while Docker is away: hashing needs none, and the wait may be long.
        s.activity.starts_with("snapshotting")
            || s.activity == "starting"
            || s.restoring.is_some()
            || s.restore_incomplete.is_some()
            || matches!(
                s.protection.state,
                ProtectState::Snapshotting | ProtectState::Frozen | ProtectState::Held
            )
    });
    HashQueue::start(
        config.snapshot_dir(),
        config.snapshots.hash_rate_mb * 1_000_000,
        busy,
    )
}

pub fn start_snapshot_queue(
    config: Config,
    docker: DockerHandle,
    state: State,
    notifier: Notifier,
) -> SnapshotQueue {
    snapshot_queue_hashing(config, docker, state, notifier, None, None)
}

/// The stack discovery last published (or why none), for the queues that retry with it.
fn published_stacks(state: &State) -> queue::StackHandle {
    let found = |s: &DaemonState| match (&s.stack, &s.discovery_error) {
        (Some(stack), _) => Ok(stack.clone()),
        (None, why) => Err(why.clone().unwrap_or_else(|| queue::NOT_DISCOVERED.into())),
    };
    let mut published = state.subscribe();
    let (stacks_tx, stacks) = watch::channel(found(&published.borrow_and_update()));
    tokio::spawn(async move {
        // Ends with the daemon's state, or once the queue is gone.
        while published.changed().await.is_ok() {
            let now = found(&published.borrow_and_update());
            stacks_tx.send_if_modified(|last| {
                let changed = *last != now;
                if changed {
                    *last = now;
                }
                changed
            });
            if stacks_tx.is_closed() {
                break;
            }
        }
    });
    stacks
}

/// A snapshot's drill as `status` shows it before a drill of it has run here.
fn drill_seen(meta: &crate::snapshot::store::Meta) -> DrillSeen {
    DrillSeen {
        snapshot: meta.id.clone(),
        running: false,
        result: meta.drill.clone(),
        error: None,
    }
}

/// The drill queue: each drill in `status` while it runs and after; a failed one notified.
pub fn start_drill_queue(
    config: &Config,
    docker: DockerHandle,
    state: State,
    notifier: Notifier,
) -> DrillQueue {
    let stacks = published_stacks(&state);
    let observer = Box::new(move |activity: DrillActivity<'_>| {
        let (id, result) = match activity {
            DrillActivity::Began(id) => {
                state.send_modify(|s| {
                    s.drill = Some(DrillSeen {
                        snapshot: id.to_string(),
                        running: true,
                        result: None,
                        error: None,
                    })
                });
                return;
            }
            DrillActivity::Ended(id, result) => (id, result),
        };
        let project = state
            .borrow()
            .stack
            .as_ref()
            .map(|s| s.project.clone())
            .unwrap_or_default();
        state.send_modify(|s| {
            s.drill = Some(DrillSeen {
                snapshot: id.to_string(),
                running: false,
                result: result.as_ref().ok().cloned(),
                error: result.as_ref().err().cloned(),
            })
        });
        if let Ok(r) = result
            && !r.passed
        {
            notifier.send(crate::notification::Event {
                kind: EventKind::DrillFailed,
                project,
                title: format!("Restore drill of snapshot {id} failed"),
                message: format!(
                    "{}. This snapshot may not restore; see `immich-guard list` and `immich-guard drill {id}`.",
                    r.first_error.as_deref().unwrap_or("unknown")
                ),
                snapshot: Some(id.to_string()),
                from_version: None,
                to_version: None,
                at: Utc::now(),
            });
        }
    });
    DrillQueue::start(config.clone(), docker, stacks, observer)
}

/// Removes the drill containers a killed run of this data dir left (never one of this run's
/// drills: see `scratch::LABEL_RUN`), once Docker answers.
async fn remove_drill_leftovers(mut docker: DockerHandle, data_dir: PathBuf) {
    let connection = match docker.wait_for(Option::is_some).await {
        Ok(c) => c.clone(),
        Err(_) => return,
    };
    let Some((docker, _)) = connection else {
        return;
    };
    for name in crate::drill::scratch::remove_leftovers(&docker, &data_dir).await {
        tracing::warn!(container = %name, "removed a drill container an earlier run left behind");
    }
}

/// The snapshot queue; with `hashing`, every snapshot it seals is queued for its content
/// hashes.
fn snapshot_queue_hashing(
    config: Config,
    docker: DockerHandle,
    state: State,
    notifier: Notifier,
    hashing: Option<HashQueue>,
    drills: Option<DrillQueue>,
) -> SnapshotQueue {
    let stacks = published_stacks(&state);
    let drill_mode = config.snapshots.drill;
    let retry = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(retry_partials(
        config.snapshot_dir(),
        state.clone(),
        retry.clone(),
    ));
    let observer = Box::new(move |activity: Activity<'_>| match activity {
        Activity::Began(request) => {
            state.send_modify(|s| s.activity = format!("snapshotting ({})", request.trigger));
            retry.notify_one();
        }
        Activity::Ended(result) => {
            let mut notice = None;
            state.send_modify(|s| notice = ended(s, result));
            if let Some(notice) = notice {
                notifier.send(notice);
            }
            if let (Ok(taken), Some(hashing)) = (result, &hashing) {
                hashing.push(&taken.meta.id);
            }
            if let (Ok(taken), Some(drills)) = (result, &drills)
                && after_seal_drill(drill_mode, taken)
            {
                drills.after_seal(&taken.meta.id);
            }
        }
    });
    SnapshotQueue::start(config, docker, stacks, observer)
}

/// Whether the queue's observer drills this seal: a newly sealed snapshot (not one reused
/// for an unchanged state, not a pre-restore one), unless drills are off or the driver
/// drills it before release (a protective snapshot under "before-release").
fn after_seal_drill(mode: crate::config::DrillMode, taken: &Taken) -> bool {
    use crate::config::DrillMode;
    let protective = matches!(taken.meta.trigger.as_str(), "pre-update" | "pre-start");
    taken.retention.is_some()
        && match mode {
            DrillMode::Off => false,
            DrillMode::AfterRelease => true,
            DrillMode::BeforeRelease => !protective,
        }
}

/// A snapshot of the queue ended: the status it leaves, and a notice when the retention
/// after its seal failed (newly, or otherwise than before: not one per seal).
fn ended(
    s: &mut DaemonState,
    result: &Result<Taken, SnapshotFailure>,
) -> Option<crate::notification::Event> {
    s.activity = "watching".to_string();
    let taken = match result {
        Ok(taken) => taken,
        Err(failure) => {
            s.last_snapshot_error = Some(failure.message.clone());
            return None;
        }
    };
    let meta = &taken.meta;
    s.last_snapshot = Some(SnapshotSeen {
        id: meta.id.clone(),
        version: meta.version.clone(),
        sealed_at: meta.sealed_at,
    });
    s.last_snapshot_error = None;
    s.drill = Some(drill_seen(meta));
    let outcome = taken.retention.as_ref()?;
    for n in &outcome.not_deleted {
        if let Some(path) = &n.leftover
            && !s.partials_left.iter().any(|l| &l.path == path)
        {
            s.partials_left.push(Leftover {
                path: path.clone(),
                error: n.error.clone(),
            });
        }
    }
    let warning = outcome.warning();
    let before = std::mem::replace(&mut s.retention_warning, warning.clone());
    let warning = warning.filter(|w| before.as_ref() != Some(w))?;
    Some(crate::notification::Event {
        kind: EventKind::RetentionFailed,
        project: meta.project.clone(),
        title: format!("Snapshot {} sealed; retention failed", meta.id),
        message: format!(
            "{warning}. Snapshot {} is sealed and counts; older snapshots stay until the cause is fixed (see `immich-guard status`).",
            meta.id
        ),
        snapshot: Some(meta.id.clone()),
        from_version: None,
        to_version: None,
        at: Utc::now(),
    })
}

/// Tries the partial snapshots that could not be removed again, every [`PARTIAL_RETRY`] and
/// whenever a snapshot begins. Only those named in the status: a partial of a snapshot
/// running now is never among them.
async fn retry_partials(root: PathBuf, state: State, wake: Arc<tokio::sync::Notify>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PARTIAL_RETRY) => {}
            _ = wake.notified() => {}
        }
        if state.is_closed() {
            return;
        }
        let left = state.borrow().partials_left.clone();
        if left.is_empty() {
            continue;
        }
        let dir = root.clone();
        let tried = tokio::task::spawn_blocking(move || retry_leftovers(&dir, left))
            .await
            .unwrap_or_default();
        state.send_modify(|s| {
            s.partials_left
                .retain_mut(|l| match tried.iter().find(|(p, _)| p == &l.path) {
                    Some((_, Ok(()))) => false,
                    Some((_, Err(error))) => {
                        l.error = error.clone();
                        true
                    }
                    None => true,
                })
        });
    }
}

/// Each leftover's path and whether it is gone now (or why not).
fn retry_leftovers(root: &Path, left: Vec<Leftover>) -> Vec<(PathBuf, Result<(), String>)> {
    let store = match Store::open(root) {
        Ok(store) => store,
        Err(e) => {
            let error = e.to_string();
            return left
                .into_iter()
                .map(|l| (l.path, Err(error.clone())))
                .collect();
        }
    };
    left.into_iter()
        .map(|l| {
            let name = l.path.file_name().unwrap_or_default().to_string_lossy();
            let result = store.remove_partial(&name);
            match &result {
                Ok(()) => tracing::info!(path = %l.path.display(), "removed a partial snapshot left earlier"),
                Err(e) => tracing::warn!(path = %l.path.display(), error = %e, "a partial snapshot still cannot be removed"),
            }
            let result = result.map_err(|e| Leftover::of(&e, l.path.clone()).error);
            (l.path, result)
        })
        .collect()
}

/// Nothing runs: the daemon waits for Docker events (also when halted after an incident).
fn quiet(s: &DaemonState) -> bool {
    s.activity == "watching"
        && matches!(
            s.protection.state,
            ProtectState::Idle | ProtectState::Halted
        )
}

/// Keeps a Docker connection, with backoff while the engine is away.
async fn supervise_docker(
    config: Config,
    host: String,
    state: State,
    docker_tx: DockerTx,
    guard: GuardHandle,
) {
    let min = Duration::from_millis(config.docker.reconnect_min_ms);
    let max = Duration::from_millis(config.docker.reconnect_max_ms);
    let mut backoff = min;
    loop {
        match docker::connect(&host).await {
            Ok(docker) => {
                backoff = min;
                let api = docker.client_version().to_string();
                tracing::info!(host = %host, api = %api, "connected to Docker");
                state.send_modify(|s| {
                    s.docker.reachable = true;
                    s.docker.api_version = Some(api);
                    s.docker.error = None;
                    s.docker.since = Utc::now();
                    s.activity = "watching".to_string();
                });
                // Before any snapshot or discovery: what a snapshot of a daemon killed
                // mid-pause had paused goes on (protection's frozen and held servers stay).
                resume_interrupted_pause(&docker, &host, &config).await;
                docker_tx.send_replace(Some((docker.clone(), host.clone())));
                let lost = follow_events(&docker, &host, &config, &state, &guard).await;
                docker_tx.send_replace(None);
                tracing::warn!(error = %lost, "lost Docker connection");
                mark_unreachable(&state, &lost);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Docker unreachable");
                mark_unreachable(&state, &e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max);
            }
        }
    }
}

/// Resumes the writers a snapshot had paused when the daemon was killed (the record in the
/// snapshot dir), except the containers `protection.json` names as frozen, held or paused by
/// someone else: protection owns those. An unreadable `protection.json` resumes nothing.
async fn resume_interrupted_pause(docker: &Docker, host: &str, config: &Config) {
    let dir = config.snapshot_dir();
    if !dir.join(crate::snapshot::pause::RECORD_FILE).exists() {
        return;
    }
    let protected = match crate::protect::gated_containers(
        &config.daemon.data_dir,
        config.stack.project.as_deref(),
    ) {
        Ok(protected) => protected,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the protection state: the writers an interrupted snapshot paused are left paused (`docker unpause` them once checked)");
            return;
        }
    };
    crate::snapshot::pause::resume_leftover(docker, host, &dir, &protected).await;
}

fn mark_unreachable(state: &State, error: &DockerError) {
    state.send_modify(|s| {
        if s.docker.reachable {
            s.docker.since = Utc::now();
        }
        s.docker.reachable = false;
        s.docker.error = Some(error.to_string());
        s.activity = "waiting for Docker".to_string();
    });
}

/// Follows the event stream until it breaks; returns why. The stream starts from a moment
/// before discovery (`since`), so a change between the two is replayed, never missed.
async fn follow_events(
    docker: &Docker,
    host: &str,
    config: &Config,
    state: &State,
    guard: &GuardHandle,
) -> DockerError {
    let filters = HashMap::from([("type", vec!["container", "image"])]);
    let since = Utc::now() - chrono::Duration::seconds(1);
    let since = format!(
        "{}.{:09}",
        since.timestamp(),
        since.timestamp_subsec_nanos()
    );
    let options = EventsOptionsBuilder::default()
        .since(&since)
        .filters(&filters)
        .build();
    // Read by its own task, so a discovery in progress never delays a start reaching
    // protection (the freeze must come within milliseconds).
    let mut events = docker.events(Some(options));
    let (event_tx, mut event_rx) = tokio::sync::mpsc::unbounded_channel();
    let reader_guard = guard.clone();
    let reader = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let Ok(e) = &event
                && let Some(input) = protection_input(e)
            {
                reader_guard.send(input);
            }
            let failed = event.is_err();
            if event_tx.send(event).is_err() || failed {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    if let Err(e) = refresh(docker, host, config, state, guard).await {
        return e;
    }
    let reconcile = Duration::from_secs(config.docker.reconcile_secs);
    let mut next_reconcile = Instant::now() + reconcile;
    let mut pending: Option<Instant> = None;
    loop {
        let deadline = pending.map_or(next_reconcile, |p| p.min(next_reconcile));
        tokio::select! {
            event = event_rx.recv() => match event {
                Some(Ok(event)) => {
                    if let Some(seen) = relevant(&event) {
                        tracing::debug!(kind = %seen.kind, action = %seen.action, subject = %seen.subject, "docker event");
                        state.send_modify(|s| s.last_event = Some(seen));
                        pending.get_or_insert(Instant::now() + DISCOVERY_DEBOUNCE);
                    }
                }
                Some(Err(e)) => return docker::classify(host, e),
                None => return DockerError::Unreachable {
                    host: host.to_string(),
                    detail: "event stream ended (engine stopped or restarted)".to_string(),
                },
            },
            _ = tokio::time::sleep_until(deadline) => {
                pending = None;
                next_reconcile = Instant::now() + reconcile;
                if let Err(e) = refresh(docker, host, config, state, guard).await {
                    return e;
                }
            }
        }
    }
}

/// Events that can change what discovery finds: lifecycle of compose containers and any
/// image pull/tag (a new Immich image may have arrived).
fn relevant(event: &EventMessage) -> Option<EventSeen> {
    let actor = event.actor.as_ref()?;
    let attributes = actor.attributes.clone().unwrap_or_default();
    let action = event.action.as_deref()?;
    let kind = event.typ.as_ref()?.to_string();
    let subject = match kind.as_str() {
        "container" => {
            if !CONTAINER_ACTIONS.contains(&action)
                || !attributes.contains_key("com.docker.compose.project")
            {
                return None;
            }
            attributes.get("name").cloned()
        }
        "image" => {
            if !IMAGE_ACTIONS.contains(&action) {
                return None;
            }
            attributes.get("name").cloned()
        }
        _ => return None,
    };
    let at = event
        .time_nano
        .map(chrono::DateTime::from_timestamp_nanos)
        .unwrap_or_else(Utc::now);
    Some(EventSeen {
        at,
        kind,
        action: action.to_string(),
        subject: subject.or_else(|| actor.id.clone()).unwrap_or_default(),
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts and image arrivals, as protection needs them.
fn protection_input(event: &EventMessage) -> Option<Input> {
    let actor = event.actor.as_ref()?;
    let attributes = actor.attributes.as_ref()?;
    let at = event
        .time_nano
        .map(chrono::DateTime::from_timestamp_nanos)
        .unwrap_or_else(Utc::now);
    match (
        event.typ.as_ref()?.to_string().as_str(),
        event.action.as_deref()?,
    ) {
        ("container", action @ ("start" | "die" | "kill")) => {
            let container = ContainerEvent {
                container_id: actor.id.clone()?,
                name: attributes.get("name").cloned().unwrap_or_default(),
                image: attributes.get("image").cloned().unwrap_or_default(),
                project: attributes.get("com.docker.compose.project").cloned(),
                service: attributes.get("com.docker.compose.service").cloned(),
                at,
            };
            Some(match action {
                "start" => Input::Started(container),
                "kill" => Input::Killed(container),
                _ => Input::Died(container),
            })
        }
        ("image", "pull" | "tag" | "load" | "import") => Some(Input::Image {
            // For a tag, the ID; for a pull, the reference.
            reference: attributes
                .get("name")
                .cloned()
                .or_else(|| actor.id.clone())?,
        }),
        _ => None,
    }
}

/// Runs discovery and publishes the outcome. A Docker failure is returned (reconnect);
/// "no stack" is a state, published.
async fn refresh(
    docker: &Docker,
    host: &str,
    config: &Config,
    state: &State,
    guard: &GuardHandle,
) -> Result<(), DockerError> {
    let listed_at = Utc::now();
    match discover::discover(docker, host, config).await {
        Ok(stack) => {
            let before = state.borrow().stack.clone();
            if before.as_ref() != Some(&stack) {
                tracing::info!(
                    project = %stack.project,
                    version = %stack.version.as_ref().map(|v| v.name()).unwrap_or_default(),
                    server = %stack.server.as_ref().map(|s| s.container_name.as_str()).unwrap_or("-"),
                    notes = stack.notes.len(),
                    "stack discovered"
                );
                for note in &stack.notes {
                    tracing::warn!(project = %stack.project, "{note}");
                }
            }
            // Published first: a snapshot protection asks for on this discovery finds it.
            state.send_modify(|s| {
                s.stack = Some(stack.clone());
                s.discovery_error = None;
                s.discovered_at = Some(Utc::now());
            });
            guard.send(Input::Discovered {
                stack: Box::new(stack),
                listed_at,
            });
            Ok(())
        }
        Err(DiscoverError::Docker(e)) => Err(e),
        Err(e) => {
            let message = e.to_string();
            if state.borrow().discovery_error.as_deref() != Some(&message) {
                tracing::warn!(error = %message, "discovery found no stack to protect");
            }
            state.send_modify(|s| {
                s.stack = None;
                s.discovery_error = Some(message);
                s.discovered_at = Some(Utc::now());
            });
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::retention::{NotDeleted, RetentionOutcome};

    fn sealed(id: &str, retention: Option<RetentionOutcome>) -> Result<Taken, SnapshotFailure> {
        let at = "2026-11-25T02:00:00Z".parse().unwrap();
        Ok(Taken {
            meta: crate::snapshot::store::tests::meta(id, at),
            retention,
        })
    }

    fn failed_on(id: &str) -> RetentionOutcome {
        RetentionOutcome {
            not_deleted: vec![NotDeleted {
                id: id.into(),
                error: "Operation not permitted".into(),
                leftover: Some(format!("/snap/.partial-deleting-{id}").into()),
            }],
            ..Default::default()
        }
    }

    /// Issue 18: a retention that fails after the seal leaves the snapshot sealed in
    /// `status`, says why, notifies once (not at every seal), keeps the unsealed leftover for
    /// the retry, and the next retention that does its work clears the warning.
    #[test]
    fn a_failed_retention_is_a_warning_on_a_sealed_snapshot() {
        let mut s = DaemonState::new("unix:///x".into());
        s.last_snapshot_error = Some("an earlier failure".into());
        let notice = ended(&mut s, &sealed("new", Some(failed_on("old")))).expect("a notification");
        assert_eq!(s.last_snapshot.as_ref().unwrap().id, "new");
        assert_eq!(s.last_snapshot_error, None);
        let warning = s.retention_warning.clone().unwrap();
        assert!(
            warning.contains("old (Operation not permitted)"),
            "{warning}"
        );
        assert_eq!(notice.kind, EventKind::RetentionFailed);
        assert_eq!(notice.snapshot.as_deref(), Some("new"));
        assert!(notice.message.contains(&warning), "{}", notice.message);
        assert_eq!(
            s.partials_left,
            [Leftover {
                path: "/snap/.partial-deleting-old".into(),
                error: "Operation not permitted".into(),
            }]
        );
        // The same failure at the next seal: still shown, not notified again, not listed twice.
        assert!(ended(&mut s, &sealed("newer", Some(failed_on("old")))).is_none());
        assert_eq!(s.retention_warning.as_ref(), Some(&warning));
        assert_eq!(s.partials_left.len(), 1);
        // A reused snapshot ran no retention: the warning stands.
        assert!(ended(&mut s, &sealed("newer", None)).is_none());
        assert!(s.retention_warning.is_some());
        // A retention that did its work clears it.
        let done = RetentionOutcome {
            removed: vec!["x".into()],
            ..Default::default()
        };
        assert!(ended(&mut s, &sealed("newest", Some(done))).is_none());
        assert_eq!(s.retention_warning, None);
        // A snapshot that failed is a failure, and says nothing of retention.
        let failure = Err(SnapshotFailure::lasting("no space"));
        assert!(ended(&mut s, &failure).is_none());
        assert_eq!(s.last_snapshot_error.as_deref(), Some("no space"));
        assert_eq!(s.last_snapshot.as_ref().unwrap().id, "newest");
    }

    /// The retry removes the leftovers that can go now and keeps (with the new error) the
    /// ones that cannot; it refuses anything that is not a partial of the store.
    #[test]
    fn the_retry_removes_what_it_can_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join(".partial-gone");
        std::fs::create_dir(&gone).unwrap();
        std::fs::write(gone.join("f"), "x").unwrap();
        let sealed = dir.path().join("sealed");
        std::fs::create_dir(&sealed).unwrap();
        let left = |path: &Path| Leftover {
            path: path.to_path_buf(),
            error: "before".into(),
        };
        let tried = retry_leftovers(
            dir.path(),
            vec![
                left(&gone),
                left(&dir.path().join(".partial-never")),
                left(&sealed),
            ],
        );
        assert_eq!(tried[0], (gone.clone(), Ok(())));
        assert!(!gone.exists());
        assert_eq!(tried[1].1, Ok(()), "already gone counts as removed");
        assert!(
            tried[2]
                .1
                .as_ref()
                .is_err_and(|e| e.contains("not a partial"))
        );
        assert!(sealed.is_dir());
    }
}
