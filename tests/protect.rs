//! Passive protection scenarios (issue 4), each against a real Docker engine, a real
//! PostgreSQL and the stand-in server: the daemon must seal a snapshot of the database as it
//! was BEFORE the new version's migrations, whichever way the upgrade happens, hold what it
//! cannot protect, and refuse a downgrade.
//!
//! The stand-in boots for a few seconds before it migrates (like Immich), so a freeze that
//! comes within milliseconds of the start event always lands before the migrations.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::compose::docker_ok;
use harness::guard::Guard;
use harness::images::{build_server_image, ensure_images, server_repo};
use harness::immutable::Immutable;
use harness::webhook::{bodies_once, webhook};
use harness::{Images, Stack, StackSpec, docker_available};
use immich_guard::protect::{HoldKind, ProtectState};
use immich_guard::snapshot::store::Meta;

/// First migration of v1.120.0 in the stand-in's catalog.
const V120_MIGRATION: &str = "1731000000000-AddMemories";
const BOOT_DELAY_MS: u64 = 3000;
const LONG: Duration = Duration::from_secs(120);

fn guard_for(stack: &Stack, snapshots: &std::path::Path, extra: &str) -> Guard {
    let guard = Guard::watching(stack, snapshots, extra);
    guard.wait_status("a baseline", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    guard
}

fn wait_snapshot(guard: &Guard, trigger: &str) -> Meta {
    guard.wait_status(&format!("a sealed {trigger} snapshot"), LONG, |s| {
        s.state.last_snapshot.is_some()
    });
    let all = guard.list();
    all.into_iter()
        .rev()
        .find(|m| m.trigger == trigger)
        .unwrap_or_else(|| panic!("no {trigger} snapshot; log:\n{}", guard.log()))
}

/// The snapshot holds the database as v1.119.0 left it: none of v1.120.0's migrations and
/// the assets as they were.
fn assert_pre_migration(meta: &Meta, assets_before: u64) {
    assert_eq!(meta.version, "v1.119.0", "{meta:?}");
    assert!(
        !meta.db.migrations.iter().any(|m| m == V120_MIGRATION),
        "the snapshot has v1.120.0's migration: {:?}",
        meta.db.migrations
    );
    assert_eq!(meta.db.assets, Some(assets_before as i64));
}

fn assert_label(meta: &Meta, text: &str) {
    assert!(
        meta.label.as_deref().unwrap_or("").contains(text),
        "{:?}",
        meta.label
    );
}

fn assert_upgraded(stack: &Stack, assets_before: u64) {
    stack
        .wait_server_version("v1.120.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        stack
            .applied_migrations()
            .iter()
            .any(|m| m == V120_MIGRATION)
    );
    assert!(
        stack.asset_count() > assets_before,
        "the new version's boot adds an asset"
    );
}

fn spec(version: &str) -> StackSpec {
    StackSpec::new(version).boot_delay_ms(BOOT_DELAY_MS)
}

/// A v1.119.0 stack (images for v1.120.0 ready) watched by a daemon; fields drop in order,
/// the daemon before the stack.
struct Watched {
    guard: Guard,
    _snapshots: tempfile::TempDir,
    stack: Stack,
    images: Images,
    assets_before: u64,
}

fn stack_v119() -> (Images, Stack) {
    stack_up(spec("v1.119.0"))
}

fn stack_up(spec: StackSpec) -> (Images, Stack) {
    let images = ensure_images(&["v1.119.0", "v1.120.0"]);
    (images, Stack::up(spec))
}

fn watched_v119() -> Watched {
    watched(spec("v1.119.0"))
}

/// Like [`watched_v119`] with compose's own container names (`project-service-1` under v2,
/// `project_service_1` under v1) instead of Immich's `container_name`s.
fn watched_v119_compose_names() -> Watched {
    watched(spec("v1.119.0").compose_names())
}

fn watched(spec: StackSpec) -> Watched {
    let (images, stack) = stack_up(spec);
    let snapshots = tempfile::tempdir().unwrap();
    let guard = guard_for(&stack, snapshots.path(), "");
    let assets_before = stack.asset_count();
    Watched {
        guard,
        _snapshots: snapshots,
        stack,
        images,
        assets_before,
    }
}

#[test]
fn manual_upgrade_env_then_up_is_snapshotted_before_migrations() {
    if !docker_available() {
        return;
    }
    // `_snapshots` bound: it must live as long as the daemon writing into it.
    let Watched {
        guard,
        stack,
        assets_before,
        _snapshots,
        ..
    } = watched_v119();

    stack.set_env("IMMICH_VERSION", "v1.120.0");
    let meta = wait_snapshot(&guard, "pre-update");
    assert_pre_migration(&meta, assets_before);
    assert_label(&meta, "v1.119.0 → v1.120.0");
    // The pull: the image is re-tagged (already known: no second snapshot).
    docker_ok(&[
        "tag",
        &format!("{}:v1.120.0", server_repo()),
        &format!("{}:v1.120.0", server_repo()),
    ]);
    stack.compose(&["up", "-d"]);
    assert_upgraded(&stack, assets_before);
    let s = guard.wait_status("the new baseline", LONG, |s| {
        s.state
            .protection
            .baseline
            .as_ref()
            .is_some_and(|b| b.version == "v1.120.0")
    });
    assert_eq!(s.state.protection.state, ProtectState::Idle);
    assert!(s.state.protection.pending.is_none());
    assert_eq!(
        guard.list().len(),
        1,
        "one change, one snapshot; log:\n{}",
        guard.log()
    );

    // Going back is refused: the server is held before it runs, and the way back named.
    stack.set_env("IMMICH_VERSION", "v1.119.0");
    stack.compose(&["up", "-d"]);
    let s = guard.wait_status("a downgrade hold", LONG, |s| {
        s.state.protection.hold.is_some()
    });
    let hold = s.state.protection.hold.unwrap();
    assert_eq!(hold.kind, HoldKind::Downgrade);
    assert!(hold.hint.contains(&meta.id), "{}", hold.hint);
    assert_eq!(stack.state("immich-server").unwrap().status, "paused");
    std::thread::sleep(Duration::from_millis(BOOT_DELAY_MS + 1000));
    assert_eq!(stack.state("immich-server").unwrap().status, "paused");
    let out = guard.cli(&["release"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("immich-guard restore"),
        "{out:?}"
    );
    let status = guard.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("HELD") && text.contains("refused downgrade"),
        "{text}"
    );
}

#[test]
fn watchtower_like_recreate_is_frozen_until_the_snapshot_is_sealed() {
    if !docker_available() {
        return;
    }
    let Watched {
        guard,
        stack,
        images,
        assets_before,
        _snapshots,
    } = watched_v119_compose_names();

    // No pull event the guard could act on first: recreate straight onto the new image ID.
    stack.recreate_server(images.server("v1.120.0"));
    let s = guard.wait_status("the new server frozen or released", LONG, |s| {
        !s.state.protection.freeze_delays_ms.is_empty()
    });
    assert!(
        s.state.protection.hold.is_none(),
        "{:?}",
        s.state.protection
    );
    let meta = wait_snapshot(&guard, "pre-start");
    assert_pre_migration(&meta, assets_before);
    assert_upgraded(&stack, assets_before);
    let delays = &guard.status().state.protection.freeze_delays_ms;
    eprintln!("freeze delay {delays:?} ms");
    assert!(
        guard.log().contains("froze the new server"),
        "{}",
        guard.log()
    );
}

#[test]
fn same_tag_new_image_id_is_snapshotted_on_the_pull() {
    if !docker_available() {
        return;
    }
    ensure_images(&["v1.119.0"]);
    let tag = format!("latest-{}", std::process::id());
    build_server_image("v1.119.0", &tag, "old");
    let stack = Stack::up(spec(&tag));
    let snapshots = tempfile::tempdir().unwrap();
    let guard = guard_for(&stack, snapshots.path(), "");
    let assets_before = stack.asset_count();

    // `docker pull` of a moved tag: same name, new image ID (and a newer version inside).
    build_server_image("v1.120.0", &tag, "new");
    let meta = wait_snapshot(&guard, "pre-update");
    assert_pre_migration(&meta, assets_before);
    stack.compose(&["up", "-d"]);
    assert_upgraded(&stack, assets_before);
    // Both tags this test made (the stack built the ML image for the tag too).
    docker_ok(&[
        "rmi",
        "-f",
        &format!("{}:{tag}", server_repo()),
        &format!("{}:{tag}", harness::images::ml_repo()),
    ]);
}

#[test]
fn a_failed_snapshot_holds_the_new_server_until_released() {
    if !docker_available() {
        return;
    }
    let (_images, stack) = stack_v119();
    let tiny = tiny_tmpfs();
    let (hook, received) = webhook();
    // copy_across: the tmpfs is another filesystem; the snapshot must fail for want of space.
    let guard = guard_for(
        &stack,
        tiny.path(),
        &format!("copy_across = true\n\n[notify]\nwebhook_url = {hook:?}\n"),
    );
    let migrations_before = stack.applied_migrations();

    stack.set_env("IMMICH_VERSION", "v1.120.0");
    stack.compose(&["up", "-d"]);
    let s = guard.wait_status("a hold", LONG, |s| s.state.protection.hold.is_some());
    let hold = s.state.protection.hold.unwrap();
    assert_eq!(hold.kind, HoldKind::SnapshotFailed);
    assert!(hold.reason.contains("space"), "{}", hold.reason);
    assert!(s.status_line.starts_with("HELD"), "{}", s.status_line);
    // Held: it never migrates.
    std::thread::sleep(Duration::from_millis(BOOT_DELAY_MS + 1000));
    assert_eq!(stack.state("immich-server").unwrap().status, "paused");
    assert_eq!(stack.applied_migrations(), migrations_before);

    // `release` retries the snapshot, which fails again: still held.
    let out = guard.cli(&["release"]);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(stack.state("immich-server").unwrap().status, "paused");
    // `release --force` lets it go, and it is recorded.
    let out = guard.cli(&["release", "--force"]);
    assert!(out.status.success(), "{out:?}");
    stack
        .wait_server_version("v1.120.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let p = guard.status().state.protection;
    assert!(p.hold.is_none());
    assert!(p.releases.last().is_some_and(|r| r.forced), "{p:?}");

    // The admin heard of it: a webhook POST for the hold and for the release.
    let bodies = bodies_once(&received, "released", Duration::from_secs(20));
    assert!(
        bodies
            .iter()
            .any(|b| b["kind"] == "held" && b["to_version"] == "v1.120.0"),
        "{bodies:?}"
    );
    assert!(bodies.iter().any(|b| b["kind"] == "released"), "{bodies:?}");
}

#[test]
fn fail_open_lets_the_server_go_when_its_snapshot_fails() {
    if !docker_available() {
        return;
    }
    let (_images, stack) = stack_v119();
    let tiny = tiny_tmpfs();
    let guard = guard_for(
        &stack,
        tiny.path(),
        "copy_across = true\n\n[protect]\nfail_open = true\n",
    );
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version("v1.120.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let p = guard.status().state.protection;
    assert!(p.fail_open && p.hold.is_none(), "{p:?}");
    assert!(
        p.releases
            .last()
            .is_some_and(|r| r.forced && r.what.contains("fail-open")),
        "{p:?}"
    );
    assert!(!p.freeze_delays_ms.is_empty(), "it was frozen first");
}

#[test]
fn a_restarted_daemon_still_protects_an_upgrade_in_progress() {
    if !docker_available() {
        return;
    }
    let Watched {
        mut guard,
        stack,
        assets_before,
        _snapshots,
        ..
    } = watched_v119();
    // The daemon is down while the admin edits `.env`...
    guard.terminate();
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    // ...and comes back before `up -d`, with the same data dir.
    let guard = guard.restart();
    let meta = wait_snapshot(&guard, "pre-update");
    assert_pre_migration(&meta, assets_before);
    assert_label(&meta, "startup reconcile");
    stack.compose(&["up", "-d"]);
    assert_upgraded(&stack, assets_before);
}

#[test]
fn down_edit_up_waits_for_the_database_and_snapshots_before_migrations() {
    if !docker_available() {
        return;
    }
    let w = watched_v119_compose_names();
    let (guard, stack, assets_before) = (&w.guard, &w.stack, w.assets_before);
    // Immich's documented way: down, change the version, up. The .env change comes while
    // there is no database to dump; the database and the new server then start together.
    stack.compose(&["down"]);
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    std::thread::sleep(Duration::from_secs(2));
    stack.compose(&["up", "-d"]);
    assert_upgraded(stack, assets_before);
    let s = guard.wait_status("idle on the new baseline", LONG, |s| {
        let p = &s.state.protection;
        p.state == ProtectState::Idle
            && p.baseline.as_ref().is_some_and(|b| b.version == "v1.120.0")
    });
    assert!(s.state.protection.hold.is_none());
    let all = guard.list();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_pre_migration(&all[0], assets_before);
    assert!(
        guard.log().contains("waiting up to 60 s for the database"),
        "the snapshot waited for the database; log:\n{}",
        guard.log()
    );
}

/// A 256 KiB tmpfs: too small for any dump, so every snapshot there fails.
struct Tiny(tempfile::TempDir);

impl Tiny {
    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

fn tiny_tmpfs() -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap()
        .success();
    assert!(mounted, "mount tmpfs (needs root)");
    Tiny(dir)
}

impl Drop for Tiny {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// Issue 12: seven `.env` saves in a row are one pending change at a time, and the state the
/// first snapshot sealed is not dumped again while nothing is written: one snapshot covers
/// them all, and `status` follows each edit.
#[test]
fn a_burst_of_env_edits_is_snapshotted_once() {
    if !docker_available() {
        return;
    }
    let Watched {
        guard,
        stack,
        assets_before,
        _snapshots,
        ..
    } = watched_v119();
    let versions = [
        "v1.120.0", "v1.120.1", "v1.120.2", "v1.120.0", "v1.120.3", "v1.120.1", "v1.120.4",
    ];
    for (i, version) in versions.iter().enumerate() {
        stack.set_env("IMMICH_VERSION", version);
        guard.wait_status(&format!("edit {i} seen"), LONG, |s| {
            s.state
                .protection
                .pending
                .as_ref()
                .is_some_and(|p| &p.to == version && p.snapshot.is_some())
                && s.state
                    .stack
                    .as_ref()
                    .and_then(|s| s.env_version.as_deref())
                    == Some(version)
        });
        // Edits a few seconds apart, as an admin saving again and again.
        std::thread::sleep(Duration::from_millis(2500));
    }
    let all = guard.list();
    assert_eq!(
        all.len(),
        1,
        "one state, one snapshot: {:?}; log:\n{}",
        all.iter().map(|m| &m.id).collect::<Vec<_>>(),
        guard.log()
    );
    assert_pre_migration(&all[0], assets_before);
    assert!(all[0].db.xid_snapshot.is_some() && all[0].upload_mark.is_some());
    assert!(
        guard.log().contains("it covers this change"),
        "{}",
        guard.log()
    );
    let status = guard.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(".env version:     v1.120.4"), "{text}");
    assert!(
        text.contains(&format!("covered by {}", all[0].id)),
        "{text}"
    );
}

/// Issue 12: a server paused while no daemon ran (by hand here; a run that stopped between
/// its pause and writing it down looks the same) is reported and left paused, never unpaused
/// silently; `release` takes it over.
#[test]
fn a_server_found_paused_at_start_is_reported_and_left_paused_until_released() {
    if !docker_available() {
        return;
    }
    let Watched {
        mut guard,
        stack,
        _snapshots,
        ..
    } = watched_v119();
    guard.terminate();
    docker_ok(&["pause", &stack.container_name("immich-server")]);
    let guard = guard.restart();
    let s = guard.wait_status("the paused server reported", LONG, |s| {
        s.state.protection.state == ProtectState::Paused
    });
    assert!(s.status_line.starts_with("PAUSED "), "{}", s.status_line);
    let text = String::from_utf8_lossy(&guard.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("immich-guard release"), "{text}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(stack.state("immich-server").unwrap().status, "paused");
    // Its version is the one the database runs with: released at once, no snapshot needed.
    let out = guard.cli(&["release"]);
    assert!(out.status.success(), "{out:?}\n{}", guard.log());
    stack.wait_status("immich-server", "running", LONG);
    let s = guard.wait_status("idle again", LONG, |s| {
        s.state.protection.state == ProtectState::Idle
    });
    assert!(s.state.protection.paused_server.is_none());
}

/// Issue 12: a snapshot stuck behind a database lock keeps the new server frozen (fail
/// closed), says where it waits, and after `snapshots.max_wait_secs` becomes a HOLD with a
/// notification; once the lock is gone the snapshot seals and the server goes on.
#[test]
fn a_snapshot_stuck_behind_a_lock_becomes_a_hold_that_ends_when_it_seals() {
    if !docker_available() {
        return;
    }
    let (hook, bodies) = webhook();
    let (images, stack) = stack_v119();
    let snapshots = tempfile::tempdir().unwrap();
    let guard = guard_for(
        &stack,
        snapshots.path(),
        &format!("max_wait_secs = 5\n\n[notify]\nwebhook_url = {hook:?}\n"),
    );
    let assets_before = stack.asset_count();
    // Another session holds the migrations table: the snapshot's first query waits on it.
    let mut locker = Command::new("docker")
        .args([
            "exec",
            &stack.container_name("database"),
            "psql",
            "-U",
            &stack.db_user,
            "-d",
            &stack.db_name,
            "-c",
            "BEGIN; LOCK TABLE migrations IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(600);",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    stack.recreate_server(images.server("v1.120.0"));
    let s = guard.wait_status("the stuck snapshot held", LONG, |s| {
        s.state.protection.hold.is_some()
    });
    let hold = s.state.protection.hold.unwrap();
    // Why, and where it waits.
    for part in [
        "snapshots.max_wait_secs (5 s)",
        "at: snapshot",
        "reading migrations",
    ] {
        assert!(hold.reason.contains(part), "{part}: {}", hold.reason);
    }
    assert_eq!(stack.state("immich-server").unwrap().status, "paused");
    assert!(
        bodies_once(&bodies, "held", Duration::from_secs(10))
            .iter()
            .any(|b| b["kind"] == "held"),
        "no held notification"
    );
    // The admin ends the lock: the snapshot seals, the hold ends, the upgrade goes on.
    stack.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(600)%' AND pid <> pg_backend_pid()",
    );
    let _ = locker.wait();
    let meta = wait_snapshot(&guard, "pre-start");
    assert_pre_migration(&meta, assets_before);
    assert_upgraded(&stack, assets_before);
    let s = guard.wait_status("the hold ended", LONG, |s| {
        s.state.protection.hold.is_none()
    });
    assert!(s.state.protection.snapshot_run.is_none());
}

/// Issue 18: a partial snapshot the daemon cannot remove at start (an immutable file in it)
/// does not keep it from starting and protecting: `status` names the path, a snapshot
/// seals, an upgrade is snapshotted before its migrations; once the cause is gone, the
/// retry when a snapshot begins removes it.
#[test]
fn an_undeletable_partial_at_start_is_named_and_protection_goes_on() {
    if !docker_available() {
        return;
    }
    let (_images, stack) = stack_v119();
    let snapshots = tempfile::tempdir().unwrap();
    let partial = snapshots.path().join(".partial-x");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("db.sql.zst"), "half a dump").unwrap();
    let Some(flag) = Immutable::set(&partial.join("db.sql.zst"), snapshots.path()) else {
        return;
    };
    let guard = guard_for(&stack, snapshots.path(), "");
    let assets_before = stack.asset_count();
    let s = guard.status();
    assert!(
        s.state
            .partials_left
            .iter()
            .any(|l| l.path == partial && l.error.contains("Operation not permitted")),
        "{:?}",
        s.state.partials_left
    );
    let text = String::from_utf8_lossy(&guard.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains(&format!(
            "PARTIAL SNAPSHOT NOT REMOVED: {}",
            partial.display()
        )),
        "{text}"
    );
    assert!(
        guard.log().contains("cannot remove a partial snapshot"),
        "{}",
        guard.log()
    );

    // Protection works: the upgrade is snapshotted before the new version migrates.
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    let meta = wait_snapshot(&guard, "pre-update");
    assert_pre_migration(&meta, assets_before);
    stack.compose(&["up", "-d"]);
    assert_upgraded(&stack, assets_before);
    // A manual snapshot seals too; the partial, tried again as it begins, is still there.
    let out = guard.cli(&["snapshot"]);
    assert!(out.status.success(), "{out:?}");
    assert!(partial.exists());
    assert_eq!(guard.status().state.partials_left.len(), 1);

    // The admin clears the cause: the next snapshot's retry removes it.
    flag.clear();
    let out = guard.cli(&["snapshot"]);
    assert!(out.status.success(), "{out:?}");
    guard.wait_status("the partial removed", LONG, |s| {
        s.state.partials_left.is_empty()
    });
    assert!(!partial.exists());
    assert!(
        guard
            .log()
            .contains("removed a partial snapshot left earlier"),
        "{}",
        guard.log()
    );
    assert_eq!(guard.list().len(), 3, "pre-update and two manual snapshots");
}

/// Issue 18: the snapshot of a frozen new server seals, then retention fails (an old
/// snapshot that cannot be deleted): the server is released as after any seal, never HELD,
/// and the admin hears of the retention, not of a failed snapshot.
#[test]
fn a_retention_that_fails_after_the_seal_never_holds_the_server() {
    if !docker_available() {
        return;
    }
    let (images, stack) = stack_v119();
    let (hook, received) = webhook();
    let dir = tempfile::tempdir().unwrap();
    let snapshots = dir.path().join("snapshots");
    let stuck = harness::guard::snapshot_of(&stack, dir.path());
    let other = harness::guard::snapshot_of(&stack, dir.path());
    // The newest snapshot whose content check passed is kept whatever keep_last says.
    let checked = harness::guard::snapshot_of(&stack, dir.path());
    let Some(_flag) = Immutable::set(&snapshots.join(&stuck.id).join("db.sql.zst"), &snapshots)
    else {
        return;
    };
    let guard = guard_for(
        &stack,
        &snapshots,
        &format!("keep_last = 1\n\n[notify]\nwebhook_url = {hook:?}\n"),
    );
    // The daemon hashes the snapshots it finds at start.
    guard.wait_all_checked(LONG);
    // Written since: the older snapshots do not cover the change, a new one is taken.
    stack.psql("CREATE TABLE written_since (x int)");
    let assets_before = stack.asset_count();

    stack.recreate_server(images.server("v1.120.0"));
    let meta = wait_snapshot(&guard, "pre-start");
    assert_pre_migration(&meta, assets_before);
    assert_upgraded(&stack, assets_before);
    let s = guard.wait_status("idle on the new baseline", LONG, |s| {
        let p = &s.state.protection;
        p.state == ProtectState::Idle
            && p.baseline.as_ref().is_some_and(|b| b.version == "v1.120.0")
    });
    let p = &s.state.protection;
    assert!(p.hold.is_none(), "{p:?}");
    assert!(
        !p.releases.iter().any(|r| r.forced),
        "released as sealed, not without a snapshot: {:?}",
        p.releases
    );
    assert_eq!(s.state.last_snapshot_error, None);
    let warning = s.state.retention_warning.clone().unwrap();
    assert!(warning.contains(&stuck.id), "{warning}");
    let ids: Vec<String> = guard.list().into_iter().map(|m| m.id).collect();
    assert_eq!(
        ids,
        [checked.id.clone(), meta.id.clone()],
        "{} went, {} cannot, {} is the newest checked",
        other.id,
        stuck.id,
        checked.id
    );

    let bodies = bodies_once(&received, "retention-failed", Duration::from_secs(20));
    let notice = bodies
        .iter()
        .find(|b| b["kind"] == "retention-failed")
        .unwrap_or_else(|| panic!("no retention-failed notification: {bodies:?}"));
    assert_eq!(notice["snapshot"], meta.id.as_str());
    assert!(
        notice["message"].as_str().unwrap().contains(&stuck.id),
        "{notice}"
    );
    assert!(
        bodies
            .iter()
            .all(|b| b["kind"] != "snapshot-failed" && b["kind"] != "held"),
        "{bodies:?}"
    );
}
