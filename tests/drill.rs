//! Restore drills (src/drill/) against a real Docker engine and PostgreSQL: a good snapshot
//! passes (with the daemon down and through it) and `list` says so; a truncated dump and a
//! dump from a newer PostgreSQL fail, and under "before-release" the update the snapshot
//! guarded is held (or released with fail_open, recorded); a drill container is gone after
//! the daemon is killed mid-drill and started again; retention keeps the newest passed drill.

mod harness;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::guard::{Guard, cli, cli_config, snapshot_of, snapshot_with};
use harness::images::{TEST_LABEL, build_dockerfile, ensure_images, postgres_image, tag};
use harness::{Stack, StackSpec, docker_available};
use immich_guard::protect::HoldKind;
use immich_guard::snapshot::store::{DUMP_FILE, DrillResult, META_FILE, Meta};

const LONG: Duration = Duration::from_secs(120);

/// The drill containers a data dir's daemon (or CLI) has now.
fn drill_containers(data_dir: &Path) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "-q",
            "--filter",
            "label=immich-guard.drill",
            "--filter",
            &format!("label=immich-guard.data-dir={}", data_dir.display()),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn drilled(out: &std::process::Output) -> DrillResult {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn read_meta(snapshots: &Path, id: &str) -> Meta {
    serde_json::from_slice(&std::fs::read(snapshots.join(id).join(META_FILE)).unwrap()).unwrap()
}

/// Replaces the snapshot's dump with `sql` (zstd) and records its checksum, as if pg_dumpall
/// had written it so: the drill must find the fault by replaying, not by the checksum.
fn rewrite_dump(snapshots: &Path, id: &str, sql: &[u8]) {
    let dir = snapshots.join(id);
    let bytes = zstd::encode_all(sql, 3).unwrap();
    std::fs::write(dir.join(DUMP_FILE), &bytes).unwrap();
    let mut meta = read_meta(snapshots, id);
    use sha2::Digest;
    meta.dump.sha256 = format!("{:x}", sha2::Sha256::digest(&bytes));
    meta.dump.bytes = bytes.len() as u64;
    meta.dump.sql_bytes = sql.len() as u64;
    std::fs::write(
        dir.join(META_FILE),
        serde_json::to_vec_pretty(&meta).unwrap(),
    )
    .unwrap();
}

fn dump_sql(snapshots: &Path, id: &str) -> Vec<u8> {
    zstd::decode_all(&std::fs::read(snapshots.join(id).join(DUMP_FILE)).unwrap()[..]).unwrap()
}

#[test]
fn a_good_snapshot_passes_its_drill_with_the_daemon_down_and_through_it() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::new("v1.119.0").seed_assets(5));
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(&stack, dir.path());
    let meta = snapshot_of(&stack, dir.path());
    assert!(meta.db_image.is_some(), "the database image is recorded");

    // The daemon is down: the drill runs in the CLI process.
    let out = cli(&config, &["drill", &meta.id, "--json"]);
    let r = drilled(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && r.passed, "{r:?}\n{stderr}");
    assert!(
        stderr.contains("drilling") && stderr.contains("replaying"),
        "{stderr}"
    );
    assert!(r.first_error.is_none());
    assert!(r.files_checked > 0 && r.sample_hashed > 0, "{r:?}");
    assert_eq!(r.sample_against, "readable at the recorded size");
    assert!(r.scratch.starts_with("tmpfs"), "{r:?}");
    assert_eq!(r.image, postgres_image());
    assert!(r.replay_ms > 0 && r.duration_ms >= r.replay_ms);
    assert_eq!(
        read_meta(&dir.path().join("snapshots"), &meta.id).drill,
        Some(r)
    );
    let table = String::from_utf8_lossy(&cli(&config, &["list"]).stdout).to_string();
    let line = table.lines().find(|l| l.starts_with(&meta.id)).unwrap();
    assert!(line.contains(" passed "), "{table}");
    assert!(drill_containers(&dir.path().join("data")).is_empty());
    // The live database was never touched: same counts.
    assert_eq!(stack.asset_count() as i64, meta.db.assets.unwrap());

    // Through the daemon: its own drill, shown in `status`; a manual snapshot is drilled
    // after its seal.
    let guard = Guard::watching(&stack, &dir.path().join("snapshots"), "");
    guard.wait_status("stack discovered", Duration::from_secs(30), |s| {
        s.state.stack.is_some()
    });
    let out = guard.cli(&["drill"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", guard.log());
    assert!(
        text.contains(&format!("drill of {}: passed", meta.id)),
        "{text}"
    );
    let status = guard.status();
    let seen = status.state.drill.as_ref().unwrap();
    assert_eq!(seen.snapshot, meta.id);
    assert!(seen.result.as_ref().unwrap().passed);
    let status_text = String::from_utf8_lossy(&guard.cli(&["status"]).stdout).to_string();
    assert!(status_text.contains("restore drill: "), "{status_text}");

    let out = guard.cli(&["snapshot"]);
    assert!(out.status.success(), "{}", guard.log());
    let s = guard.wait_status("the manual snapshot drilled", LONG, |s| {
        s.state
            .drill
            .as_ref()
            .is_some_and(|d| Some(&d.snapshot) != Some(&meta.id) && d.result.is_some())
    });
    assert!(
        s.state.drill.unwrap().result.unwrap().passed,
        "{}",
        guard.log()
    );
    assert!(guard.list().iter().all(|m| m.drill_passed()));
    assert!(drill_containers(&guard.dir.path().join("data")).is_empty());
}

#[test]
fn a_truncated_or_changed_dump_fails_its_drill() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::new("v1.119.0").seed_assets(5));
    let dir = tempfile::tempdir().unwrap();
    let snapshots = dir.path().join("snapshots");
    let config = cli_config(&stack, dir.path());
    let meta = snapshot_of(&stack, dir.path());

    // Cut mid-way (a dump that stopped early), checksum recorded as if it were whole.
    let sql = dump_sql(&snapshots, &meta.id);
    rewrite_dump(&snapshots, &meta.id, &sql[..sql.len() / 2]);
    let out = cli(&config, &["drill", &meta.id, "--json"]);
    let r = drilled(&out);
    assert!(!out.status.success() && !r.passed, "{r:?}");
    let error = r.first_error.clone().unwrap();
    assert!(
        error.contains("psql stopped") || error.contains("differs from meta.json"),
        "{error}"
    );
    assert_eq!(read_meta(&snapshots, &meta.id).drill, Some(r));
    let table = String::from_utf8_lossy(&cli(&config, &["list"]).stdout).to_string();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&meta.id) && l.contains(" FAILED ")),
        "{table}"
    );

    // A dump changed after the seal: refused by its checksum before anything is started.
    let other = snapshot_of(&stack, dir.path());
    let path = snapshots.join(&other.id).join(DUMP_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let r = drilled(&cli(&config, &["drill", &other.id, "--json"]));
    assert!(!r.passed);
    assert!(
        r.first_error
            .as_deref()
            .unwrap()
            .contains("does not match the SHA-256"),
        "{r:?}"
    );
    assert_eq!(r.replay_ms, 0);
    assert!(drill_containers(&dir.path().join("data")).is_empty());
}

