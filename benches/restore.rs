//! Restore benchmarks against the manual procedure (docs/recovery.md §4), same machine, same
//! data, same run:
//!
//! - Database: `restore::database` (drop, then the dump streamed into psql through the exec
//!   API with the search_path fix and ON_ERROR_STOP) vs `zstd -dc dump | sed … | docker exec
//!   -i <db> psql` after a `DROP DATABASE`, on a database of about 236 MB.
//! - Storage: the snapshot's tree of 200,000 files put back into an emptied upload location by
//!   `restore::storage::restore_tree` (hard links, as a hard-link snapshot restores; and
//!   copies, as a copy snapshot restores) vs `cp -a <snapshot>/storage/. <upload>/`.
//!
//! Target: ≤ 1.0× the manual time. Run: `cargo bench --bench restore` (real Docker and
//! PostgreSQL, several minutes). `IMMICH_GUARD_BENCH_ROWS`, `IMMICH_GUARD_BENCH_FILES` and
//! `IMMICH_GUARD_BENCH_RUNS` scale it; `IMMICH_GUARD_BENCH_ONLY=storage|db` runs one half.

#[path = "common.rs"]
#[allow(dead_code)] // the latency table is for the latency benches
mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{alternate, make_library, median, row, sh};
use harness::{Stack, StackSpec};
use immich_guard::restore::{database, storage};
use immich_guard::snapshot::db;
use immich_guard::snapshot::storage::{Options, Plan, StorageMethod, read_manifest, snapshot_tree};

const HOST: &str = "unix:///var/run/docker.sock";

fn bench_db(runs: u64, rows: u64) -> (Duration, Duration, u64) {
    let stack = Stack::up(StackSpec::default());
    stack.psql(&format!(
        "CREATE TABLE filler AS SELECT g, md5(g::text) || md5((g * 7)::text) AS a, \
         repeat(md5(g::text), 3) AS b FROM generate_series(1, {rows}) g"
    ));
    let size: u64 = stack
        .psql("SELECT pg_database_size(current_database())")
        .parse()
        .unwrap();
    // Nothing holds the database open while it is dropped, as in a restore.
    stack.compose(&["stop", "immich-server"]);
    let container = stack.container_name("database");
    let access = stack.db_access();
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("db.sql.zst");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let docker = bollard::Docker::connect_with_local_defaults().unwrap();
    runtime
        .block_on(db::dump(&docker, HOST, &container, &access, None, &dump))
        .unwrap();
    let count = || stack.psql("SELECT count(*) FROM filler");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let mut run_ours = || {
            let start = Instant::now();
            runtime.block_on(async {
                database::drop_database(&docker, HOST, &container, &access)
                    .await
                    .unwrap();
                database::replay(&docker, HOST, &container, &access, &dump, &mut || {})
                    .await
                    .unwrap();
            });
            ours.push(start.elapsed());
            assert_eq!(count(), rows.to_string());
        };
        let mut run_theirs = || {
            theirs.push(sh(&format!(
                "docker exec {c} psql -X -q -U postgres -d postgres -c 'DROP DATABASE IF EXISTS immich WITH (FORCE)' && \
                 zstd -dc {dump} \
                 | sed \"s/SELECT pg_catalog.set_config('search_path', '', false);/SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);/g\" \
                 | docker exec -i {c} psql -X -q -U postgres -d postgres > /dev/null 2>&1",
                c = container,
                dump = dump.display()
            )));
            assert_eq!(count(), rows.to_string());
        };
        alternate(i, &mut run_ours, &mut run_theirs);
    }
    (median(ours), median(theirs), size)
}

/// (ours by hard links, ours by copies, cp -a).
fn bench_storage(runs: u64, files: u64) -> (Duration, Duration, Duration) {
    let root = tempfile::tempdir().unwrap();
    let upload = root.path().join("library");
    make_library(&upload, files);
    let snap = root.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let manifest = snap.join("manifest.jsonl.zst");
    snapshot_tree(
        &upload,
        &snap,
        "storage",
        &manifest,
        &Plan::walking(StorageMethod::Copy),
        &Options::default(),
    )
    .unwrap();
    let entries = read_manifest(&manifest).unwrap();
    let source = snap.join("storage");
    let empty = |p: &Path| {
        std::fs::remove_dir_all(p).unwrap();
        std::fs::create_dir(p).unwrap();
    };
    let (mut links, mut copies, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let mut run_ours = || {
            for (method, out) in [
                (StorageMethod::Hardlink, &mut links),
                (StorageMethod::Copy, &mut copies),
            ] {
                empty(&upload);
                let start = Instant::now();
                // Into an empty location: nothing live is in the way, no pre-restore needed.
                let mut keep = immich_guard::restore::kept::Keep::new(
                    immich_guard::restore::kept::Holders::new(&snap, Vec::new()),
                    immich_guard::restore::kept::Aside::new(&snap.join("kept"), "bench"),
                );
                let done = storage::restore_tree(
                    &source,
                    &entries,
                    &upload,
                    method,
                    &[],
                    &mut keep,
                    &Default::default(),
                )
                .unwrap();
                out.push(start.elapsed());
                assert_eq!(done.replaced, files);
            }
        };
        let mut run_theirs = || {
            empty(&upload);
            theirs.push(sh(&format!(
                "cp -a {}/. {}/ && sync -f {}",
                source.display(),
                upload.display(),
                upload.display()
            )));
        };
        alternate(i, &mut run_ours, &mut run_theirs);
    }
    (median(links), median(copies), median(theirs))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let only = std::env::var("IMMICH_GUARD_BENCH_ONLY").unwrap_or_default();
    let runs = common::env_num("IMMICH_GUARD_BENCH_RUNS", 3);
    let rows = common::env_num("IMMICH_GUARD_BENCH_ROWS", 1_200_000);
    let files = common::env_num("IMMICH_GUARD_BENCH_FILES", 200_000);
    let database = (only != "storage" && harness::docker_available()).then(|| bench_db(runs, rows));
    let tree = (only != "db").then(|| bench_storage(runs, files));
    println!();
    println!(
        "median of {runs} runs each, alternating; {} cores",
        common::cores()
    );
    common::table_header();
    if let Some((ours, theirs, size)) = database {
        row(
            &format!("DB replay, {} MB database", size >> 20),
            ours,
            theirs,
            "zstd -dc | sed | docker exec -i psql",
            1.0,
        );
    }
    if let Some((links, copies, theirs)) = tree {
        row(
            &format!("tree by hard links, {files} files"),
            links,
            theirs,
            "cp -a",
            1.0,
        );
        row(
            &format!("tree by copies, {files} files"),
            copies,
            theirs,
            "cp -a",
            1.0,
        );
    }
}
