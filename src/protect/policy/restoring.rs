//! Protection while `immich-guard restore` runs through the daemon (README.md "How to
//! recover"; docs/recovery.md): the restore stops, replaces and starts the stack on purpose,
//! so its starts are not frozen, its older version is not held as a downgrade, and the `.env`
//! its pin writes is not a change to snapshot. Crash-loop detection stays on: the restore's
//! own stops are `kill` events (not loop deaths), and a loop after it is caught as always.
//! A restore that fails part-way leaves protection off exactly as an unfinished journal
//! does at daemon start, until the same command finishes it.

use chrono::{DateTime, Utc};

use super::{CountFor, Effect, Event, Policy, ReplyId, UnhaltFor};
use crate::compose::ComposeEvent;
use crate::discover::Stack;
use crate::protect::state::Baseline;

/// Why protection stands back.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Mode {
    /// A restore of this snapshot runs now.
    Running { snapshot: String },
    /// A restore stopped part-way (its journal's line): nothing is judged until it finishes.
    Unfinished(String),
}

/// What the daemon's restore tells protection.
#[derive(Debug)]
pub enum RestoreEvent {
    Begin {
        snapshot: String,
        reply: ReplyId,
    },
    /// The step the restore is at, for `status`.
    Progress(String),
    End(RestoreEnd),
    /// The daemon started with a restore unfinished (its journal's line).
    Unfinished(String),
}

/// How a restore through the daemon ended.
#[derive(Debug)]
pub enum RestoreEnd {
    /// Finished: the stack as discovered after it (its server is the new baseline).
    Done {
        version: String,
        stack: Option<Box<Stack>>,
    },
    /// Stopped part-way; the journal's line says how to finish it.
    Unfinished(String),
    /// Refused, or given back, before any data changed: no journal is left.
    NothingChanged,
    /// An unfinished restore ended by `restore --abandon`: protection is back on.
    Abandoned,
}

impl Policy {
    pub(super) fn on_restore(
        &mut self,
        event: RestoreEvent,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        match event {
            RestoreEvent::Begin { snapshot, reply } => {
                let result = self.begin_restore(snapshot, out).map(|()| String::new());
                out.push(Effect::Reply { to: reply, result });
            }
            RestoreEvent::Progress(line) => {
                if let Some(Mode::Running { snapshot }) = &self.restore {
                    out.push(Effect::ShowRestoring(Some(format!("{snapshot}: {line}"))));
                }
            }
            RestoreEvent::End(end) => {
                if matches!(end, RestoreEnd::Done { .. }) {
                    // Halted before the restore (the way out an incident often recommends):
                    // the restore started the stack again, so each gets its policy back.
                    for halted in self.state.halted.clone() {
                        out.push(Effect::Unhalt {
                            halted,
                            why: UnhaltFor::Restore,
                        });
                    }
                }
                self.end_restore(end, now, out);
            }
            RestoreEvent::Unfinished(line) => {
                tracing::warn!("not protecting: {line}");
                self.set_unfinished(line, out);
            }
        }
    }

    fn begin_restore(&mut self, snapshot: String, out: &mut Vec<Effect>) -> Result<(), String> {
        if let Some(Mode::Running { snapshot: running }) = &self.restore {
            return Err(format!(
                "a restore of {running} is already running; `immich-guard status` shows its step"
            ));
        }
        if self.state.phase.snapshotting() {
            return Err(
                "a protective snapshot is being taken; restore once it is sealed (`immich-guard status`)"
                    .into(),
            );
        }
        tracing::info!(snapshot = %snapshot, "restore begins: its stops and starts are not frozen, held or snapshotted; crash loops are still watched");
        out.push(Effect::ShowRestoring(Some(format!("{snapshot}: planning"))));
        self.restore = Some(Mode::Running { snapshot });
        Ok(())
    }

    fn set_unfinished(&mut self, line: String, out: &mut Vec<Effect>) {
        self.restore = Some(Mode::Unfinished(line.clone()));
        out.push(Effect::ShowRestoring(None));
        out.push(Effect::ShowIncomplete(Some(line)));
    }

    fn end_restore(&mut self, end: RestoreEnd, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let before = self.restore.take();
        match end {
            RestoreEnd::NothingChanged => {
                // No journal is left (a refusal with one left is `Unfinished`): protection
                // is on again, whatever was unfinished before was given back.
                out.push(Effect::ShowRestoring(None));
                out.push(Effect::ShowIncomplete(None));
                if let Some(Mode::Unfinished(line)) = before {
                    tracing::info!("the unfinished restore ended with nothing changed: {line}");
                }
            }
            RestoreEnd::Abandoned => {
                tracing::warn!("the unfinished restore was abandoned; protecting again");
                out.push(Effect::ShowRestoring(None));
                out.push(Effect::ShowIncomplete(None));
            }
            RestoreEnd::Unfinished(line) => {
                tracing::warn!("restore stopped part-way; not protecting: {line}");
                self.set_unfinished(line, out);
            }
            RestoreEnd::Done { version, stack } => {
                self.after_restore(version, stack.map(|s| *s), now, out);
                out.push(Effect::ShowRestoring(None));
                out.push(Effect::ShowIncomplete(None));
            }
        }
        out.push(Effect::Publish);
    }

