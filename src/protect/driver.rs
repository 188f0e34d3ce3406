//! The protection task (docs/architecture.md "Policy and driver"): it owns Docker, the
//! snapshot queue, the notifier, `protection.json` and the compose watcher; it hands every
//! input to `Policy::step`, carries out the effects in order and feeds each result back at
//! once, so a start's `Pause` is the first Docker call after the event.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::query_parameters::{
    InspectContainerOptions, StartContainerOptions, StopContainerOptions,
};
use chrono::Utc;
use tokio::sync::{mpsc, oneshot};

use super::persist::{self, STATE_FILE, StateFile};
use super::policy::{
    ContainerEvent, Disk, Effect, Event, ImageFacts, PauseOutcome, Policy, ReplyId, RestoreEnd,
    RestoreEvent,
};
use super::state::Protection;
use crate::compose::{ComposeEvent, ComposeWatcher, read_view};
use crate::config::Config;
use crate::discover::Stack;
use crate::drill::queue::DrillQueue;
use crate::notification::Notifier;
use crate::snapshot::queue::{DockerHandle, Event as SnapshotEvent, SnapshotQueue};
use crate::snapshot::store::Store;

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

/// What the driver shows in `status`; the daemon puts it in the state it publishes (so
/// protection never imports `status`, which shows protection's types).
#[derive(Debug)]
pub enum Shown<'a> {
    Protection(&'a Protection),
    /// The stack's `.env` version and notes, as they follow edits.
    Stack(&'a Stack),
    /// The restore running and its step.
    Restoring(Option<String>),
    /// A restore unfinished (its journal's line).
    Incomplete(Option<String>),
    /// The upload activity, as last read.
    Uploads(&'a crate::uploads::RecentUploads),
}

pub type Show = Box<dyn Fn(Shown<'_>) + Send>;

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
    show: Show,
    docker: DockerHandle,
    queue: SnapshotQueue,
    /// Drills a protective snapshot before it counts (`snapshots.drill = "before-release"`);
    /// `None` in tests without Docker.
    drills: Option<DrillQueue>,
    notifier: Notifier,
    tx: mpsc::UnboundedSender<Input>,
    state_file: PathBuf,
    compose: Option<ComposeWatcher>,
    compose_rx: Option<mpsc::Receiver<ComposeEvent>>,
    waiting: HashMap<ReplyId, Waiting>,
    next_reply: u64,
    /// Incident bundles written, by incident ID, with the secrets they were redacted of, for
    /// the rewrite after the halt.
    bundles: HashMap<String, (PathBuf, crate::redact::Secrets)>,
    disk: Option<DiskStamp>,
    /// The view last written to `protection.json`.
    saved: Option<StateFile>,
    /// The upload activity has been read once since the stack was found.
    uploads_read: bool,
}

impl Guard {
    pub fn start(
        config: Config,
        show: Show,
        docker: DockerHandle,
        queue: SnapshotQueue,
        drills: Option<DrillQueue>,
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
            show,
            docker,
            queue,
            drills,
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
            uploads_read: false,
        };
        // Read once: the upgrade-path table's CPU rows (the policy reads no file).
        guard.policy.set_host_cpu(crate::paths::Cpu::host());
        guard.refresh_disk();
        guard.publish();
        tokio::spawn(guard.run(rx));
        GuardHandle { tx }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        // The upload activity for `status` and the notifications: one cheap read a minute.
        let mut uploads = tokio::time::interval(crate::uploads::REFRESH);
        uploads.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = uploads.tick() => {
                    self.read_uploads();
                    continue;
                }
            };
            // The first reading as soon as there is a database to read.
            let found = matches!(event, Event::Discovered { .. });
            self.handle(event).await;
            if found && !self.uploads_read {
                self.read_uploads();
            }
        }
    }

    /// Reads the upload activity in a task of its own (a database that does not answer
    /// never delays a pause); the reading comes back as `Event::Uploads`.
    fn read_uploads(&mut self) {
        let Some(stack) = &self.policy.stack else {
            return;
        };
        self.uploads_read = true;
        let access = stack.db.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let seen = match access {
                Some(access) => crate::uploads::read(&access).await,
                None => crate::uploads::RecentUploads::unknown(
                    "no database found in the stack",
                    Utc::now(),
                ),
            };
            let _ = tx.send(Input::Result(Event::Uploads(Box::new(seen))));
        });
    }

    /// An input as the policy takes it: a reply channel becomes an ID.
    fn event_of(&mut self, input: Input) -> Event {
        match input {
            Input::Started(e) => Event::Started(e),
            Input::Image { reference } => Event::Image { reference },
            // A writer paused by a snapshot's point in time is running as far as
            // protection is concerned: not a foreign pause (snapshot/pause.rs).
            Input::Discovered { stack, listed_at } => Event::Discovered {
                stack: Box::new(crate::snapshot::pause::as_running(*stack)),
                listed_at,
            },
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
                        self.bundles
                            .insert(incident.id.clone(), (path, evidence.secrets.clone()));
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
                if let Some((path, secrets)) = self.bundles.remove(&incident.id) {
                    let _ = crate::durable::replace_synced(
                        &path.join(crate::incident::INCIDENT_FILE),
                        &crate::incident::incident_json(&incident, &secrets),
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
            Effect::RequestSnapshot {
                request,
                drill_first,
            } => {
                // The scratch database starts beside the dump and storage: only the replay
                // and the checks come after the seal.
                let drills = self.drills.clone().filter(|_| drill_first);
                let prepared = drills
                    .as_ref()
                    .and_then(|d| d.prepare(request.stack.as_ref(), &request.trigger));
                let mut events = self.queue.request(*request).await;
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let progress = |line: String| {
                        let _ = tx.send(Input::Result(Event::SnapshotProgress(line)));
                    };
                    while let Some(event) = events.recv().await {
                        let result = match event {
                            SnapshotEvent::Progress(p) => {
                                progress(p.text().to_string());
                                continue;
                            }
                            SnapshotEvent::Sealed(meta) => match &drills {
                                Some(drills) => {
                                    drill_before_release(drills, *meta, prepared, &progress).await
                                }
                                None => Event::SnapshotSealed {
                                    id: meta.id,
                                    version: meta.version,
                                },
                            },
                            SnapshotEvent::Failed(failure) => Event::SnapshotFailed(failure),
                        };
                        let _ = tx.send(Input::Result(result));
                        return;
                    }
                    let _ = tx.send(Input::Result(Event::SnapshotFailed(
                        crate::snapshot::SnapshotFailure::lasting("the snapshot worker stopped"),
                    )));
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
                (self.show)(Shown::Stack(&stack));
                None
            }
            Effect::ShowRestoring(line) => {
                (self.show)(Shown::Restoring(line));
                None
            }
            Effect::ShowIncomplete(line) => {
                (self.show)(Shown::Incomplete(line));
                None
            }
            Effect::AskUploads => {
                if self.policy.stack.is_some() {
                    self.read_uploads();
                    None
                } else {
                    Some(Event::Uploads(Box::new(
                        crate::uploads::RecentUploads::unknown("no stack found yet", Utc::now()),
                    )))
                }
            }
            Effect::ShowUploads(seen) => {
                (self.show)(Shown::Uploads(&seen));
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
        (self.show)(Shown::Protection(&view));
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
/// The sealed protective snapshot's drill (`snapshots.drill = "before-release"`): sealed for
/// the policy once it passed (or passed before: an unchanged state already drilled), else
/// `DrillFailed` with the first error.
async fn drill_before_release(
    drills: &DrillQueue,
    meta: crate::snapshot::store::Meta,
    prepared: Option<crate::drill::queue::Prepared>,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Event {
    let sealed = |meta: crate::snapshot::store::Meta| Event::SnapshotSealed {
        id: meta.id,
        version: meta.version,
    };
    if meta.drill_passed() {
        progress(format!("{} passed its restore drill already", meta.id));
        return sealed(meta);
    }
    progress(format!(
        "drilling {}: replaying its dump into a scratch database",
        meta.id
    ));
    let (notes_tx, mut notes) = mpsc::unbounded_channel();
    let result = {
        let drill = drills.drill(&meta.id, prepared, Some(notes_tx));
        tokio::pin!(drill);
        loop {
            tokio::select! {
                result = &mut drill => break result,
                Some(line) = notes.recv() => progress(format!("drill: {line}")),
            }
        }
    };
    match result {
        Ok(r) if r.passed => sealed(meta),
        Ok(r) => Event::DrillFailed {
            id: meta.id,
            version: meta.version,
            error: r.first_error.unwrap_or_else(|| "unknown".into()),
        },
        Err(error) => Event::DrillFailed {
            id: meta.id,
            version: meta.version,
            error,
        },
    }
}

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

#[cfg(test)]
mod tests {
    //! The driver end to end without Docker: inputs through the handle, `status` and
    //! `protection.json` out (the decisions themselves are policy/tests.rs).

    use std::path::Path;

    use chrono::Utc;

    use std::sync::Arc;

    use tokio::sync::watch;

    use super::*;
    use crate::protect::persist::tests::with_baseline;
    use crate::protect::persist::{load, save};
    use crate::protect::policy::tests::running;
    use crate::protect::state::{Frozen, Hold, HoldKind, ProtectState};
    use crate::status::DaemonState;

    /// A guard without Docker, fed discoveries by hand.
    struct Fed {
        guard: GuardHandle,
        state: watch::Receiver<DaemonState>,
        /// Publishes the stack as the daemon's discovery does.
        publish: Arc<watch::Sender<DaemonState>>,
        file: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Fed {
        fn start(dir: tempfile::TempDir) -> Fed {
            Fed::with(dir, Config::default(), false)
        }

        /// `stalled`: every snapshot runs and never finishes.
        fn with(dir: tempfile::TempDir, mut config: Config, stalled: bool) -> Fed {
            config.daemon.data_dir = dir.path().to_path_buf();
            let (tx, state) = watch::channel(DaemonState::new("unix:///nowhere".into()));
            let tx = Arc::new(tx);
            let (_, docker) = watch::channel(None);
            let queue = if stalled {
                SnapshotQueue::stalled()
            } else {
                crate::daemon::start_snapshot_queue(
                    config.clone(),
                    docker.clone(),
                    tx.clone(),
                    Notifier::new(&config.notify),
                )
            };
            let notifier = Notifier::new(&config.notify);
            let guard = Guard::start(
                config,
                crate::daemon::show_in_status(tx.clone()),
                docker,
                queue,
                None,
                notifier,
            );
            Fed {
                guard,
                state,
                publish: tx,
                file: dir.path().join(STATE_FILE),
                _dir: dir,
            }
        }

        /// Discovery found `stack`; returns the baseline published for it.
        async fn found(&mut self, stack: Stack) -> Option<String> {
            let project = stack.project.clone();
            self.publish.send_modify(|s| {
                s.stack = Some(stack.clone());
                s.docker.reachable = true;
            });
            self.guard.send(Input::Discovered {
                stack: Box::new(stack),
                listed_at: Utc::now(),
            });
            let s = tokio::time::timeout(
                Duration::from_secs(5),
                self.state
                    .wait_for(|s| s.protection.project.as_deref() == Some(project.as_str())),
            )
            .await
            .expect("the guard takes the project's state")
            .unwrap()
            .protection
            .clone();
            s.baseline.map(|b| b.version)
        }
    }

    /// Waits until the published state satisfies `ok`.
    async fn until(fed: &Fed, what: &str, ok: impl Fn(&DaemonState) -> bool) -> DaemonState {
        let mut rx = fed.state.clone();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| ok(s)))
            .await
            .unwrap_or_else(|_| panic!("{what}: {:#?}", fed.state.borrow().protection))
            .unwrap()
            .clone()
    }

    /// A compose dir whose server image follows `.env`, as Immich's own compose file does.
    fn compose_dir(env_version: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("docker-compose.yml"),
            "services:\n  immich-server:\n    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}\n",
        )
        .unwrap();
        write_env(dir.path(), env_version);
        dir
    }

    /// Writes `.env` as editors do: a new file renamed over the old one.
    fn write_env(dir: &Path, version: &str) {
        std::fs::write(dir.join(".env.new"), format!("IMMICH_VERSION={version}\n")).unwrap();
        std::fs::rename(dir.join(".env.new"), dir.join(".env")).unwrap();
    }

    /// `running(...)` with its compose files in `dir` and `.env` naming `env_version`.
    fn composed(dir: &Path, version: &str, env_version: &str) -> Stack {
        Stack {
            compose_dir: Some(dir.to_path_buf()),
            compose_files: vec![dir.join("docker-compose.yml")],
            env_file: Some(dir.join(".env")),
            env_version: Some(env_version.into()),
            ..running("a", version, "ca")
        }
    }

    fn status_text(s: &DaemonState) -> String {
        crate::render::status(&crate::status::StatusReport::from_state(s))
    }

    #[tokio::test]
    async fn held_quotes_the_newest_failure_after_a_release_fails_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = with_baseline("a", "v1.119.0");
        p.hold = Some(Hold {
            kind: HoldKind::SnapshotFailed,
            container: "cb".into(),
            container_name: "a_server_new".into(),
            image_id: "sha256:v1.120.0".into(),
            version: "v1.120.0".into(),
            paused: true,
            reason: "the snapshot before starting v1.120.0 failed: disk full".to_string(),
            hint: "fix it".into(),
            since: Utc::now(),
        });
        let file = StateFile {
            projects: [("a".to_string(), p)].into(),
            ..StateFile::default()
        };
        save(&dir.path().join(STATE_FILE), &file).unwrap();
        let mut fed = Fed::start(dir);
        fed.found(running("a", "v1.119.0", "ca")).await;
        assert!(status_text(&fed.state.borrow()).contains("disk full"));
        // The retried snapshot fails for another reason (no Docker here).
        let err = fed.guard.release(false, None).await.unwrap_err();
        assert!(err.contains("Docker is unreachable"), "{err}");
        let s = until(&fed, "the new reason", |s| {
            s.protection
                .hold
                .as_ref()
                .is_some_and(|h| h.reason.contains("Docker is unreachable"))
        })
        .await;
        let text = status_text(&s);
        let held = text.lines().find(|l| l.starts_with("HELD:")).unwrap();
        assert!(held.contains("Docker is unreachable"), "{held}");
        assert!(!held.contains("disk full"), "{held}");
        assert!(s.status_line().contains("Docker is unreachable"));
        // And it is what a restart resumes.
        let saved = load(&fed.file, None).unwrap();
        assert!(
            saved.projects["a"]
                .hold
                .as_ref()
                .unwrap()
                .reason
                .contains("Docker is unreachable")
        );
    }

    #[tokio::test]
    async fn the_env_version_follows_edits_and_setting_it_back_drops_the_pending_change() {
        let compose = compose_dir("v1.120.0");
        let mut fed = Fed::start(tempfile::tempdir().unwrap());
        // The daemon (re)starts with `.env` ahead of the database: a change in progress.
        fed.found(composed(compose.path(), "v1.119.0", "v1.120.0"))
            .await;
        let s = until(&fed, "the startup change", |s| {
            s.protection
                .pending
                .as_ref()
                .is_some_and(|p| p.source == crate::protect::ChangeSource::StartupReconcile)
        })
        .await;
        assert!(status_text(&s).contains(".env version:     v1.120.0"));
        // The admin sets it back: status follows, and nothing is pending any more.
        write_env(compose.path(), "v1.119.0");
        let s = until(&fed, "the edit", |s| {
            s.stack.as_ref().unwrap().env_version.as_deref() == Some("v1.119.0")
        })
        .await;
        assert!(status_text(&s).contains(".env version:     v1.119.0"));
        let s = until(&fed, "no pending change", |s| {
            s.protection.pending.is_none()
        })
        .await;
        assert!(!status_text(&s).contains("pending change"));
        // Another edit is followed too, and is a change again.
        write_env(compose.path(), "v1.121.0");
        let s = until(&fed, "the next edit", |s| {
            s.protection
                .pending
                .as_ref()
                .is_some_and(|p| p.to == "v1.121.0")
        })
        .await;
        assert!(status_text(&s).contains(".env version:     v1.121.0"));
    }

    #[tokio::test]
    async fn a_deleted_env_is_reported_and_never_read_as_a_change_to_release() {
        let compose = compose_dir("v1.119.0");
        let mut fed = Fed::start(tempfile::tempdir().unwrap());
        fed.found(composed(compose.path(), "v1.119.0", "v1.119.0"))
            .await;
        std::fs::remove_file(compose.path().join(".env")).unwrap();
        let s = until(&fed, "the missing .env", |s| {
            s.stack
                .as_ref()
                .unwrap()
                .notes
                .iter()
                .any(|n| n.contains("is missing"))
        })
        .await;
        let text = status_text(&s);
        assert!(text.contains(".env is missing"), "{text}");
        assert!(!text.contains(".env version:"), "{text}");
        assert!(s.protection.pending.is_none(), "{:?}", s.protection.pending);
        // A compose edit meanwhile is not read as `release` either.
        std::fs::write(
            compose.path().join("docker-compose.yml"),
            "services:\n  immich-server:\n    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}\n    restart: always\n",
        )
        .unwrap();
        tokio::time::sleep(COMPOSE_DEBOUNCE * 4).await;
        assert!(fed.state.borrow().protection.pending.is_none());
        // Back: the warning goes, and the same version is no change.
        write_env(compose.path(), "v1.119.0");
        let s = until(&fed, "the .env back", |s| {
            s.stack.as_ref().unwrap().env_version.as_deref() == Some("v1.119.0")
        })
        .await;
        assert!(!status_text(&s).contains("is missing"));
        assert!(s.protection.pending.is_none());
    }

    /// A state of project a with the server `cb` (v1.120.0) frozen by an earlier run.
    fn frozen_file(dir: &Path) {
        let mut p = with_baseline("a", "v1.119.0");
        p.frozen = Some(Frozen {
            container: "cb".into(),
            container_name: "a_server_new".into(),
            image_id: "sha256:v1.120.0".into(),
            version: "v1.120.0".into(),
            since: Utc::now(),
            delay_ms: 3.0,
        });
        let file = StateFile {
            projects: [("a".to_string(), p)].into(),
            ..StateFile::default()
        };
        save(&dir.join(STATE_FILE), &file).unwrap();
    }

    #[tokio::test]
    async fn a_snapshot_that_does_not_finish_says_where_it_waits_then_holds() {
        let dir = tempfile::tempdir().unwrap();
        frozen_file(dir.path());
        let mut config = Config::default();
        config.snapshots.max_wait_secs = 2;
        let mut fed = Fed::with(dir, config, true);
        fed.found(running("a", "v1.119.0", "ca")).await;
        // Frozen, and status says what it waits on and for how long.
        let s = until(&fed, "the step", |s| {
            s.protection
                .snapshot_run
                .as_ref()
                .is_some_and(|r| r.step.contains("pg_dumpall"))
        })
        .await;
        assert_eq!(s.protection.state, ProtectState::Frozen);
        let line = s.status_line();
        assert!(
            line.contains("snapshot running") && line.contains("at: dumping with pg_dumpall"),
            "{line}"
        );
        assert!(status_text(&s).contains("snapshot (pre-start) running"));
        // Past snapshots.max_wait_secs: HELD, still paused, saying why and since when.
        let s = until(&fed, "the hold", |s| s.protection.hold.is_some()).await;
        let hold = s.protection.hold.clone().unwrap();
        assert_eq!(s.protection.state, ProtectState::Held);
        assert!(s.protection.frozen.is_none());
        assert!(hold.paused);
        assert!(
            hold.reason.contains("snapshots.max_wait_secs (2 s)")
                && hold.reason.contains("at: dumping with pg_dumpall"),
            "{}",
            hold.reason
        );
        assert!(hold.hint.contains("release --force"), "{}", hold.hint);
        assert!(s.status_line().starts_with("HELD a_server_new"));
        // It is persisted as a hold, which a restart resumes.
        let saved = load(&fed.file, None).unwrap();
        assert!(saved.projects["a"].hold.is_some());
        assert!(saved.projects["a"].frozen.is_none());
    }

    /// `running(...)` whose server `container` (on `version`) is paused.
    fn paused(version: &str, container: &str) -> Stack {
        let mut stack = running("a", version, container);
        stack.server.as_mut().unwrap().state = crate::discover::ContainerState::Paused;
        stack
    }

    #[tokio::test]
    async fn a_server_paused_by_someone_else_is_reported_left_paused_and_taken_over_by_release() {
        let dir = tempfile::tempdir().unwrap();
        save(
            &dir.path().join(STATE_FILE),
            &StateFile {
                projects: [("a".to_string(), with_baseline("a", "v1.119.0"))].into(),
                ..StateFile::default()
            },
        )
        .unwrap();
        let mut fed = Fed::start(dir);
        fed.found(paused("v1.120.0", "cb")).await;
        let s = until(&fed, "paused", |s| {
            s.protection.state == ProtectState::Paused
        })
        .await;
        let line = s.status_line();
        assert!(
            line.starts_with("PAUSED a_server (v1.120.0), not by immich-guard"),
            "{line}"
        );
        assert!(status_text(&s).contains("`docker unpause a_server`"));
        assert!(s.protection.frozen.is_none() && s.protection.snapshot_run.is_none());
        // `release`: a freeze like any other (its version is not the database's): snapshot
        // first; here it fails (no Docker), so the server is HELD, still paused.
        let answer = fed.guard.release(false, None).await.unwrap();
        assert!(answer.contains("now frozen by immich-guard"), "{answer}");
        let s = until(&fed, "held", |s| s.protection.hold.is_some()).await;
        assert!(s.protection.paused_server.is_none());
        assert_eq!(s.protection.hold.unwrap().container, "cb");
    }

    #[tokio::test]
    async fn a_server_paused_by_our_own_freeze_is_snapshotted_again_at_start() {
        let dir = tempfile::tempdir().unwrap();
        frozen_file(dir.path());
        let mut fed = Fed::with(dir, Config::default(), true);
        fed.found(paused("v1.120.0", "cb")).await;
        let s = until(&fed, "the snapshot", |s| {
            s.protection.snapshot_run.is_some()
        })
        .await;
        assert_eq!(s.protection.state, ProtectState::Frozen);
        assert!(s.protection.paused_server.is_none());
        assert!(
            s.status_line()
                .starts_with("frozen a_server_new (v1.120.0)")
        );
    }

    #[tokio::test]
    async fn a_discovered_project_gets_its_own_state_and_the_others_are_kept() {
        let mut fed = Fed::start(tempfile::tempdir().unwrap());
        assert_eq!(
            fed.found(running("a", "v1.119.0", "ca")).await.as_deref(),
            Some("v1.119.0")
        );
        // b is found: its own baseline, never a's.
        assert_eq!(
            fed.found(running("b", "v1.120.0", "cb")).await.as_deref(),
            Some("v1.120.0")
        );
        let file = load(&fed.file, None).unwrap();
        assert_eq!(
            file.projects
                .iter()
                .map(|(p, s)| (p.as_str(), s.baseline.as_ref().unwrap().version.as_str()))
                .collect::<Vec<_>>(),
            [("a", "v1.119.0"), ("b", "v1.120.0")]
        );
        // a comes back: its state as it was, kept while b was protected.
        assert_eq!(
            fed.found(running("a", "v1.119.0", "ca")).await.as_deref(),
            Some("v1.119.0")
        );
    }

    #[tokio::test]
    async fn the_only_known_project_is_resumed_before_discovery_and_put_away_for_another() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile {
            projects: [("a".to_string(), with_baseline("a", "v1.119.0"))].into(),
            ..StateFile::default()
        };
        save(&dir.path().join(STATE_FILE), &file).unwrap();
        let mut fed = Fed::start(dir);
        // Held (not shown: status shows a state only with its stack) until discovery says.
        assert_eq!(fed.state.borrow().protection.project.as_deref(), Some("a"));
        assert_eq!(
            fed.found(running("b", "v1.120.0", "cb")).await.as_deref(),
            Some("v1.120.0")
        );
        let saved = load(&fed.file, None).unwrap();
        assert_eq!(
            saved.projects["a"].baseline.as_ref().unwrap().version,
            "v1.119.0"
        );
    }

    #[tokio::test]
    async fn an_old_state_is_adopted_only_by_the_stack_holding_its_containers() {
        let dir = tempfile::tempdir().unwrap();
        crate::protect::persist::tests::old_file(
            dir.path(),
            &crate::protect::persist::tests::halted_in("c-old"),
        );
        let mut fed = Fed::start(dir);
        // Another stack: fresh, the old state stays aside.
        assert_eq!(
            fed.found(running("other", "v1.120.0", "c-new"))
                .await
                .as_deref(),
            Some("v1.120.0")
        );
        assert!(fed.state.borrow().protection.halted.is_empty());
        assert!(load(&fed.file, None).unwrap().unattributed.is_some());
        // The stack whose server is the halted container: the old state is its own.
        let s = fed.found(running("mine", "v1.118.0", "c-old")).await;
        assert_eq!(s.as_deref(), Some("v1.118.0"));
        assert_eq!(fed.state.borrow().protection.halted.len(), 1);
        let file = load(&fed.file, None).unwrap();
        assert!(file.unattributed.is_none());
        assert_eq!(file.projects["mine"].halted[0].container, "c-old");
    }

    /// A verify report for project `a` with the asset count at `assets` against 40,000.
    fn report_for_a(assets: i64) -> crate::verify::Report {
        use crate::verify::{Check, Outcome};
        let outcome = if assets >= 40_000 {
            Outcome::Pass
        } else {
            Outcome::Fail
        };
        crate::verify::Report {
            project: "a".into(),
            against: Some("s-pre".into()),
            baseline_note: String::new(),
            expected_version: Some("v1.120.0".into()),
            server_url: None,
            at: Utc::now(),
            passed: outcome == Outcome::Pass,
            checks: vec![Check {
                name: "assets".into(),
                outcome,
                detail: format!("{assets} now, 40000 in the snapshot"),
            }],
            not_restored: None,
        }
    }

    #[tokio::test]
    async fn a_failed_verify_is_degraded_persisted_and_cleared_by_ack() {
        let mut fed = Fed::start(tempfile::tempdir().unwrap());
        fed.found(running("a", "v1.120.0", "ca")).await;
        let due = crate::post_upgrade::VerifyDue {
            from: "v1.119.0".into(),
            to: "v1.120.0".into(),
            snapshot: Some("s-pre".into()),
            not_before: Utc::now(),
            reason: "upgrade settled".into(),
        };
        fed.guard.send(Input::Result(Event::Verified {
            due: due.clone(),
            report: Box::new(report_for_a(0)),
            server: Some("ca".into()),
        }));
        let wait = |state: ProtectState| {
            let mut rx = fed.state.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    rx.wait_for(|s| s.protection.state == state),
                )
                .await
                .expect("the state")
                .unwrap()
                .protection
                .clone()
            }
        };
        let p = wait(ProtectState::Degraded).await;
        assert_eq!(
            p.verifies.degraded.as_ref().unwrap().snapshot.as_deref(),
            Some("s-pre")
        );
        let saved = load(&fed.file, None).unwrap();
        assert!(saved.projects["a"].verifies.degraded.is_some());
        assert_eq!(saved.projects["a"].state, ProtectState::Degraded);

        assert!(
            fed.guard
                .ack()
                .await
                .unwrap()
                .contains("v1.119.0 → v1.120.0")
        );
        let p = wait(ProtectState::Idle).await;
        assert!(p.verifies.degraded.is_none());
        assert!(!p.verifies.last.unwrap().passed);
        assert!(fed.guard.ack().await.unwrap_err().contains("not DEGRADED"));

        // Degraded again, then a later verify passes: cleared.
        fed.guard.send(Input::Result(Event::Verified {
            due: due.clone(),
            report: Box::new(report_for_a(0)),
            server: Some("ca".into()),
        }));
        wait(ProtectState::Degraded).await;
        fed.guard.send(Input::Result(Event::Verified {
            due,
            report: Box::new(report_for_a(40_001)),
            server: Some("ca".into()),
        }));
        let p = wait(ProtectState::Idle).await;
        assert!(p.verifies.last.unwrap().passed);
    }

    fn stack_on(version: &str) -> Stack {
        running("immich", version, &format!("c-{version}"))
    }

    async fn until_state(
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
        let notifier = crate::notification::Notifier::new(&config.notify);
        let queue = crate::daemon::start_snapshot_queue(
            config.clone(),
            docker.clone(),
            tx.clone(),
            notifier.clone(),
        );
        let guard = Guard::start(
            config,
            crate::daemon::show_in_status(tx),
            docker,
            queue,
            None,
            notifier,
        );
        guard.send(Input::Discovered {
            stack: Box::new(stack_on("v1.120.0")),
            listed_at: chrono::Utc::now(),
        });
        until_state(&mut state, "the v2 baseline", |s| {
            s.protection.baseline.is_some()
        })
        .await;

        guard.begin_restore("s1").await.unwrap();
        let s = until_state(&mut state, "RESTORING", |s| s.restoring.is_some()).await;
        assert_eq!(s.status_line(), "RESTORING s1: planning");
        let e = guard.begin_restore("s2").await.unwrap_err();
        assert!(e.contains("a restore of s1 is already running"), "{e}");
        let e = guard.release(false, None).await.unwrap_err();
        assert!(e.contains("a restore of s1 is running"), "{e}");
        guard.restore_progress("step 3/7 database: replaying".into());
        let s = until_state(&mut state, "the step", |s| {
            s.restoring.as_deref().is_some_and(|r| r.contains("3/7"))
        })
        .await;
        assert_eq!(
            s.status_line(),
            "RESTORING s1: step 3/7 database: replaying"
        );

        // Failed part-way: protection off, as an unfinished journal at daemon start.
        guard.end_restore(RestoreEnd::Unfinished("restore of s1 incomplete".into()));
        let s = until_state(&mut state, "NOT PROTECTING", |s| {
            s.restore_incomplete.is_some()
        })
        .await;
        assert_eq!(s.status_line(), "NOT PROTECTING: restore of s1 incomplete");
        let e = guard.ack().await.unwrap_err();
        assert!(
            e.contains("not protecting: restore of s1 incomplete"),
            "{e}"
        );
        // A refused retry leaves it unfinished (its journal is still there); the same
        // restore again may run.
        guard.begin_restore("s1").await.unwrap();
        guard.end_restore(RestoreEnd::Unfinished("restore of s1 incomplete".into()));
        let s = until_state(&mut state, "unfinished again", |s| {
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
        let s = until_state(&mut state, "the v1 baseline", |s| {
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
