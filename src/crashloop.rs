//! Crash-loop detection: a container that dies `deaths` times within `window` while Docker
//! keeps restarting it. Pure bookkeeping over death timestamps; the daemon feeds it `die`
//! events and acts on the answer.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, TimeDelta, Utc};

pub struct Detector {
    deaths: usize,
    window: TimeDelta,
    seen: HashMap<String, VecDeque<DateTime<Utc>>>,
}

impl Detector {
    pub fn new(deaths: u32, window_secs: u64) -> Detector {
        Detector {
            deaths: deaths.max(1) as usize,
            window: TimeDelta::seconds(window_secs as i64),
            seen: HashMap::new(),
        }
    }

    /// Records a death; true when it completes a loop (N deaths within the window). The
    /// count starts again after a loop, so one loop is reported once.
    pub fn death(&mut self, container: &str, at: DateTime<Utc>) -> bool {
        let times = self.seen.entry(container.to_string()).or_default();
        times.push_back(at);
        while times.front().is_some_and(|t| at - *t > self.window) {
            times.pop_front();
        }
        if times.len() >= self.deaths {
            times.clear();
            return true;
        }
        false
    }

    /// Deaths counted for `container` in the current window.
    pub fn recent(&self, container: &str) -> usize {
        self.seen.get(container).map_or(0, VecDeque::len)
    }

    /// A container removed or released starts afresh.
    pub fn forget(&mut self, container: &str) {
        self.seen.remove(container);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn three_deaths_in_the_window_are_a_loop_reported_once() {
        let mut d = Detector::new(3, 120);
        assert!(!d.death("server", at(0)));
        assert!(!d.death("server", at(10)));
        assert!(d.death("server", at(20)));
        assert_eq!(d.recent("server"), 0);
        assert!(!d.death("server", at(30)));
    }

    #[test]
    fn deaths_spread_wider_than_the_window_are_not() {
        let mut d = Detector::new(3, 120);
        assert!(!d.death("server", at(0)));
        assert!(!d.death("server", at(100)));
        assert!(!d.death("server", at(230)));
        assert_eq!(
            d.recent("server"),
            1,
            "only the death at 230 s is within 120 s"
        );
        // Two restarts then up: never a loop.
        let mut d = Detector::new(3, 120);
        assert!(!d.death("ml", at(0)));
        assert!(!d.death("ml", at(5)));
        assert_eq!(d.recent("ml"), 2);
    }

    #[test]
    fn containers_are_counted_apart_and_can_be_forgotten() {
        let mut d = Detector::new(2, 60);
        assert!(!d.death("a", at(0)));
        assert!(!d.death("b", at(1)));
        d.forget("a");
        assert!(!d.death("a", at(2)));
        assert!(d.death("b", at(3)));
    }
}
