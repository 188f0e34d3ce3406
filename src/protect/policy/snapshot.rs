//! The protective snapshot ends: a frozen server goes, or is held (fail closed); one that
//! does not end within `snapshots.max_wait_secs` becomes a hold the admin can act on.

use chrono::{DateTime, TimeDelta, Utc};

use super::{Effect, Policy, Thaw};
use crate::notification::EventKind;
use crate::protect::state::{Frozen, Hold, HoldKind, Phase};

impl Policy {
    pub(super) fn on_sealed(
        &mut self,
        id: String,
        version: String,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let began = self.state.phase.run().map_or(now, |r| r.since);
        self.state.phase.set_run(None);
        if let Some(p) = &mut self.state.pending {
            p.snapshot = Some(id.clone());
            p.sealed_at = Some(now);
        }
        out.push(self.notify(
            EventKind::SnapshotSealed,
            format!("Snapshot {id} sealed"),
            format!("Database and storage of {version} are saved as {id}."),
            now,
        ));
        match self.state.phase.clone() {
            Phase::Frozen { server, .. } => self.after_seal(server, &id, began, now, out),
            // A retried snapshot (`release`) sealed: the hold is over.
            Phase::Held { hold, .. } if hold.kind.retries_snapshot() => {
                self.state.phase.open();
                out.push(Effect::Thaw {
                    server: Frozen::from(&hold),
                    why: Thaw::HoldSealed {
                        name: hold.container_name.clone(),
                    },
                });
            }
            _ => {}
        }
        out.push(Effect::Publish);
    }

    pub(super) fn on_snapshot_failed(
        &mut self,
        failure: crate::snapshot::SnapshotFailure,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        self.state.phase.set_run(None);
        let message = failure.message;
        tracing::error!(error = %message, transient = failure.transient, "the protective snapshot failed");
        let retried = !self.release_waiters.is_empty();
        for to in self.release_waiters.drain(..) {
            out.push(Effect::Reply {
                to,
                result: Err(format!("the snapshot failed again: {message}")),
            });
        }
        if let Phase::Held { hold, .. } = &mut self.state.phase
            && hold.kind.retries_snapshot()
        {
            hold.kind = HoldKind::SnapshotFailed;
            // `HELD:` quotes the newest failure, not the first one.
            hold.reason = snapshot_failed_reason(&hold.version, &message);
            if retried {
                let (version, reason, hint) =
                    (hold.version.clone(), hold.reason.clone(), hold.hint.clone());
                out.push(self.notify(
                    EventKind::Held,
                    format!("Immich {version} still held: snapshot failed again"),
                    format!("{reason} {hint}"),
                    now,
                ));
                out.push(Effect::Publish);
                return;
            }
        }
        let cover = Uncovered {
            kind: HoldKind::SnapshotFailed,
            cause: format!("the snapshot failed: {message}"),
            reason: snapshot_failed_reason,
            message: &message,
            hint: "fix the cause, then `immich-guard release` (retries the snapshot), or `immich-guard release --force` to start without one",
            title: "snapshot failed",
            unheld: (
                "Protective snapshot failed",
                format!(
                    "{message}. A server that starts on the new version will be frozen and snapshotted again."
                ),
            ),
        };
        self.frozen_uncovered(cover, now, out);
        out.push(Effect::Publish);
    }

    /// When a server frozen for the running snapshot stops waiting for it (`snapshots.
    /// max_wait_secs`): fail closed stays, but as a hold the admin is told about.
    pub(super) fn freeze_deadline(&self) -> Option<DateTime<Utc>> {
        let Phase::Frozen { run: Some(run), .. } = &self.state.phase else {
            return None;
        };
        let wait = TimeDelta::seconds(self.config.snapshots.max_wait_secs as i64);
        Some(run.since + wait)
    }

    /// The snapshot has not sealed within `max_wait_secs`: the frozen server is HELD (still
    /// paused). The snapshot keeps running; if it seals, the hold ends as after a `release`.
    pub(super) fn hold_stuck(&mut self, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let Phase::Frozen {
            server,
            run: Some(run),
        } = self.state.phase.clone()
        else {
            return;
        };
        let reason = format!(
            "the snapshot before starting {} has not sealed within snapshots.max_wait_secs ({} s): {} (since {})",
            server.version,
            self.config.snapshots.max_wait_secs,
            run.waiting(now),
            run.step_since.format("%Y-%m-%d %H:%M:%S UTC"),
        );
        tracing::error!(reason = %reason, "held the server: its snapshot does not finish");
        self.hold_frozen(
            HoldKind::SnapshotFailed,
            &server,
            reason,
            "find what blocks it (a lock on the database: `SELECT pid, state, query FROM pg_stat_activity`); once it seals the server is released; `immich-guard release` waits for it, `immich-guard release --force` starts the server without a snapshot",
            "snapshot does not finish",
            now,
            out,
        );
        out.push(Effect::Publish);
    }

