//! Crash-loop halt time: from the Nth death of a crash-looping server (the engine's `die`
//! event) to the container stopped with restart policy `no` (the daemon's halt returning),
//! over many loops. Between loops `immich-guard release immich-server` gives the policy back
//! and starts it, so it loops again. Prints p50/p99/max against the target (≤ 2 s).
//! Needs Docker; `cargo bench --bench crashloop`. IMMICH_GUARD_BENCH_LOOPS sets the number
//! of loops (default 20).

#[path = "common.rs"]
#[allow(dead_code)] // the ours-vs-baseline table is for the snapshot and restore benches
mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::time::Duration;

use harness::guard::Guard;
use harness::{Stack, StackSpec, docker_available, ensure_images};

fn main() {
    if std::env::args().any(|a| a == "--list") || !docker_available() {
        return;
    }
    let loops = common::env_num("IMMICH_GUARD_BENCH_LOOPS", 20) as usize;
    ensure_images(&["v1.119.0"]);
    let stack = Stack::up(
        StackSpec::new("v1.119.0")
            .restart("always")
            .no_wait()
            .boot_delay_ms(200)
            .env("STANDIN_CRASH", "boot"),
    );
    stack.wait_db_ready(Duration::from_secs(60));
    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(
        &stack,
        snapshots.path(),
        "\n[crash_loop]\ndeaths = 3\nwindow_secs = 120\n",
    );
    let started = std::time::Instant::now();
    let mut delays = Vec::new();
    let mut last_id = String::new();
    for _ in 0..loops {
        let s = guard.wait_status("a new incident", Duration::from_secs(120), |s| {
            let p = &s.state.protection;
            !p.halted.is_empty() && p.incident.as_ref().is_some_and(|i| i.id != last_id)
        });
        let incident = s.state.protection.incident.unwrap();
        let death = incident.last_death_at.expect("the Nth death's time");
        let halted = incident.halted[0].halted_at.expect("halt time");
        delays.push((halted - death).num_microseconds().unwrap() as f64 / 1000.0);
        last_id = incident.id;
        let out = guard.cli(&["release", "immich-server"]);
        assert!(out.status.success(), "{out:?}");
        eprint!(".");
    }
    eprintln!();
    println!();
    println!(
        "crash-loop halt, Nth death (die event) → stopped with policy no, {} loops of 3 deaths in {:.0} s; {} cores",
        delays.len(),
        started.elapsed().as_secs_f64(),
        common::cores()
    );
    common::latency_table(&delays, [None, None, Some(2000.0)]);
    drop(guard);
    drop(stack);
}
