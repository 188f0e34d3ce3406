//! Verify after every upgrade (docs/operations.md "DEGRADED"): once the new server has run a
//! whole crash-loop window, it is checked against the pre-update snapshot.

use chrono::{DateTime, Utc};

use super::{Effect, Policy};
use crate::discover::{ContainerState, Stack};
use crate::notification::{Event as Notice, EventKind};
use crate::post_upgrade::{Verdict, VerifyDue};
use crate::protect::state::same_version;

impl Policy {
    /// The update is over once the new server has run a whole crash-loop window without a
    /// death; then it owes a verify against the pre-update snapshot.
    pub(super) fn settle(&mut self, stack: &Stack, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let Some(settling) = &self.state.settling else {
            return;
        };
        let Some(server) = &stack.server else { return };
        let settled = crate::post_upgrade::settled(
            settling.since,
            now,
            self.crash_loop_window(),
            server.state == ContainerState::Running && !self.is_halted(&server.container_id),
            self.deaths.recent(&server.container_id),
        );
        if !settled {
            return;
        }
        let change = settling.change.clone();
        tracing::info!(change = %change.arrow(), "the update has settled; verifying it");
        self.state.settling = None;
        self.state.verifies.due = Some(VerifyDue {
            from: change.from_label().to_string(),
            to: change.to,
            snapshot: change.snapshot,
            not_before: now,
            reason: "upgrade settled".into(),
        });
        self.start_verify(out);
    }

    /// While DEGRADED, a server container other than the one that failed (the admin's fix,
    /// brought up by compose) is verified again once it has run a crash-loop window.
    pub(super) fn reverify_recreated(&mut self, stack: &Stack, now: DateTime<Utc>) {
        let Some(server) = stack
            .server
            .as_ref()
            .filter(|s| s.state == ContainerState::Running)
        else {
            return;
        };
        let window = self.crash_loop_window();
        if let Some(due) = self
            .state
            .verifies
            .reverify_for(&server.container_id, now, window)
        {
            tracing::info!(container = %server.container_name, "a new server container while DEGRADED; verifying it again after a crash-loop window");
            self.state.verifies.due = Some(due);
        }
    }

    /// The verify that is due runs in its own task (it waits for ping and reads the whole
    /// upload location: never on the path of a freeze).
    pub(super) fn start_verify(&mut self, out: &mut Vec<Effect>) {
        if self.verifying {
            return;
        }
        let Some(due) = self.state.verifies.due.clone() else {
            return;
        };
        let Some(stack) = self.stack.clone() else {
            return;
        };
        let plan = self.verify_plan(&due, &stack);
        tracing::info!(change = %format!("{} → {}", due.from, due.to), against = %plan.note, reason = %due.reason, "verify after upgrade");
        self.verifying = true;
        out.push(Effect::Verify {
            due,
            plan: Box::new(plan),
            stack: Box::new(stack),
        });
    }

    /// Compared with the change's own snapshot, else the newest sealed one of the version it
    /// came from, else the stack alone.
    fn verify_plan(&self, due: &VerifyDue, stack: &Stack) -> crate::verify::Plan {
        let all = &self.disk.snapshots;
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
            Some(m) => crate::verify::Plan::after_upgrade(
                m,
                &self.config.snapshot_dir().join(&m.id),
                stack.version.as_ref(),
            ),
            None => crate::verify::Plan::stack_only(
                format!("no sealed snapshot of {}: stack checks only", due.from),
                stack.version.as_ref(),
            ),
        }
    }

    pub(super) fn on_verified(
        &mut self,
        due: VerifyDue,
        report: crate::verify::Report,
        server: Option<String>,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        self.verifying = false;
        if self.state.project.as_deref() != Some(report.project.as_str()) {
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
            let not_before = now + self.crash_loop_window();
            if let Some(d) = &mut self.state.verifies.due {
                d.not_before = not_before;
            }
            out.push(Effect::Publish);
            return;
        }
        if self.state.verifies.due.as_ref() == Some(&due) {
            self.state.verifies.due = None;
        }
        let change = format!("{} → {}", due.from, due.to);
        let was_degraded = match crate::post_upgrade::judge(&due, &report, server) {
            Verdict::Passed(last) => {
                tracing::info!(change = %change, against = ?last.against, result = %last.summary(), "verify after upgrade passed");
                let was = self.state.verifies.record(Verdict::Passed(last));
                if was {
                    out.push(self.verify_notice(
                        EventKind::Recovered,
                        format!("Immich {} verified: no longer DEGRADED", due.to),
                        format!("A new verify of {change} passed; DEGRADED is cleared."),
                        &due,
                        report.against.clone(),
                        now,
                    ));
                }
                was
            }
            Verdict::Degraded(degraded, last) => {
                let lines: Vec<String> = degraded
                    .failed
                    .iter()
                    .map(|c| format!("{}: {}", c.name, c.detail))
                    .collect();
                tracing::error!(change = %change, failed = %lines.join("; "), hint = %degraded.hint, "DEGRADED: verify after upgrade failed");
                out.push(self.verify_notice(
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
                    now,
                ));
                self.state
                    .verifies
                    .record(Verdict::Degraded(degraded, last))
            }
        };
        if was_degraded && self.state.verifies.degraded.is_none() {
            tracing::info!("DEGRADED cleared: a later verify passed");
        }
        out.push(Effect::Publish);
    }

    /// A notification about a verify: its change and snapshot, not the pending one's.
    fn verify_notice(
        &self,
        kind: EventKind,
        title: String,
        message: String,
        due: &VerifyDue,
        snapshot: Option<String>,
        now: DateTime<Utc>,
    ) -> Effect {
        Effect::Notify(Box::new(Notice {
            kind,
            project: self.state.project.clone().unwrap_or_default(),
            title,
            message,
            snapshot,
            from_version: Some(due.from.clone()),
            to_version: Some(due.to.clone()),
            at: now,
        }))
    }
}
