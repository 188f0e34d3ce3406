//! Which sealed snapshots to delete: keep the last N, always the newest of each of the last K
//! versions, and never the newest of all. Pure: it plans, `apply` deletes.

use std::collections::HashSet;

use super::store::{Meta, Store, StoreError};

/// Ids to delete from `sealed` (any order in, oldest-first assumed for ties by `sealed_at`).
pub fn plan(sealed: &[Meta], keep_last: u32, keep_versions: u32) -> Vec<String> {
    let mut newest_first: Vec<&Meta> = sealed.iter().collect();
    newest_first.sort_by(|a, b| (b.sealed_at, &b.id).cmp(&(a.sealed_at, &a.id)));
    let mut keep: HashSet<&str> = newest_first
        .iter()
        .take(keep_last.max(1) as usize)
        .map(|m| m.id.as_str())
        .collect();
    let mut versions_seen = Vec::new();
    for m in &newest_first {
        if versions_seen.contains(&m.version.as_str()) {
            continue;
        }
        if versions_seen.len() == keep_versions as usize {
            break;
        }
        versions_seen.push(m.version.as_str());
        keep.insert(m.id.as_str());
    }
    newest_first
        .iter()
        .rev()
        .filter(|m| !keep.contains(m.id.as_str()))
        .map(|m| m.id.clone())
        .collect()
}

/// Deletes what `plan` says, oldest first; returns the deleted ids.
pub fn apply(store: &Store, keep_last: u32, keep_versions: u32) -> Result<Vec<String>, StoreError> {
    let doomed = plan(&store.list()?, keep_last, keep_versions);
    for id in &doomed {
        store.delete(id)?;
    }
    Ok(doomed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::store::tests::meta;

    fn snaps(specs: &[(&str, &str)]) -> Vec<Meta> {
        let t0: chrono::DateTime<chrono::Utc> = "2026-11-01T00:00:00Z".parse().unwrap();
        specs
            .iter()
            .enumerate()
            .map(|(i, (id, version))| {
                let mut m = meta(id, t0 + chrono::Duration::hours(i as i64));
                m.version = version.to_string();
                m
            })
            .collect()
    }

    #[test]
    fn keeps_the_last_n() {
        let s = snaps(&[("a", "v1"), ("b", "v1"), ("c", "v1"), ("d", "v1")]);
        assert_eq!(plan(&s, 2, 0), vec!["a", "b"]);
    }

    #[test]
    fn keeps_the_newest_of_each_of_the_last_k_versions() {
        let s = snaps(&[
            ("a", "v1"),
            ("b", "v1"),
            ("c", "v2"),
            ("d", "v3"),
            ("e", "v3"),
            ("f", "v4"),
        ]);
        // last 1 = f; versions v4 (f), v3 (e), v2 (c) kept; v1 is the 4th version: not kept.
        assert_eq!(plan(&s, 1, 3), vec!["a", "b", "d"]);
        assert_eq!(plan(&s, 1, 4), vec!["a", "d"]);
    }

    #[test]
    fn never_deletes_the_newest_and_nothing_on_few() {
        let s = snaps(&[("a", "v1")]);
        assert!(plan(&s, 1, 0).is_empty());
        assert!(
            plan(&s, 0, 0).is_empty(),
            "keep_last 0 still keeps the newest"
        );
        assert!(plan(&[], 1, 1).is_empty());
    }
}
