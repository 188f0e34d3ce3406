//! Crash loops (issue 5, first part): a container of the stack that dies N times within W
//! seconds while Docker restarts it is halted (restart policy `no`, recorded, then stopped)
//! after an incident bundle has kept the logs and inspect output of every service; the
//! diagnosis names the category; `release <service>` gives the policy back.

mod harness;

use std::time::Duration;

use harness::compose::docker_ok;
use harness::guard::{Guard, GuardOptions};
use harness::{Stack, StackSpec, docker_available};
use immich_guard::diagnose::Category;
use immich_guard::protect::ProtectState;

#[test]
fn a_server_crash_looping_at_boot_is_halted_with_an_incident_bundle() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(
        StackSpec::default()
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
    let guard = Guard::start(GuardOptions {
        extra_toml: &format!(
            "[stack]\nproject = {:?}\n\n[snapshots]\ndir = {:?}\n\n[crash_loop]\ndeaths = 3\nwindow_secs = 120\n",
            stack.project,
            snapshots.path().display().to_string()
        ),
        ..Default::default()
    });
    guard.wait_socket(Duration::from_secs(10));
    let s = guard.wait_status("a halt", Duration::from_secs(90), |s| {
        !s.state.protection.halted.is_empty()
    });
    let p = s.state.protection;
    assert_eq!(p.state, ProtectState::Halted);
    let server = stack.container_name("immich-server");
    assert_eq!(p.halted[0].restart_policy, "always");
    assert_eq!(
        docker_ok(&[
            "inspect",
            "-f",
            "{{.HostConfig.RestartPolicy.Name}}",
            &server
        ]),
        "no"
    );
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
        text.contains("HALTED: immich-server") && text.contains("Permissions"),
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
    assert_eq!(
        docker_ok(&[
            "inspect",
            "-f",
            "{{.HostConfig.RestartPolicy.Name}}",
            &server
        ]),
        "always"
    );
}
