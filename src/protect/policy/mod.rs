//! Every protection decision, without I/O (docs/architecture.md "Policy and driver"):
//! `Policy::step(event, now)` changes the state and returns the effects to carry out, in
//! order. The driver (driver.rs) owns Docker, the snapshot queue, the notifier, the state file
//! and the compose watcher; it runs the effects and feeds their results back as events. No
//! Docker, filesystem, clock or tokio here: what the policy needs from disk (pins, sealed
//! snapshots) arrives as `Event::Disk`, and time as `now`.
//!
//! The start of a server on an image nothing covers answers `Pause` first and looks closer
//! only after the pause returned (`Paused` → `Inspect` → `Inspected`): the server must not
//! reach its migrations while the guard finds out what it is.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use chrono::{DateTime, TimeDelta, Utc};

use super::state::{
    Baseline, ChangeSource, Frozen, PendingChange, ProjectState, Protection, Release, Settling,
    SnapshotRun, Trigger, is_older, same_version,
};
use crate::compose::{ComposeEvent, ComposeView};
use crate::config::Config;
use crate::discover::Stack;
use crate::notification::{Event as Notice, EventKind};
use crate::pin::PinRecord;
use crate::post_upgrade::VerifyDue;
use crate::snapshot::store::Meta;

mod crash;
mod paths;
mod release;
mod release_ready;
mod restoring;
mod snapshot;
mod start;
mod verify;

#[cfg(test)]
pub(crate) mod tests;

pub use restoring::{RestoreEnd, RestoreEvent};

/// Freeze delays kept for `status`.
const DELAYS_KEPT: usize = 200;
const RELEASES_KEPT: usize = 20;
/// A snapshot sealed for a pending change covers a server start this long after; older, the
/// old server may have written since, so the new one is frozen and snapshotted again.
pub const COVER_FRESH: TimeDelta = TimeDelta::minutes(15);
/// A wakeup already past (a server not ready yet) is retried this often, never in a loop.
const AGAIN: TimeDelta = TimeDelta::seconds(5);

/// A caller waiting for an answer (`release`, `ack`, a restore's begin); the driver keeps
/// the channel, the policy only says what to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyId(pub u64);

/// A container event, as the Docker event loop reads it.
#[derive(Debug, Clone, PartialEq)]
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

/// An image as Docker describes it: its ID, every tag it has, the Immich version it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFacts {
    pub id: String,
    pub tags: Vec<String>,
    pub version: String,
}

/// What the policy knows from disk: the pins `immich-guard pin` recorded, and the sealed
/// snapshots (all projects', oldest first).
#[derive(Debug, Clone, PartialEq)]
pub struct Disk {
    /// Err: the pin log cannot be read (a downgrade is then held).
    pub pins: Result<Vec<PinRecord>, String>,
    pub snapshots: Vec<Meta>,
}

impl Default for Disk {
    fn default() -> Self {
        Disk {
            pins: Ok(Vec::new()),
            snapshots: Vec::new(),
        }
    }
}

/// How a pause of a starting server went.
#[derive(Debug, Clone, PartialEq)]
pub enum PauseOutcome {
    Paused,
    /// Removed before the pause (compose v2's recreate): nothing runs that could migrate.
    Gone,
    Failed(String),
}

/// A server start on its way through the pause and the inspect.
#[derive(Debug, Clone, PartialEq)]
enum Starting {
    /// The pause is asked for.
    Pausing(ContainerEvent),
    /// The pause returned (how, after how long); the inspect is asked for.
    Inspecting {
        event: ContainerEvent,
        outcome: PauseOutcome,
        delay_ms: f64,
    },
}

impl Starting {
    fn container(&self) -> &str {
        match self {
            Starting::Pausing(event) | Starting::Inspecting { event, .. } => &event.container_id,
        }
    }
}

/// Why a frozen or held server is let go; comes back with the `Thawed` result.
#[derive(Debug, Clone, PartialEq)]
pub enum Thaw {
    /// The snapshot it waited for sealed.
    Sealed,
    /// A hold ended by a snapshot `release` retried.
    HoldSealed { name: String },
    /// `protect.fail_open`: the snapshot (or its drill) failed and the server goes anyway;
    /// `cause` says which, for the release record.
    FailOpen { name: String, cause: String },
    /// `release --force`; `overrode`: the upgrade-path hold it overrode, for the record.
    Forced {
        name: String,
        reply: ReplyId,
        overrode: Option<String>,
    },
    /// A held downgrade that `pin` recorded since.
    Pinned {
        name: String,
        pinned_at: DateTime<Utc>,
        reply: ReplyId,
    },
    /// A sealed freeze that waited for what its release needs (release_ready.rs), and why it
    /// goes now.
    Waited { name: String, note: String },
    /// A server paused by someone else, released on a version the database runs (or forced).
    ForeignPause {
        name: String,
        forced: bool,
        reply: ReplyId,
    },
}

