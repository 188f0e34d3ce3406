//! One snapshot at a time. Requests that arrive while a snapshot runs join it: every caller
//! gets its progress and its id, and the stack is dumped once. The worker takes the Docker
//! connection and the stack from what the daemon last published; it never discovers itself.

use std::sync::Arc;

use bollard::Docker;
use tokio::sync::{mpsc, watch};

use super::store::Meta;
use super::{Request, take};
use crate::config::Config;
use crate::status::{DaemonState, SnapshotSeen};

/// How long a snapshot waits for a database that is starting.
const DB_START_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
const DB_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone)]
pub enum Event {
    Progress(String),
    Sealed(Box<Meta>),
    Failed(String),
}

struct Job {
    request: Request,
    events: mpsc::UnboundedSender<Event>,
}

/// The connection the daemon currently holds, and its host string.
pub type DockerHandle = watch::Receiver<Option<(Docker, String)>>;

#[derive(Clone)]
pub struct SnapshotQueue {
    jobs: mpsc::Sender<Job>,
}

impl SnapshotQueue {
    pub fn start(
        config: Config,
        docker: DockerHandle,
        state: Arc<watch::Sender<DaemonState>>,
    ) -> SnapshotQueue {
        let (jobs, rx) = mpsc::channel(16);
        tokio::spawn(worker(rx, config, docker, state));
        SnapshotQueue { jobs }
    }

    /// Queues (or joins) a snapshot; the receiver yields progress, then Sealed or Failed.
    pub async fn request(&self, request: Request) -> mpsc::UnboundedReceiver<Event> {
        let (events, rx) = mpsc::unbounded_channel();
        let job = Job { request, events };
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job).await {
            let _ = job
                .events
                .send(Event::Failed("the snapshot worker has stopped".into()));
        }
        rx
    }
}

#[cfg(test)]
impl SnapshotQueue {
    /// A queue whose worker takes requests and never finishes one: a snapshot stuck (behind
    /// a database lock, say), for the guard's own tests.
    pub(crate) fn stalled() -> SnapshotQueue {
        let (jobs, mut rx) = mpsc::channel::<Job>(16);
        tokio::spawn(async move {
            let mut taken = Vec::new();
            while let Some(job) = rx.recv().await {
                let _ = job
                    .events
                    .send(Event::Progress("dumping with pg_dumpall".into()));
                taken.push(job);
            }
        });
        SnapshotQueue { jobs }
    }
}

async fn worker(
    mut jobs: mpsc::Receiver<Job>,
    config: Config,
    docker: DockerHandle,
    state: Arc<watch::Sender<DaemonState>>,
) {
    while let Some(first) = jobs.recv().await {
        let mut waiters = vec![first.events];
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<String>();
        let run = run_one(&config, &docker, &state, &first.request, progress_tx);
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                result = &mut run => break result,
                Some(line) = progress_rx.recv() => {
                    tracing::info!("{line}");
                    waiters.retain(|w| w.send(Event::Progress(line.clone())).is_ok());
                }
                Some(job) = jobs.recv() => {
                    let _ = job.events.send(Event::Progress("joined the snapshot in progress".into()));
                    waiters.push(job.events);
                }
            }
        };
        while let Ok(line) = progress_rx.try_recv() {
            tracing::info!("{line}");
            for w in &waiters {
                let _ = w.send(Event::Progress(line.clone()));
            }
        }
        let event = match result {
            Ok(meta) => Event::Sealed(Box::new(meta)),
            Err(message) => {
                tracing::error!(error = %message, "snapshot failed");
                Event::Failed(message)
            }
        };
        for w in &waiters {
            let _ = w.send(event.clone());
        }
    }
}

async fn run_one(
    config: &Config,
    docker: &DockerHandle,
    state: &watch::Sender<DaemonState>,
    request: &Request,
    progress: mpsc::UnboundedSender<String>,
) -> Result<Meta, String> {
    state.send_modify(|s| s.activity = format!("snapshotting ({})", request.trigger));
    let report = move |line: String| {
        let _ = progress.send(line);
    };
    // A database that is starting (the whole stack came up at once, or it is being
    // recreated) is waited for; the daemon rediscovers the stack meanwhile, so a new
    // container or address is picked up on the next try.
    let deadline = tokio::time::Instant::now() + DB_START_WAIT;
    let mut said = String::new();
    let result = loop {
        let connection = docker.borrow().clone();
        let Some((docker, host)) = connection else {
            break Err("Docker is unreachable; see `immich-guard status`".into());
        };
        let (stack, why) = {
            let s = state.borrow();
            (s.stack.clone(), s.discovery_error.clone())
        };
        let attempt = match stack {
            Some(stack) => take(&docker, &host, &stack, config, request, &report)
                .await
                .map_err(|e| (e.is_transient(), e.to_string())),
            // Between `compose down` and `up` there is no stack for a moment.
            None => Err((
                true,
                format!(
                    "no stack to snapshot: {}",
                    why.unwrap_or_else(|| "discovery has not run yet".into())
                ),
            )),
        };
        match attempt {
            Ok(meta) => break Ok(meta),
            Err((true, message)) if tokio::time::Instant::now() < deadline => {
                if message != said {
                    report(format!(
                        "waiting up to {} s for the database: {message}",
                        DB_START_WAIT.as_secs()
                    ));
                    said = message;
                }
                tokio::time::sleep(DB_RETRY).await;
            }
            Err((_, message)) => break Err(message),
        }
    };
    state.send_modify(|s| {
        s.activity = "watching".to_string();
        match &result {
            Ok(meta) => {
                s.last_snapshot = Some(SnapshotSeen {
                    id: meta.id.clone(),
                    version: meta.version.clone(),
                    sealed_at: meta.sealed_at,
                });
                s.last_snapshot_error = None;
            }
            Err(e) => s.last_snapshot_error = Some(e.to_string()),
        }
    });
    result
}
