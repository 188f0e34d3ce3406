//! Not taking the same snapshot twice (docs/operations.md "Bursts of changes"): a snapshot
//! asked for a version change covers the change with the newest sealed snapshot when nothing
//! was written since it, instead of dumping the same state again.
//!
//! "Nothing written" is decided from two marks recorded in every snapshot:
//! - the database's transaction snapshot (`txid_current_snapshot()`, `xmin:xmax:in-progress`),
//!   read before the dump. Every transaction that writes (a row, DDL, a sequence step) is
//!   given a transaction ID, which moves `xmax`; reads (pg_dumpall, Immich's queries) are
//!   given none. The same snapshot with nothing in progress (`xmin == xmax`) therefore means no
//!   write has happened or can still commit since: the dump would be the same. A snapshot with
//!   a transaction in progress never covers (it might commit later).
//! - the modification times of the upload location's top-level folders: Immich records every
//!   file it keeps in the database, except its own `backups/` and new per-user folders, whose
//!   additions show on these folders.
//!
//! Not used: the WAL position moves without any write (page pruning while pg_dumpall reads,
//! the standby snapshot logged every 15 s after activity), so it would never match; activity
//! counters (pg_stat_database) are flushed late and reset by a crash, so they can miss a write.

use std::path::Path;

use super::db::DbFacts;
use super::store::Meta;

/// Top-level folders of the upload location and their modification times (ns since the
/// epoch), sorted; None when the location cannot be read (then nothing is reused).
pub fn upload_mark(upload: &Path) -> Option<Vec<(String, i64)>> {
    let mut mark = Vec::new();
    let root = std::fs::metadata(upload).ok()?;
    mark.push((".".to_string(), mtime_ns(&root)?));
    for entry in std::fs::read_dir(upload).ok()? {
        let entry = entry.ok()?;
        let meta = entry.metadata().ok()?;
        if meta.is_dir() {
            mark.push((
                entry.file_name().to_string_lossy().into_owned(),
                mtime_ns(&meta)?,
            ));
        }
    }
    mark.sort();
    Some(mark)
}

fn mtime_ns(meta: &std::fs::Metadata) -> Option<i64> {
    let t = meta.modified().ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_nanos()).ok()
}

/// The newest sealed snapshot of `project`, when it is of `version` (and `image_id`, when
/// both are known) and the database and uploads are as they were when it was taken. One
/// whose restore drill failed never covers: a new dump is taken instead (src/drill/).
pub fn covering<'a>(
    sealed: &'a [Meta],
    project: &str,
    version: &str,
    image_id: Option<&str>,
    now: &DbFacts,
    upload_now: Option<&[(String, i64)]>,
) -> Option<&'a Meta> {
    let newest = sealed
        .iter()
        .filter(|m| m.project == project)
        .max_by(|a, b| (a.sealed_at, &a.id).cmp(&(b.sealed_at, &b.id)))?;
    let same_image = match (newest.image_id.as_deref(), image_id) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    (crate::version::same_version(&newest.version, version)
        && same_image
        && !newest.drill_failed()
        && newest.db.migrations == now.migrations
        && newest.db.xid_snapshot.as_deref().is_some_and(quiet)
        && newest.db.xid_snapshot == now.xid_snapshot
        && newest.upload_mark.is_some()
        && newest.upload_mark.as_deref() == upload_now)
        .then_some(newest)
}

