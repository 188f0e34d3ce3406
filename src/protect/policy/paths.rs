//! Immich's upgrade paths in protection (crate::paths; README.md "Upgrade paths"): a pending
//! change gets the table's verdicts as notes (status, one notification), and a server that
//! starts on a version a hold row forbids stays held before it migrates, with the reason,
//! the source and the way through, until the admin takes it or forces a release.

use chrono::{DateTime, Utc};

use super::{ContainerEvent, Effect, Policy};
use crate::notification::EventKind;
use crate::paths::{Level, Verdict};
use crate::protect::state::{ChangeSource, Hold, HoldKind, Phase, Trigger, same_version};

impl Policy {
    /// The table's verdicts on a change from the baseline to `to`, from what the daemon
    /// sees: the baseline (the version the database last ran with) and the Kysely
    /// migrations the newest sealed snapshot of that version recorded; the compose view
    /// (`.env` and `environment:`, the database image, the upload mount), else the running
    /// database's image; the host's CPU; the pins.
    pub(super) fn path_verdicts(&self, to: &str) -> Vec<Verdict> {
        let from = self.baseline_version();
        let kysely_migrations = from.as_deref().and_then(|from| {
            self.disk
                .snapshots
                .iter()
                .rev()
                .filter(|m| self.state.project.as_ref().is_none_or(|p| &m.project == p))
                .find(|m| same_version(&m.version, from))
                .map(|m| m.db.kysely_migrations)
        });
        let view = self.compose_view.as_ref();
        let running_database = self
            .stack
            .as_ref()
            .and_then(|s| s.database.as_ref())
            .map(|d| d.image.clone());
        let change = crate::paths::Change {
            from,
            to: to.to_string(),
            database: crate::paths::Database {
                kysely_migrations,
                image: view
                    .and_then(|v| v.paths.database_image.clone())
                    .or(running_database),
            },
            env: view.map(|v| v.paths.env.clone()).unwrap_or_default(),
            upload_mount: view.and_then(|v| v.paths.upload_mount.clone()),
            cpu: self.cpu.clone(),
            rollback_pinned: self.rollback_pinned(to).is_some(),
        };
        crate::paths::check(crate::paths::table(), &change)
    }

    /// The hold rows that forbid starting `version` now (a server already on the baseline
    /// image never gets here).
    pub(super) fn path_holds(&self, version: &str) -> Vec<Verdict> {
        self.path_verdicts(version)
            .into_iter()
            .filter(|v| v.level == Level::Hold)
            .collect()
    }

    /// The pending change's notes, judged again; a change in what they say is notified
    /// (once: the same notes are not notified again).
    pub(super) fn note_paths(&mut self, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let Some(to) = self.state.pending.as_ref().map(|p| p.to.clone()) else {
            return;
        };
        let notes = self.path_verdicts(&to);
        let Some(pending) = self.state.pending.as_mut() else {
            return;
        };
        if pending.notes == notes {
            return;
        }
        pending.notes = notes.clone();
        let arrow = pending.arrow();
        out.push(Effect::Publish);
        if notes.is_empty() {
            return;
        }
        let holds = notes.iter().filter(|n| n.level == Level::Hold).count();
        let title = if holds > 0 {
            format!("Upgrade {arrow}: Immich forbids this path; its start will be held")
        } else {
            format!("Upgrade {arrow}: Immich's release notes warn")
        };
        let lines: Vec<String> = notes.iter().map(Verdict::line).collect();
        tracing::warn!(change = %arrow, notes = %lines.join(" | "), "upgrade path");
        out.push(self.notify(EventKind::UpgradePath, title, lines.join("\n"), now));
    }

    /// A server started on a version a hold row forbids: it stays paused (stopped when the
    /// pause failed) as a hold naming the rows; the snapshot of the baseline is still taken,
    /// so a forced release is covered too.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hold_path(
        &mut self,
        event: &ContainerEvent,
        version: &str,
        image_id: &str,
        paused: bool,
        holds: &[Verdict],
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        if !paused {
            out.push(Effect::Stop {
                container: event.container_id.clone(),
            });
        }
        let pending_matches = self.state.pending.as_ref().is_some_and(|p| {
            p.to_image.as_deref() == Some(image_id) || same_version(&p.to, version)
        });
        if !pending_matches {
            self.state.pending = Some(self.new_pending(
                version,
                Some(image_id.to_string()),
                ChangeSource::ServerStart,
                now,
            ));
        }
        // Notes first (a notification of the warnings too when they are new); the hold's
        // own notification follows.
        self.note_paths(now, out);
        let reason = holds
            .iter()
            .map(|v| format!("{} [{}; source: {}]", v.reason, v.row, v.source))
            .collect::<Vec<_>>()
            .join("; ");
        let hint = format!(
            "way through: {}; `immich-guard release --force` starts it anyway (recorded)",
            holds
                .iter()
                .map(|v| v.way_through.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
        let run = self.state.phase.run().cloned();
        self.state.phase = Phase::Held {
            hold: Hold {
                kind: HoldKind::UpgradePath,
                container: event.container_id.clone(),
                container_name: event.name.clone(),
                image_id: image_id.to_string(),
                version: version.to_string(),
                paused,
                reason: format!("upgrade path: {reason}"),
                hint,
                since: now,
            },
            run,
        };
        let Some(hold) = self.state.phase.hold() else {
            return;
        };
        tracing::error!(reason = %hold.reason, hint = %hold.hint, "held the server before its migrations");
        out.push(self.notify(
            EventKind::Held,
            format!("Immich {version} held: upgrade path"),
            format!("{} {}", hold.reason, hold.hint),
            now,
        ));
        let covered = self
            .state
            .pending
            .as_ref()
            .is_some_and(|p| p.snapshot.is_some());
        if !covered {
            self.request_snapshot(Trigger::PreStart, now, out);
        }
        out.push(Effect::Publish);
    }
}
