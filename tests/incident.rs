//! Crash loops (issue 5): a container of the stack that dies N times within W seconds while
//! Docker restarts it is halted (restart policy `no`, recorded, then stopped) after an incident
//! bundle has kept the logs and inspect output of every service; the diagnosis names the
//! category and the decision names the way out; `release <service>` gives the policy back.
//! Each case is a real crash of the stand-in server or of the real PostgreSQL.

mod harness;

use std::time::Duration;

use harness::compose::docker_ok;
use harness::docker_proxy::DockerProxy;
use harness::guard::Guard;
use harness::webhook::{bodies_once, webhook};
use harness::{Stack, StackSpec, docker_available, ensure_images};
use immich_guard::diagnose::{Category, Decision};
use immich_guard::incident::Incident;
use immich_guard::protect::ProtectState;
use immich_guard::status::StatusReport;

const LONG: Duration = Duration::from_secs(120);
/// Inside the server container: when this file (under the upload location) exists, its
/// content is the stand-in's crash mode.
const CRASH_FILE: &str = "/data/.standin-crash";

/// A stack under `restart: always` whose server boots in 300 ms and crashes once
/// `crash_from_now_on` says so.
fn crashable() -> StackSpec {
    StackSpec::default()
        .restart("always")
        .boot_delay_ms(300)
        .env("STANDIN_CRASH_FILE", CRASH_FILE)
}

/// A daemon watching `stack`, 3 deaths in 120 s make a loop; `extra` is more TOML.
fn guard_for(stack: &Stack, snapshots: &std::path::Path, extra: &str) -> Guard {
    Guard::watching(
        stack,
        snapshots,
        &format!("\n[crash_loop]\ndeaths = 3\nwindow_secs = 120\n{extra}"),
    )
}

fn wait_halted(guard: &Guard, containers: usize) -> StatusReport {
    guard.wait_status(&format!("{containers} halted"), LONG, |s| {
        s.state.protection.halted.len() >= containers && s.state.protection.incident.is_some()
    })
}

/// From now on the server crashes at every boot in `mode`.
fn crash_from_now_on(stack: &Stack, mode: &str) {
    std::fs::write(stack.upload.join(".standin-crash"), mode).unwrap();
}

fn policy(container: &str) -> String {
    docker_ok(&[
        "inspect",
        "-f",
        "{{.HostConfig.RestartPolicy.Name}}",
        container,
    ])
}