/// `xmin:xmax:` with xmin == xmax: no transaction holding an ID is in progress.
fn quiet(snapshot: &str) -> bool {
    let mut parts = snapshot.split(':');
    matches!((parts.next(), parts.next(), parts.next(), parts.next()), (Some(a), Some(b), Some(""), None) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::store::tests::meta;

    fn sealed(id: &str, minutes: i64, xids: &str) -> Meta {
        let t0: chrono::DateTime<chrono::Utc> = "2026-11-01T00:00:00Z".parse().unwrap();
        let mut m = meta(id, t0 + chrono::TimeDelta::minutes(minutes));
        m.version = "v1.119.0".into();
        m.image_id = Some("sha256:a".into());
        m.db.migrations = vec!["1700000000000-Init".into()];
        m.db.xid_snapshot = Some(xids.into());
        m.upload_mark = Some(vec![(".".into(), 1), ("upload".into(), 2)]);
        m
    }

    #[test]
    fn only_the_newest_snapshot_of_an_unchanged_state_covers() {
        let list = vec![sealed("old", 0, "740:740:"), sealed("new", 5, "750:750:")];
        let now = |xids: &str| DbFacts {
            xid_snapshot: Some(xids.into()),
            ..list[1].db.clone()
        };
        let mark = list[1].upload_mark.clone().unwrap();
        let up = Some(mark.as_slice());
        let cover = |facts: &DbFacts, version: &str, image: Option<&str>, up| {
            covering(&list, "immich", version, image, facts, up).map(|m| m.id.as_str())
        };
        assert_eq!(
            cover(&now("750:750:"), "1.119.0", Some("sha256:a"), up),
            Some("new")
        );
        assert_eq!(cover(&now("750:750:"), "v1.119.0", None, up), Some("new"));
        // A write since (even one that an older snapshot's position matches): taken again.
        assert_eq!(cover(&now("751:751:"), "v1.119.0", None, up), None);
        assert_eq!(cover(&now("740:740:"), "v1.119.0", None, up), None);
        // Another version or image the data belongs to.
        assert_eq!(cover(&now("750:750:"), "v1.120.0", None, up), None);
        assert_eq!(
            cover(&now("750:750:"), "v1.119.0", Some("sha256:b"), up),
            None
        );
        // Other migrations applied.
        let mut migrated = now("750:750:");
        migrated.migrations.push("1731000000000-AddMemories".into());
        assert_eq!(cover(&migrated, "v1.119.0", None, up), None);
        // A file added to a folder Immich does not record (its own backups).
        let mut more = mark.clone();
        more.push(("backups".into(), 3));
        assert_eq!(cover(&now("750:750:"), "v1.119.0", None, Some(&more)), None);
        // Unknown marks never cover: an older snapshot without them, or unreadable uploads.
        assert_eq!(cover(&now("750:750:"), "v1.119.0", None, None), None);
        let mut unmarked = list.clone();
        unmarked[1].db.xid_snapshot = None;
        let facts = DbFacts {
            xid_snapshot: None,
            ..now("750:750:")
        };
        assert!(covering(&unmarked, "immich", "v1.119.0", None, &facts, up).is_none());
        // A transaction in progress when the snapshot began might have committed since.
        let mut busy = list.clone();
        busy[1].db.xid_snapshot = Some("748:750:748,749".into());
        let facts = now("748:750:748,749");
        assert!(covering(&busy, "immich", "v1.119.0", None, &facts, up).is_none());
        // Another project's snapshot is not this one's.
        assert!(covering(&list, "other", "v1.119.0", None, &now("750:750:"), up).is_none());
        // One whose restore drill failed is dumped again; a passed drill still covers.
        let mut drilled = list.clone();
        drilled[1].drill = Some(crate::snapshot::store::tests::drill(
            false,
            drilled[1].sealed_at,
        ));
        assert!(covering(&drilled, "immich", "v1.119.0", None, &now("750:750:"), up).is_none());
        drilled[1].drill = Some(crate::snapshot::store::tests::drill(
            true,
            drilled[1].sealed_at,
        ));
        assert!(covering(&drilled, "immich", "v1.119.0", None, &now("750:750:"), up).is_some());
    }

    #[test]
    fn the_upload_mark_sees_a_new_top_level_entry() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("upload")).unwrap();
        let before = upload_mark(dir.path()).unwrap();
        assert_eq!(before.len(), 2);
        assert_eq!(upload_mark(dir.path()).unwrap(), before);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::create_dir(dir.path().join("backups")).unwrap();
        std::fs::write(dir.path().join("backups/immich-db-backup.sql.gz"), b"x").unwrap();
        assert_ne!(upload_mark(dir.path()).unwrap(), before);
        assert!(upload_mark(&dir.path().join("gone")).is_none());
    }
}
