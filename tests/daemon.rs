//! The daemon as a process: systemd notify protocol, the control socket under bad input,
//! config errors and the CLI. These need no Docker: the daemon is pointed at a Docker socket
//! that does not exist, which is itself a state it must handle.

mod harness;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use harness::guard::{Guard, GuardOptions, cli};
use immich_guard::control::{MAX_REQUEST_BYTES, Response};
use immich_guard::status::StatusReport;

const NO_DOCKER: &str = "[docker]\nhost = \"unix:///nonexistent/immich-guard-test/docker.sock\"\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n";

fn start_without_docker() -> Guard {
    let guard = Guard::start(GuardOptions {
        extra_toml: NO_DOCKER,
        ..Default::default()
    });
    guard.wait_socket(Duration::from_secs(10));
    guard
}

fn error_message(line: &str) -> String {
    match serde_json::from_str::<Response>(line) {
        Ok(Response::Error { message }) => message,
        other => panic!("expected an error response, got {line:?} ({other:?})"),
    }
}

/// Receives datagrams until `until` matches one, returning all seen.
fn receive_until(
    sock: &UnixDatagram,
    timeout: Duration,
    until: impl Fn(&str) -> bool,
) -> Vec<String> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while start.elapsed() < timeout {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = until(&msg);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("timed out after {timeout:?}; received {seen:?}");
}

#[test]
fn systemd_gets_ready_watchdog_status_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut guard = Guard::start(GuardOptions {
        extra_toml: NO_DOCKER,
        env: vec![
            ("NOTIFY_SOCKET", notify_path.display().to_string()),
            ("WATCHDOG_USEC", "200000".to_string()),
        ],
    });

    let seen = receive_until(&notify, Duration::from_secs(15), |m| m.contains("READY=1"));
    let ready = seen.last().unwrap();
    assert!(
        ready.contains("STATUS=waiting for Docker: no Docker socket"),
        "READY should say why there is no stack yet: {ready:?}"
    );
    // READY comes only once the socket listens.
    assert!(std::os::unix::net::UnixStream::connect(&guard.socket).is_ok());

    // WATCHDOG_USEC=200ms: a ping every 100 ms.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(800) {
        let seen = receive_until(&notify, Duration::from_secs(2), |m| {
            m.contains("WATCHDOG=1")
        });
        pings += seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    }
    assert!(
        pings >= 4,
        "expected a ping every 100 ms, got {pings} in 800 ms"
    );

    let status = guard.terminate();
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status:?}\n{}",
        guard.log()
    );
    let seen = receive_until(&notify, Duration::from_secs(2), |m| {
        m.contains("STOPPING=1")
    });
    assert!(seen.last().unwrap().contains("STOPPING=1"));
    assert!(!guard.socket.exists(), "socket removed on clean exit");
}

