//! Verify after every upgrade (README.md "Verify after every upgrade"; docs/operations.md
//! "DEGRADED"): once the new version's server has settled and answers ping, the checklist of
//! `verify` runs against the pre-update snapshot. A failure is DEGRADED until the admin
//! acknowledges it (`immich-guard ack`) or a later verify passes.
//!
//! The decisions are pure functions, each a unit test; [`run`] is the one piece that touches
//! Docker and HTTP (ask for ping until [`when_settled`] says go, then `verify::verify`), and
//! protect.rs spawns it so a slow verify never delays a freeze. Nothing clears a DEGRADED but
//! the admin's `ack` or a passing verify.

use std::time::Duration;

use bollard::Docker;
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::discover::Stack;
use crate::verify::{Check, Outcome, Plan, Report};

/// A settled server that does not answer ping is asked again this often ...
pub const PING_EVERY: Duration = Duration::from_secs(2);
/// ... for this long; then the checklist runs anyway, and its ping line fails.
pub const PING_PATIENCE: Duration = Duration::from_secs(300);

/// A verify the daemon owes: an update settled (or, while DEGRADED, the server was
/// recreated); persisted so a restarted daemon still runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyDue {
    pub from: String,
    pub to: String,
    /// The pre-update snapshot to compare with; None when the change had none sealed.
    pub snapshot: Option<String>,
    /// Not before this: an update settles first; a recreated server gets a crash-loop window.
    pub not_before: DateTime<Utc>,
    /// `upgrade settled`, `server recreated while degraded`.
    pub reason: String,
}

/// The stack failed its verify after an upgrade: what failed and the way back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Degraded {
    pub since: DateTime<Utc>,
    pub from: String,
    pub to: String,
    /// The pre-update snapshot: `immich-guard restore <snapshot>` goes back to it.
    pub snapshot: Option<String>,
    /// The failed lines of the checklist.
    pub failed: Vec<Check>,
    /// What the admin can do, as commands.
    pub hint: String,
    /// The server container that failed: a new one (recreated by `docker compose up -d`
    /// after a fix) is verified again.
    #[serde(default)]
    pub server: Option<String>,
}

/// The newest verify the daemon ran, pass or fail; shown by `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastVerify {
    pub at: DateTime<Utc>,
    pub from: String,
    pub to: String,
    pub against: Option<String>,
    pub passed: bool,
    pub reason: String,
    pub checks: Vec<Check>,
}

impl LastVerify {
    /// `6 passed, 2 skipped` or `2 failed (assets, originals), 5 passed, 1 skipped`.
    pub fn summary(&self) -> String {
        let count = |o: Outcome| self.checks.iter().filter(|c| c.outcome == o).count();
        let failed: Vec<&str> = self
            .checks
            .iter()
            .filter(|c| c.outcome == Outcome::Fail)
            .map(|c| c.name.as_str())
            .collect();
        let mut parts = Vec::new();
        if !failed.is_empty() {
            parts.push(format!("{} failed ({})", failed.len(), failed.join(", ")));
        }
        parts.push(format!("{} passed", count(Outcome::Pass)));
        let skipped = count(Outcome::Skipped);
        if skipped > 0 {
            parts.push(format!("{skipped} skipped"));
        }
        parts.join(", ")
    }
}

/// The update is over once the new server has run a whole crash-loop window without a death
/// (and is not halted).
pub fn settled(
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    window: TimeDelta,
    server_running: bool,
    recent_deaths: usize,
) -> bool {
    server_running && recent_deaths == 0 && now - since > window
}

/// What to do about a settled server now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Ask for ping again after this long.
    Wait(Duration),
    Verify,
}

/// The server has settled: verify as soon as it answers ping; while it does not, wait, up to
/// [`PING_PATIENCE`], then verify anyway (a server that runs but never answers is not well).
pub fn when_settled(answers_ping: bool, waited: Duration) -> Step {
    if answers_ping || waited >= PING_PATIENCE {
        Step::Verify
    } else {
        Step::Wait(PING_EVERY)
    }
}

/// What a verify's report means.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Passed(LastVerify),
    Degraded(Box<Degraded>, LastVerify),
}

pub fn judge(due: &VerifyDue, report: &Report, server: Option<String>) -> Verdict {
    let last = LastVerify {
        at: report.at,
        from: due.from.clone(),
        to: due.to.clone(),
        against: report.against.clone(),
        passed: report.passed(),
        reason: due.reason.clone(),
        checks: report.checks.clone(),
    };
    if last.passed {
        return Verdict::Passed(last);
    }
    let snapshot = report.against.clone().or(due.snapshot.clone());
    let degraded = Degraded {
        since: report.at,
        from: due.from.clone(),
        to: due.to.clone(),
        hint: hint(&due.from, snapshot.as_deref()),
        snapshot,
        failed: report.failures().cloned().collect(),
        server,
    };
    Verdict::Degraded(Box::new(degraded), last)
}

