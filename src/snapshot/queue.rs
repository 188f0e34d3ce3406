//! One snapshot at a time. Requests that arrive while a snapshot runs join it: every caller
//! gets its progress and its result, and the stack is dumped once. A request carries the
//! stack to snapshot; the Docker connection and the stacks discovery finds later (for a
//! retry) come from what the daemon publishes. The queue never discovers itself, and it
//! tells the daemon what it does through an [`Observer`] rather than writing its status.

use bollard::Docker;
use tokio::sync::{mpsc, watch};

use super::store::Meta;
use super::{Request, SnapshotFailure, Taken, take};
use crate::config::Config;
use crate::discover::Stack;
use crate::progress::Progress;

/// How long a snapshot waits for a database that is starting.
const DB_START_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
const DB_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone)]
pub enum Event {
    Progress(Progress),
    Sealed(Box<Meta>),
    Failed(SnapshotFailure),
}

struct Job {
    request: Request,
    events: mpsc::UnboundedSender<Event>,
}

/// The connection the daemon currently holds, and its host string.
pub type DockerHandle = watch::Receiver<Option<(Docker, String)>>;

/// The stack discovery last found, or why there is none: what a snapshot that waits for a
/// starting database tries again with.
pub type StackHandle = watch::Receiver<Result<Stack, String>>;

/// What the queue is doing, as it happens: a snapshot begins (for this request), or the one
/// running has ended and the queue is idle.
#[derive(Debug)]
pub enum Activity<'a> {
    Began(&'a Request),
    /// Sealed (with what retention did after the seal), or why not.
    Ended(&'a Result<Taken, SnapshotFailure>),
}

/// Told of every [`Activity`] before any waiter hears the result, so a status read after a
/// result already shows it.
pub type Observer = Box<dyn Fn(Activity<'_>) + Send + Sync>;

#[derive(Clone)]
pub struct SnapshotQueue {
    jobs: mpsc::Sender<Job>,
}

impl SnapshotQueue {
    pub fn start(
        config: Config,
        docker: DockerHandle,
        stacks: StackHandle,
        observer: Observer,
    ) -> SnapshotQueue {
        let (jobs, rx) = mpsc::channel(16);
        tokio::spawn(worker(
            rx,
            Context {
                config,
                docker,
                stacks,
                observer,
            },
        ));
        SnapshotQueue { jobs }
    }

    /// Queues (or joins) a snapshot; the receiver yields progress, then Sealed or Failed.
    pub async fn request(&self, request: Request) -> mpsc::UnboundedReceiver<Event> {
        let (events, rx) = mpsc::unbounded_channel();
        let job = Job { request, events };
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job).await {
            let _ = job.events.send(Event::Failed(SnapshotFailure::lasting(
                "the snapshot worker has stopped",
            )));
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
                let _ = job.events.send(Event::Progress(Progress::Step {
                    n: super::Stage::Dump as usize,
                    of: super::STEPS as usize,
                    msg: "dumping with pg_dumpall".into(),
                }));
                taken.push(job);
            }
        });
        SnapshotQueue { jobs }
    }
}

/// What the worker works with, besides its jobs.
struct Context {
    config: Config,
    docker: DockerHandle,
    stacks: StackHandle,
    observer: Observer,
}

