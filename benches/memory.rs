//! Idle memory of the real daemon: VmRSS, RssAnon and RssFile from /proc/PID/status when it
//! has settled after start, after a snapshot (CLI `immich-guard snapshot`), after an incident
//! (a crash loop of the server, halted with a bundle) and after a second snapshot (nothing
//! grows per snapshot). Target: VmRSS ≤ 8 MiB in every phase.
//!
//! The stack is realistic in shape: the stand-in seeds a few thousand assets (rows, and an
//! original plus a thumbnail each under the upload location).
//!
//! Needs Docker; `cargo bench --bench memory`. `IMMICH_GUARD_BENCH_ASSETS` sets the seeded
//! assets (default 2000), `IMMICH_GUARD_BENCH_SETTLE_SECS` the wait once idle before a
//! reading (default 5), `IMMICH_GUARD_BENCH_SMAPS` a directory that receives the daemon's
//! /proc/PID/smaps at each reading (which mappings carry the RSS). The daemon inherits the bench's environment, so glibc's `MALLOC_*`
//! variables reach it; the mmap threshold and arena count that src/memory.rs sets win over
//! theirs.

#[path = "common.rs"]
#[allow(dead_code)] // the latency table is for the latency benches
mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::path::Path;
use std::time::Duration;

use harness::compose::docker_ok;
use harness::guard::{GUARD_BIN, Guard};
use harness::{Stack, StackSpec, docker_available, ensure_images};
use immich_guard::protect::ProtectState;
use immich_guard::status::StatusReport;

const TARGET_KIB: u64 = 8 * 1024;
const LONG: Duration = Duration::from_secs(180);
/// Inside the server container: when this file (under the upload location) exists, its
/// content is the stand-in's crash mode.
const CRASH_FILE: &str = "/data/.standin-crash";

/// The `kB` fields of /proc/PID/status we report.
struct Reading {
    phase: &'static str,
    rss: u64,
    anon: u64,
    file: u64,
    threads: u64,
}

fn read_status(pid: u32, phase: &'static str) -> Reading {
    if let Some(dir) = std::env::var_os("IMMICH_GUARD_BENCH_SMAPS") {
        let to = Path::new(&dir).join(format!("{}.smaps", phase.replace(' ', "-")));
        std::fs::copy(format!("/proc/{pid}/smaps"), &to).expect("daemon smaps");
        resident_text(pid, &to.with_extension("text-pages"));
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in /proc/{pid}/status"))
    };
    Reading {
        phase,
        rss: field("VmRSS"),
        anon: field("RssAnon"),
        file: field("RssFile"),
        threads: field("Threads"),
    }
}

/// The file offsets of the daemon's resident code pages (from /proc/PID/pagemap), one a line,
/// to match against the binary's symbols.
fn resident_text(pid: u32, to: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("daemon maps");
    let mut pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).expect("pagemap");
    let mut out = String::new();
    for line in maps.lines().filter(|l| l.ends_with(GUARD_BIN)) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (start, end) = f[0].split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let offset = u64::from_str_radix(f[2], 16).unwrap();
        for page in (start..end).step_by(4096) {
            let mut entry = [0u8; 8];
            pagemap.seek(SeekFrom::Start(page / 4096 * 8)).unwrap();
            pagemap.read_exact(&mut entry).unwrap();
            if u64::from_le_bytes(entry) >> 63 == 1 {
                out.push_str(&format!("{} {:x}\n", f[1], offset + page - start));
            }
        }
    }
    std::fs::write(to, out).expect("text pages");
}

/// The daemon process started with `config` (the harness keeps its child to itself).
fn daemon_pid(config: &Path) -> u32 {
    let config = config.to_string_lossy();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<_> = cmdline
            .split(|&b| b == 0)
            .map(String::from_utf8_lossy)
            .collect();
        if args.first().is_some_and(|a| a == GUARD_BIN)
            && args.iter().any(|a| a == &config)
            && args.iter().any(|a| a == "run")
        {
            return pid;
        }
    }
    panic!("no immich-guard process runs with {config}");
}