    /// The restored version is what the database runs with now: the baseline, so it is
    /// neither held as a downgrade nor snapshotted again; what protection held before the
    /// restore is over.
    fn after_restore(
        &mut self,
        version: String,
        stack: Option<Stack>,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        if let Some(stack) = &stack {
            self.switch_project(stack);
            self.watch_compose(stack, out);
        }
        let server = stack
            .as_ref()
            .and_then(|s| s.server.as_ref().map(|srv| (srv, s.version.as_ref())));
        match server {
            Some((server, found)) => {
                let version = found.map_or(version, |v| v.name());
                self.image_ids
                    .insert(server.image.clone(), server.image_id.clone());
                self.versions
                    .insert(server.image_id.clone(), version.clone());
                tracing::info!(version = %version, image = %crate::discover::short_id(&server.image_id), "restore finished: the restored version is the baseline");
                self.set_baseline(
                    Baseline {
                        version,
                        image_id: server.image_id.clone(),
                    },
                    now,
                );
            }
            None => tracing::warn!(
                "restore finished but no server container was found; the baseline stays until the next discovery"
            ),
        }
        let p = &mut self.state;
        let gate = match p.phase.hold() {
            Some(h) => Some(format!("hold of {} ({})", h.container_name, h.reason)),
            None => p
                .phase
                .frozen()
                .map(|f| format!("freeze of {}", f.container_name)),
        };
        p.phase.open();
        let cleared: Vec<String> = [
            p.pending
                .take()
                .map(|c| format!("pending change {}", c.arrow())),
            gate,
            p.verifies
                .degraded
                .take()
                .map(|d| format!("DEGRADED after {} → {}", d.from, d.to)),
            p.settling
                .take()
                .map(|s| format!("settling of {}", s.change.arrow())),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !cleared.is_empty() {
            tracing::info!(
                cleared = %cleared.join("; "),
                "the restore replaced the stack: what protection held before it is over"
            );
        }
        if let Some(stack) = stack {
            self.stack = Some(stack);
        }
    }

    /// Events protection does not judge while a restore has the stack: `None` when taken
    /// care of here. Results of effects always go through: they finish what was begun.
    pub(super) fn stand_back_while_restoring(
        &mut self,
        event: Event,
        _now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) -> Option<Event> {
        let running = match &self.restore {
            None => return Some(event),
            Some(Mode::Running { .. }) => true,
            Some(Mode::Unfinished(_)) => false,
        };
        match event {
            Event::Release { reply, .. } | Event::Ack { reply } => {
                out.push(Effect::Reply {
                    to: reply,
                    result: Err(self.standing_back()),
                });
                None
            }
            // Crash-loop detection stays on during the restore: the restore's stops come
            // with `kill` events, so they count as stops by hand, not deaths of a loop.
            Event::Killed(_) | Event::Died(_) if running => Some(event),
            // A verify of the stack from before the restore: its result means nothing now,
            // but the next one must be able to run.
            Event::Verified { .. } => {
                self.verifying = false;
                None
            }
            Event::Started(event) if running => {
                // A start by the restore is not judged; after a stop it resets RestartCount.
                if self.stopping.remove(&event.container_id) {
                    out.push(Effect::ReadRestartCount {
                        container: event.container_id,
                        why: CountFor::StartedByHand,
                    });
                }
                None
            }
            Event::Discovered { stack, .. } if running => {
                self.stack = Some(*stack);
                None
            }
            // Shown, never judged: nothing is released while a restore has the stack.
            Event::Uploads(seen) => {
                out.push(Effect::ShowUploads(seen.clone()));
                self.uploads = Some(*seen);
                None
            }
            // The compose config the restore's pin wrote is remembered, not an upgrade.
            Event::Compose(ComposeEvent::Changed { after, .. }) => {
                self.compose_view = Some(after);
                None
            }
            Event::Restore(_)
            | Event::Disk(_)
            | Event::Paused { .. }
            | Event::Inspected { .. }
            | Event::ImageInspected { .. }
            | Event::ComposeRead { .. }
            | Event::Thawed { .. }
            | Event::Migrations { .. }
            | Event::RestartCount { .. }
            | Event::Evidence { .. }
            | Event::Halted { .. }
            | Event::Unhalted { .. }
            | Event::VerifyNotRun
            | Event::SnapshotProgress(_)
            | Event::SnapshotSealed { .. }
            | Event::SnapshotFailed(_)
            | Event::DrillFailed { .. } => Some(event),
            // Image events (the restore's pull of the pinned image), wakeups, and anything
            // while a restore is unfinished.
            Event::Started(_)
            | Event::Killed(_)
            | Event::Died(_)
            | Event::Discovered { .. }
            | Event::Compose(_)
            | Event::Image { .. }
            | Event::Wakeup => None,
        }
    }

    pub(super) fn standing_back(&self) -> String {
        match &self.restore {
            Some(Mode::Running { snapshot }) => {
                format!("a restore of {snapshot} is running; protection stands back until it ends")
            }
            Some(Mode::Unfinished(line)) => format!("not protecting: {line}"),
            None => "protection is on".into(),
        }
    }
}
