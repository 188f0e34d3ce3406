//! The storage half of a snapshot: a frozen view of the upload location plus a manifest of
//! every entry (path, size, mtime, inode), written zstd-compressed.
//!
//! Methods, best first (README.md and docs/operations.md, "Snapshots"): a native snapshot
//! when the upload location is a btrfs subvolume or on a ZFS dataset; a reflink copy where
//! the filesystem can share extents; a hard-link tree on the same filesystem; a real copy
//! across filesystems only when allowed.
//! It reads the upload location and never writes to it; symlinks are recreated as symlinks
//! and never followed out of the tree.

//!
//! The parts: the method choice and the entry point (here), native snapshots (`native`), the
//! parallel walker that links, clones or copies the tree (`walk`), the manifest (`manifest`).

mod manifest;
mod native;
mod walk;

pub use manifest::{EntryKind, ManifestEntry, Skipped, read_manifest};
pub use native::remove_native;

use manifest::write_manifest;
use native::{ZfsDataset, btrfs_snapshot, zfs_dataset, zfs_snapshot};
use walk::{WalkMode, walk};

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use serde::{Deserialize, Serialize};

/// How the storage snapshot was made, recorded in meta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMethod {
    /// A read-only btrfs snapshot of the upload subvolume at `storage/`: instant, and the
    /// files are frozen even if Immich rewrote them in place later.
    Btrfs,
    /// A ZFS snapshot `<dataset>@immich-guard-<id>`, read at `<mountpoint>/.zfs/snapshot/…`.
    Zfs,
    /// Every file cloned with FICLONE (XFS, btrfs, bcachefs…): own inodes, shared extents.
    Reflink,
    /// Hard links on the same filesystem: instant and free, but they share the files with the
    /// live library (Immich writes new files rather than changing old ones).
    Hardlink,
    /// A real copy, for a snapshot dir on another filesystem (`snapshots.copy_across = true`).
    Copy,
}

impl std::fmt::Display for StorageMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StorageMethod::Btrfs => "btrfs snapshot",
            StorageMethod::Zfs => "zfs snapshot",
            StorageMethod::Reflink => "reflink copy",
            StorageMethod::Hardlink => "hardlink tree",
            StorageMethod::Copy => "full copy",
        })
    }
}

impl StorageMethod {
    /// Whether the method writes file data (and so needs room for it and a sync).
    pub fn copies_data(self) -> bool {
        self == StorageMethod::Copy
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "snapshot dir {snapshots} is on another filesystem than the upload location {upload}, which supports neither native snapshots nor reflinks there: move snapshots.dir onto the filesystem of the uploads, or set snapshots.copy_across = true for a (slow, full-size) copy"
    )]
    OtherFilesystem { snapshots: PathBuf, upload: PathBuf },
    #[error(
        "cannot read {path}: {source}; make it readable (Immich needs to read it too), or set snapshots.skip_unreadable = true to snapshot without it (the skipped paths are recorded in meta.json)"
    )]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot hard-link {path}: the kernel (fs.protected_hardlinks) lets only its owner or root link a file it cannot write; run immich-guard as root, as the systemd unit does"
    )]
    LinkRefused { path: PathBuf },
    #[error("upload location {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the storage snapshot at {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{tool} snapshot of {path} failed: {detail}")]
    Native {
        tool: &'static str,
        path: PathBuf,
        detail: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageTree {
    pub method: StorageMethod,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sum of file sizes in the tree (what a copy would cost).
    pub bytes: u64,
    pub excluded: Vec<String>,
    pub manifest_bytes: u64,
    /// SHA-256 of the manifest file on disk, hex; a restore refuses a manifest that differs.
    /// Absent in snapshots made before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
    pub duration_ms: u64,
    /// Where the files of this snapshot are, when not under `storage/` (ZFS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// The native snapshot's name (`pool/photos@immich-guard-…`), to destroy it with ours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<String>,
    /// Why a better method was not used (e.g. the btrfs snapshot failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
}

/// What `choose_method` found: the method to use and, for a native snapshot, what to fall
/// back on if the snapshot tool fails.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub method: StorageMethod,
    pub fallback: Option<StorageMethod>,
    /// Why there is no fallback, told to the admin if the native snapshot fails.
    no_fallback: Option<String>,
    zfs: Option<ZfsDataset>,
}

impl Plan {
    /// A plan for a tree-walking method, without detection (benchmarks and tests).
    pub fn walking(method: StorageMethod) -> Plan {
        Plan {
            method,
            fallback: None,
            no_fallback: None,
            zfs: None,
        }
    }
}

