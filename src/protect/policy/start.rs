//! A server starts, an image arrives, the compose config changes, discovery reports: is it
//! a version change, and may the server run (README.md "How it protects")?

use chrono::{DateTime, Utc};

use super::{
    COVER_FRESH, ContainerEvent, DELAYS_KEPT, Effect, ImageFacts, PauseOutcome, Policy, Starting,
    push_bounded,
};
use crate::compose::{ComposeEvent, ComposeView};
use crate::discover::{ContainerState, Stack};
use crate::image_ref::ImageRef;
use crate::notification::EventKind;
use crate::protect::state::{
    Baseline, ChangeSource, Frozen, Hold, HoldKind, PausedServer, Phase, ProjectState, Trigger,
    UNKNOWN, is_older, parse_version, same_version,
};

impl Policy {
    /// A start of this stack's server (or, before the first discovery, of any Immich server
    /// of the configured project).
    pub(super) fn is_server(&self, event: &ContainerEvent) -> bool {
        match &self.stack {
            Some(stack) => {
                event.project.as_deref() == Some(stack.project.as_str())
                    && match &stack.server {
                        Some(server) => event.service.as_deref() == Some(&server.service),
                        None => ImageRef::parse(&event.image).is_server(),
                    }
            }
            None => {
                ImageRef::parse(&event.image).is_server()
                    && match &self.config.stack.project {
                        Some(project) => event.project.as_deref() == Some(project.as_str()),
                        None => true,
                    }
            }
        }
    }

    /// Decide from what is known; an image nothing covers is paused before anything else.
    pub(super) fn on_start(
        &mut self,
        event: ContainerEvent,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        if !self.is_server(&event) {
            return;
        }
        if self.state.phase.gated() == Some(event.container_id.as_str()) {
            return;
        }
        let known_id = if event.image.starts_with("sha256:") {
            Some(event.image.clone())
        } else {
            self.image_ids.get(&event.image).cloned()
        };
        if let Some(id) = &known_id
            && self.starts_freely(id, now)
        {
            self.accept(id, now, out);
            return;
        }
        out.push(Effect::Pause {
            container: event.container_id.clone(),
        });
        self.starting
            .retain(|s| s.container() != event.container_id.as_str());
        self.starting.push(Starting::Pausing(event));
    }

    /// The start of `container` waiting for this result, taken out of the list.
    fn take_starting(
        &mut self,
        container: &str,
        waits: impl Fn(&Starting) -> bool,
    ) -> Option<Starting> {
        let at = self
            .starting
            .iter()
            .position(|s| s.container() == container && waits(s))?;
        Some(self.starting.remove(at))
    }