async fn worker(mut jobs: mpsc::Receiver<Job>, ctx: Context) {
    while let Some(first) = jobs.recv().await {
        let mut waiters = vec![first.events];
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<Progress>();
        (ctx.observer)(Activity::Began(&first.request));
        let run = run_one(&ctx, &first.request, progress_tx);
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                result = &mut run => break result,
                Some(p) = progress_rx.recv() => {
                    tracing::info!("{}", p.text());
                    waiters.retain(|w| w.send(Event::Progress(p.clone())).is_ok());
                }
                Some(job) = jobs.recv() => {
                    let joined = Progress::Note("joined the snapshot in progress".into());
                    let _ = job.events.send(Event::Progress(joined));
                    waiters.push(job.events);
                }
            }
        };
        while let Ok(p) = progress_rx.try_recv() {
            tracing::info!("{}", p.text());
            for w in &waiters {
                let _ = w.send(Event::Progress(p.clone()));
            }
        }
        (ctx.observer)(Activity::Ended(&result));
        let event = match result {
            Ok(taken) => Event::Sealed(Box::new(taken.meta)),
            Err(failure) => {
                tracing::error!(error = %failure, transient = failure.transient, "snapshot failed");
                Event::Failed(failure)
            }
        };
        for w in &waiters {
            let _ = w.send(event.clone());
        }
    }
}

/// Takes the request's stack; while the failure is transient (the database is starting,
/// the stack is being recreated), waits up to [`DB_START_WAIT`] and tries again with the
/// stack discovery has published meanwhile.
async fn run_one(
    ctx: &Context,
    request: &Request,
    progress: mpsc::UnboundedSender<Progress>,
) -> Result<Taken, SnapshotFailure> {
    let report = move |p: Progress| {
        let _ = progress.send(p);
    };
    // A database that is starting (the whole stack came up at once, or it is being
    // recreated) is waited for; the daemon rediscovers the stack meanwhile, so a new
    // container or address is picked up on the next try.
    let deadline = tokio::time::Instant::now() + DB_START_WAIT;
    let mut said = String::new();
    let mut stack = request.stack.clone().ok_or(());
    loop {
        let connection = ctx.docker.borrow().clone();
        let Some((docker, host)) = connection else {
            return Err(SnapshotFailure::lasting(
                "Docker is unreachable; see `immich-guard status`",
            ));
        };
        let published = ctx.stacks.borrow().clone();
        let found = match (stack, published) {
            // Discovery finds no stack now (between `compose down` and `up`): what the
            // requester saw before is gone; wait for the stack to come back.
            (_, Err(why)) => Err(why),
            (Ok(stack), Ok(_)) => Ok(stack),
            // The requester saw none: discovery has one by now.
            (Err(()), Ok(published)) => Ok(published),
        };
        let attempt = match &found {
            Ok(stack) => take(&docker, &host, stack, &ctx.config, request, &report)
                .await
                .map_err(SnapshotFailure::from),
            // Between `compose down` and `up` there is no stack for a moment.
            Err(why) => Err(SnapshotFailure {
                message: format!("no stack to snapshot: {why}"),
                transient: true,
            }),
        };
        let failure = match attempt {
            Ok(taken) => return Ok(taken),
            Err(failure) => failure,
        };
        if !failure.transient || tokio::time::Instant::now() >= deadline {
            return Err(failure);
        }
        if failure.message != said {
            report(Progress::Note(format!(
                "waiting up to {} s for the database: {}",
                DB_START_WAIT.as_secs(),
                failure.message
            )));
            said = failure.message;
        }
        tokio::time::sleep(DB_RETRY).await;
        stack = Err(());
    }
}

