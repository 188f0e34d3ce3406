//! Uploads noticed (issue 19, item 4), against a real Docker engine, a real PostgreSQL and
//! the stand-in server: `status` reports the assets uploaded in the last ten minutes; with
//! `protect.wait_for_quiet_uploads` a sealed freeze waits frozen until uploads stop (or the
//! bound passes); after a restore, `verify` lists the assets only the pre-restore snapshot
//! holds.
//!
//! While the new server is frozen it takes no uploads itself; the uploads that go on come
//! from the test writing asset rows as another writer of the same database would (a second
//! server replica): all the daemon reads is the asset table.

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use harness::compose::docker_ok;
use harness::guard::{Guard, cli, cli_config};
use harness::{Stack, StackSpec, docker_available, ensure_images};
use immich_guard::protect::ProtectState;
use immich_guard::status::StatusReport;

const V1: &str = "v1.119.0";
const V2: &str = "v1.120.0";
const LONG: Duration = Duration::from_secs(120);

fn guard_with(stack: &Stack, snapshots: &std::path::Path, extra: &str) -> Guard {
    let guard = Guard::watching(stack, snapshots, extra);
    guard.wait_status("a baseline", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    guard
}

/// The database's own count of assets received in the ten minutes before `at`, and the
/// newest of them (epoch ms).
fn db_uploads_before(stack: &Stack, at: DateTime<Utc>) -> (i64, i64) {
    let at = at.to_rfc3339();
    let line = stack.psql(&format!(
        "SELECT count(*) FILTER (WHERE \"createdAt\" > '{at}'::timestamptz - interval '10 minutes') || ' ' || (extract(epoch FROM max(\"createdAt\")) * 1000)::bigint FROM assets WHERE \"createdAt\" <= '{at}'::timestamptz"
    ));
    let (n, newest) = line.trim().split_once(' ').unwrap();
    (n.parse().unwrap(), newest.parse().unwrap())
}

#[test]
fn status_reports_the_assets_uploaded_in_the_last_ten_minutes() {
    if !docker_available() {
        return;
    }
    ensure_images(&[V1]);
    let stack = Stack::up(StackSpec::new(V1).env("STANDIN_UPLOAD_EVERY_MS", "300"));
    let snapshots = tempfile::tempdir().unwrap();
    // A phone keeps uploading for a while before the daemon starts.
    std::thread::sleep(Duration::from_secs(3));
    let guard = guard_with(&stack, snapshots.path(), "");
    let s = guard.wait_status("a reading of the uploads", LONG, |s| {
        s.state.uploads.is_some()
    });
    let seen = s.state.uploads.clone().unwrap();
    let n = seen
        .count()
        .unwrap_or_else(|| panic!("unknown: {seen:?}; log:\n{}", guard.log()));
    let (db_n, db_newest) = db_uploads_before(&stack, seen.read_at);
    eprintln!(
        "daemon: {n} uploads, newest {:?}; database: {db_n}",
        seen.newest()
    );
    // The seed, the boot's asset and ten or so uploads; the database counts up to the
    // reading's timestamp, taken just after the query ran (one upload may fall between).
    assert!(n >= 10, "{seen:?}");
    assert!(db_n == n || db_n == n + 1, "daemon {n}, database {db_n}");
    let newest = seen.newest().unwrap().timestamp_millis();
    assert!(
        (db_newest - newest).abs() <= 1 || db_n == n + 1,
        "newest {newest} vs {db_newest}"
    );

    // The CLI, as JSON and as text.
    let out = guard.cli(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["uploads"]["state"], "known", "{json}");
    assert!(json["uploads"]["last_10_min"].as_i64().unwrap() >= n);
    let report: StatusReport = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.state.uploads.is_some());
    let out = guard.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("assets uploaded in the last 10 minutes; a phone may be backing up"),
        "{text}"
    );
    assert!(text.contains("every 60 s"), "{text}");
}

/// Asset rows written every 400 ms until stopped, as another writer of the database would;
/// returns the time of the last one.
struct Uploader {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Option<DateTime<Utc>>>>,
}

