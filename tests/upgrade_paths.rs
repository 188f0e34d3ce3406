//! Immich's upgrade paths (issue 19, item 3) against a real Docker engine, a real PostgreSQL
//! and the stand-in: a path Immich forbids is held before the new server migrates (its
//! migrations tables unchanged), the documented way through goes, `release --force` lets a
//! held path through and is recorded, and a warning-only row is shown without holding.

mod harness;

use std::time::Duration;

use harness::guard::Guard;
use harness::images::ensure_images;
use harness::webhook::{bodies_once, webhook};
use harness::{Stack, StackSpec, docker_available};
use immich_guard::paths::Level;
use immich_guard::protect::{HoldKind, ProtectState};

const BOOT_DELAY_MS: u64 = 3000;
const LONG: Duration = Duration::from_secs(180);

/// A stack on `version` (server images of `versions` built), watched by a daemon that posts
/// its notifications to a webhook; fields drop in order, the daemon before the stack.
struct Watched {
    guard: Guard,
    _snapshots: tempfile::TempDir,
    stack: Stack,
    received: harness::webhook::Received,
}

fn watched(version: &str, versions: &[&str], env: &[(&str, &str)]) -> Watched {
    ensure_images(versions);
    let stack = Stack::up(StackSpec::new(version).boot_delay_ms(BOOT_DELAY_MS));
    for (k, v) in env {
        stack.set_env(k, v);
    }
    let snapshots = tempfile::tempdir().unwrap();
    let (hook, received) = webhook();
    let guard = Guard::watching(
        &stack,
        snapshots.path(),
        &format!("\n[notify]\nwebhook_url = {hook:?}\n"),
    );
    guard.wait_status("a baseline", Duration::from_secs(60), |s| {
        s.state.protection.baseline.is_some()
    });
    Watched {
        guard,
        _snapshots: snapshots,
        stack,
        received,
    }
}

fn note_rows(s: &immich_guard::status::StatusReport) -> Vec<(String, Level)> {
    s.state
        .protection
        .pending
        .as_ref()
        .map(|p| p.notes.iter().map(|n| (n.row.clone(), n.level)).collect())
        .unwrap_or_default()
}

fn baseline_is(guard: &Guard, version: &str) {
    guard.wait_status(&format!("the baseline {version}"), LONG, |s| {
        s.state
            .protection
            .baseline
            .as_ref()
            .is_some_and(|b| b.version == version)
    });
}

/// Held with `kind`, the server still paused after its boot delay, its migrations tables as
/// they were (read from PostgreSQL).
fn assert_held_before_migrating(w: &Watched, migrations_before: &[String]) -> String {
    let s = w.guard.wait_status("an upgrade-path hold", LONG, |s| {
        s.state.protection.hold.is_some()
    });
    let hold = s.state.protection.hold.unwrap();
    assert_eq!(hold.kind, HoldKind::UpgradePath, "{hold:?}");
    assert_eq!(s.state.protection.state, ProtectState::Held);
    assert_eq!(w.stack.state("immich-server").unwrap().status, "paused");
    std::thread::sleep(Duration::from_millis(BOOT_DELAY_MS + 1500));
    assert_eq!(w.stack.state("immich-server").unwrap().status, "paused");
    assert_eq!(
        w.stack.applied_migrations(),
        migrations_before,
        "the held server migrated; log:\n{}",
        w.guard.log()
    );
    hold.reason
}

