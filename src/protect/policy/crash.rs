//! Crash loops (docs/incident-runbook.md): a death counts when Docker's policy restarted the
//! container; a loop is diagnosed from the evidence, then halted (restart policy off, stop),
//! the database's loop halting the server too.

use chrono::{DateTime, Utc};

use super::{ContainerEvent, CountFor, Effect, HaltTarget, LoopFound, Policy};
use crate::discover::Stack;
use crate::notification::EventKind;
use crate::protect::state::{UNKNOWN, same_version};

impl Policy {
    pub(super) fn on_died(&mut self, event: ContainerEvent, out: &mut Vec<Effect>) {
        let Some(stack) = &self.stack else { return };
        if event.project.as_deref() != Some(stack.project.as_str()) {
            return;
        }
        if self.is_halted(&event.container_id) {
            return;
        }
        // Docker raises RestartCount before it sends `die` when its policy restarts the
        // container: that is what makes this death part of a loop.
        out.push(Effect::ReadRestartCount {
            container: event.container_id.clone(),
            why: CountFor::Died(event),
        });
    }

    pub(super) fn on_restart_count(
        &mut self,
        container: String,
        count: Option<i64>,
        read_at: DateTime<Utc>,
        why: CountFor,
        out: &mut Vec<Effect>,
    ) {
        let event = match why {
            CountFor::StartedByHand => {
                if let Some(count) = count {
                    tracing::debug!(container = %container, restart_count = count, "started by hand");
                    self.deaths.stopped(&container, count, read_at);
                }
                return;
            }
            CountFor::Died(event) => event,
        };
        let Some(restart_count) = count else {
            // Removed: a recreated container starts afresh.
            self.deaths.forget(&container);
            return;
        };
        let by_hand = self.stopping.contains(&container);
        tracing::debug!(container = %event.name, restart_count, by_hand, "died");
        if by_hand {
            self.deaths.stopped(&container, restart_count, read_at);
            return;
        }
        let Some(found) = self
            .deaths
            .died(&container, restart_count, event.at, read_at)
        else {
            return;
        };
        let service = event.service.clone().unwrap_or_else(|| event.name.clone());
        self.crash_loop(service, container, event.name, found, out);
    }

    /// Deaths whose events were missed (Docker was unreachable) show in RestartCount.
    pub(super) fn reconcile_restarts(
        &mut self,
        stack: &Stack,
        listed_at: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        for service in stack.services() {
            if self.is_halted(&service.container_id) {
                continue;
            }
            if let Some(found) =
                self.deaths
                    .observed(&service.container_id, service.restart_count, listed_at)
            {
                self.crash_loop(
                    service.service.clone(),
                    service.container_id.clone(),
                    service.container_name.clone(),
                    found,
                    out,
                );
            }
        }
    }

    /// Evidence first, then the diagnosis, then the halt.
    fn crash_loop(
        &mut self,
        service: String,
        container: String,
        name: String,
        found: crate::crashloop::Loop,
        out: &mut Vec<Effect>,
    ) {
        tracing::error!(container = %name, deaths = found.deaths, missed = found.missed, window_secs = self.config.crash_loop.window_secs, "crash loop");
        let is_database = self
            .stack
            .as_ref()
            .and_then(|s| s.database.as_ref())
            .is_some_and(|d| d.container_id == container);
        out.push(Effect::CollectEvidence(LoopFound {
            service,
            container,
            name,
            found,
            is_database,
        }));
    }

