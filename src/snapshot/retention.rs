//! Which sealed snapshots to delete: keep the last N, the newest of each version the database
//! has run with (README.md "Snapshots": never the last good snapshot of a version), the newest
//! `pre-update` snapshot of each version, the newest snapshot whose check passed, the newest
//! whose restore drill passed (src/drill/: the one proven to restore), every
//! snapshot an unfinished restore needs, and never the newest of all. Only a version's older
//! copies are ever deleted, so a burst of snapshots of one version can never push the other
//! versions out. `plan` is pure; `apply` reads what a restore claims, deletes, and reports
//! what it could not delete instead of stopping: the snapshot just sealed stays sealed
//! whatever retention does (docs/operations.md "Retention").

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::store::{Meta, Store, StoreError};
use crate::config::Config;

/// The restore journal's name in the data dir. Read here as plain JSON, not through the
/// restore module: restore builds on snapshot, never the other way round (tests/layering.rs).
pub const RESTORE_JOURNAL: &str = "restore.json";

/// Ids to delete from `sealed` (any order in, oldest-first assumed for ties by `sealed_at`),
/// oldest first. `keep_versions`: how many versions keep more than their newest when
/// `keep_last` would drop them (the newest of every version is kept regardless). `claimed`:
/// ids an unfinished restore needs, never deleted.
pub fn plan(
    sealed: &[Meta],
    keep_last: u32,
    keep_versions: u32,
    claimed: &[String],
) -> Vec<String> {
    let mut newest_first: Vec<&Meta> = sealed.iter().collect();
    newest_first.sort_by(|a, b| (b.sealed_at, &b.id).cmp(&(a.sealed_at, &a.id)));
    let mut keep: HashSet<&str> = newest_first
        .iter()
        .take(keep_last.max(1) as usize)
        .map(|m| m.id.as_str())
        .collect();
    keep.extend(claimed.iter().map(String::as_str));
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
    // newest of each, per project, is the only way back to it. The newest taken for an
    // update is the state just before the new version migrated, which a later manual
    // snapshot of the same version does not replace (the way back after a failed upgrade).
    let mut newest_of: HashSet<(&str, String)> = HashSet::new();
    let mut newest_pre_update_of: HashSet<(&str, String)> = HashSet::new();
    let mut checked: HashSet<&str> = HashSet::new();
    let mut drilled: HashSet<&str> = HashSet::new();
    for m in &newest_first {
        let key = (m.project.as_str(), version_key(&m.version));
        if m.trigger == "pre-update" && newest_pre_update_of.insert(key.clone()) {
            keep.insert(m.id.as_str());
        }
        if newest_of.insert(key) {
            keep.insert(m.id.as_str());
        }
        // The newest whose contents were read back and found whole: the one known good.
        if m.check_passed() && checked.insert(m.project.as_str()) {
            keep.insert(m.id.as_str());
        }
        // The newest whose dump replayed and whose counts and files were found as recorded.
        if m.drill_passed() && drilled.insert(m.project.as_str()) {
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

/// The snapshots a restore that has not completed needs (`<data_dir>/restore.json`): the one
/// it restores and the pre-restore snapshot(s) it took. `Err` (why) when the journal is
/// there but cannot be read or understood: a restore may be half done, so nothing may go.
pub fn restore_claims(data_dir: &Path) -> Result<Vec<String>, String> {
    let path = data_dir.join(RESTORE_JOURNAL);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(format!(
                "cannot read the restore journal {}: {e}",
                path.display()
            ));
        }
    };
    let bad = |why: &str| format!("the restore journal {} {why}", path.display());
    let journal: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(&format!("is not JSON: {e}")))?;
    let Some(journal) = journal.as_object() else {
        return Err(bad("is not a JSON object"));
    };
    if journal.get("completed_at").is_some_and(|v| !v.is_null()) {
        return Ok(Vec::new());
    }
    let Some(restored) = journal.get("snapshot").and_then(|v| v.as_str()) else {
        return Err(bad("names no snapshot (key `snapshot`)"));
    };
    let mut claimed = vec![restored.to_string()];
    for key in ["pre_restore", "pre_restores"] {
        match journal.get(key) {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(id)) => claimed.push(id.clone()),
            Some(serde_json::Value::Array(ids)) => {
                for id in ids {
                    match id.as_str() {
                        Some(id) => claimed.push(id.to_string()),
                        None => return Err(bad(&format!("has a non-string in `{key}`: {id}"))),
                    }
                }
            }
            Some(other) => return Err(bad(&format!("has `{key}` = {other}, not an id"))),
        }
    }
    Ok(claimed)
}

