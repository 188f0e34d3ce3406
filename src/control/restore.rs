//! The `restore` verb: the daemon runs the restore engine (restore/mod.rs) with its own
//! Docker connection and the stack it has discovered, and streams the plan and every step to
//! the client. Protection stands back meanwhile (protect/restoring.rs). The restore runs in
//! its own task: a client that goes away stops hearing about it, not the restore; the journal
//! and `status` tell the rest.

use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use super::Response;
use super::answer::send;
use super::server::Control;
use crate::protect::{GuardHandle, RestoreEnd};
use crate::restore::{self, Progress};

pub(super) async fn answer(
    control: &Control,
    snapshot: String,
    options: restore::Options,
    write: &mut OwnedWriteHalf,
) -> Result<(), ()> {
    // A daemon just started (to finish an interrupted restore, say) has not looked yet:
    // its first discovery is waited for, briefly, rather than refused as "no stack".
    let mut state = control.state.clone();
    let _ = tokio::time::timeout(
        FIRST_DISCOVERY_WAIT,
        state.wait_for(|s| s.discovered_at.is_some() || s.docker.error.is_some()),
    )
    .await;
    let (stack, snapshotting) = {
        let state = control.state.borrow();
        (
            state.stack.clone(),
            state.activity.starts_with("snapshotting"),
        )
    };
    let docker = control.docker.borrow().clone();
    let refused = if snapshotting {
        Some("a snapshot is in progress; restore once it is sealed (`immich-guard status`)".into())
    } else if stack.is_none() {
        Some("no Immich stack is discovered now (`immich-guard status` says why); nothing to restore".to_string())
    } else if docker.is_none() {
        Some("Docker is not reachable now (`immich-guard status`); nothing to restore".into())
    } else {
        control.guard.begin_restore(&snapshot).await.err()
    };
    if let Some(message) = refused {
        return send(write, &Response::error(message)).await;
    }
    let (Some(stack), Some((docker, host))) = (stack, docker) else {
        unreachable!("checked above")
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(run(
        Job {
            config: control.config.clone(),
            docker,
            host,
            stack,
            snapshot,
            options,
        },
        control.guard.clone(),
        tx,
    ));
    // A step may be silent for longer than the client waits for a line (a replay of a big
    // database): a note says it still runs.
    let started = std::time::Instant::now();
    let mut step = "planning".to_string();
    loop {
        let response = match tokio::time::timeout(STILL_RUNNING_EVERY, rx.recv()).await {
            Ok(Some(response)) => response,
            Ok(None) => return Ok(()),
            Err(_) => Response::Progress {
                message: Progress::Note(format!(
                    "still at {step} ({} min in)",
                    started.elapsed().as_secs() / 60
                ))
                .line(),
            },
        };
        let last = match &response {
            Response::Progress { message } => {
                if let Some(Progress::Step { msg, .. }) = Progress::parse(message) {
                    step = msg;
                }
                false
            }
            _ => true,
        };
        // A client that went away does not stop the restore.
        if send(write, &response).await.is_err() {
            return Err(());
        }
        if last {
            return Ok(());
        }
    }
}

const STILL_RUNNING_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
const FIRST_DISCOVERY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

struct Job {
    config: crate::config::Config,
    docker: bollard::Docker,
    host: String,
    stack: crate::discover::Stack,
    snapshot: String,
    options: restore::Options,
}

async fn run(job: Job, guard: GuardHandle, tx: mpsc::UnboundedSender<Response>) {
    let say = |message: String| {
        let _ = tx.send(Response::Progress { message });
    };
    let ctx = restore::Ctx {
        docker: &job.docker,
        host: &job.host,
        config: &job.config,
        stack: &job.stack,
    };
    let data_dir = &job.config.daemon.data_dir;
    let result = match restore::plan(&ctx, &job.snapshot, job.options).await {
        Ok(plan) => {
            tracing::info!(snapshot = %job.snapshot, "restore through the daemon begins");
            for line in plan.lines(&job.stack) {
                say(line);
            }
            let mut progress = |p: Progress| {
                if let Progress::Step { n, of, msg } = &p {
                    guard.restore_progress(format!("step {n}/{of} {msg}"));
                }
                say(p.line());
            };
            restore::run(&ctx, &plan, &mut progress)
                .await
                .map(|outcome| (outcome, plan.meta.version.clone()))
        }
        Err(e) => Err(e),
    };
    let response = match result {
        Ok((outcome, version)) => {
            let stack = crate::discover::discover(&job.docker, &job.host, &job.config)
                .await
                .inspect_err(|e| tracing::warn!(error = %e, "discovery after the restore failed"))
                .ok()
                .map(Box::new);
            let summary = outcome.summary(&job.stack.project);
            tracing::info!(passed = outcome.verify.passed(), "{summary}");
            guard.end_restore(RestoreEnd::Done { version, stack });
            Response::Restored {
                verify: Box::new(outcome.verify),
                summary,
                journal: outcome.journal,
            }
        }
        Err(e) => {
            let message = restore::failure_message(data_dir, &e);
            tracing::error!("restore failed: {message}");
            guard.end_restore(match restore::journal::incomplete(data_dir) {
                Some(line) => RestoreEnd::Unfinished(line),
                None => RestoreEnd::NothingChanged,
            });
            Response::error(message)
        }
    };
    let _ = tx.send(response);
}
