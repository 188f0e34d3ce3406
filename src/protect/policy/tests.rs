//! Every protection decision as a table: events in, effects and status out, in
//! milliseconds, no Docker (docs/architecture.md "Tests"). Each Docker scenario of
//! tests/protect.rs and tests/incident.rs has its row here, with the edge cases too slow or
//! racy to stage with Docker.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};

use super::*;
use crate::compose::ComposeView;
use crate::discover::{ContainerState, Service};
use crate::protect::persist::StateFile;
use crate::protect::state::{HoldKind, ProtectState};

const V119: &str = "v1.119.0";
const V120: &str = "v1.120.0";
const V118: &str = "v1.118.0";

fn image_id(version: &str) -> String {
    format!("sha256:{version}")
}

fn service(name: &str, container: &str, image: &str, image_id: &str) -> Service {
    Service {
        service: name.into(),
        container_id: container.into(),
        container_name: format!("immich_{name}"),
        image: image.into(),
        image_id: image_id.into(),
        state: ContainerState::Running,
        restart_count: 0,
        restart_policy: "always".into(),
    }
}

/// Project `project` whose server `container` runs `version` (image `sha256:<version>`),
/// nothing else discovered.
pub(crate) fn running(project: &str, version: &str, container: &str) -> Stack {
    let image_id = format!("sha256:{version}");
    Stack {
        project: project.into(),
        compose_dir: None,
        compose_files: vec![],
        env_file: None,
        env_version: None,
        server: Some(crate::discover::Service {
            service: "immich-server".into(),
            container_id: container.into(),
            container_name: format!("{project}_server"),
            image: format!("immich-server:{version}"),
            image_id: image_id.clone(),
            state: ContainerState::Running,
            restart_count: 0,
            restart_policy: "always".into(),
        }),
        machine_learning: None,
        redis: None,
        database: None,
        upload_location: None,
        upload_mount: None,
        db_data_location: None,
        db: None,
        version: Some(crate::discover::ImmichVersion {
            tag: Some(version.into()),
            image_id,
            repo_digests: vec![],
            repo_tags: vec![],
            label: Some(version.into()),
        }),
        notes: vec![],
    }
}

/// The `immich` stack, its server `container` running `version` (the image Immich's compose
/// file names), a database beside it, its compose files in /srv/immich.
fn stack(version: &str, container: &str) -> Stack {
    let mut s = running("immich", version, container);
    let server = s.server.as_mut().unwrap();
    server.image = format!("ghcr.io/immich-app/immich-server:{version}");
    Stack {
        compose_dir: Some("/srv/immich".into()),
        compose_files: vec!["/srv/immich/docker-compose.yml".into()],
        env_file: Some("/srv/immich/.env".into()),
        env_version: Some(version.into()),
        database: Some(service("database", "db", "postgres:14", "sha256:pg")),
        ..s
    }
}

fn facts(version: &str) -> ImageFacts {
    ImageFacts {
        id: image_id(version),
        tags: vec![format!("ghcr.io/immich-app/immich-server:{version}")],
        version: version.into(),
    }
}

fn view(version: Option<&str>) -> ComposeView {
    ComposeView {
        immich_version: version.map(str::to_string),
        env_missing: false,
        server_image: Some(format!(
            "ghcr.io/immich-app/immich-server:{}",
            version.unwrap_or("release")
        )),
        ..ComposeView::default()
    }
}

/// A policy and its clock.
struct T {
    p: Policy,
    now: DateTime<Utc>,
    replies: u64,
}

impl T {
    fn new() -> T {
        T::with(Config::default(), StateFile::default())
    }

    fn with(config: Config, file: StateFile) -> T {
        T {
            p: Policy::new(config, file),
            now: Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap(),
            replies: 0,
        }
    }

    /// Protecting the `immich` stack on v1.119.0, server container `c1`.
    fn on_v119() -> T {
        let mut t = T::new();
        t.discover(stack(V119, "c1"));
        t
    }

    fn step(&mut self, e: Event) -> Vec<Effect> {
        self.now += TimeDelta::milliseconds(5);
        self.p.step(e, self.now)
    }

    fn later(&mut self, secs: i64) {
        self.now += TimeDelta::seconds(secs);
    }

    fn discover(&mut self, s: Stack) -> Vec<Effect> {
        let listed_at = self.now;
        self.step(Event::Discovered {
            stack: Box::new(s),
            listed_at,
        })
    }

    fn reply(&mut self) -> ReplyId {
        self.replies += 1;
        ReplyId(self.replies)
    }

    fn release(&mut self, force: bool) -> (ReplyId, Vec<Effect>) {
        let reply = self.reply();
        let out = self.step(Event::Release {
            force,
            service: None,
            reply,
        });
        (reply, out)
    }

    fn status(&self) -> ProtectState {
        self.p.state().summary()
    }

    fn env(&mut self, from: Option<&str>, to: Option<&str>) -> Vec<Effect> {
        self.step(Event::Compose(ComposeEvent::Changed {
            before: view(from),
            after: view(to),
        }))
    }

    fn event(&self, container: &str, image: &str) -> ContainerEvent {
        ContainerEvent {
            container_id: container.into(),
            name: format!("immich_server_{container}"),
            image: image.into(),
            project: Some("immich".into()),
            service: Some("immich-server".into()),
            at: self.now,
        }
    }

    /// A server container starts on `version` (an image the policy has not seen): the whole
    /// pause → inspect round; returns the effects after the inspect.
    fn start_unknown(&mut self, container: &str, version: &str) -> Vec<Effect> {
        let e = self.event(
            container,
            &format!("ghcr.io/immich-app/immich-server:{version}"),
        );
        let out = self.step(Event::Started(e));
        assert!(
            matches!(out.as_slice(), [Effect::Pause { container: c }] if c == container),
            "the pause comes first and alone: {out:?}"
        );
        let out = self.step(Event::Paused {
            container: container.into(),
            outcome: PauseOutcome::Paused,
        });
        assert!(
            matches!(out.as_slice(), [Effect::Inspect { .. }]),
            "{out:?}"
        );
        self.step(Event::Inspected {
            container: container.into(),
            image: Some(facts(version)),
        })
    }

    fn sealed(&mut self, version: &str) -> Vec<Effect> {
        self.step(Event::SnapshotSealed {
            id: format!("20261125T120000Z-{version}-pre"),
            version: version.into(),
        })
    }

    fn thawed(&mut self, out: &[Effect]) -> Vec<Effect> {
        let (server, why) = out
            .iter()
            .find_map(|e| match e {
                Effect::Thaw { server, why } => Some((server.clone(), why.clone())),
                _ => None,
            })
            .expect("a thaw");
        self.step(Event::Thawed {
            server,
            why,
            result: Ok("unpaused"),
            image_id: None,
        })
    }

    fn baseline(&self) -> Option<String> {
        self.p.state().baseline.as_ref().map(|b| b.version.clone())
    }

    /// A restart: the state as written, read by a new policy.
    fn restarted(&self) -> T {
        T {
            p: Policy::new(Config::default(), self.p.state_file()),
            now: self.now,
            replies: self.replies,
        }
    }
}

fn snapshot_requests(out: &[Effect]) -> Vec<String> {
    out.iter()
        .filter_map(|e| match e {
            Effect::RequestSnapshot { request: r, .. } => Some(r.trigger.clone()),
            _ => None,
        })
        .collect()
}

fn notices(out: &[Effect]) -> Vec<EventKind> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Notify(n) => Some(n.kind),
            _ => None,
        })
        .collect()
}

fn replied(out: &[Effect], to: ReplyId) -> Option<Result<String, String>> {
    out.iter().find_map(|e| match e {
        Effect::Reply { to: r, result } if *r == to => Some(result.clone()),
        _ => None,
    })
}

fn thaw_of(out: &[Effect]) -> Option<&Thaw> {
    out.iter().find_map(|e| match e {
        Effect::Thaw { why, .. } => Some(why),
        _ => None,
    })
}

// tests/protect.rs, one row each.