/// Why Docker's RestartCount is read.
#[derive(Debug, Clone, PartialEq)]
pub enum CountFor {
    /// It died: part of a crash loop?
    Died(ContainerEvent),
    /// Started by hand after a stop (which resets the count): take it, count no death.
    StartedByHand,
}

/// Who gives a halted service its restart policy back.
#[derive(Debug, Clone, PartialEq)]
pub enum UnhaltFor {
    /// `immich-guard release <service>`.
    Admin(ReplyId),
    /// A restore started the stack again.
    Restore,
}

/// A crash loop found, on its way to evidence, diagnosis and a halt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopFound {
    pub service: String,
    pub container: String,
    pub name: String,
    pub found: crate::crashloop::Loop,
    pub is_database: bool,
}

/// A container to halt for a crash loop.
#[derive(Debug, Clone, PartialEq)]
pub struct HaltTarget {
    pub service: String,
    pub container: String,
}

/// Inputs of `step`: what happened, and the results of effects.
#[derive(Debug)]
pub enum Event {
    /// A container of some compose project started.
    Started(ContainerEvent),
    /// Someone sent a container a signal (`docker stop`, `kill`, `restart`).
    Killed(ContainerEvent),
    Died(ContainerEvent),
    /// An image was pulled or tagged: `reference` is a name or an ID.
    Image {
        reference: String,
    },
    Discovered {
        stack: Box<Stack>,
        listed_at: DateTime<Utc>,
    },
    Compose(ComposeEvent),
    Release {
        force: bool,
        service: Option<String>,
        reply: ReplyId,
    },
    Ack {
        reply: ReplyId,
    },
    /// The time `next_wakeup` named has come.
    Wakeup,
    Restore(RestoreEvent),
    /// Pins or sealed snapshots changed on disk.
    Disk(Box<Disk>),
    // Results of effects.
    Paused {
        container: String,
        outcome: PauseOutcome,
    },
    Inspected {
        container: String,
        image: Option<ImageFacts>,
    },
    ImageInspected {
        reference: String,
        image: Option<ImageFacts>,
    },
    ComposeRead {
        dir: PathBuf,
        view: Option<ComposeView>,
        /// The watcher runs; false: the next discovery tries again.
        watching: bool,
    },
    Thawed {
        server: Frozen,
        why: Thaw,
        /// `unpaused`, `started`; Err: neither worked.
        result: Result<&'static str, String>,
        /// The image, when the freeze did not know it.
        image_id: Option<String>,
    },
    /// The database's applied migrations, for a held downgrade's verdict.
    Migrations {
        version: String,
        result: Result<Vec<String>, String>,
    },
    RestartCount {
        container: String,
        count: Option<i64>,
        read_at: DateTime<Utc>,
        why: CountFor,
    },
    Evidence {
        found: LoopFound,
        evidence: Box<crate::incident::Evidence>,
        /// The database now (None when it did not answer in time or loops itself).
        facts: Option<Box<crate::snapshot::db::DbFacts>>,
        /// An unused incident ID.
        incident_id: String,
    },
    Halted {
        incident: Box<crate::incident::Incident>,
        /// Per target: the restart policy it had, or why it could not be halted.
        results: Vec<(HaltTarget, Result<String, String>)>,
    },
    Unhalted {
        halted: crate::incident::Halted,
        /// Err: why not, and whether because the container is gone.
        result: Result<(), (String, bool)>,
        why: UnhaltFor,
    },
    /// A verify could not be run (Docker unreachable): it is tried again later.
    VerifyNotRun,
    SnapshotProgress(String),
    SnapshotSealed {
        id: String,
        version: String,
    },
    SnapshotFailed(crate::snapshot::SnapshotFailure),
    /// The upload activity, read when asked (`AskUploads`) and every `uploads::REFRESH`.
    Uploads(Box<crate::uploads::RecentUploads>),
    /// The protective snapshot sealed, and its restore drill (before release) failed.
    DrillFailed {
        id: String,
        version: String,
        error: String,
    },
    Verified {
        due: VerifyDue,
        report: Box<crate::verify::Report>,
        server: Option<String>,
    },
}

