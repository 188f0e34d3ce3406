//! Passive protection (README.md "How it protects"; docs/operations.md "Protection, held
//! servers and releases"): snapshot before every Immich version change, freeze a server that
//! starts on an image no sealed snapshot covers, fail closed, refuse downgrades.
//!
//! One task owns the decisions. The Docker event loop hands it container starts at once
//! (before any debounce), image pulls/tags, and every discovery result; the compose watcher
//! hands it `.env`/compose changes. A start is decided from what the task already knows
//! (the image the database last ran with, the change a sealed snapshot covers), so the pause
//! is one Docker call after the event. What it decided is persisted in the data dir, so a
//! restarted daemon still holds what it held and still knows the version that migrated last.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::InspectContainerOptions;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::compose::{ComposeEvent, ComposeView, ComposeWatcher, read_view};
use crate::config::Config;
use crate::discover::Stack;
use crate::image_ref::ImageRef;
use crate::notification::{Event as Notice, EventKind, Notifier};
use crate::post_upgrade::{Verifies, VerifyDue};
use crate::snapshot::queue::{DockerHandle, Event as SnapshotEvent, SnapshotQueue};
use crate::snapshot::store::Store;
use crate::status::DaemonState;

mod restoring;
pub use restoring::{RestoreEnd, RestoreInput};

/// How long a `.env` must be quiet before its change counts (editors write in bursts).
const COMPOSE_DEBOUNCE: Duration = crate::compose::DEFAULT_DEBOUNCE;
/// Freeze delays kept for `status`.
const DELAYS_KEPT: usize = 200;
const RELEASES_KEPT: usize = 20;
const STATE_FILE: &str = "protection.json";
/// How long a crash loop's diagnosis may wait for the database's migration list.
const FACTS_TIMEOUT: Duration = Duration::from_secs(3);
/// A snapshot sealed for a pending change covers a server start this long after; older, the
/// old server may have written since, so the new one is frozen and snapshotted again.
const COVER_FRESH: chrono::TimeDelta = chrono::TimeDelta::minutes(15);

/// The image the database last ran with: a server on it needs no snapshot to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    pub version: String,
    pub image_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtectState {
    Idle,
    Snapshotting,
    Frozen,
    Held,
    /// A crash-looping container was stopped; see the incident.
    Halted,
    /// The verify after an upgrade failed (docs/operations.md "DEGRADED"): shown until
    /// `immich-guard ack` or a later verify passes.
    Degraded,
    /// The server is paused, not by a freeze this daemon recorded (docs/operations.md "A
    /// server paused at start"): left paused until the admin says.
    Paused,
}

/// A server found paused with no freeze of ours recorded for it: the admin's, or a run that
/// stopped between its pause and writing it down. Never unpaused without being asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PausedServer {
    pub container: String,
    pub container_name: String,
    pub image_id: String,
    pub version: String,
    pub seen_at: DateTime<Utc>,
}