/// One snapshot retention meant to delete and could not.
#[derive(Debug, Clone, PartialEq)]
pub struct NotDeleted {
    pub id: String,
    pub error: String,
    /// Unsealed already (`.partial-deleting-<id>`) when the removal failed: no longer listed,
    /// left for the partial cleanup to retry.
    pub leftover: Option<PathBuf>,
}

/// What one retention pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetentionOutcome {
    pub removed: Vec<String>,
    pub not_deleted: Vec<NotDeleted>,
    /// Why nothing was deleted at all (the snapshot dir or the restore journal unreadable).
    pub skipped: Option<String>,
}

impl RetentionOutcome {
    /// One line for `status`, the notification and the CLI; None when all went as planned.
    pub fn warning(&self) -> Option<String> {
        if let Some(why) = &self.skipped {
            return Some(format!("retention deleted nothing: {why}"));
        }
        if self.not_deleted.is_empty() {
            return None;
        }
        let each: Vec<String> = self
            .not_deleted
            .iter()
            .map(|n| format!("{} ({})", n.id, n.error))
            .collect();
        Some(format!(
            "retention could not delete {} snapshot(s): {}",
            each.len(),
            each.join("; ")
        ))
    }
}

/// Deletes what `plan` says, oldest first, going on past a snapshot it cannot delete.
pub fn apply(store: &Store, config: &Config) -> RetentionOutcome {
    let skipped = |why: String| RetentionOutcome {
        skipped: Some(why),
        ..Default::default()
    };
    let claimed = match restore_claims(&config.daemon.data_dir) {
        Ok(claimed) => claimed,
        Err(why) => return skipped(format!("{why}; a restore may be half done")),
    };
    let sealed = match store.list() {
        Ok(sealed) => sealed,
        Err(e) => return skipped(e.to_string()),
    };
    let doomed = plan(
        &sealed,
        config.snapshots.keep_last,
        config.snapshots.keep_versions,
        &claimed,
    );
    let mut outcome = RetentionOutcome::default();
    for id in doomed {
        match store.delete(&id) {
            Ok(()) => outcome.removed.push(id),
            Err(e) => {
                let leftover = match &e {
                    StoreError::Io { path, .. } if store.is_partial(path) => Some(path.clone()),
                    _ => None,
                };
                tracing::warn!(snapshot = %id, error = %e, "retention could not delete a snapshot");
                outcome.not_deleted.push(NotDeleted {
                    id,
                    error: e.to_string(),
                    leftover,
                });
            }
        }
    }
    outcome
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
        assert_eq!(plan(&s, 2, 0, &[]), vec!["a", "b"]);
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
        assert_eq!(plan(&s, 1, 3, &[]), vec!["a", "d"]);
        assert_eq!(plan(&s, 1, 1, &[]), vec!["a", "d"]);
    }

    #[test]
    fn a_burst_of_one_version_never_pushes_out_the_other_versions() {
        // Two older versions, then seven snapshots of the current one (seven `.env` saves).
        let mut specs = vec![("v117", "v1.117.0"), ("v118", "v1.118.0")];
        let burst: Vec<String> = (0..7).map(|i| format!("v119-{i}")).collect();
        specs.extend(burst.iter().map(|id| (id.as_str(), "v1.119.0")));
        let s = snaps(&specs);
        for (keep_last, keep_versions) in [(1, 0), (1, 1), (3, 1), (5, 3), (10, 3)] {
            let doomed = plan(&s, keep_last, keep_versions, &[]);
            assert!(
                !doomed.iter().any(|id| id == "v117" || id == "v118"),
                "keep_last {keep_last}, keep_versions {keep_versions}: {doomed:?}"
            );
            assert!(!doomed.contains(&"v119-6".to_string()), "the newest of all");
        }
        // Only the older copies of v1.119.0 go, oldest first.
        assert_eq!(
            plan(&s, 3, 1, &[]),
            vec!["v119-0", "v119-1", "v119-2", "v119-3"]
        );
        assert_eq!(plan(&s, 1, 0, &[]).len(), 6);
        // Another project's newest of the same version is its own.
        let mut other = snaps(&[("o1", "v1.117.0"), ("o2", "v1.117.0")]);
        for m in &mut other {
            m.project = "other".into();
        }
        let mut all = s.clone();
        all.extend(other);
        assert!(!plan(&all, 1, 0, &[]).contains(&"o2".to_string()));
        assert!(plan(&all, 1, 0, &[]).contains(&"o1".to_string()));
    }

    #[test]
    fn never_deletes_the_newest_and_nothing_on_few() {
        let s = snaps(&[("a", "v1")]);
        assert!(plan(&s, 1, 0, &[]).is_empty());
        assert!(
            plan(&s, 0, 0, &[]).is_empty(),
            "keep_last 0 still keeps the newest"
        );
        assert!(plan(&[], 1, 1, &[]).is_empty());
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Issue 18: `keep_last = 2`, two snapshots A and B of the running version, `restore A`
    /// takes a pre-restore snapshot P. Whatever seals next, A (restored) and P (taken by
    /// the restore) stay while the journal claims them.
    #[test]
    fn what_a_restore_claims_is_never_deleted() {
        let s = snaps(&[("a", "v1"), ("b", "v1"), ("p", "v1"), ("next", "v1")]);
        assert_eq!(plan(&s, 2, 0, &[]), vec!["a", "b"]);
        assert_eq!(plan(&s, 2, 0, &ids(&["a", "p"])), vec!["b"]);
        assert_eq!(plan(&s, 1, 0, &ids(&["a", "p"])), vec!["b"]);
        // A claim of a snapshot not there changes nothing else.
        assert_eq!(plan(&s, 2, 0, &ids(&["gone"])), vec!["a", "b"]);
    }

    #[test]
    fn the_newest_pre_update_snapshot_of_each_version_is_kept() {
        let mut s = snaps(&[
            ("u1", "v1.119.0"),
            ("u2", "v1.119.0"),
            ("m1", "v1.119.0"),
            ("m2", "1.119.0"),
            ("o-u", "v1.119.0"),
            ("o-m", "v1.119.0"),
        ]);
        for m in &mut s {
            if m.id.contains('u') {
                m.trigger = "pre-update".into();
            }
            if m.id.starts_with("o-") {
                m.project = "other".into();
            }
        }
        // m2 is the newest of v1.119.0 (`v` or not); u2 the newest taken for an update. The
        // other project's own newest pre-update and newest are its own.
        assert_eq!(plan(&s, 1, 0, &[]), vec!["u1", "m1"]);
        // Only `pre-update` counts: a `pre-start` or `manual` is not that snapshot.
        for m in &mut s {
            if m.trigger == "pre-update" {
                m.trigger = "pre-start".into();
            }
        }
        assert_eq!(plan(&s, 1, 0, &[]), vec!["u1", "u2", "m1", "o-u"]);
    }

    #[test]
    fn the_newest_snapshot_whose_check_passed_is_kept_per_project() {
        let check = |passed| {
            Some(crate::snapshot::store::SnapshotCheck {
                kind: "content-hashes".into(),
                at: "2026-11-02T00:00:00Z".parse().unwrap(),
                passed,
                summary: String::new(),
            })
        };
        let mut s = snaps(&[
            ("ok-old", "v1"),
            ("ok", "v1"),
            ("bad", "v1"),
            ("unchecked", "v1"),
            ("o-ok", "v1"),
            ("o-new", "v1"),
        ]);
        s[0].check = check(true);
        s[1].check = check(true);
        s[2].check = check(false);
        s[4].check = check(true);
        for m in &mut s[4..] {
            m.project = "other".into();
        }
        assert_eq!(plan(&s, 1, 0, &[]), vec!["ok-old", "bad"]);
        assert!(!s[2].check_passed() && !s[3].check_passed() && s[1].check_passed());
    }

    #[test]
    fn the_newest_snapshot_whose_drill_passed_is_kept_per_project() {
        let at = "2026-11-02T00:00:00Z".parse().unwrap();
        let drill = |passed| Some(crate::snapshot::store::tests::drill(passed, at));
        let mut s = snaps(&[
            ("drilled-old", "v1"),
            ("drilled", "v1"),
            ("failed", "v1"),
            ("not-drilled", "v1"),
            ("o-drilled", "v1"),
            ("o-new", "v1"),
        ]);
        s[0].drill = drill(true);
        s[1].drill = drill(true);
        s[2].drill = drill(false);
        s[4].drill = drill(true);
        for m in &mut s[4..] {
            m.project = "other".into();
        }
        assert_eq!(plan(&s, 1, 0, &[]), vec!["drilled-old", "failed"]);
        assert!(s[1].drill_passed() && s[2].drill_failed() && !s[3].drill_passed());
    }

    /// Writes `json` as the restore journal in a new data dir.
    fn journal(json: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RESTORE_JOURNAL), json).unwrap();
        dir
    }

    #[test]
    fn the_claims_reader_takes_what_an_unfinished_journal_names() {
        let none = tempfile::tempdir().unwrap();
        assert_eq!(restore_claims(none.path()), Ok(vec![]));
        let table: &[(&str, &[&str])] = &[
            (
                r#"{"snapshot":"a","pre_restore":"p","completed_at":null}"#,
                &["a", "p"],
            ),
            (r#"{"snapshot":"a","pre_restore":null}"#, &["a"]),
            (r#"{"snapshot":"a"}"#, &["a"]),
            (
                r#"{"snapshot":"a","pre_restore":["p1","p2"]}"#,
                &["a", "p1", "p2"],
            ),
            (
                r#"{"snapshot":"a","pre_restores":["p1"],"pre_restore":"p0"}"#,
                &["a", "p0", "p1"],
            ),
            (r#"{"snapshot":"a","pre_restores":"p1"}"#, &["a", "p1"]),
            // Finished: it needs nothing.
            (
                r#"{"snapshot":"a","pre_restore":"p","completed_at":"2026-11-01T00:00:00Z"}"#,
                &[],
            ),
        ];
        for (text, claimed) in table {
            let dir = journal(text);
            assert_eq!(restore_claims(dir.path()), Ok(ids(claimed)), "{text}");
        }
    }

    #[test]
    fn a_journal_not_understood_claims_everything() {
        for (text, said) in [
            ("{not json", "is not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"pre_restore":"p"}"#, "names no snapshot"),
            (r#"{"snapshot":"a","pre_restore":7}"#, "`pre_restore` = 7"),
            (
                r#"{"snapshot":"a","pre_restores":["p",1]}"#,
                "non-string in `pre_restores`",
            ),
        ] {
            let dir = journal(text);
            let e = restore_claims(dir.path()).unwrap_err();
            assert!(
                e.contains(said) && e.contains(RESTORE_JOURNAL),
                "{text}: {e}"
            );
        }
        // There but unreadable (a directory in its place).
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(RESTORE_JOURNAL)).unwrap();
        let e = restore_claims(dir.path()).unwrap_err();
        assert!(e.contains("cannot read the restore journal"), "{e}");
    }

    /// A store with sealed snapshots `ids` (oldest first, an hour apart) of one version.
    fn sealed_store(ids: &[&str]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("snapshots")).unwrap();
        for m in snaps(&ids.iter().map(|id| (*id, "v1")).collect::<Vec<_>>()) {
            let p = store.begin(&m.id).unwrap();
            std::fs::write(p.path().join("file"), "x").unwrap();
            p.seal(&m).unwrap();
        }
        (dir, store)
    }

    fn config(data_dir: &Path, keep_last: u32) -> Config {
        let mut config = Config::default();
        config.daemon.data_dir = data_dir.to_path_buf();
        config.snapshots.keep_last = keep_last;
        config.snapshots.keep_versions = 0;
        config
    }

    fn listed(store: &Store) -> Vec<String> {
        store.list().unwrap().into_iter().map(|m| m.id).collect()
    }

    #[test]
    fn an_unreadable_journal_deletes_nothing_and_says_why() {
        let (dir, store) = sealed_store(&["a", "b", "c"]);
        std::fs::write(dir.path().join(RESTORE_JOURNAL), "{half").unwrap();
        let outcome = apply(&store, &config(dir.path(), 1));
        assert!(outcome.removed.is_empty(), "{outcome:?}");
        assert_eq!(listed(&store), ["a", "b", "c"]);
        let w = outcome.warning().unwrap();
        assert!(
            w.contains("deleted nothing") && w.contains("a restore may be half done"),
            "{w}"
        );
        // A journal that claims "a": the others go as planned, no warning.
        std::fs::write(
            dir.path().join(RESTORE_JOURNAL),
            r#"{"snapshot":"a","pre_restore":null,"completed_at":null}"#,
        )
        .unwrap();
        let outcome = apply(&store, &config(dir.path(), 1));
        assert_eq!(outcome.removed, ["b"]);
        assert_eq!(outcome.warning(), None);
        assert_eq!(listed(&store), ["a", "c"]);
    }

    #[test]
    fn a_snapshot_that_cannot_be_deleted_does_not_stop_the_others() {
        let (dir, store) = sealed_store(&["a", "b", "c", "d"]);
        let Some(mut stuck) =
            crate::snapshot::store::tests::Immutable::set(&store.root().join("b").join("file"))
        else {
            return;
        };
        let outcome = apply(&store, &config(dir.path(), 1));
        let leftover = store.root().join(".partial-deleting-b");
        stuck.moved_to(leftover.join("file"));
        assert_eq!(outcome.removed, ["a", "c"]);
        assert_eq!(outcome.not_deleted.len(), 1, "{outcome:?}");
        let b = &outcome.not_deleted[0];
        assert_eq!(b.id, "b");
        assert!(b.error.contains("Operation not permitted"), "{}", b.error);
        // Unsealed first, so it is a partial now: never listed, left for the cleanup.
        assert_eq!(b.leftover.as_deref(), Some(leftover.as_path()));
        assert_eq!(listed(&store), ["d"], "the newest stays");
        let w = outcome.warning().unwrap();
        assert!(w.contains("could not delete 1 snapshot(s): b ("), "{w}");
    }
}
