//! Crash-loop detection: a container that dies `deaths` times within `window` while Docker
//! keeps restarting it. A death counts only when Docker's restart policy restarted the
//! container, which is when its RestartCount rises (Docker raises it before it sends the
//! `die` event), so an admin's `docker stop` or `docker restart` never counts. The same count
//! read by discovery after a reconnect brings in the deaths whose events were missed.
//! Pure bookkeeping; the guard feeds it and acts on the answer.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, TimeDelta, Utc};

pub struct Detector {
    deaths: usize,
    window: TimeDelta,
    seen: HashMap<String, Track>,
}

#[derive(Default)]
struct Track {
    deaths: VecDeque<DateTime<Utc>>,
    /// RestartCount last read, and when.
    restart_count: Option<(i64, DateTime<Utc>)>,
}

/// A loop found: the deaths within the window, of which `missed` are known only from the
/// restart count (their events never arrived), and the newest death.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loop {
    pub deaths: usize,
    pub missed: usize,
    pub last_death: DateTime<Utc>,
}

impl Detector {
    pub fn new(deaths: u32, window_secs: u64) -> Detector {
        Detector {
            deaths: deaths.max(1) as usize,
            window: TimeDelta::seconds(window_secs as i64),
            seen: HashMap::new(),
        }
    }

    /// A `die` event at `at`, after which the container's RestartCount read `restart_count`
    /// (at `read_at`). A count that did not rise means Docker is not restarting it: not a
    /// loop death.
    pub fn died(
        &mut self,
        container: &str,
        restart_count: i64,
        at: DateTime<Utc>,
        read_at: DateTime<Utc>,
    ) -> Option<Loop> {
        let track = self.seen.entry(container.to_string()).or_default();
        let new = match track.restart_count {
            Some((last, _)) => rise(last, restart_count),
            // First sight: this death, if Docker restarted it.
            None => i64::from(restart_count > 0),
        };
        self.record(container, (restart_count, read_at), new, at, true)
    }

    /// A `die` the admin caused (`docker stop`, `kill`, `restart`): never a loop death, but
    /// `docker restart` raises RestartCount on the way (Docker 20.10), so the count is taken.
    pub fn stopped(&mut self, container: &str, restart_count: i64, at: DateTime<Utc>) {
        let track = self.seen.entry(container.to_string()).or_default();
        track.restart_count = Some((restart_count, at));
    }

    /// RestartCount read by discovery, whose listing began at `now`; a rise since the last
    /// reading is deaths no event reported (the connection to Docker was down). A reading
    /// older than the last one is ignored: a discovery that listed before a `die` was
    /// inspected would otherwise look like a reset, and the next death like several.
    pub fn observed(
        &mut self,
        container: &str,
        restart_count: i64,
        now: DateTime<Utc>,
    ) -> Option<Loop> {
        let track = self.seen.entry(container.to_string()).or_default();
        let new = match track.restart_count {
            Some((_, read_at)) if read_at >= now => return None,
            Some((last, _)) => rise(last, restart_count),
            // First sight (the daemon just started): nothing known to be new.
            None => 0,
        };
        self.record(container, (restart_count, now), new, now, false)
    }

    /// `new` deaths up to `at`, the newest at `at`; `reading` is the count and when it was
    /// read; `with_event`: the newest was reported by its own event.
    fn record(
        &mut self,
        container: &str,
        reading: (i64, DateTime<Utc>),
        new: i64,
        at: DateTime<Utc>,
        with_event: bool,
    ) -> Option<Loop> {
        let track = self
            .seen
            .get_mut(container)
            .expect("entry made by the caller");
        let since = track.restart_count.map(|(_, t)| t);
        track.restart_count = Some(reading);
        if new <= 0 {
            return None;
        }
        // The newest death is at `at`; the ones in between are spread evenly since the last
        // reading (only their number is known).
        let new = new as usize;
        let from = since.filter(|s| *s < at).unwrap_or(at);
        let step = (at - from) / new as i32;
        for i in 1..new {
            track.deaths.push_back(from + step * i as i32);
        }
        track.deaths.push_back(at);
        while track.deaths.front().is_some_and(|t| at - *t > self.window) {
            track.deaths.pop_front();
        }
        if track.deaths.len() < self.deaths {
            return None;
        }
        let found = Loop {
            deaths: track.deaths.len(),
            missed: (new - usize::from(with_event)).min(track.deaths.len()),
            last_death: at,
        };
        // One loop is reported once; counting starts again.
        track.deaths.clear();
        Some(found)
    }

    /// Deaths counted for `container` in the current window.
    pub fn recent(&self, container: &str) -> usize {
        self.seen.get(container).map_or(0, |t| t.deaths.len())
    }

    /// A container removed or released starts afresh (its restart count is read again).
    pub fn forget(&mut self, container: &str) {
        self.seen.remove(container);
    }
}

