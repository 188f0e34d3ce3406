//! What protection knows and decides about one compose project (docs/architecture.md
//! "State machine"): the phase the server gate is in, as an enum whose variants carry only
//! their own data, and `Protection`, the flat view `status` shows and `protection.json`
//! keeps. The view is derived from the phase; a file read back is mapped onto a phase
//! (hold before freeze before a foreign pause), so two gates at once cannot be represented.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::post_upgrade::Verifies;

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
    /// The version the database ran with; None when no baseline was known (the daemon first
    /// saw the server as it started). Written `unknown`.
    #[serde(with = "known_or_unknown")]
    pub from: Option<String>,
    pub to: String,
    /// The new image, when the change came from an image (pull/tag) or a start.
    pub to_image: Option<String>,
    pub source: ChangeSource,
    pub detected_at: DateTime<Utc>,
    /// Sealed snapshot taken for this change.
    pub snapshot: Option<String>,
    #[serde(default)]
    pub sealed_at: Option<DateTime<Utc>>,
    /// What Immich's upgrade-path table says about this change (crate::paths): holds and
    /// warnings, shown in `status` and notified once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<crate::paths::Verdict>,
}

impl PendingChange {
    /// `v1.118.0 → v1.119.0`, `unknown` for a version not known.
    pub fn arrow(&self) -> String {
        format!("{} → {}", self.from_label(), self.to)
    }

    pub fn from_label(&self) -> &str {
        self.from.as_deref().unwrap_or(UNKNOWN)
    }
}

/// How a version not known is written in `status`, files and notifications.
pub const UNKNOWN: &str = "unknown";

mod known_or_unknown {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_deref().unwrap_or(super::UNKNOWN))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let v = String::deserialize(d)?;
        Ok((v != super::UNKNOWN).then_some(v))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldKind {
    SnapshotFailed,
    Downgrade,
    /// A change Immich's upgrade-path table forbids (crate::paths): held before it migrates
    /// until the admin takes the way through or `release --force`.
    UpgradePath,
    /// The protective snapshot sealed but its restore drill failed (`snapshots.drill =
    /// "before-release"`): held like a failed snapshot.
    DrillFailed,
}

impl HoldKind {
    /// Held for want of a snapshot proven good: `release` takes another, and its seal (and
    /// drill) ends the hold.
    pub fn retries_snapshot(self) -> bool {
        matches!(self, HoldKind::SnapshotFailed | HoldKind::DrillFailed)
    }
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
    /// A frozen server whose snapshot sealed, waiting for what its release needs
    /// (policy/release_ready.rs); only while frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_wait: Option<ReleaseWait>,
}

/// A frozen server kept frozen after its snapshot sealed, until no upload has arrived for
/// `protect.wait_for_quiet_uploads` or `until` passes (docs/operations.md "Uploads").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseWait {
    /// The snapshot that sealed for the freeze.
    pub snapshot: String,
    /// When that snapshot began: an upload after it may not be in it.
    pub snapshot_since: DateTime<Utc>,
    pub since: DateTime<Utc>,
    /// The bound (`protect.wait_for_quiet_max_minutes`): then the server goes anyway.
    pub until: DateTime<Utc>,
    /// What it waits for, in the admin's words.
    pub waiting_for: String,
    /// When the upload activity is to be read next.
    pub next_check: DateTime<Utc>,
    /// A read was asked for and its answer is not in yet.
    #[serde(default)]
    pub asked: bool,
    /// A second snapshot was asked for the uploads that arrived after the first began, and
    /// why the server may go: its seal releases the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resnapshot: Option<String>,
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

pub(crate) fn for_how_long(d: chrono::TimeDelta) -> String {
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
            release_wait: None,
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
    pub(crate) fn containers(&self) -> impl Iterator<Item = &str> {
        self.halted
            .iter()
            .map(|h| h.container.as_str())
            .chain(self.frozen.iter().map(|f| f.container.as_str()))
            .chain(self.hold.iter().map(|h| h.container.as_str()))
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
pub use crate::version::{is_older, parse_version, same_version};

/// Where a pending change was seen first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeSource {
    #[serde(rename = ".env")]
    Env,
    #[serde(rename = "compose file")]
    ComposeFile,
    #[serde(rename = "image pull")]
    ImagePull,
    #[serde(rename = "server start")]
    ServerStart,
    /// At daemon start, `.env` names another version than the database runs.
    #[serde(rename = "startup reconcile")]
    StartupReconcile,
}

impl std::fmt::Display for ChangeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChangeSource::Env => ".env",
            ChangeSource::ComposeFile => "compose file",
            ChangeSource::ImagePull => "image pull",
            ChangeSource::ServerStart => "server start",
            ChangeSource::StartupReconcile => "startup reconcile",
        })
    }
}

/// Why a protective snapshot is taken (`Request::trigger`, shown in `status` and `list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A version change was seen before any new server runs.
    PreUpdate,
    /// A server is frozen (or held) until it is sealed.
    PreStart,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::PreUpdate => "pre-update",
            Trigger::PreStart => "pre-start",
        }
    }
}

