//! `immich-guard release` (and `release <service>`, `ack`): the admin's way through a freeze,
//! a hold, a foreign pause or a halt (docs/operations.md "Protection, held servers and
//! releases"); and what a thaw's result means for the baseline.

use chrono::{DateTime, Utc};

use super::{Effect, Policy, ReplyId, Thaw, UnhaltFor};
use crate::protect::state::{Baseline, Frozen, HoldKind, Phase, Trigger, UNKNOWN};

impl Policy {
    pub(super) fn on_release(
        &mut self,
        force: bool,
        reply: ReplyId,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        match self.state.phase.clone() {
            Phase::Held { hold, .. } => {
                let name = hold.container_name.clone();
                if !force && hold.kind == HoldKind::UpgradePath {
                    // Only the way through or a forced release ends it: a retry changes nothing.
                    out.push(Effect::Reply {
                        to: reply,
                        result: Err(format!("{}; {}", hold.reason, hold.hint)),
                    });
                    return;
                }
                if !force && hold.kind == HoldKind::Downgrade {
                    match self.rollback_pinned(&hold.version) {
                        // `immich-guard pin` judged and recorded this rollback since the hold.
                        Some(pin) => {
                            self.state.phase.open();
                            out.push(Effect::Thaw {
                                server: Frozen::from(&hold),
                                why: Thaw::Pinned {
                                    name,
                                    pinned_at: pin.at,
                                    reply,
                                },
                            });
                        }
                        None => out.push(Effect::Reply {
                            to: reply,
                            result: Err(format!("{}; {}", hold.reason, hold.hint)),
                        }),
                    }
                    return;
                }
                if !force {
                    // Retry the snapshot; the hold ends when it is sealed.
                    self.release_waiters.push(reply);
                    self.request_snapshot(Trigger::PreStart, now, out);
                    return;
                }
                self.state.phase.open();
                let overrode = (hold.kind == HoldKind::UpgradePath).then(|| hold.reason.clone());
                out.push(Effect::Thaw {
                    server: Frozen::from(&hold),
                    why: Thaw::Forced {
                        name,
                        reply,
                        overrode,
                    },
                });
            }
            Phase::Frozen { server, .. } => {
                if !force && self.release_wait_ended_by_admin(out) {
                    self.release_waiters.push(reply);
                    return;
                }
                if !force {
                    out.push(Effect::Reply {
                        to: reply,
                        result: Err(format!(
                            "{} is frozen while its snapshot runs; it is released when sealed (`release --force` releases it now, unprotected)",
                            server.container_name
                        )),
                    });
                    return;
                }
                self.state.phase.open();
                let name = server.container_name.clone();
                out.push(Effect::Thaw {
                    server,
                    why: Thaw::Forced {
                        name,
                        reply,
                        overrode: None,
                    },
                });
            }
            Phase::Paused {
                server: paused,
                run,
            } => {
                let frozen = Frozen {
                    container: paused.container,
                    container_name: paused.container_name,
                    image_id: paused.image_id,
                    version: paused.version,
                    since: now,
                    delay_ms: 0.0,
                };
                let name = frozen.container_name.clone();
                if force || self.starts_freely(&frozen.image_id, now) {
                    self.state.phase.open();
                    out.push(Effect::Thaw {
                        server: frozen,
                        why: Thaw::ForeignPause {
                            name,
                            forced: force,
                            reply,
                        },
                    });
                } else {
                    // Its version is not what the database ran with: a freeze like any other.
                    out.push(Effect::Reply {
                        to: reply,
                        result: Ok(format!(
                            "{} ({}) is now frozen by immich-guard: it is unpaused when a snapshot of {} is sealed",
                            frozen.container_name,
                            frozen.version,
                            self.baseline_version().as_deref().unwrap_or(UNKNOWN)
                        )),
                    });
                    self.state.phase = Phase::Frozen {
                        server: frozen,
                        run,
                    };
                    self.request_snapshot(Trigger::PreStart, now, out);
                }
                out.push(Effect::Publish);
            }
            Phase::Idle | Phase::Snapshotting { .. } => out.push(Effect::Reply {
                to: reply,
                result: Err("nothing is frozen or held".into()),
            }),
        }
    }

