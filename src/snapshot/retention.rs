//! Which sealed snapshots to delete: keep the last N, the newest of each version the database
//! has run with (README.md "Snapshots": never the last good snapshot of a version), and never
//! the newest of all. Only a version's older copies are ever deleted, so a burst of snapshots
//! of one version can never push the other versions out. Pure: it plans, `apply` deletes.

use std::collections::HashSet;

use super::store::{Meta, Store, StoreError};

/// Ids to delete from `sealed` (any order in, oldest-first assumed for ties by `sealed_at`).
/// `keep_versions`: how many versions keep more than their newest when `keep_last` would drop
/// them (the newest of every version is kept regardless).
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
    // Every snapshot is of a version the database ran with (taken before it changed): the
    // newest of each, per project, is the only way back to it.
    let mut newest_of: HashSet<(&str, String)> = HashSet::new();
    for m in &newest_first {
        if newest_of.insert((m.project.as_str(), version_key(&m.version))) {
            keep.insert(m.id.as_str());
        }
    }
    newest_first
        .iter()
        .rev()
        .filter(|m| !keep.contains(m.id.as_str()))
        .map(|m| m.id.clone())
        .collect()
}

/// `v1.119.0` and `1.119.0` are one version.
fn version_key(v: &str) -> String {
    v.strip_prefix('v').unwrap_or(v).to_string()
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
        // last 1 = f; the newest of each version (f, e, c, b) is kept whatever keep_versions
        // says: only older copies of a version go.
        assert_eq!(plan(&s, 1, 3), vec!["a", "d"]);
        assert_eq!(plan(&s, 1, 1), vec!["a", "d"]);
    }

    #[test]
    fn a_burst_of_one_version_never_pushes_out_the_other_versions() {
        // Two older versions, then seven snapshots of the current one (seven `.env` saves).
        let mut specs = vec![("v117", "v1.117.0"), ("v118", "v1.118.0")];
        let burst: Vec<String> = (0..7).map(|i| format!("v119-{i}")).collect();
        specs.extend(burst.iter().map(|id| (id.as_str(), "v1.119.0")));
        let s = snaps(&specs);
        for (keep_last, keep_versions) in [(1, 0), (1, 1), (3, 1), (5, 3), (10, 3)] {
            let doomed = plan(&s, keep_last, keep_versions);
            assert!(
                !doomed.iter().any(|id| id == "v117" || id == "v118"),
                "keep_last {keep_last}, keep_versions {keep_versions}: {doomed:?}"
            );
            assert!(!doomed.contains(&"v119-6".to_string()), "the newest of all");
        }
        // Only the older copies of v1.119.0 go, oldest first.
        assert_eq!(plan(&s, 3, 1), vec!["v119-0", "v119-1", "v119-2", "v119-3"]);
        assert_eq!(plan(&s, 1, 0).len(), 6);
        // Another project's newest of the same version is its own.
        let mut other = snaps(&[("o1", "v1.117.0"), ("o2", "v1.117.0")]);
        for m in &mut other {
            m.project = "other".into();
        }
        let mut all = s.clone();
        all.extend(other);
        assert!(!plan(&all, 1, 0).contains(&"o2".to_string()));
        assert!(plan(&all, 1, 0).contains(&"o1".to_string()));
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
