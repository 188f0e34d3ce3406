//! The protection task (docs/architecture.md "Policy and driver"): it owns Docker, the
//! snapshot queue, the notifier, `protection.json` and the compose watcher; it hands every
//! input to `Policy::step`, carries out the effects in order and feeds each result back at
//! once, so a start's `Pause` is the first Docker call after the event.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::query_parameters::{
    InspectContainerOptions, StartContainerOptions, StopContainerOptions,
};
use chrono::Utc;
use tokio::sync::{mpsc, oneshot, watch};

use super::persist::{self, STATE_FILE, StateFile};
use super::policy::{
    ContainerEvent, Disk, Effect, Event, ImageFacts, PauseOutcome, Policy, ReplyId, RestoreEnd,
    RestoreEvent,
};
use super::state::Protection;
use crate::compose::{ComposeEvent, ComposeWatcher, read_view};
use crate::config::Config;
use crate::discover::Stack;
use crate::notification::Notifier;
use crate::snapshot::queue::{DockerHandle, Event as SnapshotEvent, SnapshotQueue};
use crate::snapshot::store::Store;
use crate::status::DaemonState;

/// How long a `.env` must be quiet before its change counts (editors write in bursts).
const COMPOSE_DEBOUNCE: Duration = crate::compose::DEFAULT_DEBOUNCE;
/// How long a crash loop's diagnosis or a downgrade's verdict waits for the database.
const FACTS_TIMEOUT: Duration = Duration::from_secs(3);

/// What the Docker event loop, the control socket and the driver's own tasks hand the guard.
#[derive(Debug)]
pub enum Input {
    Started(ContainerEvent),
    Image {
        reference: String,
    },
    /// A discovery's result; `listed_at`: when it began listing containers.
    Discovered {
        stack: Box<Stack>,
        listed_at: chrono::DateTime<Utc>,
    },
    Died(ContainerEvent),
    /// Someone sent it a signal (`docker stop`, `kill`, `restart`): its next death is theirs.
    Killed(ContainerEvent),
    Release {
        force: bool,
        /// A halted service to give its restart policy back and start.
        service: Option<String>,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// `immich-guard ack`: the admin has seen the DEGRADED.
    Ack {
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// `immich-guard restore` through the daemon.
    Restore(RestoreInput),
    /// A result from one of the driver's own tasks (snapshot, verify).
    Result(Event),
}

/// What the daemon's restore tells the guard.
#[derive(Debug)]
pub enum RestoreInput {
    Begin {
        snapshot: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Progress(String),
    End(RestoreEnd),
    Unfinished(String),
}

/// Sends inputs to the guard; cheap to clone.
#[derive(Clone)]
pub struct GuardHandle {
    tx: mpsc::UnboundedSender<Input>,
}

impl GuardHandle {
    pub fn send(&self, input: Input) {
        let _ = self.tx.send(input);
    }

    pub async fn release(&self, force: bool, service: Option<String>) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Release {
            force,
            service,
            reply,
        });
        rx.await
            .unwrap_or_else(|_| Err("protection has stopped".into()))
    }

    /// Acknowledges a DEGRADED; the answer says what was cleared.
    pub async fn ack(&self) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Ack { reply });
        rx.await
            .unwrap_or_else(|_| Err("protection has stopped".into()))
    }

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

/// A caller waiting for the policy's answer.
enum Waiting {
    Text(oneshot::Sender<Result<String, String>>),
    Unit(oneshot::Sender<Result<(), String>>),
}

/// When the pins and the snapshot dir last changed: re-read only then.
#[derive(Default, PartialEq, Clone, Copy)]
struct DiskStamp {
    pins: Option<SystemTime>,
    snapshots: Option<SystemTime>,
}