/// The gate between a new server and its migrations, with the protective snapshot that may
/// run in it. Each variant holds only what that phase has: a hold and a freeze at once, or a
/// freeze without its server, cannot be written (docs/architecture.md "State machine").
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Idle,
    /// A protective snapshot runs; no server waits on it.
    Snapshotting {
        run: SnapshotRun,
    },
    /// A server is paused (or stopped) until a snapshot of the baseline is sealed. No run:
    /// the snapshot is still to be asked for (before the first discovery, after a restart).
    Frozen {
        server: Frozen,
        run: Option<SnapshotRun>,
    },
    /// Fail closed: the server stays paused until the admin acts. A run: `release` retries it.
    Held {
        hold: Hold,
        run: Option<SnapshotRun>,
    },
    /// Paused by someone else (or a run that crashed before writing its freeze down).
    Paused {
        server: PausedServer,
        run: Option<SnapshotRun>,
    },
}

impl Phase {
    pub fn run(&self) -> Option<&SnapshotRun> {
        match self {
            Phase::Idle => None,
            Phase::Snapshotting { run } => Some(run),
            Phase::Frozen { run, .. } | Phase::Held { run, .. } | Phase::Paused { run, .. } => {
                run.as_ref()
            }
        }
    }

    pub fn run_mut(&mut self) -> Option<&mut SnapshotRun> {
        match self {
            Phase::Idle => None,
            Phase::Snapshotting { run } => Some(run),
            Phase::Frozen { run, .. } | Phase::Held { run, .. } | Phase::Paused { run, .. } => {
                run.as_mut()
            }
        }
    }

    pub fn snapshotting(&self) -> bool {
        self.run().is_some()
    }

    /// Starts or ends the protective snapshot, in whatever gate the phase is.
    pub fn set_run(&mut self, new: Option<SnapshotRun>) {
        *self = match (std::mem::replace(self, Phase::Idle), new) {
            (Phase::Idle | Phase::Snapshotting { .. }, Some(run)) => Phase::Snapshotting { run },
            (Phase::Idle | Phase::Snapshotting { .. }, None) => Phase::Idle,
            (Phase::Frozen { server, .. }, run) => Phase::Frozen { server, run },
            (Phase::Held { hold, .. }, run) => Phase::Held { hold, run },
            (Phase::Paused { server, .. }, run) => Phase::Paused { server, run },
        };
    }

    /// No server waits at the gate any more; a running snapshot goes on.
    pub fn open(&mut self) {
        let run = self.run().cloned();
        *self = Phase::Idle;
        self.set_run(run);
    }

    pub fn frozen(&self) -> Option<&Frozen> {
        match self {
            Phase::Frozen { server, .. } => Some(server),
            _ => None,
        }
    }

    pub fn hold(&self) -> Option<&Hold> {
        match self {
            Phase::Held { hold, .. } => Some(hold),
            _ => None,
        }
    }

    pub fn paused(&self) -> Option<&PausedServer> {
        match self {
            Phase::Paused { server, .. } => Some(server),
            _ => None,
        }
    }

    /// The container the gate holds (frozen or held), if any.
    pub fn gated(&self) -> Option<&str> {
        match self {
            Phase::Frozen { server, .. } => Some(&server.container),
            Phase::Held { hold, .. } => Some(&hold.container),
            _ => None,
        }
    }
}

