//! State keyed by stack (issue 10, item 4): the baseline and everything in `protection.json`
//! belong to one compose project. A daemon restarted on another project never shows the first
//! one's baseline, keeps it for when that project comes back, and with no stack at all says
//! so once. Two real stacks of different versions, one real daemon restarted between them.

mod harness;

use std::time::{Duration, Instant};

use harness::guard::Guard;
use harness::{Stack, StackSpec, docker_available, ensure_images};
use immich_guard::status::StatusReport;

const LEARNED: &str = "baseline: the version the database runs with";

fn baseline(s: &StatusReport) -> Option<String> {
    s.state
        .protection
        .baseline
        .as_ref()
        .map(|b| b.version.clone())
}

/// Restarts the daemon watching `project` instead of `from` (same data dir and snapshots).
fn restart_on(mut guard: Guard, from: &str, project: &str) -> Guard {
    guard.terminate();
    let config = std::fs::read_to_string(&guard.config_path).unwrap();
    let changed = config.replace(
        &format!("project = {from:?}"),
        &format!("project = {project:?}"),
    );
    assert_ne!(config, changed, "the config names {from}");
    std::fs::write(&guard.config_path, changed).unwrap();
    guard.restart()
}

/// Polls status until `project`'s baseline is `version`, failing at once if any answer on the
/// way shows `never`.
fn watch_baseline(guard: &Guard, project: &str, version: &str, never: &str) -> StatusReport {
    let start = Instant::now();
    loop {
        let s = guard.status();
        assert_ne!(
            baseline(&s).as_deref(),
            Some(never),
            "{project} was shown another project's baseline: {}",
            serde_json::to_string_pretty(&s).unwrap()
        );
        if baseline(&s).as_deref() == Some(version)
            && s.state
                .stack
                .as_ref()
                .is_some_and(|st| st.project == project)
        {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no baseline {version} for {project}; last status {}\nlog:\n{}",
            serde_json::to_string_pretty(&s).unwrap(),
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_daemon_moved_to_another_project_never_shows_the_first_ones_baseline_and_keeps_it() {
    if !docker_available() {
        return;
    }
    ensure_images(&["v1.119.0", "v1.120.0"]);
    let a = Stack::up(StackSpec::new("v1.119.0"));
    let b = Stack::up(StackSpec::new("v1.120.0"));
    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(&a, snapshots.path(), "");
    watch_baseline(&guard, &a.project, "v1.119.0", "v1.120.0");

    // Restarted on b: b's own baseline, never a's, at no moment.
    let guard = restart_on(guard, &a.project, &b.project);
    watch_baseline(&guard, &b.project, "v1.120.0", "v1.119.0");
    let text = String::from_utf8_lossy(&guard.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("database runs with v1.120.0") && !text.contains("v1.119.0"),
        "{text}"
    );
    // Both kept, each under its project.
    let file: serde_json::Value = serde_json::from_slice(
        &std::fs::read(guard.dir.path().join("data/protection.json")).unwrap(),
    )
    .unwrap();
    for (project, version) in [(&a.project, "v1.119.0"), (&b.project, "v1.120.0")] {
        assert_eq!(
            file["projects"][project]["baseline"]["version"], version,
            "{file:#}"
        );
    }

    // A project that is not there: no stack, said once, nothing of a's or b's.
    let gone = "igt-vanished-project";
    let guard = restart_on(guard, &b.project, gone);
    let s = guard.wait_status("no stack", Duration::from_secs(30), |s| {
        s.state.discovery_error.is_some()
    });
    assert_eq!(baseline(&s), None);
    assert!(
        s.status_line.starts_with("no stack to protect"),
        "{}",
        s.status_line
    );
    let text = String::from_utf8_lossy(&guard.cli(&["status"]).stdout).into_owned();
    assert_eq!(text.matches("no stack").count(), 1, "{text}");
    for absent in ["v1.119.0", "v1.120.0", "database runs with", "pending"] {
        assert!(!text.contains(absent), "{absent} in:\n{text}");
    }

    // a again: its baseline as kept, not learned anew.
    let guard = restart_on(guard, gone, &a.project);
    watch_baseline(&guard, &a.project, "v1.119.0", "v1.120.0");
    assert_eq!(
        guard.log().matches(LEARNED).count(),
        2,
        "learned once for a, once for b; log:\n{}",
        guard.log()
    );
}