/// Waits until nothing runs (activity `watching`, protection `state`), then lets it settle.
fn settle(guard: &Guard, state: ProtectState, settle: Duration) -> StatusReport {
    let s = guard.wait_status(&format!("idle ({state:?})"), LONG, |s| {
        s.state.activity == "watching" && s.state.protection.state == state
    });
    std::thread::sleep(settle);
    s
}

/// `immich-guard snapshot` through the socket, then settle.
fn snapshot(guard: &Guard, settle_for: Duration) {
    let out = guard.cli(&["snapshot", "--label", "memory bench"]);
    assert!(out.status.success(), "snapshot: {out:?}\n{}", guard.log());
    settle(guard, ProtectState::Idle, settle_for);
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") || !docker_available() {
        return;
    }
    let assets = common::env_num("IMMICH_GUARD_BENCH_ASSETS", 2000) as u32;
    let settle_for = Duration::from_secs(common::env_num("IMMICH_GUARD_BENCH_SETTLE_SECS", 5));
    ensure_images(&["v1.119.0"]);
    let stack = Stack::up(StackSpec {
        ready_timeout: LONG,
        ..StackSpec::new("v1.119.0")
            .restart("always")
            .boot_delay_ms(300)
            .seed_assets(assets)
            .env("STANDIN_CRASH_FILE", CRASH_FILE)
    });
    let files = walk_count(&stack.upload);
    let rows = stack.asset_count();
    let db_mb = stack
        .psql("SELECT pg_database_size(current_database())")
        .parse::<u64>()
        .unwrap()
        >> 20;
    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(
        &stack,
        snapshots.path(),
        "\n[crash_loop]\ndeaths = 3\nwindow_secs = 120\n",
    );
    let pid = daemon_pid(&guard.config_path);
    guard.wait_status("a baseline", LONG, |s| {
        s.state.protection.baseline.is_some()
    });
    let mut readings = Vec::new();

    settle(&guard, ProtectState::Idle, settle_for);
    readings.push(read_status(pid, "idle after start"));

    snapshot(&guard, settle_for);
    readings.push(read_status(pid, "after a snapshot"));

    std::fs::write(stack.upload.join(".standin-crash"), "boot").unwrap();
    docker_ok(&["restart", &stack.container_name("immich-server")]);
    guard.wait_status("the crash loop halted", LONG, |s| {
        !s.state.protection.halted.is_empty() && s.state.protection.incident.is_some()
    });
    settle(&guard, ProtectState::Halted, settle_for);
    readings.push(read_status(pid, "after an incident"));

    std::fs::remove_file(stack.upload.join(".standin-crash")).unwrap();
    let out = guard.cli(&["release", "immich-server"]);
    assert!(out.status.success(), "release: {out:?}\n{}", guard.log());
    stack.wait_server_ready(LONG).unwrap();
    snapshot(&guard, settle_for);
    readings.push(read_status(pid, "after release + a second snapshot"));

    println!();
    println!(
        "daemon memory (/proc/PID/status), settled {} s after each phase; {rows} asset rows, {files} upload files, database {db_mb} MiB; {} cores{}",
        settle_for.as_secs(),
        common::cores(),
        std::env::var("MALLOC_ARENA_MAX")
            .map(|v| format!("; MALLOC_ARENA_MAX={v}"))
            .unwrap_or_default()
    );
    println!("| phase | VmRSS | RssAnon | RssFile | threads | target |");
    println!("|-------|-------|---------|---------|---------|--------|");
    for r in &readings {
        println!(
            "| {} | {} | {} | {} | {} | ≤ 8 MiB {} |",
            r.phase,
            mib(r.rss),
            mib(r.anon),
            mib(r.file),
            r.threads,
            if r.rss <= TARGET_KIB { "✓" } else { "✗" }
        );
    }
    drop(guard);
    drop(stack);
}

fn walk_count(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .count()
}