/// What the driver carries out, in order.
#[derive(Debug)]
pub enum Effect {
    /// First for a server on an image nothing covers → `Paused`.
    Pause {
        container: String,
    },
    Stop {
        container: String,
    },
    /// The container's image → `Inspected`.
    Inspect {
        container: String,
    },
    /// → `ImageInspected`.
    InspectImage {
        reference: String,
    },
    /// A server found on a version that needs no snapshot after all.
    Unpause {
        container: String,
    },
    /// Unpause, or start when it had to be stopped; inspect it for its image when the freeze
    /// did not know it → `Thawed`.
    Thaw {
        server: Frozen,
        why: Thaw,
    },
    /// → `Migrations`.
    AskMigrations {
        version: String,
    },
    /// → `RestartCount`.
    ReadRestartCount {
        container: String,
        why: CountFor,
    },
    /// Logs, inspects, the database's facts → `Evidence`.
    CollectEvidence(LoopFound),
    /// Writes the incident bundle (before the halt: the evidence is of the loop as it ran).
    WriteIncident {
        incident: Box<crate::incident::Incident>,
        evidence: Box<crate::incident::Evidence>,
        view: Box<Protection>,
    },
    /// Restart policy off, stop → `Halted`.
    Halt {
        incident: Box<crate::incident::Incident>,
        targets: Vec<HaltTarget>,
    },
    /// Replaces the written bundle's incident.json (the halted list is known now).
    FinishIncident {
        incident: Box<crate::incident::Incident>,
    },
    /// Restart policy back, start → `Unhalted`.
    Unhalt {
        halted: crate::incident::Halted,
        why: UnhaltFor,
    },
    /// Queues (or joins) a snapshot → `SnapshotProgress`…, `SnapshotSealed` | `SnapshotFailed`.
    /// With `drill_first` (`snapshots.drill = "before-release"`), a scratch database is started
    /// beside it and the sealed snapshot is drilled before it is reported: `SnapshotSealed`
    /// only once its drill passed, else `DrillFailed` (src/drill/).
    RequestSnapshot {
        request: Box<crate::snapshot::Request>,
        drill_first: bool,
    },
    /// Runs a verify in its own task → `Verified`.
    Verify {
        due: VerifyDue,
        plan: Box<crate::verify::Plan>,
        stack: Box<Stack>,
    },
    /// Watches a compose dir (replacing any other) → `ComposeRead`.
    WatchCompose {
        dir: PathBuf,
        files: Vec<PathBuf>,
        env_file: Option<PathBuf>,
    },
    /// `status` shows the stack as the policy knows it (the `.env` version follows edits).
    ShowStack(Box<Stack>),
    /// `status`: the restore running and its step.
    ShowRestoring(Option<String>),
    /// `status`: a restore unfinished (its journal's line).
    ShowIncomplete(Option<String>),
    /// Reads the upload activity, off the driver's loop → `Uploads`.
    AskUploads,
    /// `status`: the upload activity.
    ShowUploads(Box<crate::uploads::RecentUploads>),
    Notify(Box<Notice>),
    Reply {
        to: ReplyId,
        result: Result<String, String>,
    },
    /// Persists every project's state and publishes the current one to `status`.
    Publish,
}

/// Protection's decisions, and what it must know to make them.
pub struct Policy {
    pub(super) config: Config,
    pub(super) state: ProjectState,
    /// Every other project's state, kept for when it comes back.
    pub(super) others: super::persist::StateFile,
    pub(super) stack: Option<Stack>,
    /// Image reference → ID, learned from discovery and image events.
    image_ids: HashMap<String, String>,
    /// Image ID → version name.
    versions: HashMap<String, String>,
    compose_dir: Option<PathBuf>,
    /// What the compose config names now (the image a `compose pull` would fetch).
    compose_view: Option<ComposeView>,
    deaths: crate::crashloop::Detector,
    /// Containers sent a signal by someone, until they start again.
    stopping: HashSet<String>,
    /// A post-upgrade verify is running.
    verifying: bool,
    /// Callers of `release` waiting for the retried snapshot.
    release_waiters: Vec<ReplyId>,
    /// A restore runs, or one is unfinished: protection stands back.
    restore: Option<restoring::Mode>,
    /// Server starts between their pause and their inspect, one per container: a second
    /// start (another container) must not drop the first, or it stays paused unjudged.
    starting: Vec<Starting>,
    disk: Box<Disk>,
    /// The host's CPU, for the upgrade-path table's CPU rows (read by the driver at start).
    cpu: crate::paths::Cpu,
    /// The newest reading of the upload activity.
    uploads: Option<crate::uploads::RecentUploads>,
}

