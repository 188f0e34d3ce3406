//! Snapshot benchmarks against the tools an admin would use by hand, same machine, same run:
//!
//! - DB dump: `snapshot::db::dump` vs `docker exec <db> pg_dumpall | zstd -3 > file` on a
//!   database of at least 200 MB (target ratio ≤ 1.05).
//! - Storage: the hard-link tree of 200,000 files in an Immich-shaped tree (year/month
//!   folders, thumbs) vs `cp -al` (target ratio ≤ 0.8).
//!
//! - Content hashes (snapshot/hashes.rs), the pass after the seal: over the same 200,000-file
//!   tree (the per-file cost) and over `IMMICH_GUARD_BENCH_HASH_MB` MiB of 1 MiB files (the
//!   read rate), unlimited and at the default `snapshots.hash_rate_mb`, vs `sha256sum` on the
//!   same files. The storage step (what a freeze waits for) is timed beside it: the pass is
//!   not part of it, it runs on the sealed snapshot afterwards.
//!
//! - The pause (snapshot/pause.rs): a whole `snapshot::take` of a running stack with the
//!   same database and 200,000 files in its upload location, the stand-in uploading; the
//!   writers' pause from meta.json (target < 5 s), beside the storage step it mostly is. On
//!   btrfs (a loop-mounted image, root only) the tree's moment is fixed by a subvolume
//!   snapshot: the time to that moment is timed on the same 200,000 files.
//!
//! Run: `cargo bench --bench snapshot` (real Docker and PostgreSQL, a few minutes);
//! `IMMICH_GUARD_BENCH_ONLY=hashes` runs the content-hash rows alone (no Docker).
//! `IMMICH_GUARD_BENCH_ROWS` and `IMMICH_GUARD_BENCH_FILES` scale the inputs; `..._RUNS`
//! sets the runs per side (median reported).

#[path = "common.rs"]
#[allow(dead_code)] // the latency table is for the latency benches
mod common;

use common::{alternate, make_library, median, row, sh};
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::{Stack, StackSpec};
use immich_guard::snapshot::db;
use immich_guard::snapshot::hashes::{self, Finished, Flow, PassOptions};
use immich_guard::snapshot::storage::{Options, Plan, StorageMethod, snapshot_tree};
use immich_guard::snapshot::store::{MANIFEST_FILE, META_FILE, STORAGE_DIR, Store};

fn bench_dump(runs: u64, rows: u64) -> (Duration, Duration, u64) {
    let stack = Stack::up(StackSpec::default());
    stack.psql(&format!(
        "CREATE TABLE filler AS SELECT g, md5(g::text) || md5((g * 7)::text) AS a, \
         repeat(md5(g::text), 3) AS b FROM generate_series(1, {rows}) g"
    ));
    let size: u64 = stack
        .psql("SELECT pg_database_size(current_database())")
        .parse()
        .unwrap();
    let container = stack.container_name("database");
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let docker = bollard::Docker::connect_with_local_defaults().unwrap();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let ours_file = dir.path().join(format!("ours-{i}.sql.zst"));
        let theirs_file = dir.path().join(format!("theirs-{i}.sql.zst"));
        let mut run_ours = || {
            let start = Instant::now();
            // As a snapshot dumps: of an exported point (pg_dumpall of the rest, pg_dump of
            // the Immich database with --snapshot).
            runtime.block_on(async {
                let point = db::Point::take(&stack.db_access()).await.unwrap();
                db::dump(
                    &docker,
                    "unix:///var/run/docker.sock",
                    &container,
                    &stack.db_access(),
                    Some(&point),
                    &ours_file,
                )
                .await
                .unwrap();
                point.end().await;
            });
            ours.push(start.elapsed());
        };
        let mut run_theirs = || {
            theirs.push(sh(&format!(
                "docker exec {container} pg_dumpall --clean --if-exists -U postgres | zstd -3 -q > {}",
                theirs_file.display()
            )))
        };
        alternate(i, &mut run_ours, &mut run_theirs);
        std::fs::remove_file(&ours_file).ok();
        std::fs::remove_file(&theirs_file).ok();
    }
    (median(ours), median(theirs), size)
}

