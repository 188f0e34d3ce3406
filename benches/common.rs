//! Shared by the benches: settings from the environment and the latency table.

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