pub struct Guard {
    policy: Policy,
    config: Config,
    state: Arc<watch::Sender<DaemonState>>,
    docker: DockerHandle,
    queue: SnapshotQueue,
    notifier: Notifier,
    tx: mpsc::UnboundedSender<Input>,
    state_file: PathBuf,
    compose: Option<ComposeWatcher>,
    compose_rx: Option<mpsc::Receiver<ComposeEvent>>,
    waiting: HashMap<ReplyId, Waiting>,
    next_reply: u64,
    /// Incident bundles written, by incident ID, for the rewrite after the halt.
    bundles: HashMap<String, PathBuf>,
    disk: Option<DiskStamp>,
    /// The view last written to `protection.json`.
    saved: Option<StateFile>,
}

impl Guard {
    pub fn start(
        config: Config,
        state: Arc<watch::Sender<DaemonState>>,
        docker: DockerHandle,
        queue: SnapshotQueue,
        notifier: Notifier,
    ) -> GuardHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let state_file = config.daemon.data_dir.join(STATE_FILE);
        let configured = config.stack.project.as_deref();
        let states = persist::load(&state_file, configured).unwrap_or_else(|e| {
            tracing::warn!(file = %state_file.display(), error = %e, "cannot read the protection state; starting afresh");
            StateFile::default()
        });
        let mut guard = Guard {
            policy: Policy::new(config.clone(), states),
            config,
            state,
            docker,
            queue,
            notifier,
            tx: tx.clone(),
            state_file,
            compose: None,
            compose_rx: None,
            waiting: HashMap::new(),
            next_reply: 0,
            bundles: HashMap::new(),
            disk: None,
            saved: None,
        };
        guard.refresh_disk_sync();
        guard.publish();
        tokio::spawn(guard.run(rx));
        GuardHandle { tx }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        loop {
            let wakeup = self.policy.next_wakeup(Utc::now());
            let compose = async {
                match self.compose_rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let wait = async {
                match wakeup {
                    Some(at) => {
                        let left = (at - Utc::now()).to_std().unwrap_or_default();
                        tokio::time::sleep(left).await
                    }
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => self.event_of(input),
                    None => return,
                },
                Some(event) = compose => Event::Compose(event),
                () = wait => Event::Wakeup,
            };
            self.handle(event).await;
        }
    }

    /// An input as the policy takes it: a reply channel becomes an ID.
    fn event_of(&mut self, input: Input) -> Event {
        match input {
            Input::Started(e) => Event::Started(e),
            Input::Image { reference } => Event::Image { reference },
            Input::Discovered { stack, listed_at } => Event::Discovered { stack, listed_at },
            Input::Died(e) => Event::Died(e),
            Input::Killed(e) => Event::Killed(e),
            Input::Release {
                force,
                service,
                reply,
            } => Event::Release {
                force,
                service,
                reply: self.wait(Waiting::Text(reply)),
            },
            Input::Ack { reply } => Event::Ack {
                reply: self.wait(Waiting::Text(reply)),
            },
            Input::Restore(RestoreInput::Begin { snapshot, reply }) => {
                Event::Restore(RestoreEvent::Begin {
                    snapshot,
                    reply: self.wait(Waiting::Unit(reply)),
                })
            }
            Input::Restore(RestoreInput::Progress(line)) => {
                Event::Restore(RestoreEvent::Progress(line))
            }
            Input::Restore(RestoreInput::End(end)) => Event::Restore(RestoreEvent::End(end)),
            Input::Restore(RestoreInput::Unfinished(line)) => {
                Event::Restore(RestoreEvent::Unfinished(line))
            }
            Input::Result(event) => event,
        }
    }

    fn wait(&mut self, w: Waiting) -> ReplyId {
        self.next_reply += 1;
        let id = ReplyId(self.next_reply);
        self.waiting.insert(id, w);
        id
    }

    /// Steps `event` and carries out its effects; each result is stepped at once and its
    /// effects run before the rest.
    async fn handle(&mut self, event: Event) {
        // A start is paused before anything else is looked at.
        if !matches!(event, Event::Started(_)) {
            self.refresh_disk();
        }
        let mut todo: VecDeque<Effect> = self.policy.step(event, Utc::now()).into();
        while let Some(effect) = todo.pop_front() {
            if let Some(result) = self.carry_out(effect).await {
                let more = self.policy.step(result, Utc::now());
                for e in more.into_iter().rev() {
                    todo.push_front(e);
                }
            }
        }
    }

