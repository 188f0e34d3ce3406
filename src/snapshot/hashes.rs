//! The manifest's content hashes: a pass after the seal reads every file the snapshot holds
//! (every file of its manifest: the originals, and the thumbnails unless `snapshots.exclude`
//! left them out) and records its SHA-256 in `hashes.jsonl.zst` beside the manifest, with
//! the stored copy's size, mtime, ctime and inode when it was read. A restore then refuses a
//! stored original whose bytes changed (restore/content.rs), and `verify --against` checks
//! content and finds a hard-linked original written in place (verify.rs).
//!
//! The sealed manifest is never rewritten (its SHA-256 is in meta.json): the hashes live in
//! their own file, whose SHA-256 meta.json records once the pass is complete, with the
//! outcome as the snapshot's check (`Meta::check`, kind `content-hashes`).
//!
//! The pass is resumable: each file hashed is appended to `.hashes.partial.jsonl` (synced
//! every few thousand files or seconds), and a pass started again skips what it lists. It
//! stops quietly when the snapshot is deleted under it, holds a lock on the partial file so
//! two passes never hash the same snapshot, and reads at a bounded rate (`snapshots.hash_rate_mb`).

use std::collections::HashMap;
use std::io::{BufRead, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::storage::{EntryKind, ManifestEntry, StorageMethod, read_manifest};
use super::store::{MANIFEST_FILE, META_FILE, Meta, STORAGE_DIR, SnapshotCheck};
use crate::durable::{replace_synced, sync_dir};

pub const HASHES_FILE: &str = "hashes.jsonl.zst";
/// The progress of a pass not finished; hidden, so it is never taken for the result.
pub const PARTIAL_FILE: &str = ".hashes.partial.jsonl";
/// `SnapshotCheck::kind` of the pass.
pub const CHECK_KIND: &str = "content-hashes";

/// Progress is synced after this many files or this long, whichever comes first: a kill
/// loses at most that much work.
const SYNC_FILES: usize = 4096;
const SYNC_EVERY: Duration = Duration::from_secs(2);
const CHUNK: usize = 1 << 20;

/// One stored file as the pass found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashRecord {
    pub path: String,
    /// Absent when the stored copy is not the snapshot's (see `problem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub size: u64,
    /// The stored copy's mtime and ctime (ns since the epoch) and inode when it was read: a
    /// hard-linked copy whose inode changed since was written in place.
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
    /// Why the stored copy is not the file the snapshot recorded (missing, another size,
    /// modified since the snapshot): a restore refuses it as damaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// What meta.json records of a finished pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentHashes {
    /// SHA-256 of `hashes.jsonl.zst` (hex): a restore refuses a changed one.
    pub sha256: String,
    /// Files hashed.
    pub files: u64,
    pub bytes: u64,
    /// Files whose stored copy is not the snapshot's (no hash recorded for them).
    pub problems: u64,
    pub at: DateTime<Utc>,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error(
        "a content-hash pass of snapshot {dir} is running already (the daemon's, or another `immich-guard hash`)"
    )]
    Busy { dir: PathBuf },
    #[error(
        "{path} does not match the SHA-256 recorded in the snapshot's meta.json (recorded {recorded}, now {actual}): the content hashes changed after they were recorded"
    )]
    Tampered {
        path: PathBuf,
        recorded: String,
        actual: String,
    },
    #[error("{path}: line {line} is not a hash record: {detail}")]
    Parse {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> HashError {
    let path = path.to_path_buf();
    move |source| HashError::Io {
        path,
        action,
        source,
    }
}

/// Whether the pass goes on (after waiting, if it must) or stops here, its progress kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Go,
    Stop,
}

#[derive(Debug, Clone)]
pub struct PassOptions {
    /// Bytes read per second at most; 0: unlimited.
    pub rate: u64,
}

/// How a pass ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// Recorded in meta.json (also when an earlier pass had done it).
    Done {
        hashes: ContentHashes,
        check: SnapshotCheck,
    },
    /// The gate said stop; the progress is kept for the next pass.
    Stopped { hashed: u64 },
    /// The snapshot was deleted (retention) meanwhile.
    Gone,
}