/// The pause of real snapshots: (median pause, median storage step, runs' pauses in ms).
fn bench_pause(
    runs: u64,
    rows: u64,
    files: u64,
) -> (
    Duration,
    Duration,
    Vec<u64>,
    immich_guard::snapshot::store::DrillResult,
) {
    let stack = Stack::up(StackSpec::default().env("STANDIN_UPLOAD_EVERY_MS", "50"));
    stack.psql(&format!(
        "CREATE TABLE filler AS SELECT g, md5(g::text) || md5((g * 7)::text) AS a, \
         repeat(md5(g::text), 3) AS b FROM generate_series(1, {rows}) g"
    ));
    make_library(&stack.upload, files);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let docker = bollard::Docker::connect_with_local_defaults().unwrap();
    let mut config = immich_guard::config::Config::default();
    config.stack.project = Some(stack.project.clone());
    let snapshots = tempfile::tempdir_in(stack.upload.parent().unwrap()).unwrap();
    config.snapshots.dir = Some(snapshots.path().to_path_buf());
    config.snapshots.keep_last = 1;
    let host = "unix:///var/run/docker.sock";
    let found = runtime
        .block_on(immich_guard::discover::discover(&docker, host, &config))
        .unwrap();
    let (mut pauses, mut steps) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let request = immich_guard::snapshot::Request {
            trigger: "manual".into(),
            ..Default::default()
        };
        let taken = runtime
            .block_on(immich_guard::snapshot::take(
                &docker,
                host,
                &found,
                &config,
                &request,
                &|_| {},
            ))
            .unwrap();
        let pause = taken.meta.pause.expect("a pause is recorded");
        assert!(taken.meta.storage.files >= files);
        pauses.push(Duration::from_millis(pause.duration_ms));
        steps.push(Duration::from_millis(taken.meta.storage.duration_ms));
    }
    let all = pauses.iter().map(|d| d.as_millis() as u64).collect();
    // The newest snapshot's restore drill, as the daemon runs it after a seal (src/drill/):
    // a scratch database from the live image, the replay, the counts and the originals.
    let newest = immich_guard::drill::newest(snapshots.path()).unwrap();
    let live = immich_guard::drill::Live::of(Some(&found));
    let ctx = immich_guard::drill::Context {
        docker: &docker,
        host,
        config: &config,
        live: &live,
    };
    let drill = runtime
        .block_on(immich_guard::drill::run(&ctx, &newest, None, &|_| {}))
        .unwrap();
    assert!(drill.passed, "{:?}", drill.first_error);
    (median(pauses), median(steps), all, drill)
}

/// On a loop-mounted btrfs with the upload location a subvolume of `files` files: the time
/// from the start of the storage step to its moment being fixed (the subvolume snapshot),
/// and the whole step (the manifest listed from the snapshot afterwards). None without root.
fn bench_btrfs_freeze(runs: u64, files: u64) -> Option<(Duration, Duration)> {
    let fs_ = harness::loopfs::LoopFs::new("mkfs.btrfs", &["-q"], 2048)?;
    let upload = fs_.mnt.join("upload");
    sh(&format!(
        "btrfs subvolume create {} > /dev/null",
        upload.display()
    ));
    make_library(&upload, files);
    let snapshots = fs_.mnt.join("snapshots");
    std::fs::create_dir(&snapshots).unwrap();
    let (mut frozen, mut whole) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let plan =
            immich_guard::snapshot::storage::choose_method(&upload, &snapshots, false).unwrap();
        assert_eq!(plan.method, StorageMethod::Btrfs);
        let dir = snapshots.join(format!("s{i}"));
        std::fs::create_dir(&dir).unwrap();
        let start = Instant::now();
        let at = std::cell::Cell::new(None);
        immich_guard::snapshot::storage::snapshot_tree_frozen(
            &upload,
            &dir,
            STORAGE_DIR,
            &dir.join(MANIFEST_FILE),
            &plan,
            &Options::default(),
            &|| at.set(Some(start.elapsed())),
        )
        .unwrap();
        whole.push(start.elapsed());
        frozen.push(at.get().expect("frozen"));
        immich_guard::snapshot::storage::remove_snapshot_dir(&dir).unwrap();
    }
    Some((median(frozen), median(whole)))
}

fn bench_storage(runs: u64, files: u64) -> (Duration, Duration) {
    let root = tempfile::tempdir().unwrap();
    let library = root.path().join("library-root");
    make_library(&library, files);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let dest = root.path().join("dest");
        let manifest = root.path().join("manifest.zst");
        let plan = Plan::walking(StorageMethod::Hardlink);
        let mut run_ours = || {
            let start = Instant::now();
            let tree = snapshot_tree(
                &library,
                root.path(),
                "dest",
                &manifest,
                &plan,
                &Options::default(),
            )
            .unwrap();
            ours.push(start.elapsed());
            assert_eq!(tree.files, files);
            std::fs::remove_dir_all(&dest).unwrap();
        };
        let mut run_theirs = || {
            theirs.push(sh(&format!(
                "cp -al {} {}",
                library.display(),
                dest.display()
            )));
            std::fs::remove_dir_all(&dest).unwrap();
        };
        alternate(i, &mut run_ours, &mut run_theirs);
    }
    (median(ours), median(theirs))
}

