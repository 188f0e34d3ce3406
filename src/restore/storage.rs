//! The storage half of a restore: the upload location brought back to what a snapshot's
//! manifest lists. A btrfs snapshot goes back as a subvolume in place of the live one (the
//! live one kept beside it, renamed); every other method puts the tree back file by file
//! from the snapshot's `storage/` (or the ZFS snapshot's `.zfs/snapshot/…` directory): a
//! file whose inode (hard links) or size and mtime (copies) still match is left alone, any
//! other is replaced through a temp name and a rename, so a kill leaves each file whole.
//! A live entry is removed or overwritten only when a pre-restore snapshot of this restore
//! provably holds it (restore/kept.rs); anything else is moved aside into the data dir's
//! `kept/<restore id>/` first. Without a pre-restore snapshot (`--no-preserve`), files the
//! snapshot does not list stay in place. Top-level folders the snapshot left out (`thumbs`…)
//! are not touched.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::kept::{Cleared, Keep};
use crate::snapshot::storage::{EntryKind, ManifestEntry, StorageMethod};

const TEMP_SUFFIX: &str = ".immich-guard-restore";

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("restoring {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("the snapshot's copy of {path} is missing: the snapshot is damaged")]
    Missing { path: PathBuf },
    #[error("btrfs {action} failed: {detail}")]
    Btrfs { action: String, detail: String },
    #[error(
        "the snapshot's copy of {0} (the manifest's content hashes): not put in place; run the restore again with --force to leave it as it is"
    )]
    Damaged(super::content::Damaged),
}

pub(super) fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> TreeError {
    let path = path.to_path_buf();
    move |source| TreeError::Io {
        path,
        action,
        source,
    }
}

/// What putting the tree back did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeRestored {
    /// Files put back (missing or changed since the snapshot).
    pub replaced: u64,
    pub unchanged: u64,
    /// Entries the snapshot does not have, removed (a pre-restore snapshot holds each).
    pub removed: u64,
    /// Entries the snapshot does not have, left in place (`--no-preserve`, or a folder that
    /// still holds something).
    pub left: u64,
    /// Live entries no pre-restore snapshot holds, moved aside (added since, or changed).
    pub moved_aside: u64,
    /// A replaced btrfs subvolume, kept under this name.
    pub kept: Option<PathBuf>,
    /// Damaged in the snapshot and left as they were (`--force`, restore/content.rs).
    pub skipped: Vec<String>,
}

/// How the files go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Link,
    Reflink,
    Copy,
}

fn place_of(method: StorageMethod) -> Place {
    match method {
        StorageMethod::Hardlink => Place::Link,
        StorageMethod::Reflink | StorageMethod::Btrfs => Place::Reflink,
        StorageMethod::Zfs | StorageMethod::Copy => Place::Copy,
    }
}

/// Whether the storage step would put the stored file (`snap`) back over `live`.
pub fn would_replace(snap: &std::fs::Metadata, live: &Path, method: StorageMethod) -> bool {
    !same_file(snap, live, place_of(method))
}

