//! The storage half of a snapshot: a frozen view of the upload location plus a manifest of
//! every entry (path, size, mtime, inode), written zstd-compressed.
//!
//! Methods, best first (README.md and docs/operations.md, "Snapshots"): a native snapshot
//! when the upload location is a btrfs subvolume or on a ZFS dataset; a reflink copy where
//! the filesystem can share extents; a hard-link tree on the same filesystem; a real copy
//! across filesystems only when allowed.
//! It reads the upload location and never writes to it; symlinks are recreated as symlinks
//! and never followed out of the tree.

use std::ffi::{CStr, OsStr};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
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

/// A path left out because it could not be read (`snapshots.skip_unreadable`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub error: String,
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

#[derive(Debug, Clone, PartialEq)]
struct ZfsDataset {
    name: String,
    mountpoint: PathBuf,
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
const BTRFS_SUBVOLUME_INODE: u64 = 256;

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
    let Ok(clone) = crate::private::create_file(&probe) else {
        return false;
    };
    let works = rustix::fs::ioctl_ficlone(&clone, &source).is_ok();
    drop(clone);
    let _ = std::fs::remove_file(&probe);
    works
}

/// The ZFS dataset mounted at or above `path`, from /proc/self/mountinfo.
fn zfs_dataset(path: &Path) -> Option<ZfsDataset> {
    let path = std::fs::canonicalize(path).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_zfs_mounts(&mountinfo)
        .into_iter()
        .filter(|d| path.starts_with(&d.mountpoint))
        .max_by_key(|d| d.mountpoint.as_os_str().len())
}