    fn docker(&self) -> Option<Docker> {
        self.docker.borrow().as_ref().map(|(d, _)| d.clone())
    }

    async fn carry_out(&mut self, effect: Effect) -> Option<Event> {
        match effect {
            Effect::Pause { container } => {
                let docker = self.docker()?;
                let outcome = match docker.pause_container(&container).await {
                    Ok(()) => PauseOutcome::Paused,
                    Err(e) if crate::docker::is_not_found(&e) => PauseOutcome::Gone,
                    Err(e) => PauseOutcome::Failed(e.to_string()),
                };
                Some(Event::Paused { container, outcome })
            }
            Effect::Unpause { container } => {
                let docker = self.docker()?;
                if let Err(e) = docker.unpause_container(&container).await {
                    tracing::warn!(container = %container, error = %e, "could not unpause");
                }
                None
            }
            Effect::Stop { container } => {
                let docker = self.docker()?;
                let stopped = docker
                    .stop_container(&container, None::<StopContainerOptions>)
                    .await;
                tracing::warn!(container = %container, stopped = stopped.is_ok(), "stopped the server");
                None
            }
            Effect::Inspect { container } => {
                let docker = self.docker()?;
                let image = container_image(&docker, &container).await;
                let image = match image {
                    Some(id) => image_facts(&docker, &id).await,
                    None => None,
                };
                Some(Event::Inspected { container, image })
            }
            Effect::InspectImage { reference } => {
                let docker = self.docker()?;
                let image = image_facts(&docker, &reference).await;
                Some(Event::ImageInspected { reference, image })
            }
            Effect::Thaw { server, why } => {
                let Some(docker) = self.docker() else {
                    return Some(Event::Thawed {
                        server,
                        why,
                        result: Err("Docker is unreachable: the server stays paused".into()),
                        image_id: None,
                    });
                };
                let result = match docker.unpause_container(&server.container).await {
                    Ok(()) => Ok("unpaused"),
                    Err(_) => docker
                        .start_container(&server.container, None::<StartContainerOptions>)
                        .await
                        .map(|_| "started")
                        .map_err(|e| e.to_string()),
                };
                let image_id = if server.image_id.is_empty() {
                    container_image(&docker, &server.container).await
                } else {
                    None
                };
                Some(Event::Thawed {
                    server,
                    why,
                    result,
                    image_id,
                })
            }
            Effect::AskMigrations { version } => {
                let access = self.policy.stack.as_ref().and_then(|s| s.db.clone());
                let result = match access {
                    Some(access) => {
                        match tokio::time::timeout(
                            FACTS_TIMEOUT,
                            crate::snapshot::db::facts(&access),
                        )
                        .await
                        {
                            Ok(Ok(f)) => Ok(f.migrations),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => {
                                Err(format!("no answer within {} s", FACTS_TIMEOUT.as_secs()))
                            }
                        }
                    }
                    None => Err("database access unknown".to_string()),
                };
                Some(Event::Migrations { version, result })
            }
            Effect::ReadRestartCount { container, why } => {
                let docker = self.docker()?;
                let count = docker
                    .inspect_container(&container, None::<InspectContainerOptions>)
                    .await
                    .ok()
                    .map(|i| i.restart_count.unwrap_or(0));
                Some(Event::RestartCount {
                    container,
                    count,
                    read_at: Utc::now(),
                    why,
                })
            }
            Effect::CollectEvidence(found) => {
                let docker = self.docker()?;
                let stack = self.policy.stack.clone()?;
                let evidence = crate::incident::collect(&docker, &stack).await;
                // A looping database cannot answer; otherwise it is asked briefly: the halt
                // must not wait.
                let facts = match &stack.db {
                    Some(access) if !found.is_database => {
                        tokio::time::timeout(FACTS_TIMEOUT, crate::snapshot::db::facts(access))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .map(Box::new)
                    }
                    _ => None,
                };
                let dir = self.config.daemon.data_dir.join(crate::incident::DIR);
                let incident_id = crate::incident::incident_id(Utc::now(), &found.service, &dir);
                Some(Event::Evidence {
                    found,
                    evidence: Box::new(evidence),
                    facts,
                    incident_id,
                })
            }
            Effect::WriteIncident {
                incident,
                evidence,
                view,
            } => {
                let stack = self.policy.stack.clone()?;
                let view = serde_json::to_value(&*view).unwrap_or_default();
                match crate::incident::write_bundle(
                    &incident.dir,
                    &incident,
                    &evidence,
                    &stack,
                    &view,
                ) {
                    Ok(path) => {
                        self.bundles.insert(incident.id.clone(), path);
                    }
                    Err(e) => tracing::error!(error = %e, "could not write the incident bundle"),
                }
                None
            }
            Effect::Halt { incident, targets } => {
                let docker = self.docker()?;
                let mut results = Vec::new();
                for target in targets {
                    let result = crate::incident::halt(&docker, &target.container)
                        .await
                        .map_err(|e| e.to_string());
                    results.push((target, result));
                }
                Some(Event::Halted { incident, results })
            }
            Effect::FinishIncident { incident } => {
                // The halted list is known only now: the sealed bundle's incident.json is
                // replaced whole, never left half-written.
                if let Some(path) = self.bundles.remove(&incident.id) {
                    let _ = crate::durable::replace_synced(
                        &path.join(crate::incident::INCIDENT_FILE),
                        &serde_json::to_vec_pretty(&*incident).unwrap_or_default(),
                    );
                    tracing::info!(dir = %path.display(), "incident bundle written");
                }
                None
            }
            Effect::Unhalt { halted, why } => {
                let result = match self.docker() {
                    Some(docker) => {
                        crate::incident::unhalt(&docker, &halted.container, &halted.restart_policy)
                            .await
                            .map_err(|e| (e.to_string(), crate::docker::is_not_found(&e)))
                    }
                    None => Err(("Docker is unreachable".to_string(), false)),
                };
                Some(Event::Unhalted {
                    halted,
                    result,
                    why,
                })
            }
            Effect::RequestSnapshot(request) => {
                let mut events = self.queue.request(request).await;
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    while let Some(event) = events.recv().await {
                        let result = match event {
                            SnapshotEvent::Progress(line) => {
                                let _ = tx.send(Input::Result(Event::SnapshotProgress(line)));
                                continue;
                            }
                            SnapshotEvent::Sealed(meta) => Event::SnapshotSealed {
                                id: meta.id,
                                version: meta.version,
                            },
                            SnapshotEvent::Failed(message) => Event::SnapshotFailed { message },
                        };
                        let _ = tx.send(Input::Result(result));
                        return;
                    }
                    let _ = tx.send(Input::Result(Event::SnapshotFailed {
                        message: "the snapshot worker stopped".into(),
                    }));
                });
                None
            }
            Effect::Verify { due, plan, stack } => {
                let Some((docker, host)) = self.docker.borrow().clone() else {
                    return Some(Event::VerifyNotRun);
                };
                let server = stack.server.as_ref().map(|s| s.container_id.clone());
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let report = crate::post_upgrade::run(&docker, &host, &stack, &plan).await;
                    let _ = tx.send(Input::Result(Event::Verified {
                        due,
                        report: Box::new(report),
                        server,
                    }));
                });
                None
            }
            Effect::WatchCompose {
                dir,
                files,
                env_file,
            } => {
                let watching = match ComposeWatcher::spawn(
                    dir.clone(),
                    files.clone(),
                    env_file.clone(),
                    COMPOSE_DEBOUNCE,
                ) {
                    Ok((watcher, rx)) => {
                        tracing::info!(dir = %dir.display(), "watching the compose dir");
                        self.compose = Some(watcher);
                        self.compose_rx = Some(rx);
                        true
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the compose dir");
                        false
                    }
                };
                let view = read_view(&dir, &files, env_file.as_deref()).ok();
                Some(Event::ComposeRead {
                    dir,
                    view,
                    watching,
                })
            }
            Effect::ShowStack(stack) => {
                self.state.send_modify(|s| {
                    if let Some(shown) = &mut s.stack
                        && shown.project == stack.project
                    {
                        shown.env_version = stack.env_version.clone();
                        shown.notes = stack.notes.clone();
                    }
                });
                None
            }
            Effect::ShowRestoring(line) => {
                self.state.send_modify(|s| s.restoring = line);
                None
            }
            Effect::ShowIncomplete(line) => {
                self.state.send_modify(|s| s.restore_incomplete = line);
                None
            }
            Effect::Notify(notice) => {
                self.notifier.send(*notice);
                None
            }
            Effect::Reply { to, result } => {
                // Status shows what the answer says before the caller reads it.
                self.publish();
                match self.waiting.remove(&to) {
                    Some(Waiting::Text(tx)) => {
                        let _ = tx.send(result);
                    }
                    Some(Waiting::Unit(tx)) => {
                        let _ = tx.send(result.map(|_| ()));
                    }
                    None => {}
                }
                None
            }
            Effect::Publish => {
                self.publish();
                None
            }
        }
    }

    /// Publishes to `status` and persists (when it changed), so a restart resumes from here.
    fn publish(&mut self) {
        let view: Protection = self.policy.state().view();
        let all = self.policy.state_file();
        if self.saved.as_ref() != Some(&all) {
            match persist::save(&self.state_file, &all) {
                Ok(()) => self.saved = Some(all),
                Err(e) => {
                    tracing::error!(file = %self.state_file.display(), error = %e, "cannot save the protection state")
                }
            }
        }
        self.state.send_modify(|s| s.protection = view);
    }

    /// Pins and sealed snapshots, re-read when their files changed.
    fn refresh_disk(&mut self) {
        let stamp = self.disk_stamp();
        if self.disk == Some(stamp) {
            return;
        }
        self.disk = Some(stamp);
        let disk = self.read_disk();
        let effects = self.policy.step(Event::Disk(Box::new(disk)), Utc::now());
        debug_assert!(effects.is_empty(), "reading the disk decides nothing");
    }

    fn refresh_disk_sync(&mut self) {
        self.disk = None;
        self.refresh_disk();
    }

    fn disk_stamp(&self) -> DiskStamp {
        let mtime = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        DiskStamp {
            pins: mtime(self.config.daemon.data_dir.join(crate::pin::LOG_FILE)),
            snapshots: mtime(self.config.snapshot_dir()),
        }
    }

    fn read_disk(&self) -> Disk {
        let pins = crate::pin::records(&self.config.daemon.data_dir).map_err(|e| e.to_string());
        let snapshots = Store::open(&self.config.snapshot_dir())
            .and_then(|s| s.list())
            .unwrap_or_default();
        Disk { pins, snapshots }
    }
}

/// The image a container was created from (its ID); None when it is gone.
async fn container_image(docker: &Docker, id: &str) -> Option<String> {
    docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .ok()?
        .image
}

/// An image's ID, tags and Immich version.
async fn image_facts(docker: &Docker, reference: &str) -> Option<ImageFacts> {
    let image = docker.inspect_image(reference).await.ok()?;
    let id = image.id.clone()?;
    let tags = image.repo_tags.clone().unwrap_or_default();
    let version = crate::discover::ImmichVersion {
        tag: None,
        image_id: id.clone(),
        repo_digests: image.repo_digests.clone().unwrap_or_default(),
        repo_tags: tags.clone(),
        label: image
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get("org.opencontainers.image.version").cloned()),
    }
    .name();
    Some(ImageFacts { id, tags, version })
}
