//! What must be true before a frozen server whose snapshot sealed is let go (docs/operations.md
//! "Uploads"). `readiness` is the one place that decides; a later condition adds its arm
//! there. Today: with `protect.wait_for_quiet_uploads`, no upload for that long, bounded by
//! `protect.wait_for_quiet_max_minutes`. Uploads that arrived after the sealed snapshot began
//! are snapshotted once more before the server goes, so the way back holds them too.

use chrono::{DateTime, TimeDelta, Utc};

use super::{Effect, Policy, Thaw};
use crate::protect::state::{Frozen, ReleaseWait};
use crate::uploads::{RecentUploads, Seen};

/// A read asked for and not answered is asked again after this long (the read itself gives
/// up after `uploads::READ_TIMEOUT`).
const ASK_AGAIN: TimeDelta = TimeDelta::seconds(10);
/// While the uploads cannot be read, they are read again this often.
const UNKNOWN_AGAIN: TimeDelta = TimeDelta::seconds(30);

/// What the release of a sealed freeze waits for now.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Readiness {
    /// It may go: why, and whether uploads arrived after its snapshot began.
    Go { why: String, uploads_after: bool },
    Wait {
        what: String,
        check_at: DateTime<Utc>,
    },
}

/// Decides on the newest reading `seen` (taken after the wait began).
pub(super) fn readiness(
    wait: &ReleaseWait,
    seen: &RecentUploads,
    quiet: TimeDelta,
    now: DateTime<Utc>,
) -> Readiness {
    let bound = now >= wait.until;
    let quiet_text = crate::protect::state::for_how_long(quiet);
    let until = wait.until.format("%H:%M:%S UTC");
    match &seen.seen {
        Seen::Known { newest, .. } => {
            let uploads_after = newest.is_some_and(|t| t >= wait.snapshot_since);
            match newest {
                Some(t) if seen.read_at - *t < quiet && !bound => Readiness::Wait {
                    what: format!(
                        "no upload for {quiet_text} (at the latest until {until}): {}",
                        seen.line()
                    ),
                    check_at: (*t + quiet).min(wait.until),
                },
                Some(t) if seen.read_at - *t < quiet => Readiness::Go {
                    why: format!(
                        "uploads went on for the whole wait (protect.wait_for_quiet_max_minutes); newest {}",
                        t.format("%H:%M:%S UTC")
                    ),
                    uploads_after,
                },
                _ => Readiness::Go {
                    why: format!("no upload for {quiet_text}"),
                    uploads_after,
                },
            }
        }
        Seen::Unknown { why } if bound => Readiness::Go {
            why: format!(
                "the uploads could not be read until protect.wait_for_quiet_max_minutes ran out ({why}); uploads since the snapshot, if any, are not in it"
            ),
            uploads_after: false,
        },
        Seen::Unknown { why } => Readiness::Wait {
            what: format!(
                "no upload for {quiet_text} (at the latest until {until}): uploads unknown ({why})"
            ),
            check_at: (now + UNKNOWN_AGAIN).min(wait.until),
        },
    }
}

impl Policy {
    /// The snapshot a frozen server waited for sealed: it goes now, or waits.
    pub(super) fn after_seal(
        &mut self,
        server: Frozen,
        id: &str,
        snapshot_since: DateTime<Utc>,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        if let Some(first) = self.state.release_wait()
            && let Some(why) = &first.resnapshot
        {
            // Taken again for what arrived meanwhile: no second wait.
            let note = format!(
                "{why}; the uploads that arrived after {} began are in {id}",
                first.snapshot
            );
            return self.release_waited(server, note, out);
        }
        let Some(quiet) = self.quiet_uploads() else {
            self.state.phase.open();
            out.push(Effect::Thaw {
                server,
                why: Thaw::Sealed,
            });
            return;
        };
        let max = TimeDelta::from_std(self.config.protect.wait_for_quiet_max_minutes.duration())
            .unwrap_or(TimeDelta::MAX);
        self.state.release_wait = Some(ReleaseWait {
            snapshot: id.to_string(),
            snapshot_since,
            since: now,
            until: now
                .checked_add_signed(max)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            waiting_for: format!(
                "no upload for {} (reading the uploads)",
                crate::protect::state::for_how_long(quiet)
            ),
            next_check: now + ASK_AGAIN,
            asked: true,
            resnapshot: None,
        });
        out.push(Effect::AskUploads);
    }

