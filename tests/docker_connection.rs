//! The daemon keeps working while Docker is away: at start, and when the engine goes away
//! later. "Docker" here is the real engine behind a socket proxy the test starts and stops.

mod harness;

use std::time::Duration;

use harness::docker_available;
use harness::docker_proxy::DockerProxy;
use harness::guard::{Guard, GuardOptions};

#[test]
fn docker_unreachable_at_start_then_available_then_gone_then_back() {
    if !docker_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let proxy_path = dir.path().join("docker.sock");
    let guard = Guard::start(GuardOptions {
        extra_toml: &format!(
            "[docker]\nhost = \"unix://{}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n",
            proxy_path.display()
        ),
        ..Default::default()
    });
    guard.wait_socket(Duration::from_secs(10));
    let s = guard.wait_status("no Docker socket", Duration::from_secs(10), |s| {
        s.state
            .docker
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no Docker socket"))
    });
    assert!(!s.state.docker.reachable);

    let mut proxy = DockerProxy::start(&proxy_path);
    let s = guard.wait_status("Docker reachable", Duration::from_secs(10), |s| {
        s.state.docker.reachable && s.state.discovered_at.is_some()
    });
    assert!(s.state.docker.api_version.is_some());
    assert!(s.state.docker.error.is_none());
    // Discovery ran: either a stack or a reason why not.
    assert!(s.state.stack.is_some() || s.state.discovery_error.is_some());

    proxy.stop();
    let s = guard.wait_status("Docker lost", Duration::from_secs(10), |s| {
        !s.state.docker.reachable
    });
    assert!(
        s.status_line.starts_with("waiting for Docker"),
        "{}",
        s.status_line
    );
    assert!(
        guard.log().contains("lost Docker connection"),
        "{}",
        guard.log()
    );

    let _proxy = DockerProxy::start(&proxy_path);
    guard.wait_status("Docker back", Duration::from_secs(10), |s| {
        s.state.docker.reachable
    });
}