/// Puts `upload` back to the manifest `entries`, the files taken from `source`. Whatever is
/// removed or overwritten goes through `keep` first; entries the manifest does not list go
/// (removed when held, else moved aside) only when `keep` has a pre-restore snapshot to hold
/// them, otherwise they stay (`--no-preserve`). `content`: each file checked before it goes
/// into place (restore/content.rs).
pub fn restore_tree(
    source: &Path,
    entries: &[ManifestEntry],
    upload: &Path,
    method: StorageMethod,
    excluded: &[String],
    keep: &mut Keep,
    content: &super::content::Content,
) -> Result<TreeRestored, TreeError> {
    let remove_extra = !keep.holders.is_empty();
    let place = place_of(method);
    let mut done = TreeRestored::default();
    std::fs::create_dir_all(upload).map_err(io(upload, "creating it"))?;
    for e in entries {
        let live = upload.join(&e.path);
        let from = source.join(&e.path);
        match e.kind {
            EntryKind::Dir => restore_dir(&from, &live, &e.path, keep, &mut done)?,
            EntryKind::Symlink => {
                let target = e.target.as_deref().unwrap_or_default();
                if std::fs::read_link(&live).is_ok_and(|t| t == Path::new(target)) {
                    done.unchanged += 1;
                    continue;
                }
                make_way(&e.path, &live, keep, &mut done)?;
                std::os::unix::fs::symlink(target, &live).map_err(io(&live, "making a symlink"))?;
                done.replaced += 1;
            }
            EntryKind::File => {
                let snap = std::fs::symlink_metadata(&from).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        TreeError::Missing { path: from.clone() }
                    } else {
                        TreeError::Io {
                            path: from.clone(),
                            action: "reading the snapshot's copy",
                            source: e,
                        }
                    }
                })?;
                if same_file(&snap, &live, place) {
                    done.unchanged += 1;
                    continue;
                }
                // A damaged stored copy (`--force`) is not put back: the live file stays.
                if content.skips(&e.path) {
                    done.skipped.push(e.path.clone());
                    continue;
                }
                if keep.clear_way(&e.path, &live)? == Cleared::MovedAside {
                    done.moved_aside += 1;
                }
                let check =
                    |temp: &Path| content.placed_ok(&e.path, temp).map_err(TreeError::Damaged);
                if !put_file(&from, &snap, &live, place, &check)? {
                    done.skipped.push(e.path.clone());
                    continue;
                }
                done.replaced += 1;
            }
        }
    }
    let listed: HashSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    remove_unlisted(upload, &listed, excluded, remove_extra, keep, &mut done)?;
    let root = std::fs::File::open(upload).map_err(io(upload, "opening it"))?;
    rustix::fs::syncfs(&root).map_err(|e| TreeError::Io {
        path: upload.to_path_buf(),
        action: "syncing it",
        source: e.into(),
    })?;
    Ok(done)
}

fn restore_dir(
    from: &Path,
    live: &Path,
    rel: &str,
    keep: &mut Keep,
    done: &mut TreeRestored,
) -> Result<(), TreeError> {
    match std::fs::symlink_metadata(live) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            make_way(rel, live, keep, done)?;
            std::fs::create_dir(live).map_err(io(live, "creating it"))?;
        }
        Err(_) => std::fs::create_dir(live).map_err(io(live, "creating it"))?,
    }
    if let Ok(snap) = std::fs::metadata(from) {
        set_owner_mode(live, &snap)?;
    }
    Ok(())
}

/// Whether the live file is the snapshot's: the same inode for a hard-link tree, else the
/// same size and modification time.
fn same_file(snap: &std::fs::Metadata, live: &Path, place: Place) -> bool {
    let Ok(now) = std::fs::symlink_metadata(live) else {
        return false;
    };
    if !now.is_file() {
        return false;
    }
    if now.dev() == snap.dev() && now.ino() == snap.ino() {
        return true;
    }
    place != Place::Link
        && now.len() == snap.len()
        && now.mtime() == snap.mtime()
        && now.mtime_nsec() == snap.mtime_nsec()
}

/// Clears `live` for an entry of the snapshot: what a pre-restore snapshot holds is removed,
/// anything else moved aside.
fn make_way(
    rel: &str,
    live: &Path,
    keep: &mut Keep,
    done: &mut TreeRestored,
) -> Result<(), TreeError> {
    match keep.clear_way(rel, live)? {
        Cleared::Held => clear(live),
        Cleared::MovedAside => {
            done.moved_aside += 1;
            Ok(())
        }
        Cleared::Empty => Ok(()),
    }
}

/// Removes whatever is at `path`: only an entry a pre-restore snapshot holds (`make_way`),
/// a folder found in a file's place after its contents were judged one by one, or the
/// restore's own temp file.
fn clear(path: &Path) -> Result<(), TreeError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(io(path, "removing it")),
        Ok(_) => std::fs::remove_file(path).map_err(io(path, "removing it")),
        Err(_) => Ok(()),
    }
}

/// False when `check` refused the temp file (it is removed; the live file stays as it is).
fn put_file(
    from: &Path,
    snap: &std::fs::Metadata,
    live: &Path,
    place: Place,
    check: &dyn Fn(&Path) -> Result<bool, TreeError>,
) -> Result<bool, TreeError> {
    let name = live.file_name().unwrap_or_default().to_string_lossy();
    let temp = live.with_file_name(format!(".{name}{TEMP_SUFFIX}"));
    let _ = std::fs::remove_file(&temp);
    let linked = place == Place::Link && std::fs::hard_link(from, &temp).is_ok();
    if !linked {
        copy_file(from, &temp, place == Place::Reflink)?;
        set_owner_mode(&temp, snap)?;
        let file = std::fs::File::options()
            .write(true)
            .open(&temp)
            .map_err(io(&temp, "opening it"))?;
        // No fsync per file: the whole tree is synced (syncfs) before the step is recorded as
        // done, and a step not recorded is redone, file by file, after a crash.
        file.set_modified(snap.modified().map_err(io(from, "reading its mtime"))?)
            .map_err(io(&temp, "setting its mtime"))?;
    }
    match check(&temp) {
        Ok(true) => {}
        refused => {
            let _ = std::fs::remove_file(&temp);
            refused?;
            return Ok(false);
        }
    }
    // A folder in a file's place was moved aside by the caller; only an empty one is left.
    if std::fs::symlink_metadata(live).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir(live).map_err(io(live, "removing an empty folder"))?;
    }
    std::fs::rename(&temp, live).map_err(io(live, "renaming the restored file into place"))?;
    Ok(true)
}

