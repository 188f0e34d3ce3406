//! What keeps the control socket from starving protection (docs/operations.md, "The control
//! socket"): connection slots in total and per peer uid, with slots only root can take, sized
//! from the file descriptor limit so that Docker events, the compose watcher, snapshots and
//! PostgreSQL always have descriptors left; and log lines that a flood cannot multiply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept for protection whatever the socket does. An idle daemon holds about 30
/// (runtime, Docker events and API connections, inotify, logs); a snapshot adds PostgreSQL,
/// `docker exec` streams and the files of the storage copy.
pub const RESERVED_FDS: u64 = 256;
/// Connections the socket serves at once, at most: the CLI opens one per command.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one non-root uid may hold at once.
pub const MAX_PER_UID: usize = 8;
/// Above this soft limit nothing changes; below it the caps shrink to leave RESERVED_FDS.
const FULL_CAPS_FD_LIMIT: u64 = RESERVED_FDS + 2 * MAX_CONNECTIONS as u64;

/// How many connections the socket may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// All connections together, root's included.
    pub total: usize,
    /// One non-root uid.
    pub per_uid: usize,
    /// Slots only root (or the daemon's own user) may take: non-root peers together never
    /// hold more than `total - reserved`.
    pub reserved: usize,
}

impl Caps {
    /// Caps for a soft `RLIMIT_NOFILE` of `nofile`: at most half of what is left after
    /// [`RESERVED_FDS`], so the socket can never take what protection needs.
    pub fn for_fd_limit(nofile: u64) -> Caps {
        let total = (nofile.saturating_sub(RESERVED_FDS) / 2).clamp(4, MAX_CONNECTIONS as u64);
        let total = total as usize;
        let reserved = (total / 4).max(1);
        Caps {
            total,
            per_uid: MAX_PER_UID.min(total - reserved),
            reserved,
        }
    }
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many connections from uid {uid} (at most {limit} at once); try again later")]
    PerUid { uid: u32, limit: usize },
    #[error("too many connections (at most {limit} at once); try again later")]
    Total { limit: usize },
}

#[derive(Default)]
struct Counts {
    total: usize,
    unprivileged: usize,
    by_uid: HashMap<Option<u32>, usize>,
}

/// The connection slots; cheap to clone (shared counts).
#[derive(Clone)]
pub struct Slots {
    caps: Caps,
    counts: Arc<Mutex<Counts>>,
}

/// A taken slot; dropping it (the connection's task ends or is aborted) gives it back.
pub struct Slot {
    counts: Arc<Mutex<Counts>>,
    uid: Option<u32>,
    privileged: bool,
}

impl Slots {
    pub fn new(caps: Caps) -> Slots {
        Slots {
            caps,
            counts: Arc::default(),
        }
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// A slot for a peer (`uid` from SO_PEERCRED; `None` if the kernel did not say, counted
    /// as a non-root peer of its own), or why not.
    pub fn take(&self, uid: Option<u32>, privileged: bool) -> Result<Slot, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.caps.total {
            return Err(Refusal::Total {
                limit: self.caps.total,
            });
        }
        if !privileged {
            let unprivileged_limit = self.caps.total - self.caps.reserved;
            if counts.unprivileged >= unprivileged_limit {
                return Err(Refusal::Total {
                    limit: unprivileged_limit,
                });
            }
            let mine = counts.by_uid.get(&uid).copied().unwrap_or(0);
            if mine >= self.caps.per_uid {
                return Err(Refusal::PerUid {
                    uid: uid.unwrap_or(u32::MAX),
                    limit: self.caps.per_uid,
                });
            }
            counts.unprivileged += 1;
        }
        counts.total += 1;
        *counts.by_uid.entry(uid).or_default() += 1;
        Ok(Slot {
            counts: self.counts.clone(),
            uid,
            privileged,
        })
    }

    /// Connections held now: (all, by non-root peers).
    pub fn in_use(&self) -> (usize, usize) {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        (counts.total, counts.unprivileged)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        if !self.privileged {
            counts.unprivileged -= 1;
        }
        if let Some(n) = counts.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                // A uid that went away leaves nothing behind.
                counts.by_uid.remove(&self.uid);
            }
        }
    }
}

/// The soft `RLIMIT_NOFILE`, raised to the hard limit first: a default host gives 1024,
/// which a busy daemon may need more of, and the hard limit is what the admin allowed.
/// Logs what it did; returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    // None is "unlimited", which the kernel never allows for this resource (nr_open caps it).
    let soft = current.unwrap_or(u64::MAX);
    let hard = maximum.unwrap_or(u64::MAX);
    let now = if soft < hard {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: maximum,
                maximum,
            },
        ) {
            Ok(()) => {
                tracing::info!(
                    from = soft,
                    to = hard,
                    "raised the open file limit to the hard limit"
                );
                hard
            }
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "could not raise the open file limit");
                soft
            }
        }
    } else {
        tracing::info!(limit = soft, "open file limit");
        soft
    };
    if now < FULL_CAPS_FD_LIMIT {
        tracing::warn!(
            limit = now,
            wanted = FULL_CAPS_FD_LIMIT,
            "the open file limit is low: the control socket serves fewer connections at once (set LimitNOFILE= in the unit)"
        );
    }
    now
}