impl Uploader {
    fn start(stack: &Stack) -> Uploader {
        let stop = Arc::new(AtomicBool::new(false));
        let psql = stack.psql_handle();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = None;
            while !flag.load(Ordering::SeqCst) {
                psql.try_query(
                    "INSERT INTO assets (id, \"ownerId\", \"originalPath\", checksum, \"createdAt\") SELECT gen_random_uuid(), id, '/data/upload/' || id || '/' || gen_random_uuid() || '.jpg', '\\x00', now() FROM users LIMIT 1",
                )
                .expect("an upload");
                last = Some(Utc::now());
                std::thread::sleep(Duration::from_millis(400));
            }
            last
        });
        Uploader {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> DateTime<Utc> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn paused(stack: &Stack) -> bool {
    docker_ok(&[
        "inspect",
        "-f",
        "{{.State.Paused}}",
        &stack.container_id("immich-server"),
    ])
    .trim()
        == "true"
}

/// A v1 stack, a daemon with `protect` keys, the v2 server recreated (frozen, snapshotted).
fn frozen_for_v2(protect: &str) -> (Stack, Guard, tempfile::TempDir, Uploader) {
    let images = ensure_images(&[V1, V2]);
    let stack = Stack::up(StackSpec::new(V1));
    let snapshots = tempfile::tempdir().unwrap();
    let guard = guard_with(&stack, snapshots.path(), &format!("[protect]\n{protect}\n"));
    let uploader = Uploader::start(&stack);
    stack.recreate_server(images.server(V2));
    let s = guard.wait_status("the sealed freeze waiting for uploads", LONG, |s| {
        s.state.protection.release_wait.is_some()
    });
    assert_eq!(s.state.protection.state, ProtectState::Frozen);
    assert!(paused(&stack), "frozen means paused");
    (stack, guard, snapshots, uploader)
}

#[test]
fn a_sealed_freeze_waits_frozen_while_uploads_go_on_and_goes_once_they_stop() {
    if !docker_available() {
        return;
    }
    let (stack, guard, _snapshots, uploader) =
        frozen_for_v2("wait_for_quiet_uploads = \"15s\"\nwait_for_quiet_max_minutes = 10");
    // Uploads go on for longer than the quiet time: it stays frozen, and says why.
    std::thread::sleep(Duration::from_secs(25));
    let s = guard.status();
    let wait = s.state.protection.release_wait.clone().unwrap_or_else(|| {
        panic!(
            "released while uploads went on: {:?}\n{}",
            s.state.protection,
            guard.log()
        )
    });
    assert!(paused(&stack));
    assert!(
        wait.waiting_for.starts_with("no upload for 15 s"),
        "{wait:?}"
    );
    assert!(
        wait.waiting_for.contains("a phone may be backing up"),
        "{wait:?}"
    );
    assert!(
        s.status_line.contains("waiting for no upload for 15 s"),
        "{}",
        s.status_line
    );
    let text = String::from_utf8_lossy(&guard.cli(&["status"]).stdout).to_string();
    assert!(
        text.contains("WAITING: snapshot ") && text.contains("protect.wait_for_quiet_uploads"),
        "{text}"
    );

    let last = uploader.stop();
    let uploaded = stack.asset_count();
    stack
        .wait_server_version(V2, LONG)
        .unwrap_or_else(|e| panic!("{e}\n{}", guard.log()));
    let s = guard.status();
    let release = s.state.protection.releases.last().unwrap().clone();
    assert!(!release.forced, "{release:?}");
    assert!(
        release.what.contains("no upload for 15 s")
            && release.what.contains("the uploads that arrived after"),
        "{release:?}"
    );
    assert!(
        release.at >= last + chrono::TimeDelta::seconds(15),
        "released at {} though the last upload was at {last}",
        release.at
    );
    // The snapshot that covers the change holds every upload: the second one, taken once
    // they stopped.
    let pre_start: Vec<_> = guard
        .list()
        .into_iter()
        .filter(|m| m.trigger == "pre-start")
        .collect();
    assert_eq!(pre_start.len(), 2, "{pre_start:?}");
    assert_eq!(pre_start[1].db.assets, Some(uploaded as i64));
    assert!(pre_start[0].db.assets < Some(uploaded as i64));
}

#[test]
fn uploads_that_never_stop_hold_the_server_only_until_the_bound() {
    if !docker_available() {
        return;
    }
    let (stack, guard, _snapshots, uploader) =
        frozen_for_v2("wait_for_quiet_uploads = 10\nwait_for_quiet_max_minutes = \"20s\"");
    let wait = guard.status().state.protection.release_wait.unwrap();
    assert_eq!(wait.until - wait.since, chrono::TimeDelta::seconds(20));
    stack
        .wait_server_version(V2, LONG)
        .unwrap_or_else(|e| panic!("{e}\n{}", guard.log()));
    uploader.stop();
    let release = guard
        .status()
        .state
        .protection
        .releases
        .last()
        .unwrap()
        .clone();
    assert!(
        release
            .what
            .contains("uploads went on for the whole wait (protect.wait_for_quiet_max_minutes)"),
        "{release:?}"
    );
    assert!(release.at >= wait.until, "{release:?} {wait:?}");
}

#[test]
fn verify_after_a_restore_lists_the_assets_uploaded_since_the_restored_snapshot() {
    if !docker_available() {
        return;
    }
    ensure_images(&[V1]);
    let stack = Stack::up(StackSpec::new(V1));
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(&stack, dir.path());
    let meta = harness::guard::snapshot_of(&stack, dir.path());
    // Uploaded after the snapshot: by the admin, and by a user added since (gone with the
    // restore, named from the pre-restore snapshot); paths that need COPY's escapes.
    stack.psql("INSERT INTO users (id, email, name) VALUES ('00000000-0000-4000-8000-0000000000f1', 'phone@example.com', 'Phone')");
    let added = [
        (
            "00000000-0000-4000-8000-00000000000a",
            "admin@example.com",
            "/data/upload/a/IMG 0001.jpg",
        ),
        (
            "00000000-0000-4000-8000-00000000000b",
            "phone@example.com",
            "/data/upload/b/été\tnuit.heic",
        ),
        (
            "00000000-0000-4000-8000-00000000000c",
            "phone@example.com",
            "/data/upload/b/back\\slash.mp4",
        ),
    ];
    for (id, owner, path) in added {
        stack.psql(&format!(
            "INSERT INTO assets (id, \"ownerId\", \"originalPath\", checksum) SELECT '{id}', id, E'{}', '\\x01' FROM users WHERE email = '{owner}'",
            path.replace('\\', "\\\\").replace('\t', "\\t")
        ));
    }
    let out = cli(&config, &["restore", &meta.id, "--yes"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(
            "UPLOADED AFTER THE RESTORED SNAPSHOT: 3 asset(s) only in pre-restore snapshot"
        ),
        "{said}"
    );

    let out = cli(&config, &["verify", "--json"]);
    let report: immich_guard::verify::Report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let n = report.not_restored.expect("the list after a restore");
    assert_eq!(n.count, Some(3), "{n:?}");
    let mut listed: Vec<(String, String, String)> = n
        .assets
        .iter()
        .map(|a| (a.id.clone(), a.owner.clone(), a.original_path.clone()))
        .collect();
    listed.sort();
    let expected: Vec<(String, String, String)> = added
        .iter()
        .map(|(i, o, p)| (i.to_string(), o.to_string(), p.to_string()))
        .collect();
    assert_eq!(listed, expected);
    assert!(n.assets.iter().all(|a| a.uploaded_at.is_some()));
    let journal = immich_guard::restore::journal::load(&dir.path().join("data"))
        .unwrap()
        .unwrap();
    assert_eq!(journal.pre_restore.as_deref(), Some(n.pre_restore.as_str()));
}