    /// The frozen server stays paused, as a hold the admin is told about and acts on.
    #[allow(clippy::too_many_arguments)]
    fn hold_frozen(
        &mut self,
        kind: HoldKind,
        frozen: &Frozen,
        reason: String,
        hint: &str,
        title: &str,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let hold = Hold {
            kind,
            container: frozen.container.clone(),
            container_name: frozen.container_name.clone(),
            image_id: frozen.image_id.clone(),
            version: frozen.version.clone(),
            paused: true,
            reason,
            hint: hint.into(),
            since: now,
        };
        out.push(self.notify(
            EventKind::Held,
            format!("Immich {} held: {title}", frozen.version),
            format!("{} {}", hold.reason, hold.hint),
            now,
        ));
        let run = self.state.phase.run().cloned();
        self.state.phase = Phase::Held { hold, run };
    }
}

impl Policy {
    /// The protective snapshot sealed, but its drill failed (`snapshots.drill =
    /// "before-release"`): it does not count. A frozen server is held as for a failed
    /// snapshot (released with `protect.fail_open`, recorded as such); a hold already there
    /// (a `release` retry) says the newest failure; with no server waiting, the change stays
    /// uncovered, so the new server is frozen when it starts.
    pub(super) fn on_drill_failed(
        &mut self,
        id: String,
        version: String,
        error: String,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        self.state.phase.set_run(None);
        tracing::error!(snapshot = %id, error = %error, "the protective snapshot's restore drill failed");
        let message = format!("snapshot {id} sealed but its restore drill failed: {error}");
        for to in self.release_waiters.drain(..) {
            out.push(Effect::Reply {
                to,
                result: Err(message.clone()),
            });
        }
        const HINT: &str = "see `immich-guard list` and `immich-guard drill`; fix the cause, then `immich-guard release` (takes and drills a new snapshot), or `immich-guard release --force` to start without a proven one";
        if let Phase::Held { hold, .. } = &mut self.state.phase
            && hold.kind.retries_snapshot()
        {
            hold.kind = HoldKind::DrillFailed;
            hold.reason = drill_failed_reason(&hold.version, &message);
            hold.hint = HINT.into();
            let (version, reason) = (hold.version.clone(), hold.reason.clone());
            out.push(self.notify(
                EventKind::Held,
                format!("Immich {version} still held: restore drill failed"),
                format!("{reason} {HINT}"),
                now,
            ));
            out.push(Effect::Publish);
            return;
        }
        let cover = Uncovered {
            kind: HoldKind::DrillFailed,
            cause: message.clone(),
            reason: drill_failed_reason,
            message: &message,
            hint: HINT,
            title: "restore drill failed",
            unheld: (
                "Protective snapshot failed its restore drill",
                format!(
                    "{message}. The data of {version} is not covered: a server that starts on the new version will be frozen and snapshotted again."
                ),
            ),
        };
        self.frozen_uncovered(cover, now, out);
        out.push(Effect::Publish);
    }
}

/// A protective snapshot that does not cover the change (it failed, or its drill did).
struct Uncovered<'a> {
    kind: HoldKind,
    /// What `protect.fail_open`'s release record says.
    cause: String,
    reason: fn(&str, &str) -> String,
    message: &'a str,
    hint: &'static str,
    title: &'static str,
    /// Title and text of the notice when no server waits on it.
    unheld: (&'static str, String),
}

impl Policy {
    /// A frozen server goes with `protect.fail_open` (recorded with the cause), else is held;
    /// with none waiting, the admin is told the change is not covered.
    fn frozen_uncovered(
        &mut self,
        cover: Uncovered<'_>,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        match self.state.phase.frozen().cloned() {
            Some(frozen) if self.state.fail_open => {
                tracing::warn!(cause = %cover.cause, "protect.fail_open = true: releasing the server without a proven snapshot");
                self.state.phase.open();
                let name = frozen.container_name.clone();
                out.push(Effect::Thaw {
                    server: frozen,
                    why: Thaw::FailOpen {
                        name,
                        cause: cover.cause,
                    },
                });
            }
            Some(frozen) => {
                let reason = (cover.reason)(&frozen.version, cover.message);
                self.hold_frozen(
                    cover.kind,
                    &frozen,
                    reason,
                    cover.hint,
                    cover.title,
                    now,
                    out,
                );
            }
            None => out.push(self.notify(
                EventKind::SnapshotFailed,
                cover.unheld.0.into(),
                cover.unheld.1,
                now,
            )),
        }
    }
}

pub(super) fn drill_failed_reason(version: &str, message: &str) -> String {
    format!("the snapshot before starting {version} is not proven to restore: {message}")
}

pub(super) fn snapshot_failed_reason(version: &str, message: &str) -> String {
    format!("the snapshot before starting {version} failed: {message}")
}
