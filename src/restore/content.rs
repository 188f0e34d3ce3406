//! The content of what a restore puts back, checked against the manifest's content hashes
//! (snapshot/hashes.rs). Before anything changes ([`check_before`], from `plan`), every
//! stored file the storage step would put back (it differs from the live one) is hashed and
//! compared with its recorded SHA-256: a damaged one refuses the restore, naming each, or with
//! `--force` is skipped (the live file left as it is) and listed. During the storage step,
//! each file put back is hashed again in its temp place before the rename
//! ([`Content::placed_ok`]), so what changed since the plan never goes into place either.
//! Files without a hash (the pass had not finished) are checked by size only.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::snapshot::hashes::{HashRecord, read_hashes};
use crate::snapshot::storage::{EntryKind, ManifestEntry};
use crate::snapshot::store::Meta;

/// A stored file that is not what the snapshot recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {found}")]
pub struct Damaged {
    /// Relative to the upload location.
    pub path: String,
    /// What was recorded and what is there now (`recorded SHA-256 …, now …`).
    pub found: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(
        "the snapshot's stored copy of {} file(s) is damaged, so nothing was changed:\n  {}\nrestore another snapshot, or run the restore again with --force to put back everything else and leave these files as they are now",
        .0.len(),
        .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n  ")
    )]
    Refused(Vec<Damaged>),
    #[error(transparent)]
    Hashes(#[from] crate::snapshot::hashes::HashError),
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
}

/// What the plan found, and what the storage step checks each file against.
#[derive(Clone, Default)]
pub struct Content {
    hashes: Option<Arc<HashMap<String, HashRecord>>>,
    pub force: bool,
    /// Damaged stored files found by the plan (only with `force`: without, it refused).
    pub damaged: Vec<Damaged>,
    skip: HashSet<String>,
    /// Files to put back whose stored copy was hashed and matched.
    pub checked: u64,
    /// Files to put back without a recorded hash: checked by size only.
    pub unhashed: u64,
}

impl std::fmt::Debug for Content {
    // 200,000 hashes are no debug line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Content")
            .field("hashes", &self.hashes.as_ref().map(|h| h.len()))
            .field("force", &self.force)
            .field("damaged", &self.damaged)
            .field("checked", &self.checked)
            .field("unhashed", &self.unhashed)
            .finish()
    }
}

/// Checks every stored file that would be put back over `upload` (per `would_replace`).
/// Refuses with the list of damaged files unless `force`.
pub fn check_before(
    meta: &Meta,
    dir: &Path,
    source: &Path,
    upload: &Path,
    entries: &[ManifestEntry],
    force: bool,
    would_replace: &dyn Fn(&std::fs::Metadata, &Path) -> bool,
) -> Result<Content, ContentError> {
    let hashes = read_hashes(meta, dir)?.map(Arc::new);
    let mut content = Content {
        hashes,
        force,
        ..Content::default()
    };
    for e in entries.iter().filter(|e| e.kind == EntryKind::File) {
        let stored = source.join(&e.path);
        let snap = match std::fs::symlink_metadata(&stored) {
            Ok(m) => m,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                content.damaged.push(Damaged {
                    path: e.path.clone(),
                    found: "missing from the snapshot's storage".into(),
                });
                continue;
            }
            Err(source) => {
                return Err(ContentError::Io {
                    path: stored,
                    action: "reading the snapshot's copy",
                    source,
                });
            }
        };
        if !would_replace(&snap, &upload.join(&e.path)) {
            continue;
        }
        let found = match content.record(&e.path) {
            Some(record) => {
                let found = judge(record, &stored)?;
                content.checked += u64::from(found.is_none());
                found
            }
            None => {
                content.unhashed += 1;
                (snap.len() != e.size).then(|| {
                    format!(
                        "{} bytes, the manifest says {} (no content hash recorded)",
                        snap.len(),
                        e.size
                    )
                })
            }
        };
        if let Some(found) = found {
            content.damaged.push(Damaged {
                path: e.path.clone(),
                found,
            });
        }
    }
    if !content.damaged.is_empty() && !force {
        return Err(ContentError::Refused(content.damaged));
    }
    content.skip = content.damaged.iter().map(|d| d.path.clone()).collect();
    Ok(content)
}