fn copy_file(from: &Path, to: &Path, reflink: bool) -> Result<(), TreeError> {
    let mut src = std::fs::File::open(from).map_err(io(from, "reading the snapshot's copy"))?;
    let mut dst = crate::owner_only::create_file(to).map_err(io(to, "creating it"))?;
    if reflink && rustix::fs::ioctl_ficlone(&dst, &src).is_ok() {
        return Ok(());
    }
    std::io::copy(&mut src, &mut dst).map_err(io(to, "copying into it"))?;
    Ok(())
}

fn set_owner_mode(path: &Path, snap: &std::fs::Metadata) -> Result<(), TreeError> {
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::lchown(path, Some(snap.uid()), Some(snap.gid()))
            .map_err(io(path, "setting its owner"))?;
    }
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(snap.permissions().mode() & 0o7777),
    )
    .map_err(io(path, "setting its mode"))
}

/// Entries of the live tree the manifest does not list (children before their folder):
/// removed when a pre-restore snapshot holds them, else moved aside; left in place when
/// `remove` is off.
fn remove_unlisted(
    upload: &Path,
    listed: &HashSet<&str>,
    excluded: &[String],
    remove: bool,
    keep: &mut Keep,
    done: &mut TreeRestored,
) -> Result<(), TreeError> {
    let walker = walkdir::WalkDir::new(upload)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| {
            !(e.depth() == 1 && excluded.iter().any(|x| e.file_name() == OsStr::new(x)))
        });
    let mut unlisted = Vec::new();
    for entry in walker {
        let entry = entry.map_err(|e| TreeError::Io {
            path: e.path().unwrap_or(upload).to_path_buf(),
            action: "listing it",
            source: e.into(),
        })?;
        let rel = entry.path().strip_prefix(upload).unwrap_or(entry.path());
        let rel = rel.to_string_lossy();
        if !listed.contains(rel.as_ref()) {
            unlisted.push((
                rel.into_owned(),
                entry.path().to_path_buf(),
                entry.file_type().is_dir(),
            ));
        }
    }
    if !remove {
        done.left += unlisted.len() as u64;
        return Ok(());
    }
    // Walked parents first: reversed, a folder comes after everything in it.
    for (rel, path, is_dir) in unlisted.iter().rev() {
        if *is_dir {
            // Emptied above unless something in it stays; then it stays too.
            if std::fs::remove_dir(path).is_err() {
                done.left += 1;
                continue;
            }
            done.removed += 1;
            continue;
        }
        match keep.clear_way(rel, path)? {
            Cleared::Held => {
                std::fs::remove_file(path).map_err(io(path, "removing it"))?;
                done.removed += 1;
            }
            Cleared::MovedAside => done.moved_aside += 1,
            Cleared::Empty => {}
        }
    }
    Ok(())
}

