//! The `content` line of `verify --against`: the originals checked against the manifest's
//! content hashes (snapshot/hashes.rs), where the snapshot has them.
//!
//! Two things are looked at. Every stored copy whose inode, size or mtime changed since it
//! was hashed is hashed again: with hard links the stored copy is the live file's inode, so a
//! changed one was written in place since the snapshot, and the snapshot no longer holds the
//! original bytes. And live originals whose size and mtime still match the manifest are
//! hashed within a time budget (all of them at 200,000 files would take every verify many
//! minutes), starting at a different place each run so that repeated verifies cover the
//! library; the line says how many were hashed.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Check, Outcome, name_some, originals};
use crate::snapshot::hashes::{
    ContentHashes, HashRecord, changed_since_hashed, read_hashes_file, storage_root,
};
use crate::snapshot::storage::{StorageMethod, read_manifest};
use crate::snapshot::store::{MANIFEST_FILE, Meta};

/// How long verify spends hashing live originals.
pub const LIVE_BUDGET: Duration = Duration::from_secs(20);

/// Where a snapshot's hashes and stored files are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Source {
    pub dir: PathBuf,
    pub storage: PathBuf,
    pub method: Option<StorageMethod>,
    /// `None`: the pass after the seal has not finished.
    pub hashes: Option<ContentHashes>,
    /// Live files a `restore --force` left as they were (their stored copy was damaged): not
    /// judged against the snapshot, only counted.
    pub left_by_restore: Vec<String>,
}

impl Source {
    pub fn of(meta: &Meta, dir: &Path) -> Source {
        Source {
            dir: dir.to_path_buf(),
            storage: storage_root(meta, dir),
            method: Some(meta.storage.method),
            hashes: meta.hashes.clone(),
            left_by_restore: Vec::new(),
        }
    }
}

/// What was found; `Err` when the hashes or the manifest could not be read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Found {
    pub recorded: usize,
    /// Live originals whose size and mtime match the manifest, and how many were hashed.
    pub eligible: usize,
    pub hashed: usize,
    /// Live originals whose bytes differ from the recorded ones (size and mtime unchanged).
    pub differ: Vec<String>,
    /// Hard links: stored copies written in place since the snapshot.
    pub in_place: Vec<String>,
    /// Other methods: stored copies changed or gone since they were hashed.
    pub stored_changed: Vec<String>,
    /// Live files `restore --force` left as they were, not judged.
    pub left_by_restore: usize,
}

pub type Facts = Option<Result<Found, String>>;

/// Reads what the `content` line judges: `None` when the snapshot has no hashes yet.
pub fn gather(upload: Option<&Path>, source: &Source) -> Facts {
    let recorded = source.hashes.as_ref()?;
    Some(look(upload, source, recorded))
}

fn look(upload: Option<&Path>, source: &Source, recorded: &ContentHashes) -> Result<Found, String> {
    let hashes = read_hashes_file(recorded, &source.dir).map_err(|e| e.to_string())?;
    let manifest = source.dir.join(MANIFEST_FILE);
    let entries = read_manifest(&manifest).map_err(|e| {
        format!(
            "cannot read the snapshot's manifest {}: {e}",
            manifest.display()
        )
    })?;
    let mut found = Found {
        recorded: hashes.values().filter(|r| r.sha256.is_some()).count(),
        ..Found::default()
    };
    let hard_links = source.method == Some(StorageMethod::Hardlink);
    for record in hashes.values() {
        let Some(sha) = &record.sha256 else { continue };
        let stored = source.storage.join(&record.path);
        let changed = match std::fs::symlink_metadata(&stored) {
            Ok(now) => changed_since_hashed(record, &now),
            Err(e) => {
                found.stored_changed.push(format!("{} ({e})", record.path));
                continue;
            }
        };
        let Some(what) = changed else { continue };
        match crate::snapshot::db::file_sha256(&stored) {
            Ok((now, _)) if now == *sha => {}
            Ok((now, _)) if hard_links => found.in_place.push(format!(
                "{} ({what} changed; SHA-256 {now}, recorded {sha})",
                record.path
            )),
            Ok((now, _)) => found.stored_changed.push(format!(
                "{} ({what} changed; SHA-256 {now}, recorded {sha})",
                record.path
            )),
            Err(e) => found.stored_changed.push(format!("{} ({e})", record.path)),
        }
    }
    if let Some(upload) = upload {
        let judged: Vec<_> = entries
            .into_iter()
            .filter(|e| !source.left_by_restore.contains(&e.path))
            .collect();
        live(upload, &judged, &hashes, &mut found);
        found.left_by_restore = source.left_by_restore.len();
    }
    found.differ.sort();
    found.in_place.sort();
    found.stored_changed.sort();
    Ok(found)
}