#[test]
fn manual_upgrade_env_then_up_is_snapshotted_before_migrations() {
    let mut t = T::on_v119();
    assert_eq!(t.baseline().as_deref(), Some(V119));
    let out = t.env(Some(V119), Some(V120));
    assert_eq!(snapshot_requests(&out), ["pre-update"]);
    let p = t.p.state().pending.clone().unwrap();
    assert_eq!((p.from.as_deref(), p.to.as_str()), (Some(V119), V120));
    assert_eq!(p.source, ChangeSource::Env);
    assert_eq!(t.status(), ProtectState::Snapshotting);
    t.sealed(V119);
    assert_eq!(t.status(), ProtectState::Idle);
    // `compose up`: the new server's image was never seen, so it is paused while it is looked
    // at, and let go at once: the sealed snapshot covers it.
    let out = t.start_unknown("c2", V120);
    assert!(matches!(out.first(), Some(Effect::Unpause { container }) if container == "c2"));
    assert!(snapshot_requests(&out).is_empty());
    assert_eq!(t.baseline().as_deref(), Some(V120));
    assert!(t.p.state().pending.is_none());
    assert_eq!(t.p.state().settling.as_ref().unwrap().change.to, V120);
}

#[test]
fn watchtower_like_recreate_is_frozen_until_the_snapshot_is_sealed() {
    let mut t = T::on_v119();
    let out = t.start_unknown("c2", V120);
    assert_eq!(t.status(), ProtectState::Frozen);
    assert_eq!(snapshot_requests(&out), ["pre-start"]);
    assert_eq!(notices(&out), [EventKind::Frozen]);
    let Effect::RequestSnapshot { request: r, .. } = out
        .iter()
        .find(|e| matches!(e, Effect::RequestSnapshot { .. }))
        .unwrap()
    else {
        unreachable!()
    };
    // The data is the baseline's, whatever server is frozen meanwhile.
    assert_eq!(r.version, Some((V119.into(), image_id(V119))));
    let p = t.p.state().pending.clone().unwrap();
    assert_eq!(p.source, ChangeSource::ServerStart);
    assert_eq!(t.p.state().freeze_delays_ms.len(), 1);
    let out = t.sealed(V119);
    assert_eq!(thaw_of(&out), Some(&Thaw::Sealed));
    assert_eq!(t.status(), ProtectState::Idle);
    t.thawed(&out);
    assert_eq!(t.baseline().as_deref(), Some(V120));
    assert!(t.p.state().settling.is_some());
}

#[test]
fn same_tag_new_image_id_is_snapshotted_on_the_pull() {
    let mut t = T::on_v119();
    let reference = format!("ghcr.io/immich-app/immich-server:{V119}");
    let out = t.step(Event::Image {
        reference: reference.clone(),
    });
    assert!(matches!(out.as_slice(), [Effect::InspectImage { .. }]));
    let out = t.step(Event::ImageInspected {
        reference,
        image: Some(ImageFacts {
            id: "sha256:rebuilt".into(),
            tags: vec![],
            version: V119.into(),
        }),
    });
    assert_eq!(snapshot_requests(&out), ["pre-update"]);
    assert_eq!(
        t.p.state().pending.as_ref().unwrap().source,
        ChangeSource::ImagePull
    );
    // Another project's image, or another tag of the repo, is none of its business.
    let out = t.step(Event::Image {
        reference: "ghcr.io/immich-app/immich-server:v9.9.9".into(),
    });
    assert!(out.is_empty());
}

#[test]
fn a_failed_snapshot_holds_the_new_server_until_released() {
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    let out = t.step(Event::SnapshotFailed(
        crate::snapshot::SnapshotFailure::lasting("pg_dumpall: connection refused"),
    ));
    assert_eq!(t.status(), ProtectState::Held);
    assert_eq!(notices(&out), [EventKind::Held]);
    let hold = t.p.state().phase.hold().unwrap().clone();
    assert_eq!(hold.kind, HoldKind::SnapshotFailed);
    assert!(
        hold.reason.contains("connection refused"),
        "{}",
        hold.reason
    );
    assert!(thaw_of(&out).is_none(), "fail closed");
    // `release` retries the snapshot; the caller waits for it.
    let (first, out) = t.release(false);
    assert_eq!(snapshot_requests(&out), ["pre-start"]);
    assert!(replied(&out, first).is_none());
    // It fails again for a new reason: the caller hears it, HELD quotes the newest reason.
    let out = t.step(Event::SnapshotFailed(
        crate::snapshot::SnapshotFailure::lasting("disk full"),
    ));
    assert_eq!(
        replied(&out, first),
        Some(Err("the snapshot failed again: disk full".into()))
    );
    let hold = t.p.state().phase.hold().unwrap().clone();
    assert!(hold.reason.contains("disk full"), "{}", hold.reason);
    assert!(!hold.reason.contains("connection refused"));
    assert_eq!(t.status(), ProtectState::Held);
    // Released again, and this time it seals: the hold ends as a release.
    let (second, _) = t.release(false);
    let out = t.sealed(V119);
    assert!(matches!(thaw_of(&out), Some(Thaw::HoldSealed { .. })));
    let out = t.thawed(&out);
    assert!(matches!(replied(&out, second), Some(Ok(m)) if m.contains("unpaused")));
    assert_eq!(t.p.state().releases.len(), 1);
    assert!(!t.p.state().releases[0].forced);
    assert_eq!(t.status(), ProtectState::Idle);
    assert_eq!(t.baseline().as_deref(), Some(V120));
}

#[test]
fn a_held_server_released_by_force_goes_without_a_snapshot() {
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    t.step(Event::SnapshotFailed(
        crate::snapshot::SnapshotFailure::lasting("boom"),
    ));
    let (reply, out) = t.release(true);
    assert!(snapshot_requests(&out).is_empty());
    assert!(matches!(thaw_of(&out), Some(Thaw::Forced { .. })));
    let out = t.thawed(&out);
    assert!(matches!(replied(&out, reply), Some(Ok(m)) if m.starts_with("forced release")));
    assert!(t.p.state().releases[0].forced);
    assert_eq!(t.status(), ProtectState::Idle);
}

fn drill_failed(error: &str) -> Event {
    Event::DrillFailed {
        id: "s1".into(),
        version: V119.into(),
        error: error.into(),
    }
}

/// Which drill a protective snapshot asks for, by `snapshots.drill`.
fn drill_first_of(out: &[Effect]) -> Vec<bool> {
    out.iter()
        .filter_map(|e| match e {
            Effect::RequestSnapshot { drill_first, .. } => Some(*drill_first),
            _ => None,
        })
        .collect()
}

#[test]
fn a_protective_snapshot_is_drilled_before_release_unless_configured_otherwise() {
    use crate::config::DrillMode;
    let mut t = T::on_v119();
    assert_eq!(drill_first_of(&t.start_unknown("c2", V120)), [true]);
    for mode in [DrillMode::AfterRelease, DrillMode::Off] {
        let mut config = Config::default();
        config.snapshots.drill = mode;
        let mut t = T::with(config, StateFile::default());
        t.discover(stack(V119, "c1"));
        assert_eq!(
            drill_first_of(&t.start_unknown("c2", V120)),
            [false],
            "{mode:?}"
        );
    }
}

#[test]
fn a_failed_drill_holds_the_new_server_like_a_failed_snapshot() {
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    let out = t.step(drill_failed("psql stopped at the first SQL error: unrecognized configuration parameter \"transaction_timeout\""));
    assert_eq!(t.status(), ProtectState::Held);
    assert_eq!(notices(&out), [EventKind::Held]);
    assert!(thaw_of(&out).is_none(), "fail closed");
    let hold = t.p.state().phase.hold().unwrap().clone();
    assert_eq!(hold.kind, HoldKind::DrillFailed);
    assert!(
        hold.reason.contains("not proven to restore"),
        "{}",
        hold.reason
    );
    assert!(
        hold.reason.contains("transaction_timeout"),
        "{}",
        hold.reason
    );
    assert!(hold.hint.contains("release --force"), "{}", hold.hint);
    // No pending change counts as covered by the drilled snapshot.
    assert!(
        t.p.state()
            .pending
            .as_ref()
            .is_some_and(|p| p.snapshot.is_none())
    );
    // `release` takes (and drills) another snapshot; failing again, the caller hears why.
    let (first, out) = t.release(false);
    assert_eq!(snapshot_requests(&out), ["pre-start"]);
    assert_eq!(drill_first_of(&out), [true]);
    let out = t.step(drill_failed("assets: 4 replayed, 10 recorded"));
    assert!(matches!(replied(&out, first), Some(Err(m)) if m.contains("assets: 4 replayed")));
    assert_eq!(notices(&out), [EventKind::Held]);
    let hold = t.p.state().phase.hold().unwrap().clone();
    assert_eq!(hold.kind, HoldKind::DrillFailed);
    assert!(hold.reason.contains("assets: 4"), "{}", hold.reason);
    // A snapshot that seals (its drill passed) ends the hold as a release.
    let (second, _) = t.release(false);
    let out = t.sealed(V119);
    assert!(matches!(thaw_of(&out), Some(Thaw::HoldSealed { .. })));
    let out = t.thawed(&out);
    assert!(matches!(replied(&out, second), Some(Ok(_))));
    assert_eq!(t.status(), ProtectState::Idle);
    assert_eq!(t.baseline().as_deref(), Some(V120));
}

