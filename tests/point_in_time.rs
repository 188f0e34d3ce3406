//! One point in time (issue 19, item 2), against a real Docker engine, a real PostgreSQL and
//! the stand-in uploading continuously (`STANDIN_UPLOAD_EVERY_MS`): a snapshot taken while the
//! server runs holds a database and a file tree that agree, the writers run again afterwards,
//! also after a SIGKILL of the daemon while they are paused and a restart, and after a
//! snapshot that fails.
//!
//! "Agree" is read from the snapshot itself: the asset rows of the dump's COPY block and the
//! originals in its `storage/`. Every row has its file. Every file has its row, except at most
//! the one upload the pause caught between writing its file and inserting its row (the
//! stand-in, like Immich, writes the file first): that row must then be in the live database
//! once the server runs again, i.e. it was an upload in flight, not one lost.

mod harness;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use harness::guard::Guard;
use harness::immutable::Immutable;
use harness::{Stack, StackSpec, docker_available};
use immich_guard::snapshot::pause::{PauseMethod, RECORD_FILE};
use immich_guard::snapshot::store::{DUMP_FILE, Meta, STORAGE_DIR};

const LONG: Duration = Duration::from_secs(120);
/// An upload every 20 ms: a dump or a tree that took longer than that without a pause
/// would disagree by many assets.
const UPLOAD_EVERY_MS: &str = "20";

fn uploading() -> Stack {
    Stack::up(StackSpec::default().env("STANDIN_UPLOAD_EVERY_MS", UPLOAD_EVERY_MS))
}

/// The `originalPath`s of the asset rows in the dump (the COPY block of `public.assets`).
fn rows_in_dump(snapshot: &Path) -> BTreeSet<String> {
    let sql = zstd::decode_all(&std::fs::read(snapshot.join(DUMP_FILE)).unwrap()[..]).unwrap();
    let sql = String::from_utf8(sql).unwrap();
    let mut lines = sql.lines();
    let header = lines
        .by_ref()
        .find(|l| l.starts_with("COPY public.assets ("))
        .expect("the dump has the assets' COPY block");
    let columns: Vec<&str> = header["COPY public.assets (".len()..]
        .split(')')
        .next()
        .unwrap()
        .split(", ")
        .collect();
    let at = columns
        .iter()
        .position(|c| *c == "\"originalPath\"")
        .unwrap();
    lines
        .take_while(|l| *l != "\\.")
        .map(|l| l.split('\t').nth(at).unwrap().to_string())
        .collect()
}

/// The originals in the snapshot's storage (`upload/` and `library/`), as the server names
/// them (`/data/...`).
fn originals_in(snapshot: &Path) -> BTreeSet<String> {
    let storage = snapshot.join(STORAGE_DIR);
    let mut found = BTreeSet::new();
    for folder in ["upload", "library"] {
        for entry in walkdir::WalkDir::new(storage.join(folder))
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file() && e.file_name() != ".immich")
        {
            let rel = entry.path().strip_prefix(&storage).unwrap();
            found.insert(format!("/data/{}", rel.display()));
        }
    }
    found
}

fn live_paths(stack: &Stack) -> BTreeSet<String> {
    stack
        .psql("SELECT string_agg(\"originalPath\", '|') FROM assets")
        .split('|')
        .map(str::to_string)
        .collect()
}

/// The snapshot's database and files agree (see the module comment), and the writers were
/// paused for it and run again.
fn assert_one_point(stack: &Stack, meta: &Meta, snapshot: &Path) {
    let rows = rows_in_dump(snapshot);
    let files = originals_in(snapshot);
    assert!(rows.len() >= 4, "{} rows", rows.len());
    let without_file: Vec<_> = rows.difference(&files).collect();
    assert!(
        without_file.is_empty(),
        "rows whose original is not in the snapshot: {without_file:?}"
    );
    let without_row: Vec<_> = files.difference(&rows).cloned().collect();
    assert!(
        without_row.len() <= 1,
        "{} files without their row (the database and the tree are not of one moment): {without_row:?}",
        without_row.len()
    );
    assert_eq!(
        meta.db.assets,
        Some(rows.len() as i64),
        "facts of the point"
    );
    let pause = meta.pause.as_ref().expect("the pause is recorded");
    assert_eq!(pause.method, PauseMethod::DockerPause, "{pause:?}");
    assert!(
        pause
            .containers
            .contains(&stack.container_name("immich-server")),
        "{pause:?}"
    );
    assert_running_again(stack);
    if let Some(in_flight) = without_row.first() {
        assert!(
            live_paths(stack).contains(in_flight),
            "{in_flight} has no row in the snapshot nor in the live database: not an upload in flight"
        );
    }
}