/// Where a snapshot's stored files are: its `storage/`, or the ZFS snapshot's directory.
pub fn storage_root(meta: &Meta, dir: &Path) -> PathBuf {
    meta.storage
        .source
        .clone()
        .unwrap_or_else(|| dir.join(STORAGE_DIR))
}

fn read_meta(dir: &Path) -> Result<Option<Meta>, HashError> {
    let path = dir.join(META_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| HashError::Parse {
                path,
                line: 1,
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path, "reading it")(e)),
    }
}

/// Hashes the sealed snapshot at `dir` (or finishes an interrupted pass) and records the
/// result in its meta.json. `gate` is asked before every file and between chunks of a large
/// one; it may block (a snapshot or a restore runs) or say stop.
pub fn run_pass(
    dir: &Path,
    options: &PassOptions,
    gate: &dyn Fn() -> Flow,
) -> Result<Finished, HashError> {
    let started = Instant::now();
    let Some(meta) = read_meta(dir)? else {
        return Ok(Finished::Gone);
    };
    if let (Some(hashes), Some(check)) = (&meta.hashes, &meta.check) {
        return Ok(Finished::Done {
            hashes: hashes.clone(),
            check: check.clone(),
        });
    }
    let partial_path = dir.join(PARTIAL_FILE);
    let mut partial = match open_partial(&partial_path) {
        Ok(f) => f,
        Err(HashError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound && !dir.exists() =>
        {
            return Ok(Finished::Gone);
        }
        Err(e) => return Err(e),
    };
    let mut done = read_partial(&mut partial, &partial_path)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_ok = match &meta.storage.manifest_sha256 {
        Some(recorded) => {
            let (actual, _) = crate::snapshot::db::file_sha256(&manifest_path)
                .map_err(io(&manifest_path, "reading it"))?;
            (actual == *recorded).then_some(()).ok_or(format!(
                "{MANIFEST_FILE} does not match its recorded SHA-256"
            ))
        }
        None => Ok(()),
    };
    let entries = match read_manifest(&manifest_path) {
        Ok(e) => e,
        Err(_) if !dir.exists() => return Ok(Finished::Gone),
        Err(e) => return Err(io(&manifest_path, "reading it")(e)),
    };
    let root = storage_root(&meta, dir);
    let mut writer = std::io::BufWriter::new(&mut partial);
    let mut since_sync = (0usize, Instant::now());
    let mut throttle = Throttle::new(options.rate);
    let mut hashed_now = 0u64;
    for e in entries.iter().filter(|e| e.kind == EntryKind::File) {
        if done.contains_key(&e.path) {
            continue;
        }
        if gate() == Flow::Stop {
            sync(&mut writer, &partial_path)?;
            return Ok(Finished::Stopped { hashed: hashed_now });
        }
        let record = match hash_stored(&root, e, meta.storage.method, &mut throttle, gate) {
            Ok(Some(r)) => r,
            Ok(None) => {
                sync(&mut writer, &partial_path)?;
                return Ok(Finished::Stopped { hashed: hashed_now });
            }
            Err(_) if !dir.join(META_FILE).exists() => return Ok(Finished::Gone),
            Err(source) => HashRecord {
                path: e.path.clone(),
                sha256: None,
                size: 0,
                mtime_ns: 0,
                ctime_ns: 0,
                inode: 0,
                problem: Some(format!("unreadable in the snapshot: {source}")),
            },
        };
        let line = serde_json::to_string(&record).expect("a record serializes");
        writer
            .write_all(line.as_bytes())
            .and_then(|()| writer.write_all(b"\n"))
            .map_err(io(&partial_path, "appending to it"))?;
        done.insert(record.path.clone(), record);
        hashed_now += 1;
        since_sync.0 += 1;
        if since_sync.0 >= SYNC_FILES || since_sync.1.elapsed() >= SYNC_EVERY {
            sync(&mut writer, &partial_path)?;
            since_sync = (0, Instant::now());
        }
    }
    sync(&mut writer, &partial_path)?;
    drop(writer);
    if !dir.join(META_FILE).exists() {
        return Ok(Finished::Gone);
    }

    // In manifest order, so the file is the same whoever made it and however often resumed.
    let records: Vec<&HashRecord> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .filter_map(|e| done.get(&e.path))
        .collect();
    let hashes_path = dir.join(HASHES_FILE);
    let sha256 = match write_hashes(&hashes_path, &records) {
        Ok(sha) => sha,
        Err(_) if !dir.join(META_FILE).exists() => return Ok(Finished::Gone),
        Err(e) => return Err(e),
    };
    let problems: Vec<&HashRecord> = records
        .iter()
        .copied()
        .filter(|r| r.problem.is_some())
        .collect();
    let bytes: u64 = records
        .iter()
        .filter(|r| r.sha256.is_some())
        .map(|r| r.size)
        .sum();
    let files = (records.len() - problems.len()) as u64;
    let hashes = ContentHashes {
        sha256,
        files,
        bytes,
        problems: problems.len() as u64,
        at: Utc::now(),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let mut first_problem = manifest_ok.err();
    if first_problem.is_none()
        && let Some(p) = problems.first()
    {
        first_problem = Some(format!(
            "{}: {}",
            p.path,
            p.problem.as_deref().unwrap_or_default()
        ));
    }
    let check = SnapshotCheck {
        kind: CHECK_KIND.to_string(),
        at: hashes.at,
        passed: first_problem.is_none(),
        summary: match &first_problem {
            None => format!(
                "{files} files ({} MB) hashed; all present in the snapshot with their recorded size and mtime",
                bytes / 1_000_000
            ),
            Some(first) => format!(
                "{files} files hashed; {} not as the manifest recorded them, the first: {first}",
                problems.len().max(1)
            ),
        },
    };
    // Read again under the store's lock: meta.json is the snapshot's; only our fields change.
    let recorded = super::store::update_meta(dir, |fresh| {
        fresh.hashes = Some(hashes.clone());
        fresh.check = Some(check.clone());
    });
    match recorded {
        Ok(Some(_)) => {}
        Ok(None) => return Ok(Finished::Gone),
        Err(e) => return Err(io(&dir.join(META_FILE), "recording the hashes")(e)),
    }
    let _ = std::fs::remove_file(&partial_path);
    let _ = sync_dir(dir);
    Ok(Finished::Done { hashes, check })
}

/// The partial file, locked for this pass (appended to; created owner-only when missing).
fn open_partial(path: &Path) -> Result<std::fs::File, HashError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(io(path, "opening it"))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(HashError::Busy {
            dir: path.parent().unwrap_or(path).to_path_buf(),
        }),
        Err(e) => Err(io(path, "locking it")(e.into())),
    }
}

