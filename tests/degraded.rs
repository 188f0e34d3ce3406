//! Verify after every upgrade (issue 11 item 3), against a real Docker engine, a real
//! PostgreSQL and the stand-in server: an upgrade that also moves the database's data location
//! comes up on a fresh, empty cluster; the server migrates it and starts, and runs fine, but
//! the family's photos are gone from the database. Once the new server has settled, the
//! daemon's verify against the pre-update snapshot catches it: DEGRADED, in status (also after
//! a daemon restart) and in a webhook naming the snapshot to restore, until `ack`.

mod harness;

use std::time::Duration;

use harness::compose::docker_ok;
use harness::guard::Guard;
use harness::images::server_repo;
use harness::webhook::{bodies_once, webhook};
use harness::{Stack, StackSpec, docker_available, ensure_images};
use immich_guard::protect::ProtectState;
use immich_guard::snapshot::store::Meta;
use immich_guard::status::StatusReport;
use immich_guard::verify::Outcome;

const LONG: Duration = Duration::from_secs(180);
/// A short crash-loop window: the update settles (and is verified) this long after its start.
const WINDOW_SECS: u64 = 5;

fn list(guard: &Guard) -> Vec<Meta> {
    let out = guard.cli(&["list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_pre_update(guard: &Guard) -> Meta {
    let start = std::time::Instant::now();
    loop {
        if let Some(m) = list(guard).into_iter().find(|m| m.trigger == "pre-update") {
            return m;
        }
        assert!(
            start.elapsed() < LONG,
            "no pre-update snapshot; log:\n{}",
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_degraded(s: &StatusReport, snapshot: &str, assets_before: u64) {
    let p = &s.state.protection;
    assert_eq!(p.state, ProtectState::Degraded);
    let d = p.verifies.degraded.as_ref().expect("degraded");
    assert_eq!((d.from.as_str(), d.to.as_str()), ("v1.119.0", "v1.120.0"));
    assert_eq!(d.snapshot.as_deref(), Some(snapshot));
    let assets = d
        .failed
        .iter()
        .find(|c| c.name == "assets")
        .unwrap_or_else(|| panic!("the asset count fails: {:#?}", d.failed));
    assert_eq!(assets.outcome, Outcome::Fail);
    assert!(
        assets
            .detail
            .ends_with(&format!(", {assets_before} in the snapshot")),
        "{}",
        assets.detail
    );
    assert!(
        s.status_line
            .starts_with("DEGRADED after v1.119.0 → v1.120.0: ")
            && s.status_line
                .contains(&format!("`immich-guard restore {snapshot}`")),
        "{}",
        s.status_line
    );
}

/// A stack upgraded from v1.119.0 to v1.120.0 onto a fresh, empty database, and the daemon
/// that saw it: DEGRADED, checked.
struct Degraded {
    stack: Stack,
    guard: Guard,
    received: harness::webhook::Received,
    /// The pre-update snapshot.
    pre: Meta,
    assets_before: u64,
    assets_now: u64,
    _snapshots: tempfile::TempDir,
}

fn upgraded_onto_an_empty_database() -> Degraded {
    ensure_images(&["v1.119.0", "v1.120.0"]);
    let stack = Stack::up(StackSpec::new("v1.119.0").seed_assets(40));
    let snapshots = tempfile::tempdir().unwrap();
    let (url, received) = webhook();
    let guard = Guard::watching(
        &stack,
        snapshots.path(),
        &format!("[crash_loop]\nwindow_secs = {WINDOW_SECS}\n\n[notify]\nwebhook_url = {url:?}\n"),
    );
    guard.wait_status("a baseline", Duration::from_secs(60), |s| {
        s.state.protection.baseline.is_some()
    });
    let assets_before = stack.asset_count();
    assert!(assets_before >= 41, "{assets_before}");

    // The update also points the database at a new, empty directory (a moved or mistyped
    // DB_DATA_LOCATION), and a fresh Immich has no photos (the stand-in seeds none).
    let fresh = stack.db_data.with_file_name("postgres-moved");
    std::fs::create_dir_all(&fresh).unwrap();
    let compose = std::fs::read_to_string(&stack.compose_file).unwrap();
    let seeded = compose
        .lines()
        .find(|l| l.trim_start().starts_with("STANDIN_SEED_ASSETS:"))
        .expect("the harness compose file seeds assets")
        .to_string();
    std::fs::write(
        &stack.compose_file,
        compose.replace(&seeded, "      STANDIN_SEED_ASSETS: \"0\""),
    )
    .unwrap();
    stack.set_env("DB_DATA_LOCATION", &fresh.display().to_string());
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    let pre = wait_pre_update(&guard);
    assert_eq!(pre.version, "v1.119.0");
    assert_eq!(pre.db.assets, Some(assets_before as i64));
    docker_ok(&[
        "tag",
        &format!("{}:v1.120.0", server_repo()),
        &format!("{}:v1.120.0", server_repo()),
    ]);
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version("v1.120.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    // It runs, on an empty cluster: the photos are gone from the database.
    let assets_now = stack.asset_count();
    assert!(assets_now < assets_before, "{assets_now} < {assets_before}");

    let s = guard.wait_status("DEGRADED", LONG, |s| {
        s.state.protection.verifies.degraded.is_some()
    });
    assert_degraded(&s, &pre.id, assets_before);
    let last = s.state.protection.verifies.last.clone().unwrap();
    assert!(!last.passed);
    assert_eq!(last.against.as_deref(), Some(pre.id.as_str()));
    // Not flagged by what is fine: the originals are still on disk, the version is right.
    for name in ["originals", "version", "ping", "containers"] {
        let c = last.checks.iter().find(|c| c.name == name).unwrap();
        assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
    }
    let log = guard.log();
    assert!(
        log.contains("the update has settled; verifying it"),
        "{log}"
    );
    assert!(
        log.contains("DEGRADED: verify after upgrade failed"),
        "{log}"
    );
    Degraded {
        stack,
        guard,
        received,
        pre,
        assets_before,
        assets_now,
        _snapshots: snapshots,
    }
}

#[test]
fn an_upgrade_onto_a_fresh_empty_database_is_degraded_until_acknowledged() {
    if !docker_available() {
        return;
    }
    // Bound, not `..`: the stack and the snapshot dir must live as long as the test.
    let Degraded {
        stack: _stack,
        guard,
        received,
        pre,
        assets_before,
        assets_now,
        _snapshots,
    } = upgraded_onto_an_empty_database();

    // The webhook: kind, the snapshot to restore, the failed line.
    let bodies = bodies_once(&received, "degraded", Duration::from_secs(20));
    let body = bodies
        .iter()
        .find(|b| b["kind"] == "degraded")
        .unwrap_or_else(|| panic!("no degraded notification: {bodies:#?}"));
    assert_eq!(body["snapshot"], pre.id.as_str());
    assert_eq!(body["from_version"], "v1.119.0");
    assert_eq!(body["to_version"], "v1.120.0");
    let message = body["message"].as_str().unwrap();
    eprintln!(
        "--- the DEGRADED notification ---\n{}\n{message}",
        body["title"]
    );
    assert!(
        message.contains(&format!(
            "assets: {assets_now} now, {assets_before} in the snapshot"
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!("`immich-guard restore {}`", pre.id)),
        "{message}"
    );

    // `status` for a person: the failed lines and the snapshot.
    let out = guard.cli(&["status"]);
    let said = text(&out);
    eprintln!("--- status ---\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("DEGRADED: verify after v1.119.0 → v1.120.0 failed"),
        "{said}"
    );
    assert!(said.contains("FAIL assets"), "{said}");
    assert!(
        said.contains(&format!("snapshot to restore: {}", pre.id)),
        "{said}"
    );
    let out = guard.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["protection"]["state"], "degraded");
    assert_eq!(
        json["protection"]["verifies"]["degraded"]["snapshot"],
        pre.id.as_str()
    );

    // A restarted daemon still shows it (protection.json), and does not verify the same
    // server again.
    let mut guard = guard;
    guard.terminate();
    let saved = std::fs::read_to_string(guard.dir.path().join("data/protection.json")).unwrap();
    assert!(saved.contains("\"degraded\": {"), "{saved}");
    let guard = guard.restart();
    let s = guard.wait_status("the stack again", Duration::from_secs(60), |s| {
        s.state.stack.is_some() && s.state.protection.project.is_some()
    });
    assert_degraded(&s, &pre.id, assets_before);

    // Acknowledged: no longer DEGRADED; the failed verify stays as the last result.
    let out = guard.cli(&["ack"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("acknowledged DEGRADED after v1.119.0 → v1.120.0"),
        "{said}"
    );
    let s = guard.status();
    assert_eq!(s.state.protection.state, ProtectState::Idle);
    assert!(s.state.protection.verifies.degraded.is_none());
    assert!(!s.state.protection.verifies.last.as_ref().unwrap().passed);
    assert!(!s.status_line.contains("DEGRADED"), "{}", s.status_line);
    let out = guard.cli(&["ack"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not DEGRADED"), "{}", text(&out));
}

/// The fix forward: `DB_DATA_LOCATION` back, `docker compose up -d`. The new server container
/// is verified again once it has run a crash-loop window; it passes, and DEGRADED is over.
#[test]
fn a_fix_brought_up_while_degraded_is_verified_again_and_clears_it() {
    if !docker_available() {
        return;
    }
    let Degraded {
        stack,
        guard,
        received,
        pre,
        assets_before,
        _snapshots,
        ..
    } = upgraded_onto_an_empty_database();
    let failed_on = stack.container_id("immich-server");
    stack.set_env("DB_DATA_LOCATION", &stack.db_data.display().to_string());
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version("v1.120.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(stack.container_id("immich-server"), failed_on, "recreated");
    assert!(stack.asset_count() >= assets_before);

    let s = guard.wait_status("DEGRADED cleared", LONG, |s| {
        s.state.protection.verifies.degraded.is_none()
    });
    let last = s.state.protection.verifies.last.clone().unwrap();
    assert!(last.passed, "{last:#?}");
    assert_eq!(last.reason, "server recreated while degraded");
    assert_eq!(last.against.as_deref(), Some(pre.id.as_str()));
    assert_ne!(s.state.protection.state, ProtectState::Degraded);
    let out = guard.cli(&["status"]);
    let said = text(&out);
    assert!(!said.contains("DEGRADED"), "{said}");
    assert!(
        said.contains("v1.119.0 → v1.120.0 passed against"),
        "{said}"
    );
    let bodies = bodies_once(&received, "recovered", Duration::from_secs(20));
    let body = bodies
        .iter()
        .find(|b| b["kind"] == "recovered")
        .unwrap_or_else(|| panic!("no recovered notification: {bodies:#?}"));
    assert_eq!(body["snapshot"], pre.id.as_str());
}