/// What `snapshot_tree` needs to know beyond the paths.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Top-level folders (e.g. `thumbs`) to leave out.
    pub exclude: Vec<String>,
    pub skip_unreadable: bool,
    /// Names the native snapshot (`immich-guard-<id>`).
    pub id: String,
}

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
const ZFS_SUPER_MAGIC: i64 = 0x2fc1_2fc1;
/// The inode of every btrfs subvolume's root directory.
pub(super) const BTRFS_SUBVOLUME_INODE: u64 = 256;

/// Whether `path` is the root of a btrfs subvolume (what a restore can swap back in place).
// `f_type`'s width differs between targets.
#[allow(clippy::unnecessary_cast)]
pub fn is_btrfs_subvolume(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == BTRFS_SUPER_MAGIC)
        && std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == BTRFS_SUBVOLUME_INODE)
}

/// Chooses the method for `upload` with snapshots under `snapshots` (both must exist).
pub fn choose_method(
    upload: &Path,
    snapshots: &Path,
    copy_across: bool,
) -> Result<Plan, StorageError> {
    let read = |path: &Path| {
        let path = path.to_path_buf();
        move |e: Errno| StorageError::Read {
            path,
            source: e.into(),
        }
    };
    let fs_type = rustix::fs::statfs(upload).map_err(read(upload))?.f_type as i64;
    let upload_meta = std::fs::metadata(upload).map_err(|source| StorageError::Read {
        path: upload.to_path_buf(),
        source,
    })?;
    let walk = walk_method(upload, &upload_meta, snapshots, copy_across);
    if fs_type == BTRFS_SUPER_MAGIC && upload_meta.ino() == BTRFS_SUBVOLUME_INODE {
        return Ok(Plan {
            method: StorageMethod::Btrfs,
            no_fallback: walk.as_ref().err().map(|e| e.to_string()),
            fallback: walk.ok(),
            zfs: None,
        });
    }
    if fs_type == ZFS_SUPER_MAGIC
        && let Some(dataset) = zfs_dataset(upload)
    {
        return Ok(Plan {
            method: StorageMethod::Zfs,
            no_fallback: walk.as_ref().err().map(|e| e.to_string()),
            fallback: walk.ok(),
            zfs: Some(dataset),
        });
    }
    Ok(Plan::walking(walk?))
}

fn walk_method(
    upload: &Path,
    upload_meta: &std::fs::Metadata,
    snapshots: &Path,
    copy_across: bool,
) -> Result<StorageMethod, StorageError> {
    if reflink_works(upload, snapshots) {
        return Ok(StorageMethod::Reflink);
    }
    let snapshots_dev = std::fs::metadata(snapshots)
        .map_err(|source| StorageError::Read {
            path: snapshots.to_path_buf(),
            source,
        })?
        .dev();
    if upload_meta.dev() == snapshots_dev {
        Ok(StorageMethod::Hardlink)
    } else if copy_across {
        Ok(StorageMethod::Copy)
    } else {
        Err(StorageError::OtherFilesystem {
            snapshots: snapshots.to_path_buf(),
            upload: upload.to_path_buf(),
        })
    }
}

/// Clones the first regular file found under `upload` into `snapshots` and removes the clone:
/// the only sure test, since support depends on both filesystems and the kernel.
fn reflink_works(upload: &Path, snapshots: &Path) -> bool {
    let Some(sample) = walkdir::WalkDir::new(upload)
        .into_iter()
        .filter_map(Result::ok)
        .find(|e| e.file_type().is_file())
    else {
        return false;
    };
    let Ok(source) = std::fs::File::open(sample.path()) else {
        return false;
    };
    let probe = snapshots.join(format!(".reflink-probe-{}", std::process::id()));
    let Ok(clone) = crate::owner_only::create_file(&probe) else {
        return false;
    };
    let works = rustix::fs::ioctl_ficlone(&clone, &source).is_ok();
    drop(clone);
    let _ = std::fs::remove_file(&probe);
    works
}

/// Makes the storage snapshot inside `snap_dir` (the partial dir): `storage/` (or a native
/// snapshot) and `manifest` beside it.
pub fn snapshot_tree(
    upload: &Path,
    snap_dir: &Path,
    storage_name: &str,
    manifest: &Path,
    plan: &Plan,
    options: &Options,
) -> Result<StorageTree, StorageError> {
    snapshot_tree_frozen(
        upload,
        snap_dir,
        storage_name,
        manifest,
        plan,
        options,
        &|| {},
    )
}