/// The records of an interrupted pass; a line cut off by a kill is dropped (and cut from
/// the file, so the next append starts a line of its own).
fn read_partial(
    file: &mut std::fs::File,
    path: &Path,
) -> Result<HashMap<String, HashRecord>, HashError> {
    let mut done = HashMap::new();
    file.seek(std::io::SeekFrom::Start(0))
        .map_err(io(path, "reading it"))?;
    let mut reader = std::io::BufReader::new(&mut *file);
    let mut good_len = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(io(path, "reading it"))?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        match serde_json::from_slice::<HashRecord>(&line) {
            Ok(r) => {
                done.insert(r.path.clone(), r);
                good_len += n as u64;
            }
            // A line torn by a crash mid-sync; everything after it is redone.
            Err(_) => break,
        }
    }
    drop(reader);
    if file.metadata().map_err(io(path, "reading it"))?.len() != good_len {
        file.set_len(good_len)
            .map_err(io(path, "cutting a torn line"))?;
    }
    Ok(done)
}

fn sync(writer: &mut std::io::BufWriter<&mut std::fs::File>, path: &Path) -> Result<(), HashError> {
    writer.flush().map_err(io(path, "appending to it"))?;
    writer.get_ref().sync_data().map_err(io(path, "syncing it"))
}

