//! Freeze delay: from the server container's start event to the container being paused by
//! the daemon, over many starts on images no snapshot covers. Prints p50/p99 against the
//! targets (p50 < 20 ms, p99 < 100 ms). Needs Docker; `cargo bench --bench freeze`.
//! IMMICH_GUARD_BENCH_STARTS sets the number of starts (default 50).

#[path = "common.rs"]
#[allow(dead_code)] // the ours-vs-baseline table is for the snapshot and restore benches
mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::time::Duration;

use harness::guard::Guard;
use harness::{Stack, StackSpec, build_server_image, docker_available, ensure_images};
use immich_guard::protect::ProtectState;

fn main() {
    if std::env::args().any(|a| a == "--list") || !docker_available() {
        return;
    }
    let starts = common::env_num("IMMICH_GUARD_BENCH_STARTS", 50) as usize;
    let images = ensure_images(&["v1.119.0"]);
    // Two images of the same version: every switch is a start no snapshot covers, and never
    // a downgrade.
    let a = images.server("v1.119.0").to_string();
    let b = build_server_image("v1.119.0", "bench-freeze", "freeze-b");
    let stack = Stack::up(StackSpec::new("v1.119.0").boot_delay_ms(1000));
    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(&stack, snapshots.path(), "keep_last = 2\n");
    guard.wait_status("a baseline", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    let started = std::time::Instant::now();
    for i in 0..starts {
        let image = if i % 2 == 0 { &b } else { &a };
        stack.recreate_server(image);
        guard.wait_status("freeze, snapshot, release", Duration::from_secs(120), |s| {
            let p = &s.state.protection;
            p.freeze_delays_ms.len() > i && p.state == ProtectState::Idle
        });
        eprint!(".");
    }
    eprintln!();
    let delays = guard.status().state.protection.freeze_delays_ms;
    println!();
    println!(
        "freeze delay, start event → paused, {} starts in {:.0} s; {} cores",
        delays.len(),
        started.elapsed().as_secs_f64(),
        common::cores()
    );
    common::latency_table(&delays, [Some(20.0), Some(100.0), None]);
    drop(guard);
    drop(stack);
}