/// [`snapshot_tree`], calling `frozen` once the tree's moment is fixed: right after a native
/// snapshot (btrfs, ZFS: its manifest is listed from the snapshot afterwards), after the walk
/// for the methods that link or copy (the manifest is written afterwards). A snapshot's
/// writers may go on from then (snapshot/pause.rs).
pub fn snapshot_tree_frozen(
    upload: &Path,
    snap_dir: &Path,
    storage_name: &str,
    manifest: &Path,
    plan: &Plan,
    options: &Options,
    frozen: &dyn Fn(),
) -> Result<StorageTree, StorageError> {
    let started = std::time::Instant::now();
    let dest = snap_dir.join(storage_name);
    let mut notes = Vec::new();
    let mut method = plan.method;
    let mut source = None;
    let mut native = None;
    let mut excluded = options.exclude.clone();
    let walked = match plan.method {
        StorageMethod::Btrfs => btrfs_snapshot(upload, snap_dir, &dest, &options.exclude),
        StorageMethod::Zfs => {
            let dataset = plan.zfs.as_ref().expect("a ZFS plan names its dataset");
            zfs_snapshot(upload, snap_dir, dataset, &options.id).map(|(name, root)| {
                // A dataset snapshot holds everything; nothing can be left out.
                excluded.clear();
                native = Some(name);
                source = Some(root);
            })
        }
        _ => Ok(()),
    };
    if let Err(e) = walked {
        let Some(fallback) = plan.fallback else {
            return Err(match (e, &plan.no_fallback) {
                (StorageError::Native { tool, path, detail }, Some(why)) => StorageError::Native {
                    tool,
                    path,
                    detail: format!("{detail}; and no other method works: {why}"),
                },
                (e, _) => e,
            });
        };
        tracing::warn!(error = %e, ?fallback, "native snapshot failed; using the fallback");
        notes.push(format!("{e}; used {fallback:?} instead"));
        remove_native(snap_dir).map_err(|source| StorageError::Write {
            path: snap_dir.to_path_buf(),
            source,
        })?;
        method = fallback;
    } else if matches!(method, StorageMethod::Btrfs | StorageMethod::Zfs) {
        frozen();
    }

    let mode = match method {
        StorageMethod::Btrfs => WalkMode::List,
        StorageMethod::Zfs => WalkMode::List,
        StorageMethod::Reflink => WalkMode::Reflink,
        StorageMethod::Hardlink => WalkMode::Hardlink,
        StorageMethod::Copy => WalkMode::Copy,
    };
    let walk_root = match (&source, mode) {
        (Some(root), _) => root.clone(),
        (None, WalkMode::List) => dest.clone(),
        (None, _) => upload.to_path_buf(),
    };
    let out_root = if mode == WalkMode::List {
        None
    } else {
        // Owner-only: the tree below keeps the library's modes, unreachable to others.
        crate::owner_only::create_dir(&dest).map_err(|source| StorageError::Write {
            path: dest.clone(),
            source,
        })?;
        Some(dest.as_path())
    };
    let (mut entries, skipped) = walk(
        &walk_root,
        out_root,
        mode,
        if mode == WalkMode::List {
            &[]
        } else {
            &options.exclude
        },
        options.skip_unreadable,
    )?;
    if mode != WalkMode::List {
        frozen();
    }
    if mode.writes() {
        // Data and names are durable before the seal can point at them.
        let root = std::fs::File::open(&dest).map_err(|source| StorageError::Write {
            path: dest.clone(),
            source,
        })?;
        rustix::fs::syncfs(&root).map_err(|e| StorageError::Write {
            path: dest.clone(),
            source: e.into(),
        })?;
    }
    entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));

    let mut tree = StorageTree {
        method,
        files: 0,
        dirs: 0,
        symlinks: 0,
        bytes: 0,
        excluded,
        manifest_bytes: 0,
        manifest_sha256: None,
        duration_ms: 0,
        source,
        native,
        notes,
        skipped,
    };
    for e in &entries {
        match e.kind {
            EntryKind::Dir => tree.dirs += 1,
            EntryKind::Symlink => tree.symlinks += 1,
            EntryKind::File => {
                tree.files += 1;
                tree.bytes += e.size;
            }
        }
    }
    let (manifest_bytes, manifest_sha256) =
        write_manifest(manifest, &entries).map_err(|source| StorageError::Write {
            path: manifest.to_path_buf(),
            source,
        })?;
    tree.manifest_bytes = manifest_bytes;
    tree.manifest_sha256 = Some(manifest_sha256);
    tree.duration_ms = started.elapsed().as_millis() as u64;
    Ok(tree)
}