impl Policy {
    /// The policy over `states` (protection.json as read); the project resumed at once is
    /// the configured one, or the only one a host had.
    pub fn new(config: Config, mut others: super::persist::StateFile) -> Policy {
        let configured = config.stack.project.clone();
        let only = (others.projects.len() == 1)
            .then(|| others.projects.keys().next().cloned())
            .flatten();
        let view = match configured.or(only) {
            Some(p) => others
                .projects
                .remove(&p)
                .unwrap_or_else(|| Protection::fresh(&p)),
            None => Protection::default(),
        };
        let mut state = ProjectState::from_view(view);
        state.fail_open = config.protect.fail_open;
        let deaths = crate::crashloop::Detector::new(
            config.crash_loop.deaths,
            config.crash_loop.window_secs,
        );
        Policy {
            config,
            state,
            others,
            stack: None,
            image_ids: HashMap::new(),
            versions: HashMap::new(),
            compose_dir: None,
            compose_view: None,
            deaths,
            stopping: HashSet::new(),
            verifying: false,
            release_waiters: Vec::new(),
            restore: None,
            starting: Vec::new(),
            disk: Box::default(),
            cpu: crate::paths::Cpu::default(),
            uploads: None,
        }
    }

    /// The host's CPU flags, read once by the driver (the policy reads no file).
    pub fn set_host_cpu(&mut self, cpu: crate::paths::Cpu) {
        self.cpu = cpu;
    }

    pub fn state(&self) -> &ProjectState {
        &self.state
    }

    /// The file as it is to be written: every project's view, the current one included.
    pub fn state_file(&self) -> super::persist::StateFile {
        let mut all = self.others.clone();
        if let Some(name) = &self.state.project {
            all.projects.insert(name.clone(), self.state.view());
        }
        all
    }