/// A sealed hard-link snapshot `s` of `library` under `root/snapshots`; its dir and how long
/// the storage step took.
fn sealed_snapshot(
    root: &std::path::Path,
    library: &std::path::Path,
) -> (std::path::PathBuf, Duration) {
    let store = Store::open(&root.join("snapshots")).unwrap();
    let partial = store.begin("s").unwrap();
    let start = Instant::now();
    let tree = snapshot_tree(
        library,
        partial.path(),
        STORAGE_DIR,
        &partial.path().join(MANIFEST_FILE),
        &Plan::walking(StorageMethod::Hardlink),
        &Options::default(),
    )
    .unwrap();
    let storage_step = start.elapsed();
    let now = chrono::Utc::now();
    let meta = serde_json::from_value(serde_json::json!({
        "format": 1, "id": "s", "trigger": "bench", "label": null, "project": "bench",
        "version": "v1.119.0", "image_id": null, "repo_digests": [], "env_version": null,
        "started_at": now, "sealed_at": now, "db": db::DbFacts::default(),
        "dump": db::DumpFile::default(), "storage": tree, "upload_location": library,
        "config_files": [], "size_bytes": 0
    }))
    .unwrap();
    (partial.seal(&meta).unwrap(), storage_step)
}

/// Bytes this process read from storage (or the page cache), from /proc/self/io.
fn read_chars() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("rchar: ")
                    .and_then(|n| n.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// One content-hash pass over the snapshot at `dir` (its record removed first, so it runs
/// whole): its time and the bytes it read.
fn one_pass(dir: &std::path::Path, rate: u64) -> (Duration, u64) {
    let meta_path = dir.join(META_FILE);
    let mut meta: immich_guard::snapshot::store::Meta =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta.hashes = None;
    meta.check = None;
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let before = read_chars();
    let start = Instant::now();
    let done = hashes::run_pass(dir, &PassOptions { rate }, &|| Flow::Go).unwrap();
    let took = start.elapsed();
    let Finished::Done { check, .. } = done else {
        panic!("{done:?}")
    };
    assert!(check.passed, "{check:?}");
    (took, read_chars() - before)
}

struct HashRows {
    files: u64,
    storage_step: Duration,
    small: (Duration, Duration, u64),
    big_mb: u64,
    big: (Duration, Duration, u64),
    throttled: Duration,
}

fn bench_hashes(runs: u64, files: u64, big_mb: u64) -> HashRows {
    let root = tempfile::tempdir().unwrap();
    let library = root.path().join("library-root");
    make_library(&library, files);
    let (dir, storage_step) = sealed_snapshot(root.path(), &library);
    let sum = |dir: &std::path::Path| {
        format!(
            "find {} -type f -print0 | xargs -0 sha256sum > /dev/null",
            dir.join(STORAGE_DIR).display()
        )
    };
    let compare = |dir: &std::path::Path| {
        let (mut ours, mut theirs, mut bytes) = (Vec::new(), Vec::new(), 0);
        for i in 0..runs {
            let mut run_ours = || {
                let (took, read) = one_pass(dir, 0);
                ours.push(took);
                bytes = read;
            };
            let mut run_theirs = || theirs.push(sh(&sum(dir)));
            alternate(i, &mut run_ours, &mut run_theirs);
        }
        (median(ours), median(theirs), bytes)
    };
    let small = compare(&dir);
    drop(root);

    let root = tempfile::tempdir().unwrap();
    let library = root.path().join("library-root");
    for i in 0..big_mb {
        let folder = library.join(format!("library/admin/{}", 2010 + i % 15));
        std::fs::create_dir_all(&folder).unwrap();
        let bytes: Vec<u8> = (0..1u64 << 20).map(|b| (b * 31 + i) as u8).collect();
        std::fs::write(folder.join(format!("IMG_{i:06}.jpg")), bytes).unwrap();
    }
    let (dir, _) = sealed_snapshot(root.path(), &library);
    let big = compare(&dir);
    let default_rate = immich_guard::config::Config::default()
        .snapshots
        .hash_rate_mb;
    let (throttled, _) = one_pass(&dir, default_rate * 1_000_000);
    HashRows {
        files,
        storage_step,
        small,
        big_mb,
        big,
        throttled,
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too: only run when asked.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // IMMICH_GUARD_BENCH_ONLY=storage|dump|hashes runs one part (only the dump needs Docker).
    let only = std::env::var("IMMICH_GUARD_BENCH_ONLY").unwrap_or_default();
    let runs = common::env_num("IMMICH_GUARD_BENCH_RUNS", 3);
    let rows = common::env_num("IMMICH_GUARD_BENCH_ROWS", 1_200_000);
    let files = common::env_num("IMMICH_GUARD_BENCH_FILES", 200_000);
    let dump = ((only.is_empty() || only == "dump") && harness::docker_available())
        .then(|| bench_dump(runs, rows));
    let tree = (only.is_empty() || only == "storage").then(|| bench_storage(runs, files));
    let big_mb = common::env_num("IMMICH_GUARD_BENCH_HASH_MB", 1024);
    let hashed = (only.is_empty() || only == "hashes").then(|| bench_hashes(runs, files, big_mb));
    let pause = ((only.is_empty() || only == "pause") && harness::docker_available())
        .then(|| bench_pause(runs, rows, files));
    let btrfs = (only.is_empty() || only == "pause")
        .then(|| bench_btrfs_freeze(runs, files))
        .flatten();
    println!();
    println!(
        "median of {runs} runs each, alternating; {} cores",
        common::cores()
    );
    common::table_header();
    if let Some((ours, theirs, db_size)) = dump {
        row(
            &format!("DB dump, {} MB database", db_size >> 20),
            ours,
            theirs,
            "docker exec pg_dumpall | zstd -3",
            1.05,
        );
    }
    if let Some((ours, theirs)) = tree {
        row(
            &format!("hardlink tree, {files} files"),
            ours,
            theirs,
            "cp -al",
            0.8,
        );
    }
    if let Some((pause, step, all, drill)) = &pause {
        println!(
            "| {:<34} | {:>9.2} s | {:>11} | {:<36} | {:>5} | < 5 s {} |",
            format!("writers' pause, {} rows, {files} files", rows),
            pause.as_secs_f64(),
            "-",
            "(none: no tool takes one point)",
            "-",
            if pause.as_secs_f64() < 5.0 {
                "✓"
            } else {
                "✗"
            }
        );
        println!(
            "\nthe pause of each run (ms): {all:?}; the storage step inside it (median): {:.2} s",
            step.as_secs_f64()
        );
        println!(
            "restore drill of the newest of those snapshots ({rows} filler rows, {files} files): {}; scratch: {}",
            immich_guard::drill::summary(drill),
            drill.scratch
        );
    }
    if let Some((frozen, whole)) = btrfs {
        println!(
            "btrfs subvolume, {files} files: the tree's moment fixed after {:.3} s (what the pause waits for); the whole storage step with the manifest listed {:.2} s",
            frozen.as_secs_f64(),
            whole.as_secs_f64()
        );
    }
    if let Some(h) = hashed {
        let ((ours, _, read), (big, _, big_read)) = (h.small, h.big);
        for (name, (ours, theirs, _)) in [
            (format!("content hashes, {} files", h.files), h.small),
            (format!("content hashes, {} x 1 MiB", h.big_mb), h.big),
        ] {
            row(&name, ours, theirs, "find | xargs sha256sum", 1.5);
        }
        let mb = |bytes: u64, d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
        println!();
        println!(
            "content hashes, {} files: {:.1} s, {:.0} files/s, {:.1} MB read ({:.1} MB/s)",
            h.files,
            ours.as_secs_f64(),
            h.files as f64 / ours.as_secs_f64(),
            read as f64 / 1e6,
            mb(read, ours)
        );
        println!(
            "content hashes, {} MiB in 1 MiB files: unlimited {:.1} s ({:.0} MB/s); at the default hash_rate_mb {:.1} s ({:.0} MB/s)",
            h.big_mb,
            big.as_secs_f64(),
            mb(big_read, big),
            h.throttled.as_secs_f64(),
            mb(big_read, h.throttled)
        );
        println!(
            "the storage step of the same {}-file snapshot (what a freeze waits for): {:.2} s; the pass is not in it (it runs on the sealed snapshot afterwards)",
            h.files,
            h.storage_step.as_secs_f64()
        );
    }
}