/// The way back from a failed verify, as commands.
pub fn hint(from: &str, snapshot: Option<&str>) -> String {
    let back = match snapshot {
        Some(id) => {
            format!("to go back to {from} as it was before the update: `immich-guard restore {id}`")
        }
        None => format!(
            "no pre-update snapshot was sealed; fix the cause (see the failed lines), or `immich-guard pin {from}` if the database still fits {from}"
        ),
    };
    format!(
        "{back}; once fixed, `immich-guard verify` shows the checklist and `docker compose up -d` (a new server container) is verified again; `immich-guard ack` clears this after you have looked"
    )
}

/// Protection's record of verifies: the one owed, the newest result, and DEGRADED.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verifies {
    #[serde(default)]
    pub due: Option<VerifyDue>,
    #[serde(default)]
    pub last: Option<LastVerify>,
    #[serde(default)]
    pub degraded: Option<Degraded>,
}

impl Verifies {
    /// Records a verdict: a failure is DEGRADED (the newest failure replaces an older one), a
    /// pass clears it. Returns whether the stack was DEGRADED before.
    pub fn record(&mut self, verdict: Verdict) -> bool {
        let was = self.degraded.is_some();
        match verdict {
            Verdict::Passed(last) => {
                self.degraded = None;
                self.last = Some(last);
            }
            Verdict::Degraded(degraded, last) => {
                self.degraded = Some(*degraded);
                self.last = Some(last);
            }
        }
        was
    }

    /// `immich-guard ack`: the admin has seen the DEGRADED; it is cleared (the failed verify
    /// stays as the last result).
    pub fn acknowledge(&mut self) -> Result<Degraded, String> {
        self.degraded
            .take()
            .ok_or_else(|| "nothing to acknowledge: the stack is not DEGRADED".to_string())
    }

    /// While DEGRADED, a new server container (the admin's fix brought up) is verified again,
    /// against the same snapshot, once it has run `window` without dying.
    pub fn reverify_for(
        &self,
        server: &str,
        now: DateTime<Utc>,
        window: TimeDelta,
    ) -> Option<VerifyDue> {
        let d = self.degraded.as_ref()?;
        if self.due.is_some() || d.server.as_deref() == Some(server) {
            return None;
        }
        Some(VerifyDue {
            from: d.from.clone(),
            to: d.to.clone(),
            snapshot: d.snapshot.clone(),
            not_before: now + window,
            reason: "server recreated while degraded".into(),
        })
    }
}

/// Asks the server for ping until [`when_settled`] says go, then runs the checklist.
pub async fn run(docker: &Docker, host: &str, stack: &Stack, plan: &Plan) -> Report {
    let started = std::time::Instant::now();
    loop {
        let answers = answers_ping(docker, stack).await;
        match when_settled(answers, started.elapsed()) {
            Step::Verify => break,
            Step::Wait(pause) => tokio::time::sleep(pause).await,
        }
    }
    crate::verify::verify(docker, host, stack, plan).await
}