/// A variant of the test database image whose `pg_dumpall` writes what a newer one writes
/// first (PostgreSQL 17's `SET transaction_timeout = 0;`, unknown to 15), then the real dump.
fn newer_dump_image() -> String {
    ensure_images(&[]);
    let name = tag("postgres:15-newer-dump");
    // printf's own escapes (the RUN line is single-quoted): \n a newline, \047 a single
    // quote, \042 a double quote.
    let wrapper = r#"#!/bin/sh\necho \047SET transaction_timeout = 0;\047\nexec /usr/lib/postgresql/15/bin/pg_dumpall \042$@\042\n"#;
    let dockerfile = format!(
        "FROM {base}\nLABEL {TEST_LABEL}=1\nRUN mkdir -p /opt/newer && printf '{wrapper}' > /opt/newer/pg_dumpall && chmod 755 /opt/newer/pg_dumpall\nENV PATH=/opt/newer:/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/bin:/bin\n",
        base = postgres_image()
    );
    build_dockerfile(&name, &dockerfile);
    name
}

/// A v1.119.0 stack whose database runs the newer-dump image.
fn stack_with_newer_dumps() -> Stack {
    ensure_images(&["v1.119.0", "v1.120.0"]);
    let image = newer_dump_image();
    let stack = Stack::up(StackSpec::new("v1.119.0").boot_delay_ms(3000));
    let compose = std::fs::read_to_string(&stack.compose_file).unwrap();
    let compose = compose.replace(
        &format!("image: {}\n", postgres_image()),
        &format!("image: {image}\n"),
    );
    std::fs::write(&stack.compose_file, compose).unwrap();
    stack.compose(&["up", "-d", "database"]);
    stack.wait_db_ready(LONG);
    stack
}