/// What is wrong with the file at `path` against its record; `None` when it matches.
fn judge(record: &HashRecord, path: &Path) -> Result<Option<String>, ContentError> {
    let Some(recorded) = &record.sha256 else {
        return Ok(Some(format!(
            "{} (found by the content-hash pass)",
            record.problem.as_deref().unwrap_or("no hash recorded")
        )));
    };
    let (actual, _) =
        crate::snapshot::db::file_sha256(path).map_err(|source| ContentError::Io {
            path: path.to_path_buf(),
            action: "hashing the snapshot's copy",
            source,
        })?;
    Ok((actual != *recorded).then(|| format!("recorded SHA-256 {recorded}, now {actual}")))
}

impl Content {
    fn record(&self, path: &str) -> Option<&HashRecord> {
        self.hashes.as_ref()?.get(path)
    }

    /// Left as it is: found damaged by the plan (`--force`).
    pub fn skips(&self, path: &str) -> bool {
        self.skip.contains(path)
    }

    /// The file about to be renamed into place (`temp`) checked against the record of
    /// `path`: `Ok(true)` to put it in place, `Ok(false)` to skip it (damaged, `--force`).
    pub fn placed_ok(&self, path: &str, temp: &Path) -> Result<bool, Damaged> {
        let Some(record) = self.record(path) else {
            return Ok(true);
        };
        let found = match judge(record, temp) {
            Ok(found) => found,
            Err(e) => Some(e.to_string()),
        };
        match found {
            None => Ok(true),
            Some(_) if self.force => Ok(false),
            Some(found) => Err(Damaged {
                path: path.to_string(),
                found,
            }),
        }
    }

    /// What the plan says of the content check.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![match &self.hashes {
            None => format!(
                "content: no content hashes recorded yet (`immich-guard hash`): {} file(s) to put back checked by size only",
                self.unhashed
            ),
            Some(_) => format!(
                "content: {} file(s) to put back match the manifest's content hashes{}",
                self.checked,
                if self.unhashed > 0 {
                    format!("; {} without a hash checked by size only", self.unhashed)
                } else {
                    String::new()
                }
            ),
        }];
        if !self.damaged.is_empty() {
            out.push(format!(
                "content: --force: {} damaged file(s) NOT put back (left as they are):",
                self.damaged.len()
            ));
            out.extend(self.damaged.iter().map(|d| format!("   {d}")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::hashes::read_hashes;
    use crate::snapshot::hashes::run_pass;
    use crate::snapshot::hashes::tests::{FILES, flip_byte, go, meta_of, options, sealed};
    use crate::snapshot::storage::{StorageMethod, read_manifest};
    use crate::snapshot::store::{MANIFEST_FILE, STORAGE_DIR};

    #[test]
    fn a_flipped_byte_in_a_stored_original_is_found_and_refused() {
        let s = sealed(StorageMethod::Copy);
        run_pass(&s.dir, &options(), &go).unwrap();
        let stored = s.dir.join("storage/upload/u1/02.jpg");
        flip_byte(&stored);
        let meta = meta_of(&s.dir);
        let entries = read_manifest(&s.dir.join(MANIFEST_FILE)).unwrap();
        // Everything would be put back (an empty upload location).
        let empty = tempfile::tempdir().unwrap();
        let check = |force| {
            check_before(
                &meta,
                &s.dir,
                &s.dir.join(STORAGE_DIR),
                empty.path(),
                &entries,
                force,
                &|_, _| true,
            )
        };
        let refused = check(false).unwrap_err().to_string();
        assert!(refused.contains("upload/u1/02.jpg"), "{refused}");
        let recorded = &read_hashes(&meta, &s.dir).unwrap().unwrap()["upload/u1/02.jpg"];
        assert!(
            refused.contains(recorded.sha256.as_deref().unwrap()),
            "{refused}"
        );
        let forced = check(true).unwrap();
        assert_eq!(forced.damaged.len(), 1);
        assert!(forced.skips("upload/u1/02.jpg"));
        assert!(!forced.skips("upload/u1/01.jpg"));
        assert_eq!(forced.checked, FILES as u64);
        // The storage step's own check refuses the same file in its temp place.
        let damaged = Content::default();
        assert_eq!(damaged.placed_ok("upload/u1/02.jpg", &stored), Ok(true));
        assert!(matches!(
            check(true).unwrap().placed_ok("upload/u1/02.jpg", &stored),
            Ok(false)
        ));
        assert!(
            forced
                .placed_ok("upload/u1/01.jpg", &s.dir.join("storage/upload/u1/01.jpg"))
                .unwrap()
        );
    }
}