#[test]
fn a_server_crash_looping_at_boot_is_halted_with_an_incident_bundle() {
    if !docker_available() {
        return;
    }
    // Compose's own container names here (no container_name:); the others have Immich's.
    let stack = Stack::up(
        StackSpec::default()
            .compose_names()
            .restart("always")
            .no_wait()
            .boot_delay_ms(300)
            .env("STANDIN_CRASH", "boot")
            .env(
                "STANDIN_CRASH_MESSAGE",
                "Error: EACCES: permission denied, mkdir '/data/thumbs/u1'",
            ),
    );
    stack.wait_db_ready(Duration::from_secs(60));
    let snapshots = tempfile::tempdir().unwrap();
    let mut guard = guard_for(&stack, snapshots.path(), "");
    let s = wait_halted(&guard, 1);
    let p = s.state.protection;
    assert_eq!(p.state, ProtectState::Halted);
    let server = stack.container_name("immich-server");
    assert_eq!(p.halted[0].restart_policy, "always");
    assert_eq!(policy(&server), "no");
    let state = stack.state("immich-server").unwrap();
    assert_eq!(state.status, "exited", "{state:?}");

    let incident = p.incident.expect("an incident");
    assert_eq!(incident.service, "immich-server");
    assert!(
        incident
            .findings
            .iter()
            .any(|f| f.category == Category::Permissions && f.lines[0].contains("EACCES")),
        "{:?}",
        incident.findings
    );
    let dir = incident.dir.join(&incident.id);
    for file in [
        "incident.json",
        "guard.json",
        "logs/immich-server.log",
        "logs/database.log",
        "logs/redis.log",
        "logs/immich-machine-learning.log",
        "inspect/immich-server.json",
        "inspect/database.json",
        "config/.env",
        "config/docker-compose.yml",
    ] {
        assert!(
            dir.join(file).is_file(),
            "{file} missing in {}",
            dir.display()
        );
    }
    let log = std::fs::read_to_string(dir.join("logs/immich-server.log")).unwrap();
    assert!(log.contains("EACCES"), "{log}");
    // Timestamps kept.
    assert!(log.lines().next().unwrap().starts_with("20"), "{log}");

    let text = String::from_utf8_lossy(&guard.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("HALTED: immich-server") && text.contains("permissions"),
        "{text}"
    );

    let out = guard.cli(&["incident"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(&incident.id), "{text}");
    assert!(
        text.contains("recommended: fix forward") && text.contains("chown"),
        "{text}"
    );

    // Release gives the policy back and starts it.
    let out = guard.cli(&["release", "immich-server"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(policy(&server), "always");

    // With the daemon down, `incident` reads the bundle from the data dir: the same incident,
    // the same text, and a note on stderr that it did.
    let online = guard.cli(&["incident", "--json"]);
    let online_text = guard.cli(&["incident", &incident.id]).stdout;
    assert!(guard.terminate().success());
    let offline = guard.cli(&["incident", "--json"]);
    assert!(offline.status.success(), "{offline:?}");
    assert!(
        String::from_utf8_lossy(&offline.stderr).contains("daemon not running"),
        "{offline:?}"
    );
    let parsed: Incident = serde_json::from_slice(&offline.stdout).unwrap();
    assert_eq!(parsed.id, incident.id);
    assert_eq!(
        parsed,
        serde_json::from_slice::<Incident>(&online.stdout).unwrap()
    );
    let out = guard.cli(&["incident", &incident.id]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, online_text);
}

#[test]
fn a_half_applied_migration_then_crash_recommends_restoring_the_pre_update_snapshot() {
    if !docker_available() {
        return;
    }
    ensure_images(&["v1.119.0", "v1.120.0"]);
    let stack = Stack::up(StackSpec {
        version: "v1.119.0".into(),
        ..crashable()
    });
    let snapshots = tempfile::tempdir().unwrap();
    let guard = guard_for(&stack, snapshots.path(), "");
    guard.wait_status("a baseline", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    let s = guard.wait_status("the pre-update snapshot", LONG, |s| {
        s.state.last_snapshot.is_some()
    });
    let snapshot = s.state.last_snapshot.unwrap().id;

    // v1.120.0 applies the first of its two migrations, then fails on the second, at every boot.
    crash_from_now_on(&stack, "migration");
    stack.compose(&["up", "-d"]);
    let s = wait_halted(&guard, 1);
    let incident = s.state.protection.incident.unwrap();
    assert_eq!(incident.service, "immich-server");
    let applied = stack.applied_migrations();
    assert!(
        applied.iter().any(|m| m == "1731000000000-AddMemories"),
        "{applied:?}"
    );
    assert!(!applied.iter().any(|m| m == "1731000000001-AddMemoryAssets"));
    assert!(
        incident
            .findings
            .iter()
            .any(|f| f.category == Category::Migration && f.lines[0].contains("migrations failed")),
        "{:?}",
        incident.findings
    );
    match &incident.decision {
        Decision::Restore {
            snapshot: named,
            version,
            why,
            command,
            ..
        } => {
            assert_eq!(named, &snapshot);
            assert_eq!(version, "v1.119.0");
            assert!(why.contains("1731000000000-AddMemories"), "{why}");
            assert_eq!(command, &format!("immich-guard restore {snapshot}"));
        }
        other => panic!("expected restore, got {other:?}; log:\n{}", guard.log()),
    }
    assert_eq!(incident.baseline.as_deref(), Some("v1.119.0"));
    assert_eq!(incident.pending.as_deref(), Some("v1.119.0 → v1.120.0"));
    let text = String::from_utf8_lossy(&guard.cli(&["incident"]).stdout).into_owned();
    assert!(
        text.contains("recommended: restore")
            && text.contains(&format!("run: immich-guard restore {snapshot}"))
            && text.contains("pin v1.119.0"),
        "{text}"
    );
}

#[test]
fn a_database_refusing_to_start_is_halted_and_the_server_with_it() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default().restart("always").boot_delay_ms(300));
    let snapshots = tempfile::tempdir().unwrap();
    let (hook, received) = webhook();
    let guard = guard_for(
        &stack,
        snapshots.path(),
        &format!("\n[notify]\nwebhook_url = {hook:?}\n"),
    );
    guard.wait_status("the stack", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    // Data files of another PostgreSQL major version, as after an image change.
    let database = stack.container_name("database");
    docker_ok(&["stop", &database]);
    std::fs::write(stack.db_data.join("PG_VERSION"), "14\n").unwrap();
    docker_ok(&["start", &database]);

    let s = wait_halted(&guard, 2);
    let p = s.state.protection;
    let incident = p.incident.unwrap();
    assert_eq!(incident.service, "database");
    let halted: Vec<&str> = incident.halted.iter().map(|h| h.service.as_str()).collect();
    assert_eq!(halted, ["database", "immich-server"], "database first");
    assert!(incident.halted.iter().all(|h| h.restart_policy == "always"));
    let server = stack.container_name("immich-server");
    for container in [&database, &server] {
        assert_eq!(policy(container), "no", "{container}");
    }
    assert_eq!(stack.state("database").unwrap().status, "exited");
    assert_eq!(stack.state("immich-server").unwrap().status, "exited");
    assert!(
        incident
            .findings
            .iter()
            .any(|f| f.category == Category::DatabaseVersion
                && f.lines
                    .iter()
                    .any(|l| l.starts_with("database:") && l.contains("incompatible"))),
        "{:?}",
        incident.findings
    );
    assert!(
        matches!(&incident.decision, Decision::FixForward { hint, .. } if hint.contains("PostgreSQL major version")),
        "{:?}",
        incident.decision
    );
    // The admin is told, in words.
    let notice = bodies_once(&received, "crash-loop", Duration::from_secs(10))
        .into_iter()
        .find(|b| b["kind"] == "crash-loop")
        .expect("a crash-loop notification");
    let message = notice["message"].as_str().unwrap();
    assert!(
        message.contains("halted (database, immich-server)")
            && message.contains("database-version")
            && message.contains(&format!("immich-guard incident {}", incident.id)),
        "{message}"
    );

    // The admin fixes the files and starts the database by hand, then releases both: the
    // running database gets its policy back, the server starts on it.
    std::fs::write(stack.db_data.join("PG_VERSION"), "15\n").unwrap();
    docker_ok(&["start", &database]);
    stack.wait_db_ready(Duration::from_secs(60));
    for service in ["database", "immich-server"] {
        let out = guard.cli(&["release", service]);
        assert!(out.status.success(), "{out:?}");
    }
    for container in [&database, &server] {
        assert_eq!(policy(container), "always", "{container}");
    }
    stack.wait_server_ready(LONG).unwrap();
    let s = guard.wait_status("nothing halted", Duration::from_secs(10), |s| {
        s.state.protection.halted.is_empty()
    });
    assert_eq!(s.state.protection.state, ProtectState::Idle);
}

#[test]
fn a_container_that_restarts_twice_then_stays_up_is_not_halted() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(crashable().env("STANDIN_CRASH_TIMES", "2"));
    let snapshots = tempfile::tempdir().unwrap();
    let guard = guard_for(&stack, snapshots.path(), "");
    guard.wait_status("the stack", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    crash_from_now_on(&stack, "boot");
    // The admin's restart is a death Docker did not restart: it never counts. Then two
    // crashes at boot, then up.
    docker_ok(&["restart", &stack.container_name("immich-server")]);
    stack.wait_restarts("immich-server", 2, LONG);
    stack
        .wait_server_ready(LONG)
        .unwrap_or_else(|e| panic!("{e}; guard log:\n{}", guard.log()));
    // Long enough for a third death's event and a discovery pass to reach the daemon.
    std::thread::sleep(Duration::from_secs(3));
    let s = guard.status();
    assert!(
        s.state.protection.halted.is_empty(),
        "{:?}",
        s.state.protection.halted
    );
    assert!(s.state.protection.incident.is_none());
    let state = stack.state("immich-server").unwrap();
    assert_eq!((state.status.as_str(), state.restart_count), ("running", 2));
    assert_eq!(policy(&stack.container_name("immich-server")), "always");
    assert!(
        guard.log().contains("docker event"),
        "the daemon saw the deaths"
    );
}

#[test]
fn deaths_missed_while_docker_was_unreachable_are_counted_from_restart_count() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(crashable());
    let snapshots = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy_path = dir.path().join("docker.sock");
    let mut proxy = DockerProxy::start(&proxy_path);
    let guard = guard_for(
        &stack,
        snapshots.path(),
        &format!(
            "\n[docker]\nhost = \"unix://{}\"\nreconnect_min_ms = 100\nreconnect_max_ms = 300\n",
            proxy_path.display()
        ),
    );
    guard.wait_status("the stack", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    proxy.stop();
    guard.wait_status("Docker lost", Duration::from_secs(10), |s| {
        !s.state.docker.reachable
    });
    crash_from_now_on(&stack, "boot");
    docker_ok(&["restart", &stack.container_name("immich-server")]);
    stack.wait_restarts("immich-server", 4, LONG);
    assert!(guard.status().state.protection.halted.is_empty());

    let _proxy = DockerProxy::start(&proxy_path);
    let s = wait_halted(&guard, 1);
    let incident: Incident = s.state.protection.incident.unwrap();
    assert_eq!(incident.service, "immich-server");
    assert!(
        incident.missed_deaths >= 2,
        "deaths while disconnected come from RestartCount: {incident:?}"
    );
    assert_eq!(incident.halted[0].restart_policy, "always");
    assert_eq!(policy(&stack.container_name("immich-server")), "no");
    let text = String::from_utf8_lossy(&guard.cli(&["incident"]).stdout).into_owned();
    assert!(text.contains("came from Docker's restart count"), "{text}");
}

#[test]
fn a_server_looping_on_enotfound_is_diagnosed_by_the_databases_corruption() {
    if !docker_available() {
        return;
    }
    // The server gives up on an unreachable database after 1.5 s, as Immich does after its
    // retries: the loop is the server's, the cause is in the database's log.
    let stack = Stack::up(
        StackSpec::default()
            .restart("always")
            .boot_delay_ms(300)
            .env("STANDIN_DB_TIMEOUT_MS", "1500"),
    );
    let snapshots = tempfile::tempdir().unwrap();
    let guard = guard_for(&stack, snapshots.path(), "");
    guard.wait_status("the stack", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    let out = guard.cli(&["snapshot", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let snapshot = guard.status().state.last_snapshot.unwrap().id;

    // Damage inside the CRC-covered part of pg_control (past the version fields): real
    // PostgreSQL 15 refuses to start with "incorrect checksum in control file". Docker does
    // not restart the database (policy no), so it is not the one looping; the server's
    // DNS lookup of `database` fails from then on.
    let database = stack.container_name("database");
    docker_ok(&["stop", &database]);
    docker_ok(&["update", "--restart", "no", &database]);
    let control = stack.db_data.join("global/pg_control");
    let mut bytes = std::fs::read(&control).unwrap();
    for b in &mut bytes[64..72] {
        *b ^= 0xff;
    }
    std::fs::write(&control, &bytes).unwrap();
    let _ = std::process::Command::new("docker")
        .args(["start", &database])
        .output();
    let server = stack.container_name("immich-server");
    docker_ok(&["restart", &server]);

    let s = wait_halted(&guard, 1);
    let incident = s.state.protection.incident.unwrap();
    assert_eq!(incident.service, "immich-server");
    assert_eq!(
        incident.cause,
        Category::DatabaseCorruption,
        "{:#?}\nguard log:\n{}",
        incident.findings,
        guard.log()
    );
    let corruption = &incident.findings[0];
    assert!(
        corruption
            .lines
            .iter()
            .any(|l| l.starts_with("database:") && l.contains("incorrect checksum in control file")),
        "{corruption:?}"
    );
    let symptom = incident
        .findings
        .iter()
        .find(|f| f.category == Category::DatabaseUnreachable)
        .expect("the server's symptom is kept as a finding");
    assert!(
        symptom.lines[0].starts_with("immich-server:"),
        "{symptom:?}"
    );
    assert!(
        incident.notes.iter().any(|n| n.contains("is a symptom")),
        "{:?}",
        incident.notes
    );
    match &incident.decision {
        Decision::Restore {
            snapshot: named,
            command,
            why,
            ..
        } => {
            assert_eq!(named, &snapshot);
            assert_eq!(command, &format!("immich-guard restore {snapshot}"));
            assert!(why.contains("incorrect checksum in control file"), "{why}");
        }
        other => panic!("expected restore, got {other:?}\nlog:\n{}", guard.log()),
    }
    let text = String::from_utf8_lossy(&guard.cli(&["incident"]).stdout).into_owned();
    assert!(
        text.contains("cause: database-corruption")
            && text.contains(&format!("run: immich-guard restore {snapshot}")),
        "{text}"
    );
    // The stack is the harness's to clean up; the database it leaves is the damaged one.
}
