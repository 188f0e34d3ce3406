//! The storage half of a snapshot: a tree of the upload location inside the snapshot dir,
//! plus a manifest of every entry (path, size, mtime, inode), written zstd-compressed.
//! It reads the upload location and never writes to it; symlinks are recreated as symlinks
//! and never followed out of the tree.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How the tree was made, recorded in meta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMethod {
    /// Hard links on the same filesystem: instant and free, but they share the files with the
    /// live library (Immich writes new files rather than changing old ones).
    Hardlink,
    /// A real copy, for a snapshot dir on another filesystem (`storage.copy_across = true`).
    Copy,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "snapshot dir {snapshots} is on another filesystem than the upload location {upload}: hard links cannot cross filesystems; move snapshots.dir onto the same filesystem, or set snapshots.copy_across = true for a (slow, full-size) copy"
    )]
    OtherFilesystem { snapshots: PathBuf, upload: PathBuf },
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub inode: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
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
    pub duration_ms: u64,
}

/// Chooses the method: hard links on one filesystem; a copy across filesystems only when
/// allowed.
pub fn choose_method(
    upload: &Path,
    snapshots: &Path,
    copy_across: bool,
) -> Result<StorageMethod, StorageError> {
    let dev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|source| StorageError::Read {
                path: p.to_path_buf(),
                source,
            })
    };
    if dev(upload)? == dev(snapshots)? {
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

/// Builds the tree of `upload` at `dest` (which must not exist) and writes `manifest` beside it.
/// `exclude` names top-level folders (e.g. `thumbs`) to leave out.
pub fn snapshot_tree(
    upload: &Path,
    dest: &Path,
    manifest: &Path,
    method: StorageMethod,
    exclude: &[String],
) -> Result<StorageTree, StorageError> {
    let started = std::time::Instant::now();
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StorageError::Write { path, source }
    };
    let manifest_file = std::fs::File::create(manifest).map_err(write_err(manifest))?;
    let mut out = zstd::stream::Encoder::new(std::io::BufWriter::new(manifest_file), 3)
        .map_err(write_err(manifest))?;
    let mut tree = StorageTree {
        method,
        files: 0,
        dirs: 0,
        symlinks: 0,
        bytes: 0,
        excluded: exclude.to_vec(),
        manifest_bytes: 0,
        duration_ms: 0,
    };
    let walker = walkdir::WalkDir::new(upload)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            // Excluded folders are top-level names only: `thumbs`, not every `thumbs` below.
            e.depth() != 1 || !exclude.iter().any(|x| e.file_name() == x.as_str())
        });
    for entry in walker {
        let entry = entry.map_err(|e| {
            let path = e
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| upload.to_path_buf());
            StorageError::Read {
                path,
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("filesystem loop")),
            }
        })?;
        let rel = entry
            .path()
            .strip_prefix(upload)
            .expect("walk stays below its root");
        let target_path = dest.join(rel);
        let meta = entry.metadata().map_err(|e| StorageError::Read {
            path: entry.path().to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("metadata")),
        })?;
        let file_type = entry.file_type();
        let (kind, target) = if file_type.is_dir() {
            std::fs::create_dir(&target_path).map_err(write_err(&target_path))?;
            tree.dirs += 1;
            (EntryKind::Dir, None)
        } else if file_type.is_symlink() {
            let link = std::fs::read_link(entry.path()).map_err(|source| StorageError::Read {
                path: entry.path().to_path_buf(),
                source,
            })?;
            std::os::unix::fs::symlink(&link, &target_path).map_err(write_err(&target_path))?;
            tree.symlinks += 1;
            (
                EntryKind::Symlink,
                Some(link.to_string_lossy().into_owned()),
            )
        } else if file_type.is_file() {
            match method {
                StorageMethod::Hardlink => std::fs::hard_link(entry.path(), &target_path),
                StorageMethod::Copy => std::fs::copy(entry.path(), &target_path).map(|_| ()),
            }
            .map_err(|source| {
                // A read failure names the source; anything else the destination.
                if source.kind() == std::io::ErrorKind::PermissionDenied {
                    StorageError::Read {
                        path: entry.path().to_path_buf(),
                        source,
                    }
                } else {
                    StorageError::Write {
                        path: target_path.clone(),
                        source,
                    }
                }
            })?;
            tree.files += 1;
            tree.bytes += meta.len();
            (EntryKind::File, None)
        } else {
            // Sockets, fifos, devices have no place in a photo library; recorded, not copied.
            (EntryKind::File, None)
        };
        let record = ManifestEntry {
            path: rel.to_string_lossy().into_owned(),
            kind,
            size: meta.len(),
            mtime: meta.mtime(),
            inode: meta.ino(),
            target,
        };
        serde_json::to_writer(&mut out, &record).map_err(|e| write_err(manifest)(e.into()))?;
        out.write_all(b"\n").map_err(write_err(manifest))?;
    }
    let file = out
        .finish()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(write_err(manifest))?;
    file.sync_all().map_err(write_err(manifest))?;
    tree.manifest_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    tree.duration_ms = started.elapsed().as_millis() as u64;
    Ok(tree)
}

/// Reads a manifest back.
pub fn read_manifest(path: &Path) -> std::io::Result<Vec<ManifestEntry>> {
    let file = std::fs::File::open(path)?;
    let text = std::io::read_to_string(zstd::stream::Decoder::new(file)?)?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
        .collect()
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
        let method = choose_method(&upload, &snap, false).unwrap();
        assert_eq!(method, StorageMethod::Hardlink);
        let tree = snapshot_tree(
            &upload,
            &snap.join("storage"),
            &snap.join("manifest.jsonl.zst"),
            method,
            &[],
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
        let tree = snapshot_tree(
            &upload,
            &snap.join("storage"),
            &snap.join("m.zst"),
            StorageMethod::Copy,
            &["thumbs".to_string()],
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
}