fn parse_zfs_mounts(mountinfo: &str) -> Vec<ZfsDataset> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            (right.next()? == "zfs").then_some(())?;
            Some(ZfsDataset {
                name: unescape_mountinfo(right.next()?),
                mountpoint: PathBuf::from(unescape_mountinfo(mountpoint)),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Written before a native snapshot exists, so a crash cannot leave one nobody removes.
const NATIVE_MARKER: &str = "native.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum NativeMarker {
    /// The subvolume at `<snapshot>/storage`.
    Btrfs,
    Zfs {
        snapshot: String,
    },
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
        crate::private::create_dir(&dest).map_err(|source| StorageError::Write {
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

fn write_marker(snap_dir: &Path, marker: &NativeMarker) -> Result<(), StorageError> {
    let path = snap_dir.join(NATIVE_MARKER);
    let bytes = serde_json::to_vec(marker).expect("marker serializes");
    super::store::write_synced(&path, &bytes)
        .and_then(|()| super::store::sync_dir(snap_dir))
        .map_err(|source| StorageError::Write { path, source })
}

fn run_tool(tool: &'static str, path: &Path, args: &[&OsStr]) -> Result<(), StorageError> {
    let failed = |detail: String| StorageError::Native {
        tool,
        path: path.to_path_buf(),
        detail,
    };
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| failed(format!("cannot run {tool}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(format!(
            "{tool} {}: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A writable snapshot first, so excluded folders can be removed from it, then read-only.
fn btrfs_snapshot(
    upload: &Path,
    snap_dir: &Path,
    dest: &Path,
    exclude: &[String],
) -> Result<(), StorageError> {
    write_marker(snap_dir, &NativeMarker::Btrfs)?;
    run_tool(
        "btrfs",
        upload,
        &[
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            upload.as_os_str(),
            dest.as_os_str(),
        ],
    )?;
    for name in exclude {
        let path = dest.join(name);
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StorageError::Write { path, source: e });
            }
            _ => {}
        }
    }
    run_tool(
        "btrfs",
        dest,
        &[
            "property".as_ref(),
            "set".as_ref(),
            "-ts".as_ref(),
            dest.as_os_str(),
            "ro".as_ref(),
            "true".as_ref(),
        ],
    )
}

/// Returns the snapshot's name and where the upload location's files are inside it.
fn zfs_snapshot(
    upload: &Path,
    snap_dir: &Path,
    dataset: &ZfsDataset,
    id: &str,
) -> Result<(String, PathBuf), StorageError> {
    let short = format!("immich-guard-{id}");
    let name = format!("{}@{short}", dataset.name);
    write_marker(
        snap_dir,
        &NativeMarker::Zfs {
            snapshot: name.clone(),
        },
    )?;
    run_tool("zfs", upload, &["snapshot".as_ref(), name.as_ref()])?;
    let canonical = std::fs::canonicalize(upload).map_err(|source| StorageError::Read {
        path: upload.to_path_buf(),
        source,
    })?;
    let inside = canonical
        .strip_prefix(&dataset.mountpoint)
        .unwrap_or(Path::new(""));
    let root = dataset
        .mountpoint
        .join(".zfs/snapshot")
        .join(&short)
        .join(inside);
    Ok((name, root))
}

/// Destroys the native snapshot a snapshot dir owns, if any. Safe to call twice.
pub fn remove_native(snap_dir: &Path) -> std::io::Result<()> {
    let marker = snap_dir.join(NATIVE_MARKER);
    let bytes = match std::fs::read(&marker) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let result = match serde_json::from_slice(&bytes).map_err(std::io::Error::other)? {
        NativeMarker::Btrfs => {
            let sub = snap_dir.join(super::store::STORAGE_DIR);
            match std::fs::symlink_metadata(&sub) {
                Ok(m) if m.ino() == BTRFS_SUBVOLUME_INODE => run_tool(
                    "btrfs",
                    &sub,
                    &["subvolume".as_ref(), "delete".as_ref(), sub.as_os_str()],
                ),
                _ => Ok(()),
            }
        }
        NativeMarker::Zfs { snapshot } => {
            match run_tool("zfs", snap_dir, &["destroy".as_ref(), snapshot.as_ref()]) {
                Err(StorageError::Native { detail, .. }) if detail.contains("could not find") => {
                    Ok(())
                }
                other => other,
            }
        }
    };
    result.map_err(std::io::Error::other)?;
    std::fs::remove_file(&marker)
}

/// Removes a snapshot directory with whatever native snapshot it owns.
pub fn remove_snapshot_dir(dir: &Path) -> std::io::Result<()> {
    remove_native(dir)?;
    std::fs::remove_dir_all(dir)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WalkMode {
    /// Only read the tree (a native snapshot already froze it) for the manifest.
    List,
    Hardlink,
    Reflink,
    Copy,
}

impl WalkMode {
    fn writes(self) -> bool {
        self != WalkMode::List
    }
}

type Walked = (Vec<ManifestEntry>, Vec<Skipped>);

/// Walks `root`, recreating it under `out` (unless listing), spread over threads by directory:
/// linking and stat-ing wait on the filesystem more than on the CPU, so a few threads per
/// core pay off. Everything is relative to directory handles, so no path is resolved twice.
fn walk(
    root: &Path,
    out: Option<&Path>,
    mode: WalkMode,
    exclude: &[String],
    skip_unreadable: bool,
) -> Result<Walked, StorageError> {
    let open_dir = |path: &Path| {
        rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let root_fd = open_dir(root).map_err(|e| StorageError::Read {
        path: root.to_path_buf(),
        source: e.into(),
    })?;
    let out_fd = out
        .map(|o| {
            open_dir(o).map_err(|e| StorageError::Write {
                path: o.to_path_buf(),
                source: e.into(),
            })
        })
        .transpose()?;
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
        root,
        out: out.unwrap_or(root),
        root_fd,
        out_fd,
        mode,
        exclude,
        skip_unreadable,
        am_root: rustix::process::geteuid().is_root(),
    };
    let (entries, skipped) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| work.run(&job)))
            .collect();
        let mut all = (Vec::new(), Vec::new());
        for h in handles {
            let (e, s) = h.join().expect("storage worker panicked");
            all.0.extend(e);
            all.1.extend(s);
        }
        all
    });
    if let Some(e) = work.queue.into_inner().expect("queue lock").failed {
        return Err(e);
    }
    Ok((entries, skipped))
}

struct Job<'a> {
    root: &'a Path,
    out: &'a Path,
    root_fd: OwnedFd,
    out_fd: Option<OwnedFd>,
    mode: WalkMode,
    exclude: &'a [String],
    skip_unreadable: bool,
    am_root: bool,
}