#[test]
fn a_failed_drill_held_is_released_by_force_and_recorded() {
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    t.step(drill_failed("boom"));
    let (_, out) = t.release(true);
    assert!(snapshot_requests(&out).is_empty());
    assert!(matches!(thaw_of(&out), Some(Thaw::Forced { .. })));
    t.thawed(&out);
    assert!(t.p.state().releases[0].forced);
    assert_eq!(t.status(), ProtectState::Idle);
}

#[test]
fn fail_open_lets_the_server_go_when_its_drill_fails_and_says_why() {
    let mut config = Config::default();
    config.protect.fail_open = true;
    let mut t = T::with(config, StateFile::default());
    t.discover(stack(V119, "c1"));
    t.start_unknown("c2", V120);
    let out = t.step(drill_failed("dump truncated"));
    assert!(matches!(thaw_of(&out), Some(Thaw::FailOpen { .. })));
    t.thawed(&out);
    let what = &t.p.state().releases[0].what;
    assert!(
        what.starts_with(
            "fail-open (snapshot s1 sealed but its restore drill failed: dump truncated)"
        ),
        "{what}"
    );
}

#[test]
fn a_failed_drill_with_no_server_waiting_leaves_the_change_uncovered() {
    let mut t = T::on_v119();
    let out = t.env(Some(V119), Some(V120));
    assert_eq!(drill_first_of(&out), [true]);
    assert_eq!(t.status(), ProtectState::Snapshotting);
    let out = t.step(drill_failed("boom"));
    assert_eq!(notices(&out), [EventKind::SnapshotFailed]);
    assert_eq!(t.status(), ProtectState::Idle);
    assert!(
        t.p.state()
            .pending
            .as_ref()
            .is_some_and(|p| p.snapshot.is_none())
    );
}

#[test]
fn fail_open_lets_the_server_go_when_its_snapshot_fails() {
    let mut config = Config::default();
    config.protect.fail_open = true;
    let mut t = T::with(config, StateFile::default());
    t.discover(stack(V119, "c1"));
    t.start_unknown("c2", V120);
    let out = t.step(Event::SnapshotFailed(
        crate::snapshot::SnapshotFailure::lasting("boom"),
    ));
    assert!(matches!(thaw_of(&out), Some(Thaw::FailOpen { .. })));
    assert_eq!(t.status(), ProtectState::Idle);
    t.thawed(&out);
    assert!(t.p.state().releases[0].what.starts_with("fail-open"));
}

#[test]
fn a_restarted_daemon_still_protects_an_upgrade_in_progress() {
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    assert_eq!(t.status(), ProtectState::Frozen);
    // The daemon stops before the snapshot seals; the new one reads the file.
    let mut t = t.restarted();
    assert_eq!(
        t.status(),
        ProtectState::Frozen,
        "frozen, its snapshot to be taken again"
    );
    assert!(t.p.state().phase.run().is_none());
    let out = t.discover(stack(V120, "c2"));
    assert_eq!(snapshot_requests(&out), ["pre-start"]);
    let out = t.sealed(V119);
    assert_eq!(thaw_of(&out), Some(&Thaw::Sealed));
}

#[test]
fn down_edit_up_the_change_seen_while_down_is_snapshotted_before_the_start() {
    let mut t = T::on_v119();
    let mut down = stack(V119, "c1");
    down.server = None;
    t.discover(down);
    let out = t.env(Some(V119), Some(V120));
    assert_eq!(snapshot_requests(&out), ["pre-update"]);
    t.sealed(V119);
    let out = t.start_unknown("c2", V120);
    assert!(matches!(out.first(), Some(Effect::Unpause { .. })));
    assert_eq!(t.baseline().as_deref(), Some(V120));
}

#[test]
fn a_burst_of_env_edits_is_one_pending_change_and_one_snapshot() {
    let mut t = T::on_v119();
    let mut requests = Vec::new();
    let mut before = Some(V119);
    for v in [V120, V120, "v1.121.0", V120] {
        requests.extend(snapshot_requests(&t.env(before, Some(v))));
        before = Some(v);
    }
    assert_eq!(requests, ["pre-update"], "joined the running one");
    assert_eq!(t.p.state().pending.as_ref().unwrap().to, V120);
}

#[test]
fn a_server_found_paused_at_start_is_reported_and_left_paused_until_released() {
    let mut t = T::on_v119().restarted();
    let mut s = stack(V119, "c1");
    s.server.as_mut().unwrap().state = ContainerState::Paused;
    let out = t.discover(s.clone());
    assert!(
        !out.iter()
            .any(|e| matches!(e, Effect::Unpause { .. } | Effect::Thaw { .. })),
        "never unpaused silently"
    );
    assert_eq!(t.status(), ProtectState::Paused);
    // Same version as the database: `release` unpauses it.
    let (reply, out) = t.release(false);
    assert!(matches!(
        thaw_of(&out),
        Some(Thaw::ForeignPause { forced: false, .. })
    ));
    let out = t.thawed(&out);
    assert!(matches!(replied(&out, reply), Some(Ok(_))));
    assert_eq!(t.status(), ProtectState::Idle);
}

#[test]
fn a_paused_server_on_another_version_is_frozen_by_release_and_snapshotted() {
    let mut t = T::on_v119();
    let mut s = stack(V120, "c2");
    s.server.as_mut().unwrap().state = ContainerState::Paused;
    t.discover(s);
    assert_eq!(t.status(), ProtectState::Paused);
    let (reply, out) = t.release(false);
    assert!(matches!(replied(&out, reply), Some(Ok(m)) if m.contains("now frozen")));
    assert_eq!(snapshot_requests(&out), ["pre-start"]);
    assert_eq!(t.status(), ProtectState::Frozen);
}

#[test]
fn a_snapshot_stuck_behind_a_lock_becomes_a_hold_that_ends_when_it_seals() {
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    t.step(Event::SnapshotProgress("dumping with pg_dumpall".into()));
    let wait = t.p.config.snapshots.max_wait_secs as i64;
    let at = t.p.next_wakeup(t.now).unwrap();
    assert!(at > t.now && at <= t.now + TimeDelta::seconds(wait));
    t.later(wait + 1);
    let out = t.step(Event::Wakeup);
    assert_eq!(t.status(), ProtectState::Held);
    assert_eq!(notices(&out), [EventKind::Held]);
    let hold = t.p.state().phase.hold().unwrap();
    assert!(
        hold.reason.contains("max_wait_secs") && hold.reason.contains("dumping with pg_dumpall"),
        "{}",
        hold.reason
    );
    assert!(
        t.p.state().phase.run().is_some(),
        "the snapshot keeps running"
    );
    let out = t.sealed(V119);
    assert!(matches!(thaw_of(&out), Some(Thaw::HoldSealed { .. })));
}

// tests/incident.rs, one row each.

// Uploads noticed (release_ready.rs): a sealed freeze waits for quiet uploads.

/// Protecting v1.119.0 with `protect.wait_for_quiet_uploads` = 2 min, bounded at 10 min.
fn waiting_for_quiet() -> T {
    let mut config = Config::default();
    config.protect.wait_for_quiet_uploads = Some(crate::config::Minutes::from_secs(120));
    config.protect.wait_for_quiet_max_minutes = crate::config::Minutes::from_secs(600);
    let mut t = T::with(config, StateFile::default());
    t.discover(stack(V119, "c1"));
    t
}

/// A reading taken now: `n` in the window, the newest `ago` seconds ago (None: no asset).
fn uploads_read(t: &mut T, n: i64, ago: Option<i64>) -> Vec<Effect> {
    let seen = crate::uploads::RecentUploads {
        read_at: t.now,
        seen: crate::uploads::Seen::Known {
            last_10_min: n,
            newest: ago.map(|s| t.now - TimeDelta::seconds(s)),
        },
    };
    t.step(Event::Uploads(Box::new(seen)))
}

