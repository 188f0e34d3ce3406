//! Snapshots through the daemon: the CLI's `snapshot` and `list`, concurrent requests joining
//! one snapshot, only root may take one, a daemon killed mid-snapshot leaves nothing
//! usable-looking behind, and a retention that fails after the seal is only a warning.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::guard::{GUARD_BIN, Guard};
use harness::immutable::Immutable;
use harness::{Stack, StackSpec, docker_available};
use immich_guard::snapshot::store::Meta;

fn guard_for(stack: &Stack, snapshots: &std::path::Path) -> Guard {
    let guard = Guard::watching(stack, snapshots, "");
    guard.wait_status("stack discovered", Duration::from_secs(30), |s| {
        s.state.stack.is_some()
    });
    guard
}

#[test]
fn cli_snapshot_is_sealed_listed_and_shown_in_status() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default());
    let snapshots = tempfile::tempdir().unwrap();
    let mut guard = guard_for(&stack, snapshots.path());

    let empty = guard.cli(&["list"]);
    assert!(String::from_utf8_lossy(&empty.stdout).contains("no sealed snapshots yet"));

    let out = guard.cli(&["snapshot", "--label", "before trying v1.120"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("sealed snapshot"), "{stdout}");
    // Not a terminal: progress comes as plain lines.
    assert!(stderr.contains("dumping with pg_dumpall"), "{stderr}");
    assert!(stderr.contains("storage:"), "{stderr}");

    // The content-hash pass after the seal adds its record to meta.json: compared once done.
    guard.wait_all_checked(Duration::from_secs(60));
    let listed = guard.list();
    assert_eq!(listed.len(), 1);
    let meta = &listed[0];
    assert_eq!(meta.label.as_deref(), Some("before trying v1.120"));
    assert_eq!(meta.trigger, "manual");
    assert_eq!(meta.version, "v1.119.0");
    assert!(stdout.contains(&meta.id));
    let table = String::from_utf8_lossy(&guard.cli(&["list"]).stdout).to_string();
    assert!(
        table.contains(&meta.id) && table.contains("hardlink"),
        "{table}"
    );

    let status = guard.status();
    assert_eq!(status.state.last_snapshot.as_ref().unwrap().id, meta.id);
    assert!(
        status.status_line.starts_with("watching"),
        "{}",
        status.status_line
    );

    // With the daemon down, `list` reads the snapshot dir: the same snapshots, and a note on
    // stderr that it did.
    assert!(guard.terminate().success());
    let out = guard.cli(&["list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<Vec<Meta>>(&out.stdout).unwrap(),
        listed
    );
    let out = guard.cli(&["list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("daemon not running")
            && stderr.contains(&format!("read {} directly", snapshots.path().display())),
        "{stderr}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), table);
}

#[test]
fn two_snapshot_requests_at_once_give_one_snapshot() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default());
    // Some data so the first request is still running when the second arrives.
    stack.psql(
        "CREATE TABLE filler AS SELECT md5(random()::text) AS h FROM generate_series(1, 300000)",
    );
    let snapshots = tempfile::tempdir().unwrap();
    let guard = guard_for(&stack, snapshots.path());
    let run = || {
        let config = guard.config_path.clone();
        std::thread::spawn(move || {
            let out = harness::guard::cli(&config, &["snapshot", "--json"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Meta>(&out.stdout).unwrap().id
        })
    };
    let (a, b) = (run(), run());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_eq!(a, b, "both callers get the one snapshot");
    assert_eq!(guard.list().len(), 1);
}

#[test]
fn only_root_may_take_a_snapshot() {
    if !docker_available() || nix::unistd::geteuid().as_raw() != 0 {
        return;
    }
    let stack = Stack::up(StackSpec::default());
    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(&stack, snapshots.path(), "");
    // Let the unprivileged user reach the socket at all, as control.group would.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&guard.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    for dir in [
        guard.dir.path().to_path_buf(),
        guard.socket.parent().unwrap().to_path_buf(),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&guard.config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    use std::os::unix::process::CommandExt;
    let as_nobody = |args: &[&str]| {
        Command::new(GUARD_BIN)
            .arg("--config")
            .arg(&guard.config_path)
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let status = as_nobody(&["status"]);
    assert!(
        status.status.success(),
        "read-only verbs are fine: {status:?}"
    );
    let out = as_nobody(&["snapshot"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied") && err.contains("root"),
        "{err}"
    );
    assert!(guard.list().is_empty());
}

#[test]
fn daemon_killed_mid_snapshot_leaves_a_partial_that_the_next_start_removes() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default());
    stack.psql(
        "CREATE TABLE filler AS SELECT md5(random()::text) AS h FROM generate_series(1, 1000000)",
    );
    let snapshots = tempfile::tempdir().unwrap();
    let mut guard = guard_for(&stack, snapshots.path());
    let config = guard.config_path.clone();
    let client = std::thread::spawn(move || harness::guard::cli(&config, &["snapshot"]));
    // Wait until the partial exists, then pull the plug.
    let start = std::time::Instant::now();
    let partial = loop {
        let found = std::fs::read_dir(snapshots.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(".partial-"));
        if let Some(p) = found {
            break p.path();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no partial appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    guard.kill();
    let out = client.join().unwrap();
    assert!(!out.status.success(), "the client sees the daemon go away");
    assert!(partial.exists(), "a killed daemon cannot clean up");

    let again = guard_for(&stack, snapshots.path());
    assert!(!partial.exists(), "removed at start");
    assert!(
        again.log().contains("removed an interrupted snapshot"),
        "{}",
        again.log()
    );
    assert!(again.list().is_empty(), "never listed");
}

/// Issue 18: a snapshot that seals counts, whatever the retention after it does. Two older
/// snapshots, `keep_last = 1`, the older one cannot be deleted (an immutable file in it):
/// `snapshot` exits 0, prints the seal and the warning, the other old snapshot goes, and
/// `status` shows the warning until a retention does its work.
#[test]
fn a_retention_that_fails_after_the_seal_is_a_warning_and_snapshot_exits_0() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default());
    let dir = tempfile::tempdir().unwrap();
    let snapshots = dir.path().join("snapshots");
    let stuck = harness::guard::snapshot_of(&stack, dir.path());
    let other = harness::guard::snapshot_of(&stack, dir.path());
    // The newest snapshot whose content check passed is kept whatever keep_last says.
    let checked = harness::guard::snapshot_of(&stack, dir.path());
    let Some(flag) = Immutable::set(&snapshots.join(&stuck.id).join("db.sql.zst"), &snapshots)
    else {
        return;
    };
    let guard = Guard::watching(&stack, &snapshots, "keep_last = 1\n");
    guard.wait_status("stack discovered", Duration::from_secs(30), |s| {
        s.state.stack.is_some()
    });
    guard.wait_all_checked(Duration::from_secs(60));

    let out = guard.cli(&["snapshot"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("sealed snapshot"), "{stdout}");
    assert!(stderr.contains("[5/5] sealed"), "{stderr}");
    assert!(
        stderr.contains(&format!("retention removed {}", other.id)),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "warning: retention could not delete 1 snapshot(s): {} (",
            stuck.id
        )) && stderr.contains("Operation not permitted"),
        "{stderr}"
    );
    let listed = guard.list();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        listed[0].id, checked.id,
        "the newest checked snapshot stays"
    );
    assert!(stdout.contains(&listed[1].id), "{stdout}");

    let status = guard.status();
    assert_eq!(
        status.state.last_snapshot.as_ref().unwrap().id,
        listed[1].id
    );
    assert_eq!(status.state.last_snapshot_error, None);
    let warning = status.state.retention_warning.clone().unwrap();
    assert!(warning.contains(&stuck.id), "{warning}");
    // Unsealed before its removal failed: a leftover partial, named, retried later.
    let leftover = snapshots.join(format!(".partial-deleting-{}", stuck.id));
    assert!(
        status
            .state
            .partials_left
            .iter()
            .any(|l| l.path == leftover),
        "{:?}",
        status.state.partials_left
    );
    let text = String::from_utf8_lossy(&guard.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("RETENTION WARNING") && text.contains(&stuck.id),
        "{text}"
    );
    let out = guard.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["retention_warning"]
            .as_str()
            .is_some_and(|w| w.contains(&stuck.id)),
        "{json}"
    );

    // Fixed: the next snapshot's retention does its work, the warning goes, and the leftover
    // is removed when that snapshot begins.
    flag.clear();
    stack.psql("CREATE TABLE after_the_fix (x int)");
    guard.wait_all_checked(Duration::from_secs(60));
    let out = guard.cli(&["snapshot"]);
    assert!(out.status.success(), "{out:?}");
    let s = guard.wait_status("the leftover removed", Duration::from_secs(30), |s| {
        s.state.partials_left.is_empty()
    });
    assert_eq!(s.state.retention_warning, None);
    assert!(!leftover.exists());
    // The new one, and the one before it as the newest checked; `checked` went.
    let ids: Vec<String> = guard.list().into_iter().map(|m| m.id).collect();
    assert_eq!(
        ids,
        [listed[1].id.clone(), s.state.last_snapshot.unwrap().id]
    );
}