struct Queue {
    /// Directories (relative to the root) waiting to be read.
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
    fn run(&self, job: &Job<'_>) -> Walked {
        let mut done = (Vec::new(), Vec::new());
        loop {
            let dir = {
                let mut q = self.queue.lock().expect("queue lock");
                loop {
                    if q.failed.is_some() {
                        return done;
                    }
                    if let Some(dir) = q.dirs.pop() {
                        q.busy += 1;
                        break dir;
                    }
                    if q.busy == 0 {
                        return done;
                    }
                    q = self.wake.wait(q).expect("queue lock");
                }
            };
            let mut found = Vec::new();
            let result = job.copy_dir(&dir, &mut done, &mut found);
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

/// Which side an error is on: the source is "unreadable" (skippable), the target is not.
enum Side {
    Source,
    Target,
    /// Readable, but not ours to hard-link.
    LinkRefused,
}

impl Job<'_> {
    fn dir_fd(base: &OwnedFd, rel: &Path) -> rustix::io::Result<OwnedFd> {
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        rustix::fs::openat(
            base,
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
    }

    fn error(&self, side: Side, rel: &Path, e: impl Into<std::io::Error>) -> StorageError {
        match side {
            Side::Source => StorageError::Unreadable {
                path: self.root.join(rel),
                source: e.into(),
            },
            Side::Target => StorageError::Write {
                path: self.out.join(rel),
                source: e.into(),
            },
            Side::LinkRefused => StorageError::LinkRefused {
                path: self.root.join(rel),
            },
        }
    }

    /// Recreates the entries of one directory; subdirectories go to `found` for any worker.
    fn copy_dir(
        &self,
        rel_dir: &Path,
        (entries, skipped): &mut Walked,
        found: &mut Vec<PathBuf>,
    ) -> Result<(), StorageError> {
        let source_dir = match Self::dir_fd(&self.root_fd, rel_dir)
            .and_then(|fd| rustix::fs::Dir::read_from(&fd).map(|d| (fd, d)))
        {
            Ok(d) => d,
            Err(e) => return self.skip_or_fail(rel_dir, e.into(), skipped),
        };
        let (src_fd, listing) = source_dir;
        let out_fd = match &self.out_fd {
            Some(out) => {
                Some(Self::dir_fd(out, rel_dir).map_err(|e| self.error(Side::Target, rel_dir, e))?)
            }
            None => None,
        };
        for item in listing {
            let item = match item {
                Ok(item) => item,
                Err(e) => return self.skip_or_fail(rel_dir, e.into(), skipped),
            };
            let name = item.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let name_os = OsStr::from_bytes(name.to_bytes());
            // Excluded folders are top-level names only: `thumbs`, not every `thumbs` below.
            if rel_dir.as_os_str().is_empty() && self.exclude.iter().any(|x| name_os == x.as_str())
            {
                continue;
            }
            let rel = rel_dir.join(name_os);
            match self.copy_entry(&src_fd, out_fd.as_ref(), name, &rel, found) {
                Ok(Some(entry)) => entries.push(entry),
                Ok(None) => {}
                Err((Side::Source, e)) => self.skip_or_fail(&rel, e, skipped)?,
                Err((side, e)) => return Err(self.error(side, &rel, e)),
            }
        }
        Ok(())
    }

    fn skip_or_fail(
        &self,
        rel: &Path,
        e: std::io::Error,
        skipped: &mut Vec<Skipped>,
    ) -> Result<(), StorageError> {
        if !self.skip_unreadable {
            return Err(self.error(Side::Source, rel, e));
        }
        tracing::warn!(path = %self.root.join(rel).display(), error = %e, "skipping an unreadable entry");
        skipped.push(Skipped {
            path: rel.to_string_lossy().into_owned(),
            error: e.to_string(),
        });
        Ok(())
    }

    fn copy_entry(
        &self,
        src: &OwnedFd,
        out: Option<&OwnedFd>,
        name: &CStr,
        rel: &Path,
        found: &mut Vec<PathBuf>,
    ) -> Result<Option<ManifestEntry>, (Side, std::io::Error)> {
        let source = |e: Errno| (Side::Source, std::io::Error::from(e));
        let target = |e: Errno| (Side::Target, std::io::Error::from(e));
        let st = rustix::fs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW).map_err(source)?;
        let kind = FileType::from_raw_mode(st.st_mode);
        let perms = Mode::from_raw_mode(st.st_mode & 0o7777);
        let mut link = None;
        let entry_kind = match (kind, out) {
            (FileType::Directory, out) => {
                if let Some(out) = out {
                    rustix::fs::mkdirat(out, name, perms).map_err(target)?;
                    // The library's mode, not the one the daemon's umask 077 left.
                    rustix::fs::chmodat(out, name, perms, AtFlags::empty()).map_err(target)?;
                    if self.am_root {
                        self.chown_at(out, name, &st).map_err(target)?;
                    }
                }
                found.push(rel.to_path_buf());
                EntryKind::Dir
            }
            (FileType::Symlink, out) => {
                let to = rustix::fs::readlinkat(src, name, Vec::new()).map_err(source)?;
                if let Some(out) = out {
                    rustix::fs::symlinkat(&to, out, name).map_err(target)?;
                }
                link = Some(to.to_string_lossy().into_owned());
                EntryKind::Symlink
            }
            (FileType::RegularFile, None) => EntryKind::File,
            (FileType::RegularFile, Some(out)) => {
                match self.mode {
                    WalkMode::Hardlink => {
                        rustix::fs::linkat(src, name, out, name, AtFlags::empty()).map_err(|e| {
                            match e {
                                // protected_hardlinks: unreadable (skippable), or readable but
                                // not ours to link (run as root).
                                Errno::PERM | Errno::ACCESS => {
                                    let readable = rustix::fs::accessat(
                                        src,
                                        name,
                                        rustix::fs::Access::READ_OK,
                                        AtFlags::empty(),
                                    )
                                    .is_ok();
                                    if readable {
                                        (Side::LinkRefused, e.into())
                                    } else {
                                        source(e)
                                    }
                                }
                                _ => target(e),
                            }
                        })?
                    }
                    WalkMode::Reflink | WalkMode::Copy => {
                        self.clone_file(src, out, name, &st, perms)?
                    }
                    WalkMode::List => unreachable!("listing has no output dir"),
                }
                EntryKind::File
            }
            // Sockets, fifos, devices have no place in a photo library: not recreated.
            _ => return Ok(None),
        };
        Ok(Some(ManifestEntry {
            path: rel.to_string_lossy().into_owned(),
            kind: entry_kind,
            size: if entry_kind == EntryKind::File {
                st.st_size as u64
            } else {
                0
            },
            mtime: st.st_mtime,
            inode: st.st_ino,
            target: link,
        }))
    }

    fn chown_at(
        &self,
        dir: &OwnedFd,
        name: &CStr,
        st: &rustix::fs::Stat,
    ) -> rustix::io::Result<()> {
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(st.st_uid)),
            Some(rustix::fs::Gid::from_raw(st.st_gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
    }

    /// A reflink clone (or a byte copy), with the source's mode, owner and mtime.
    fn clone_file(
        &self,
        src: &OwnedFd,
        out: &OwnedFd,
        name: &CStr,
        st: &rustix::fs::Stat,
        perms: Mode,
    ) -> Result<(), (Side, std::io::Error)> {
        let source = |e: Errno| (Side::Source, std::io::Error::from(e));
        let target = |e: std::io::Error| (Side::Target, e);
        let from = rustix::fs::openat(
            src,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(source)?;
        let to = rustix::fs::openat(
            out,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            perms,
        )
        .map_err(|e| target(e.into()))?;
        if self.mode == WalkMode::Reflink {
            rustix::fs::ioctl_ficlone(&to, &from).map_err(|e| target(e.into()))?;
        } else {
            let mut from = std::fs::File::from(from);
            let mut to_file = std::fs::File::from(to.try_clone().map_err(target)?);
            std::io::copy(&mut from, &mut to_file).map_err(target)?;
        }
        if self.am_root {
            rustix::fs::fchown(
                &to,
                Some(rustix::fs::Uid::from_raw(st.st_uid)),
                Some(rustix::fs::Gid::from_raw(st.st_gid)),
            )
            .map_err(|e| target(e.into()))?;
        }
        // After the chown (which clears set-id bits), and past the daemon's umask 077.
        rustix::fs::fchmod(&to, perms).map_err(|e| target(e.into()))?;
        rustix::fs::futimens(
            &to,
            &rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: st.st_atime,
                    tv_nsec: st.st_atime_nsec as _,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: st.st_mtime,
                    tv_nsec: st.st_mtime_nsec as _,
                },
            },
        )
        .map_err(|e| target(e.into()))?;
        Ok(())
    }
}

/// One JSON object per line, zstd-compressed, fsynced. Returns the bytes on disk and their
/// SHA-256 (hex).
fn write_manifest(path: &Path, entries: &[ManifestEntry]) -> std::io::Result<(u64, String)> {
    let file = crate::private::create_file(path)?;
    let hashing = super::db::Hashing::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let mut out = zstd::stream::Encoder::new(hashing, 3)?;
    for e in entries {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    let mut hashing = out.finish()?;
    hashing.flush()?;
    let (writer, bytes, sha256) = hashing.finish();
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((bytes, sha256))
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
    fn zfs_datasets_come_from_mountinfo_with_escapes() {
        let mountinfo = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
90 22 0:50 / /tank rw shared:40 - zfs tank rw,xattr,noacl
91 90 0:51 / /tank/immich\\040photos rw shared:41 - zfs tank/immich\\040photos rw,xattr
";
        let found = parse_zfs_mounts(mountinfo);
        assert_eq!(
            found,
            vec![
                ZfsDataset {
                    name: "tank".into(),
                    mountpoint: "/tank".into()
                },
                ZfsDataset {
                    name: "tank/immich photos".into(),
                    mountpoint: "/tank/immich photos".into()
                },
            ]
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