/// Restarts between two readings. A count below the last one was reset by a manual start
/// since; everything it counts came after the reset.
fn rise(last: i64, now: i64) -> i64 {
    if now >= last { now - last } else { now }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn three_restarted_deaths_in_the_window_are_a_loop_reported_once() {
        let mut d = Detector::new(3, 120);
        d.observed("server", 0, at(0));
        assert_eq!(d.died("server", 1, at(1), at(1)), None);
        assert_eq!(d.died("server", 2, at(10), at(10)), None);
        let found = d.died("server", 3, at(20), at(20)).expect("a loop");
        assert_eq!(
            (found.deaths, found.missed, found.last_death),
            (3, 0, at(20))
        );
        assert_eq!(d.recent("server"), 0);
        assert_eq!(d.died("server", 4, at(30), at(30)), None);
    }

    #[test]
    fn deaths_docker_does_not_restart_never_count() {
        let mut d = Detector::new(2, 60);
        d.observed("server", 5, at(0));
        // `docker stop`, `docker restart`: the count does not rise.
        for t in 1..10 {
            assert_eq!(d.died("server", 5, at(t), at(t)), None);
        }
        assert_eq!(d.recent("server"), 0);
    }

    #[test]
    fn a_docker_restart_is_not_a_death_even_though_it_raises_the_count() {
        let mut d = Detector::new(3, 120);
        d.observed("server", 0, at(0));
        // `docker restart`: die with RestartCount raised to 1, then the start resets it.
        d.stopped("server", 1, at(1));
        d.observed("server", 0, at(2));
        // Two crashes at boot, then up: two deaths, not three.
        assert_eq!(d.died("server", 1, at(3), at(3)), None);
        assert_eq!(d.died("server", 2, at(4), at(4)), None);
        assert_eq!(d.recent("server"), 2);
    }

    #[test]
    fn deaths_spread_wider_than_the_window_are_not_a_loop() {
        let mut d = Detector::new(3, 120);
        d.observed("server", 0, at(0));
        assert!(d.died("server", 1, at(0), at(0)).is_none());
        assert!(d.died("server", 2, at(100), at(100)).is_none());
        assert!(d.died("server", 3, at(230), at(230)).is_none());
        assert_eq!(
            d.recent("server"),
            1,
            "only the death at 230 s is within 120 s"
        );
        // Two restarts then up: never a loop.
        let mut d = Detector::new(3, 120);
        d.observed("ml", 0, at(0));
        assert!(d.died("ml", 1, at(0), at(0)).is_none());
        assert!(d.died("ml", 2, at(5), at(5)).is_none());
        assert!(d.observed("ml", 2, at(60)).is_none());
        assert_eq!(d.recent("ml"), 2);
    }

    #[test]
    fn a_discovery_that_listed_before_a_death_was_read_is_ignored() {
        let mut d = Detector::new(3, 120);
        d.observed("server", 0, at(0));
        // The die of the first crash is read at 11 s; a discovery that listed at 10 s (count
        // still 0) arrives after it and must not look like a reset.
        assert_eq!(d.died("server", 1, at(10), at(11)), None);
        assert_eq!(d.observed("server", 0, at(10)), None);
        assert_eq!(d.died("server", 2, at(12), at(12)), None);
        assert_eq!(d.recent("server"), 2, "two deaths, not three");
    }

    #[test]
    fn restarts_missed_while_disconnected_come_from_the_count() {
        let mut d = Detector::new(3, 120);
        d.observed("db", 1, at(0));
        // Reconnected 30 s later: four restarts happened meanwhile.
        let found = d.observed("db", 5, at(30)).expect("a loop");
        assert_eq!((found.deaths, found.missed), (4, 4));
        // The same rise seen again by a late `die` event is not counted twice.
        assert_eq!(d.died("db", 5, at(30), at(30)), None);
        // Missed restarts spread over hours are not a loop.
        let mut d = Detector::new(3, 120);
        d.observed("db", 0, at(0));
        assert_eq!(d.observed("db", 3, at(3 * 3600)), None);
        assert_eq!(d.recent("db"), 1);
    }

    #[test]
    fn first_sight_and_resets() {
        let mut d = Detector::new(2, 60);
        // The daemon starts on a container restarted 7 times long ago: nothing new.
        assert_eq!(d.observed("a", 7, at(0)), None);
        assert_eq!(d.recent("a"), 0);
        // A die on a container never seen before counts once if Docker restarted it.
        assert_eq!(d.died("b", 1, at(1), at(1)), None);
        assert_eq!(d.recent("b"), 1);
        // A manual start resets the count: the next restarted death counts once.
        d.observed("a", 0, at(2));
        assert_eq!(d.died("a", 1, at(3), at(3)), None);
        assert!(d.died("a", 2, at(4), at(4)).is_some());
        // Reset and restarted twice between two readings: both count.
        d.observed("c", 5, at(0));
        let found = d
            .observed("c", 2, at(10))
            .expect("two deaths make a loop here");
        assert_eq!((found.deaths, found.missed), (2, 2));
        d.forget("b");
        assert_eq!(d.recent("b"), 0);
    }
}