fn ns(sec: i64, nsec: i64) -> i64 {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// Opens a stored copy for reading without touching its atime where allowed (a hard link is
/// the live library's file).
fn open_stored(path: &Path) -> std::io::Result<std::fs::File> {
    let flags = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
    let noatime = rustix::fs::OFlags::NOATIME.bits() as i32;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags | noatime)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(flags)
                .open(path)
        }
        other => other,
    }
}

/// One stored file hashed, or why it is not the snapshot's; `None` when the gate said stop.
fn hash_stored(
    root: &Path,
    entry: &ManifestEntry,
    method: StorageMethod,
    throttle: &mut Throttle,
    gate: &dyn Fn() -> Flow,
) -> std::io::Result<Option<HashRecord>> {
    let path = root.join(&entry.path);
    let mut record = HashRecord {
        path: entry.path.clone(),
        sha256: None,
        size: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        inode: 0,
        problem: None,
    };
    let file = match open_stored(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The snapshot itself gone is told apart by the caller.
            if !root.exists() {
                return Err(e);
            }
            record.problem = Some("missing from the snapshot's storage".into());
            return Ok(Some(record));
        }
        Err(e) => return Err(e),
    };
    let before = file.metadata()?;
    let stamp = |r: &mut HashRecord, m: &std::fs::Metadata| {
        r.size = m.len();
        r.mtime_ns = ns(m.mtime(), m.mtime_nsec());
        r.ctime_ns = ns(m.ctime(), m.ctime_nsec());
        r.inode = m.ino();
    };
    stamp(&mut record, &before);
    if !before.is_file() {
        record.problem = Some("not a regular file in the snapshot's storage".into());
        return Ok(Some(record));
    }
    if before.len() != entry.size {
        record.problem = Some(format!(
            "{} bytes in the snapshot's storage, {} in the manifest",
            before.len(),
            entry.size
        ));
        return Ok(Some(record));
    }
    if before.mtime() != entry.mtime {
        record.problem = Some(format!(
            "modified since the snapshot (mtime {} s, the manifest says {} s){}",
            before.mtime(),
            entry.mtime,
            if method == StorageMethod::Hardlink {
                ": changed in place since the snapshot"
            } else {
                ""
            }
        ));
        return Ok(Some(record));
    }
    let Some(sha256) = hash_reader(&file, throttle, gate)? else {
        return Ok(None);
    };
    // Sequential once: what was read need not stay cached (the library's pages matter more).
    let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
    let after = file.metadata()?;
    if changed_since_hashed(&record, &after).is_some() {
        record.problem = Some("changed while it was hashed".into());
        return Ok(Some(record));
    }
    record.sha256 = Some(sha256);
    Ok(Some(record))
}

/// SHA-256 (hex) of what `file` holds, read at the throttle's rate; `None` on a stop.
fn hash_reader(
    mut file: &std::fs::File,
    throttle: &mut Throttle,
    gate: &dyn Fn() -> Flow,
) -> std::io::Result<Option<String>> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut since_gate = 0usize;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        throttle.spent(n as u64);
        since_gate += n;
        // A large video is not read to its end while a snapshot waits.
        if since_gate >= 16 * CHUNK {
            since_gate = 0;
            if gate() == Flow::Stop {
                return Ok(None);
            }
        }
    }
    Ok(Some(format!("{:x}", hasher.finalize())))
}

/// At most `rate` bytes per second, measured over one-second windows (a pause is not
/// made up for by a burst).
struct Throttle {
    rate: u64,
    window: Instant,
    bytes: u64,
}

impl Throttle {
    fn new(rate: u64) -> Throttle {
        Throttle {
            rate,
            window: Instant::now(),
            bytes: 0,
        }
    }

    fn spent(&mut self, n: u64) {
        if self.rate == 0 {
            return;
        }
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let elapsed = self.window.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.bytes = 0;
        }
    }
}