#[test]
fn a_dump_from_a_newer_postgres_fails_its_drill_and_the_update_is_held() {
    if !docker_available() {
        return;
    }
    let stack = stack_with_newer_dumps();
    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(&stack, snapshots.path(), "");
    guard.wait_status("a baseline", Duration::from_secs(60), |s| {
        s.state.protection.baseline.is_some()
    });
    let migrations_before = stack.applied_migrations();

    stack.set_env("IMMICH_VERSION", "v1.120.0");
    stack.compose(&["up", "-d"]);
    let s = guard.wait_status("a hold", LONG, |s| s.state.protection.hold.is_some());
    let hold = s.state.protection.hold.unwrap();
    assert_eq!(hold.kind, HoldKind::DrillFailed, "{hold:?}");
    assert!(
        hold.reason.contains("transaction_timeout"),
        "{}",
        hold.reason
    );
    assert!(s.status_line.starts_with("HELD"), "{}", s.status_line);
    // Held: the new server never migrates.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(stack.state("immich-server").unwrap().status, "paused");
    assert_eq!(stack.applied_migrations(), migrations_before);
    let failed: Vec<Meta> = guard
        .list()
        .into_iter()
        .filter(|m| m.drill_failed())
        .collect();
    assert!(!failed.is_empty(), "{:?}", guard.list());
    assert!(drill_containers(&guard.dir.path().join("data")).is_empty());

    // `release --force` lets it go, recorded as forced.
    let out = guard.cli(&["release", "--force"]);
    assert!(out.status.success(), "{out:?}");
    stack
        .wait_server_version("v1.120.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let p = guard.status().state.protection;
    assert!(
        p.hold.is_none() && p.releases.last().is_some_and(|r| r.forced),
        "{p:?}"
    );
}

#[test]
fn with_fail_open_a_failed_drill_releases_the_update_and_is_recorded() {
    if !docker_available() {
        return;
    }
    let stack = stack_with_newer_dumps();
    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(&stack, snapshots.path(), "\n[protect]\nfail_open = true\n");
    guard.wait_status("a baseline", Duration::from_secs(60), |s| {
        s.state.protection.baseline.is_some()
    });
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version("v1.120.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let p = guard.status().state.protection;
    assert!(p.hold.is_none(), "{p:?}");
    let release = p.releases.last().unwrap();
    assert!(release.forced, "{release:?}");
    assert!(
        release.what.contains("fail-open") && release.what.contains("restore drill failed"),
        "{release:?}"
    );
}

#[test]
fn a_drill_container_is_removed_after_the_daemon_is_killed_mid_drill() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::new("v1.119.0").seed_assets(5));
    let snapshots = tempfile::tempdir().unwrap();
    let mut config = immich_guard::config::Config::default();
    config.snapshots.dir = Some(snapshots.path().to_path_buf());
    let meta = snapshot_with(&stack, config);
    let mut guard = Guard::watching(&stack, snapshots.path(), "");
    guard.wait_status("stack discovered", Duration::from_secs(30), |s| {
        s.state.stack.is_some()
    });
    let data = guard.dir.path().join("data");
    let mut drill = Command::new(harness::guard::GUARD_BIN)
        .arg("--config")
        .arg(&guard.config_path)
        .args(["drill", &meta.id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while drill_containers(&data).is_empty() {
        assert!(
            start.elapsed() < LONG,
            "no drill container; log:\n{}",
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    guard.kill();
    let _ = drill.wait();
    assert!(
        !drill_containers(&data).is_empty(),
        "left behind by the kill"
    );
    let guard = guard.restart();
    let start = Instant::now();
    // The engine drops the container before the daemon's remove call returns and logs it:
    // wait for both.
    while !drill_containers(&data).is_empty()
        || !guard
            .log()
            .contains("removed a drill container an earlier run left behind")
    {
        assert!(
            start.elapsed() < LONG,
            "leftover not removed; log:\n{}",
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn retention_keeps_the_newest_snapshot_whose_drill_passed() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::new("v1.119.0").seed_assets(3));
    let dir = tempfile::tempdir().unwrap();
    let config_path = cli_config(&stack, dir.path());
    let snapshots = dir.path().join("snapshots");
    let drilled_one = snapshot_of(&stack, dir.path());
    assert!(drilled(&cli(&config_path, &["drill", &drilled_one.id, "--json"])).passed);
    let mut config = immich_guard::config::Config::default();
    config.snapshots.dir = Some(snapshots.clone());
    config.snapshots.keep_last = 1;
    let middle = snapshot_with(&stack, config.clone());
    // Sealed in another second: the ids differ and order by time.
    std::thread::sleep(Duration::from_millis(1100));
    let newest = snapshot_with(&stack, config);
    let kept: Vec<String> = immich_guard::snapshot::store::Store::open(&snapshots)
        .unwrap()
        .list()
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert!(kept.contains(&drilled_one.id), "{kept:?}");
    assert!(kept.contains(&newest.id), "{kept:?}");
    assert!(!kept.contains(&middle.id), "{kept:?}");
}
