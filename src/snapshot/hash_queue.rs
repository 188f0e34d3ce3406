//! The daemon's content-hash passes (snapshot/hashes.rs): one at a time, on a thread of their
//! own at the lowest CPU and I/O priority, at `snapshots.hash_rate_mb`. A snapshot is queued
//! when it seals (the freeze is released by then: the pass never lengthens one); at start,
//! and every while when idle, the sealed snapshots without a finished pass are queued, newest
//! first. While the daemon is busy (a snapshot is taken, a server is frozen, a restore runs)
//! the pass waits between two reads and goes on after.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use super::hashes::{self, Finished, Flow, PassOptions};

/// How often an idle worker looks for snapshots sealed outside the queue (a pre-restore one).
const RESCAN: Duration = Duration::from_secs(600);
/// How often a waiting pass looks whether the daemon is still busy.
const BUSY_POLL: Duration = Duration::from_millis(250);

/// Whether the daemon is busy with something a pass must not slow down.
pub type Busy = Box<dyn Fn() -> bool + Send>;

#[derive(Clone)]
pub struct HashQueue {
    ids: mpsc::Sender<String>,
}

impl HashQueue {
    /// Starts the worker thread for the snapshots in `root`; `rate` is in bytes per second
    /// (0: unlimited).
    pub fn start(root: PathBuf, rate: u64, busy: Busy) -> HashQueue {
        let (ids, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("content-hashes".into())
            .spawn(move || worker(root, rate, busy, rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the content-hash thread; snapshots are not hashed");
        }
        HashQueue { ids }
    }

    /// Hashes this sealed snapshot when the ones before it are done.
    pub fn push(&self, id: &str) {
        let _ = self.ids.send(id.to_string());
    }
}

fn worker(root: PathBuf, rate: u64, busy: Busy, ids: mpsc::Receiver<String>) {
    let failed = hashes::lower_thread_priority();
    if !failed.is_empty() {
        tracing::info!(not_lowered = %failed.join("; "), "content hashes run at a higher priority than meant");
    }
    let options = PassOptions { rate };
    let gate = || {
        while busy() {
            std::thread::sleep(BUSY_POLL);
        }
        Flow::Go
    };
    let mut waiting: Vec<String> = hashes::unhashed(&root);
    loop {
        let Some(id) = (!waiting.is_empty()).then(|| waiting.remove(0)) else {
            match ids.recv_timeout(RESCAN) {
                Ok(id) => waiting.push(id),
                Err(mpsc::RecvTimeoutError::Timeout) => waiting = hashes::unhashed(&root),
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            continue;
        };
        // Newly sealed ones go first: the newest snapshot is the one a restore needs.
        while let Ok(newer) = ids.try_recv() {
            waiting.insert(0, newer);
        }
        waiting.retain(|w| *w != id);
        gate();
        let dir = root.join(&id);
        match hashes::run_pass(&dir, &options, &gate) {
            Ok(Finished::Done { hashes, check }) => {
                if check.passed {
                    tracing::info!(snapshot = %id, files = hashes.files, mb = hashes.bytes / 1_000_000, secs = hashes.duration_ms / 1000, "content hashes recorded");
                } else {
                    tracing::warn!(snapshot = %id, problem = %check.summary, "content hashes recorded; the snapshot's check failed");
                }
            }
            Ok(Finished::Stopped { .. }) => waiting.insert(0, id),
            Ok(Finished::Gone) => {
                tracing::debug!(snapshot = %id, "deleted before its hashes were done")
            }
            Err(e) => tracing::warn!(snapshot = %id, error = %e, "content hashes not recorded"),
        }
    }
}
