//! The host's CPU as the upgrade-path check needs it: the architecture and the flags
//! /proc/cpuinfo lists (x86-64-v2 is cx16, lahf_lm, popcnt, sse4_1, sse4_2, ssse3).

use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    /// `std::env::consts::ARCH`: `x86_64`, `aarch64`, …
    pub arch: String,
    /// None: not known (cpuinfo unreadable); the CPU rows then say nothing.
    pub flags: Option<BTreeSet<String>>,
}

impl Default for Cpu {
    /// Nothing known: no CPU row applies.
    fn default() -> Cpu {
        Cpu {
            arch: String::new(),
            flags: None,
        }
    }
}

impl Cpu {
    /// This host, read once at daemon start.
    pub fn host() -> Cpu {
        let flags = match std::fs::read_to_string("/proc/cpuinfo") {
            Ok(text) => parse_flags(&text),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read /proc/cpuinfo; the CPU rows of the upgrade-path table say nothing");
                None
            }
        };
        Cpu {
            arch: std::env::consts::ARCH.to_string(),
            flags,
        }
    }
}

/// The first `flags` line (every core lists the same on the hosts Immich runs on).
pub fn parse_flags(cpuinfo: &str) -> Option<BTreeSet<String>> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "flags").then(|| value.split_whitespace().map(str::to_string).collect())
    })
}