/// Before the first discovery has an outcome.
pub const NOT_DISCOVERED: &str = "discovery has not run yet";

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A queue with a Docker client that is never called (no stack means no `take`) and
    /// the given discovery outcome; what it observed.
    fn queue(found: Result<Stack, String>) -> (SnapshotQueue, Arc<Mutex<Vec<String>>>) {
        let docker =
            Docker::connect_with_http("http://127.0.0.1:9", 1, bollard::API_DEFAULT_VERSION)
                .unwrap();
        // The worker only borrows the last values: the senders may go.
        let (_, docker_rx) = watch::channel(Some((docker, "tcp://127.0.0.1:9".into())));
        let (_, stacks) = watch::channel(found);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let observer: Observer = Box::new(move |a| {
            log.lock().unwrap().push(match a {
                Activity::Began(r) => format!("began {}", r.trigger),
                Activity::Ended(Ok(t)) => format!("sealed {}", t.meta.id),
                Activity::Ended(Err(f)) => format!("failed {}", f.transient),
            })
        });
        let queue = SnapshotQueue::start(Config::default(), docker_rx, stacks, observer);
        (queue, seen)
    }

    async fn drain(mut events: mpsc::UnboundedReceiver<Event>) -> (Vec<Progress>, Event) {
        let mut progress = Vec::new();
        while let Some(event) = events.recv().await {
            match event {
                Event::Progress(p) => progress.push(p),
                done => return (progress, done),
            }
        }
        panic!("the queue ended without a result");
    }

    /// No stack for longer than a database start may take: the failure every waiter gets
    /// still says it was transient, the wait is a note (it never moves a bar), and a second
    /// request joins the first rather than waiting another minute.
    #[tokio::test(start_paused = true)]
    async fn a_stack_that_stays_missing_fails_as_transient_for_every_waiter() {
        let (queue, seen) = queue(Err("compose down".into()));
        let first = queue
            .request(Request {
                trigger: "pre-update".into(),
                ..Default::default()
            })
            .await;
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let second = queue
            .request(Request {
                trigger: "manual".into(),
                ..Default::default()
            })
            .await;
        let started = tokio::time::Instant::now();
        let ((first_progress, first_done), (second_progress, second_done)) =
            tokio::join!(drain(first), drain(second));
        assert!(started.elapsed() < DB_START_WAIT, "joined, not queued");
        let expected = SnapshotFailure {
            message: "no stack to snapshot: compose down".into(),
            transient: true,
        };
        for done in [first_done, second_done] {
            match done {
                Event::Failed(f) => assert_eq!(f, expected),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            first_progress,
            [Progress::Note(
                "waiting up to 60 s for the database: no stack to snapshot: compose down".into()
            )]
        );
        assert_eq!(
            second_progress,
            [Progress::Note("joined the snapshot in progress".into())]
        );
        assert!(
            first_progress
                .iter()
                .chain(&second_progress)
                .all(|p| p.done().is_none())
        );
        assert_eq!(*seen.lock().unwrap(), ["began pre-update", "failed true"]);
    }

    /// The requester's stack is from before `compose down` (no upload location, no database
    /// address: a snapshot of it would fail for good); discovery finds no stack now. The
    /// queue waits for the stack to come back instead of failing on the stale one.
    #[tokio::test(start_paused = true)]
    async fn a_stale_stack_while_discovery_finds_none_is_waited_for() {
        let (queue, _) = queue(Err("compose down".into()));
        let stale = crate::discover::Stack {
            server: None,
            ..crate::protect::policy::tests::running("immich", "v1.119.0", "gone")
        };
        let (progress, done) = drain(
            queue
                .request(Request {
                    trigger: "pre-update".into(),
                    stack: Some(stale),
                    ..Default::default()
                })
                .await,
        )
        .await;
        assert!(
            matches!(&progress[..], [Progress::Note(n)] if n.contains("waiting up to 60 s")),
            "{progress:?}"
        );
        match done {
            Event::Failed(f) => assert!(f.transient && f.message.contains("compose down"), "{f:?}"),
            other => panic!("{other:?}"),
        }
    }

    /// Without Docker there is nothing to wait for: a lasting failure at once.
    #[tokio::test(start_paused = true)]
    async fn without_docker_the_failure_is_lasting() {
        let (_, docker) = watch::channel(None);
        let (_, stacks) = watch::channel(Err(NOT_DISCOVERED.to_string()));
        let queue = SnapshotQueue::start(Config::default(), docker, stacks, Box::new(|_| {}));
        let (_, done) = drain(queue.request(Request::default()).await).await;
        match done {
            Event::Failed(f) => assert!(!f.transient && f.message.contains("Docker"), "{f:?}"),
            other => panic!("{other:?}"),
        }
    }
}