/// What `status` leads with (`ProjectState::headline`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Headline<'a> {
    Held(&'a Hold),
    Halted {
        halted: &'a [crate::incident::Halted],
        incident: Option<&'a crate::incident::Incident>,
    },
    Frozen {
        server: &'a Frozen,
        run: Option<&'a SnapshotRun>,
    },
    Paused(&'a PausedServer),
    Degraded(&'a crate::post_upgrade::Degraded),
    Snapshotting(&'a SnapshotRun),
    Idle,
}

/// One project's protection as the policy holds it: `Protection` with the gate as a `Phase`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectState {
    pub project: Option<String>,
    pub phase: Phase,
    pub baseline: Option<Baseline>,
    /// When the baseline became what it is: a pin recorded before it judged another database.
    pub baseline_since: Option<DateTime<Utc>>,
    pub pending: Option<PendingChange>,
    pub settling: Option<Settling>,
    pub last_snapshot_per_version: BTreeMap<String, String>,
    pub freeze_delays_ms: Vec<f64>,
    pub releases: Vec<Release>,
    pub fail_open: bool,
    pub halted: Vec<crate::incident::Halted>,
    pub incident: Option<crate::incident::Incident>,
    pub verifies: Verifies,
    /// Meaningful only while `phase` is `Frozen` (`ProjectState::release_wait`).
    pub release_wait: Option<ReleaseWait>,
}

impl Default for ProjectState {
    fn default() -> Self {
        ProjectState::from_view(Protection::default())
    }
}

impl Baseline {
    /// The version (and image ID) a snapshot's data belongs to: the one the database last
    /// ran with, even while a newer server is frozen before its first start. `None` before
    /// any baseline: the snapshot takes the stack's own. Protection and the control socket's
    /// `snapshot` both ask here.
    pub fn data_version(baseline: Option<&Baseline>) -> Option<(String, String)> {
        baseline.map(|b| (b.version.clone(), b.image_id.clone()))
    }
}

impl Protection {
    /// The version and image the data belongs to (`Baseline::data_version`).
    pub fn data_version(&self) -> Option<(String, String)> {
        Baseline::data_version(self.baseline.as_ref())
    }
}

impl ProjectState {
    pub fn fresh(project: &str) -> ProjectState {
        ProjectState::from_view(Protection::fresh(project))
    }

    /// What `status` leads with, by what matters most to the admin: a hold, a halt, a
    /// freeze, a foreign pause, DEGRADED, a snapshot running, or nothing.
    pub fn headline(&self) -> Headline<'_> {
        let degraded = self.verifies.degraded.as_ref();
        match (&self.phase, self.halted.is_empty(), degraded) {
            (Phase::Held { hold, .. }, _, _) => Headline::Held(hold),
            (_, false, _) => Headline::Halted {
                halted: &self.halted,
                incident: self.incident.as_ref(),
            },
            (Phase::Frozen { server, run }, true, _) => Headline::Frozen {
                server,
                run: run.as_ref(),
            },
            (Phase::Paused { server, .. }, true, _) => Headline::Paused(server),
            (Phase::Idle | Phase::Snapshotting { .. }, true, Some(d)) => Headline::Degraded(d),
            (Phase::Snapshotting { run }, true, None) => Headline::Snapshotting(run),
            (Phase::Idle, true, None) => Headline::Idle,
        }
    }

    /// The one word `status` shows.
    pub fn summary(&self) -> ProtectState {
        match self.headline() {
            Headline::Held(_) => ProtectState::Held,
            Headline::Halted { .. } => ProtectState::Halted,
            Headline::Frozen { .. } => ProtectState::Frozen,
            Headline::Paused(_) => ProtectState::Paused,
            Headline::Degraded(_) => ProtectState::Degraded,
            Headline::Snapshotting(_) => ProtectState::Snapshotting,
            Headline::Idle => ProtectState::Idle,
        }
    }

    /// The flat view for `status` and `protection.json`.
    pub fn view(&self) -> Protection {
        Protection {
            project: self.project.clone(),
            state: self.summary(),
            baseline: self.baseline.clone(),
            pending: self.pending.clone(),
            frozen: self.phase.frozen().cloned(),
            hold: self.phase.hold().cloned(),
            last_snapshot_per_version: self.last_snapshot_per_version.clone(),
            freeze_delays_ms: self.freeze_delays_ms.clone(),
            releases: self.releases.clone(),
            fail_open: self.fail_open,
            halted: self.halted.clone(),
            incident: self.incident.clone(),
            settling: self.settling.clone(),
            baseline_since: self.baseline_since,
            verifies: self.verifies.clone(),
            snapshot_run: self.phase.run().cloned(),
            paused_server: self.phase.paused().cloned(),
            release_wait: self.release_wait().cloned(),
        }
    }

    /// The wait of a frozen server whose snapshot sealed; None in any other phase.
    pub fn release_wait(&self) -> Option<&ReleaseWait> {
        self.release_wait
            .as_ref()
            .filter(|_| self.phase.frozen().is_some())
    }

    /// A view read back (from `protection.json`): no snapshot survives a restart, so a
    /// freeze waits for a new one; a hold wins over a freeze, a freeze over a foreign pause.
    pub fn from_view(mut p: Protection) -> ProjectState {
        p.snapshot_run = None;
        // The freeze waits for a new snapshot, and the wait begins again when it seals.
        p.release_wait = None;
        ProjectState::shown(p)
    }

    /// A published view as the policy held it, its snapshot run included (for `status`).
    pub fn shown(p: Protection) -> ProjectState {
        let phase = match (p.hold, p.frozen, p.paused_server) {
            (Some(hold), _, _) => Phase::Held {
                hold,
                run: p.snapshot_run,
            },
            (None, Some(server), _) => Phase::Frozen {
                server,
                run: p.snapshot_run,
            },
            (None, None, Some(server)) => Phase::Paused {
                server,
                run: p.snapshot_run,
            },
            (None, None, None) => match p.snapshot_run {
                Some(run) => Phase::Snapshotting { run },
                None => Phase::Idle,
            },
        };
        ProjectState {
            project: p.project,
            phase,
            baseline: p.baseline,
            baseline_since: p.baseline_since,
            pending: p.pending,
            settling: p.settling,
            last_snapshot_per_version: p.last_snapshot_per_version,
            freeze_delays_ms: p.freeze_delays_ms,
            releases: p.releases,
            fail_open: p.fail_open,
            halted: p.halted,
            incident: p.incident,
            verifies: p.verifies,
            release_wait: p.release_wait,
        }
    }

    /// The version and image the data belongs to (`Baseline::data_version`).
    pub fn data_version(&self) -> Option<(String, String)> {
        Baseline::data_version(self.baseline.as_ref())
    }
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
}
