//! The daemon's drills, one at a time on a task of their own: a drill never holds up a
//! snapshot, the control socket or protection, which only wait for its result when they
//! asked for it (a `drill` request, a pre-update snapshot under `snapshots.drill =
//! "before-release"`). A scratch database can be started ahead ([`DrillQueue::prepare`]),
//! while a snapshot's dump and storage run, so only the replay and the checks follow the seal.

use tokio::sync::{mpsc, oneshot};

use super::scratch::{self, Scratch};
use super::{Context, Live};
use crate::config::Config;
use crate::snapshot::queue::{DockerHandle, StackHandle};
use crate::snapshot::store::{DrillResult, Meta, Store};

/// What the queue is doing, as it happens.
#[derive(Debug)]
pub enum Activity<'a> {
    Began(&'a str),
    /// The drill of this snapshot ended: its result, or why none could be had.
    Ended(&'a str, &'a Result<DrillResult, String>),
}

pub type Observer = Box<dyn Fn(Activity<'_>) + Send + Sync>;

/// A scratch database being started ahead of a drill. Dropped unused (the snapshot failed),
/// its container is removed once it has started.
pub struct Prepared {
    task: Option<tokio::task::JoinHandle<Result<Scratch, String>>>,
    docker: Option<bollard::Docker>,
}

impl Prepared {
    async fn take(mut self) -> Option<Result<Scratch, String>> {
        let task = self.task.take()?;
        Some(
            task.await
                .unwrap_or_else(|e| Err(format!("starting the scratch database: {e}"))),
        )
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let (Some(task), Some(docker)) = (self.task.take(), self.docker.take()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(Ok(s)) = task.await {
                    scratch::remove(&docker, &s).await;
                }
            });
        }
    }
}

struct Job {
    id: String,
    prepared: Option<Prepared>,
    reply: Option<oneshot::Sender<Result<DrillResult, String>>>,
    notes: Option<mpsc::UnboundedSender<String>>,
}

#[derive(Clone)]
pub struct DrillQueue {
    jobs: mpsc::UnboundedSender<Job>,
    config: Config,
    docker: DockerHandle,
    stacks: StackHandle,
}

impl DrillQueue {
    pub fn start(
        config: Config,
        docker: DockerHandle,
        stacks: StackHandle,
        observer: Observer,
    ) -> DrillQueue {
        let (jobs, rx) = mpsc::unbounded_channel();
        let queue = DrillQueue {
            jobs,
            config,
            docker,
            stacks,
        };
        tokio::spawn(worker(rx, queue.clone(), observer));
        queue
    }

    /// Drills a snapshot just sealed, when the ones before it are done; nobody waits.
    pub fn after_seal(&self, id: &str) {
        let _ = self.jobs.send(Job {
            id: id.to_string(),
            prepared: None,
            reply: None,
            notes: None,
        });
    }

    /// Drills `id` (in `prepared` when given) and waits for the result; `notes` hears what it
    /// does.
    pub async fn drill(
        &self,
        id: &str,
        prepared: Option<Prepared>,
        notes: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<DrillResult, String> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            id: id.to_string(),
            prepared,
            reply: Some(reply),
            notes,
        };
        if self.jobs.send(job).is_err() {
            return Err("the drill worker has stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the drill worker has stopped".into()))
    }

    /// Starts a scratch database now for the drill of a snapshot about to be taken of
    /// `stack`, sized from the newest sealed snapshot; `None` without Docker.
    pub fn prepare(&self, stack: Option<&crate::discover::Stack>, label: &str) -> Option<Prepared> {
        let (docker, host) = self.docker.borrow().clone()?;
        let config = self.config.clone();
        let live = Live::of(stack);
        let label = label.to_string();
        let task = {
            let docker = docker.clone();
            tokio::spawn(async move {
                let dir = config.snapshot_dir();
                let hint = tokio::task::spawn_blocking(move || newest_meta(&dir))
                    .await
                    .ok()
                    .flatten();
                let ctx = Context {
                    docker: &docker,
                    host: &host,
                    config: &config,
                    live: &live,
                };
                super::prepare(&ctx, hint.as_ref(), &label).await
            })
        };
        Some(Prepared {
            task: Some(task),
            docker: Some(docker),
        })
    }
}

fn newest_meta(dir: &std::path::Path) -> Option<Meta> {
    Store::open(dir)
        .ok()?
        .list()
        .ok()?
        .into_iter()
        .max_by(|a, b| (a.sealed_at, &a.id).cmp(&(b.sealed_at, &b.id)))
}

async fn worker(mut jobs: mpsc::UnboundedReceiver<Job>, queue: DrillQueue, observer: Observer) {
    while let Some(job) = jobs.recv().await {
        observer(Activity::Began(&job.id));
        let result = run_one(&queue, &job.id, job.prepared, job.notes.clone()).await;
        match &result {
            Ok(r) if r.passed => {
                tracing::info!(snapshot = %job.id, "restore drill {}", super::summary(r))
            }
            Ok(r) => tracing::error!(snapshot = %job.id, "restore drill {}", super::summary(r)),
            Err(e) => tracing::warn!(snapshot = %job.id, error = %e, "no restore drill"),
        }
        observer(Activity::Ended(&job.id, &result));
        if let Some(reply) = job.reply {
            let _ = reply.send(result);
        }
    }
}

async fn run_one(
    queue: &DrillQueue,
    id: &str,
    prepared: Option<Prepared>,
    notes: Option<mpsc::UnboundedSender<String>>,
) -> Result<DrillResult, String> {
    let Some((docker, host)) = queue.docker.borrow().clone() else {
        return Err("Docker is unreachable; see `immich-guard status`".into());
    };
    let prepared = match prepared {
        Some(p) => p.take().await,
        None => None,
    };
    let live = Live::of(queue.stacks.borrow().as_ref().ok());
    let ctx = Context {
        docker: &docker,
        host: &host,
        config: &queue.config,
        live: &live,
    };
    let say = move |line: String| {
        tracing::info!(snapshot = %id, "{line}");
        if let Some(n) = &notes {
            let _ = n.send(line);
        }
    };
    super::run(&ctx, id, prepared, &say)
        .await
        .map_err(|e| e.to_string())
}
