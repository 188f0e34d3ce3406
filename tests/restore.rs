//! `immich-guard restore` against real stacks (real Docker, real PostgreSQL, the stand-in
//! server), run as the CLI with no daemon: the round trip back across a migrating upgrade,
//! a database that cannot start, a restore killed mid-way and finished by the same command
//! (the last time through a daemon), a tampered snapshot refused before anything stops, the
//! dry run, and a database that asks for a password on its socket; and the round trip with
//! the daemon running, which freezes, holds and halts nothing of the restore's own but
//! catches a crash loop after it. Each asserts on the database rows, the files and `.env`.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use harness::compose::{assert_env_pins, docker_ok};
use harness::guard::{cli, cli_config, cli_env, snapshot_of};
use harness::{Stack, StackSpec, docker_available, ensure_images};
use immich_guard::protect::ProtectState;
use immich_guard::restore::journal::{self, Journal, Step};
use immich_guard::snapshot::store::Meta;
use immich_guard::status::StatusReport;

const V1: &str = "v1.119.0";
const V2: &str = "v1.120.0";
const V2_MIGRATION: &str = "1731000000000-AddMemories";
const LONG: Duration = Duration::from_secs(120);

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Filler rows that make a dump (and its replay) big enough to be cut off half way.
const FILLER_ROWS: u32 = 150_000;

fn add_filler(stack: &Stack) {
    stack.psql(&format!(
        "CREATE TABLE filler AS SELECT i, repeat(md5(i::text), 8) AS pad FROM generate_series(1, {FILLER_ROWS}) i"
    ));
}

/// Every table of the public schema with its rows as text, sorted (the filler table as its
/// row count and a digest).
fn db_rows(stack: &Stack) -> BTreeMap<String, Vec<String>> {
    let tables = stack.psql(
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'",
    );
    tables
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let what = if t == "filler" {
                "count(*)::text || ' rows, md5 ' || md5(string_agg(r::text, E'\\n' ORDER BY r::text))"
            } else {
                "coalesce(string_agg(r::text, E'\\n' ORDER BY r::text), '')"
            };
            let rows = stack.psql(&format!("SELECT {what} FROM public.\"{t}\" r"));
            (
                t.to_string(),
                rows.lines().map(str::to_string).collect::<Vec<_>>(),
            )
        })
        .collect()
}