/// The server and machine learning run (not paused) and the server uploads again.
fn assert_running_again(stack: &Stack) {
    for service in ["immich-server", "immich-machine-learning"] {
        let state = stack.state(service).unwrap();
        assert_eq!(state.status, "running", "{service}: {state:?}");
    }
    let before = stack.asset_count();
    let start = Instant::now();
    while stack.asset_count() <= before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the server does not upload again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A daemon on `stack` that has found it (a snapshot asked before would find no Docker yet).
fn watching(stack: &Stack, snapshots: &Path) -> Guard {
    let guard = Guard::watching(stack, snapshots, "");
    guard.wait_status("a baseline", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    guard
}

fn sealed(guard: &Guard, trigger: &str) -> Meta {
    guard
        .list()
        .into_iter()
        .rev()
        .find(|m| m.trigger == trigger)
        .unwrap_or_else(|| panic!("no {trigger} snapshot; log:\n{}", guard.log()))
}

#[test]
fn a_manual_snapshot_while_uploads_go_on_holds_one_point_in_time() {
    if !docker_available() {
        return;
    }
    let stack = uploading();
    let snapshots = tempfile::tempdir().unwrap();
    let guard = watching(&stack, snapshots.path());
    let out = guard.cli(&["snapshot"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", guard.log());
    // The progress says what was paused and for how long.
    assert!(stderr.contains("resumed: writers paused"), "{stderr}");
    let meta = sealed(&guard, "manual");
    assert_one_point(&stack, &meta, &snapshots.path().join(&meta.id));
    assert!(!snapshots.path().join(RECORD_FILE).exists());
    let table = String::from_utf8_lossy(&guard.cli(&["list"]).stdout).into_owned();
    assert!(table.lines().next().unwrap().contains("PAUSE"), "{table}");
    let short = meta.pause.as_ref().unwrap().short();
    assert!(table.contains(&format!(" {short} ")), "{short} in\n{table}");
}

#[test]
fn an_env_edit_snapshot_while_uploads_go_on_holds_one_point_in_time() {
    if !docker_available() {
        return;
    }
    let stack = uploading();
    let snapshots = tempfile::tempdir().unwrap();
    let guard = watching(&stack, snapshots.path());
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    guard.wait_status("a sealed pre-update snapshot", LONG, |s| {
        s.state.last_snapshot.is_some()
    });
    let meta = sealed(&guard, "pre-update");
    assert_one_point(&stack, &meta, &snapshots.path().join(&meta.id));
    // Protection did not take the snapshot's pause for someone else's.
    assert!(
        !guard
            .log()
            .contains("no freeze of immich-guard is recorded"),
        "{}",
        guard.log()
    );
}

/// Many originals, so the storage tree (built while the writers are paused) lasts long
/// enough to kill the daemon in the middle of it.
fn add_library(stack: &Stack, files: u64) {
    for i in 0..files {
        let dir = stack
            .upload
            .join(format!("library/admin/{}/{:02}", 2010 + i % 15, 1 + i % 12));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("IMG_{i:06}.jpg")), i.to_le_bytes()).unwrap();
    }
}

#[test]
fn a_daemon_killed_while_the_writers_are_paused_resumes_them_when_it_starts_again() {
    if !docker_available() {
        return;
    }
    let stack = uploading();
    add_library(&stack, 80_000);
    // Paused by someone else before: not the snapshot's to resume.
    let redis = stack.container_name("redis");
    harness::compose::docker_ok(&["pause", &redis]);
    let snapshots = tempfile::tempdir().unwrap();
    let mut guard = watching(&stack, snapshots.path());
    let config = guard.config_path.clone();
    let client = std::thread::spawn(move || harness::guard::cli(&config, &["snapshot"]));
    let record = snapshots.path().join(RECORD_FILE);
    let start = Instant::now();
    while !(record.exists() && stack.state("immich-server").unwrap().status == "paused") {
        assert!(
            start.elapsed() < LONG,
            "the server was never paused; log:\n{}",
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    guard.kill();
    let _ = client.join();
    assert_eq!(stack.state("immich-server").unwrap().status, "paused");

    let again = guard.restart();
    let start = Instant::now();
    while stack.state("immich-server").unwrap().status != "running" {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not resumed; log:\n{}",
            again.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Logged once the resume is done (the server may run a moment before).
    while !again
        .log()
        .contains("resumed the writers an interrupted snapshot had paused")
    {
        assert!(start.elapsed() < Duration::from_secs(30), "{}", again.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!record.exists(), "the record goes once resumed");
    assert_running_again(&stack);
    assert_eq!(
        stack.state("redis").unwrap().status,
        "paused",
        "nothing the snapshot did not pause is unpaused"
    );
    harness::compose::docker_ok(&["unpause", &redis]);
}

#[test]
fn a_snapshot_whose_storage_fails_resumes_the_writers() {
    if !docker_available() {
        return;
    }
    let stack = uploading();
    // A hard link to an immutable file is refused (EPERM): the storage tree fails.
    let photo = stack.upload.join("library/admin/2024/IMG_0001.jpg");
    std::fs::create_dir_all(photo.parent().unwrap()).unwrap();
    std::fs::write(&photo, b"photo").unwrap();
    let Some(_immutable) = Immutable::set(&photo, &stack.upload) else {
        return;
    };
    let snapshots = tempfile::tempdir().unwrap();
    let guard = watching(&stack, snapshots.path());
    let out = guard.cli(&["snapshot"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("IMG_0001.jpg"), "{stderr}");
    assert!(stderr.contains("resumed: writers paused"), "{stderr}");
    assert!(guard.list().is_empty());
    assert!(!snapshots.path().join(RECORD_FILE).exists());
    assert_running_again(&stack);
}
