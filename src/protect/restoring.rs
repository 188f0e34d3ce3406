//! Protection while `immich-guard restore` runs through the daemon (README.md "How to
//! recover"; docs/recovery.md): the restore stops, replaces and starts the stack on purpose,
//! so its starts are not frozen, its older version is not held as a downgrade, and the `.env`
//! its pin writes is not a change to snapshot. Crash-loop detection stays on: the restore's
//! own stops are `kill` events (not loop deaths), and a loop after it is caught as always.
//! A restore that fails part-way leaves protection off exactly as an unfinished journal
//! does at daemon start, until the same command finishes it.

use tokio::sync::oneshot;

use super::{Baseline, ContainerEvent, Guard, GuardHandle, Input};
use crate::compose::ComposeEvent;
use crate::discover::Stack;

/// Why protection stands back.
#[derive(Debug, Clone)]
pub(super) enum Mode {
    /// A restore of this snapshot runs now.
    Running { snapshot: String },
    /// A restore stopped part-way (its journal's line): nothing is judged until it finishes.
    Unfinished(String),
}

/// What the daemon's restore tells the guard.
#[derive(Debug)]
pub enum RestoreInput {
    Begin {
        snapshot: String,
        reply: oneshot::Sender<Result<(), String>>,
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
    /// Refused before anything was touched.
    NothingChanged,
}

impl GuardHandle {
    /// Protection stands back for a restore of `snapshot`; refused while another runs or a
    /// protective snapshot is being taken.
    pub async fn begin_restore(&self, snapshot: &str) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Restore(RestoreInput::Begin {
            snapshot: snapshot.to_string(),
            reply,
        }));
        rx.await
            .unwrap_or_else(|_| Err("protection has stopped".into()))
    }

    pub fn restore_progress(&self, line: String) {
        self.send(Input::Restore(RestoreInput::Progress(line)));
    }

    pub fn end_restore(&self, end: RestoreEnd) {
        self.send(Input::Restore(RestoreInput::End(end)));
    }

    /// At daemon start: a restore is unfinished, so nothing is protected until it is.
    pub fn restore_unfinished(&self, line: String) {
        self.send(Input::Restore(RestoreInput::Unfinished(line)));
    }
}

impl Guard {
    pub(super) async fn on_restore(&mut self, input: RestoreInput) {
        match input {
            RestoreInput::Begin { snapshot, reply } => {
                let _ = reply.send(self.begin_restore(snapshot));
            }
            RestoreInput::Progress(line) => {
                if let Some(Mode::Running { snapshot }) = &self.restore {
                    let text = format!("{snapshot}: {line}");
                    self.state.send_modify(|s| s.restoring = Some(text));
                }
            }
            RestoreInput::End(end) => {
                if matches!(end, RestoreEnd::Done { .. }) {
                    self.give_back_halted().await;
                }
                self.end_restore(end);
            }
            RestoreInput::Unfinished(line) => {
                tracing::warn!("not protecting: {line}");
                self.set_unfinished(line);
            }
        }
    }

    fn begin_restore(&mut self, snapshot: String) -> Result<(), String> {
        if let Some(Mode::Running { snapshot: running }) = &self.restore {
            return Err(format!(
                "a restore of {running} is already running; `immich-guard status` shows its step"
            ));
        }
        if self.snapshotting {
            return Err(
                "a protective snapshot is being taken; restore once it is sealed (`immich-guard status`)"
                    .into(),
            );
        }
        tracing::info!(snapshot = %snapshot, "restore begins: its stops and starts are not frozen, held or snapshotted; crash loops are still watched");
        let text = format!("{snapshot}: planning");
        self.state.send_modify(|s| s.restoring = Some(text));
        self.restore = Some(Mode::Running { snapshot });
        Ok(())
    }

    fn set_unfinished(&mut self, line: String) {
        self.restore = Some(Mode::Unfinished(line.clone()));
        self.state.send_modify(|s| {
            s.restoring = None;
            s.restore_incomplete = Some(line);
        });
    }

    fn end_restore(&mut self, end: RestoreEnd) {
        let before = self.restore.take();
        match end {
            RestoreEnd::NothingChanged => {
                // Back to what it was: an unfinished restore stays unfinished.
                self.state.send_modify(|s| s.restoring = None);
                if let Some(Mode::Unfinished(line)) = before {
                    self.set_unfinished(line);
                }
            }
            RestoreEnd::Unfinished(line) => {
                tracing::warn!("restore stopped part-way; not protecting: {line}");
                self.set_unfinished(line);
            }
            RestoreEnd::Done { version, stack } => {
                self.after_restore(version, stack.map(|s| *s));
                self.state.send_modify(|s| {
                    s.restoring = None;
                    s.restore_incomplete = None;
                });
            }
        }
        self.publish();
    }