/// The soft `RLIMIT_NOFILE` in force.
pub fn fd_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Lets a repeated event through to the log once per `every`, with how many were held back,
/// so that a flood of refusals or failing accepts cannot flood the journal too.
pub struct LogEvery {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl LogEvery {
    pub fn new(every: Duration) -> LogEvery {
        LogEvery {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)`: log now, `n` more of the same happened since the last line.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// Pause after a failed `accept`. Out of descriptors (EMFILE/ENFILE) the listener stays
/// readable and every retry fails again, so the wait doubles up to a ceiling instead of
/// spinning; other failures (a peer gone before it was accepted) retry soon.
pub struct AcceptBackoff {
    delay: Duration,
    failures: u64,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            delay: BACKOFF_FIRST,
            failures: 0,
        }
    }
}

impl AcceptBackoff {
    pub fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.failures += 1;
        let out_of_fds = matches!(
            error.raw_os_error(),
            Some(code) if code == nix::errno::Errno::EMFILE as i32
                || code == nix::errno::Errno::ENFILE as i32
        );
        if !out_of_fds {
            return BACKOFF_FIRST;
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        delay
    }

    /// An accept worked: returns how many failed before it (0 when none did).
    pub fn succeeded(&mut self) -> u64 {
        self.delay = BACKOFF_FIRST;
        std::mem::take(&mut self.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_leave_the_reserve_whatever_the_limit() {
        assert_eq!(
            Caps::for_fd_limit(1024),
            Caps {
                total: 64,
                per_uid: 8,
                reserved: 16
            }
        );
        assert_eq!(Caps::for_fd_limit(1 << 20), Caps::for_fd_limit(1024));
        let small = Caps::for_fd_limit(300);
        assert_eq!(small.total, 22);
        assert!(small.total as u64 * 2 + RESERVED_FDS <= 300);
        // Even an absurdly low limit leaves root a slot.
        let tiny = Caps::for_fd_limit(16);
        assert_eq!(tiny.total, 4);
        assert!(tiny.reserved >= 1 && tiny.per_uid >= 1);
    }

    #[test]
    fn one_uid_cannot_take_more_than_its_share_and_root_still_gets_in() {
        let slots = Slots::new(Caps::for_fd_limit(1024));
        let flood: Vec<Slot> = (0..8)
            .map(|_| slots.take(Some(65534), false).unwrap())
            .collect();
        assert_eq!(
            slots.take(Some(65534), false).err(),
            Some(Refusal::PerUid {
                uid: 65534,
                limit: 8
            })
        );
        assert!(slots.take(Some(1000), false).is_ok());
        let root = slots.take(Some(0), true).unwrap();
        assert_eq!(slots.in_use(), (9, 8));
        drop(root);
        drop(flood);
        assert_eq!(slots.in_use(), (0, 0));
        assert!(slots.take(Some(65534), false).is_ok());
    }

    #[test]
    fn many_uids_together_leave_the_reserved_slots_to_root() {
        let slots = Slots::new(Caps::for_fd_limit(1024));
        let mut held = Vec::new();
        for uid in 1000..1006 {
            for _ in 0..8 {
                held.push(slots.take(Some(uid), false).unwrap());
            }
        }
        assert_eq!(held.len(), 48);
        assert_eq!(
            slots.take(Some(2000), false).err(),
            Some(Refusal::Total { limit: 48 })
        );
        for _ in 0..16 {
            held.push(slots.take(Some(0), true).unwrap());
        }
        assert_eq!(
            slots.take(Some(0), true).err(),
            Some(Refusal::Total { limit: 64 })
        );
        // A peer the kernel gave no uid for is counted on its own, never as root.
        held.truncate(0);
        for _ in 0..8 {
            held.push(slots.take(None, false).unwrap());
        }
        assert!(slots.take(None, false).is_err());
    }

    #[test]
    fn a_flood_of_events_makes_one_log_line_per_period() {
        let mut log = LogEvery::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(log.note(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(log.note(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.note(t0 + Duration::from_secs(61)), Some(999));
    }

    #[test]
    fn out_of_descriptors_backs_off_up_to_a_ceiling() {
        let mut backoff = AcceptBackoff::default();
        let emfile = std::io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.failed(&emfile)).collect();
        assert_eq!(delays[0], BACKOFF_FIRST);
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*delays.last().unwrap(), BACKOFF_MAX);
        let aborted = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        assert_eq!(backoff.failed(&aborted), BACKOFF_FIRST);
        assert_eq!(backoff.succeeded(), 9);
        assert_eq!(backoff.failed(&emfile), BACKOFF_FIRST);
    }
}