/// A version change seen before the new server runs, and the snapshot that covers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingChange {
    pub from: String,
    pub to: String,
    /// The new image, when the change came from an image (pull/tag) or a start.
    pub to_image: Option<String>,
    /// `.env`, `compose file`, `image pull`, `server start`, `startup reconcile`.
    pub source: String,
    pub detected_at: DateTime<Utc>,
    /// Sealed snapshot taken for this change.
    pub snapshot: Option<String>,
    #[serde(default)]
    pub sealed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldKind {
    SnapshotFailed,
    Downgrade,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hold {
    pub kind: HoldKind,
    pub container: String,
    pub container_name: String,
    /// The image it was created from (becomes the baseline when released).
    #[serde(default)]
    pub image_id: String,
    pub version: String,
    /// Paused, or stopped when pausing failed.
    pub paused: bool,
    pub reason: String,
    /// What the admin can do, as commands.
    pub hint: String,
    pub since: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frozen {
    pub container: String,
    pub container_name: String,
    pub image_id: String,
    pub version: String,
    pub since: DateTime<Utc>,
    /// From the start event's timestamp to the pause returning.
    pub delay_ms: f64,
}

/// A held server is released the way a frozen one is thawed.
impl From<&Hold> for Frozen {
    fn from(hold: &Hold) -> Frozen {
        Frozen {
            container: hold.container.clone(),
            container_name: hold.container_name.clone(),
            image_id: hold.image_id.clone(),
            version: hold.version.clone(),
            since: hold.since,
            delay_ms: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub at: DateTime<Utc>,
    pub container_name: String,
    pub forced: bool,
    pub what: String,
}

/// Everything protection knows about one compose project; published in `status` and
/// persisted in `protection.json` under the project's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Protection {
    /// The compose project this state belongs to; None before any stack was found.
    #[serde(default)]
    pub project: Option<String>,
    pub state: ProtectState,
    pub baseline: Option<Baseline>,
    pub pending: Option<PendingChange>,
    pub frozen: Option<Frozen>,
    pub hold: Option<Hold>,
    /// Newest sealed snapshot per version.
    pub last_snapshot_per_version: BTreeMap<String, String>,
    pub freeze_delays_ms: Vec<f64>,
    pub releases: Vec<Release>,
    pub fail_open: bool,
    /// Containers stopped for crash-looping, with the restart policy to give back.
    #[serde(default)]
    pub halted: Vec<crate::incident::Halted>,
    /// The newest incident.
    #[serde(default)]
    pub incident: Option<crate::incident::Incident>,
    /// The change the server has just made (the new version started): still "the update in
    /// progress" for a crash loop until the new server has run a whole crash-loop window
    /// without dying.
    #[serde(default)]
    pub settling: Option<Settling>,
    /// When the baseline became what it is: a pin recorded before it judged another database.
    #[serde(default)]
    pub baseline_since: Option<DateTime<Utc>>,
    /// Verify after every upgrade: the one owed, the newest result, DEGRADED.
    #[serde(default)]
    pub verifies: Verifies,
    /// The protective snapshot running now (docs/operations.md "A snapshot that does not
    /// finish").
    #[serde(default)]
    pub snapshot_run: Option<SnapshotRun>,
    #[serde(default)]
    pub paused_server: Option<PausedServer>,
}

/// The protective snapshot running now, and the step it is at: what a frozen server waits on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRun {
    pub trigger: String,
    pub since: DateTime<Utc>,
    /// The last progress line (what it is doing now).
    pub step: String,
    pub step_since: DateTime<Utc>,
}

impl SnapshotRun {
    /// `running 4 min, 3 min at: dumping with pg_dumpall` for `status`.
    pub fn waiting(&self, now: DateTime<Utc>) -> String {
        format!(
            "running {}, {} at: {}",
            for_how_long(now - self.since),
            for_how_long(now - self.step_since),
            self.step
        )
    }
}

fn for_how_long(d: chrono::TimeDelta) -> String {
    match d.num_seconds().max(0) {
        s if s < 120 => format!("{s} s"),
        s => format!("{} min", s / 60),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settling {
    pub change: PendingChange,
    pub since: DateTime<Utc>,
}

impl Default for Protection {
    fn default() -> Self {
        Protection {
            project: None,
            state: ProtectState::Idle,
            baseline: None,
            pending: None,
            frozen: None,
            hold: None,
            last_snapshot_per_version: BTreeMap::new(),
            freeze_delays_ms: Vec::new(),
            releases: Vec::new(),
            fail_open: false,
            halted: Vec::new(),
            incident: None,
            settling: None,
            baseline_since: None,
            verifies: Verifies::default(),
            snapshot_run: None,
            paused_server: None,
        }
    }
}

impl Protection {
    /// p50 and p99 of the freeze delays seen, in ms.
    pub fn delay_percentiles(&self) -> Option<(f64, f64)> {
        percentiles(&self.freeze_delays_ms)
    }

    /// A state with nothing known yet, for `project`.
    pub fn fresh(project: &str) -> Protection {
        Protection {
            project: Some(project.to_string()),
            ..Protection::default()
        }
    }

    /// The containers this state names (halted, frozen, held): what ties a state of unknown
    /// project to a stack.
    fn containers(&self) -> impl Iterator<Item = &str> {
        self.halted
            .iter()
            .map(|h| h.container.as_str())
            .chain(self.frozen.iter().map(|f| f.container.as_str()))
            .chain(self.hold.iter().map(|h| h.container.as_str()))
    }

    fn settle_state(&mut self, snapshotting: bool) {
        self.state = if self.hold.is_some() {
            ProtectState::Held
        } else if !self.halted.is_empty() {
            ProtectState::Halted
        } else if self.frozen.is_some() {
            ProtectState::Frozen
        } else if self.paused_server.is_some() {
            ProtectState::Paused
        } else if self.verifies.degraded.is_some() {
            ProtectState::Degraded
        } else if snapshotting {
            ProtectState::Snapshotting
        } else {
            ProtectState::Idle
        };
    }
}

impl Protection {
    /// The version (and image ID) the data belongs to, for a snapshot's record: the one the
    /// database last ran with (the baseline), even while a newer server is frozen before
    /// its first start. `None` before any baseline: the snapshot takes the stack's own.
    pub fn data_version(&self) -> Option<(String, String)> {
        self.baseline
            .as_ref()
            .map(|b| (b.version.clone(), b.image_id.clone()))
    }
}

pub fn percentiles(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some((at(0.5), at(0.99)))
}

// In `version` so that the snapshot store can compare versions without importing protection.
use crate::version::is_older;
pub use crate::version::{parse_version, same_version};

/// What the Docker event loop hands the guard.
#[derive(Debug)]
pub enum Input {
    /// A container of some compose project started.
    Started(ContainerEvent),
    /// An image was pulled or tagged: `reference` is a name or an ID.
    Image {
        reference: String,
    },
    /// A discovery's result; `listed_at`: when it began listing containers.
    Discovered {
        stack: Box<Stack>,
        listed_at: DateTime<Utc>,
    },
    /// A container of some compose project died.
    Died(ContainerEvent),
    /// Someone sent it a signal (`docker stop`, `kill`, `restart`): its next death is theirs.
    Killed(ContainerEvent),
    Release {
        force: bool,
        /// A halted service to give its restart policy back and start.
        service: Option<String>,
        reply: oneshot::Sender<Result<String, String>>,
    },
    SnapshotDone(Result<(String, String), String>),
    /// A progress line of the protective snapshot running.
    SnapshotProgress(String),
    /// `immich-guard ack`: the admin has seen the DEGRADED.
    Ack {
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// A verify the daemon owed has run (post_upgrade.rs).
    Verified {
        due: VerifyDue,
        report: Box<crate::verify::Report>,
        /// The server container it ran against.
        server: Option<String>,
    },
    /// `immich-guard restore` through the daemon (protect/restoring.rs).
    Restore(RestoreInput),
}

#[derive(Debug, Clone)]
pub struct ContainerEvent {
    pub container_id: String,
    pub name: String,
    /// The image as the container was created with (a reference or an ID).
    pub image: String,
    pub project: Option<String>,
    pub service: Option<String>,
    /// The engine's timestamp of the event.
    pub at: DateTime<Utc>,
}

/// Sends inputs to the guard; cheap to clone.
#[derive(Clone)]
pub struct GuardHandle {
    tx: mpsc::UnboundedSender<Input>,
}

impl GuardHandle {
    pub fn send(&self, input: Input) {
        let _ = self.tx.send(input);
    }

    pub async fn release(&self, force: bool, service: Option<String>) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Release {
            force,
            service,
            reply,
        });
        rx.await
            .unwrap_or_else(|_| Err("protection has stopped".into()))
    }

    /// Acknowledges a DEGRADED; the answer says what was cleared.
    pub async fn ack(&self) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Ack { reply });
        rx.await
            .unwrap_or_else(|_| Err("protection has stopped".into()))
    }
}

pub struct Guard {
    config: Config,
    state: Arc<watch::Sender<DaemonState>>,
    docker: DockerHandle,
    queue: SnapshotQueue,
    notifier: Notifier,
    tx: mpsc::UnboundedSender<Input>,
    /// The state of the project being protected (`protection.project`).
    protection: Protection,
    /// Every other project's state, kept for when it comes back.
    states: StateFile,
    stack: Option<Stack>,
    /// Image reference → ID, learned from discovery and image events.
    image_ids: HashMap<String, String>,
    /// Image ID → version name.
    versions: HashMap<String, String>,
    compose: Option<(PathBuf, ComposeWatcher)>,
    /// What the compose config names now (the image a `compose pull` would fetch).
    compose_view: Option<ComposeView>,
    compose_rx: Option<mpsc::Receiver<ComposeEvent>>,
    snapshotting: bool,
    /// Callers of `release` waiting for the retried snapshot.
    release_waiters: Vec<oneshot::Sender<Result<String, String>>>,
    state_file: PathBuf,
    deaths: crate::crashloop::Detector,
    /// Containers sent a signal by someone (a stop, kill or restart by hand), until they
    /// start again.
    stopping: std::collections::HashSet<String>,
    /// A post-upgrade verify is running (its result comes back as `Input::Verified`).
    verifying: bool,
    /// A restore runs, or one is unfinished: protection stands back (protect/restoring.rs).
    restore: Option<restoring::Mode>,
}

impl Guard {
    pub fn start(
        config: Config,
        state: Arc<watch::Sender<DaemonState>>,
        docker: DockerHandle,
        queue: SnapshotQueue,
        notifier: Notifier,
    ) -> GuardHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let state_file = config.daemon.data_dir.join(STATE_FILE);
        let configured = config.stack.project.as_deref();
        let mut states = load(&state_file, configured).unwrap_or_else(|e| {
            tracing::warn!(file = %state_file.display(), error = %e, "cannot read the protection state; starting afresh");
            StateFile::default()
        });
        // A configured project is known before discovery: a restart resumes its state at
        // once. So does the only project of a host that had one (a start before the first
        // discovery is judged as before the restart); discovery corrects either.
        let only = (states.projects.len() == 1)
            .then(|| states.projects.keys().next().cloned())
            .flatten();
        let mut protection = match configured.map(str::to_string).or(only) {
            Some(p) => states
                .projects
                .remove(&p)
                .unwrap_or_else(|| Protection::fresh(&p)),
            None => Protection::default(),
        };
        protection.fail_open = config.protect.fail_open;
        // No snapshot survives a restart; a freeze left waiting asks for a new one.
        protection.snapshot_run = None;
        let deaths = crate::crashloop::Detector::new(
            config.crash_loop.deaths,
            config.crash_loop.window_secs,
        );
        let mut guard = Guard {
            config,
            state,
            docker,
            queue,
            notifier,
            tx: tx.clone(),
            protection,
            states,
            stack: None,
            image_ids: HashMap::new(),
            versions: HashMap::new(),
            compose: None,
            compose_view: None,
            compose_rx: None,
            snapshotting: false,
            release_waiters: Vec::new(),
            state_file,
            deaths,
            stopping: Default::default(),
            verifying: false,
            restore: None,
        };
        guard.refresh_snapshot_index();
        guard.publish();
        tokio::spawn(guard.run(rx));
        GuardHandle { tx }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        loop {
            // Nothing is settled or verified while a restore has the stack.
            let wakeup = self.restore.is_none().then(|| self.next_wakeup()).flatten();
            let compose = async {
                match self.compose_rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let wait = async {
                match wakeup {
                    Some(at) => {
                        let left = (at - Utc::now()).to_std().unwrap_or_default();
                        tokio::time::sleep(left).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => self.handle(input).await,
                    None => return,
                },
                Some(event) = compose => match self.restore {
                    None => self.on_compose(event).await,
                    Some(_) => self.compose_while_restoring(event),
                },
                () = wait => self.on_wakeup().await,
            }
        }
    }

    fn docker(&self) -> Option<Docker> {
        self.docker.borrow().as_ref().map(|(d, _)| d.clone())
    }

    async fn handle(&mut self, input: Input) {
        let Some(input) = self.hold_back_while_restoring(input).await else {
            return;
        };
        match input {
            Input::Started(event) => {
                let id = event.container_id.clone();
                self.on_start(event).await;
                // After a stop/restart by hand, the start resets Docker's RestartCount.
                if self.stopping.remove(&id) {
                    self.take_restart_count(&id).await;
                }
            }
            Input::Killed(event) => {
                self.stopping.insert(event.container_id);
            }
            Input::Image { reference } => self.on_image(&reference).await,
            Input::Discovered { stack, listed_at } => self.on_discovered(*stack, listed_at).await,
            Input::Died(event) => self.on_died(event).await,
            Input::Release {
                service: Some(service),
                reply,
                ..
            } => {
                let result = self.unhalt(&service).await;
                let _ = reply.send(result);
            }
            Input::Release {
                force,
                reply,
                service: None,
            } => self.on_release(force, reply).await,
            Input::SnapshotDone(result) => self.on_snapshot_done(result).await,
            Input::SnapshotProgress(line) => {
                if let Some(run) = &mut self.protection.snapshot_run {
                    run.step = line;
                    run.step_since = Utc::now();
                    self.publish();
                }
            }
            Input::Ack { reply } => {
                let _ = reply.send(self.acknowledge());
            }
            Input::Verified {
                due,
                report,
                server,
            } => self.on_verified(due, *report, server),
            Input::Restore(input) => self.on_restore(input).await,
        }
    }

    fn is_server(&self, event: &ContainerEvent) -> bool {
        match &self.stack {
            Some(stack) => {
                event.project.as_deref() == Some(stack.project.as_str())
                    && match &stack.server {
                        Some(server) => event.service.as_deref() == Some(&server.service),
                        None => ImageRef::parse(&event.image).is_server(),
                    }
            }
            // Before the first discovery: only the configured project, or any Immich server
            // when none is configured (one stack per host).
            None => {
                ImageRef::parse(&event.image).is_server()
                    && match &self.config.stack.project {
                        Some(project) => event.project.as_deref() == Some(project.as_str()),
                        None => true,
                    }
            }
        }
    }

    /// The heart of it: decide from what is known, pause first, look closer after.
    async fn on_start(&mut self, event: ContainerEvent) {
        if !self.is_server(&event) {
            return;
        }
        let ours = |c: &str| c == event.container_id;
        if self
            .protection
            .frozen
            .as_ref()
            .is_some_and(|f| ours(&f.container))
            || self
                .protection
                .hold
                .as_ref()
                .is_some_and(|h| ours(&h.container))
        {
            return;
        }
        let known_id = if event.image.starts_with("sha256:") {
            Some(event.image.clone())
        } else {
            self.image_ids.get(&event.image).cloned()
        };
        if let Some(id) = &known_id
            && self.starts_freely(id)
        {
            self.accept(id).await;
            return;
        }
        let Some(docker) = self.docker() else { return };
        // Pause before anything else: the server must not reach its migrations.
        let paused = docker.pause_container(&event.container_id).await;
        if paused.as_ref().is_err_and(crate::docker::is_not_found) {
            // A start event read after the container was removed (seen with compose v2's
            // recreate): nothing runs that could migrate; the new container's own start
            // event comes next and is judged on its own.
            tracing::info!(container = %event.name, id = %event.container_id, "a started server is already gone; nothing to freeze");
            return;
        }
        let paused = paused.map_err(|e| e.to_string());
        let delay_ms = (Utc::now() - event.at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        let (image_id, version) = self.container_image(&docker, &event.container_id).await;
        if let Err(e) = &paused {
            tracing::error!(container = %event.name, error = %e, "could not pause the new server");
        } else {
            tracing::info!(container = %event.name, delay_ms, version = %version, "froze the new server");
            push_bounded(&mut self.protection.freeze_delays_ms, delay_ms, DELAYS_KEPT);
        }
        let image_id = image_id.unwrap_or_default();
        if let Some(baseline) = self.protection.baseline.clone()
            && is_older(&version, &baseline.version)
            && self.rollback_pinned(&version).is_none()
        {
            self.hold_downgrade(
                &docker,
                &event,
                &version,
                &image_id,
                &baseline,
                paused.is_ok(),
            )
            .await;
            return;
        }
        if self.starts_freely(&image_id) {
            // Known after all (a tag the cache had not seen): let it go at once.
            if paused.is_ok() {
                let _ = docker.unpause_container(&event.container_id).await;
            }
            self.accept(&image_id).await;
            return;
        }
        if paused.is_err() {
            // Could not freeze it: stop it rather than let it migrate unprotected.
            let stopped = docker
                .stop_container(
                    &event.container_id,
                    None::<bollard::query_parameters::StopContainerOptions>,
                )
                .await;
            tracing::warn!(container = %event.name, stopped = stopped.is_ok(), "stopped the new server instead");
        }
        self.protection.frozen = Some(Frozen {
            container: event.container_id.clone(),
            container_name: event.name.clone(),
            image_id: image_id.clone(),
            version: version.clone(),
            since: Utc::now(),
            delay_ms,
        });
        let from = self.baseline_version();
        let pending_matches = self.protection.pending.as_ref().is_some_and(|p| {
            p.to_image.as_deref() == Some(&image_id) || same_version(&p.to, &version)
        });
        if !pending_matches {
            self.protection.pending = Some(PendingChange {
                from: from.clone(),
                to: version.clone(),
                to_image: Some(image_id),
                source: "server start".into(),
                detected_at: Utc::now(),
                snapshot: None,
                sealed_at: None,
            });
        }
        self.announce(
            EventKind::Frozen,
            format!("Froze Immich {version} until a snapshot of {from} is sealed"),
            format!(
                "{} started on {version} {delay_ms:.1} ms ago with no sealed snapshot of {from} covering the change; it is paused until one is sealed.",
                event.name
            ),
        );
        // Before the first discovery there is nothing to snapshot yet; the first discovery
        // finishes the freeze (see `resume_after_restart`).
        if self.stack.is_some() {
            self.request_snapshot("pre-start").await;
        }
        self.publish();
    }

    /// A server on this image may start without a snapshot: the database already ran with it,
    /// or a snapshot sealed for this very change covers it.
    fn starts_freely(&self, image_id: &str) -> bool {
        if self.protection.hold.is_some() {
            return false;
        }
        if let Some(b) = &self.protection.baseline {
            if b.image_id == image_id {
                return true;
            }
            // A downgrade is never covered (the old version cannot run on a newer schema),
            // unless `immich-guard pin` judged and recorded this very rollback.
            if self
                .versions
                .get(image_id)
                .is_none_or(|v| is_older(v, &b.version) && self.rollback_pinned(v).is_none())
            {
                return false;
            }
        }
        self.covered_now()
    }

    /// A snapshot sealed for the pending change, recently enough that the database is still
    /// as it was (the old server stops within minutes of a pull in every upgrade path).
    fn covered_now(&self) -> bool {
        self.protection
            .pending
            .as_ref()
            .and_then(|p| p.sealed_at)
            .is_some_and(|at| Utc::now() - at < COVER_FRESH)
    }

    /// The server runs `image_id` from now on: it is the new baseline.
    async fn accept(&mut self, image_id: &str) {
        let version = self
            .versions
            .get(image_id)
            .cloned()
            .unwrap_or_else(|| crate::discover::short_id(image_id).to_string());
        let changed = self
            .protection
            .baseline
            .as_ref()
            .is_none_or(|b| b.image_id != image_id);
        if changed {
            tracing::info!(version = %version, image = %crate::discover::short_id(image_id), "the server runs a new version; it is the new baseline");
            self.set_baseline(Baseline {
                version,
                image_id: image_id.to_string(),
            });
            if let Some(change) = self.protection.pending.take() {
                self.protection.settling = Some(Settling {
                    change,
                    since: Utc::now(),
                });
            }
        }
        self.publish();
    }

    async fn container_image(&mut self, docker: &Docker, id: &str) -> (Option<String>, String) {
        let Ok(inspect) = docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        else {
            return (None, "unknown".into());
        };
        let Some(image_id) = inspect.image else {
            return (None, "unknown".into());
        };
        let version = self.learn_image(docker, &image_id).await;
        (Some(image_id), version.unwrap_or_else(|| "unknown".into()))
    }

    /// Inspects an image, remembers its ID and version; returns the version.
    async fn learn_image(&mut self, docker: &Docker, reference: &str) -> Option<String> {
        let image = docker.inspect_image(reference).await.ok()?;
        let id = image.id.clone()?;
        let tags = image.repo_tags.clone().unwrap_or_default();
        let version = crate::discover::ImmichVersion {
            tag: None,
            image_id: id.clone(),
            repo_digests: image.repo_digests.clone().unwrap_or_default(),
            repo_tags: tags.clone(),
            label: image
                .config
                .as_ref()
                .and_then(|c| c.labels.as_ref())
                .and_then(|l| l.get("org.opencontainers.image.version").cloned()),
        }
        .name();
        for tag in tags {
            self.image_ids.insert(tag, id.clone());
        }
        self.image_ids.insert(reference.to_string(), id.clone());
        self.versions.insert(id, version.clone());
        Some(version)
    }

    /// Whether `reference` is an image this stack's server runs or its compose config names:
    /// another project's images, or other tags of the repo, are none of our business.
    fn is_our_server_image(&self, reference: &str) -> bool {
        let normal = |r: &str| ImageRef::parse(r).normalized();
        let reference = normal(reference);
        let running = self
            .stack
            .as_ref()
            .and_then(|s| s.server.as_ref())
            .map(|s| s.image.as_str());
        let configured = self
            .compose_view
            .as_ref()
            .and_then(|v| v.server_image.as_deref());
        running
            .into_iter()
            .chain(configured)
            .any(|r| normal(r) == reference)
    }

    async fn on_image(&mut self, reference: &str) {
        if !self.is_our_server_image(reference) {
            return;
        }
        let Some(docker) = self.docker() else { return };
        let Some(version) = self.learn_image(&docker, reference).await else {
            return;
        };
        let id = self.image_ids.get(reference).cloned().unwrap_or_default();
        let Some(baseline) = self.protection.baseline.clone() else {
            return;
        };
        if baseline.image_id == id {
            return;
        }
        if let Some(p) = &mut self.protection.pending
            && Utc::now() - p.detected_at < COVER_FRESH
        {
            // The change is already known (e.g. `.env` first, then the pull): same snapshot,
            // unless the one for it failed.
            p.to = version;
            p.to_image = Some(id);
            let retry = p.snapshot.is_none() && !self.snapshotting;
            if retry {
                self.request_snapshot("pre-update").await;
            }
            self.publish();
            return;
        }
        tracing::info!(image = %reference, version = %version, "a new Immich server image arrived");
        self.protection.pending = Some(PendingChange {
            from: baseline.version.clone(),
            to: version,
            to_image: Some(id),
            source: "image pull".into(),
            detected_at: Utc::now(),
            snapshot: None,
            sealed_at: None,
        });
        self.request_snapshot("pre-update").await;
        self.publish();
    }

    async fn on_compose(&mut self, event: ComposeEvent) {
        match event {
            ComposeEvent::Changed { before, after } => {
                self.compose_view = Some(after.clone());
                self.show_env(&after);
                if after.env_missing {
                    // Compose would fall back to `release`, but nobody chose that: an absent
                    // file is reported, never read as a version (docs/operations.md).
                    if !before.env_missing {
                        tracing::warn!(
                            "the compose .env is missing; no version change is inferred from its absence"
                        );
                    }
                    return;
                }
                let image_changed = before.server_image != after.server_image;
                let version_changed = before.immich_version != after.immich_version;
                if !image_changed && !version_changed {
                    return;
                }
                let to = after
                    .immich_version
                    .clone()
                    .or_else(|| {
                        after
                            .server_image
                            .as_deref()
                            .and_then(|i| ImageRef::parse(i).tag().map(str::to_string))
                    })
                    .unwrap_or_else(|| "unknown".into());
                tracing::info!(
                    from = ?before.immich_version,
                    to = %to,
                    server_image = ?after.server_image,
                    "the compose config names another Immich version"
                );
                self.note_env_change(
                    &to,
                    if version_changed {
                        ".env"
                    } else {
                        "compose file"
                    },
                )
                .await;
            }
            ComposeEvent::Error(message) => {
                tracing::warn!(error = %message, "cannot read the compose config");
            }
        }
    }

    /// `status` shows the `.env` version as it is now, not as the last discovery read it.
    fn show_env(&mut self, view: &ComposeView) {
        let apply = |stack: &mut Stack| {
            stack.env_version = view.immich_version.clone();
            let note = stack
                .env_file
                .as_deref()
                .map(crate::discover::env_missing_note);
            stack.notes.retain(|n| Some(n) != note.as_ref());
            if view.env_missing
                && let Some(note) = note
            {
                stack.notes.push(note);
            }
        };
        if let Some(stack) = &mut self.stack {
            apply(stack);
        }
        self.state.send_modify(|s| {
            if let Some(stack) = &mut s.stack {
                apply(stack);
            }
        });
    }

    async fn note_env_change(&mut self, to: &str, source: &str) {
        let from = self.baseline_version();
        if same_version(to, &from) {
            // Set back to the version the database runs: nothing is going to change, whatever
            // was seen or snapshotted for the change meanwhile. A server already frozen or
            // held for it is another matter (it exists): that stays until released.
            if self.protection.frozen.is_none()
                && self.protection.hold.is_none()
                && let Some(p) = self.protection.pending.take()
            {
                tracing::info!(change = %format!("{} → {}", p.from, p.to), source = %p.source, now = %to, "the compose config names the baseline version again; the pending change is dropped");
                self.publish();
            }
            return;
        }
        if self
            .protection
            .pending
            .as_ref()
            .is_some_and(|p| same_version(&p.to, to))
        {
            return;
        }
        self.protection.pending = Some(PendingChange {
            from,
            to: to.to_string(),
            to_image: None,
            source: source.into(),
            detected_at: Utc::now(),
            snapshot: None,
            sealed_at: None,
        });
        self.request_snapshot("pre-update").await;
        self.publish();
    }

    async fn on_discovered(&mut self, stack: Stack, listed_at: DateTime<Utc>) {
        self.switch_project(&stack);
        if let Some(server) = &stack.server {
            self.image_ids
                .insert(server.image.clone(), server.image_id.clone());
            if let Some(v) = &stack.version {
                self.versions.insert(v.image_id.clone(), v.name());
            }
        }
        self.watch_compose(&stack);
        let first = self.stack.is_none();
        self.stack = Some(stack.clone());
        let running = stack
            .server
            .as_ref()
            .filter(|s| s.state == "running")
            .zip(stack.version.as_ref());
        match (&self.protection.baseline, running) {
            (None, Some((server, version))) => {
                tracing::info!(version = %version.name(), "baseline: the version the database runs with");
                self.set_baseline(Baseline {
                    version: version.name(),
                    image_id: server.image_id.clone(),
                });
            }
            (Some(b), Some((server, version)))
                if b.image_id != server.image_id
                    && self.protection.frozen.is_none()
                    && self.protection.hold.is_none() =>
            {
                if first {
                    tracing::warn!(
                        was = %b.version,
                        now = %version.name(),
                        "the server changed version while the guard was not running"
                    );
                    self.set_baseline(Baseline {
                        version: version.name(),
                        image_id: server.image_id.clone(),
                    });
                } else if !self.starts_freely(&server.image_id) {
                    // Its start event is still on its way (discovery ran first): act now.
                    let event = ContainerEvent {
                        container_id: server.container_id.clone(),
                        name: server.container_name.clone(),
                        image: server.image_id.clone(),
                        project: Some(stack.project.clone()),
                        service: Some(server.service.clone()),
                        at: Utc::now(),
                    };
                    self.on_start(event).await;
                }
            }
            _ => {}
        }
        if first {
            self.resume_after_restart(&stack).await;
        }
        self.note_paused(&stack);
        self.forget_removed(&stack);
        self.reconcile_restarts(&stack, listed_at).await;
        self.settle(&stack);
        self.reverify_recreated(&stack);
        self.publish();
    }

    /// Discovery found another project than the one whose state is held: that one's state is
    /// put away (kept for when it comes back) and the found project's own is taken, or a fresh
    /// one. It is then resumed as after a restart.
    fn switch_project(&mut self, stack: &Stack) {
        if self.protection.project.as_deref() == Some(stack.project.as_str()) {
            return;
        }
        let previous = std::mem::take(&mut self.protection);
        let mut next = match self.states.projects.remove(&stack.project) {
            Some(state) => state,
            None => self.adopt_unattributed(stack),
        };
        match previous.project.clone() {
            Some(name) => {
                tracing::info!(from = %name, to = %stack.project, "another compose project found: its own protection state is used, the previous one's is kept");
                self.states.projects.insert(name, previous);
            }
            // Before the first discovery (no project known), a server start may already have
            // been frozen or held: that is this stack's.
            None => {
                next.frozen = next.frozen.take().or(previous.frozen);
                next.hold = next.hold.take().or(previous.hold);
                next.pending = next.pending.take().or(previous.pending);
                next.freeze_delays_ms.extend(previous.freeze_delays_ms);
                next.releases.extend(previous.releases);
            }
        }
        next.project = Some(stack.project.clone());
        next.fail_open = self.config.protect.fail_open;
        self.protection = next;
        self.stack = None;
        self.refresh_snapshot_index();
    }

    /// The state of an older file (no project recorded) belongs to the stack whose containers
    /// it names; otherwise the stack starts fresh and the old state stays unattributed.
    fn adopt_unattributed(&mut self, stack: &Stack) -> Protection {
        let ours = self.states.unattributed.as_ref().is_some_and(|old| {
            old.containers()
                .any(|c| stack.services().any(|s| s.container_id == c))
        });
        match self.states.unattributed.take_if(|_| ours) {
            Some(old) => {
                tracing::info!(project = %stack.project, "the protection state of an older version names this stack's containers: it is this stack's");
                old
            }
            None => Protection::fresh(&stack.project),
        }
    }

    /// After a daemon restart: a freeze left half-done is finished, and a `.env` that names
    /// another version than the database runs is a change in progress.
    async fn resume_after_restart(&mut self, stack: &Stack) {
        if let Some(frozen) = &self.protection.frozen {
            tracing::warn!(container = %frozen.container_name, "a freeze is waiting for its snapshot; taking it now");
            self.request_snapshot("pre-start").await;
            return;
        }
        if let Some(env) = &stack.env_version
            && parse_version(env).is_some()
            && !same_version(env, &self.baseline_version())
            && self.protection.hold.is_none()
        {
            let env = env.clone();
            self.note_env_change(&env, "startup reconcile").await;
        }
    }

    /// A server paused that no freeze or hold of ours names is reported, never unpaused
    /// silently: the admin may have paused it, or a run stopped between pausing it and writing
    /// that down. `release` takes it over (docs/operations.md "A server paused at start").
    fn note_paused(&mut self, stack: &Stack) {
        let paused = stack.server.as_ref().filter(|s| {
            s.state == "paused"
                && self
                    .protection
                    .frozen
                    .as_ref()
                    .is_none_or(|f| f.container != s.container_id)
                && self
                    .protection
                    .hold
                    .as_ref()
                    .is_none_or(|h| h.container != s.container_id)
        });
        let Some(server) = paused else {
            if let Some(was) = self.protection.paused_server.take() {
                tracing::info!(container = %was.container_name, "the paused server is no longer paused");
            }
            return;
        };
        if self
            .protection
            .paused_server
            .as_ref()
            .is_some_and(|p| p.container == server.container_id)
        {
            return;
        }
        let version = stack
            .version
            .as_ref()
            .map(|v| v.name())
            .unwrap_or_else(|| "unknown".into());
        tracing::warn!(container = %server.container_name, version = %version, "the server is paused and no freeze of immich-guard is recorded for it; left paused: `immich-guard release` snapshots if needed and unpauses it");
        self.protection.paused_server = Some(PausedServer {
            container: server.container_id.clone(),
            container_name: server.container_name.clone(),
            image_id: server.image_id.clone(),
            version,
            seen_at: Utc::now(),
        });
    }

    fn watch_compose(&mut self, stack: &Stack) {
        let Some(dir) = stack.compose_dir.clone() else {
            return;
        };
        if self.compose.as_ref().is_some_and(|(d, _)| d == &dir) {
            return;
        }
        match ComposeWatcher::spawn(
            dir.clone(),
            stack.compose_files.clone(),
            stack.env_file.clone(),
            COMPOSE_DEBOUNCE,
        ) {
            Ok((watcher, rx)) => {
                tracing::info!(dir = %dir.display(), "watching the compose dir");
                self.compose_view =
                    read_view(&dir, &stack.compose_files, stack.env_file.as_deref()).ok();
                self.compose = Some((dir, watcher));
                self.compose_rx = Some(rx);
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the compose dir")
            }
        }
    }

    /// The database runs with `b` from now on; a change of image restarts `baseline_since`.
    fn set_baseline(&mut self, b: Baseline) {
        let same = self
            .protection
            .baseline
            .as_ref()
            .is_some_and(|old| old.image_id == b.image_id);
        if let Some(old) = &self.protection.baseline
            && is_older(&b.version, &old.version)
            && let Some(pin) = self.rollback_pinned(&b.version)
        {
            tracing::info!(
                from = %old.version,
                to = %b.version,
                pinned_at = %pin.at,
                forced = pin.forced,
                by = %pin.by,
                "a rollback recorded by `immich-guard pin`: not held as a downgrade"
            );
        }
        if !same || self.protection.baseline_since.is_none() {
            self.protection.baseline_since = Some(Utc::now());
        }
        self.protection.baseline = Some(b);
    }

    fn baseline_version(&self) -> String {
        self.protection
            .baseline
            .as_ref()
            .map(|b| b.version.clone())
            .unwrap_or_else(|| "unknown".into())
    }

    async fn request_snapshot(&mut self, trigger: &str) {
        if self.snapshotting {
            // The running one joins; its result settles this change too.
            return;
        }
        self.snapshotting = true;
        let now = Utc::now();
        self.protection.snapshot_run = Some(SnapshotRun {
            trigger: trigger.to_string(),
            since: now,
            step: "queued".into(),
            step_since: now,
        });
        let label = self
            .protection
            .pending
            .as_ref()
            .map(|p| format!("{} → {} ({})", p.from, p.to, p.source));
        // The stack as last published (none between `compose down` and `up`).
        let stack = self.state.borrow().stack.clone();
        let mut events = self
            .queue
            .request(crate::snapshot::Request {
                stack,
                trigger: trigger.into(),
                label,
                version: self.protection.data_version(),
            })
            .await;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let done = match event {
                    SnapshotEvent::Progress(p) => {
                        let _ = tx.send(Input::SnapshotProgress(p.text().to_string()));
                        continue;
                    }
                    SnapshotEvent::Sealed(meta) => Ok((meta.id, meta.version)),
                    SnapshotEvent::Failed(failure) => Err(failure.message),
                };
                let _ = tx.send(Input::SnapshotDone(done));
                return;
            }
            let _ = tx.send(Input::SnapshotDone(Err(
                "the snapshot worker stopped".into()
            )));
        });
        self.publish();
    }

    async fn on_snapshot_done(&mut self, result: Result<(String, String), String>) {
        self.snapshotting = false;
        self.protection.snapshot_run = None;
        self.refresh_snapshot_index();
        match result {
            Ok((id, version)) => {
                if let Some(p) = &mut self.protection.pending {
                    p.snapshot = Some(id.clone());
                    p.sealed_at = Some(Utc::now());
                }
                self.announce(
                    EventKind::SnapshotSealed,
                    format!("Snapshot {id} sealed"),
                    format!("Database and storage of {version} are saved as {id}."),
                );
                let thawed = match self.protection.frozen.take() {
                    Some(frozen) => Some(self.thaw(&frozen).await),
                    None => None,
                };
                if let Some(hold) = self.protection.hold.clone()
                    && hold.kind == HoldKind::SnapshotFailed
                {
                    // A retried snapshot (release) sealed: the hold is over.
                    self.protection.hold = None;
                    let frozen = Frozen::from(&hold);
                    let message = self.thaw(&frozen).await;
                    self.record_release(&hold.container_name, false, &message);
                    for w in self.release_waiters.drain(..) {
                        let _ = w.send(Ok(message.clone()));
                    }
                }
                if let Some(message) = thawed {
                    tracing::info!("{message}");
                }
            }
            Err(message) => {
                tracing::error!(error = %message, "the protective snapshot failed");
                let retried = !self.release_waiters.is_empty();
                for w in self.release_waiters.drain(..) {
                    let _ = w.send(Err(format!("the snapshot failed again: {message}")));
                }
                if let Some(hold) = &mut self.protection.hold
                    && hold.kind == HoldKind::SnapshotFailed
                {
                    // `HELD:` quotes the newest failure, not the first one.
                    hold.reason = snapshot_failed_reason(&hold.version, &message);
                    let (version, reason, hint) =
                        (hold.version.clone(), hold.reason.clone(), hold.hint.clone());
                    if retried {
                        self.announce(
                            EventKind::Held,
                            format!("Immich {version} still held: snapshot failed again"),
                            format!("{reason} {hint}"),
                        );
                        self.publish();
                        return;
                    }
                }
                if let Some(frozen) = self.protection.frozen.take() {
                    if self.protection.fail_open {
                        tracing::warn!(
                            "protect.fail_open = true: releasing the server without a snapshot"
                        );
                        let m = self.thaw(&frozen).await;
                        self.record_release(
                            &frozen.container_name,
                            true,
                            &format!("fail-open: {m}"),
                        );
                    } else {
                        self.hold_frozen(
                            &frozen,
                            snapshot_failed_reason(&frozen.version, &message),
                            "fix the cause, then `immich-guard release` (retries the snapshot), or `immich-guard release --force` to start without one",
                            "snapshot failed",
                        );
                    }
                } else {
                    self.announce(
                        EventKind::SnapshotFailed,
                        "Protective snapshot failed".into(),
                        format!("{message}. A server that starts on the new version will be frozen and snapshotted again."),
                    );
                }
            }
        }
        self.publish();
    }

    /// When a server frozen for the running snapshot stops waiting for it (`snapshots.
    /// max_wait_secs`): fail closed stays, but as a hold the admin is told about and can act on.
    fn freeze_deadline(&self) -> Option<DateTime<Utc>> {
        self.protection.frozen.as_ref()?;
        let run = self.protection.snapshot_run.as_ref()?;
        let wait = chrono::TimeDelta::seconds(self.config.snapshots.max_wait_secs as i64);
        Some(run.since + wait)
    }

    /// The snapshot has not sealed within `max_wait_secs`: the frozen server is HELD (still
    /// paused). The snapshot keeps running; if it seals, the hold ends as after a `release`.
    fn hold_stuck(&mut self) {
        let (Some(frozen), Some(run)) = (
            self.protection.frozen.take(),
            self.protection.snapshot_run.clone(),
        ) else {
            return;
        };
        let reason = format!(
            "the snapshot before starting {} has not sealed within snapshots.max_wait_secs ({} s): {} (since {})",
            frozen.version,
            self.config.snapshots.max_wait_secs,
            run.waiting(Utc::now()),
            run.step_since.format("%Y-%m-%d %H:%M:%S UTC"),
        );
        tracing::error!(reason = %reason, "held the server: its snapshot does not finish");
        self.hold_frozen(
            &frozen,
            reason,
            "find what blocks it (a lock on the database: `SELECT pid, state, query FROM pg_stat_activity`); once it seals the server is released; `immich-guard release` waits for it, `immich-guard release --force` starts the server without a snapshot",
            "snapshot does not finish",
        );
        self.publish();
    }

    /// The frozen server stays paused, as a hold the admin is told about and acts on.
    fn hold_frozen(&mut self, frozen: &Frozen, reason: String, hint: &str, title: &str) {
        let hold = Hold {
            kind: HoldKind::SnapshotFailed,
            container: frozen.container.clone(),
            container_name: frozen.container_name.clone(),
            image_id: frozen.image_id.clone(),
            version: frozen.version.clone(),
            paused: true,
            reason,
            hint: hint.into(),
            since: Utc::now(),
        };
        self.announce(
            EventKind::Held,
            format!("Immich {} held: {title}", frozen.version),
            format!("{} {}", hold.reason, hold.hint),
        );
        self.protection.hold = Some(hold);
    }

    /// Unpauses (or starts, when it had to be stopped) the frozen server; it is the baseline.
    async fn thaw(&mut self, frozen: &Frozen) -> String {
        let Some(docker) = self.docker() else {
            return "Docker unreachable: the server stays paused".into();
        };
        let result = match docker.unpause_container(&frozen.container).await {
            Ok(()) => Ok("unpaused"),
            Err(_) => docker
                .start_container(
                    &frozen.container,
                    None::<bollard::query_parameters::StartContainerOptions>,
                )
                .await
                .map(|_| "started"),
        };
        let message = match result {
            Ok(how) => format!("{how} {} ({})", frozen.container_name, frozen.version),
            Err(e) => format!("could not release {}: {e}", frozen.container_name),
        };
        let image_id = if frozen.image_id.is_empty() {
            self.container_image(&docker, &frozen.container).await.0
        } else {
            Some(frozen.image_id.clone())
        };
        if let Some(image_id) = image_id {
            self.set_baseline(Baseline {
                version: frozen.version.clone(),
                image_id,
            });
        }
        // Released onto its version: the change is made, and settles (then is verified) as
        // one accepted at its start.
        if let Some(change) = self.protection.pending.take() {
            self.protection.settling = Some(Settling {
                change,
                since: Utc::now(),
            });
        }
        message
    }

    async fn hold_downgrade(
        &mut self,
        docker: &Docker,
        event: &ContainerEvent,
        version: &str,
        image_id: &str,
        baseline: &Baseline,
        paused: bool,
    ) {
        if !paused {
            let _ = docker
                .stop_container(
                    &event.container_id,
                    None::<bollard::query_parameters::StopContainerOptions>,
                )
                .await;
        }
        let verdict = self.judge_rollback(version).await;
        let snapshot = self
            .protection
            .last_snapshot_per_version
            .iter()
            .find(|(v, _)| same_version(v, version))
            .map(|(_, id)| id.clone());
        let hint = downgrade_hint(version, &baseline.version, &verdict, snapshot.as_deref());
        let hold = Hold {
            kind: HoldKind::Downgrade,
            container: event.container_id.clone(),
            container_name: event.name.clone(),
            image_id: image_id.to_string(),
            version: version.into(),
            paused,
            reason: format!(
                "refused downgrade: the database was migrated by {}, and {version} cannot run on it",
                baseline.version
            ),
            hint,
            since: Utc::now(),
        };
        tracing::error!(reason = %hold.reason, hint = %hold.hint, "held the server");
        self.announce(
            EventKind::Held,
            format!("Immich downgrade to {version} held"),
            format!("{} {}", hold.reason, hold.hint),
        );
        self.protection.hold = Some(hold);
        self.publish();
    }

    /// The newest pin of this project, when it is a rollback to `version` that `pin` allowed
    /// (or was forced to), made since the database took its current version: a pin made
    /// before judged a database that has changed since.
    fn rollback_pinned(&self, version: &str) -> Option<crate::pin::PinRecord> {
        let project = self.protection.project.as_deref()?;
        let since = self.protection.baseline_since?;
        let records = match crate::pin::records(&self.config.daemon.data_dir) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pins; a downgrade is held");
                return None;
            }
        };
        pinned_rollback(records, project, version, since)
    }

    /// What `pin` would say about going back to `version`: from the sealed snapshots and the
    /// database's migrations (asked briefly: the server is paused meanwhile).
    async fn judge_rollback(&self, version: &str) -> crate::pin::Verdict {
        let snapshots = Store::open(&self.config.snapshot_dir())
            .and_then(|s| s.list())
            .unwrap_or_default();
        let current = match self.stack.as_ref().and_then(|s| s.db.as_ref()) {
            Some(access) => {
                match tokio::time::timeout(FACTS_TIMEOUT, crate::snapshot::db::facts(access)).await
                {
                    Ok(Ok(f)) => Ok(f.migrations),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {} s", FACTS_TIMEOUT.as_secs())),
                }
            }
            None => Err("database access unknown".to_string()),
        };
        crate::pin::judge(
            version,
            self.protection.project.as_deref(),
            &snapshots,
            current.as_deref().map_err(Clone::clone),
        )
    }

    async fn on_release(&mut self, force: bool, reply: oneshot::Sender<Result<String, String>>) {
        if let Some(hold) = self.protection.hold.clone() {
            if !force && hold.kind == HoldKind::Downgrade {
                if let Some(pin) = self.rollback_pinned(&hold.version) {
                    // `immich-guard pin` judged and recorded this rollback since the hold.
                    self.protection.hold = None;
                    let frozen = Frozen::from(&hold);
                    let message = self.thaw(&frozen).await;
                    let what = format!(
                        "{message} (rollback recorded by `immich-guard pin` at {})",
                        pin.at.format("%Y-%m-%d %H:%M:%S UTC")
                    );
                    self.record_release(&hold.container_name, false, &what);
                    let _ = reply.send(Ok(what));
                    self.publish();
                    return;
                }
                let _ = reply.send(Err(format!("{}; {}", hold.reason, hold.hint)));
                return;
            }
            if !force {
                // Retry the snapshot; the hold ends when it is sealed.
                self.release_waiters.push(reply);
                self.request_snapshot("pre-start").await;
                return;
            }
            self.protection.hold = None;
            let frozen = Frozen::from(&hold);
            let message = self.thaw(&frozen).await;
            self.record_release(&hold.container_name, true, &message);
            let _ = reply.send(Ok(format!("forced release: {message}")));
            self.publish();
            return;
        }
        if let Some(frozen) = self.protection.frozen.clone() {
            if !force {
                let _ = reply.send(Err(format!(
                    "{} is frozen while its snapshot runs; it is released when sealed (`release --force` releases it now, unprotected)",
                    frozen.container_name
                )));
                return;
            }
            self.protection.frozen = None;
            let message = self.thaw(&frozen).await;
            self.record_release(&frozen.container_name, true, &message);
            let _ = reply.send(Ok(format!("forced release: {message}")));
            self.publish();
            return;
        }
        if let Some(paused) = self.protection.paused_server.take() {
            let frozen = Frozen {
                container: paused.container,
                container_name: paused.container_name,
                image_id: paused.image_id,
                version: paused.version,
                since: Utc::now(),
                delay_ms: 0.0,
            };
            if force || self.starts_freely(&frozen.image_id) {
                let message = self.thaw(&frozen).await;
                self.record_release(&frozen.container_name, force, &message);
                let _ = reply.send(Ok(message));
            } else {
                // Its version is not what the database ran with: a freeze like any other.
                let _ = reply.send(Ok(format!(
                    "{} ({}) is now frozen by immich-guard: it is unpaused when a snapshot of {} is sealed",
                    frozen.container_name,
                    frozen.version,
                    self.baseline_version()
                )));
                self.protection.frozen = Some(frozen);
                self.request_snapshot("pre-start").await;
            }
            self.publish();
            return;
        }
        let _ = reply.send(Err("nothing is frozen or held".into()));
    }

    fn record_release(&mut self, container: &str, forced: bool, what: &str) {
        tracing::warn!(container, forced, what, "released");
        let release = Release {
            at: Utc::now(),
            container_name: container.into(),
            forced,
            what: what.into(),
        };
        self.protection.releases.push(release);
        let excess = self.protection.releases.len().saturating_sub(RELEASES_KEPT);
        self.protection.releases.drain(..excess);
        self.announce(
            EventKind::Released,
            format!(
                "{container} released{}",
                if forced { " (forced)" } else { "" }
            ),
            what.to_string(),
        );
    }

    async fn on_died(&mut self, event: ContainerEvent) {
        let Some(stack) = self.stack.clone() else {
            return;
        };
        if event.project.as_deref() != Some(stack.project.as_str()) {
            return;
        }
        let Some(docker) = self.docker() else { return };
        if self.is_halted(&event.container_id) {
            return;
        }
        // Docker raises RestartCount before it sends `die` when its policy restarts the
        // container: that is what makes this death part of a loop.
        let read = restart_count(&docker, &event.container_id).await;
        let read_at = Utc::now();
        let Some(restart_count) = read else {
            // Removed: a recreated container starts afresh.
            self.deaths.forget(&event.container_id);
            return;
        };
        let by_hand = self.stopping.contains(&event.container_id);
        tracing::debug!(container = %event.name, restart_count, by_hand, "died");
        if by_hand {
            self.deaths
                .stopped(&event.container_id, restart_count, read_at);
            return;
        }
        let Some(found) = self
            .deaths
            .died(&event.container_id, restart_count, event.at, read_at)
        else {
            return;
        };
        let service = event.service.clone().unwrap_or_else(|| event.name.clone());
        self.crash_loop(
            docker,
            stack,
            service,
            event.container_id,
            event.name,
            found,
        )
        .await;
    }

    /// Takes RestartCount after a start by hand (which resets it), counting no death.
    async fn take_restart_count(&mut self, container_id: &str) {
        let Some(docker) = self.docker() else { return };
        if let Some(count) = restart_count(&docker, container_id).await {
            tracing::debug!(container = %container_id, restart_count = count, "started by hand");
            self.deaths.stopped(container_id, count, Utc::now());
        }
    }

    /// Deaths whose events were missed (Docker was unreachable) show in RestartCount.
    async fn reconcile_restarts(&mut self, stack: &Stack, listed_at: DateTime<Utc>) {
        for service in stack.services() {
            if self.is_halted(&service.container_id) {
                continue;
            }
            let Some(found) =
                self.deaths
                    .observed(&service.container_id, service.restart_count, listed_at)
            else {
                continue;
            };
            let Some(docker) = self.docker() else { return };
            self.crash_loop(
                docker,
                stack.clone(),
                service.service.clone(),
                service.container_id.clone(),
                service.container_name.clone(),
                found,
            )
            .await;
        }
    }

    /// A container that was removed (recreated by `docker compose up -d` after a config
    /// change, with its compose restart policy) is no longer halted nor being stopped.
    fn forget_removed(&mut self, stack: &Stack) {
        let present: Vec<&str> = stack.services().map(|s| s.container_id.as_str()).collect();
        self.stopping.retain(|id| present.contains(&id.as_str()));
        self.protection.halted.retain(|h| {
            let kept = present.contains(&h.container.as_str());
            if !kept {
                tracing::info!(service = %h.service, "the halted container was removed or recreated; no longer halted");
            }
            kept
        });
    }

    fn crash_loop_window(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::seconds(self.config.crash_loop.window_secs as i64)
    }

    /// The update is over once the new server has run a whole crash-loop window without a
    /// death; then it owes a verify against the pre-update snapshot (post_upgrade.rs).
    fn settle(&mut self, stack: &Stack) {
        let Some(settling) = &self.protection.settling else {
            return;
        };
        let Some(server) = &stack.server else { return };
        let settled = crate::post_upgrade::settled(
            settling.since,
            Utc::now(),
            self.crash_loop_window(),
            server.state == "running" && !self.is_halted(&server.container_id),
            self.deaths.recent(&server.container_id),
        );
        if !settled {
            return;
        }
        let change = settling.change.clone();
        tracing::info!(change = %format!("{} → {}", change.from, change.to), "the update has settled; verifying it");
        self.protection.settling = None;
        self.protection.verifies.due = Some(VerifyDue {
            from: change.from,
            to: change.to,
            snapshot: change.snapshot,
            not_before: Utc::now(),
            reason: "upgrade settled".into(),
        });
        self.start_verify();
    }

    /// While DEGRADED, a server container other than the one that failed (the admin's fix,
    /// brought up by compose) is verified again once it has run a crash-loop window.
    fn reverify_recreated(&mut self, stack: &Stack) {
        let Some(server) = stack.server.as_ref().filter(|s| s.state == "running") else {
            return;
        };
        let window = self.crash_loop_window();
        if let Some(due) =
            self.protection
                .verifies
                .reverify_for(&server.container_id, Utc::now(), window)
        {
            tracing::info!(container = %server.container_name, "a new server container while DEGRADED; verifying it again after a crash-loop window");
            self.protection.verifies.due = Some(due);
        }
    }

    /// When the guard must look again without an input: the end of a settling window, or a
    /// verify that is due. A time already past (the server was not ready then) is retried
    /// every few seconds, never in a busy loop.
    fn next_wakeup(&self) -> Option<DateTime<Utc>> {
        const AGAIN: chrono::TimeDelta = chrono::TimeDelta::seconds(5);
        let settle = self
            .protection
            .settling
            .as_ref()
            .map(|s| s.since + self.crash_loop_window() + chrono::TimeDelta::seconds(1));
        let verify = self
            .protection
            .verifies
            .due
            .as_ref()
            .filter(|_| !self.verifying)
            .map(|d| d.not_before);
        let at = settle
            .into_iter()
            .chain(verify)
            .chain(self.freeze_deadline())
            .min()?;
        let now = Utc::now();
        Some(if at <= now - chrono::TimeDelta::seconds(1) {
            now + AGAIN
        } else {
            at
        })
    }

    async fn on_wakeup(&mut self) {
        let before = self.protection.clone();
        if self.freeze_deadline().is_some_and(|at| at <= Utc::now()) {
            self.hold_stuck();
        }
        if let Some(stack) = self.stack.clone() {
            self.settle(&stack);
        }
        if self
            .protection
            .verifies
            .due
            .as_ref()
            .is_some_and(|d| d.not_before <= Utc::now())
        {
            self.start_verify();
        }
        // Woken again every few seconds while a server is not ready: the file is written
        // only when something changed.
        if self.protection != before {
            self.publish();
        }
    }

    /// Runs the verify that is due in its own task (it waits for ping and reads the whole
    /// upload location: never on the path of a freeze).
    fn start_verify(&mut self) {
        if self.verifying {
            return;
        }
        let Some(due) = self.protection.verifies.due.clone() else {
            return;
        };
        let Some((docker, host)) = self.docker.borrow().clone() else {
            return;
        };
        let Some(stack) = self.stack.clone() else {
            return;
        };
        let plan = self.verify_plan(&due, &stack);
        tracing::info!(change = %format!("{} → {}", due.from, due.to), against = %plan.note, reason = %due.reason, "verify after upgrade");
        self.verifying = true;
        let server = stack.server.as_ref().map(|s| s.container_id.clone());
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let report = crate::post_upgrade::run(&docker, &host, &stack, &plan).await;
            let _ = tx.send(Input::Verified {
                due,
                report: Box::new(report),
                server,
            });
        });
    }

    /// Compared with the change's own snapshot, else the newest sealed one of the version it
    /// came from, else the stack alone.
    fn verify_plan(&self, due: &VerifyDue, stack: &Stack) -> crate::verify::Plan {
        let dir = self.config.snapshot_dir();
        let all = Store::open(&dir).and_then(|s| s.list()).unwrap_or_default();
        let meta = all
            .iter()
            .rev()
            .find(|m| due.snapshot.as_deref() == Some(m.id.as_str()))
            .or_else(|| {
                all.iter()
                    .rev()
                    .find(|m| m.project == stack.project && same_version(&m.version, &due.from))
            });
        match meta {
            Some(m) => {
                crate::verify::Plan::after_upgrade(m, &dir.join(&m.id), stack.version.as_ref())
            }
            None => crate::verify::Plan::stack_only(
                format!("no sealed snapshot of {}: stack checks only", due.from),
                stack.version.as_ref(),
            ),
        }
    }

    fn on_verified(
        &mut self,
        due: VerifyDue,
        report: crate::verify::Report,
        server: Option<String>,
    ) {
        self.verifying = false;
        if self.protection.project.as_deref() != Some(report.project.as_str()) {
            tracing::warn!(project = %report.project, "a verify finished for a stack no longer protected; dropped");
            return;
        }
        let current = self
            .stack
            .as_ref()
            .and_then(|s| s.server.as_ref())
            .map(|s| s.container_id.clone());
        if server.is_some() && current.is_some() && server != current {
            // Recreated while the checklist ran: judge the server that runs now.
            tracing::info!(
                "the server was recreated during the verify; verifying the new one after a crash-loop window"
            );
            let not_before = Utc::now() + self.crash_loop_window();
            if let Some(d) = &mut self.protection.verifies.due {
                d.not_before = not_before;
            }
            self.publish();
            return;
        }
        if self.protection.verifies.due.as_ref() == Some(&due) {
            self.protection.verifies.due = None;
        }
        let change = format!("{} → {}", due.from, due.to);
        let verdict = crate::post_upgrade::judge(&due, &report, server);
        let was_degraded = match verdict {
            crate::post_upgrade::Verdict::Passed(last) => {
                tracing::info!(change = %change, against = ?last.against, result = %last.summary(), "verify after upgrade passed");
                let was = self
                    .protection
                    .verifies
                    .record(crate::post_upgrade::Verdict::Passed(last));
                if was {
                    self.notify(
                        EventKind::Recovered,
                        format!("Immich {} verified: no longer DEGRADED", due.to),
                        format!("A new verify of {change} passed; DEGRADED is cleared."),
                        &due,
                        report.against.clone(),
                    );
                }
                was
            }
            crate::post_upgrade::Verdict::Degraded(degraded, last) => {
                let lines: Vec<String> = degraded
                    .failed
                    .iter()
                    .map(|c| format!("{}: {}", c.name, c.detail))
                    .collect();
                tracing::error!(change = %change, failed = %lines.join("; "), hint = %degraded.hint, "DEGRADED: verify after upgrade failed");
                self.notify(
                    EventKind::Degraded,
                    format!(
                        "Immich {} DEGRADED after the update from {}",
                        due.to, due.from
                    ),
                    format!(
                        "Verify after {change} failed:\n{}\n{}",
                        lines
                            .iter()
                            .map(|l| format!("- {l}"))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        degraded.hint
                    ),
                    &due,
                    degraded.snapshot.clone(),
                );
                self.protection
                    .verifies
                    .record(crate::post_upgrade::Verdict::Degraded(degraded, last))
            }
        };
        if was_degraded && self.protection.verifies.degraded.is_none() {
            tracing::info!("DEGRADED cleared: a later verify passed");
        }
        self.publish();
    }

    fn acknowledge(&mut self) -> Result<String, String> {
        let degraded = self.protection.verifies.acknowledge()?;
        let message = format!(
            "acknowledged DEGRADED after {} → {} (since {}); the failed verify stays as the last result",
            degraded.from,
            degraded.to,
            degraded.since.format("%Y-%m-%d %H:%M:%S UTC")
        );
        tracing::warn!("{message}");
        self.publish();
        Ok(message)
    }

    /// A notification about a verify: its change and snapshot, not the pending one's.
    fn notify(
        &self,
        kind: EventKind,
        title: String,
        message: String,
        due: &VerifyDue,
        snapshot: Option<String>,
    ) {
        self.notifier.send(Notice {
            kind,
            project: self.protection.project.clone().unwrap_or_default(),
            title,
            message,
            snapshot,
            from_version: Some(due.from.clone()),
            to_version: Some(due.to.clone()),
            at: Utc::now(),
        });
    }

    /// The change a crash loop belongs to: the one pending, or the one just made.
    fn change_in_progress(&self) -> Option<&PendingChange> {
        self.protection
            .pending
            .as_ref()
            .or(self.protection.settling.as_ref().map(|s| &s.change))
    }

    fn is_halted(&self, container_id: &str) -> bool {
        self.protection
            .halted
            .iter()
            .any(|h| h.container == container_id)
    }

    /// Evidence first, then the diagnosis, then the halt.
    async fn crash_loop(
        &mut self,
        docker: Docker,
        stack: Stack,
        service: String,
        container_id: String,
        name: String,
        found: crate::crashloop::Loop,
    ) {
        tracing::error!(container = %name, deaths = found.deaths, missed = found.missed, window_secs = self.config.crash_loop.window_secs, "crash loop");
        let is_database = stack
            .database
            .as_ref()
            .is_some_and(|d| d.container_id == container_id);
        let evidence = crate::incident::collect(&docker, &stack).await;
        // A looping database cannot answer; otherwise ask it briefly, the halt must not wait.
        let now = match &stack.db {
            Some(access) if !is_database => {
                tokio::time::timeout(FACTS_TIMEOUT, crate::snapshot::db::facts(access))
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            _ => None,
        };
        let before = self.pre_update_snapshot();
        let diagnosis = crate::diagnose::diagnose(&crate::incident::diagnosis_evidence(
            &evidence,
            &stack,
            &service,
            now.as_ref(),
            before.as_ref(),
        ));
        let dir = self.config.daemon.data_dir.join(crate::incident::DIR);
        let at = Utc::now();
        let mut incident = crate::incident::Incident {
            id: crate::incident::incident_id(at, &service, &dir),
            at,
            service: service.clone(),
            container: name.clone(),
            deaths: found.deaths as u32,
            missed_deaths: found.missed as u32,
            last_death_at: Some(found.last_death),
            window_secs: self.config.crash_loop.window_secs,
            // The version the database ran with before the update, if one is in progress.
            baseline: self
                .change_in_progress()
                .map(|p| p.from.clone())
                .or_else(|| self.protection.baseline.as_ref().map(|b| b.version.clone())),
            pending: self
                .change_in_progress()
                .map(|p| format!("{} → {}", p.from, p.to)),
            cause: diagnosis.cause,
            findings: diagnosis.findings,
            notes: diagnosis.notes,
            decision: diagnosis.decision,
            halted: Vec::new(),
            dir: dir.clone(),
        };
        // Halting the database halts the server too: it would crash-loop next.
        let mut targets = vec![(service.clone(), container_id.clone())];
        if is_database && let Some(server) = &stack.server {
            targets.push((server.service.clone(), server.container_id.clone()));
        }
        let view = serde_json::to_value(&self.protection).unwrap_or_default();
        let written = crate::incident::write_bundle(&dir, &incident, &evidence, &stack, &view);
        for (service, container) in targets {
            // Halted before (the server by its own loop): keep the policy recorded then, not
            // the `no` it has now.
            if let Some(earlier) = self
                .protection
                .halted
                .iter()
                .find(|h| h.container == container)
            {
                incident.halted.push(earlier.clone());
                continue;
            }
            match crate::incident::halt(&docker, &container).await {
                Ok(policy) => {
                    tracing::warn!(service = %service, restart_policy = %policy, "halted: restart policy set to no, container stopped");
                    let halted = crate::incident::Halted {
                        service,
                        container,
                        restart_policy: policy,
                        halted_at: Some(Utc::now()),
                    };
                    incident.halted.push(halted.clone());
                    self.protection.halted.push(halted);
                }
                Err(e) => tracing::error!(service = %service, error = %e, "could not halt"),
            }
        }
        match written {
            Ok(path) => {
                // The halted list is known only now: the sealed bundle's incident.json is
                // replaced whole, never left half-written.
                let _ = crate::durable::replace_synced(
                    &path.join(crate::incident::INCIDENT_FILE),
                    &serde_json::to_vec_pretty(&incident).unwrap_or_default(),
                );
                tracing::info!(dir = %path.display(), "incident bundle written");
            }
            Err(e) => tracing::error!(error = %e, "could not write the incident bundle"),
        }
        self.announce(
            EventKind::CrashLoop,
            format!("{service} crash-looped and was halted"),
            format!(
                "{} died {} times within {} s; halted ({}). Diagnosis: {}. Recommended: {} Details: immich-guard incident {}",
                name,
                found.deaths,
                self.config.crash_loop.window_secs,
                incident
                    .halted
                    .iter()
                    .map(|h| h.service.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                incident.cause,
                incident.decision.summary(),
                incident.id,
            ),
        );
        self.protection.incident = Some(incident);
        self.publish();
    }

    /// The newest sealed snapshot of the version the database ran with before this change
    /// (of any version when that is "unknown": the daemon first saw the server as it started).
    fn pre_update_snapshot(&self) -> Option<crate::snapshot::store::Meta> {
        let store = Store::open(&self.config.snapshot_dir()).ok()?;
        let list = store.list().ok()?;
        let ours =
            |m: &crate::snapshot::store::Meta| Some(&m.project) == self.protection.project.as_ref();
        let from = self
            .change_in_progress()
            .map(|p| p.from.clone())
            .filter(|v| v != "unknown")
            .or_else(|| {
                self.protection
                    .incident
                    .as_ref()
                    .and_then(|i| i.baseline.clone())
            });
        list.into_iter()
            .rev()
            .find(|m| ours(m) && from.as_ref().is_none_or(|v| same_version(&m.version, v)))
    }

    async fn unhalt(&mut self, service: &str) -> Result<String, String> {
        let Some(i) = self
            .protection
            .halted
            .iter()
            .position(|h| h.service == service || h.container == service)
        else {
            return Err(format!(
                "{service} is not halted (halted: {})",
                self.protection
                    .halted
                    .iter()
                    .map(|h| h.service.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let Some(docker) = self.docker() else {
            return Err("Docker is unreachable".into());
        };
        let halted = self.protection.halted[i].clone();
        crate::incident::unhalt(&docker, &halted.container, &halted.restart_policy)
            .await
            .map_err(|e| format!("could not release {}: {e}", halted.service))?;
        self.protection.halted.remove(i);
        self.deaths.forget(&halted.container);
        let message = format!(
            "{} started with its restart policy {} back",
            halted.service, halted.restart_policy
        );
        self.record_release(&halted.service, false, &message);
        self.publish();
        Ok(message)
    }

    fn announce(&self, kind: EventKind, title: String, message: String) {
        let pending = self.protection.pending.as_ref();
        self.notifier.send(Notice {
            kind,
            project: self
                .stack
                .as_ref()
                .map(|s| s.project.clone())
                .unwrap_or_default(),
            title,
            message,
            snapshot: pending.and_then(|p| p.snapshot.clone()),
            from_version: pending.map(|p| p.from.clone()),
            to_version: pending.map(|p| p.to.clone()),
            at: Utc::now(),
        });
    }

    fn refresh_snapshot_index(&mut self) {
        let Ok(store) = Store::open(&self.config.snapshot_dir()) else {
            return;
        };
        if let Ok(list) = store.list() {
            let project = self.protection.project.clone();
            self.protection.last_snapshot_per_version = list
                .into_iter()
                .filter(|m| project.as_ref().is_none_or(|p| &m.project == p))
                .map(|m| (m.version, m.id))
                .collect();
        }
    }

    /// Publishes to `status` and persists, so a restart resumes from here.
    fn publish(&mut self) {
        self.protection.settle_state(self.snapshotting);
        let p = self.protection.clone();
        let mut all = self.states.clone();
        if let Some(name) = &p.project {
            all.projects.insert(name.clone(), p.clone());
        }
        if let Err(e) = save(&self.state_file, &all) {
            tracing::error!(file = %self.state_file.display(), error = %e, "cannot save the protection state");
        }
        self.state.send_modify(|s| s.protection = p);
    }
}

/// Docker's RestartCount of a container; None when it is gone.
async fn restart_count(docker: &Docker, container_id: &str) -> Option<i64> {
    docker
        .inspect_container(container_id, None::<InspectContainerOptions>)
        .await
        .ok()
        .map(|i| i.restart_count.unwrap_or(0))
}

/// The newest pin of `project` (in `records`, oldest first), when it is to `version`, was
/// allowed or forced, and was made after `since`.
fn pinned_rollback(
    records: Vec<crate::pin::PinRecord>,
    project: &str,
    version: &str,
    since: DateTime<Utc>,
) -> Option<crate::pin::PinRecord> {
    let newest = records.into_iter().rev().find(|r| r.project == project)?;
    (same_version(&newest.version, version)
        && (newest.verdict.allows() || newest.forced)
        && newest.at > since)
        .then_some(newest)
}

/// The way out of a held downgrade, as the commands that apply (docs/recovery.md).
/// `snapshot`: the newest sealed one of `version`, if any.
fn downgrade_hint(
    version: &str,
    baseline: &str,
    verdict: &crate::pin::Verdict,
    snapshot: Option<&str>,
) -> String {
    use crate::pin::Verdict;
    let forward =
        format!("fix forward: set IMMICH_VERSION={baseline} (or newer) and `docker compose up -d`");
    match verdict {
        Verdict::Allowed { .. } => format!(
            "the database holds no migration {version} lacks: `immich-guard pin {version}` records the rollback, then `immich-guard release` lets it start; or {forward}"
        ),
        Verdict::Refused { .. } => format!(
            "{}; or {forward}; `immich-guard release --force` starts {version} anyway (it cannot run on this schema)",
            verdict.describe(version)
        ),
        Verdict::Unknown { .. } => format!(
            "{}; {}{forward}, or `immich-guard release --force` to start {version} anyway (unprotected)",
            verdict.describe(version),
            snapshot
                .map(|id| format!(
                    "to go back to {version} as it was: `immich-guard restore {id}`; or "
                ))
                .unwrap_or_default()
        ),
    }
}

fn snapshot_failed_reason(version: &str, message: &str) -> String {
    format!("the snapshot before starting {version} failed: {message}")
}

fn push_bounded(v: &mut Vec<f64>, x: f64, keep: usize) {
    v.push(x);
    let excess = v.len().saturating_sub(keep);
    v.drain(..excess);
}

/// `protection.json`: each compose project's state under its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    pub projects: BTreeMap<String, Protection>,
    /// From a file of an older version, which recorded no project, when it names containers
    /// (halted, frozen, held): kept until the stack with those containers is found, never
    /// shown as another stack's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unattributed: Option<Protection>,
}

const STATE_FORMAT: u32 = 2;

impl Default for StateFile {
    fn default() -> Self {
        StateFile {
            format: STATE_FORMAT,
            projects: BTreeMap::new(),
            unattributed: None,
        }
    }
}

/// Reads `protection.json`. A file of an older version (one project's state, unnamed) is the
/// state of the configured `stack.project`, or, without one, kept unattributed when it names
/// containers, else dropped (a baseline is learned again from the running server).
fn load(path: &Path, configured: Option<&str>) -> Result<StateFile, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateFile::default()),
        Err(e) => return Err(e.to_string()),
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if value.get("projects").is_some() {
        let mut file: StateFile = serde_json::from_value(value).map_err(|e| e.to_string())?;
        for (name, state) in &mut file.projects {
            state.project = Some(name.clone());
        }
        return Ok(file);
    }
    let old: Protection = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let mut file = StateFile::default();
    let baseline = old.baseline.as_ref().map_or("none", |b| b.version.as_str());
    match configured {
        Some(project) => {
            tracing::info!(file = %path.display(), project, baseline, "protection state of an older version: it is the configured stack's");
            file.projects.insert(
                project.to_string(),
                Protection {
                    project: Some(project.to_string()),
                    ..old
                },
            );
        }
        None if old.containers().next().is_some() => {
            tracing::info!(file = %path.display(), baseline, "protection state of an older version names no compose project: kept until the stack whose containers it names is found");
            file.unattributed = Some(old);
        }
        None => {
            tracing::warn!(file = %path.display(), baseline, "protection state of an older version names no compose project and no container: dropped; the baseline is learned again from the running server");
        }
    }
    Ok(file)
}

fn save(path: &Path, p: &StateFile) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        crate::private::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(p).map_err(std::io::Error::other)?;
    crate::durable::replace_synced(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(parse_version("v1.119.0"), Some((1, 119, 0)));
        assert_eq!(parse_version("1.120.1"), Some((1, 120, 1)));
        assert_eq!(parse_version("v2.1.0-rc.1"), Some((2, 1, 0)));
        assert_eq!(parse_version("release"), None);
        assert!(is_older("v1.119.0", "v1.120.0"));
        assert!(!is_older("v1.120.0", "v1.120.0"));
        assert!(!is_older("release", "v1.120.0"));
        assert!(same_version("1.119.0", "v1.119.0"));
    }

    #[test]
    fn percentiles_of_delays() {
        assert_eq!(percentiles(&[]), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(&v), Some((51.0, 99.0)));
    }

    fn with_baseline(project: &str, version: &str) -> Protection {
        Protection {
            baseline: Some(Baseline {
                version: version.into(),
                image_id: format!("sha256:{version}"),
            }),
            ..Protection::fresh(project)
        }
    }

    #[test]
    fn each_project_keeps_its_state_through_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/protection.json");
        assert_eq!(load(&path, None).unwrap(), StateFile::default());
        let mut a = with_baseline("a", "v1.119.0");
        a.settle_state(true);
        let b = with_baseline("b", "v1.120.0");
        let file = StateFile {
            projects: [("a".to_string(), a.clone()), ("b".to_string(), b.clone())].into(),
            ..StateFile::default()
        };
        save(&path, &file).unwrap();
        let back = load(&path, Some("b")).unwrap();
        assert_eq!(back, file);
        assert_eq!(back.projects["a"].state, ProtectState::Snapshotting);
        assert_eq!(back.projects["b"].project.as_deref(), Some("b"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"format\": 2"), "{text}");
        // The key names the project, whatever a hand-edited field says.
        std::fs::write(
            &path,
            text.replace("\"project\": \"a\"", "\"project\": \"b\""),
        )
        .unwrap();
        assert_eq!(
            load(&path, None).unwrap().projects["a"].project.as_deref(),
            Some("a")
        );
    }

    /// A v1.118.0 state that halted `container`.
    fn halted_in(container: &str) -> Protection {
        let mut p = with_baseline("x", "v1.118.0");
        p.halted.push(crate::incident::Halted {
            service: "immich-server".into(),
            container: container.into(),
            restart_policy: "always".into(),
            halted_at: None,
        });
        p
    }

    /// A file of the previous format: one unnamed state.
    fn old_file(dir: &Path, p: &Protection) -> PathBuf {
        let mut value = serde_json::to_value(p).unwrap();
        value.as_object_mut().unwrap().remove("project");
        let path = dir.join("protection.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
        path
    }

    #[test]
    fn an_old_file_is_the_configured_projects_state() {
        let dir = tempfile::tempdir().unwrap();
        let old = with_baseline("x", "v1.118.0");
        let path = old_file(dir.path(), &old);
        let file = load(&path, Some("immich")).unwrap();
        assert_eq!(file.projects.len(), 1);
        let state = &file.projects["immich"];
        assert_eq!(state.project.as_deref(), Some("immich"));
        assert_eq!(state.baseline, old.baseline);
        assert_eq!(file.unattributed, None);
    }

    #[test]
    fn an_old_file_without_a_project_is_kept_aside_or_dropped_never_adopted_blindly() {
        let dir = tempfile::tempdir().unwrap();
        // Only a baseline: nothing ties it to a stack.
        let path = old_file(dir.path(), &with_baseline("x", "v1.118.0"));
        assert_eq!(load(&path, None).unwrap(), StateFile::default());
        // A halted container: kept aside until the stack holding it is found.
        let path = old_file(dir.path(), &halted_in("c0ffee"));
        let file = load(&path, None).unwrap();
        assert!(file.projects.is_empty());
        let kept = file.unattributed.clone().unwrap();
        assert_eq!(kept.containers().collect::<Vec<_>>(), ["c0ffee"]);
        // And it survives the next save.
        save(&path, &file).unwrap();
        assert_eq!(load(&path, None).unwrap(), file);
    }

    pub(super) fn running(project: &str, version: &str, container: &str) -> Stack {
        let image_id = format!("sha256:{version}");
        Stack {
            project: project.into(),
            compose_dir: None,
            compose_files: vec![],
            env_file: None,
            env_version: None,
            server: Some(crate::discover::Service {
                service: "immich-server".into(),
                container_id: container.into(),
                container_name: format!("{project}_server"),
                image: format!("immich-server:{version}"),
                image_id: image_id.clone(),
                state: "running".into(),
                restart_count: 0,
                restart_policy: "always".into(),
            }),
            machine_learning: None,
            redis: None,
            database: None,
            upload_location: None,
            upload_mount: None,
            db_data_location: None,
            db: None,
            version: Some(crate::discover::ImmichVersion {
                tag: Some(version.into()),
                image_id,
                repo_digests: vec![],
                repo_tags: vec![],
                label: Some(version.into()),
            }),
            notes: vec![],
        }
    }

    /// A guard without Docker, fed discoveries by hand.
    struct Fed {
        guard: GuardHandle,
        state: watch::Receiver<DaemonState>,
        /// Publishes the stack as the daemon's discovery does.
        publish: Arc<watch::Sender<DaemonState>>,
        file: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Fed {
        fn start(dir: tempfile::TempDir) -> Fed {
            Fed::with(dir, Config::default(), false)
        }

        /// `stalled`: every snapshot runs and never finishes.
        fn with(dir: tempfile::TempDir, mut config: Config, stalled: bool) -> Fed {
            config.daemon.data_dir = dir.path().to_path_buf();
            let (tx, state) = watch::channel(DaemonState::new("unix:///nowhere".into()));
            let tx = Arc::new(tx);
            let (_, docker) = watch::channel(None);
            let queue = if stalled {
                SnapshotQueue::stalled()
            } else {
                crate::daemon::start_snapshot_queue(config.clone(), docker.clone(), tx.clone())
            };
            let notifier = Notifier::new(&config.notify);
            let guard = Guard::start(config, tx.clone(), docker, queue, notifier);
            Fed {
                guard,
                state,
                publish: tx,
                file: dir.path().join(STATE_FILE),
                _dir: dir,
            }
        }

        /// Discovery found `stack`; returns the baseline published for it.
        async fn found(&mut self, stack: Stack) -> Option<String> {
            let project = stack.project.clone();
            self.publish.send_modify(|s| {
                s.stack = Some(stack.clone());
                s.docker.reachable = true;
            });
            self.guard.send(Input::Discovered {
                stack: Box::new(stack),
                listed_at: Utc::now(),
            });
            let s = tokio::time::timeout(
                Duration::from_secs(5),
                self.state
                    .wait_for(|s| s.protection.project.as_deref() == Some(project.as_str())),
            )
            .await
            .expect("the guard takes the project's state")
            .unwrap()
            .protection
            .clone();
            s.baseline.map(|b| b.version)
        }
    }

    /// Waits until the published state satisfies `ok`.
    async fn until(fed: &Fed, what: &str, ok: impl Fn(&DaemonState) -> bool) -> DaemonState {
        let mut rx = fed.state.clone();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| ok(s)))
            .await
            .unwrap_or_else(|_| panic!("{what}: {:#?}", fed.state.borrow().protection))
            .unwrap()
            .clone()
    }

    /// A compose dir whose server image follows `.env`, as Immich's own compose file does.
    fn compose_dir(env_version: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("docker-compose.yml"),
            "services:\n  immich-server:\n    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}\n",
        )
        .unwrap();
        write_env(dir.path(), env_version);
        dir
    }

    /// Writes `.env` as editors do: a new file renamed over the old one.
    fn write_env(dir: &Path, version: &str) {
        std::fs::write(dir.join(".env.new"), format!("IMMICH_VERSION={version}\n")).unwrap();
        std::fs::rename(dir.join(".env.new"), dir.join(".env")).unwrap();
    }

    /// `running(...)` with its compose files in `dir` and `.env` naming `env_version`.
    fn composed(dir: &Path, version: &str, env_version: &str) -> Stack {
        Stack {
            compose_dir: Some(dir.to_path_buf()),
            compose_files: vec![dir.join("docker-compose.yml")],
            env_file: Some(dir.join(".env")),
            env_version: Some(env_version.into()),
            ..running("a", version, "ca")
        }
    }

    fn status_text(s: &DaemonState) -> String {
        crate::render::status(&crate::status::StatusReport::from_state(s))
    }

    #[tokio::test]
    async fn held_quotes_the_newest_failure_after_a_release_fails_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = with_baseline("a", "v1.119.0");
        p.hold = Some(Hold {
            kind: HoldKind::SnapshotFailed,
            container: "cb".into(),
            container_name: "a_server_new".into(),
            image_id: "sha256:v1.120.0".into(),
            version: "v1.120.0".into(),
            paused: true,
            reason: snapshot_failed_reason("v1.120.0", "disk full"),
            hint: "fix it".into(),
            since: Utc::now(),
        });
        let file = StateFile {
            projects: [("a".to_string(), p)].into(),
            ..StateFile::default()
        };
        save(&dir.path().join(STATE_FILE), &file).unwrap();
        let mut fed = Fed::start(dir);
        fed.found(running("a", "v1.119.0", "ca")).await;
        assert!(status_text(&fed.state.borrow()).contains("disk full"));
        // The retried snapshot fails for another reason (no Docker here).
        let err = fed.guard.release(false, None).await.unwrap_err();
        assert!(err.contains("Docker is unreachable"), "{err}");
        let s = until(&fed, "the new reason", |s| {
            s.protection
                .hold
                .as_ref()
                .is_some_and(|h| h.reason.contains("Docker is unreachable"))
        })
        .await;
        let text = status_text(&s);
        let held = text.lines().find(|l| l.starts_with("HELD:")).unwrap();
        assert!(held.contains("Docker is unreachable"), "{held}");
        assert!(!held.contains("disk full"), "{held}");
        assert!(s.status_line().contains("Docker is unreachable"));
        // And it is what a restart resumes.
        let saved = load(&fed.file, None).unwrap();
        assert!(
            saved.projects["a"]
                .hold
                .as_ref()
                .unwrap()
                .reason
                .contains("Docker is unreachable")
        );
    }

    #[tokio::test]
    async fn the_env_version_follows_edits_and_setting_it_back_drops_the_pending_change() {
        let compose = compose_dir("v1.120.0");
        let mut fed = Fed::start(tempfile::tempdir().unwrap());
        // The daemon (re)starts with `.env` ahead of the database: a change in progress.
        fed.found(composed(compose.path(), "v1.119.0", "v1.120.0"))
            .await;
        let s = until(&fed, "the startup change", |s| {
            s.protection
                .pending
                .as_ref()
                .is_some_and(|p| p.source == "startup reconcile")
        })
        .await;
        assert!(status_text(&s).contains(".env version:     v1.120.0"));
        // The admin sets it back: status follows, and nothing is pending any more.
        write_env(compose.path(), "v1.119.0");
        let s = until(&fed, "the edit", |s| {
            s.stack.as_ref().unwrap().env_version.as_deref() == Some("v1.119.0")
        })
        .await;
        assert!(status_text(&s).contains(".env version:     v1.119.0"));
        let s = until(&fed, "no pending change", |s| {
            s.protection.pending.is_none()
        })
        .await;
        assert!(!status_text(&s).contains("pending change"));
        // Another edit is followed too, and is a change again.
        write_env(compose.path(), "v1.121.0");
        let s = until(&fed, "the next edit", |s| {
            s.protection
                .pending
                .as_ref()
                .is_some_and(|p| p.to == "v1.121.0")
        })
        .await;
        assert!(status_text(&s).contains(".env version:     v1.121.0"));
    }

    #[tokio::test]
    async fn a_deleted_env_is_reported_and_never_read_as_a_change_to_release() {
        let compose = compose_dir("v1.119.0");
        let mut fed = Fed::start(tempfile::tempdir().unwrap());
        fed.found(composed(compose.path(), "v1.119.0", "v1.119.0"))
            .await;
        std::fs::remove_file(compose.path().join(".env")).unwrap();
        let s = until(&fed, "the missing .env", |s| {
            s.stack
                .as_ref()
                .unwrap()
                .notes
                .iter()
                .any(|n| n.contains("is missing"))
        })
        .await;
        let text = status_text(&s);
        assert!(text.contains(".env is missing"), "{text}");
        assert!(!text.contains(".env version:"), "{text}");
        assert!(s.protection.pending.is_none(), "{:?}", s.protection.pending);
        // A compose edit meanwhile is not read as `release` either.
        std::fs::write(
            compose.path().join("docker-compose.yml"),
            "services:\n  immich-server:\n    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}\n    restart: always\n",
        )
        .unwrap();
        tokio::time::sleep(COMPOSE_DEBOUNCE * 4).await;
        assert!(fed.state.borrow().protection.pending.is_none());
        // Back: the warning goes, and the same version is no change.
        write_env(compose.path(), "v1.119.0");
        let s = until(&fed, "the .env back", |s| {
            s.stack.as_ref().unwrap().env_version.as_deref() == Some("v1.119.0")
        })
        .await;
        assert!(!status_text(&s).contains("is missing"));
        assert!(s.protection.pending.is_none());
    }

    /// A state of project a with the server `cb` (v1.120.0) frozen by an earlier run.
    fn frozen_file(dir: &Path) {
        let mut p = with_baseline("a", "v1.119.0");
        p.frozen = Some(Frozen {
            container: "cb".into(),
            container_name: "a_server_new".into(),
            image_id: "sha256:v1.120.0".into(),
            version: "v1.120.0".into(),
            since: Utc::now(),
            delay_ms: 3.0,
        });
        let file = StateFile {
            projects: [("a".to_string(), p)].into(),
            ..StateFile::default()
        };
        save(&dir.join(STATE_FILE), &file).unwrap();
    }

    #[tokio::test]
    async fn a_snapshot_that_does_not_finish_says_where_it_waits_then_holds() {
        let dir = tempfile::tempdir().unwrap();
        frozen_file(dir.path());
        let mut config = Config::default();
        config.snapshots.max_wait_secs = 2;
        let mut fed = Fed::with(dir, config, true);
        fed.found(running("a", "v1.119.0", "ca")).await;
        // Frozen, and status says what it waits on and for how long.
        let s = until(&fed, "the step", |s| {
            s.protection
                .snapshot_run
                .as_ref()
                .is_some_and(|r| r.step.contains("pg_dumpall"))
        })
        .await;
        assert_eq!(s.protection.state, ProtectState::Frozen);
        let line = s.status_line();
        assert!(
            line.contains("snapshot running") && line.contains("at: dumping with pg_dumpall"),
            "{line}"
        );
        assert!(status_text(&s).contains("snapshot (pre-start) running"));
        // Past snapshots.max_wait_secs: HELD, still paused, saying why and since when.
        let s = until(&fed, "the hold", |s| s.protection.hold.is_some()).await;
        let hold = s.protection.hold.clone().unwrap();
        assert_eq!(s.protection.state, ProtectState::Held);
        assert!(s.protection.frozen.is_none());
        assert!(hold.paused);
        assert!(
            hold.reason.contains("snapshots.max_wait_secs (2 s)")
                && hold.reason.contains("at: dumping with pg_dumpall"),
            "{}",
            hold.reason
        );
        assert!(hold.hint.contains("release --force"), "{}", hold.hint);
        assert!(s.status_line().starts_with("HELD a_server_new"));
        // It is persisted as a hold, which a restart resumes.
        let saved = load(&fed.file, None).unwrap();
        assert!(saved.projects["a"].hold.is_some());
        assert!(saved.projects["a"].frozen.is_none());
    }

    /// `running(...)` whose server `container` (on `version`) is paused.
    fn paused(version: &str, container: &str) -> Stack {
        let mut stack = running("a", version, container);
        stack.server.as_mut().unwrap().state = "paused".into();
        stack
    }

    #[tokio::test]
    async fn a_server_paused_by_someone_else_is_reported_left_paused_and_taken_over_by_release() {
        let dir = tempfile::tempdir().unwrap();
        save(
            &dir.path().join(STATE_FILE),
            &StateFile {
                projects: [("a".to_string(), with_baseline("a", "v1.119.0"))].into(),
                ..StateFile::default()
            },
        )
        .unwrap();
        let mut fed = Fed::start(dir);
        fed.found(paused("v1.120.0", "cb")).await;
        let s = until(&fed, "paused", |s| {
            s.protection.state == ProtectState::Paused
        })
        .await;
        let line = s.status_line();
        assert!(
            line.starts_with("PAUSED a_server (v1.120.0), not by immich-guard"),
            "{line}"
        );
        assert!(status_text(&s).contains("`docker unpause a_server`"));
        assert!(s.protection.frozen.is_none() && s.protection.snapshot_run.is_none());
        // `release`: a freeze like any other (its version is not the database's): snapshot
        // first; here it fails (no Docker), so the server is HELD, still paused.
        let answer = fed.guard.release(false, None).await.unwrap();
        assert!(answer.contains("now frozen by immich-guard"), "{answer}");
        let s = until(&fed, "held", |s| s.protection.hold.is_some()).await;
        assert!(s.protection.paused_server.is_none());
        assert_eq!(s.protection.hold.unwrap().container, "cb");
    }

    #[tokio::test]
    async fn a_server_paused_by_our_own_freeze_is_snapshotted_again_at_start() {
        let dir = tempfile::tempdir().unwrap();
        frozen_file(dir.path());
        let mut fed = Fed::with(dir, Config::default(), true);
        fed.found(paused("v1.120.0", "cb")).await;
        let s = until(&fed, "the snapshot", |s| {
            s.protection.snapshot_run.is_some()
        })
        .await;
        assert_eq!(s.protection.state, ProtectState::Frozen);
        assert!(s.protection.paused_server.is_none());
        assert!(
            s.status_line()
                .starts_with("frozen a_server_new (v1.120.0)")
        );
    }

    #[tokio::test]
    async fn a_discovered_project_gets_its_own_state_and_the_others_are_kept() {
        let mut fed = Fed::start(tempfile::tempdir().unwrap());
        assert_eq!(
            fed.found(running("a", "v1.119.0", "ca")).await.as_deref(),
            Some("v1.119.0")
        );
        // b is found: its own baseline, never a's.
        assert_eq!(
            fed.found(running("b", "v1.120.0", "cb")).await.as_deref(),
            Some("v1.120.0")
        );
        let file = load(&fed.file, None).unwrap();
        assert_eq!(
            file.projects
                .iter()
                .map(|(p, s)| (p.as_str(), s.baseline.as_ref().unwrap().version.as_str()))
                .collect::<Vec<_>>(),
            [("a", "v1.119.0"), ("b", "v1.120.0")]
        );
        // a comes back: its state as it was, kept while b was protected.
        assert_eq!(
            fed.found(running("a", "v1.119.0", "ca")).await.as_deref(),
            Some("v1.119.0")
        );
    }

    #[tokio::test]
    async fn the_only_known_project_is_resumed_before_discovery_and_put_away_for_another() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile {
            projects: [("a".to_string(), with_baseline("a", "v1.119.0"))].into(),
            ..StateFile::default()
        };
        save(&dir.path().join(STATE_FILE), &file).unwrap();
        let mut fed = Fed::start(dir);
        // Held (not shown: status shows a state only with its stack) until discovery says.
        assert_eq!(fed.state.borrow().protection.project.as_deref(), Some("a"));
        assert_eq!(
            fed.found(running("b", "v1.120.0", "cb")).await.as_deref(),
            Some("v1.120.0")
        );
        let saved = load(&fed.file, None).unwrap();
        assert_eq!(
            saved.projects["a"].baseline.as_ref().unwrap().version,
            "v1.119.0"
        );
    }

    #[tokio::test]
    async fn an_old_state_is_adopted_only_by_the_stack_holding_its_containers() {
        let dir = tempfile::tempdir().unwrap();
        old_file(dir.path(), &halted_in("c-old"));
        let mut fed = Fed::start(dir);
        // Another stack: fresh, the old state stays aside.
        assert_eq!(
            fed.found(running("other", "v1.120.0", "c-new"))
                .await
                .as_deref(),
            Some("v1.120.0")
        );
        assert!(fed.state.borrow().protection.halted.is_empty());
        assert!(load(&fed.file, None).unwrap().unattributed.is_some());
        // The stack whose server is the halted container: the old state is its own.
        let s = fed.found(running("mine", "v1.118.0", "c-old")).await;
        assert_eq!(s.as_deref(), Some("v1.118.0"));
        assert_eq!(fed.state.borrow().protection.halted.len(), 1);
        let file = load(&fed.file, None).unwrap();
        assert!(file.unattributed.is_none());
        assert_eq!(file.projects["mine"].halted[0].container, "c-old");
    }

    #[test]
    fn only_the_newest_allowed_pin_since_the_baseline_lets_a_rollback_start() {
        use crate::pin::{PinRecord, Verdict};
        let t0 = Utc::now();
        let pin =
            |minutes: i64, project: &str, version: &str, verdict: Verdict, forced| PinRecord {
                at: t0 + chrono::TimeDelta::minutes(minutes),
                project: project.into(),
                version: version.into(),
                forced,
                verdict,
                files: vec![],
                backups: vec![],
                by: "root".into(),
            };
        let allowed = || Verdict::Allowed {
            snapshots: vec!["s".into()],
        };
        let refused = || Verdict::Refused {
            migrations: vec!["m".into()],
            restore: "s".into(),
        };
        let ok = vec![pin(5, "immich", "v1.119.0", allowed(), false)];
        assert!(pinned_rollback(ok.clone(), "immich", "1.119.0", t0).is_some());
        // Another version, another project, or a pin older than the baseline: held.
        assert!(pinned_rollback(ok.clone(), "immich", "v1.118.0", t0).is_none());
        assert!(pinned_rollback(ok.clone(), "other", "v1.119.0", t0).is_none());
        let later = t0 + chrono::TimeDelta::minutes(10);
        assert!(pinned_rollback(ok.clone(), "immich", "v1.119.0", later).is_none());
        // A newer pin of the project to another version replaces it.
        let mut two = ok.clone();
        two.push(pin(6, "immich", "v1.119.1", allowed(), false));
        assert!(pinned_rollback(two.clone(), "immich", "v1.119.0", t0).is_none());
        // ... but another project's newer pin does not.
        let mut other = ok;
        other.push(pin(6, "other", "v1.119.1", allowed(), false));
        assert!(pinned_rollback(other, "immich", "v1.119.0", t0).is_some());
        // Refused and not forced is never recorded by `pin`; if found, it is held. Forced is
        // the admin's decision, recorded: it starts.
        let no = vec![pin(5, "immich", "v1.119.0", refused(), false)];
        assert!(pinned_rollback(no, "immich", "v1.119.0", t0).is_none());
        let forced = vec![pin(5, "immich", "v1.119.0", refused(), true)];
        assert!(pinned_rollback(forced, "immich", "v1.119.0", t0).is_some());
    }

    #[test]
    fn a_held_downgrade_names_the_commands_that_apply() {
        use crate::pin::Verdict;
        let allowed = Verdict::Allowed {
            snapshots: vec!["s119".into()],
        };
        let h = downgrade_hint("v1.119.0", "v1.119.1", &allowed, Some("s119"));
        assert!(h.contains("`immich-guard pin v1.119.0`"), "{h}");
        assert!(h.contains("then `immich-guard release`"), "{h}");
        assert!(!h.contains("restore"), "{h}");
        let refused = Verdict::Refused {
            migrations: vec!["1731000000000-AddMemories".into()],
            restore: "s119".into(),
        };
        let h = downgrade_hint("v1.119.0", "v1.120.0", &refused, Some("s119"));
        assert!(h.contains("`immich-guard restore s119`"), "{h}");
        assert!(h.contains("IMMICH_VERSION=v1.120.0"), "{h}");
        assert!(h.contains("`immich-guard release --force`"), "{h}");
        assert!(!h.contains("immich-guard pin"), "{h}");
        let unknown = Verdict::Unknown {
            reason: "the database's migrations could not be read: timeout".into(),
        };
        let h = downgrade_hint("v1.119.0", "v1.120.0", &unknown, Some("s119"));
        assert!(h.contains("`immich-guard restore s119`"), "{h}");
        let h = downgrade_hint("v1.118.0", "v1.120.0", &unknown, None);
        assert!(!h.contains("restore"), "{h}");
        assert!(h.contains("`immich-guard release --force`"), "{h}");
    }

    /// A verify report for project `a` with the asset count at `assets` against 40,000.
    fn report_for_a(assets: i64) -> crate::verify::Report {
        use crate::verify::{Check, Outcome};
        let outcome = if assets >= 40_000 {
            Outcome::Pass
        } else {
            Outcome::Fail
        };
        crate::verify::Report {
            project: "a".into(),
            against: Some("s-pre".into()),
            baseline_note: String::new(),
            expected_version: Some("v1.120.0".into()),
            server_url: None,
            at: Utc::now(),
            passed: outcome == Outcome::Pass,
            checks: vec![Check {
                name: "assets".into(),
                outcome,
                detail: format!("{assets} now, 40000 in the snapshot"),
            }],
        }
    }

    #[tokio::test]
    async fn a_failed_verify_is_degraded_persisted_and_cleared_by_ack() {
        let mut fed = Fed::start(tempfile::tempdir().unwrap());
        fed.found(running("a", "v1.120.0", "ca")).await;
        let due = VerifyDue {
            from: "v1.119.0".into(),
            to: "v1.120.0".into(),
            snapshot: Some("s-pre".into()),
            not_before: Utc::now(),
            reason: "upgrade settled".into(),
        };
        fed.guard.send(Input::Verified {
            due: due.clone(),
            report: Box::new(report_for_a(0)),
            server: Some("ca".into()),
        });
        let wait = |state: ProtectState| {
            let mut rx = fed.state.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    rx.wait_for(|s| s.protection.state == state),
                )
                .await
                .expect("the state")
                .unwrap()
                .protection
                .clone()
            }
        };
        let p = wait(ProtectState::Degraded).await;
        assert_eq!(
            p.verifies.degraded.as_ref().unwrap().snapshot.as_deref(),
            Some("s-pre")
        );
        let saved = load(&fed.file, None).unwrap();
        assert!(saved.projects["a"].verifies.degraded.is_some());
        assert_eq!(saved.projects["a"].state, ProtectState::Degraded);

        assert!(
            fed.guard
                .ack()
                .await
                .unwrap()
                .contains("v1.119.0 → v1.120.0")
        );
        let p = wait(ProtectState::Idle).await;
        assert!(p.verifies.degraded.is_none());
        assert!(!p.verifies.last.unwrap().passed);
        assert!(fed.guard.ack().await.unwrap_err().contains("not DEGRADED"));

        // Degraded again, then a later verify passes: cleared.
        fed.guard.send(Input::Verified {
            due: due.clone(),
            report: Box::new(report_for_a(0)),
            server: Some("ca".into()),
        });
        wait(ProtectState::Degraded).await;
        fed.guard.send(Input::Verified {
            due,
            report: Box::new(report_for_a(40_001)),
            server: Some("ca".into()),
        });
        let p = wait(ProtectState::Idle).await;
        assert!(p.verifies.last.unwrap().passed);
    }
}