fn btrfs(args: &[&OsStr], action: &str) -> Result<(), TreeError> {
    let out = std::process::Command::new("btrfs")
        .args(args)
        .output()
        .map_err(|e| TreeError::Btrfs {
            action: action.to_string(),
            detail: format!("cannot run btrfs: {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TreeError::Btrfs {
            action: action.to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Where a btrfs restore builds the new subvolume and keeps the replaced one.
pub fn btrfs_names(upload: &Path, stamp: &str) -> (PathBuf, PathBuf) {
    let name = upload.file_name().unwrap_or_default().to_string_lossy();
    (
        upload.with_file_name(format!(".{name}.immich-guard-restoring")),
        upload.with_file_name(format!("{name}.immich-guard-replaced-{stamp}")),
    )
}

/// The snapshot's subvolume `snap` back in place of the live `upload`: a writable snapshot
/// of it is made beside the live one, the folders the snapshot left out are moved over, the
/// live one is renamed to `kept` and the new one into its place. Resumable: a finished
/// swap is recognised, a half-made new subvolume is made again.
pub fn swap_subvolume(snap: &Path, upload: &Path, kept: &Path) -> Result<PathBuf, TreeError> {
    let (restoring, _) = btrfs_names(upload, "");
    if kept.exists() && upload.exists() {
        return Ok(kept.to_path_buf()); // swapped before a kill
    }
    if kept.exists() && !upload.exists() && restoring.exists() {
        std::fs::rename(&restoring, upload).map_err(io(upload, "renaming the restored one in"))?;
        return Ok(kept.to_path_buf());
    }
    if restoring.exists() {
        btrfs(
            &[
                "subvolume".as_ref(),
                "delete".as_ref(),
                restoring.as_os_str(),
            ],
            "deleting a half-made subvolume",
        )?;
    }
    btrfs(
        &[
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            snap.as_os_str(),
            restoring.as_os_str(),
        ],
        "snapshot of the snapshot",
    )?;
    // Left-out folders (thumbnails…) are not in the snapshot: they move to the new one.
    for entry in std::fs::read_dir(upload).map_err(io(upload, "listing it"))? {
        let entry = entry.map_err(io(upload, "listing it"))?;
        let into = restoring.join(entry.file_name());
        if !into.exists() && entry.file_type().is_ok_and(|t| t.is_dir()) {
            let excluded = !snap.join(entry.file_name()).exists();
            if excluded {
                std::fs::rename(entry.path(), &into)
                    .map_err(io(&entry.path(), "moving a left-out folder over"))?;
            }
        }
    }
    std::fs::rename(upload, kept).map_err(io(upload, "renaming the live subvolume aside"))?;
    std::fs::rename(&restoring, upload).map_err(io(upload, "renaming the restored one in"))?;
    if let Some(parent) = upload.parent() {
        crate::durable::sync_dir(parent).map_err(io(parent, "syncing it"))?;
    }
    Ok(kept.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::kept::{Aside, Holders};
    use crate::snapshot::storage::{Options, Plan, read_manifest, snapshot_tree};
    use std::fs;

    fn write(root: &Path, rel: &str, content: &str) {
        fs::create_dir_all(root.join(rel).parent().unwrap()).unwrap();
        fs::write(root.join(rel), content).unwrap();
    }

    /// A snapshot of `upload` under `snapshots/<id>/` as the store lays it out (storage/,
    /// manifest, meta.json), so it can stand as a pre-restore snapshot.
    fn snapshot(
        upload: &Path,
        snapshots: &Path,
        id: &str,
        method: StorageMethod,
        options: &Options,
    ) -> Vec<ManifestEntry> {
        let snap = snapshots.join(id);
        fs::create_dir_all(&snap).unwrap();
        let manifest = snap.join("manifest.jsonl.zst");
        snapshot_tree(
            upload,
            &snap,
            "storage",
            &manifest,
            &Plan::walking(method),
            options,
        )
        .unwrap();
        let meta = crate::snapshot::store::tests::meta(id, chrono::Utc::now());
        fs::write(snap.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        read_manifest(&manifest).unwrap()
    }

    fn keep(data: &Path, snapshots: &Path, pre: &[&str]) -> Keep {
        Keep::new(
            Holders::new(snapshots, pre.iter().map(|s| s.to_string()).collect()),
            Aside::new(data, "r1"),
        )
    }

    /// Snapshot, change the live tree, restore: the snapshot's tree is back; what was added
    /// or changed later is removed only where a pre-restore snapshot holds it, else moved
    /// aside, and left in place when not asked to go.
    fn round_trip(method: StorageMethod) {
        let dir = tempfile::tempdir().unwrap();
        let (snapshots, data) = (dir.path().join("snapshots"), dir.path().join("data"));
        let upload = dir.path().join("library");
        write(&upload, "upload/u1/a.jpg", "photo a");
        write(&upload, "upload/u1/b.jpg", "photo b");
        write(&upload, "upload/.immich", "");
        write(&upload, "thumbs/u1/a.webp", "thumb a");
        let options = Options {
            exclude: vec!["thumbs".into()],
            ..Options::default()
        };
        let entries = snapshot(&upload, &snapshots, "old", method, &options);
        let source = snapshots.join("old/storage");

        fs::remove_file(upload.join("upload/u1/a.jpg")).unwrap();
        // Replaced by a new file, not changed in place (a hard link would share the change).
        fs::remove_file(upload.join("upload/u1/b.jpg")).unwrap();
        write(&upload, "upload/u1/b.jpg", "edited b");
        write(&upload, "upload/u2/new.jpg", "added later");
        write(&upload, "thumbs/u1/new.webp", "thumb new");
        // The state before the restore, kept.
        snapshot(&upload, &snapshots, "pre", method, &options);
        // Written after the pre-restore snapshot: in no snapshot.
        write(
            &upload,
            "upload/u2/later.jpg",
            "uploaded during the restore",
        );

        // No pre-restore snapshot: nothing the snapshot does not list goes, and the changed
        // b.jpg is moved aside before the snapshot's copy takes its place.
        let mut k = keep(&data, &snapshots, &[]);
        let kept = restore_tree(
            &source,
            &entries,
            &upload,
            method,
            &options.exclude,
            &mut k,
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(upload.join("upload/u1/a.jpg")).unwrap(),
            "photo a"
        );
        assert_eq!(
            fs::read_to_string(upload.join("upload/u1/b.jpg")).unwrap(),
            "photo b"
        );
        assert!(upload.join("upload/u2/new.jpg").exists(), "{kept:?}");
        assert_eq!((kept.replaced, kept.left, kept.moved_aside), (2, 3, 1));
        assert_eq!(
            fs::read_to_string(data.join("kept/r1/upload/u1/b.jpg")).unwrap(),
            "edited b"
        );

        let mut k = keep(&data, &snapshots, &["pre"]);
        let again = restore_tree(
            &source,
            &entries,
            &upload,
            method,
            &options.exclude,
            &mut k,
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            (again.replaced, again.removed, again.moved_aside),
            (0, 2, 1),
            "{again:?}"
        );
        assert!(!upload.join("upload/u2").exists());
        assert_eq!(k.aside.moved, ["upload/u2/later.jpg"]);
        // new.jpg was removed only because the pre-restore snapshot holds it.
        assert_eq!(k.held.get("pre"), Some(&1));
        assert_eq!(
            fs::read_to_string(data.join("kept/r1/upload/u2/later.jpg")).unwrap(),
            "uploaded during the restore"
        );
        assert_eq!(
            fs::read_to_string(snapshots.join("pre/storage/upload/u2/new.jpg")).unwrap(),
            "added later"
        );
        // Left-out folders are not the snapshot's to judge.
        assert!(upload.join("thumbs/u1/new.webp").exists());
    }

    /// No pre-restore snapshot (`--no-preserve`): a changed file is moved aside before the
    /// snapshot's copy takes its place, and what was added stays.
    fn without_preserve(method: StorageMethod) {
        let dir = tempfile::tempdir().unwrap();
        let (snapshots, data) = (dir.path().join("snapshots"), dir.path().join("data"));
        let upload = dir.path().join("library");
        write(&upload, "upload/u1/b.jpg", "photo b");
        let entries = snapshot(&upload, &snapshots, "old", method, &Options::default());
        fs::remove_file(upload.join("upload/u1/b.jpg")).unwrap();
        write(&upload, "upload/u1/b.jpg", "edited b, same size");
        write(&upload, "upload/u1/c.jpg", "added");
        let mut k = keep(&data, &snapshots, &[]);
        let done = restore_tree(
            &snapshots.join("old/storage"),
            &entries,
            &upload,
            method,
            &[],
            &mut k,
            &Default::default(),
        )
        .unwrap();
        assert_eq!((done.replaced, done.moved_aside, done.left), (1, 1, 1));
        assert_eq!(
            fs::read_to_string(upload.join("upload/u1/b.jpg")).unwrap(),
            "photo b"
        );
        assert_eq!(
            fs::read_to_string(data.join("kept/r1/upload/u1/b.jpg")).unwrap(),
            "edited b, same size"
        );
        assert!(upload.join("upload/u1/c.jpg").exists());
    }

    #[test]
    fn a_changed_file_no_snapshot_holds_is_moved_aside() {
        without_preserve(StorageMethod::Hardlink);
        without_preserve(StorageMethod::Copy);
    }

    #[test]
    fn a_hardlink_tree_goes_back_into_place() {
        round_trip(StorageMethod::Hardlink);
    }

    #[test]
    fn a_copy_goes_back_into_place() {
        round_trip(StorageMethod::Copy);
    }
}