/// One JSON line per file, zstd-compressed, written whole (temp, fsync, rename); its SHA-256.
fn write_hashes(path: &Path, records: &[&HashRecord]) -> Result<String, HashError> {
    let mut out = zstd::stream::Encoder::new(Vec::new(), 3).map_err(io(path, "compressing"))?;
    for r in records {
        serde_json::to_writer(&mut out, r).expect("a record serializes");
        out.write_all(b"\n").map_err(io(path, "compressing"))?;
    }
    let bytes = out.finish().map_err(io(path, "compressing"))?;
    replace_synced(path, &bytes).map_err(io(path, "writing it"))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// The recorded hashes of a snapshot, by path; `None` when no pass has finished. The file is
/// checked against the SHA-256 in meta.json first.
pub fn read_hashes(
    meta: &Meta,
    dir: &Path,
) -> Result<Option<HashMap<String, HashRecord>>, HashError> {
    match &meta.hashes {
        Some(recorded) => read_hashes_file(recorded, dir).map(Some),
        None => Ok(None),
    }
}

/// The hashes recorded as `recorded` in the snapshot at `dir`, by path.
pub fn read_hashes_file(
    recorded: &ContentHashes,
    dir: &Path,
) -> Result<HashMap<String, HashRecord>, HashError> {
    let path = dir.join(HASHES_FILE);
    let bytes = std::fs::read(&path).map_err(io(&path, "reading it"))?;
    let actual = format!("{:x}", Sha256::digest(&bytes));
    if actual != recorded.sha256 {
        return Err(HashError::Tampered {
            path,
            recorded: recorded.sha256.clone(),
            actual,
        });
    }
    let text = zstd::stream::decode_all(&bytes[..]).map_err(io(&path, "decompressing it"))?;
    let mut all = HashMap::new();
    for (n, line) in text.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let r: HashRecord = serde_json::from_slice(line).map_err(|e| HashError::Parse {
            path: path.clone(),
            line: n + 1,
            detail: e.to_string(),
        })?;
        all.insert(r.path.clone(), r);
    }
    Ok(all)
}

/// The stored copy's state now against its record: `None` while it is as hashed; else what
/// changed (the inode, its size or mtime). Not its ctime: every later hard-link snapshot of
/// the same file (and every deletion of one) changes the inode's ctime, with the bytes.
pub fn changed_since_hashed(record: &HashRecord, now: &std::fs::Metadata) -> Option<String> {
    let mut changed = Vec::new();
    if now.ino() != record.inode {
        changed.push("inode");
    }
    if now.len() != record.size {
        changed.push("size");
    }
    if ns(now.mtime(), now.mtime_nsec()) != record.mtime_ns {
        changed.push("mtime");
    }
    (!changed.is_empty()).then(|| changed.join(", "))
}

/// Lowers the calling thread's CPU and I/O priority (nice 19, the idle I/O class), as far
/// as the kernel allows; what could not be done, for the log.
pub fn lower_thread_priority() -> Vec<String> {
    let mut failed = Vec::new();
    // SAFETY: plain syscalls on this thread's own id with constant arguments.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // Linux applies PRIO_PROCESS with a thread id to that thread alone.
    let nice = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if nice != 0 {
        failed.push(format!("nice 19: {}", std::io::Error::last_os_error()));
    }
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: as above; ioprio_set takes three integers.
    let io = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if io != 0 {
        failed.push(format!(
            "idle I/O class: {}",
            std::io::Error::last_os_error()
        ));
    }
    failed
}

/// Sealed snapshots in `root` whose pass has not finished, newest first.
pub fn unhashed(root: &Path) -> Vec<String> {
    let Ok(store) = super::store::Store::open(root) else {
        return Vec::new();
    };
    let mut all = store.list().unwrap_or_default();
    all.retain(|m| m.hashes.is_none());
    all.reverse();
    all.into_iter().map(|m| m.id).collect()
}

#[cfg(test)]
pub(crate) mod tests;
