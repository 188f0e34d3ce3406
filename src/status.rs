//! What the daemon is doing, as one value: published by the workers through a
//! `tokio::sync::watch` channel and copied out by the control socket and the systemd status
//! line. Only data here, no I/O.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::discover::Stack;
use crate::protect::Protection;
use crate::protect::state::{Headline, ProjectState};
use crate::snapshot::store::Leftover;

/// The daemon's state as the workers publish it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonState {
    pub started_at: DateTime<Utc>,
    /// One line on what the daemon is doing now; also the systemd `STATUS=` line.
    pub activity: String,
    pub docker: DockerStatus,
    pub stack: Option<Stack>,
    /// Why there is no stack (or why the last discovery failed).
    pub discovery_error: Option<String>,
    pub discovered_at: Option<DateTime<Utc>>,
    pub last_event: Option<EventSeen>,
    pub last_snapshot: Option<SnapshotSeen>,
    /// Why the last snapshot attempt failed, until one succeeds.
    pub last_snapshot_error: Option<String>,
    /// Why the retention after the last seal did not do all it meant to (a snapshot it could
    /// not delete, an unreadable restore journal); cleared by the next retention that does.
    /// The snapshot itself is sealed either way.
    #[serde(default)]
    pub retention_warning: Option<String>,
    /// Partial snapshots that could not be removed, each with why: the daemon protects
    /// anyway and retries them (daemon.rs `PARTIAL_RETRY`, and when a snapshot begins).
    #[serde(default)]
    pub partials_left: Vec<Leftover>,
    #[serde(default)]
    pub protection: Protection,
    /// A restore that has not finished (its journal in the data dir): the daemon does not
    /// protect until it is finished, and says how to finish it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_incomplete: Option<String>,
    /// A restore running through the daemon: its snapshot and step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restoring: Option<String>,
    /// Assets uploaded lately (uploads.rs), read every `uploads::REFRESH`; None before the
    /// first reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploads: Option<crate::uploads::RecentUploads>,
    /// The restore drill of the newest snapshot drilled or sealed (src/drill/).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillSeen>,
}

/// A snapshot's restore drill as the daemon last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillSeen {
    pub snapshot: String,
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<crate::snapshot::store::DrillResult>,
    /// Why no drill could be run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotSeen {
    pub id: String,
    pub version: String,
    pub sealed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DockerStatus {
    pub host: String,
    pub reachable: bool,
    pub api_version: Option<String>,
    pub error: Option<String>,
    /// When `reachable` last changed.
    pub since: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSeen {
    pub at: DateTime<Utc>,
    /// `container` or `image`.
    pub kind: String,
    pub action: String,
    /// Container name, or image reference / ID.
    pub subject: String,
}

impl DaemonState {
    pub fn new(docker_host: String) -> Self {
        let now = Utc::now();
        DaemonState {
            started_at: now,
            activity: "starting".to_string(),
            docker: DockerStatus {
                host: docker_host,
                reachable: false,
                api_version: None,
                error: None,
                since: now,
            },
            stack: None,
            discovery_error: None,
            discovered_at: None,
            last_event: None,
            last_snapshot: None,
            last_snapshot_error: None,
            retention_warning: None,
            partials_left: Vec::new(),
            protection: Protection::default(),
            restore_incomplete: None,
            restoring: None,
            uploads: None,
            drill: None,
        }
    }

    /// The protection state of the stack found now; None without a stack, or while the state
    /// held is still another (or a vanished) project's.
    pub fn current_protection(&self) -> Option<&Protection> {
        let stack = self.stack.as_ref()?;
        (self.protection.project.as_deref() == Some(stack.project.as_str()))
            .then_some(&self.protection)
    }

    /// The status line an admin sees in `systemctl status`.
    pub fn status_line(&self) -> String {
        if let Some(restoring) = &self.restoring {
            return format!("RESTORING {restoring}");
        }
        if let Some(restore) = &self.restore_incomplete {
            return format!("NOT PROTECTING: {restore}");
        }
        if !self.docker.reachable {
            return match &self.docker.error {
                Some(e) => format!("waiting for Docker: {e}"),
                None => "connecting to Docker".to_string(),
            };
        }
        let shown = self
            .current_protection()
            .map(|p| ProjectState::shown(p.clone()))
            .unwrap_or_default();
        match shown.headline() {
            Headline::Held(hold) => {
                return format!("HELD {}: {}", hold.container_name, hold.reason);
            }
            Headline::Frozen { server, .. } if shown.release_wait().is_some() => {
                let wait = shown.release_wait().expect("checked");
                return format!(
                    "frozen {} ({}): snapshot {} sealed, waiting for {}",
                    server.container_name, server.version, wait.snapshot, wait.waiting_for
                );
            }
            Headline::Frozen { server, run } => {
                return format!(
                    "frozen {} ({}) until its snapshot is sealed{}",
                    server.container_name,
                    server.version,
                    run.map(|r| format!("; snapshot {}", r.waiting(Utc::now())))
                        .unwrap_or_default()
                );
            }
            Headline::Degraded(d) => {
                return format!(
                    "DEGRADED after {} → {}: {}; {}",
                    d.from,
                    d.to,
                    d.failed
                        .iter()
                        .map(|c| format!("{} {}", c.name, c.detail))
                        .collect::<Vec<_>>()
                        .join("; "),
                    match &d.snapshot {
                        Some(id) => format!("`immich-guard restore {id}` or `immich-guard ack`"),
                        None => "`immich-guard ack` once looked at".to_string(),
                    }
                );
            }
            Headline::Paused(x) => {
                return format!(
                    "PAUSED {} ({}), not by immich-guard as far as it knows: left paused; `immich-guard release` snapshots if needed and unpauses it",
                    x.container_name, x.version
                );
            }
            Headline::Halted { halted, incident } => {
                let halted: Vec<&str> = halted.iter().map(|h| h.service.as_str()).collect();
                return format!(
                    "HALTED {} (crash loop){}; see `immich-guard incident`",
                    halted.join(", "),
                    incident
                        .map(|i| format!(": {}", i.cause))
                        .unwrap_or_default()
                );
            }
            // The activity line says what runs.
            Headline::Snapshotting(_) | Headline::Idle => {}
        }
        match (&self.stack, &self.discovery_error) {
            (Some(stack), _) => {
                let version = stack
                    .version
                    .as_ref()
                    .map(|v| v.name())
                    .unwrap_or_else(|| "no server container".to_string());
                format!("{}: stack {} ({version})", self.activity, stack.project)
            }
            (None, Some(e)) => format!("no stack to protect: {e}"),
            (None, None) => "no stack discovered yet".to_string(),
        }
    }
}

/// The `status` answer: the published state plus what only the responder knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon_version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub status_line: String,
    #[serde(flatten)]
    pub state: DaemonState,
}

