//! What the storage step may remove or overwrite: only a live entry that a pre-restore
//! snapshot of this restore provably holds (the same path, kind and size, and the same inode
//! or the same bytes in the snapshot's stored copy). Anything else is moved aside into
//! `<data_dir>/kept/<restore id>/<path>` first, so no sequence of restores, retries and kills
//! deletes a file that exists nowhere else (README.md "How to recover").

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::storage::{TreeError, io};
use crate::snapshot::storage::{EntryKind, read_manifest};
use crate::snapshot::store::{MANIFEST_FILE, META_FILE, STORAGE_DIR, read_meta};

/// Under the data dir: files a restore set aside, one folder per restore.
pub const KEPT_DIR: &str = "kept";

/// A pre-restore snapshot's manifest, for "does it hold this file".
struct Holder {
    id: String,
    /// Where its stored files are (`storage/`, or the native snapshot's directory).
    source: PathBuf,
    /// path → (kind, size, symlink target)
    entries: HashMap<String, (EntryKind, u64, Option<String>)>,
}

/// The pre-restore snapshots of one restore, read when first asked.
pub struct Holders {
    snapshots: PathBuf,
    ids: Vec<String>,
    loaded: Option<Vec<Holder>>,
}

impl Holders {
    pub fn new(snapshots: &Path, ids: Vec<String>) -> Holders {
        Holders {
            snapshots: snapshots.to_path_buf(),
            ids,
            loaded: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn load(&mut self) -> Result<&[Holder], TreeError> {
        if self.loaded.is_none() {
            let mut holders = Vec::new();
            for id in &self.ids {
                let dir = self.snapshots.join(id);
                let meta = read_meta(&dir)
                    .map_err(io(&dir.join(META_FILE), "reading the pre-restore snapshot"))?;
                let manifest = dir.join(MANIFEST_FILE);
                let entries = read_manifest(&manifest)
                    .map_err(io(&manifest, "reading the pre-restore snapshot's manifest"))?;
                holders.push(Holder {
                    id: id.clone(),
                    source: meta
                        .storage
                        .source
                        .clone()
                        .unwrap_or_else(|| dir.join(STORAGE_DIR)),
                    entries: entries
                        .into_iter()
                        .map(|e| (e.path, (e.kind, e.size, e.target)))
                        .collect(),
                });
            }
            self.loaded = Some(holders);
        }
        Ok(self.loaded.as_deref().unwrap_or_default())
    }

    /// The pre-restore snapshot that holds the live entry at `live` (relative path `rel`)
    /// as it is now, if any. Folders are never "held": they are removed only when empty.
    /// `now`: the live entry's own metadata (not followed).
    fn holding(
        &mut self,
        rel: &str,
        live: &Path,
        now: &std::fs::Metadata,
    ) -> Result<Option<String>, TreeError> {
        if self.ids.is_empty() || now.is_dir() {
            return Ok(None);
        }
        for h in self.load()? {
            let Some((kind, size, target)) = h.entries.get(rel) else {
                continue;
            };
            let stored = h.source.join(rel);
            let held = match kind {
                EntryKind::Symlink => {
                    now.file_type().is_symlink()
                        && std::fs::read_link(live).ok().as_deref()
                            == target.as_deref().map(Path::new)
                }
                EntryKind::File if now.is_file() && now.len() == *size => {
                    match std::fs::symlink_metadata(&stored) {
                        Ok(s) if s.dev() == now.dev() && s.ino() == now.ino() => true,
                        Ok(s) if s.is_file() && s.len() == now.len() => same_bytes(&stored, live)?,
                        _ => false,
                    }
                }
                _ => false,
            };
            if held {
                return Ok(Some(h.id.clone()));
            }
        }
        Ok(None)
    }
}

/// Whether two files have the same bytes (their SHA-256, as snapshots record it).
fn same_bytes(a: &Path, b: &Path) -> Result<bool, TreeError> {
    let sha = |p: &Path| {
        crate::snapshot::db::file_sha256(p)
            .map(|(sha, _)| sha)
            .map_err(io(p, "reading it to compare"))
    };
    Ok(sha(a)? == sha(b)?)
}

/// Where a restore moves what no pre-restore snapshot holds.
pub struct Aside {
    dir: PathBuf,
    pub moved: Vec<String>,
}

impl Aside {
    /// `<data_dir>/kept/<restore id>/`, created when the first entry goes there.
    pub fn new(data_dir: &Path, restore_id: &str) -> Aside {
        Aside {
            dir: data_dir.join(KEPT_DIR).join(restore_id),
            moved: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves the live entry `live` (relative path `rel`) to `<dir>/<rel>`: a rename on the
    /// same filesystem, else a synced copy then the removal of the original. An entry
    /// already there (a rerun after a kill) is kept under a numbered name, never replaced.
    pub fn take(&mut self, rel: &str, live: &Path) -> Result<(), TreeError> {
        let mut dest = self.dir.join(rel);
        if let Some(parent) = dest.parent() {
            crate::owner_only::create_dir_all(parent).map_err(io(parent, "creating it"))?;
        }
        if std::fs::symlink_metadata(&dest).is_ok() {
            let name = dest
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let parent = dest.parent().map(Path::to_path_buf).unwrap_or_default();
            dest = parent.join(crate::durable::unused_name(&parent, &name));
        }
        match std::fs::rename(live, &dest) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                copy_tree(live, &dest)?;
                let m = std::fs::symlink_metadata(live).map_err(io(live, "reading it"))?;
                if m.is_dir() {
                    std::fs::remove_dir_all(live)
                } else {
                    std::fs::remove_file(live)
                }
                .map_err(io(live, "removing it after keeping a copy"))?;
            }
            Err(e) => return Err(io(live, "moving it aside")(e)),
        }
        if let Some(parent) = dest.parent() {
            crate::durable::sync_dir(parent).map_err(io(parent, "syncing it"))?;
        }
        self.moved.push(rel.to_string());
        Ok(())
    }
}

/// The storage step's rule for a live entry it must remove or overwrite.
pub struct Keep {
    pub holders: Holders,
    pub aside: Aside,
    /// Entries removed or overwritten because a pre-restore snapshot holds them, by snapshot.
    pub held: std::collections::BTreeMap<String, u64>,
}

/// What became of a live entry in the way.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleared {
    /// Nothing is there.
    Empty,
    /// A pre-restore snapshot holds it as it is: it may go.
    Held,
    /// Moved aside (it is gone from the live tree).
    MovedAside,
}

impl Keep {
    pub fn new(holders: Holders, aside: Aside) -> Keep {
        Keep {
            holders,
            aside,
            held: Default::default(),
        }
    }