    /// Decides on `event`; the effects are to be carried out in order.
    pub fn step(&mut self, event: Event, now: DateTime<Utc>) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(event) = self.stand_back_while_restoring(event, now, &mut out) else {
            return out;
        };
        match event {
            Event::Started(e) => {
                let id = e.container_id.clone();
                self.on_start(e, now, &mut out);
                // After a stop or restart by hand, the start resets Docker's RestartCount.
                if self.stopping.remove(&id) {
                    out.push(Effect::ReadRestartCount {
                        container: id,
                        why: CountFor::StartedByHand,
                    });
                }
            }
            Event::Killed(e) => {
                self.stopping.insert(e.container_id);
            }
            Event::Died(e) => self.on_died(e, &mut out),
            Event::Image { reference } => self.on_image(reference, &mut out),
            Event::Discovered { stack, listed_at } => {
                self.on_discovered(*stack, listed_at, now, &mut out)
            }
            Event::Compose(e) => self.on_compose(e, now, &mut out),
            Event::Release {
                service: Some(service),
                reply,
                ..
            } => self.on_unhalt(&service, reply, &mut out),
            Event::Release {
                force,
                service: None,
                reply,
            } => self.on_release(force, reply, now, &mut out),
            Event::Ack { reply } => self.on_ack(reply, &mut out),
            Event::Wakeup => self.on_wakeup(now, &mut out),
            Event::Restore(e) => self.on_restore(e, now, &mut out),
            Event::Disk(disk) => {
                self.disk = disk;
                self.refresh_snapshot_index();
            }
            Event::Paused { container, outcome } => {
                self.on_paused(container, outcome, now, &mut out)
            }
            Event::Inspected { container, image } => {
                self.on_inspected(container, image, now, &mut out)
            }
            Event::ImageInspected { reference, image } => {
                self.on_image_inspected(reference, image, now, &mut out)
            }
            Event::ComposeRead {
                dir,
                view,
                watching,
            } => {
                if self.compose_dir.as_ref() == Some(&dir) {
                    self.compose_view = view;
                    if !watching {
                        self.compose_dir = None;
                    }
                }
            }
            Event::Thawed {
                server,
                why,
                result,
                image_id,
            } => self.on_thawed(server, why, result, image_id, now, &mut out),
            Event::Migrations { version, result } => {
                self.on_migrations(&version, result, now, &mut out)
            }
            Event::RestartCount {
                container,
                count,
                read_at,
                why,
            } => self.on_restart_count(container, count, read_at, why, &mut out),
            Event::Evidence {
                found,
                evidence,
                facts,
                incident_id,
            } => self.on_evidence(found, *evidence, facts, incident_id, now, &mut out),
            Event::Halted { incident, results } => {
                self.on_halted(*incident, results, now, &mut out)
            }
            Event::Unhalted {
                halted,
                result,
                why,
            } => self.on_unhalted(halted, result, why, now, &mut out),
            Event::VerifyNotRun => self.verifying = false,
            Event::SnapshotProgress(line) => {
                if let Some(run) = self.state.phase.run_mut() {
                    run.step = line;
                    run.step_since = now;
                    out.push(Effect::Publish);
                }
            }
            Event::SnapshotSealed { id, version } => self.on_sealed(id, version, now, &mut out),
            Event::SnapshotFailed(failure) => self.on_snapshot_failed(failure, now, &mut out),
            Event::Uploads(seen) => self.on_uploads(*seen, now, &mut out),
            Event::DrillFailed { id, version, error } => {
                self.on_drill_failed(id, version, error, now, &mut out)
            }
            Event::Verified {
                due,
                report,
                server,
            } => self.on_verified(due, *report, server, now, &mut out),
        }
        // A release wait belongs to its freeze: gone with it.
        if self.state.phase.frozen().is_none() {
            self.state.release_wait = None;
        }
        out
    }

    /// When the policy must look again without an input: the end of a settling window, a
    /// verify that is due, a freeze's wait for its snapshot running out.
    pub fn next_wakeup(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.restore.is_some() {
            return None;
        }
        let settle = self
            .state
            .settling
            .as_ref()
            .map(|s| s.since + self.crash_loop_window() + TimeDelta::seconds(1));
        let verify = self
            .state
            .verifies
            .due
            .as_ref()
            .filter(|_| !self.verifying)
            .map(|d| d.not_before);
        let at = settle
            .into_iter()
            .chain(verify)
            .chain(self.freeze_deadline())
            .chain(self.release_check())
            .min()?;
        Some(if at <= now - TimeDelta::seconds(1) {
            now + AGAIN
        } else {
            at
        })
    }

    fn on_wakeup(&mut self, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let before = self.state.clone();
        if self.freeze_deadline().is_some_and(|at| at <= now) {
            self.hold_stuck(now, out);
        }
        self.check_release(now, out);
        if let Some(stack) = self.stack.clone() {
            self.settle(&stack, now, out);
        }
        if self
            .state
            .verifies
            .due
            .as_ref()
            .is_some_and(|d| d.not_before <= now)
        {
            self.start_verify(out);
        }
        // Woken every few seconds while a server is not ready: written only on a change.
        if self.state != before {
            out.push(Effect::Publish);
        }
    }

    fn baseline_version(&self) -> Option<String> {
        self.state.baseline.as_ref().map(|b| b.version.clone())
    }

    /// The database runs with `b` from now on; a change of image restarts `baseline_since`.
    fn set_baseline(&mut self, b: Baseline, now: DateTime<Utc>) {
        let same = self
            .state
            .baseline
            .as_ref()
            .is_some_and(|old| old.image_id == b.image_id);
        if let Some(old) = &self.state.baseline
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
        if !same || self.state.baseline_since.is_none() {
            self.state.baseline_since = Some(now);
        }
        self.state.baseline = Some(b);
    }

    /// The newest pin of this project, when it is a rollback to `version` that `pin` allowed
    /// (or was forced to), made since the database took its current version.
    fn rollback_pinned(&self, version: &str) -> Option<PinRecord> {
        let project = self.state.project.as_deref()?;
        let since = self.state.baseline_since?;
        match &self.disk.pins {
            Ok(records) => pinned_rollback(records, project, version, since),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pins; a downgrade is held");
                None
            }
        }
    }

    /// Asks for the protective snapshot, unless one runs (its result settles this too).
    fn request_snapshot(&mut self, trigger: Trigger, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        if self.state.phase.snapshotting() {
            return;
        }
        self.state.phase.set_run(Some(SnapshotRun {
            trigger: trigger.as_str().to_string(),
            since: now,
            step: "queued".into(),
            step_since: now,
        }));
        let label = self
            .state
            .pending
            .as_ref()
            .map(|p| format!("{} ({})", p.arrow(), p.source));
        out.push(Effect::RequestSnapshot {
            request: Box::new(crate::snapshot::Request {
                trigger: trigger.as_str().into(),
                label,
                version: self.state.data_version(),
                // The stack as the policy last saw it (none between `compose down` and `up`:
                // the queue then waits for the one discovery publishes).
                stack: self.stack.clone(),
            }),
            // A snapshot not proven to restore does not let an update migrate.
            drill_first: self.config.snapshots.drill == crate::config::DrillMode::BeforeRelease,
        });
        out.push(Effect::Publish);
    }

    fn notify(
        &self,
        kind: EventKind,
        title: String,
        message: String,
        now: DateTime<Utc>,
    ) -> Effect {
        let pending = self.state.pending.as_ref();
        // Before a pending change goes through, the admin hears of a phone backing up.
        let message = match self
            .uploads
            .as_ref()
            .filter(|u| pending.is_some() && u.busy())
        {
            Some(u) => format!("{message}\n{}.", u.line()),
            None => message,
        };
        Effect::Notify(Box::new(Notice {
            kind,
            project: self
                .stack
                .as_ref()
                .map(|s| s.project.clone())
                .unwrap_or_default(),
            title,
            message,
            snapshot: pending.and_then(|p| p.snapshot.clone()),
            from_version: pending.map(|p| p.from_label().to_string()),
            to_version: pending.map(|p| p.to.clone()),
            at: now,
        }))
    }

    fn record_release(
        &mut self,
        container: &str,
        forced: bool,
        what: &str,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        tracing::warn!(container, forced, what, "released");
        self.state.releases.push(Release {
            at: now,
            container_name: container.into(),
            forced,
            what: what.into(),
        });
        let excess = self.state.releases.len().saturating_sub(RELEASES_KEPT);
        self.state.releases.drain(..excess);
        out.push(self.notify(
            EventKind::Released,
            format!(
                "{container} released{}",
                if forced { " (forced)" } else { "" }
            ),
            what.to_string(),
            now,
        ));
    }

    /// The pending change is made (the server runs its version): it settles, then is verified.
    fn change_made(&mut self, now: DateTime<Utc>) {
        if let Some(change) = self.state.pending.take() {
            self.state.settling = Some(Settling { change, since: now });
        }
    }

    fn refresh_snapshot_index(&mut self) {
        let project = self.state.project.clone();
        self.state.last_snapshot_per_version = self
            .disk
            .snapshots
            .iter()
            .filter(|m| project.as_ref().is_none_or(|p| &m.project == p))
            .map(|m| (m.version.clone(), m.id.clone()))
            .collect();
    }

    fn crash_loop_window(&self) -> TimeDelta {
        TimeDelta::seconds(self.config.crash_loop.window_secs as i64)
    }

    fn is_halted(&self, container_id: &str) -> bool {
        self.state
            .halted
            .iter()
            .any(|h| h.container == container_id)
    }

    /// The change a crash loop belongs to: the one pending, or the one just made.
    fn change_in_progress(&self) -> Option<&PendingChange> {
        self.state
            .pending
            .as_ref()
            .or(self.state.settling.as_ref().map(|s| &s.change))
    }

    fn new_pending(
        &self,
        to: &str,
        to_image: Option<String>,
        source: ChangeSource,
        now: DateTime<Utc>,
    ) -> PendingChange {
        PendingChange {
            from: self.baseline_version(),
            to: to.to_string(),
            to_image,
            source,
            detected_at: now,
            snapshot: None,
            sealed_at: None,
            notes: Vec::new(),
        }
    }
}

/// The newest pin of `project` (in `records`, oldest first), when it is to `version`, was
/// allowed or forced, and was made after `since`.
pub(super) fn pinned_rollback(
    records: &[PinRecord],
    project: &str,
    version: &str,
    since: DateTime<Utc>,
) -> Option<PinRecord> {
    let newest = records.iter().rev().find(|r| r.project == project)?;
    (same_version(&newest.version, version)
        && (newest.verdict.allows() || newest.forced)
        && newest.at > since)
        .then(|| newest.clone())
}

fn push_bounded(v: &mut Vec<f64>, x: f64, keep: usize) {
    v.push(x);
    let excess = v.len().saturating_sub(keep);
    v.drain(..excess);
}