#[test]
fn status_says_docker_is_unreachable_and_why() {
    let guard = start_without_docker();
    let report = guard.wait_status("a docker error", Duration::from_secs(10), |s| {
        s.state.docker.error.is_some()
    });
    assert!(!report.state.docker.reachable);
    assert!(report.state.stack.is_none());
    assert!(
        report.status_line.starts_with("waiting for Docker"),
        "{}",
        report.status_line
    );
    assert_eq!(report.daemon_version, env!("CARGO_PKG_VERSION"));

    let out = guard.cli(&["status"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("docker: UNREACHABLE"), "{text}");
    assert!(
        text.contains("/nonexistent/immich-guard-test/docker.sock"),
        "{text}"
    );

    let out = guard.cli(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let parsed: StatusReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(parsed.pid, report.pid);
}

#[test]
fn bad_requests_get_error_answers_and_the_daemon_keeps_serving() {
    let guard = start_without_docker();

    // A client that connects and says nothing must not block anyone.
    let _silent = std::os::unix::net::UnixStream::connect(&guard.socket).unwrap();

    let huge = vec![b'a'; MAX_REQUEST_BYTES + 6 * 1024];
    let e = error_message(&guard.raw(&huge));
    assert!(
        e.contains("too large") && e.contains(&MAX_REQUEST_BYTES.to_string()),
        "{e}"
    );

    let e = error_message(&guard.raw(b"{\"verb\":\"st\xffatus\"}\n"));
    assert!(e.contains("UTF-8"), "{e}");

    let e = error_message(&guard.raw(b"{\"verb\": status}\n"));
    assert!(e.contains("malformed JSON"), "{e}");

    let e = error_message(&guard.raw(b"{\"verb\":\"format_disk\"}\n"));
    assert!(e.contains("unknown verb \"format_disk\""), "{e}");

    let e = error_message(&guard.raw(b"\"status\"\n"));
    assert!(e.contains("\"verb\""), "{e}");

    // A request exactly at the limit is read and judged on its content.
    let mut padded = b"{\"verb\":\"status\",\"pad\":\"".to_vec();
    padded.resize(MAX_REQUEST_BYTES - 2, b'x');
    padded.extend_from_slice(b"\"}\n");
    let e = error_message(&guard.raw(&padded));
    assert!(e.contains("bad status request"), "{e}");

    // After a bad line, the same connection still answers the next request.
    let mut stream = std::os::unix::net::UnixStream::connect(&guard.socket).unwrap();
    use std::io::{BufRead, BufReader, Write};
    stream
        .write_all(b"not json\n{\"verb\":\"status\"}\n")
        .unwrap();
    let mut reader = BufReader::new(&stream);
    let mut first = String::new();
    let mut second = String::new();
    reader.read_line(&mut first).unwrap();
    reader.read_line(&mut second).unwrap();
    assert!(error_message(&first).contains("malformed"));
    assert!(matches!(
        serde_json::from_str::<Response>(&second).unwrap(),
        Response::Status(_)
    ));

    // And the daemon as a whole is fine.
    assert_eq!(guard.status().pid, guard.status().pid);
}

#[test]
fn status_without_a_daemon_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[control]\nsocket = {:?}\n",
            dir.path().join("guard.sock").display().to_string()
        ),
    )
    .unwrap();
    let out = cli(&config, &["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("daemon is not running"), "{err}");
    assert!(err.contains("guard.sock"), "{err}");

    // A stale socket file from a crashed daemon reads the same way.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("guard.sock")).unwrap());
    let out = cli(&config, &["status", "--json"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("not running")
    );
}

#[test]
fn bad_config_stops_the_daemon_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("guard.sock");
    for (body, must_name) in [
        (
            "[crash_loop]\nwindow_secs = 0\n",
            vec!["crash_loop.window_secs", "= 0"],
        ),
        (
            "[snapshots]\ndir = \"snaps\"\n",
            vec!["snapshots.dir", "\"snaps\"", "absolute"],
        ),
        ("[stack]\nprojet = \"immich\"\n", vec!["projet", "line 5"]),
        (
            "[docker]\nreconnect_min_ms = \"fast\"\n",
            vec!["reconnect_min_ms", "fast"],
        ),
    ] {
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[control]\nsocket = {:?}\n\n{body}",
                socket.display().to_string()
            ),
        )
        .unwrap();
        let out = cli(&config, &["run"]);
        assert!(!out.status.success(), "{body}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains(&config.display().to_string()),
            "names the file: {err}"
        );
        for needle in must_name {
            assert!(
                err.contains(needle),
                "{body:?} should name {needle:?}: {err}"
            );
        }
        assert!(!socket.exists(), "nothing started for {body:?}");
    }
    let out = cli(&dir.path().join("missing.toml"), &["run"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("missing.toml")
    );
}

#[test]
fn second_daemon_on_the_same_socket_is_refused() {
    let guard = start_without_docker();
    let out = guard.cli(&["run"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    // Refused by the data dir's lock before it reaches the socket (tests/check_config.rs).
    let pid = guard.status().pid;
    assert!(
        err.contains(&format!("(pid {pid}) is already running")),
        "{err}"
    );
    // The first daemon is unharmed.
    guard.status();
}

#[test]
fn socket_mode_is_owner_only_without_a_group() {
    use std::os::unix::fs::PermissionsExt;
    let guard = start_without_docker();
    let mode = std::fs::metadata(&guard.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn json_logs_are_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[control]\nsocket = {:?}\n\n[daemon]\ndata_dir = {:?}\nlog_format = \"json\"\n\n{NO_DOCKER}",
            dir.path().join("g.sock").display().to_string(),
            // Never the host's /var/lib/immich-guard (an installed daemon holds its lock).
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let child = std::process::Command::new(harness::guard::GUARD_BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !dir.path().join("g.sock").exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    assert!(text.contains("SIGINT: stopping"), "{text}");
}