/// Files under `root` (relative paths) with their bytes.
fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            (
                e.path().strip_prefix(root).unwrap().display().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The originals (`upload/…jpg`) of a file listing.
fn originals(all: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    all.iter()
        .filter(|(p, _)| p.starts_with("upload/") && p.ends_with(".jpg"))
        .map(|(p, b)| (p.clone(), b.clone()))
        .collect()
}

fn journal_of(dir: &Path) -> Journal {
    journal::load(&dir.join("data"))
        .unwrap()
        .expect("a journal")
}

/// Upgrades to v2 (which migrates and uploads one asset on its boot), then deletes two of
/// the snapshot's originals with their rows, as a user deleting photos on v2 would. Returns
/// the deleted originals.
fn upgrade_and_delete(stack: &Stack, before: &Before) -> BTreeMap<String, Vec<u8>> {
    stack.set_env("IMMICH_VERSION", V2);
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version(V2, LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(stack.applied_migrations().iter().any(|m| m == V2_MIGRATION));
    // Two of the snapshot's originals (not v2's own upload).
    let deleted: BTreeMap<_, _> = originals(&before.files).into_iter().take(2).collect();
    for path in deleted.keys() {
        std::fs::remove_file(stack.upload.join(path)).unwrap();
        let id = Path::new(path).file_stem().unwrap().to_string_lossy();
        stack.psql(&format!("DELETE FROM assets WHERE id = '{id}'"));
    }
    deleted
}

/// After a restore of `meta`: the database holds the snapshot's rows (the asset table plus
/// exactly the one asset the v1 stand-in uploads on each boot), the deleted originals are back
/// with their bytes, the files added after the snapshot are in the pre-restore snapshot and
/// gone from the library, `.env` pins v1 with every other line kept, v1 answers.
fn assert_restored(
    stack: &Stack,
    dir: &Path,
    before: &Before,
    added: &BTreeMap<String, Vec<u8>>,
    deleted: &BTreeMap<String, Vec<u8>>,
) -> Journal {
    let (meta, rows_then, files_then, env_then) =
        (&before.meta, &before.rows, &before.files, &before.env);
    stack
        .wait_server_version(V1, LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let rows_now = db_rows(stack);
    assert_eq!(
        rows_now.keys().collect::<Vec<_>>(),
        rows_then.keys().collect::<Vec<_>>(),
        "the tables are the snapshot's (v2's memories tables gone)"
    );
    for (table, then) in rows_then {
        let now = &rows_now[table];
        if table == "assets" {
            let extra: Vec<_> = now.iter().filter(|r| !then.contains(r)).collect();
            assert!(
                then.iter().all(|r| now.contains(r)),
                "every asset row of the snapshot is back"
            );
            assert_eq!(extra.len(), 1, "only v1's boot upload is new: {extra:#?}");
        } else {
            assert_eq!(now, then, "table {table} equals the snapshot row for row");
        }
    }
    assert_eq!(stack.applied_migrations(), meta.db.migrations);

    let files_now = files(&stack.upload);
    for (path, bytes) in deleted {
        assert_eq!(
            files_now.get(path),
            Some(bytes),
            "{path} is back, same bytes"
        );
    }
    for (path, bytes) in originals(files_then) {
        assert_eq!(files_now.get(&path), Some(&bytes), "{path}");
    }
    let j = journal_of(dir);
    assert!(j.is_complete(), "{j:?}");
    assert_eq!(j.verify_passed, Some(true));
    let pre = j.pre_restore.clone().expect("a pre-restore snapshot");
    let pre_dir = dir.join("snapshots").join(&pre);
    let pre_meta: Meta =
        serde_json::from_slice(&std::fs::read(pre_dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(
        (pre_meta.trigger.as_str(), pre_meta.version.as_str()),
        ("pre-restore", V2)
    );
    for (path, bytes) in added {
        assert!(
            !files_now.contains_key(path) || !path.starts_with("upload/"),
            "{path} added after the snapshot is gone from the library"
        );
        assert_eq!(
            std::fs::read(pre_dir.join("storage").join(path))
                .ok()
                .as_ref(),
            Some(bytes),
            "{path} is kept in the pre-restore snapshot {pre}"
        );
    }
    // The .env as it was before the restore is in the pre-restore snapshot too.
    assert!(
        std::fs::read_to_string(pre_dir.join("config/.env"))
            .unwrap()
            .contains(&format!("IMMICH_VERSION={V2}"))
    );
    assert_env_pins(&stack.env_file, env_then, V1);
    let mode = std::fs::metadata(journal::path(&dir.join("data")))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the journal is owner-only");
    j
}

/// The stack on v1 with a snapshot; returns what it held.
struct Before {
    meta: Meta,
    rows: BTreeMap<String, Vec<String>>,
    files: BTreeMap<String, Vec<u8>>,
    env: String,
}

fn snapshot_v1(stack: &Stack, dir: &Path) -> Before {
    before(stack, snapshot_of(stack, dir))
}

fn before(stack: &Stack, meta: Meta) -> Before {
    Before {
        rows: db_rows(stack),
        files: files(&stack.upload),
        env: std::fs::read_to_string(&stack.env_file).unwrap(),
        meta,
    }
}

/// `immich-guard run` on a [`cli_config`] config (the CLI's data dir, snapshots and socket),
/// its output in `<dir>/daemon.log`; killed on drop.
struct Daemon {
    child: std::process::Child,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Daemon {
    /// Started, and answering `status`.
    fn start(config: &Path, dir: &Path) -> Daemon {
        Daemon::start_with(config, dir, &[])
    }

    /// Started with `env` set (a test hook such as `IMMICH_GUARD_RESTORE_KILL_AFTER`).
    fn start_with(config: &Path, dir: &Path, env: &[(&str, &str)]) -> Daemon {
        let log = dir.join("daemon.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = std::process::Command::new(harness::guard::GUARD_BIN)
            .arg("--config")
            .arg(config)
            .arg("run")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            config: config.to_path_buf(),
            log,
        };
        daemon.wait("the socket", |_| true);
        daemon
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_baseline(&self, version: &str) -> StatusReport {
        self.wait(&format!("the baseline {version}"), |s| {
            s.state
                .protection
                .baseline
                .as_ref()
                .map(|b| b.version.as_str())
                == Some(version)
        })
    }

    /// `status --json`, when the daemon answers.
    fn status(&self) -> Option<StatusReport> {
        let out = cli(&self.config, &["status", "--json"]);
        serde_json::from_slice(&out.stdout)
            .ok()
            .filter(|_| out.status.success())
    }

    fn wait(&self, what: &str, pred: impl Fn(&StatusReport) -> bool) -> StatusReport {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self.status()
                && pred(&s)
            {
                return s;
            }
            assert!(
                start.elapsed() < LONG,
                "timed out waiting for {what}; last status {:?}\nlog:\n{}",
                self.status().map(|s| s.status_line),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A successful restore that printed its plan, every step and what it did.
fn said_every_step(out: &Output) {
    let said = text(out);
    assert!(out.status.success(), "{said}");
    for needle in [
        "2. preserve: snapshot the current state",
        "[1/7] stop",
        "[2/7] preserve",
        "[3/7] database",
        "[7/7] verify",
        "current state kept as snapshot",
        "restored ",
    ] {
        assert!(said.contains(needle), "{needle:?} in:\n{said}");
    }
}

/// The images of `versions`, a stack up as `spec` says, a temp dir and a [`cli_config`]
/// config in it.
fn with_config(
    versions: &[&str],
    spec: StackSpec,
) -> (Stack, tempfile::TempDir, std::path::PathBuf) {
    ensure_images(versions);
    let stack = Stack::up(spec);
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(&stack, dir.path());
    (stack, dir, config)
}

/// A v1 stack, a temp dir and a [`cli_config`] config in it.
fn v1_with_config() -> (Stack, tempfile::TempDir, std::path::PathBuf) {
    with_config(&[V1], StackSpec::new(V1))
}

fn added_since(stack: &Stack, before: &Before) -> BTreeMap<String, Vec<u8>> {
    files(&stack.upload)
        .into_iter()
        .filter(|(p, _)| !before.files.contains_key(p))
        .collect()
}

#[test]
fn restore_brings_back_database_files_and_version_across_a_migrating_upgrade() {
    if !docker_available() {
        return;
    }
    let (stack, dir, config) = with_config(&[V1, V2], StackSpec::new(V1));
    let before = snapshot_v1(&stack, dir.path());
    let deleted = upgrade_and_delete(&stack, &before);
    let added = added_since(&stack, &before);
    assert!(
        added.keys().any(|p| p.starts_with("upload/")),
        "v2 uploaded an original: {added:?}"
    );

    let started = std::time::Instant::now();
    let out = cli(&config, &["restore", &before.meta.id, "--yes"]);
    let said = text(&out);
    eprintln!("restore took {:?}; it printed:\n{said}", started.elapsed());
    said_every_step(&out);
    let j = assert_restored(&stack, dir.path(), &before, &added, &deleted);
    assert_eq!(j.database, Some(journal::DbMode::Replay));
    assert_eq!(j.done, Step::ALL.to_vec());
    assert!(!j.no_preserve);

    // verify, on its own, agrees.
    let out = cli(&config, &["verify", "--against", &before.meta.id]);
    assert!(out.status.success(), "{}", text(&out));
    // The pin is recorded like any other.
    let pins = immich_guard::pin::records(&dir.path().join("data")).unwrap();
    assert_eq!(pins.last().map(|p| p.version.as_str()), Some(V1));
    // And the finished restore is in the history.
    let history =
        std::fs::read_to_string(dir.path().join("data").join(journal::HISTORY_FILE)).unwrap();
    assert_eq!(history.lines().count(), 1);
}

#[test]
fn dry_run_prints_every_step_and_a_tampered_snapshot_is_refused_before_anything_stops() {
    if !docker_available() {
        return;
    }
    let (stack, dir, config) = with_config(&[V1, V2], StackSpec::new(V1));
    let before = snapshot_v1(&stack, dir.path());
    stack.set_env("IMMICH_VERSION", V2);
    let env = std::fs::read(&stack.env_file).unwrap();
    let server = stack.state("immich-server").unwrap();
    let started_at = |s: &str| {
        docker_ok(&[
            "inspect",
            "--format",
            "{{.State.StartedAt}}",
            &stack.container_name(s),
        ])
    };
    let starts: Vec<String> = ["immich-server", "database", "redis"]
        .iter()
        .map(|s| started_at(s))
        .collect();
    let snapshots_now = || {
        std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .count()
    };
    let untouched = |what: &str| {
        assert_eq!(std::fs::read(&stack.env_file).unwrap(), env, "{what}: .env");
        let now: Vec<String> = ["immich-server", "database", "redis"]
            .iter()
            .map(|s| started_at(s))
            .collect();
        assert_eq!(now, starts, "{what}: nothing was stopped or started");
        assert_eq!(stack.state("immich-server").unwrap().status, "running");
        assert_eq!(snapshots_now(), 1, "{what}: no snapshot taken");
        assert!(
            !journal::path(&dir.path().join("data")).exists(),
            "{what}: no journal"
        );
        assert_eq!(stack.state("immich-server").unwrap().id, server.id);
    };

    let out = cli(&config, &["restore", &before.meta.id, "--dry-run"]);
    let said = text(&out);
    eprintln!("dry run printed:\n{said}");
    assert!(out.status.success(), "{said}");
    for needle in [
        format!("restore {} to snapshot {}", stack.project, before.meta.id),
        "checked: sealed; db.sql.zst and manifest.jsonl.zst match their recorded SHA-256".into(),
        format!(
            "1. stop: {}, {}, {}, so that nothing writes from here on",
            stack.container_name("immich-server"),
            stack.container_name("immich-machine-learning"),
            stack.container_name("redis")
        ),
        "2. preserve: snapshot the current state (trigger pre-restore): the database answers: dumped with pg_dumpall".into(),
        "3. database: drop database immich in".into(),
        "4. storage:".into(),
        format!("5. pin: {V1}"),
        format!("- IMMICH_VERSION={V2}"),
        format!("+ IMMICH_VERSION={V1}"),
        "6. start: docker".into(),
        format!("7. verify: immich-guard verify --against {}", before.meta.id),
        "dry run: nothing changed".into(),
    ] {
        assert!(said.contains(&needle), "{needle:?} in:\n{said}");
    }
    untouched("dry run");

    // Without --yes and without a terminal: refused, nothing done.
    let out = cli(&config, &["restore", &before.meta.id]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("run again with --yes"),
        "{}",
        text(&out)
    );
    untouched("no terminal");
    let out = cli(&config, &["restore", &before.meta.id, "--no-preserve"]);
    assert!(
        text(&out).contains("--no-preserve needs --yes"),
        "{}",
        text(&out)
    );

    // One byte of the dump changed: refused, naming the file.
    let dump = dir
        .path()
        .join("snapshots")
        .join(&before.meta.id)
        .join("db.sql.zst");
    let mut bytes = std::fs::read(&dump).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&dump, &bytes).unwrap();
    let out = cli(&config, &["restore", &before.meta.id, "--yes"]);
    let said = text(&out);
    eprintln!("tampered:\n{said}");
    assert!(!out.status.success());
    assert!(said.contains(&dump.display().to_string()), "{said}");
    assert!(said.contains("does not match the SHA-256"), "{said}");
    untouched("tampered dump");
    bytes[middle] ^= 0x01;
    std::fs::write(&dump, &bytes).unwrap();

    // The manifest too.
    let manifest = dump.with_file_name("manifest.jsonl.zst");
    let original = std::fs::read(&manifest).unwrap();
    let mut changed = original.clone();
    *changed.last_mut().unwrap() ^= 0x80;
    std::fs::write(&manifest, &changed).unwrap();
    let out = cli(&config, &["restore", &before.meta.id, "--yes"]);
    assert!(
        text(&out).contains(&manifest.display().to_string()),
        "{}",
        text(&out)
    );
    untouched("tampered manifest");
    std::fs::write(&manifest, &original).unwrap();

    // Not sealed (interrupted): refused.
    let snap = dir.path().join("snapshots").join(&before.meta.id);
    let partial = dir
        .path()
        .join("snapshots")
        .join(format!(".partial-{}", before.meta.id));
    std::fs::rename(&snap, &partial).unwrap();
    let out = cli(&config, &["restore", &before.meta.id, "--yes"]);
    assert!(text(&out).contains("is not sealed"), "{}", text(&out));
    untouched("not sealed");
}

fn killed(out: &Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    out.status.signal() == Some(9)
}

#[test]
fn a_restore_killed_mid_replay_and_between_database_and_storage_is_finished_by_the_same_command() {
    if !docker_available() {
        return;
    }
    ensure_images(&[V1, V2]);
    let stack = Stack::up(StackSpec::new(V1));
    add_filler(&stack);
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(&stack, dir.path());
    let before = snapshot_v1(&stack, dir.path());
    assert!(
        before.meta.dump.sql_bytes > 30 << 20,
        "{}",
        before.meta.dump.sql_bytes
    );
    let deleted = upgrade_and_delete(&stack, &before);
    let added = added_since(&stack, &before);
    let id = before.meta.id.as_str();

    // Killed once the first chunk of the dump is in psql.
    let out = cli_env(
        &config,
        &["restore", id, "--yes"],
        &[("IMMICH_GUARD_RESTORE_KILL_AFTER", "database-replay")],
    );
    assert!(killed(&out), "{}", text(&out));
    let j = journal_of(dir.path());
    assert_eq!(j.done, vec![Step::Stop, Step::Preserve]);
    let pre = j.pre_restore.clone().expect("preserved before the kill");
    // Nothing from before is lost: v2's database and files are in the pre-restore snapshot.
    let pre_dir = dir.path().join("snapshots").join(&pre);
    let pre_meta: Meta =
        serde_json::from_slice(&std::fs::read(pre_dir.join("meta.json")).unwrap()).unwrap();
    assert!(pre_meta.db.migrations.iter().any(|m| m == V2_MIGRATION));
    for path in added.keys() {
        assert!(pre_dir.join("storage").join(path).exists(), "{path}");
    }
    // status says so, and names the command that finishes it.
    for args in [&["status"][..], &["status", "--json"]] {
        let out = cli(&config, args);
        let said = text(&out);
        assert!(!out.status.success(), "{said}");
        assert!(
            said.contains(&format!("immich-guard restore {id} --yes")),
            "{args:?}: {said}"
        );
        assert!(said.contains("2 of 7 steps done, next: database"), "{said}");
    }
    let out = cli(&config, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["restore_incomplete"].as_str().is_some(),
        "{status:#}"
    );

    // A daemon started now runs, but does not protect (the restore's stops and starts are
    // not crashes or upgrades), and says why.
    {
        let daemon = Daemon::start(&config, dir.path());
        let line = daemon.status().unwrap().status_line;
        assert!(line.starts_with("NOT PROTECTING: restore of"), "{line}");
        assert!(
            line.contains(&format!("immich-guard restore {id} --yes")),
            "{line}"
        );
        // A release has nothing to act on.
        let out = cli(&config, &["release"]);
        assert!(!out.status.success());
        assert!(text(&out).contains("not protecting"), "{}", text(&out));
        drop(daemon);
        let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
        assert!(log.contains("not protecting: restore of"), "{log}");
        assert!(!log.contains("freez"), "{log}");
    }

    // Killed again between the database and the storage: the database is the snapshot's,
    // row for row (nothing runs that could write to it), the files are not back yet.
    let out = cli_env(
        &config,
        &["restore", id, "--yes"],
        &[("IMMICH_GUARD_RESTORE_KILL_AFTER", "database")],
    );
    let said = text(&out);
    assert!(killed(&out), "{said}");
    assert!(
        said.contains("continuing the interrupted restore"),
        "{said}"
    );
    assert!(said.contains("2. preserve (done)"), "{said}");
    let j = journal_of(dir.path());
    assert_eq!(j.done, vec![Step::Stop, Step::Preserve, Step::Database]);
    assert_eq!(db_rows(&stack), before.rows);
    for path in deleted.keys() {
        assert!(!stack.upload.join(path).exists(), "{path} is not back yet");
    }

    // The same command finishes it, this time through a daemon (which protects nothing
    // until then), without a second pre-restore snapshot.
    let daemon = Daemon::start(&config, dir.path());
    let out = cli(&config, &["restore", id, "--yes"]);
    let said = text(&out);
    eprintln!("finished:\n{said}\ndaemon log:\n{}", daemon.log());
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("continuing the interrupted restore"),
        "{said}"
    );
    let j = assert_restored(&stack, dir.path(), &before, &added, &deleted);
    assert_eq!(j.pre_restore.as_deref(), Some(pre.as_str()));
    let pre_restores = std::fs::read_dir(dir.path().join("snapshots"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with("pre-restore")
        })
        .count();
    assert_eq!(pre_restores, 1);
    let out = cli(&config, &["status"]);
    assert!(!text(&out).contains("RESTORE INCOMPLETE"), "{}", text(&out));
    // Protecting again, with the restored version as the baseline. Idle is waited for: a
    // test running beside this one may import a test image of another version, which this
    // daemon rightly snapshots as an image pull.
    let s = daemon.wait("the v1 baseline, idle", |s| {
        s.state
            .protection
            .baseline
            .as_ref()
            .map(|b| b.version.as_str())
            == Some(V1)
            && s.state.protection.state == ProtectState::Idle
    });
    assert!(s.state.restore_incomplete.is_none(), "{}", s.status_line);
}

#[test]
fn a_database_that_cannot_start_is_kept_as_files_and_replaced_by_a_working_one() {
    if !docker_available() {
        return;
    }
    let (stack, dir, config) = v1_with_config();
    let before = snapshot_v1(&stack, dir.path());

    // PostgreSQL refuses a data dir that says it is of another major version.
    docker_ok(&["stop", &stack.container_name("database")]);
    std::fs::write(stack.db_data.join("PG_VERSION"), "99\n").unwrap();
    let names_then: BTreeSet<String> = std::fs::read_dir(&stack.db_data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    docker_ok(&["start", &stack.container_name("database")]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        stack.try_psql("SELECT 1").is_err(),
        "the database must not answer"
    );

    let out = cli(&config, &["restore", &before.meta.id, "--yes"]);
    let said = text(&out);
    eprintln!("restore printed:\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(said.contains("cannot run"), "{said}");
    stack
        .wait_server_version(V1, LONG)
        .unwrap_or_else(|e| panic!("{e}"));

    let j = journal_of(dir.path());
    assert!(
        matches!(&j.database, Some(journal::DbMode::FreshCluster { reason, kept: None })
            if reason.contains("database files are incompatible with server")),
        "{:?}",
        j.database
    );
    // The broken data dir, whole, in the pre-restore snapshot.
    let pre = j.pre_restore.clone().unwrap();
    let kept = dir
        .path()
        .join("snapshots")
        .join(&pre)
        .join("database-files");
    assert_eq!(
        std::fs::read_to_string(kept.join("PG_VERSION")).unwrap(),
        "99\n"
    );
    let names_kept: BTreeSet<String> = std::fs::read_dir(&kept)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names_kept, names_then);
    // A working database with the snapshot's rows (and v1's one upload per boot).
    assert_eq!(
        std::fs::read_to_string(stack.db_data.join("PG_VERSION")).unwrap(),
        "15\n"
    );
    let rows = db_rows(&stack);
    assert_eq!(rows["users"], before.rows["users"]);
    assert_eq!(rows["migrations"], before.rows["migrations"]);
    assert!(
        before.rows["assets"]
            .iter()
            .all(|r| rows["assets"].contains(r))
    );
    assert_eq!(rows["assets"].len(), before.rows["assets"].len() + 1);
    let out = cli(&config, &["verify", "--against", &before.meta.id]);
    assert!(out.status.success(), "{}", text(&out));

    // That pre-restore snapshot holds no dump: it says so, and is not restored from.
    let out = cli(&config, &["restore", &pre, "--dry-run"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("holds no database dump"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_database_that_wants_a_password_is_restored_without_it_on_a_command_line_or_in_a_log() {
    if !docker_available() {
        return;
    }
    ensure_images(&[V1, V2]);
    let stack = Stack::up_hardened(V1);
    let password = stack.db_password.clone();
    add_filler(&stack);
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(&stack, dir.path());
    let before = snapshot_v1(&stack, dir.path());
    let deleted = upgrade_and_delete(&stack, &before);
    let added = added_since(&stack, &before);

    // Every process's command line in the database container, sampled for as long as the
    // restore runs.
    let db = stack.container_name("database");
    let sampler = "while [ ! -e /tmp/stop-sampling ]; do for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < \"$f\"; echo; done; done > /tmp/cmdlines 2>/dev/null";
    docker_ok(&["exec", "-d", &db, "sh", "-c", sampler]);
    let out = cli(&config, &["restore", &before.meta.id, "--yes"]);
    docker_ok(&["exec", &db, "touch", "/tmp/stop-sampling"]);
    std::thread::sleep(Duration::from_millis(300));
    let cmdlines = docker_ok(&["exec", &db, "cat", "/tmp/cmdlines"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert_restored(&stack, dir.path(), &before, &added, &deleted);
    assert!(
        cmdlines.lines().any(|l| l.contains("psql")),
        "the sampler never saw psql run"
    );
    let data = dir.path().join("data");
    for (what, text) in [
        ("the command lines in the database container", cmdlines),
        ("the restore's output", said),
        (
            "the journal",
            std::fs::read_to_string(journal::path(&data)).unwrap(),
        ),
        (
            "the restore history",
            std::fs::read_to_string(data.join(journal::HISTORY_FILE)).unwrap(),
        ),
        ("status", text(&cli(&config, &["status", "--json"]))),
    ] {
        assert!(!text.contains(&password), "the password is in {what}");
    }
}

#[test]
fn a_btrfs_snapshot_goes_back_as_the_subvolume_and_the_live_one_is_kept() {
    if !docker_available() {
        return;
    }
    let Some(fs) = harness::loopfs::LoopFs::btrfs() else {
        return;
    };
    ensure_images(&[V1, V2]);
    let library = fs.mnt.join("library");
    let out = std::process::Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(&library)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut stack = Stack::create(StackSpec::new(V1));
    stack.set_env("UPLOAD_LOCATION", &library.display().to_string());
    stack.upload = library.clone();
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_ready(stack.spec.ready_timeout)
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir_in(&fs.mnt).unwrap();
    let config = cli_config(&stack, dir.path());
    let before = snapshot_v1(&stack, dir.path());
    assert_eq!(
        before.meta.storage.method,
        immich_guard::snapshot::storage::StorageMethod::Btrfs
    );
    let deleted = upgrade_and_delete(&stack, &before);
    let added = added_since(&stack, &before);

    let out = cli(&config, &["restore", &before.meta.id, "--yes"]);
    let said = text(&out);
    eprintln!("btrfs restore printed:\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("the snapshot's subvolume is in place; the replaced one is kept as"),
        "{said}"
    );
    let j = assert_restored(&stack, dir.path(), &before, &added, &deleted);
    assert!(immich_guard::snapshot::storage::is_btrfs_subvolume(
        &library
    ));
    // The replaced subvolume is kept whole: v2's upload is in it, and so is what was deleted
    // from the library after the restore (nothing, here) — it is the library as it was.
    let [kept] = j.kept.as_slice() else {
        panic!("one kept subvolume: {:?}", j.kept)
    };
    assert!(immich_guard::snapshot::storage::is_btrfs_subvolume(kept));
    for (path, bytes) in &added {
        assert_eq!(
            std::fs::read(kept.join(path)).ok().as_ref(),
            Some(bytes),
            "{path}"
        );
    }
    stack.compose(&["down", "-t", "1"]);
}

/// Pause events of the project's containers between two instants (Unix seconds).
fn pauses(stack: &Stack, since: i64, until: i64) -> Vec<String> {
    harness::compose::lines(&harness::compose::docker(&[
        "events",
        "--since",
        &since.to_string(),
        "--until",
        &until.to_string(),
        "--filter",
        &format!("label=com.docker.compose.project={}", stack.project),
        "--filter",
        "event=pause",
        "--format",
        "{{.Actor.Attributes.name}}",
    ]))
}

fn snapshot_ids(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

#[test]
fn restore_with_the_daemon_running_freezes_holds_and_halts_nothing_and_a_crash_loop_after_it_is_caught()
 {
    if !docker_available() {
        return;
    }
    // The stand-in crashes at boot once this file (in the upload location) says so.
    let (stack, dir, config) = with_config(
        &[V1, V2],
        StackSpec::new(V1).env("STANDIN_CRASH_FILE", "/data/.standin-crash"),
    );
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str("\n[crash_loop]\ndeaths = 3\nwindow_secs = 120\n");
    std::fs::write(&config, toml).unwrap();
    let daemon = Daemon::start(&config, dir.path());
    daemon.wait_baseline(V1);

    // A snapshot through the daemon, then the upgrade under its protection.
    let out = cli(&config, &["snapshot", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let meta: Meta = serde_json::from_slice(&out.stdout).unwrap();
    let before = before(&stack, meta);
    let deleted = upgrade_and_delete(&stack, &before);
    let added = added_since(&stack, &before);
    let s = daemon.wait("v2 as the baseline, nothing pending", |s| {
        let p = &s.state.protection;
        p.baseline.as_ref().map(|b| b.version.as_str()) == Some(V2)
            && p.state == ProtectState::Idle
            && p.pending.is_none()
    });
    let pre_update = s.state.last_snapshot.expect("the pre-update snapshot").id;
    // v2 crash-loops and is halted, the case an incident recommends a restore for; the
    // admin has removed the cause (the stand-in's crash file).
    crash_at_boot(&stack);
    let s = daemon.wait("v2 halted", |s| !s.state.protection.halted.is_empty());
    let first_incident = s.state.protection.incident.clone().expect("an incident");
    std::fs::remove_file(stack.upload.join(".standin-crash")).unwrap();
    let snapshots_before = snapshot_ids(dir.path());
    assert!(snapshots_before.contains(&pre_update));
    let log_before = daemon.log().len();
    // The dry run beside the daemon: every step, nothing done, nothing said to the daemon.
    let out = cli(&config, &["restore", &before.meta.id, "--dry-run"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("7. verify") && said.contains("dry run: nothing changed"),
        "{said}"
    );
    assert!(!daemon.log()[log_before..].contains("restore begins"));

    // The restore through the daemon; status watched the whole time.
    let since = chrono::Utc::now().timestamp();
    let restore = {
        let (config, id) = (config.clone(), before.meta.id.clone());
        std::thread::spawn(move || cli(&config, &["restore", &id, "--yes"]))
    };
    let mut seen = Vec::new();
    let mut status_text = None;
    while !restore.is_finished() {
        if let Some(s) = daemon.status() {
            if status_text.is_none() && s.status_line.starts_with("RESTORING") {
                status_text = Some(text(&cli(&config, &["status"])));
            }
            seen.push((s.status_line.clone(), s.state.protection.state));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The running restore's journal is unfinished by definition: not shown as incomplete.
    let status_text = status_text.expect("status seen while restoring");
    assert!(!status_text.contains("RESTORE INCOMPLETE"), "{status_text}");
    let out = restore.join().unwrap();
    let until = chrono::Utc::now().timestamp() + 1;
    let said = text(&out);
    eprintln!(
        "restore printed:\n{said}\ndaemon log:\n{}",
        &daemon.log()[log_before..]
    );
    said_every_step(&out);
    assert_restored(&stack, dir.path(), &before, &added, &deleted);
    assert!(
        seen.iter()
            .any(|(line, _)| line.starts_with(&format!("RESTORING {}: step ", before.meta.id))),
        "status said RESTORING: {seen:?}"
    );
    // Halted (from before) until the restore ends; never frozen, held or degraded.
    assert!(
        seen.iter()
            .all(|(_, state)| matches!(state, ProtectState::Idle | ProtectState::Halted)),
        "never frozen, held or degraded: {seen:?}"
    );
    assert_eq!(pauses(&stack, since, until), Vec::<String>::new());

    // Past the .env debounce: the pin's edit is no upgrade to snapshot.
    std::thread::sleep(Duration::from_secs(3));
    let log = daemon.log()[log_before..].to_string();
    for never in [
        "froze the new server",
        "held the server",
        "immich_guard::protect: crash loop",
        "halted: restart policy",
        "incident bundle written",
    ] {
        assert!(!log.contains(never), "{never:?} in the daemon log:\n{log}");
    }
    let added_snapshots: Vec<String> = snapshot_ids(dir.path())
        .difference(&snapshots_before)
        .cloned()
        .collect();
    let j = journal_of(dir.path());
    assert_eq!(added_snapshots, vec![j.pre_restore.clone().unwrap()]);
    let s = daemon.status().unwrap();
    let p = &s.state.protection;
    assert_eq!(p.state, ProtectState::Idle, "{}", s.status_line);
    assert_eq!(p.baseline.as_ref().map(|b| b.version.as_str()), Some(V1));
    assert!(
        p.pending.is_none() && p.hold.is_none() && p.frozen.is_none(),
        "{p:?}"
    );
    // The halt from before is over (the restore started the server again); its incident
    // is the newest still, none was added.
    assert!(p.halted.is_empty(), "{p:?}");
    assert_eq!(p.incident.as_ref().map(|i| &i.id), Some(&first_incident.id));
    assert_eq!(
        docker_ok(&[
            "inspect",
            "-f",
            "{{.HostConfig.RestartPolicy.Name}}",
            &stack.container_name("immich-server"),
        ]),
        "always"
    );
    assert_eq!(
        s.state.protection.baseline.as_ref().unwrap().image_id,
        stack.state("immich-server").unwrap().image
    );

    // A crash loop after the restore is caught as always.
    crash_at_boot(&stack);
    let s = daemon.wait("the server halted again", |s| {
        !s.state.protection.halted.is_empty()
            && s.state.protection.incident.as_ref().map(|i| &i.id) != Some(&first_incident.id)
    });
    assert_eq!(s.state.protection.state, ProtectState::Halted);
    assert_eq!(
        s.state.protection.incident.as_ref().unwrap().service,
        "immich-server"
    );
}

/// From now on the stand-in server crashes at every boot; restarted to boot once.
fn crash_at_boot(stack: &Stack) {
    std::fs::write(stack.upload.join(".standin-crash"), "boot").unwrap();
    docker_ok(&["restart", &stack.container_name("immich-server")]);
}

// The way back never loses data (issue 18): uploads during a restore, a daemon killed
// mid-restore with the stack writing again before the rerun, a refusal, `--abandon`.

/// Asset row ids now (empty while the database cannot be read).
fn asset_ids(db: &harness::compose::Psql) -> BTreeSet<String> {
    db.try_query("SELECT id::text FROM assets")
        .map(|out| out.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Every original file seen (with its bytes) and every asset row id seen.
type Seen = (BTreeMap<String, Vec<u8>>, BTreeSet<String>);

/// Watches the live library and the asset table until stopped: every original file (with
/// its bytes) and every asset row id seen at any moment.
struct Watcher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Seen>,
}

impl Watcher {
    fn start(stack: &Stack) -> Watcher {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, upload, db) = (stop.clone(), stack.upload.clone(), stack.psql_handle());
        let thread = std::thread::spawn(move || {
            let (mut seen_files, mut seen_rows) = (BTreeMap::new(), BTreeSet::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for (path, bytes) in originals(&files(&upload)) {
                    seen_files.entry(path).or_insert(bytes);
                }
                seen_rows.extend(asset_ids(&db));
                std::thread::sleep(Duration::from_millis(50));
            }
            (seen_files, seen_rows)
        });
        Watcher { stop, thread }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The asset ids in a snapshot's dump, replayed into a scratch PostgreSQL.
fn dumped_asset_ids(snapshot: &Path) -> BTreeSet<String> {
    let sql = zstd::decode_all(std::fs::File::open(snapshot.join("db.sql.zst")).unwrap()).unwrap();
    let scratch = harness::compose::ScratchPostgres::start();
    let out = scratch.restore(&sql);
    assert!(out.status.success(), "{}", scratch.logs());
    scratch
        .psql("immich", "SELECT id::text FROM assets")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every file seen is somewhere the restore named, with its bytes: the live library, a
/// pre-restore snapshot's storage, or the restore's `kept/` folder; every row seen is in a
/// pre-restore snapshot's dump or in the live database.
fn assert_nothing_lost(
    stack: &Stack,
    dir: &Path,
    j: &Journal,
    seen_files: &BTreeMap<String, Vec<u8>>,
    seen_rows: &BTreeSet<String>,
) {
    let pre: Vec<_> = j
        .all_pre_restores()
        .iter()
        .map(|id| dir.join("snapshots").join(id))
        .collect();
    assert!(!pre.is_empty(), "{j:?}");
    let kept = dir.join("data/kept").join(j.id());
    let places: Vec<std::path::PathBuf> = std::iter::once(stack.upload.clone())
        .chain(pre.iter().map(|p| p.join("storage")))
        .chain(std::iter::once(kept))
        .collect();
    for (path, bytes) in seen_files {
        assert!(
            places
                .iter()
                .any(|p| std::fs::read(p.join(path)).ok().as_ref() == Some(bytes)),
            "{path} (seen in the library) is in none of {places:?}"
        );
    }
    let mut rows = asset_ids(&stack.psql_handle());
    for p in &pre {
        rows.extend(dumped_asset_ids(p));
    }
    let lost: Vec<_> = seen_rows.difference(&rows).collect();
    assert!(lost.is_empty(), "asset rows lost: {lost:?}");
}

#[test]
fn a_restore_while_phones_upload_keeps_every_file_and_row_that_existed() {
    if !docker_available() {
        return;
    }
    let (stack, dir, config) = with_config(
        &[V1],
        StackSpec::new(V1).env("STANDIN_UPLOAD_EVERY_MS", "100"),
    );
    let daemon = Daemon::start(&config, dir.path());
    daemon.wait_baseline(V1);
    let out = cli(&config, &["snapshot", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let meta: Meta = serde_json::from_slice(&out.stdout).unwrap();
    let watcher = Watcher::start(&stack);
    // Uploads go on after the snapshot, and during the restore until it stops the server.
    std::thread::sleep(Duration::from_secs(3));
    let out = cli(&config, &["restore", &meta.id, "--yes"]);
    let said = text(&out);
    let (seen_files, seen_rows) = watcher.finish();
    eprintln!("restore printed:\n{said}\ndaemon log:\n{}", daemon.log());
    assert!(out.status.success(), "{said}");
    assert!(
        seen_rows.len() > meta.db.assets.unwrap_or(0) as usize + 10,
        "uploads went on: {} rows seen, {:?} in the snapshot",
        seen_rows.len(),
        meta.db.assets
    );
    let j = journal_of(dir.path());
    assert!(j.is_complete() && j.verify_passed == Some(true), "{j:?}");
    // The stop comes first: the pre-restore snapshot is the last state written.
    let stop = said.find("[1/7] stop").expect("the stop step");
    let preserve = said.find("[2/7] preserve").expect("the preserve step");
    assert!(stop < preserve, "{said}");
    // What the storage step says is true: each removed file is held by the pre-restore
    // snapshot it names, the rest is where it says.
    let pre = j.pre_restore.clone().expect("a pre-restore snapshot");
    assert!(
        said.contains("removed or overwritten, each held by a pre-restore snapshot")
            && said.contains(&format!(" in {pre})")),
        "{said}"
    );
    assert_nothing_lost(&stack, dir.path(), &j, &seen_files, &seen_rows);
}

#[test]
fn a_daemon_killed_mid_restore_and_the_stack_writing_again_before_the_rerun_lose_nothing() {
    if !docker_available() {
        return;
    }
    let (stack, dir, config) = with_config(
        &[V1],
        StackSpec::new(V1).env("STANDIN_UPLOAD_EVERY_MS", "200"),
    );
    let meta = snapshot_of(&stack, dir.path());
    let watcher = Watcher::start(&stack);
    {
        let daemon = Daemon::start_with(
            &config,
            dir.path(),
            &[("IMMICH_GUARD_RESTORE_KILL_AFTER", "preserve")],
        );
        daemon.wait_baseline(V1);
        std::thread::sleep(Duration::from_secs(1));
        let out = cli(&config, &["restore", &meta.id, "--yes"]);
        assert!(!out.status.success(), "{}", text(&out));
    }
    let j = journal_of(dir.path());
    assert_eq!(j.done, vec![Step::Stop, Step::Preserve], "{j:?}");
    let first = j.pre_restore.clone().expect("kept before the kill");
    // Docker starts the server again (as at boot, restart: always) and phones upload.
    docker_ok(&["start", &stack.container_name("immich-server")]);
    stack
        .wait_server_ready(LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let db = stack.psql_handle();
    let ids_then = asset_ids(&db);
    let deadline = std::time::Instant::now() + LONG;
    while asset_ids(&db).len() < ids_then.len() + 5 {
        assert!(std::time::Instant::now() < deadline, "no uploads");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The same command through a daemon again: the stack ran, so its state is kept again.
    let daemon = Daemon::start(&config, dir.path());
    let out = cli(&config, &["restore", &meta.id, "--yes"]);
    let said = text(&out);
    let (seen_files, seen_rows) = watcher.finish();
    eprintln!("rerun printed:\n{said}\ndaemon log:\n{}", daemon.log());
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("the stack ran since the state was kept: keeping it again"),
        "{said}"
    );
    let j = journal_of(dir.path());
    assert!(j.is_complete(), "{j:?}");
    let all = j.all_pre_restores();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0], first);
    assert_nothing_lost(&stack, dir.path(), &j, &seen_files, &seen_rows);
    // Retention never took the pre-restore snapshots of an unfinished restore.
    for id in &all {
        assert!(dir.path().join("snapshots").join(id).is_dir(), "{id}");
    }
}

/// `chattr +i` on a path, undone on drop (also when the test fails).
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        docker_free_chattr("+i", path);
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        docker_free_chattr("-i", &self.0);
    }
}

fn docker_free_chattr(flag: &str, path: &Path) {
    let out = std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chattr {flag} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_refused_restore_starts_the_stack_again_leaves_no_journal_and_the_next_upgrade_is_protected() {
    if !docker_available() {
        return;
    }
    let (stack, dir, config) = with_config(&[V1, V2], StackSpec::new(V1));
    let daemon = Daemon::start(&config, dir.path());
    daemon.wait_baseline(V1);
    let out = cli(&config, &["snapshot", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let meta: Meta = serde_json::from_slice(&out.stdout).unwrap();
    let server = stack.container_name("immich-server");

    // The pre-restore snapshot cannot be written: the restore is refused at its preserve.
    let out = {
        let _frozen = Immutable::set(&dir.path().join("snapshots"));
        cli(&config, &["restore", &meta.id, "--yes"])
    };
    let said = text(&out);
    eprintln!(
        "refused restore printed:\n{said}\ndaemon log:\n{}",
        daemon.log()
    );
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("keeping the current state failed, so nothing was changed"),
        "{said}"
    );
    assert!(
        said.contains(&format!("nothing was changed: started {server}")),
        "{said}"
    );
    assert!(!journal::path(&dir.path().join("data")).exists());
    let history =
        std::fs::read_to_string(dir.path().join("data").join(journal::HISTORY_FILE)).unwrap();
    let ended: Journal = serde_json::from_str(history.lines().last().unwrap()).unwrap();
    assert!(ended.refused.is_some(), "{ended:?}");
    stack
        .wait_server_ready(LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let s = daemon.wait("protecting again", |s| {
        s.state.restoring.is_none()
            && s.state.restore_incomplete.is_none()
            && s.state.protection.state == ProtectState::Idle
    });
    assert!(
        !s.status_line.starts_with("NOT PROTECTING"),
        "{}",
        s.status_line
    );

    // The next upgrade is snapshotted before v2 migrates.
    stack.set_env("IMMICH_VERSION", V2);
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version(V2, LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let s = daemon.wait("v2 as the baseline", |s| {
        s.state
            .protection
            .baseline
            .as_ref()
            .map(|b| b.version.as_str())
            == Some(V2)
            && s.state.protection.state == ProtectState::Idle
    });
    let covering = s
        .state
        .last_snapshot
        .expect("a snapshot before the upgrade");
    assert_ne!(covering.id, meta.id, "a new snapshot covers the upgrade");
    let covered: Meta = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join("snapshots")
                .join(&covering.id)
                .join("meta.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(covered.version, V1);
    assert!(
        !covered.db.migrations.iter().any(|m| m == V2_MIGRATION),
        "taken before v2 migrated: {:?}",
        covered.db.migrations
    );
}

#[test]
fn an_unfinished_restore_is_abandoned_after_saying_its_state_and_a_rerun_option_is_never_ignored() {
    if !docker_available() {
        return;
    }
    let (stack, dir, config) = with_config(&[V1, V2], StackSpec::new(V1));
    let before = snapshot_v1(&stack, dir.path());
    upgrade_and_delete(&stack, &before);
    let id = before.meta.id.as_str();
    let out = cli_env(
        &config,
        &["restore", id, "--yes", "--no-preserve"],
        &[("IMMICH_GUARD_RESTORE_KILL_AFTER", "database")],
    );
    assert!(killed(&out), "{}", text(&out));
    let j = journal_of(dir.path());
    assert!(j.no_preserve && j.is_done(Step::Database), "{j:?}");

    // Without --no-preserve the rerun cannot keep what is already gone: refused, and says so.
    let out = cli(&config, &["restore", id, "--yes"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("began with --no-preserve and has already changed the data"),
        "{said}"
    );
    assert_eq!(journal_of(dir.path()), j, "the refusal changed nothing");

    // Abandoned: its state first, then the journal ends in the history.
    let out = cli(&config, &["restore", "--abandon", "--yes"]);
    let said = text(&out);
    eprintln!("abandon printed:\n{said}");
    assert!(out.status.success(), "{said}");
    for needle in [
        format!("unfinished restore of {id}"),
        format!("database: replayed from {id}"),
        "files: not put back yet".to_string(),
        "the state before the restore: NOT kept (--no-preserve)".to_string(),
        format!("{} exited", stack.container_name("immich-server")),
        "next: database and files may not match".to_string(),
        format!("the unfinished restore of {id} is abandoned"),
    ] {
        assert!(said.contains(&needle), "{needle:?} in:\n{said}");
    }
    assert!(!journal::path(&dir.path().join("data")).exists());
    let history =
        std::fs::read_to_string(dir.path().join("data").join(journal::HISTORY_FILE)).unwrap();
    let ended: Journal = serde_json::from_str(history.lines().last().unwrap()).unwrap();
    assert!(
        ended.abandoned_at.is_some() && ended.snapshot == id,
        "{ended:?}"
    );
    let out = cli(&config, &["status"]);
    assert!(!text(&out).contains("RESTORE INCOMPLETE"), "{}", text(&out));
    let out = cli(&config, &["restore", "--abandon", "--yes"]);
    assert!(
        text(&out).contains("no unfinished restore"),
        "{}",
        text(&out)
    );

    // A daemon started now protects.
    let daemon = Daemon::start(&config, dir.path());
    let s = daemon.wait("a status", |_| true);
    assert!(
        s.state.restore_incomplete.is_none() && !s.status_line.starts_with("NOT PROTECTING"),
        "{}",
        s.status_line
    );
}

/// Issue 18: `keep_last = 2`, two snapshots A and B of the running version, `restore A`:
/// the pre-restore snapshot runs no retention, so A is still there when the restore reads
/// it (it used to be deleted between the seal and `[3/7] database`), and B stays as well.
#[test]
fn restoring_with_keep_last_2_keeps_the_snapshot_it_restores() {
    if !docker_available() {
        return;
    }
    let (stack, dir, config) = v1_with_config();
    let text_of = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text_of.replacen("[snapshots]\n", "[snapshots]\nkeep_last = 2\n", 1),
    )
    .unwrap();
    let a = snapshot_of(&stack, dir.path());
    stack.psql("CREATE TABLE after_a (x int)");
    let b = snapshot_of(&stack, dir.path());

    let out = cli(&config, &["restore", &a.id, "--yes"]);
    said_every_step(&out);
    let j = journal_of(dir.path());
    assert!(j.is_complete(), "{j:?}");
    let kept = j.pre_restore.clone().expect("a pre-restore snapshot");
    assert_eq!(
        snapshot_ids(dir.path()),
        BTreeSet::from([a.id.clone(), b.id.clone(), kept]),
        "{}",
        text(&out)
    );
    // A's state is back: the table made after it is gone.
    let found = stack.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'after_a'");
    assert_eq!(found.trim(), "0");
}
