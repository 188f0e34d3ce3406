//! Shared by the benches: settings from the environment, the latency table, the ours-vs-
//! baseline table and an Immich-shaped library.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `key` from the environment as a number, else `default`.
pub fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// p50, p99 and max of `values_ms` as a markdown table; each row's target (ms), if any, is
/// checked as "below".
pub fn latency_table(values_ms: &[f64], targets: [Option<f64>; 3]) {
    let (p50, p99) = immich_guard::protect::percentiles(values_ms).expect("measurements");
    let max = values_ms.iter().copied().fold(0.0, f64::max);
    println!("| what | value | target |");
    println!("|------|-------|--------|");
    for ((name, value), target) in [("p50", p50), ("p99", p99), ("max", max)]
        .into_iter()
        .zip(targets)
    {
        let target = target
            .map(|t| format!("< {t:.0} ms {}", if value < t { "✓" } else { "✗" }))
            .unwrap_or_default();
        println!("| {name} | {value:.1} ms | {target} |");
    }
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The header of the [`row`] table.
pub fn table_header() {
    println!(
        "| {:<34} | {:>11} | {:>11} | {:<36} | {:>5} | target |",
        "what", "ours", "baseline", "baseline command", "ratio"
    );
    println!(
        "|{}|{}|{}|{}|{}|--------|",
        "-".repeat(36),
        "-".repeat(13),
        "-".repeat(13),
        "-".repeat(38),
        "-".repeat(7)
    );
}

pub fn row(name: &str, ours: Duration, theirs: Duration, baseline: &str, target: f64) {
    let ratio = ours.as_secs_f64() / theirs.as_secs_f64();
    println!(
        "| {name:<34} | {:>9.3} s | {:>9.3} s | {baseline:<36} | {ratio:>5.2} | {} {target:.2} |",
        ours.as_secs_f64(),
        theirs.as_secs_f64(),
        if ratio <= target { "≤" } else { ">" },
    );
}

/// Alternates which side runs first, so neither always gets the warmer cache.
pub fn alternate(run: u64, ours: &mut dyn FnMut(), theirs: &mut dyn FnMut()) {
    if run.is_multiple_of(2) {
        ours();
        theirs();
    } else {
        theirs();
        ours();
    }
}

pub fn sh(script: &str) -> Duration {
    let start = Instant::now();
    let status = Command::new("sh").arg("-c").arg(script).status().unwrap();
    assert!(status.success(), "{script}");
    start.elapsed()
}

/// An Immich-shaped upload location: originals in library/<user>/<year>/<month>, uploads in
/// upload/<user>/<aa>/<bb>, one thumbnail per upload.
pub fn make_library(root: &Path, files: u64) {
    let originals = files / 4;
    let uploads = (files - originals) / 2;
    let thumbs = files - originals - uploads;
    for i in 0..originals {
        let dir = root.join(format!(
            "library/admin/{}/{:02}",
            2010 + i % 15,
            1 + (i / 15) % 12
        ));
        std::fs::create_dir_all(&dir).ok();
        std::fs::write(dir.join(format!("IMG_{i:06}.jpg")), i.to_le_bytes()).unwrap();
    }
    for (kind, n, suffix) in [
        ("upload", uploads, ".jpg"),
        ("thumbs", thumbs, "-thumbnail.webp"),
    ] {
        for i in 0..n {
            let dir = root.join(format!("{kind}/u1/{:02x}/{:02x}", i % 256, (i / 256) % 256));
            std::fs::create_dir_all(&dir).ok();
            std::fs::write(dir.join(format!("{i:08x}{suffix}")), i.to_le_bytes()).unwrap();
        }
    }
}