/// Whether the server answers `/api/server/ping` with pong at any of its addresses.
async fn answers_ping(docker: &Docker, stack: &Stack) -> bool {
    let Some(server) = &stack.server else {
        return false;
    };
    let Ok(inspect) = docker
        .inspect_container(
            &server.container_id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
    else {
        return false;
    };
    for url in crate::verify::server_addresses(&inspect) {
        let probe = crate::verify::get(&format!("{url}/api/server/ping")).await;
        if crate::verify::check_ping(Some(&probe)).outcome == Outcome::Pass {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due() -> VerifyDue {
        VerifyDue {
            from: "v1.119.0".into(),
            to: "v1.120.0".into(),
            snapshot: Some("20261125T020000Z-v1.119.0-pre-update".into()),
            not_before: Utc::now(),
            reason: "upgrade settled".into(),
        }
    }

    fn check(name: &str, outcome: Outcome, detail: &str) -> Check {
        Check {
            name: name.into(),
            outcome,
            detail: detail.into(),
        }
    }

    fn report(assets_now: i64) -> Report {
        let assets = if assets_now >= 40_000 {
            check(
                "assets",
                Outcome::Pass,
                &format!("{assets_now} now, 40000 in the snapshot"),
            )
        } else {
            check(
                "assets",
                Outcome::Fail,
                &format!("{assets_now} now, 40000 in the snapshot"),
            )
        };
        let checks = vec![
            check("ping", Outcome::Pass, "/api/server/ping answered pong"),
            assets,
            check("schema", Outcome::Skipped, "skipped: not in this image"),
        ];
        Report {
            project: "immich".into(),
            against: Some("20261125T020000Z-v1.119.0-pre-update".into()),
            baseline_note: "pre-update snapshot".into(),
            expected_version: Some("v1.120.0".into()),
            server_url: None,
            at: Utc::now(),
            passed: checks.iter().all(|c| c.outcome != Outcome::Fail),
            checks,
            not_restored: None,
        }
    }

    #[test]
    fn a_settled_server_is_verified_once_it_answers_ping() {
        let window = TimeDelta::seconds(120);
        let now = Utc::now();
        let started = now - TimeDelta::seconds(121);
        assert!(settled(started, now, window, true, 0));
        // Inside the window, with a recent death, or not running: still settling.
        assert!(!settled(now - TimeDelta::seconds(60), now, window, true, 0));
        assert!(!settled(started, now, window, true, 1));
        assert!(!settled(started, now, window, false, 0));
        assert_eq!(when_settled(true, Duration::ZERO), Step::Verify);
        assert_eq!(
            when_settled(false, Duration::from_secs(10)),
            Step::Wait(PING_EVERY)
        );
        // Never answering is a finding too: the checklist runs and its ping line fails.
        assert_eq!(when_settled(false, PING_PATIENCE), Step::Verify);
    }

    #[test]
    fn a_failed_verify_is_degraded_until_a_later_one_passes() {
        let mut v = Verifies::default();
        let verdict = judge(&due(), &report(0), Some("c1".into()));
        let Verdict::Degraded(d, _) = &verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(d.failed.len(), 1);
        assert_eq!(d.failed[0].detail, "0 now, 40000 in the snapshot");
        assert!(
            d.hint
                .contains("`immich-guard restore 20261125T020000Z-v1.119.0-pre-update`"),
            "{}",
            d.hint
        );
        assert!(d.hint.contains("`immich-guard ack`"), "{}", d.hint);
        assert!(!v.record(verdict));
        assert!(v.degraded.is_some());
        assert!(!v.last.as_ref().unwrap().passed);
        assert_eq!(
            v.last.as_ref().unwrap().summary(),
            "1 failed (assets), 1 passed, 1 skipped"
        );

        // The same server again: no re-verify; a recreated one: verified again.
        let window = TimeDelta::seconds(120);
        assert_eq!(v.reverify_for("c1", Utc::now(), window), None);
        let now = Utc::now();
        let again = v.reverify_for("c2", now, window).unwrap();
        assert_eq!(again.not_before, now + window);
        assert_eq!(again.snapshot, due().snapshot);
        assert_eq!(again.reason, "server recreated while degraded");

        // A later pass clears it and is the last result.
        assert!(v.record(judge(&again, &report(40_002), Some("c2".into()))));
        assert_eq!(v.degraded, None);
        assert!(v.last.as_ref().unwrap().passed);
        assert_eq!(
            v.reverify_for("c3", Utc::now(), window),
            None,
            "not degraded"
        );
    }

    #[test]
    fn acknowledging_clears_degraded_and_keeps_the_result() {
        let mut v = Verifies::default();
        assert!(v.acknowledge().unwrap_err().contains("not DEGRADED"));
        v.record(judge(&due(), &report(0), None));
        let d = v.acknowledge().unwrap();
        assert_eq!(d.to, "v1.120.0");
        assert_eq!(v.degraded, None);
        assert!(!v.last.unwrap().passed, "the failed result stays on record");
    }

    #[test]
    fn without_a_snapshot_the_hint_says_so() {
        let mut d = due();
        d.snapshot = None;
        let mut r = report(0);
        r.against = None;
        let Verdict::Degraded(degraded, _) = judge(&d, &r, None) else {
            panic!()
        };
        assert_eq!(degraded.snapshot, None);
        assert!(
            degraded.hint.contains("no pre-update snapshot was sealed"),
            "{}",
            degraded.hint
        );
    }

    #[test]
    fn the_record_survives_json() {
        let mut v = Verifies {
            due: Some(due()),
            ..Verifies::default()
        };
        v.record(judge(&due(), &report(0), Some("c1".into())));
        let back: Verifies = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(back, v);
        // An older protection.json has none of it.
        assert_eq!(
            serde_json::from_str::<Verifies>("{}").unwrap(),
            Verifies::default()
        );
    }
}