/// Live originals whose size and mtime match, hashed from a rotating start within the budget.
fn live(
    upload: &Path,
    entries: &[crate::snapshot::storage::ManifestEntry],
    hashes: &HashMap<String, HashRecord>,
    found: &mut Found,
) {
    let eligible: Vec<(&str, &str, PathBuf)> = originals(entries)
        .filter_map(|e| {
            let sha = hashes.get(&e.path)?.sha256.as_deref()?;
            let path = upload.join(&e.path);
            let now = std::fs::symlink_metadata(&path).ok()?;
            (now.is_file() && now.len() == e.size && now.mtime() == e.mtime).then_some((
                e.path.as_str(),
                sha,
                path,
            ))
        })
        .collect();
    found.eligible = eligible.len();
    if eligible.is_empty() {
        return;
    }
    let start = chrono::Utc::now().timestamp().unsigned_abs() as usize % eligible.len();
    let began = Instant::now();
    for (rel, sha, path) in eligible[start..].iter().chain(&eligible[..start]) {
        if began.elapsed() >= LIVE_BUDGET {
            break;
        }
        found.hashed += 1;
        match crate::snapshot::db::file_sha256(path) {
            Ok((now, _)) if now == **sha => {}
            Ok((now, _)) => found.differ.push(format!(
                "{rel} (SHA-256 {now}, recorded {sha}; same size and mtime)"
            )),
            Err(e) => found.differ.push(format!("{rel} ({e})")),
        }
    }
}

/// The `content` line.
pub fn check(facts: &Facts, id: &str) -> Check {
    let found = match facts {
        None => {
            return Check::new(
                "content",
                Outcome::Skipped,
                format!(
                    "no content hashes recorded for {id} yet (the pass after the seal has not finished; `immich-guard hash {id}`)"
                ),
            );
        }
        Some(Err(e)) => return Check::new("content", Outcome::Fail, e.clone()),
        Some(Ok(found)) => found,
    };
    let sampled = format!(
        "{}/{} live originals with their recorded size and mtime hashed{}{}",
        found.hashed,
        found.eligible,
        if found.hashed < found.eligible {
            format!(" (a {} s budget)", LIVE_BUDGET.as_secs())
        } else {
            String::new()
        },
        if found.left_by_restore > 0 {
            format!(
                "; {} left as they were by restore --force (their stored copy is damaged), not judged",
                found.left_by_restore
            )
        } else {
            String::new()
        }
    );
    let mut problems = Vec::new();
    for (what, list) in [
        (
            "changed in place since the snapshot (hard links: the snapshot's copy is the same file, it no longer holds the original bytes)",
            &found.in_place,
        ),
        (
            "changed in the snapshot since hashed",
            &found.stored_changed,
        ),
        ("content differs from the snapshot's", &found.differ),
    ] {
        if !list.is_empty() {
            problems.push(format!("{} {what}: {}", list.len(), name_some(list)));
        }
    }
    if problems.is_empty() {
        Check::new(
            "content",
            Outcome::Pass,
            format!(
                "{sampled}, all match; {} stored copies as hashed",
                found.recorded
            ),
        )
    } else {
        Check::new(
            "content",
            Outcome::Fail,
            format!("{}; {sampled}", problems.join("; ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::hashes::run_pass;
    use crate::snapshot::hashes::tests::{FILES, go, meta_of, options, sealed};
    use std::fs;

    #[test]
    fn an_in_place_write_to_a_hard_linked_original_is_reported() {
        let s = sealed(StorageMethod::Hardlink);
        run_pass(&s.dir, &options(), &go).unwrap();
        let meta = meta_of(&s.dir);
        let source = Source::of(&meta, &s.dir);
        let clean = gather(Some(&s.upload), &source).unwrap().unwrap();
        assert!(
            clean.in_place.is_empty() && clean.differ.is_empty(),
            "{clean:?}"
        );
        assert_eq!(clean.hashed, FILES);

        // Open for writing without truncating, change bytes: the snapshot's link sees it too.
        use std::os::unix::fs::FileExt;
        let live = s.upload.join("upload/u1/04.jpg");
        let f = fs::File::options().write(true).open(&live).unwrap();
        f.write_all_at(b"EDITED", 0).unwrap();
        drop(f);
        let found = gather(Some(&s.upload), &source).unwrap().unwrap();
        assert_eq!(found.in_place.len(), 1, "{found:?}");
        assert!(found.in_place[0].starts_with("upload/u1/04.jpg"));
        let line = check(&Some(Ok(found)), "s1");
        assert_eq!(line.outcome, crate::verify::Outcome::Fail);
        assert!(
            line.detail.contains("changed in place since the snapshot"),
            "{}",
            line.detail
        );
    }
}