    /// The pause returned: `now` is when, so the delay is the freeze's.
    pub(super) fn on_paused(
        &mut self,
        container: String,
        outcome: PauseOutcome,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let Some(Starting::Pausing(event)) =
            self.take_starting(&container, |s| matches!(s, Starting::Pausing(_)))
        else {
            return;
        };
        let delay_ms = (now - event.at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        match &outcome {
            PauseOutcome::Gone => {
                // A start event read after the container was removed (compose v2's
                // recreate): nothing runs that could migrate; the new container's own start
                // is judged on its own.
                tracing::info!(container = %event.name, id = %event.container_id, "a started server is already gone; nothing to freeze");
                return;
            }
            PauseOutcome::Failed(e) => {
                tracing::error!(container = %event.name, error = %e, "could not pause the new server")
            }
            PauseOutcome::Paused => {
                tracing::info!(container = %event.name, delay_ms, "froze the new server");
                push_bounded(&mut self.state.freeze_delays_ms, delay_ms, DELAYS_KEPT);
            }
        }
        out.push(Effect::Inspect {
            container: container.clone(),
        });
        self.starting.push(Starting::Inspecting {
            event,
            outcome,
            delay_ms,
        });
    }

    /// What the paused server runs is known now: a downgrade, a version after all covered, or
    /// a freeze until a snapshot of the baseline is sealed.
    pub(super) fn on_inspected(
        &mut self,
        container: String,
        image: Option<ImageFacts>,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let Some(Starting::Inspecting {
            event,
            outcome,
            delay_ms,
        }) = self.take_starting(&container, |s| matches!(s, Starting::Inspecting { .. }))
        else {
            return;
        };
        let (image_id, version) = match image {
            Some(facts) => {
                let id = facts.id.clone();
                let version = facts.version.clone();
                self.learn(None, facts);
                (id, version)
            }
            None => (String::new(), UNKNOWN.to_string()),
        };
        let paused = outcome == PauseOutcome::Paused;
        tracing::info!(container = %event.name, version = %version, paused, "the new server's version");
        if let Some(baseline) = self.state.baseline.clone()
            && is_older(&version, &baseline.version)
            && self.rollback_pinned(&version).is_none()
        {
            self.hold_downgrade(&event, &version, &image_id, &baseline, paused, now, out);
            return;
        }
        // Immich's upgrade paths: a version a hold row forbids is held before it migrates.
        let holds = self.path_holds(&version);
        if !holds.is_empty() {
            self.hold_path(&event, &version, &image_id, paused, &holds, now, out);
            return;
        }
        if self
            .state
            .phase
            .hold()
            .is_some_and(|h| h.kind == HoldKind::UpgradePath)
        {
            // The held version was replaced by one the table allows (the way through was
            // taken): this start is judged on its own.
            tracing::info!(version = %version, "a version the upgrade paths allow replaces the held one");
            self.state.phase.open();
        }
        if self.starts_freely(&image_id, now) {
            // Known after all (a tag the cache had not seen): let it go at once.
            if paused {
                out.push(Effect::Unpause {
                    container: event.container_id.clone(),
                });
            }
            self.accept(&image_id, now, out);
            return;
        }
        if !paused {
            // Could not freeze it: stop it rather than let it migrate unprotected.
            tracing::warn!(container = %event.name, "stopping the new server instead");
            out.push(Effect::Stop {
                container: event.container_id.clone(),
            });
        }
        let frozen = Frozen {
            container: event.container_id.clone(),
            container_name: event.name.clone(),
            image_id: image_id.clone(),
            version: version.clone(),
            since: now,
            delay_ms,
        };
        let run = self.state.phase.run().cloned();
        self.state.phase = match std::mem::replace(&mut self.state.phase, Phase::Idle) {
            // A hold stays a hold: it moves to the container that runs now (recreated).
            Phase::Held { hold, run } => Phase::Held {
                hold: Hold {
                    container: frozen.container.clone(),
                    container_name: frozen.container_name.clone(),
                    image_id: frozen.image_id.clone(),
                    version: frozen.version.clone(),
                    paused,
                    ..hold
                },
                run,
            },
            _ => Phase::Frozen {
                server: frozen,
                run,
            },
        };
        let pending_matches = self.state.pending.as_ref().is_some_and(|p| {
            p.to_image.as_deref() == Some(&image_id) || same_version(&p.to, &version)
        });
        if !pending_matches {
            self.state.pending =
                Some(self.new_pending(&version, Some(image_id), ChangeSource::ServerStart, now));
        }
        let from = self.baseline_version();
        let from = from.as_deref().unwrap_or(UNKNOWN);
        out.push(self.notify(
            EventKind::Frozen,
            format!("Froze Immich {version} until a snapshot of {from} is sealed"),
            format!(
                "{} started on {version} {delay_ms:.1} ms ago with no sealed snapshot of {from} covering the change; it is paused until one is sealed.",
                event.name
            ),
            now,
        ));
        // A hold stays a hold (its own `release` retries the snapshot). Before the first
        // discovery the queue waits for the stack discovery publishes.
        if matches!(self.state.phase, Phase::Frozen { .. }) {
            self.request_snapshot(Trigger::PreStart, now, out);
        }
        out.push(Effect::Publish);
    }

    /// A server on this image may start without a snapshot: the database already ran with it,
    /// or a snapshot sealed for this very change covers it.
    pub(super) fn starts_freely(&self, image_id: &str, now: DateTime<Utc>) -> bool {
        if matches!(self.state.phase, Phase::Held { .. }) {
            return false;
        }
        if let Some(b) = &self.state.baseline {
            if b.image_id == image_id {
                return true;
            }
            // A version Immich's upgrade paths forbid is held at its start, never let through.
            if self
                .versions
                .get(image_id)
                .is_some_and(|v| !self.path_holds(v).is_empty())
            {
                return false;
            }
            // A downgrade is never covered (the old version cannot run on a newer schema),
            // unless `immich-guard pin` judged and recorded this very rollback.
            if self
                .versions
                .get(image_id)
                .is_none_or(|v| is_older(v, &b.version) && self.rollback_pinned(v).is_none())
            {
                return false;
            }
        }
        self.covered_now(now)
    }

    /// A snapshot sealed for the pending change, recently enough that the database is still
    /// as it was (the old server stops within minutes of a pull in every upgrade path).
    fn covered_now(&self, now: DateTime<Utc>) -> bool {
        self.state
            .pending
            .as_ref()
            .and_then(|p| p.sealed_at)
            .is_some_and(|at| now - at < COVER_FRESH)
    }

    /// The server runs `image_id` from now on: it is the new baseline.
    pub(super) fn accept(&mut self, image_id: &str, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        let version = self
            .versions
            .get(image_id)
            .cloned()
            .unwrap_or_else(|| crate::discover::short_id(image_id).to_string());
        let changed = self
            .state
            .baseline
            .as_ref()
            .is_none_or(|b| b.image_id != image_id);
        if changed {
            tracing::info!(version = %version, image = %crate::discover::short_id(image_id), "the server runs a new version; it is the new baseline");
            self.set_baseline(
                Baseline {
                    version,
                    image_id: image_id.to_string(),
                },
                now,
            );
            self.change_made(now);
        }
        out.push(Effect::Publish);
    }

    /// Remembers an image's ID and version, under `reference` and every tag.
    fn learn(&mut self, reference: Option<&str>, facts: ImageFacts) {
        for tag in facts.tags {
            self.image_ids.insert(tag, facts.id.clone());
        }
        if let Some(r) = reference {
            self.image_ids.insert(r.to_string(), facts.id.clone());
        }
        self.versions.insert(facts.id, facts.version);
    }

    /// Whether `reference` is an image this stack's server runs or its compose config names:
    /// another project's images, or other tags of the repo, are none of our business.
    fn is_our_server_image(&self, reference: &str) -> bool {
        let normal = |r: &str| ImageRef::parse(r).normalized();
        let reference = normal(reference);
        let running = self
            .stack
            .as_ref()
            .and_then(|s| s.server.as_ref())
            .map(|s| s.image.as_str());
        let configured = self
            .compose_view
            .as_ref()
            .and_then(|v| v.server_image.as_deref());
        running
            .into_iter()
            .chain(configured)
            .any(|r| normal(r) == reference)
    }

    pub(super) fn on_image(&mut self, reference: String, out: &mut Vec<Effect>) {
        if self.is_our_server_image(&reference) {
            out.push(Effect::InspectImage { reference });
        }
    }

    pub(super) fn on_image_inspected(
        &mut self,
        reference: String,
        image: Option<ImageFacts>,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let Some(facts) = image else { return };
        let (id, version) = (facts.id.clone(), facts.version.clone());
        self.learn(Some(&reference), facts);
        let Some(baseline) = self.state.baseline.clone() else {
            return;
        };
        if baseline.image_id == id {
            return;
        }
        if let Some(p) = &mut self.state.pending
            && now - p.detected_at < COVER_FRESH
        {
            // The change is already known (`.env` first, then the pull): same snapshot,
            // unless the one for it failed.
            p.to = version;
            p.to_image = Some(id);
            if p.snapshot.is_none() {
                self.request_snapshot(Trigger::PreUpdate, now, out);
            }
            self.note_paths(now, out);
            out.push(Effect::Publish);
            return;
        }
        tracing::info!(image = %reference, version = %version, "a new Immich server image arrived");
        self.state.pending =
            Some(self.new_pending(&version, Some(id), ChangeSource::ImagePull, now));
        self.request_snapshot(Trigger::PreUpdate, now, out);
        self.note_paths(now, out);
        out.push(Effect::Publish);
    }

    pub(super) fn on_compose(
        &mut self,
        event: ComposeEvent,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let (before, after) = match event {
            ComposeEvent::Changed { before, after } => (before, after),
            ComposeEvent::Error(message) => {
                tracing::warn!(error = %message, "cannot read the compose config");
                return;
            }
        };
        self.compose_view = Some(after.clone());
        self.show_env(&after, out);
        if after.env_missing {
            // Compose would fall back to `release`, but nobody chose that: an absent file is
            // reported, never read as a version (docs/operations.md).
            if !before.env_missing {
                tracing::warn!(
                    "the compose .env is missing; no version change is inferred from its absence"
                );
            }
            return;
        }
        let image_changed = before.server_image != after.server_image;
        let version_changed = before.immich_version != after.immich_version;
        if !image_changed && !version_changed {
            // Another line changed (DB_VECTOR_EXTENSION, a mount): the notes may differ.
            self.note_paths(now, out);
            return;
        }
        let to = after
            .immich_version
            .clone()
            .or_else(|| {
                after
                    .server_image
                    .as_deref()
                    .and_then(|i| ImageRef::parse(i).tag().map(str::to_string))
            })
            .unwrap_or_else(|| UNKNOWN.into());
        tracing::info!(
            from = ?before.immich_version,
            to = %to,
            server_image = ?after.server_image,
            "the compose config names another Immich version"
        );
        let source = if version_changed {
            ChangeSource::Env
        } else {
            ChangeSource::ComposeFile
        };
        self.note_env_change(&to, source, now, out);
    }

    /// `status` shows the `.env` version as it is now, not as the last discovery read it.
    fn show_env(&mut self, view: &ComposeView, out: &mut Vec<Effect>) {
        let Some(stack) = &mut self.stack else { return };
        stack.env_version = view.immich_version.clone();
        let note = stack
            .env_file
            .as_deref()
            .map(crate::discover::env_missing_note);
        stack.notes.retain(|n| Some(n) != note.as_ref());
        if view.env_missing
            && let Some(note) = note
        {
            stack.notes.push(note);
        }
        out.push(Effect::ShowStack(Box::new(stack.clone())));
    }

    fn note_env_change(
        &mut self,
        to: &str,
        source: ChangeSource,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let from = self.baseline_version();
        if from.as_deref().is_some_and(|f| same_version(to, f)) {
            // Set back to the version the database runs: nothing is going to change. A server
            // already frozen or held for it is another matter (it exists): that stays.
            if self.state.phase.gated().is_none()
                && let Some(p) = self.state.pending.take()
            {
                tracing::info!(change = %p.arrow(), source = %p.source, now = %to, "the compose config names the baseline version again; the pending change is dropped");
                out.push(Effect::Publish);
            }
            return;
        }
        if self
            .state
            .pending
            .as_ref()
            .is_some_and(|p| same_version(&p.to, to))
        {
            return;
        }
        self.state.pending = Some(self.new_pending(to, None, source, now));
        self.request_snapshot(Trigger::PreUpdate, now, out);
        self.note_paths(now, out);
        out.push(Effect::Publish);
    }

    pub(super) fn on_discovered(
        &mut self,
        stack: Stack,
        listed_at: DateTime<Utc>,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        self.switch_project(&stack);
        if let Some(server) = &stack.server {
            self.image_ids
                .insert(server.image.clone(), server.image_id.clone());
            if let Some(v) = &stack.version {
                self.versions.insert(v.image_id.clone(), v.name());
            }
        }
        self.watch_compose(&stack, out);
        let first = self.stack.is_none();
        self.stack = Some(stack.clone());
        let running = stack
            .server
            .as_ref()
            .filter(|s| s.state == ContainerState::Running)
            .zip(stack.version.as_ref());
        match (&self.state.baseline, running) {
            (None, Some((server, version))) => {
                tracing::info!(version = %version.name(), "baseline: the version the database runs with");
                self.set_baseline(
                    Baseline {
                        version: version.name(),
                        image_id: server.image_id.clone(),
                    },
                    now,
                );
            }
            (Some(b), Some((server, version)))
                if b.image_id != server.image_id && self.state.phase.gated().is_none() =>
            {
                if first {
                    tracing::warn!(
                        was = %b.version,
                        now = %version.name(),
                        "the server changed version while the guard was not running"
                    );
                    self.set_baseline(
                        Baseline {
                            version: version.name(),
                            image_id: server.image_id.clone(),
                        },
                        now,
                    );
                } else if !self.starts_freely(&server.image_id, now) {
                    // Its start event is still on its way (discovery ran first): act now.
                    let event = ContainerEvent {
                        container_id: server.container_id.clone(),
                        name: server.container_name.clone(),
                        image: server.image_id.clone(),
                        project: Some(stack.project.clone()),
                        service: Some(server.service.clone()),
                        at: now,
                    };
                    self.on_start(event, now, out);
                }
            }
            _ => {}
        }
        if first {
            self.resume_after_restart(&stack, now, out);
        }
        self.note_paused(&stack, now);
        self.forget_removed(&stack);
        self.reconcile_restarts(&stack, listed_at, out);
        self.settle(&stack, now, out);
        self.reverify_recreated(&stack, now);
        out.push(Effect::Publish);
    }

    /// Discovery found another project than the one whose state is held: that one's state is
    /// put away (kept for when it comes back) and the found project's own is taken, or a
    /// fresh one. It is then resumed as after a restart.
    pub(super) fn switch_project(&mut self, stack: &Stack) {
        if self.state.project.as_deref() == Some(stack.project.as_str()) {
            return;
        }
        let previous = std::mem::take(&mut self.state);
        let mut next = match self.others.projects.remove(&stack.project) {
            Some(view) => ProjectState::from_view(view),
            None => self.adopt_unattributed(stack),
        };
        match previous.project.clone() {
            Some(name) => {
                tracing::info!(from = %name, to = %stack.project, "another compose project found: its own protection state is used, the previous one's is kept");
                self.others.projects.insert(name, previous.view());
            }
            // Before the first discovery (no project known), a server start may already have
            // been frozen or held: that is this stack's.
            None => {
                if next.phase.gated().is_none() && previous.phase.gated().is_some() {
                    next.phase = previous.phase;
                    next.phase.set_run(None);
                }
                next.pending = next.pending.take().or(previous.pending);
                next.freeze_delays_ms.extend(previous.freeze_delays_ms);
                next.releases.extend(previous.releases);
            }
        }
        next.project = Some(stack.project.clone());
        next.fail_open = self.config.protect.fail_open;
        self.state = next;
        self.stack = None;
        self.refresh_snapshot_index();
    }

    /// The state of an older file (no project recorded) belongs to the stack whose containers
    /// it names; otherwise the stack starts fresh and the old state stays unattributed.
    fn adopt_unattributed(&mut self, stack: &Stack) -> ProjectState {
        let ours = self.others.unattributed.as_ref().is_some_and(|old| {
            old.containers()
                .any(|c| stack.services().any(|s| s.container_id == c))
        });
        match self.others.unattributed.take_if(|_| ours) {
            Some(old) => {
                tracing::info!(project = %stack.project, "the protection state of an older version names this stack's containers: it is this stack's");
                ProjectState::from_view(old)
            }
            None => ProjectState::fresh(&stack.project),
        }
    }

    /// After a daemon restart: a freeze left half-done is finished, and a `.env` that names
    /// another version than the database runs is a change in progress.
    fn resume_after_restart(&mut self, stack: &Stack, now: DateTime<Utc>, out: &mut Vec<Effect>) {
        if let Some(frozen) = self.state.phase.frozen() {
            tracing::warn!(container = %frozen.container_name, "a freeze is waiting for its snapshot; taking it now");
            self.request_snapshot(Trigger::PreStart, now, out);
            return;
        }
        if let Some(env) = &stack.env_version
            && parse_version(env).is_some()
            && self
                .baseline_version()
                .is_none_or(|b| !same_version(env, &b))
            && !matches!(self.state.phase, Phase::Held { .. })
        {
            let env = env.clone();
            self.note_env_change(&env, ChangeSource::StartupReconcile, now, out);
        }
    }

    /// A server paused that no freeze or hold of ours names is reported, never unpaused
    /// silently (docs/operations.md "A server paused at start"); `release` takes it over.
    fn note_paused(&mut self, stack: &Stack, now: DateTime<Utc>) {
        let paused = stack.server.as_ref().filter(|s| {
            s.state == ContainerState::Paused
                && self.state.phase.gated() != Some(s.container_id.as_str())
        });
        let Some(server) = paused else {
            if let Some(was) = self.state.phase.paused().cloned() {
                tracing::info!(container = %was.container_name, "the paused server is no longer paused");
                self.state.phase.open();
            }
            return;
        };
        if self
            .state
            .phase
            .paused()
            .is_some_and(|p| p.container == server.container_id)
        {
            return;
        }
        if self.state.phase.gated().is_some() {
            // A freeze or hold of ours stands: it is what status must show.
            return;
        }
        let version = stack
            .version
            .as_ref()
            .map(|v| v.name())
            .unwrap_or_else(|| UNKNOWN.into());
        tracing::warn!(container = %server.container_name, version = %version, "the server is paused and no freeze of immich-guard is recorded for it; left paused: `immich-guard release` snapshots if needed and unpauses it");
        let run = self.state.phase.run().cloned();
        self.state.phase = Phase::Paused {
            server: PausedServer {
                container: server.container_id.clone(),
                container_name: server.container_name.clone(),
                image_id: server.image_id.clone(),
                version,
                seen_at: now,
            },
            run,
        };
    }

    pub(super) fn watch_compose(&mut self, stack: &Stack, out: &mut Vec<Effect>) {
        let Some(dir) = stack.compose_dir.clone() else {
            return;
        };
        if self.compose_dir.as_ref() == Some(&dir) {
            return;
        }
        self.compose_dir = Some(dir.clone());
        out.push(Effect::WatchCompose {
            dir,
            files: stack.compose_files.clone(),
            env_file: stack.env_file.clone(),
        });
    }

    /// A container that was removed (recreated by `docker compose up -d`, with its compose
    /// restart policy) is no longer halted nor being stopped.
    fn forget_removed(&mut self, stack: &Stack) {
        let present: Vec<&str> = stack.services().map(|s| s.container_id.as_str()).collect();
        self.stopping.retain(|id| present.contains(&id.as_str()));
        self.state.halted.retain(|h| {
            let kept = present.contains(&h.container.as_str());
            if !kept {
                tracing::info!(service = %h.service, "the halted container was removed or recreated; no longer halted");
            }
            kept
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn hold_downgrade(
        &mut self,
        event: &ContainerEvent,
        version: &str,
        image_id: &str,
        baseline: &Baseline,
        paused: bool,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        if !paused {
            out.push(Effect::Stop {
                container: event.container_id.clone(),
            });
        }
        let run = self.state.phase.run().cloned();
        self.state.phase = Phase::Held {
            hold: Hold {
                kind: HoldKind::Downgrade,
                container: event.container_id.clone(),
                container_name: event.name.clone(),
                image_id: image_id.to_string(),
                version: version.into(),
                paused,
                reason: format!(
                    "refused downgrade: the database was migrated by {}, and {version} cannot run on it",
                    baseline.version
                ),
                hint: String::new(),
                since: now,
            },
            run,
        };
        // The hint says what `pin` would: it needs the database's migrations (asked briefly,
        // the server is paused meanwhile).
        out.push(Effect::AskMigrations {
            version: version.to_string(),
        });
    }

    /// The database's migrations for a held downgrade: the hold names the way out.
    pub(super) fn on_migrations(
        &mut self,
        version: &str,
        current: Result<Vec<String>, String>,
        now: DateTime<Utc>,
        out: &mut Vec<Effect>,
    ) {
        let verdict = crate::pin::judge(
            version,
            self.state.project.as_deref(),
            &self.disk.snapshots,
            current.as_deref().map_err(Clone::clone),
        );
        let snapshot = self
            .state
            .last_snapshot_per_version
            .iter()
            .find(|(v, _)| same_version(v, version))
            .map(|(_, id)| id.clone());
        let baseline = self.baseline_version().unwrap_or_else(|| UNKNOWN.into());
        let Phase::Held { hold, .. } = &mut self.state.phase else {
            return;
        };
        if hold.kind != HoldKind::Downgrade || hold.version != version {
            return;
        }
        hold.hint = downgrade_hint(version, &baseline, &verdict, snapshot.as_deref());
        let (reason, hint) = (hold.reason.clone(), hold.hint.clone());
        tracing::error!(reason = %reason, hint = %hint, "held the server");
        out.push(self.notify(
            EventKind::Held,
            format!("Immich downgrade to {version} held"),
            format!("{reason} {hint}"),
            now,
        ));
        out.push(Effect::Publish);
    }
}

/// The way out of a held downgrade, as the commands that apply (docs/recovery.md).
/// `snapshot`: the newest sealed one of `version`, if any.
pub(super) fn downgrade_hint(
    version: &str,
    baseline: &str,
    verdict: &crate::pin::Verdict,
    snapshot: Option<&str>,
) -> String {
    use crate::pin::Verdict;
    let forward =
        format!("fix forward: set IMMICH_VERSION={baseline} (or newer) and `docker compose up -d`");
    match verdict {
        Verdict::Allowed { .. } => format!(
            "the database holds no migration {version} lacks: `immich-guard pin {version}` records the rollback, then `immich-guard release` lets it start; or {forward}"
        ),
        Verdict::Refused { .. } => format!(
            "{}; or {forward}; `immich-guard release --force` starts {version} anyway (it cannot run on this schema)",
            verdict.describe(version)
        ),
        Verdict::Unknown { .. } => format!(
            "{}; {}{forward}, or `immich-guard release --force` to start {version} anyway (unprotected)",
            verdict.describe(version),
            snapshot
                .map(|id| format!(
                    "to go back to {version} as it was: `immich-guard restore {id}`; or "
                ))
                .unwrap_or_default()
        ),
    }
}
