//! Snapshot benchmarks against the tools an admin would use by hand, same machine, same run:
//!
//! - DB dump: `snapshot::db::dump` vs `docker exec <db> pg_dumpall | zstd -3 > file` on a
//!   database of at least 200 MB (target ratio ≤ 1.05).
//! - Storage: the hard-link tree of 200,000 files in an Immich-shaped tree (year/month
//!   folders, thumbs) vs `cp -al` (target ratio ≤ 0.8).
//!
//! Run: `cargo bench --bench snapshot` (real Docker and PostgreSQL, a few minutes).
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
use immich_guard::snapshot::storage::{Options, Plan, StorageMethod, snapshot_tree};

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
            runtime
                .block_on(db::dump(
                    &docker,
                    "unix:///var/run/docker.sock",
                    &container,
                    &stack.db_access(),
                    &ours_file,
                ))
                .unwrap();
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

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too: only run when asked.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // IMMICH_GUARD_BENCH_ONLY=storage|dump runs one half (the storage half needs no Docker).
    let only = std::env::var("IMMICH_GUARD_BENCH_ONLY").unwrap_or_default();
    let runs = common::env_num("IMMICH_GUARD_BENCH_RUNS", 3);
    let rows = common::env_num("IMMICH_GUARD_BENCH_ROWS", 1_200_000);
    let files = common::env_num("IMMICH_GUARD_BENCH_FILES", 200_000);
    let dump = (only != "storage" && harness::docker_available()).then(|| bench_dump(runs, rows));
    let tree = (only != "dump").then(|| bench_storage(runs, files));
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
}