    /// A reading of the uploads: shown, kept for notifications, and judged when a sealed
    /// freeze waits on it.
    pub(super) fn on_uploads(
        &mut self,
        seen: RecentUploads,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        out.push(Effect::ShowUploads(Box::new(seen.clone())));
        self.uploads = Some(seen);
        let Some(wait) = self.state.release_wait().cloned() else {
            return;
        };
        let fresh = self.uploads.as_ref().filter(|u| u.read_at >= wait.since);
        let (Some(seen), Some(quiet), false) =
            (fresh, self.quiet_uploads(), self.state.phase.snapshotting())
        else {
            return;
        };
        match readiness(&wait, seen, quiet, now) {
            Readiness::Go { why, uploads_after } if uploads_after && wait.resnapshot.is_none() => {
                let line = seen.line();
                let w = self.state.release_wait.as_mut().expect("checked above");
                w.resnapshot = Some(why);
                w.asked = false;
                w.waiting_for = format!(
                    "a new snapshot: uploads arrived after {} began ({line})",
                    w.snapshot
                );
                self.request_snapshot(crate::protect::state::Trigger::PreStart, now, out);
            }
            Readiness::Go { why, .. } => {
                if let Some(server) = self.state.phase.frozen().cloned() {
                    self.release_waited(server, why, out);
                }
            }
            Readiness::Wait { what, check_at } => {
                let w = self.state.release_wait.as_mut().expect("checked above");
                w.waiting_for = what;
                w.next_check = check_at.max(now + TimeDelta::seconds(1));
                w.asked = false;
                out.push(Effect::Publish);
            }
        }
    }

    /// When a sealed freeze is to read the uploads again (none while a snapshot runs).
    pub(super) fn release_check(&self) -> Option<DateTime<Utc>> {
        self.state
            .release_wait()
            .filter(|_| !self.state.phase.snapshotting())
            .map(|w| w.next_check)
    }

    /// The time to read the uploads has come: ask (and ask again if no answer comes).
    pub(super) fn check_release(&mut self, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        if self.release_check().is_none_or(|at| at > now) {
            return;
        }
        if let Some(w) = self.state.release_wait.as_mut() {
            w.asked = true;
            w.next_check = now + ASK_AGAIN;
            out.push(Effect::AskUploads);
        }
    }

    /// `release` while a sealed freeze waits: its snapshot covers it, so it goes.
    pub(super) fn release_wait_ended_by_admin(&mut self, out: &mut Vec<Effect>) -> bool {
        let (Some(wait), Some(server)) = (
            self.state.release_wait().cloned(),
            self.state.phase.frozen().cloned(),
        ) else {
            return false;
        };
        if self.state.phase.snapshotting() {
            return false;
        }
        let note = format!(
            "`immich-guard release` while it waited for {}",
            wait.waiting_for
        );
        self.release_waited(server, note, out);
        true
    }

    fn release_waited(&mut self, server: Frozen, note: String, out: &mut Vec<Effect>) {
        self.state.phase.open();
        self.state.release_wait = None;
        let name = server.container_name.clone();
        out.push(Effect::Thaw {
            server,
            why: Thaw::Waited { name, note },
        });
    }

    fn quiet_uploads(&self) -> Option<TimeDelta> {
        self.config
            .protect
            .quiet_uploads()
            .and_then(|d| TimeDelta::from_std(d).ok())
    }
}