/// Removes a snapshot directory with whatever native snapshot it owns.
pub fn remove_snapshot_dir(dir: &Path) -> std::io::Result<()> {
    remove_native(dir)?;
    std::fs::remove_dir_all(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn library(root: &Path) {
        for (p, content) in [
            ("library/admin/2024/06/IMG_0001.jpg", "photo one"),
            ("upload/u1/ab/cd/a.jpg", "photo two"),
            ("thumbs/u1/ab/cd/a-thumbnail.webp", "thumb"),
            ("upload/.immich", ""),
        ] {
            fs::create_dir_all(root.join(p).parent().unwrap()).unwrap();
            fs::write(root.join(p), content).unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", root.join("library/escape")).unwrap();
    }

    #[test]
    fn hardlink_tree_shares_inodes_keeps_symlinks_and_lists_everything() {
        let root = tempfile::tempdir().unwrap();
        let upload = root.path().join("upload-location");
        library(&upload);
        let snap = root.path().join("snap");
        fs::create_dir(&snap).unwrap();
        let plan = choose_method(&upload, &snap, false).unwrap();
        // ext4 and tmpfs have no reflinks; XFS and btrfs are covered in tests/storage_methods.rs.
        assert!(
            matches!(
                plan.method,
                StorageMethod::Hardlink | StorageMethod::Reflink
            ),
            "{plan:?}"
        );
        let tree = snapshot_tree(
            &upload,
            &snap,
            "storage",
            &snap.join("manifest.jsonl.zst"),
            &Plan::walking(StorageMethod::Hardlink),
            &Options::default(),
        )
        .unwrap();
        assert_eq!((tree.files, tree.symlinks), (4, 1));
        let a = upload.join("upload/u1/ab/cd/a.jpg");
        let b = snap.join("storage/upload/u1/ab/cd/a.jpg");
        assert_eq!(
            fs::metadata(&a).unwrap().ino(),
            fs::metadata(&b).unwrap().ino()
        );
        let link = snap.join("storage/library/escape");
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("/etc/passwd"));

        let manifest = read_manifest(&snap.join("manifest.jsonl.zst")).unwrap();
        let file = manifest
            .iter()
            .find(|e| e.path == "upload/u1/ab/cd/a.jpg")
            .unwrap();
        assert_eq!(file.size, 9);
        assert_eq!(file.inode, fs::metadata(&a).unwrap().ino());
        assert!(
            manifest
                .iter()
                .any(|e| e.path == "library/escape" && e.kind == EntryKind::Symlink)
        );
    }

    #[test]
    fn derived_folders_can_be_left_out() {
        let root = tempfile::tempdir().unwrap();
        let upload = root.path().join("u");
        library(&upload);
        let snap = root.path().join("s");
        fs::create_dir(&snap).unwrap();
        let options = Options {
            exclude: vec!["thumbs".to_string()],
            ..Options::default()
        };
        let tree = snapshot_tree(
            &upload,
            &snap,
            "storage",
            &snap.join("m.zst"),
            &Plan::walking(StorageMethod::Copy),
            &options,
        )
        .unwrap();
        assert_eq!(tree.files, 3);
        assert!(!snap.join("storage/thumbs").exists());
        // A copy has its own inodes.
        let a = upload.join("upload/u1/ab/cd/a.jpg");
        let b = snap.join("storage/upload/u1/ab/cd/a.jpg");
        assert_ne!(
            fs::metadata(&a).unwrap().ino(),
            fs::metadata(&b).unwrap().ino()
        );
        assert_eq!(fs::read(&b).unwrap(), b"photo two");
    }

    #[test]
    fn a_copy_keeps_mode_and_mtime() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let upload = root.path().join("u");
        library(&upload);
        let photo = upload.join("library/admin/2024/06/IMG_0001.jpg");
        fs::set_permissions(&photo, fs::Permissions::from_mode(0o640)).unwrap();
        let when =
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        fs::File::options()
            .write(true)
            .open(&photo)
            .unwrap()
            .set_modified(when)
            .unwrap();
        let snap = root.path().join("s");
        fs::create_dir(&snap).unwrap();
        snapshot_tree(
            &upload,
            &snap,
            "storage",
            &snap.join("m.zst"),
            &Plan::walking(StorageMethod::Copy),
            &Options::default(),
        )
        .unwrap();
        let copy = fs::metadata(snap.join("storage/library/admin/2024/06/IMG_0001.jpg")).unwrap();
        assert_eq!(copy.permissions().mode() & 0o7777, 0o640);
        assert_eq!(copy.modified().unwrap(), when);
    }

    #[test]
    fn a_failed_walk_names_the_path_it_could_not_write() {
        let root = tempfile::tempdir().unwrap();
        let upload = root.path().join("u");
        library(&upload);
        let snap = root.path().join("s");
        fs::create_dir_all(snap.join("storage")).unwrap();
        // `storage` exists already: creating it is the first write and must fail by name.
        let e = snapshot_tree(
            &upload,
            &snap,
            "storage",
            &snap.join("m.zst"),
            &Plan::walking(StorageMethod::Hardlink),
            &Options::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains(&snap.join("storage").display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn removing_a_snapshot_dir_without_native_parts_is_a_plain_remove() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("snap");
        fs::create_dir_all(dir.join("storage/a")).unwrap();
        remove_snapshot_dir(&dir).unwrap();
        assert!(!dir.exists());
    }
}