    /// Makes way at `live` (relative path `rel`): a held entry may be removed or overwritten
    /// by the caller; anything else is moved aside first.
    pub fn clear_way(&mut self, rel: &str, live: &Path) -> Result<Cleared, TreeError> {
        let Ok(now) = std::fs::symlink_metadata(live) else {
            return Ok(Cleared::Empty);
        };
        if let Some(id) = self.holders.holding(rel, live, &now)? {
            *self.held.entry(id).or_default() += 1;
            return Ok(Cleared::Held);
        }
        self.aside.take(rel, live)?;
        Ok(Cleared::MovedAside)
    }
}

/// A synced copy of a file, symlink or folder tree (owner, mode and mtime of files kept).
fn copy_tree(from: &Path, to: &Path) -> Result<(), TreeError> {
    let m = std::fs::symlink_metadata(from).map_err(io(from, "reading it"))?;
    if m.file_type().is_symlink() {
        let target = std::fs::read_link(from).map_err(io(from, "reading the link"))?;
        return std::os::unix::fs::symlink(target, to).map_err(io(to, "making a symlink"));
    }
    if m.is_dir() {
        crate::owner_only::create_dir(to).map_err(io(to, "creating it"))?;
        for entry in std::fs::read_dir(from).map_err(io(from, "listing it"))? {
            let entry = entry.map_err(io(from, "listing it"))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        return Ok(());
    }
    let mut src = std::fs::File::open(from).map_err(io(from, "reading it"))?;
    let mut dst = crate::owner_only::create_file(to).map_err(io(to, "creating it"))?;
    std::io::copy(&mut src, &mut dst).map_err(io(to, "copying into it"))?;
    dst.set_modified(m.modified().map_err(io(from, "reading its mtime"))?)
        .map_err(io(to, "setting its mtime"))?;
    dst.sync_all().map_err(io(to, "syncing it"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_compares_content_not_names() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&a, &big).unwrap();
        std::fs::write(&b, &big).unwrap();
        let mut flipped = big.clone();
        flipped[150_000] ^= 1;
        std::fs::write(&c, &flipped).unwrap();
        assert!(same_bytes(&a, &b).unwrap());
        assert!(!same_bytes(&a, &c).unwrap());
    }

    #[test]
    fn an_entry_already_aside_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        std::fs::create_dir_all(live.join("upload/u1")).unwrap();
        let mut aside = Aside::new(&dir.path().join("data"), "r1");
        std::fs::write(live.join("upload/u1/x.jpg"), "first").unwrap();
        aside
            .take("upload/u1/x.jpg", &live.join("upload/u1/x.jpg"))
            .unwrap();
        std::fs::write(live.join("upload/u1/x.jpg"), "second").unwrap();
        aside
            .take("upload/u1/x.jpg", &live.join("upload/u1/x.jpg"))
            .unwrap();
        let kept = aside.dir().join("upload/u1");
        assert_eq!(
            std::fs::read_to_string(kept.join("x.jpg")).unwrap(),
            "first"
        );
        assert_eq!(
            std::fs::read_to_string(kept.join("x.jpg-2")).unwrap(),
            "second"
        );
        assert!(!live.join("upload/u1/x.jpg").exists());
        assert_eq!(aside.moved.len(), 2);
    }
}
