//! Immich release versions as tags and snapshots name them (`v1.119.0`), compared as
//! numbers where they are numbers. Shared by protection, pinning and the snapshot store.

/// `v1.119.0`, `1.119.0`, `v2.1.0-rc.1` → (1, 119, 0); tags like `release` → None.
pub fn parse_version(s: &str) -> Option<(u64, u64, u64)> {
    let s = s.strip_prefix('v').unwrap_or(s);
    let core = s.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let v = (
        parts.next()??,
        parts.next()??,
        parts.next().unwrap_or(Some(0))?,
    );
    parts.next().is_none().then_some(v)
}

/// The same release, with or without the `v`; other tags only when spelled the same.
pub fn same_version(a: &str, b: &str) -> bool {
    match (parse_version(a), parse_version(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// `candidate` is an earlier release than `than`; never for tags that are not versions.
pub fn is_older(candidate: &str, than: &str) -> bool {
    matches!((parse_version(candidate), parse_version(than)), (Some(c), Some(t)) if c < t)
}
