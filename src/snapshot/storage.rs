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
///
/// Work is spread over threads by directory: linking and stat-ing are metadata operations
/// that wait on the filesystem more than on the CPU, so a few threads per core pay off.
pub fn snapshot_tree(
    upload: &Path,
    dest: &Path,
    manifest: &Path,
    method: StorageMethod,
    exclude: &[String],
) -> Result<StorageTree, StorageError> {
    let started = std::time::Instant::now();
    std::fs::create_dir(dest).map_err(|source| StorageError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .saturating_mul(2)
        .clamp(2, 16);
    let work = Work {
        queue: std::sync::Mutex::new(Queue {
            dirs: vec![PathBuf::new()],
            busy: 0,
            failed: None,
        }),
        wake: std::sync::Condvar::new(),
    };
    let job = Job {
        upload,
        dest,
        method,
        exclude,
    };
    let mut entries: Vec<ManifestEntry> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| work.run(&job)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("storage worker panicked"))
            .collect()
    });
    if let Some(e) = work.queue.into_inner().expect("queue lock").failed {
        return Err(e);
    }
    entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));

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
    tree.manifest_bytes =
        write_manifest(manifest, &entries).map_err(|source| StorageError::Write {
            path: manifest.to_path_buf(),
            source,
        })?;
    tree.duration_ms = started.elapsed().as_millis() as u64;
    Ok(tree)
}

struct Job<'a> {
    upload: &'a Path,
    dest: &'a Path,
    method: StorageMethod,
    exclude: &'a [String],
}

struct Queue {
    /// Directories (relative to the upload location) waiting to be read.
    dirs: Vec<PathBuf>,
    /// Workers reading a directory now: the walk is over when none is and none waits.
    busy: usize,
    failed: Option<StorageError>,
}

struct Work {
    queue: std::sync::Mutex<Queue>,
    wake: std::sync::Condvar,
}

impl Work {
    fn run(&self, job: &Job<'_>) -> Vec<ManifestEntry> {
        let mut entries = Vec::new();
        loop {
            let dir = {
                let mut q = self.queue.lock().expect("queue lock");
                loop {
                    if q.failed.is_some() {
                        return entries;
                    }
                    if let Some(dir) = q.dirs.pop() {
                        q.busy += 1;
                        break dir;
                    }
                    if q.busy == 0 {
                        return entries;
                    }
                    q = self.wake.wait(q).expect("queue lock");
                }
            };
            let mut found = Vec::new();
            let result = job.copy_dir(&dir, &mut entries, &mut found);
            let mut q = self.queue.lock().expect("queue lock");
            q.busy -= 1;
            match result {
                Ok(()) => q.dirs.extend(found),
                Err(e) => {
                    q.failed.get_or_insert(e);
                }
            }
            drop(q);
            self.wake.notify_all();
        }
    }
}

impl Job<'_> {
    /// Recreates the entries of one directory; subdirectories go to `found` for any worker.
    fn copy_dir(
        &self,
        rel_dir: &Path,
        entries: &mut Vec<ManifestEntry>,
        found: &mut Vec<PathBuf>,
    ) -> Result<(), StorageError> {
        let source_dir = self.upload.join(rel_dir);
        let read_err = |path: PathBuf| move |source| StorageError::Read { path, source };
        let listing = std::fs::read_dir(&source_dir).map_err(read_err(source_dir.clone()))?;
        for item in listing {
            let item = item.map_err(read_err(source_dir.clone()))?;
            let name = item.file_name();
            // Excluded folders are top-level names only: `thumbs`, not every `thumbs` below.
            if rel_dir.as_os_str().is_empty() && self.exclude.iter().any(|x| name == x.as_str()) {
                continue;
            }
            let rel = rel_dir.join(&name);
            let source = item.path();
            let target = self.dest.join(&rel);
            let write_err = |source| StorageError::Write {
                path: target.clone(),
                source,
            };
            let meta = std::fs::symlink_metadata(&source).map_err(read_err(source.clone()))?;
            let file_type = meta.file_type();
            let (kind, link) = if file_type.is_dir() {
                std::fs::create_dir(&target).map_err(write_err)?;
                found.push(rel.clone());
                (EntryKind::Dir, None)
            } else if file_type.is_symlink() {
                let link = std::fs::read_link(&source).map_err(read_err(source.clone()))?;
                std::os::unix::fs::symlink(&link, &target).map_err(write_err)?;
                (
                    EntryKind::Symlink,
                    Some(link.to_string_lossy().into_owned()),
                )
            } else if file_type.is_file() {
                match self.method {
                    StorageMethod::Hardlink => std::fs::hard_link(&source, &target),
                    StorageMethod::Copy => std::fs::copy(&source, &target).map(|_| ()),
                }
                .map_err(|e| {
                    // A refusal to read names the source; anything else the destination.
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        StorageError::Read {
                            path: source.clone(),
                            source: e,
                        }
                    } else {
                        write_err(e)
                    }
                })?;
                (EntryKind::File, None)
            } else {
                // Sockets, fifos, devices have no place in a photo library: not recreated.
                continue;
            };
            entries.push(ManifestEntry {
                path: rel.to_string_lossy().into_owned(),
                kind,
                size: if kind == EntryKind::File {
                    meta.len()
                } else {
                    0
                },
                mtime: meta.mtime(),
                inode: meta.ino(),
                target: link,
            });
        }
        Ok(())
    }
}

/// One JSON object per line, zstd-compressed, fsynced. Returns the bytes on disk.
fn write_manifest(path: &Path, entries: &[ManifestEntry]) -> std::io::Result<u64> {
    let file = std::fs::File::create(path)?;
    let mut out = zstd::stream::Encoder::new(std::io::BufWriter::with_capacity(1 << 20, file), 3)?;
    for e in entries {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    let file = out.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
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