    /// The evidence is in: diagnose, write the bundle, halt.
    pub(super) fn on_evidence(
        &mut self,
        found: LoopFound,
        evidence: crate::incident::Evidence,
        facts: Option<Box<crate::snapshot::db::DbFacts>>,
        incident_id: String,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let Some(stack) = self.stack.clone() else {
            return;
        };
        let before = self.pre_update_snapshot();
        let diagnosis = crate::diagnose::diagnose(&crate::incident::diagnosis_evidence(
            &evidence,
            &stack,
            &found.service,
            facts.as_deref(),
            before,
        ));
        let change = self.change_in_progress();
        let mut incident = crate::incident::Incident {
            id: incident_id,
            at: now,
            service: found.service.clone(),
            container: found.name.clone(),
            deaths: found.found.deaths as u32,
            missed_deaths: found.found.missed as u32,
            last_death_at: Some(found.found.last_death),
            window_secs: self.config.crash_loop.window_secs,
            // The version the database ran with before the update, if one is in progress.
            baseline: change
                .map(|p| p.from_label().to_string())
                .or_else(|| self.baseline_version()),
            pending: change.map(|p| p.arrow()),
            cause: diagnosis.cause,
            findings: diagnosis.findings,
            notes: diagnosis.notes,
            decision: diagnosis.decision,
            halted: Vec::new(),
            dir: self.config.daemon.data_dir.join(crate::incident::DIR),
        };
        // Halting the database halts the server too: it would crash-loop next.
        let mut targets = vec![HaltTarget {
            service: found.service.clone(),
            container: found.container.clone(),
        }];
        if found.is_database
            && let Some(server) = &stack.server
        {
            targets.push(HaltTarget {
                service: server.service.clone(),
                container: server.container_id.clone(),
            });
        }
        // Halted before (the server by its own loop): the policy recorded then is kept, not
        // the `no` it has now.
        targets.retain(|t| {
            match self
                .state
                .halted
                .iter()
                .find(|h| h.container == t.container)
            {
                Some(earlier) => {
                    incident.halted.push(earlier.clone());
                    false
                }
                None => true,
            }
        });
        out.push(Effect::WriteIncident {
            incident: Box::new(incident.clone()),
            evidence: Box::new(evidence),
            view: Box::new(self.state.view()),
        });
        out.push(Effect::Halt {
            incident: Box::new(incident),
            targets,
        });
    }

    pub(super) fn on_halted(
        &mut self,
        mut incident: crate::incident::Incident,
        results: Vec<(HaltTarget, Result<String, String>)>,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        for (target, result) in results {
            match result {
                Ok(policy) => {
                    tracing::warn!(service = %target.service, restart_policy = %policy, "halted: restart policy set to no, container stopped");
                    let halted = crate::incident::Halted {
                        service: target.service,
                        container: target.container,
                        restart_policy: policy,
                        halted_at: Some(now),
                    };
                    incident.halted.push(halted.clone());
                    self.state.halted.push(halted);
                }
                Err(e) => tracing::error!(service = %target.service, error = %e, "could not halt"),
            }
        }
        out.push(Effect::FinishIncident {
            incident: Box::new(incident.clone()),
        });
        out.push(self.notify(
            EventKind::CrashLoop,
            format!("{} crash-looped and was halted", incident.service),
            format!(
                "{} died {} times within {} s; halted ({}). Diagnosis: {}. Recommended: {} Details: immich-guard incident {}",
                incident.container,
                incident.deaths,
                incident.window_secs,
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
            now,
        ));
        self.state.incident = Some(incident);
        out.push(Effect::Publish);
    }

    /// The newest sealed snapshot of the version the database ran with before this change
    /// (of any version when that is not known: the daemon first saw the server as it started).
    fn pre_update_snapshot(&self) -> Option<&crate::snapshot::store::Meta> {
        let from = self
            .change_in_progress()
            .and_then(|p| p.from.clone())
            .or_else(|| {
                self.state
                    .incident
                    .as_ref()
                    .and_then(|i| i.baseline.clone())
            })
            .filter(|v| v != UNKNOWN);
        self.disk.snapshots.iter().rev().find(|m| {
            Some(&m.project) == self.state.project.as_ref()
                && from.as_ref().is_none_or(|v| same_version(&m.version, v))
        })
    }
}