impl StatusReport {
    pub fn from_state(state: &DaemonState) -> Self {
        let mut state = state.clone();
        if state.current_protection().is_none() {
            // Another project's state is never shown as this one's, nor a vanished one's.
            state.protection = Protection::default();
        }
        StatusReport {
            daemon_version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_secs: (Utc::now() - state.started_at).num_seconds().max(0) as u64,
            status_line: state.status_line(),
            state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protect::ProtectState;

    #[test]
    fn status_line_says_why_docker_is_missing() {
        let mut s = DaemonState::new("unix:///var/run/docker.sock".into());
        s.docker.error = Some("no Docker socket at /var/run/docker.sock".into());
        assert_eq!(
            s.status_line(),
            "waiting for Docker: no Docker socket at /var/run/docker.sock"
        );
        s.docker.reachable = true;
        s.discovery_error = Some("no Immich stack found".into());
        assert_eq!(
            s.status_line(),
            "no stack to protect: no Immich stack found"
        );
    }

    fn stack(project: &str) -> Stack {
        serde_json::from_value(
            serde_json::json!({ "project": project, "compose_files": [], "notes": [] }),
        )
        .expect("a stack from its project alone")
    }

    #[test]
    fn status_line_says_what_is_halted() {
        let mut s = DaemonState::new("unix:///x".into());
        s.docker.reachable = true;
        s.stack = Some(stack("immich"));
        s.protection.project = Some("immich".into());
        for service in ["database", "immich-server"] {
            s.protection.halted.push(crate::incident::Halted {
                service: service.into(),
                container: format!("{service}-id"),
                restart_policy: "always".into(),
                halted_at: None,
            });
        }
        s.protection.state = ProtectState::Halted;
        assert_eq!(
            s.status_line(),
            "HALTED database, immich-server (crash loop); see `immich-guard incident`"
        );
    }

    #[test]
    fn status_line_says_degraded_with_the_failed_lines_and_the_snapshot() {
        let mut s = DaemonState::new("unix:///x".into());
        s.docker.reachable = true;
        s.stack = Some(stack("immich"));
        s.protection.project = Some("immich".into());
        s.protection.verifies.degraded = Some(crate::post_upgrade::Degraded {
            since: Utc::now(),
            from: "v1.119.0".into(),
            to: "v1.120.0".into(),
            snapshot: Some("20261125T020000Z-v1.119.0-pre-update".into()),
            failed: vec![crate::verify::Check {
                name: "assets".into(),
                outcome: crate::verify::Outcome::Fail,
                detail: "0 now, 40000 in the snapshot".into(),
            }],
            hint: String::new(),
            server: None,
        });
        s.protection.state = ProtectState::Degraded;
        assert_eq!(
            s.status_line(),
            "DEGRADED after v1.119.0 → v1.120.0: assets 0 now, 40000 in the snapshot; `immich-guard restore 20261125T020000Z-v1.119.0-pre-update` or `immich-guard ack`"
        );
        let json = serde_json::to_value(StatusReport::from_state(&s)).unwrap();
        assert_eq!(json["protection"]["state"], "degraded");
        assert_eq!(
            json["protection"]["verifies"]["degraded"]["snapshot"],
            "20261125T020000Z-v1.119.0-pre-update"
        );
    }

    #[test]
    fn another_projects_state_is_never_reported_as_this_ones() {
        let mut s = DaemonState::new("unix:///x".into());
        s.docker.reachable = true;
        s.protection.project = Some("a".into());
        s.protection.baseline = Some(crate::protect::Baseline {
            version: "v1.119.0".into(),
            image_id: "sha256:a".into(),
        });
        s.protection.state = ProtectState::Held;
        // No stack: nothing of a's.
        s.discovery_error = Some("no Immich stack found".into());
        let r = StatusReport::from_state(&s);
        assert_eq!(r.state.protection, Protection::default());
        assert_eq!(r.status_line, "no stack to protect: no Immich stack found");
        // Stack b found, a's state still held: nothing of a's either.
        s.stack = Some(stack("b"));
        s.discovery_error = None;
        let r = StatusReport::from_state(&s);
        assert_eq!(r.state.protection.baseline, None);
        assert!(r.status_line.contains("stack b"), "{}", r.status_line);
        // a itself: its state.
        s.stack = Some(stack("a"));
        let r = StatusReport::from_state(&s);
        assert_eq!(r.state.protection, s.protection);
    }

    #[test]
    fn report_round_trips_through_json() {
        let s = DaemonState::new("unix:///x".into());
        let r = StatusReport::from_state(&s);
        let back: StatusReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