fn asks_uploads(out: &[Effect]) -> bool {
    out.iter().any(|e| matches!(e, Effect::AskUploads))
}

fn wait_of(t: &T) -> crate::protect::state::ReleaseWait {
    t.p.state()
        .view()
        .release_wait
        .expect("a release wait in the view")
}

#[test]
fn a_sealed_freeze_waits_frozen_until_uploads_stop_then_goes() {
    let mut t = waiting_for_quiet();
    uploads_read(&mut t, 4, Some(20));
    let out = t.start_unknown("c2", V120);
    // The notice of the frozen change says a phone may be backing up.
    let frozen = out
        .iter()
        .find_map(|e| match e {
            Effect::Notify(n) if n.kind == EventKind::Frozen => Some(n.message.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        frozen.contains("4 assets uploaded in the last 10 minutes; a phone may be backing up"),
        "{frozen}"
    );
    t.later(30);
    let out = t.sealed(V119);
    assert_eq!(thaw_of(&out), None, "{out:?}");
    assert!(asks_uploads(&out));
    assert_eq!(t.status(), ProtectState::Frozen);
    let sealed_at = t.now;
    // Uploads go on: it waits, and says for what and until when.
    t.later(2);
    let out = uploads_read(&mut t, 9, Some(1));
    assert_eq!(thaw_of(&out), None);
    let wait = wait_of(&t);
    assert!(
        wait.waiting_for
            .starts_with("no upload for 2 min (at the latest until 12:10:"),
        "{}",
        wait.waiting_for
    );
    assert!(
        wait.waiting_for.contains("9 assets uploaded"),
        "{}",
        wait.waiting_for
    );
    assert_eq!(wait.until, sealed_at + TimeDelta::minutes(10));
    let check = t.p.next_wakeup(t.now).unwrap();
    assert_eq!(check, wait.next_check);
    assert!(
        check > t.now + TimeDelta::seconds(100) && check <= t.now + TimeDelta::seconds(120),
        "{check}"
    );
    // Woken: the uploads are read again (never by the policy itself).
    t.now = check;
    let out = t.step(Event::Wakeup);
    assert!(asks_uploads(&out), "{out:?}");
    // Quiet for two minutes now, but the last uploads came after the snapshot began: they are
    // snapshotted again before the server goes.
    let out = uploads_read(&mut t, 9, Some(121));
    assert_eq!(thaw_of(&out), None);
    assert_eq!(snapshot_requests(&out), ["pre-start"]);
    assert!(wait_of(&t).waiting_for.starts_with("a new snapshot"));
    assert_eq!(
        t.p.next_wakeup(t.now),
        Some(t.now + TimeDelta::seconds(30 * 60)),
        "only the snapshot's own deadline"
    );
    let out = t.sealed(V119);
    let Some(Thaw::Waited { note, .. }) = thaw_of(&out) else {
        panic!("released after the second seal: {out:?}");
    };
    assert!(note.starts_with("no upload for 2 min; the uploads that arrived after 20261125T120000Z-v1.119.0-pre began are in 20261125T120000Z-v1.119.0-pre"), "{note}");
    let out = t.thawed(&out);
    assert_eq!(notices(&out), [EventKind::Released]);
    assert_eq!(t.baseline().as_deref(), Some(V120));
    assert!(t.p.state().view().release_wait.is_none());
    assert!(
        t.p.state()
            .releases
            .last()
            .unwrap()
            .what
            .contains("no upload for 2 min")
    );
}

#[test]
fn uploads_quiet_since_before_the_snapshot_let_the_server_go_without_another() {
    let mut t = waiting_for_quiet();
    t.start_unknown("c2", V120);
    t.later(5);
    t.sealed(V119);
    let out = uploads_read(&mut t, 0, Some(3 * 3600));
    assert!(
        matches!(thaw_of(&out), Some(Thaw::Waited { note, .. }) if note == "no upload for 2 min"),
        "{out:?}"
    );
    assert!(snapshot_requests(&out).is_empty());
    // An empty library is quiet too.
    let mut t = waiting_for_quiet();
    t.start_unknown("c2", V120);
    t.sealed(V119);
    assert!(matches!(
        thaw_of(&uploads_read(&mut t, 0, None)),
        Some(Thaw::Waited { .. })
    ));
}

#[test]
fn uploads_that_never_stop_are_waited_for_only_until_the_bound() {
    let mut t = waiting_for_quiet();
    t.start_unknown("c2", V120);
    t.sealed(V119);
    let until = wait_of(&t).until;
    while t.now < until {
        let out = uploads_read(&mut t, 30, Some(0));
        assert_eq!(thaw_of(&out), None);
        assert!(snapshot_requests(&out).is_empty());
        let at = t.p.next_wakeup(t.now).unwrap();
        assert!(at <= until, "never woken after the bound: {at}");
        t.now = at;
        assert!(asks_uploads(&t.step(Event::Wakeup)));
    }
    let out = uploads_read(&mut t, 30, Some(0));
    assert_eq!(
        snapshot_requests(&out),
        ["pre-start"],
        "what came meanwhile is snapshotted"
    );
    let out = t.sealed(V119);
    let Some(Thaw::Waited { note, .. }) = thaw_of(&out) else {
        panic!("{out:?}");
    };
    assert!(
        note.starts_with("uploads went on for the whole wait (protect.wait_for_quiet_max_minutes)"),
        "{note}"
    );
}

#[test]
fn uploads_that_cannot_be_read_keep_the_wait_until_the_bound_and_say_so() {
    let mut t = waiting_for_quiet();
    t.start_unknown("c2", V120);
    t.sealed(V119);
    let until = wait_of(&t).until;
    let unknown = |t: &mut T| {
        let seen = crate::uploads::RecentUploads::unknown("connection refused", t.now);
        t.step(Event::Uploads(Box::new(seen)))
    };
    let out = unknown(&mut t);
    assert_eq!(thaw_of(&out), None);
    assert!(
        wait_of(&t)
            .waiting_for
            .ends_with("uploads unknown (connection refused)")
    );
    assert_eq!(t.p.next_wakeup(t.now), Some(t.now + TimeDelta::seconds(30)));
    t.now = until;
    let out = unknown(&mut t);
    let Some(Thaw::Waited { note, .. }) = thaw_of(&out) else {
        panic!("{out:?}");
    };
    assert!(
        note.contains("could not be read") && note.contains("connection refused"),
        "{note}"
    );
    assert!(snapshot_requests(&out).is_empty());
}

#[test]
fn a_release_during_the_quiet_wait_lets_the_covered_server_go_unforced() {
    let mut t = waiting_for_quiet();
    t.start_unknown("c2", V120);
    t.sealed(V119);
    uploads_read(&mut t, 5, Some(1));
    let (reply, out) = t.release(false);
    let Some(Thaw::Waited { note, .. }) = thaw_of(&out) else {
        panic!("{out:?}");
    };
    assert!(
        note.starts_with("`immich-guard release` while it waited for no upload for 2 min"),
        "{note}"
    );
    let out = t.thawed(&out);
    assert!(matches!(replied(&out, reply), Some(Ok(_))), "{out:?}");
    assert!(!t.p.state().releases.last().unwrap().forced);
}

#[test]
fn a_restart_during_the_quiet_wait_snapshots_again_and_waits_again() {
    let mut t = waiting_for_quiet();
    t.start_unknown("c2", V120);
    t.sealed(V119);
    assert!(t.p.state_file().projects["immich"].release_wait.is_some());
    let mut config = Config::default();
    config.protect = t.p.config.protect.clone();
    let mut again = T::with(config, t.p.state_file());
    assert_eq!(again.status(), ProtectState::Frozen);
    assert!(again.p.state().view().release_wait.is_none());
    let out = again.discover(stack(V119, "c1"));
    assert_eq!(snapshot_requests(&out), ["pre-start"]);
    let out = again.sealed(V119);
    assert!(asks_uploads(&out) && thaw_of(&out).is_none());
}

/// A death of `container` with Docker's RestartCount at `count`.
fn die(t: &mut T, container: &str, service: &str, count: i64) -> Vec<Effect> {
    let e = ContainerEvent {
        service: Some(service.into()),
        ..t.event(container, "x")
    };
    let out = t.step(Event::Died(e.clone()));
    if out.is_empty() {
        return out;
    }
    assert!(
        matches!(out.as_slice(), [Effect::ReadRestartCount { .. }]),
        "{out:?}"
    );
    let read_at = t.now;
    t.step(Event::RestartCount {
        container: container.into(),
        count: Some(count),
        read_at,
        why: CountFor::Died(e),
    })
}

fn server_log(lines: &str) -> crate::incident::Evidence {
    crate::incident::Evidence {
        logs: vec![("immich-server".into(), lines.into())],
        inspect: vec![],
        exits: vec![],
        secrets: Default::default(),
    }
}

/// The loop found → evidence → bundle and halt → halted: returns the incident.
fn halt_loop(
    t: &mut T,
    out: Vec<Effect>,
    evidence: crate::incident::Evidence,
) -> crate::incident::Incident {
    let [Effect::CollectEvidence(found)] = out.as_slice() else {
        panic!("evidence first: {out:?}");
    };
    let out = t.step(Event::Evidence {
        found: found.clone(),
        evidence: Box::new(evidence),
        facts: None,
        incident_id: "20261125T120000Z-immich-server".into(),
    });
    let [
        Effect::WriteIncident { .. },
        Effect::Halt { incident, targets },
    ] = out.as_slice()
    else {
        panic!("the bundle, then the halt: {out:?}");
    };
    let results = targets
        .iter()
        .map(|t| (t.clone(), Ok("always".to_string())))
        .collect();
    let out = t.step(Event::Halted {
        incident: incident.clone(),
        results,
    });
    assert!(matches!(out.first(), Some(Effect::FinishIncident { .. })));
    assert_eq!(notices(&out), [EventKind::CrashLoop]);
    t.p.state().incident.clone().unwrap()
}

#[test]
fn a_server_crash_looping_at_boot_is_halted_with_an_incident_bundle() {
    let mut t = T::on_v119();
    assert!(die(&mut t, "c1", "immich-server", 1).is_empty());
    t.later(5);
    assert!(die(&mut t, "c1", "immich-server", 2).is_empty());
    t.later(5);
    let out = die(&mut t, "c1", "immich-server", 3);
    let incident = halt_loop(&mut t, out, server_log("Error: boom\n"));
    assert_eq!(incident.service, "immich-server");
    assert_eq!(incident.deaths, 3);
    assert_eq!(incident.halted.len(), 1);
    assert_eq!(incident.halted[0].restart_policy, "always");
    assert_eq!(t.status(), ProtectState::Halted);
    // A halted container's deaths are not counted again.
    assert!(t.step(Event::Died(t.event("c1", "x"))).is_empty());
    // `release immich-server` gives its policy back.
    let reply = t.reply();
    let out = t.step(Event::Release {
        force: false,
        service: Some("immich-server".into()),
        reply,
    });
    let [Effect::Unhalt { halted, why }] = out.as_slice() else {
        panic!("{out:?}")
    };
    let out = t.step(Event::Unhalted {
        halted: halted.clone(),
        result: Ok(()),
        why: why.clone(),
    });
    assert!(matches!(replied(&out, reply), Some(Ok(m)) if m.contains("restart policy always")));
    assert_eq!(t.status(), ProtectState::Idle);
}

#[test]
fn a_half_applied_migration_then_crash_recommends_restoring_the_pre_update_snapshot() {
    let mut t = T::on_v119();
    let mut before =
        crate::snapshot::store::tests::meta("20261125T115900Z-v1.119.0-pre-update", t.now);
    before.db.migrations = vec!["1730000000000-Init".into()];
    t.step(Event::Disk(Box::new(Disk {
        pins: Ok(vec![]),
        snapshots: vec![before],
    })));
    t.env(Some(V119), Some(V120));
    t.sealed(V119);
    t.start_unknown("c2", V120);
    for n in 1..=3 {
        t.later(3);
        let out = die(&mut t, "c2", "immich-server", n);
        if n < 3 {
            assert!(out.is_empty());
            continue;
        }
        let [Effect::CollectEvidence(found)] = out.as_slice() else {
            panic!("{out:?}")
        };
        let now_facts = crate::snapshot::db::DbFacts {
            migrations: vec![
                "1730000000000-Init".into(),
                "1731000000000-AddMemories".into(),
            ],
            ..Default::default()
        };
        let out = t.step(Event::Evidence {
            found: found.clone(),
            evidence: Box::new(server_log(
                "[Nest] 7  - 11/25/2026, 12:00:00 PM   ERROR [Api:DatabaseRepository] Kysely migrations failed: PostgresError: column \"x\" does not exist\n",
            )),
            facts: Some(Box::new(now_facts)),
            incident_id: "i".into(),
        });
        let Some(Effect::Halt { incident, .. }) = out.get(1) else {
            panic!("{out:?}")
        };
        assert_eq!(incident.baseline.as_deref(), Some(V119));
        assert_eq!(incident.pending.as_deref(), Some("v1.119.0 → v1.120.0"));
        match &incident.decision {
            crate::diagnose::Decision::Restore { snapshot, .. } => {
                assert_eq!(snapshot, "20261125T115900Z-v1.119.0-pre-update")
            }
            other => panic!("expected restore: {other:?}"),
        }
    }
}

#[test]
fn a_database_refusing_to_start_is_halted_and_the_server_with_it() {
    let mut t = T::on_v119();
    for n in 1..=2 {
        assert!(die(&mut t, "db", "database", n).is_empty());
    }
    let out = die(&mut t, "db", "database", 3);
    let [Effect::CollectEvidence(found)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert!(found.is_database);
    let out = t.step(Event::Evidence {
        found: found.clone(),
        evidence: Box::new(server_log("")),
        facts: None,
        incident_id: "i".into(),
    });
    let Some(Effect::Halt { targets, .. }) = out.get(1) else {
        panic!("{out:?}")
    };
    let halted: Vec<&str> = targets.iter().map(|t| t.service.as_str()).collect();
    assert_eq!(halted, ["database", "immich-server"]);
}

#[test]
fn a_container_that_restarts_twice_then_stays_up_is_not_halted() {
    let mut t = T::on_v119();
    assert!(die(&mut t, "c1", "immich-server", 1).is_empty());
    assert!(die(&mut t, "c1", "immich-server", 2).is_empty());
    t.later(600);
    assert!(
        die(&mut t, "c1", "immich-server", 3).is_empty(),
        "outside the window"
    );
}

#[test]
fn a_stop_by_hand_is_never_a_loop_death() {
    let mut t = T::on_v119();
    for n in 1..=5 {
        let e = t.event("c1", "x");
        t.step(Event::Killed(e));
        assert!(die(&mut t, "c1", "immich-server", n).is_empty());
        let out = t.step(Event::Started(t.event("c1", &image_id(V119))));
        assert!(out.iter().any(|e| matches!(
            e,
            Effect::ReadRestartCount {
                why: CountFor::StartedByHand,
                ..
            }
        )));
    }
}

#[test]
fn deaths_missed_while_docker_was_unreachable_are_counted_from_restart_count() {
    let mut t = T::on_v119();
    t.later(60);
    let mut s = stack(V119, "c1");
    s.server.as_mut().unwrap().restart_count = 5;
    let out = t.discover(s);
    let found = out.iter().find_map(|e| match e {
        Effect::CollectEvidence(f) => Some(f.clone()),
        _ => None,
    });
    let found = found.expect("a loop from RestartCount alone");
    assert_eq!(found.found.missed, found.found.deaths);
}

// Edge cases too slow or racy to stage with Docker.

#[test]
fn a_start_during_a_running_snapshot_is_frozen_and_released_by_that_snapshot() {
    let mut t = T::on_v119();
    assert_eq!(
        snapshot_requests(&t.env(Some(V119), Some(V120))),
        ["pre-update"]
    );
    let out = t.start_unknown("c2", V120);
    assert!(snapshot_requests(&out).is_empty(), "joins the running one");
    assert_eq!(t.status(), ProtectState::Frozen);
    let out = t.sealed(V119);
    assert_eq!(thaw_of(&out), Some(&Thaw::Sealed));
}

#[test]
fn a_release_during_a_snapshot_refuses_without_force_and_thaws_with_it() {
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    let (reply, out) = t.release(false);
    assert!(
        matches!(replied(&out, reply), Some(Err(m)) if m.contains("frozen while its snapshot runs"))
    );
    assert_eq!(t.status(), ProtectState::Frozen);
    let (reply, out) = t.release(true);
    assert!(matches!(thaw_of(&out), Some(Thaw::Forced { .. })));
    t.thawed(&out);
    // The snapshot still runs; when it seals, nothing is thawed twice.
    assert_eq!(t.status(), ProtectState::Snapshotting);
    let out = t.sealed(V119);
    assert!(thaw_of(&out).is_none());
    let _ = reply;
}

#[test]
fn a_die_while_frozen_is_no_loop_and_the_freeze_stays() {
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    // A paused container killed by `docker compose down`: a stop by hand.
    t.step(Event::Killed(t.event("c2", "x")));
    assert!(die(&mut t, "c2", "immich-server", 0).is_empty());
    assert_eq!(t.status(), ProtectState::Frozen);
}

#[test]
fn a_start_of_a_removed_container_freezes_nothing() {
    let mut t = T::on_v119();
    let e = t.event("gone", "ghcr.io/immich-app/immich-server:v1.120.0");
    t.step(Event::Started(e));
    let out = t.step(Event::Paused {
        container: "gone".into(),
        outcome: PauseOutcome::Gone,
    });
    assert!(out.is_empty());
    assert_eq!(t.status(), ProtectState::Idle);
}

#[test]
fn a_second_start_before_the_first_pause_returns_drops_neither() {
    // compose's recreate can start a new container while the first one's pause is on its
    // way; each pause result must still be inspected, or that container stays paused unjudged.
    let mut t = T::on_v119();
    let image = "ghcr.io/immich-app/immich-server:v1.120.0";
    t.step(Event::Started(t.event("c1", image)));
    let out = t.step(Event::Started(t.event("c2", image)));
    assert!(matches!(out.as_slice(), [Effect::Pause { container }] if container == "c2"));
    for c in ["c1", "c2"] {
        let out = t.step(Event::Paused {
            container: c.into(),
            outcome: PauseOutcome::Paused,
        });
        assert!(
            matches!(out.as_slice(), [Effect::Inspect { container }] if container == c),
            "{c}: {out:?}"
        );
    }
    t.step(Event::Inspected {
        container: "c1".into(),
        image: Some(facts(V120)),
    });
    t.step(Event::Inspected {
        container: "c2".into(),
        image: Some(facts(V120)),
    });
    assert_eq!(t.status(), ProtectState::Frozen);
    let out = t.sealed(V119);
    assert!(
        out.iter()
            .any(|e| matches!(e, Effect::Thaw { server, .. } if server.container == "c2")),
        "the newest container is let go once the snapshot seals: {out:?}"
    );
}

#[test]
fn a_server_that_cannot_be_paused_is_stopped() {
    let mut t = T::on_v119();
    t.step(Event::Started(
        t.event("c2", "ghcr.io/immich-app/immich-server:v1.120.0"),
    ));
    t.step(Event::Paused {
        container: "c2".into(),
        outcome: PauseOutcome::Failed("permission denied".into()),
    });
    let out = t.step(Event::Inspected {
        container: "c2".into(),
        image: Some(facts(V120)),
    });
    assert!(matches!(out.first(), Some(Effect::Stop { container }) if container == "c2"));
    assert_eq!(t.status(), ProtectState::Frozen);
    assert!(
        t.p.state().freeze_delays_ms.is_empty(),
        "no freeze delay without a pause"
    );
}

#[test]
fn a_known_image_starts_without_a_pause() {
    let mut t = T::on_v119();
    let out = t.step(Event::Started(t.event("c9", &image_id(V119))));
    assert!(!out.iter().any(|e| matches!(e, Effect::Pause { .. })));
    assert_eq!(t.status(), ProtectState::Idle);
}

#[test]
fn a_downgrade_is_held_and_a_pinned_rollback_released() {
    let mut t = T::on_v119();
    let out = t.start_unknown("c0", V118);
    assert!(matches!(out.as_slice(), [Effect::AskMigrations { version }] if version == V118));
    assert_eq!(t.status(), ProtectState::Held);
    let out = t.step(Event::Migrations {
        version: V118.into(),
        result: Err("database access unknown".into()),
    });
    assert_eq!(notices(&out), [EventKind::Held]);
    let hold = t.p.state().phase.hold().unwrap().clone();
    assert_eq!(hold.kind, HoldKind::Downgrade);
    assert!(hold.hint.contains("release --force"), "{}", hold.hint);
    let (reply, out) = t.release(false);
    assert!(matches!(replied(&out, reply), Some(Err(m)) if m.contains("refused downgrade")));
    // `immich-guard pin v1.118.0` judged and recorded the rollback since.
    t.later(10);
    let pin = crate::pin::PinRecord {
        at: t.now,
        project: "immich".into(),
        version: V118.into(),
        forced: false,
        verdict: crate::pin::Verdict::Allowed { snapshots: vec![] },
        files: vec![],
        backups: vec![],
        by: "root".into(),
    };
    t.step(Event::Disk(Box::new(Disk {
        pins: Ok(vec![pin]),
        snapshots: vec![],
    })));
    let (reply, out) = t.release(false);
    assert!(matches!(thaw_of(&out), Some(Thaw::Pinned { .. })));
    let out = t.thawed(&out);
    assert!(
        matches!(replied(&out, reply), Some(Ok(m)) if m.contains("rollback recorded by `immich-guard pin`"))
    );
    assert_eq!(t.baseline().as_deref(), Some(V118));
}

#[test]
fn setting_env_back_drops_the_pending_change_and_a_deleted_env_is_no_change() {
    let mut t = T::on_v119();
    t.env(Some(V119), Some(V120));
    t.sealed(V119);
    assert!(t.p.state().pending.is_some());
    let out = t.env(Some(V120), Some(V119));
    assert!(t.p.state().pending.is_none());
    assert!(
        out.iter()
            .any(|e| matches!(e, Effect::ShowStack(s) if s.env_version.as_deref() == Some(V119)))
    );
    // `.env` deleted: compose would fall back to `release`; nobody chose that.
    let out = t.step(Event::Compose(ComposeEvent::Changed {
        before: view(Some(V119)),
        after: ComposeView {
            env_missing: true,
            ..view(None)
        },
    }));
    assert!(snapshot_requests(&out).is_empty());
    assert!(t.p.state().pending.is_none());
    let Some(Effect::ShowStack(s)) = out.first() else {
        panic!("{out:?}")
    };
    assert!(s.notes.iter().any(|n| n.contains(".env")), "{:?}", s.notes);
}

#[test]
fn a_restart_reconciles_every_phase() {
    // Idle, with `.env` naming another version: a change in progress.
    let t = T::on_v119();
    let mut r = t.restarted();
    let mut s = stack(V119, "c1");
    s.env_version = Some(V120.into());
    let out = r.discover(s);
    assert_eq!(snapshot_requests(&out), ["pre-update"]);
    assert_eq!(
        r.p.state().pending.as_ref().unwrap().source,
        ChangeSource::StartupReconcile
    );
    // Snapshotting: no snapshot survives a restart.
    let mut t = T::on_v119();
    t.env(Some(V119), Some(V120));
    assert_eq!(t.status(), ProtectState::Snapshotting);
    let r = t.restarted();
    assert_eq!(r.status(), ProtectState::Idle);
    // Held: still held, and no snapshot asked by itself.
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    t.step(Event::SnapshotFailed(
        crate::snapshot::SnapshotFailure::lasting("boom"),
    ));
    let mut r = t.restarted();
    assert_eq!(r.status(), ProtectState::Held);
    let mut s = stack(V120, "c2");
    s.server.as_mut().unwrap().state = ContainerState::Paused;
    let out = r.discover(s);
    assert!(snapshot_requests(&out).is_empty());
    assert_eq!(r.status(), ProtectState::Held);
    // Paused by someone else: still reported; once running, no longer.
    let mut t = T::new();
    let mut s = stack(V119, "c1");
    s.server.as_mut().unwrap().state = ContainerState::Paused;
    t.discover(s);
    let mut r = t.restarted();
    assert_eq!(r.status(), ProtectState::Paused);
    r.discover(stack(V119, "c1"));
    assert_eq!(r.status(), ProtectState::Idle);
    // Halted: still halted.
    let mut t = T::on_v119();
    for n in 1..=2 {
        die(&mut t, "c1", "immich-server", n);
    }
    let out = die(&mut t, "c1", "immich-server", 3);
    halt_loop(&mut t, out, server_log(""));
    let r = t.restarted();
    assert_eq!(r.status(), ProtectState::Halted);
}

#[test]
fn each_project_keeps_its_own_state() {
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    let mut other = stack(V118, "o1");
    other.project = "other".into();
    t.discover(other);
    assert_eq!(t.status(), ProtectState::Idle);
    assert_eq!(t.baseline().as_deref(), Some(V118));
    let back = t.discover(stack(V120, "c2"));
    assert_eq!(t.status(), ProtectState::Frozen);
    let _ = back;
}

#[test]
fn an_update_settles_then_is_verified_and_a_degraded_verify_is_acknowledged() {
    let mut t = T::on_v119();
    t.env(Some(V119), Some(V120));
    t.sealed(V119);
    t.start_unknown("c2", V120);
    t.discover(stack(V120, "c2"));
    let window = t.p.config.crash_loop.window_secs as i64;
    t.later(window + 2);
    let out = t.step(Event::Wakeup);
    let Some(Effect::Verify { due, .. }) = out.iter().find(|e| matches!(e, Effect::Verify { .. }))
    else {
        panic!("{out:?}")
    };
    assert_eq!((due.from.as_str(), due.to.as_str()), (V119, V120));
    // The ack with nothing DEGRADED says so.
    let reply = t.reply();
    let out = t.step(Event::Ack { reply });
    assert!(matches!(replied(&out, reply), Some(Err(_))));
}

#[test]
fn a_restore_is_not_frozen_held_or_snapshotted_and_its_version_becomes_the_baseline() {
    let mut t = T::on_v119();
    let reply = t.reply();
    let out = t.step(Event::Restore(RestoreEvent::Begin {
        snapshot: "s1".into(),
        reply,
    }));
    assert_eq!(replied(&out, reply), Some(Ok(String::new())));
    // Its start of an older version is neither paused nor held; a release is refused.
    let out = t.step(Event::Started(
        t.event("c0", "ghcr.io/immich-app/immich-server:v1.118.0"),
    ));
    assert!(out.is_empty());
    let (reply, out) = t.release(false);
    assert!(matches!(replied(&out, reply), Some(Err(m)) if m.contains("restore of s1")));
    assert!(t.env(Some(V119), Some(V118)).is_empty());
    assert!(t.p.next_wakeup(t.now).is_none());
    t.step(Event::Restore(RestoreEvent::End(RestoreEnd::Done {
        version: V118.into(),
        stack: Some(Box::new(stack(V118, "c0"))),
    })));
    assert_eq!(t.baseline().as_deref(), Some(V118));
    assert_eq!(t.status(), ProtectState::Idle);
    // A restore cannot begin while a protective snapshot runs.
    t.env(Some(V118), Some(V120));
    let reply = t.reply();
    let out = t.step(Event::Restore(RestoreEvent::Begin {
        snapshot: "s2".into(),
        reply,
    }));
    assert!(matches!(replied(&out, reply), Some(Err(m)) if m.contains("protective snapshot")));
}

#[test]
fn an_unfinished_restore_given_back_or_abandoned_protects_again_and_a_refusal_with_its_journal_does_not()
 {
    let shows_incomplete = |out: &[Effect], want: bool| {
        out.iter()
            .any(|e| matches!(e, Effect::ShowIncomplete(line) if line.is_some() == want))
    };
    for end in [RestoreEnd::NothingChanged, RestoreEnd::Abandoned] {
        let mut t = T::on_v119();
        let out = t.step(Event::Restore(RestoreEvent::Unfinished(
            "restore of s1 incomplete".into(),
        )));
        assert!(shows_incomplete(&out, true));
        // Not protecting: an upgrade's start goes unjudged.
        assert!(t.env(Some(V119), Some(V120)).is_empty());
        let reply = t.reply();
        t.step(Event::Restore(RestoreEvent::Begin {
            snapshot: "s1".into(),
            reply,
        }));
        let refused = t.step(Event::Restore(RestoreEvent::End(RestoreEnd::Unfinished(
            "restore of s1 incomplete".into(),
        ))));
        assert!(shows_incomplete(&refused, true), "{refused:?}");
        let out = t.step(Event::Restore(RestoreEvent::End(end)));
        assert!(shows_incomplete(&out, false), "{out:?}");
        // Protecting again: the same edit is a change to snapshot.
        let out = t.env(Some(V120), Some(V119));
        assert!(!out.is_empty(), "{out:?}");
    }
}

#[test]
fn the_phase_cannot_hold_two_gates_and_the_view_round_trips() {
    let mut t = T::on_v119();
    t.start_unknown("c2", V120);
    t.step(Event::SnapshotFailed(
        crate::snapshot::SnapshotFailure::lasting("boom"),
    ));
    let v = t.p.state().view();
    assert!(v.hold.is_some() && v.frozen.is_none());
    assert_eq!(v.state, ProtectState::Held);
    let back = crate::protect::state::ProjectState::from_view(v.clone());
    assert_eq!(back.view(), v);
}

// Pure helpers the decisions rest on.

#[test]
fn only_the_newest_allowed_pin_since_the_baseline_lets_a_rollback_start() {
    use crate::pin::{PinRecord, Verdict};
    let t0 = Utc::now();
    let pin = |minutes: i64, project: &str, version: &str, verdict: Verdict, forced| PinRecord {
        at: t0 + chrono::TimeDelta::minutes(minutes),
        project: project.into(),
        version: version.into(),
        forced,
        verdict,
        files: vec![],
        backups: vec![],
        by: "root".into(),
    };
    let allowed = || Verdict::Allowed {
        snapshots: vec!["s".into()],
    };
    let refused = || Verdict::Refused {
        migrations: vec!["m".into()],
        restore: "s".into(),
    };
    let ok = vec![pin(5, "immich", "v1.119.0", allowed(), false)];
    assert!(pinned_rollback(&ok, "immich", "1.119.0", t0).is_some());
    // Another version, another project, or a pin older than the baseline: held.
    assert!(pinned_rollback(&ok, "immich", "v1.118.0", t0).is_none());
    assert!(pinned_rollback(&ok, "other", "v1.119.0", t0).is_none());
    let later = t0 + chrono::TimeDelta::minutes(10);
    assert!(pinned_rollback(&ok, "immich", "v1.119.0", later).is_none());
    // A newer pin of the project to another version replaces it.
    let mut two = ok.clone();
    two.push(pin(6, "immich", "v1.119.1", allowed(), false));
    assert!(pinned_rollback(&two, "immich", "v1.119.0", t0).is_none());
    // ... but another project's newer pin does not.
    let mut other = ok;
    other.push(pin(6, "other", "v1.119.1", allowed(), false));
    assert!(pinned_rollback(&other, "immich", "v1.119.0", t0).is_some());
    // Refused and not forced is never recorded by `pin`; if found, it is held. Forced is
    // the admin's decision, recorded: it starts.
    let no = vec![pin(5, "immich", "v1.119.0", refused(), false)];
    assert!(pinned_rollback(&no, "immich", "v1.119.0", t0).is_none());
    let forced = vec![pin(5, "immich", "v1.119.0", refused(), true)];
    assert!(pinned_rollback(&forced, "immich", "v1.119.0", t0).is_some());
}

#[test]
fn a_held_downgrade_names_the_commands_that_apply() {
    use crate::pin::Verdict;
    let allowed = Verdict::Allowed {
        snapshots: vec!["s119".into()],
    };
    let h = start::downgrade_hint("v1.119.0", "v1.119.1", &allowed, Some("s119"));
    assert!(h.contains("`immich-guard pin v1.119.0`"), "{h}");
    assert!(h.contains("then `immich-guard release`"), "{h}");
    assert!(!h.contains("restore"), "{h}");
    let refused = Verdict::Refused {
        migrations: vec!["1731000000000-AddMemories".into()],
        restore: "s119".into(),
    };
    let h = start::downgrade_hint("v1.119.0", "v1.120.0", &refused, Some("s119"));
    assert!(h.contains("`immich-guard restore s119`"), "{h}");
    assert!(h.contains("IMMICH_VERSION=v1.120.0"), "{h}");
    assert!(h.contains("`immich-guard release --force`"), "{h}");
    assert!(!h.contains("immich-guard pin"), "{h}");
    let unknown = Verdict::Unknown {
        reason: "the database's migrations could not be read: timeout".into(),
    };
    let h = start::downgrade_hint("v1.119.0", "v1.120.0", &unknown, Some("s119"));
    assert!(h.contains("`immich-guard restore s119`"), "{h}");
    let h = start::downgrade_hint("v1.118.0", "v1.120.0", &unknown, None);
    assert!(!h.contains("restore"), "{h}");
    assert!(h.contains("`immich-guard release --force`"), "{h}");
}

// Immich's upgrade paths (crate::paths; tests/upgrade_paths.rs stages them with Docker).

const V136: &str = "v1.136.0";
const V137: &str = "v1.137.0";

/// The `immich` stack on `version`, server container `c1`.
fn on(version: &str) -> T {
    let mut t = T::new();
    t.discover(stack(version, "c1"));
    t
}

fn path_notes(t: &T) -> Vec<(String, crate::paths::Level)> {
    t.p.state()
        .pending
        .as_ref()
        .map(|p| p.notes.iter().map(|n| (n.row.clone(), n.level)).collect())
        .unwrap_or_default()
}

#[test]
fn a_jump_past_1_137_is_held_at_its_start_and_stays_held_when_the_snapshot_seals() {
    let mut t = on(V120);
    // The `.env` edit is judged at once: status notes and a notification, nothing held yet.
    let out = t.env(Some(V120), Some(V137));
    assert_eq!(snapshot_requests(&out), ["pre-update"]);
    assert_eq!(notices(&out), [EventKind::UpgradePath]);
    assert_eq!(
        path_notes(&t),
        [("typeorm-upgrade".to_string(), crate::paths::Level::Hold)]
    );
    assert_eq!(t.status(), ProtectState::Snapshotting);
    // `compose up`: paused at its start, inspected, held before it migrates.
    let out = t.start_unknown("c2", V137);
    assert_eq!(t.status(), ProtectState::Held);
    assert_eq!(
        notices(&out),
        [EventKind::Held],
        "notes already notified once"
    );
    let hold = t.p.state().phase.hold().unwrap().clone();
    assert_eq!(hold.kind, HoldKind::UpgradePath);
    assert!(hold.paused && hold.container == "c2");
    assert!(
        hold.reason.contains("Invalid upgrade path"),
        "{}",
        hold.reason
    );
    assert!(
        hold.reason
            .contains("docs.immich.app/errors#typeorm-upgrade")
    );
    assert!(hold.hint.contains("IMMICH_VERSION=v1.132.3") && hold.hint.contains("--force"));
    // The snapshot of v1.120.0 seals: the server stays held.
    let out = t.sealed(V120);
    assert!(thaw_of(&out).is_none(), "{out:?}");
    assert_eq!(t.status(), ProtectState::Held);
    // A plain release says why and how; it changes nothing.
    let (reply, out) = t.release(false);
    let err = replied(&out, reply).unwrap().unwrap_err();
    assert!(
        err.contains("Invalid upgrade path") && err.contains("way through"),
        "{err}"
    );
    assert_eq!(t.status(), ProtectState::Held);
    // A restart keeps the hold.
    let mut t = t.restarted();
    assert_eq!(t.status(), ProtectState::Held);
    // `release --force` lets it through, and says what it overrode.
    let (reply, out) = t.release(true);
    assert!(matches!(
        thaw_of(&out),
        Some(Thaw::Forced { overrode: Some(r), .. }) if r.contains("Invalid upgrade path")
    ));
    let out = t.thawed(&out);
    assert!(replied(&out, reply).unwrap().is_ok());
    assert_eq!(notices(&out), [EventKind::Released]);
    let release = t.p.state().releases.last().unwrap().clone();
    assert!(release.forced);
    assert!(
        release.what.contains("overriding the upgrade-path hold"),
        "{}",
        release.what
    );
    assert_eq!(t.baseline().as_deref(), Some(V137));
}

#[test]
fn the_path_through_1_136_goes_each_step_released_after_its_snapshot() {
    let mut t = on(V120);
    t.start_unknown("c2", V136);
    assert_eq!(t.status(), ProtectState::Frozen);
    let out = t.sealed(V120);
    assert_eq!(thaw_of(&out), Some(&Thaw::Sealed));
    t.thawed(&out);
    assert_eq!(t.baseline().as_deref(), Some(V136));
    t.later(3600);
    t.start_unknown("c3", V137);
    assert_eq!(t.status(), ProtectState::Frozen, "frozen, not held");
    let out = t.sealed(V136);
    assert_eq!(thaw_of(&out), Some(&Thaw::Sealed));
    t.thawed(&out);
    assert_eq!(t.baseline().as_deref(), Some(V137));
}

#[test]
fn taking_the_way_through_replaces_a_held_version_with_a_freeze() {
    let mut t = on(V120);
    t.start_unknown("c2", V137);
    assert_eq!(t.status(), ProtectState::Held);
    // The admin sets v1.136.0 and `compose up` recreates the server.
    let out = t.start_unknown("c3", V136);
    assert_eq!(t.status(), ProtectState::Frozen, "{out:?}");
    assert_eq!(t.p.state().phase.frozen().unwrap().container, "c3");
}

#[test]
fn a_v3_target_on_a_pgvecto_rs_database_image_is_held() {
    let mut t = T::new();
    let mut s = stack("v2.7.5", "c1");
    s.database = Some(service(
        "database",
        "db",
        "tensorchord/pgvecto-rs:pg14-v0.2.0",
        "sha256:pgv",
    ));
    t.discover(s);
    t.start_unknown("c2", "v3.0.0");
    assert_eq!(t.status(), ProtectState::Held);
    let hold = t.p.state().phase.hold().unwrap();
    assert!(
        hold.reason.contains("v3-pgvecto-rs-image"),
        "{}",
        hold.reason
    );
    // The warnings of the same change are in the notes beside the hold.
    assert!(path_notes(&t).contains(&("v3-mobile-apps".into(), crate::paths::Level::Warn)));
}

#[test]
fn warnings_are_shown_and_notified_once_and_never_hold() {
    let mut t = on("v2.7.5");
    let v3 = |extra: &[(&str, &str)]| ComposeView {
        paths: Box::new(crate::compose::PathFacts {
            env: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        ..view(Some("v3.0.0"))
    };
    let out = t.step(Event::Compose(ComposeEvent::Changed {
        before: view(Some("v2.7.5")),
        after: v3(&[("IMMICH_MACHINE_LEARNING_PING_TIMEOUT", "2000")]),
    }));
    assert_eq!(notices(&out), [EventKind::UpgradePath]);
    let rows: Vec<String> = path_notes(&t).into_iter().map(|(r, _)| r).collect();
    assert_eq!(rows, ["v3-removed-ping-timeout", "v3-mobile-apps"]);
    // The same view again (a touch of the file): not notified again.
    let out = t.step(Event::Compose(ComposeEvent::Changed {
        before: v3(&[("IMMICH_MACHINE_LEARNING_PING_TIMEOUT", "2000")]),
        after: v3(&[("IMMICH_MACHINE_LEARNING_PING_TIMEOUT", "2000")]),
    }));
    assert!(notices(&out).is_empty(), "{out:?}");
    // The variable removed: the notes follow, and a warning less is no news to notify.
    t.step(Event::Compose(ComposeEvent::Changed {
        before: v3(&[("IMMICH_MACHINE_LEARNING_PING_TIMEOUT", "2000")]),
        after: v3(&[]),
    }));
    assert_eq!(path_notes(&t).len(), 1);
    t.sealed("v2.7.5");
    // The start is not held: the snapshot covers it and it goes.
    let out = t.start_unknown("c2", "v3.0.0");
    assert!(
        matches!(out.first(), Some(Effect::Unpause { .. })),
        "{out:?}"
    );
    assert_eq!(t.baseline().as_deref(), Some("v3.0.0"));
}

#[test]
fn an_env_edit_to_a_pgvecto_rs_v3_is_reported_before_anything_starts() {
    let mut t = on("v2.7.5");
    let out = t.step(Event::Compose(ComposeEvent::Changed {
        before: view(Some("v2.7.5")),
        after: ComposeView {
            paths: Box::new(crate::compose::PathFacts {
                env: [("DB_VECTOR_EXTENSION".to_string(), "pgvecto.rs".to_string())].into(),
                ..Default::default()
            }),
            ..view(Some("v3.0.0"))
        },
    }));
    let Some(Effect::Notify(n)) = out.iter().find(|e| matches!(e, Effect::Notify(_))) else {
        panic!("{out:?}")
    };
    assert_eq!(n.kind, EventKind::UpgradePath);
    assert!(n.title.contains("will be held"), "{}", n.title);
    assert!(
        n.message.contains("DB_VECTOR_EXTENSION=pgvecto.rs"),
        "{}",
        n.message
    );
    assert_eq!(
        t.status(),
        ProtectState::Snapshotting,
        "nothing is held yet"
    );
}