#[test]
fn a_jump_from_1_120_to_1_137_is_held_before_migrating_and_release_force_is_recorded() {
    if !docker_available() {
        return;
    }
    let w = watched("v1.120.0", &["v1.120.0", "v1.137.0"], &[]);
    let before = w.stack.applied_migrations();
    assert!(w.stack.migrations_in("kysely_migrations").is_empty());

    // The `.env` edit is reported at once, before anything starts.
    w.stack.set_env("IMMICH_VERSION", "v1.137.0");
    let s = w
        .guard
        .wait_status("the path notes of the .env edit", LONG, |s| {
            !note_rows(s).is_empty()
        });
    assert_eq!(note_rows(&s), [("typeorm-upgrade".into(), Level::Hold)]);
    let bodies = bodies_once(&w.received, "upgrade-path", Duration::from_secs(10));
    assert!(
        bodies.iter().any(|b| b["kind"] == "upgrade-path"
            && b["message"]
                .as_str()
                .unwrap()
                .contains("Invalid upgrade path")),
        "{bodies:?}"
    );

    w.stack.compose(&["up", "-d"]);
    let reason = assert_held_before_migrating(&w, &before);
    assert!(reason.contains("Invalid upgrade path"), "{reason}");
    // It stays held once the snapshot of v1.120.0 has sealed.
    w.guard.wait_status("the snapshot of v1.120.0", LONG, |s| {
        s.state.last_snapshot.is_some()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.guard.status().state.protection.state, ProtectState::Held);
    assert_eq!(w.stack.state("immich-server").unwrap().status, "paused");
    let status = w.guard.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    for want in [
        "HELD",
        "upgrade path",
        "docs.immich.app/errors#typeorm-upgrade",
        "IMMICH_VERSION=v1.132.3",
        "upgrade path: HOLD typeorm-upgrade",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    let bodies = bodies_once(&w.received, "held", Duration::from_secs(10));
    assert!(bodies.iter().any(|b| b["kind"] == "held"), "{bodies:?}");

    // A plain release names the way through and changes nothing.
    let out = w.guard.cli(&["release"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("way through"),
        "{out:?}"
    );
    assert_eq!(w.stack.applied_migrations(), before);

    // `release --force` lets it through: it migrates, and the override is recorded.
    let out = w.guard.cli(&["release", "--force"]);
    assert!(out.status.success(), "{out:?}");
    w.stack
        .wait_server_version("v1.137.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(w.stack.applied_migrations(), before);
    baseline_is(&w.guard, "v1.137.0");
    let release = w
        .guard
        .status()
        .state
        .protection
        .releases
        .last()
        .cloned()
        .unwrap();
    assert!(release.forced);
    assert!(
        release.what.contains("overriding the upgrade-path hold"),
        "{}",
        release.what
    );
    let file = std::fs::read_to_string(w.guard.dir.path().join("data/protection.json")).unwrap();
    assert!(file.contains("overriding the upgrade-path hold"), "{file}");
    let bodies = bodies_once(&w.received, "released", Duration::from_secs(10));
    assert!(
        bodies.iter().any(|b| b["kind"] == "released"
            && b["message"]
                .as_str()
                .unwrap()
                .contains("overriding the upgrade-path hold")),
        "{bodies:?}"
    );
}

#[test]
fn the_path_through_1_136_goes_each_step_released_after_its_snapshot() {
    if !docker_available() {
        return;
    }
    let w = watched("v1.120.0", &["v1.120.0", "v1.136.0", "v1.137.0"], &[]);
    for (from, to) in [("v1.120.0", "v1.136.0"), ("v1.136.0", "v1.137.0")] {
        let snapshots = w.guard.list().len();
        w.stack.set_env("IMMICH_VERSION", to);
        w.guard
            .wait_status(&format!("a snapshot of {from}"), LONG, |s| {
                s.state
                    .protection
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.snapshot.is_some())
            });
        assert!(note_rows(&w.guard.status()).is_empty());
        w.stack.compose(&["up", "-d"]);
        w.stack
            .wait_server_version(to, LONG)
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.guard.log()));
        baseline_is(&w.guard, to);
        let list = w.guard.list();
        assert_eq!(list.len(), snapshots + 1, "one snapshot per step");
        let meta = list.last().unwrap();
        assert_eq!(
            (meta.version.as_str(), meta.trigger.as_str()),
            (from, "pre-update")
        );
        let s = w.guard.status();
        assert!(s.state.protection.hold.is_none());
        assert!(
            s.state.protection.releases.iter().all(|r| !r.forced),
            "{:?}",
            s.state.protection.releases
        );
    }
}

#[test]
fn a_v3_target_with_db_vector_extension_pgvecto_rs_is_held_and_a_warning_only_row_is_not() {
    if !docker_available() {
        return;
    }
    // A removed variable in .env: shown and notified, never held.
    let w = watched(
        "v2.0.0",
        &["v2.0.0", "v3.0.0"],
        &[("IMMICH_MACHINE_LEARNING_PING_TIMEOUT", "2000")],
    );
    w.stack.set_env("IMMICH_VERSION", "v3.0.0");
    let s = w
        .guard
        .wait_status("the warnings", LONG, |s| !note_rows(s).is_empty());
    let rows = note_rows(&s);
    assert!(
        rows.contains(&("v3-removed-ping-timeout".into(), Level::Warn))
            && rows.contains(&("v3-mobile-apps".into(), Level::Warn))
            && rows.iter().all(|(_, l)| *l == Level::Warn),
        "{rows:?}"
    );
    let text = String::from_utf8_lossy(&w.guard.cli(&["status"]).stdout).to_string();
    assert!(
        text.contains("upgrade path: WARN v3-removed-ping-timeout"),
        "{text}"
    );
    let bodies = bodies_once(&w.received, "upgrade-path", Duration::from_secs(10));
    assert!(
        bodies.iter().any(|b| b["kind"] == "upgrade-path"),
        "{bodies:?}"
    );
    w.stack.compose(&["up", "-d"]);
    w.stack
        .wait_server_version("v3.0.0", LONG)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.guard.log()));
    baseline_is(&w.guard, "v3.0.0");
    assert!(w.guard.status().state.protection.hold.is_none());
    drop(w);

    // DB_VECTOR_EXTENSION=pgvecto.rs: v3 throws; held before it migrates.
    let w = watched(
        "v2.0.0",
        &["v2.0.0", "v3.0.0"],
        &[("DB_VECTOR_EXTENSION", "pgvecto.rs")],
    );
    let before = w.stack.applied_migrations();
    w.stack.set_env("IMMICH_VERSION", "v3.0.0");
    let s = w
        .guard
        .wait_status("the hold note", LONG, |s| !note_rows(s).is_empty());
    assert!(note_rows(&s).contains(&("v3-pgvecto-rs-env".into(), Level::Hold)));
    w.stack.compose(&["up", "-d"]);
    let reason = assert_held_before_migrating(&w, &before);
    assert!(
        reason.contains("DB_VECTOR_EXTENSION=pgvecto.rs"),
        "{reason}"
    );
}