    /// The restored version is what the database runs with now: the baseline, so it is
    /// neither held as a downgrade nor snapshotted again; what protection held before the
    /// restore is over.
    fn after_restore(&mut self, version: String, stack: Option<Stack>) {
        if let Some(stack) = &stack {
            self.switch_project(stack);
            self.watch_compose(stack);
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
                self.set_baseline(Baseline {
                    version,
                    image_id: server.image_id.clone(),
                });
            }
            None => tracing::warn!(
                "restore finished but no server container was found; the baseline stays until the next discovery"
            ),
        }
        let p = &mut self.protection;
        let cleared: Vec<String> = [
            p.pending
                .take()
                .map(|c| format!("pending change {} → {}", c.from, c.to)),
            p.hold
                .take()
                .map(|h| format!("hold of {} ({})", h.container_name, h.reason)),
            p.frozen
                .take()
                .map(|f| format!("freeze of {}", f.container_name)),
            p.verifies
                .degraded
                .take()
                .map(|d| format!("DEGRADED after {} → {}", d.from, d.to)),
            p.settling
                .take()
                .map(|s| format!("settling of {} → {}", s.change.from, s.change.to)),
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

    /// Services halted for a crash loop before the restore (the way out an incident often
    /// recommends): the restore has started the stack again, so each gets its restart policy
    /// back; one the restore recreated is gone, and its new container has compose's policy.
    async fn give_back_halted(&mut self) {
        let Some(docker) = self.docker() else { return };
        for halted in std::mem::take(&mut self.protection.halted) {
            match crate::incident::unhalt(&docker, &halted.container, &halted.restart_policy).await
            {
                Err(e) if !crate::docker::is_not_found(&e) => {
                    tracing::warn!(service = %halted.service, error = %e, "could not give a halted service its restart policy back after the restore; `immich-guard release <service>` retries");
                    self.protection.halted.push(halted);
                }
                _ => {
                    tracing::info!(service = %halted.service, restart_policy = %halted.restart_policy, "halted before the restore: released, the restore started it again");
                    self.deaths.forget(&halted.container);
                    self.record_release(&halted.service, false, "released by the restore");
                }
            }
        }
    }

    /// Inputs protection does not judge while a restore has the stack: `None` when taken
    /// care of here.
    pub(super) async fn hold_back_while_restoring(&mut self, input: Input) -> Option<Input> {
        let running = match &self.restore {
            None => return Some(input),
            Some(Mode::Running { .. }) => true,
            Some(Mode::Unfinished(_)) => false,
        };
        match input {
            Input::Restore(_) => Some(input),
            Input::Release { reply, .. } | Input::Ack { reply } => {
                let _ = reply.send(Err(self.standing_back()));
                None
            }
            // Crash-loop detection stays on during the restore: the restore's stops come
            // with `kill` events, so they count as stops by hand, not deaths of a loop.
            Input::Killed(_) | Input::Died(_) if running => Some(input),
            // A snapshot's end is always taken: the guard must know it is no longer taking one.
            Input::SnapshotDone(_) => Some(input),
            // A verify of the stack from before the restore: its result means nothing now, but
            // the next one must be able to run.
            Input::Verified { .. } => {
                self.verifying = false;
                None
            }
            Input::Started(event) if running => {
                self.restore_started(event).await;
                None
            }
            Input::Discovered { stack, .. } if running => {
                self.stack = Some(*stack);
                None
            }
            // Image events (the restore's pull of the pinned image), and anything while a
            // restore is unfinished.
            _ => None,
        }
    }

    /// A start by the restore: not frozen or judged; a start after a stop resets Docker's
    /// RestartCount, which the crash-loop detector must know.
    async fn restore_started(&mut self, event: ContainerEvent) {
        if self.stopping.remove(&event.container_id) {
            self.take_restart_count(&event.container_id).await;
        }
    }

    /// The compose config the restore's pin wrote is remembered, not taken for an upgrade.
    pub(super) fn compose_while_restoring(&mut self, event: ComposeEvent) {
        if let ComposeEvent::Changed { after, .. } = event {
            self.compose_view = Some(after);
        }
    }

    fn standing_back(&self) -> String {
        match &self.restore {
            Some(Mode::Running { snapshot }) => {
                format!("a restore of {snapshot} is running; protection stands back until it ends")
            }
            Some(Mode::Unfinished(line)) => format!("not protecting: {line}"),
            None => "protection is on".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::watch;

    use super::*;
    use crate::config::Config;
    use crate::status::DaemonState;

    fn stack_on(version: &str) -> Stack {
        crate::protect::tests::running("immich", version, &format!("c-{version}"))
    }

    async fn until(
        state: &mut watch::Receiver<DaemonState>,
        what: &str,
        pred: impl FnMut(&DaemonState) -> bool,
    ) -> DaemonState {
        tokio::time::timeout(Duration::from_secs(5), state.wait_for(pred))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap()
            .clone()
    }

    /// A guard without Docker: what a restore begins and ends, and what it refuses.
    #[tokio::test]
    async fn a_restore_is_one_at_a_time_a_failed_one_stops_protection_and_a_finished_one_sets_the_baseline()
     {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.daemon.data_dir = dir.path().to_path_buf();
        let (tx, mut state) = watch::channel(DaemonState::new("unix:///nowhere".into()));
        let tx = Arc::new(tx);
        let (_, docker) = watch::channel(None);
        let queue = crate::daemon::start_snapshot_queue(config.clone(), docker.clone(), tx.clone());
        let notifier = crate::notification::Notifier::new(&config.notify);
        let guard = Guard::start(config, tx, docker, queue, notifier);
        guard.send(Input::Discovered {
            stack: Box::new(stack_on("v1.120.0")),
            listed_at: chrono::Utc::now(),
        });
        until(&mut state, "the v2 baseline", |s| {
            s.protection.baseline.is_some()
        })
        .await;

        guard.begin_restore("s1").await.unwrap();
        let s = until(&mut state, "RESTORING", |s| s.restoring.is_some()).await;
        assert_eq!(s.status_line(), "RESTORING s1: planning");
        let e = guard.begin_restore("s2").await.unwrap_err();
        assert!(e.contains("a restore of s1 is already running"), "{e}");
        let e = guard.release(false, None).await.unwrap_err();
        assert!(e.contains("a restore of s1 is running"), "{e}");
        guard.restore_progress("step 3/7 database: replaying".into());
        let s = until(&mut state, "the step", |s| {
            s.restoring.as_deref().is_some_and(|r| r.contains("3/7"))
        })
        .await;
        assert_eq!(
            s.status_line(),
            "RESTORING s1: step 3/7 database: replaying"
        );

        // Failed part-way: protection off, as an unfinished journal at daemon start.
        guard.end_restore(RestoreEnd::Unfinished("restore of s1 incomplete".into()));
        let s = until(&mut state, "NOT PROTECTING", |s| {
            s.restore_incomplete.is_some()
        })
        .await;
        assert_eq!(s.status_line(), "NOT PROTECTING: restore of s1 incomplete");
        let e = guard.ack().await.unwrap_err();
        assert!(
            e.contains("not protecting: restore of s1 incomplete"),
            "{e}"
        );
        // A refused retry leaves it unfinished; the same restore again may run.
        guard.begin_restore("s1").await.unwrap();
        guard.end_restore(RestoreEnd::NothingChanged);
        let s = until(&mut state, "unfinished again", |s| {
            s.restoring.is_none() && s.restore_incomplete.is_some()
        })
        .await;
        assert!(s.status_line().starts_with("NOT PROTECTING"));

        // Finished: the restored (older) version is the baseline, what was held is over.
        guard.begin_restore("s1").await.unwrap();
        guard.end_restore(RestoreEnd::Done {
            version: "v1.119.0".into(),
            stack: Some(Box::new(stack_on("v1.119.0"))),
        });
        let s = until(&mut state, "the v1 baseline", |s| {
            s.protection.baseline.as_ref().map(|b| b.version.as_str()) == Some("v1.119.0")
        })
        .await;
        assert!(s.restoring.is_none() && s.restore_incomplete.is_none());
        assert_eq!(
            s.protection.baseline.as_ref().unwrap().image_id,
            "sha256:v1.119.0"
        );
        assert_eq!(s.protection.state, crate::protect::ProtectState::Idle);
    }
}