    /// The server let go runs its version: the baseline; the change is made and settles.
    pub(super) fn on_thawed(
        &mut self,
        server: Frozen,
        why: Thaw,
        result: Result<&'static str, String>,
        learned: Option<String>,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let message = match &result {
            Ok(how) => format!("{how} {} ({})", server.container_name, server.version),
            Err(e) => format!("could not release {}: {e}", server.container_name),
        };
        let image_id = if server.image_id.is_empty() {
            learned
        } else {
            Some(server.image_id.clone())
        };
        if let Some(image_id) = image_id {
            self.set_baseline(
                Baseline {
                    version: server.version.clone(),
                    image_id,
                },
                now,
            );
        }
        // Released onto its version: the change is made, and settles (then is verified) as
        // one accepted at its start.
        self.change_made(now);
        match why {
            Thaw::Sealed => tracing::info!("{message}"),
            Thaw::Waited { name, note } => {
                let what = format!("{message}: {note}");
                self.record_release(&name, false, &what, now, out);
                for to in self.release_waiters.drain(..) {
                    out.push(Effect::Reply {
                        to,
                        result: Ok(what.clone()),
                    });
                }
            }
            Thaw::HoldSealed { name } => {
                self.record_release(&name, false, &message, now, out);
                for to in self.release_waiters.drain(..) {
                    out.push(Effect::Reply {
                        to,
                        result: Ok(message.clone()),
                    });
                }
            }
            Thaw::FailOpen { name, cause } => self.record_release(
                &name,
                true,
                &format!("fail-open ({cause}): {message}"),
                now,
                out,
            ),
            Thaw::Forced {
                name,
                reply,
                overrode,
            } => {
                // An overridden upgrade-path hold is recorded with what it said (the
                // releases in protection.json, the log, the notification).
                let message = match overrode {
                    Some(reason) => {
                        format!("{message}, overriding the upgrade-path hold: {reason}")
                    }
                    None => message,
                };
                self.record_release(&name, true, &message, now, out);
                out.push(Effect::Reply {
                    to: reply,
                    result: Ok(format!("forced release: {message}")),
                });
            }
            Thaw::Pinned {
                name,
                pinned_at,
                reply,
            } => {
                let what = format!(
                    "{message} (rollback recorded by `immich-guard pin` at {})",
                    pinned_at.format("%Y-%m-%d %H:%M:%S UTC")
                );
                self.record_release(&name, false, &what, now, out);
                out.push(Effect::Reply {
                    to: reply,
                    result: Ok(what),
                });
            }
            Thaw::ForeignPause {
                name,
                forced,
                reply,
            } => {
                self.record_release(&name, forced, &message, now, out);
                out.push(Effect::Reply {
                    to: reply,
                    result: Ok(message),
                });
            }
        }
        out.push(Effect::Publish);
    }

    /// `release <service>`: a halted service gets its restart policy back and starts.
    pub(super) fn on_unhalt(&mut self, service: &str, reply: ReplyId, out: &mut Vec<Effect>) {
        let found = self
            .state
            .halted
            .iter()
            .find(|h| h.service == service || h.container == service);
        match found {
            Some(halted) => out.push(Effect::Unhalt {
                halted: halted.clone(),
                why: UnhaltFor::Admin(reply),
            }),
            None => out.push(Effect::Reply {
                to: reply,
                result: Err(format!(
                    "{service} is not halted (halted: {})",
                    self.state
                        .halted
                        .iter()
                        .map(|h| h.service.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }),
        }
    }

    pub(super) fn on_unhalted(
        &mut self,
        halted: crate::incident::Halted,
        result: Result<(), (String, bool)>,
        why: UnhaltFor,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let message = match (&why, result) {
            (UnhaltFor::Admin(reply), Err((e, _))) => {
                out.push(Effect::Reply {
                    to: *reply,
                    result: Err(format!("could not release {}: {e}", halted.service)),
                });
                return;
            }
            (UnhaltFor::Admin(_), Ok(())) => format!(
                "{} started with its restart policy {} back",
                halted.service, halted.restart_policy
            ),
            // One the restore recreated is gone; its new container has compose's policy.
            (UnhaltFor::Restore, Err((e, false))) => {
                tracing::warn!(service = %halted.service, error = %e, "could not give a halted service its restart policy back after the restore; `immich-guard release <service>` retries");
                out.push(Effect::Publish);
                return;
            }
            (UnhaltFor::Restore, _) => {
                tracing::info!(service = %halted.service, restart_policy = %halted.restart_policy, "halted before the restore: released, the restore started it again");
                "released by the restore".to_string()
            }
        };
        self.state
            .halted
            .retain(|h| h.container != halted.container);
        self.deaths.forget(&halted.container);
        self.record_release(&halted.service, false, &message, now, out);
        if let UnhaltFor::Admin(reply) = why {
            out.push(Effect::Reply {
                to: reply,
                result: Ok(message),
            });
        }
        out.push(Effect::Publish);
    }

    /// `immich-guard ack`: the admin has seen the DEGRADED.
    pub(super) fn on_ack(&mut self, reply: ReplyId, out: &mut Vec<Effect>) {
        let result = self.state.verifies.acknowledge().map(|degraded| {
            let message = format!(
                "acknowledged DEGRADED after {} → {} (since {}); the failed verify stays as the last result",
                degraded.from,
                degraded.to,
                degraded.since.format("%Y-%m-%d %H:%M:%S UTC")
            );
            tracing::warn!("{message}");
            out.push(Effect::Publish);
            message
        });
        out.push(Effect::Reply { to: reply, result });
    }
}
