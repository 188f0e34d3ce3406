//! `check-config` checks what `run` checks, the real binary on real files: every config that
//! `run` refuses, `check-config` refuses first with the same message naming file, key and
//! value; one daemon per data dir and per socket (the flock'd `daemon.pid`); `list` and
//! `incident` read the data dir when no daemon listens. No Docker needed.

mod harness;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::guard::{GUARD_BIN, Guard, GuardOptions, cli};

const NO_DOCKER: &str = "[docker]\nhost = \"unix:///nonexistent/immich-guard-test/docker.sock\"\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n";

/// `run` on `config`, which must give up by itself; killed (and the test failed) if it is
/// still running after 10 s.
fn run_refused(config: &Path) -> Output {
    let mut child = Command::new(GUARD_BIN)
        .arg("--config")
        .arg(config)
        .arg("run")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            child.kill().ok();
            let out = child.wait_with_output().unwrap();
            panic!(
                "`run` did not stop for {}:\n{}",
                config.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn configs_run_refuses_are_refused_by_check_config_naming_file_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let sock_dir = dir.path().join("sock-dir");
    std::fs::create_dir(&sock_dir).unwrap();
    let not_a_socket = dir.path().join("docker.txt");
    std::fs::write(&not_a_socket, "not docker").unwrap();
    std::os::unix::fs::symlink("/proc/self", dir.path().join("into-proc")).unwrap();
    // The control socket of the cases that do not set one: in the temp dir, never created.
    let socket = dir.path().join("run/guard.sock");
    let cases: Vec<(String, &str, String)> = vec![
        (
            format!(
                "[control]\nsocket = {:?}\ngroup = \"no-such-group-immich-guard\"\n",
                socket.display().to_string()
            ),
            "control.group",
            "\"no-such-group-immich-guard\": no such group".into(),
        ),
        (
            format!("[control]\nsocket = {:?}\n", sock_dir.display().to_string()),
            "control.socket",
            format!(
                "{:?}: a directory is in the way",
                sock_dir.display().to_string()
            ),
        ),
        (
            "[daemon]\ndata_dir = \"/proc/immich-guard\"\n".into(),
            "daemon.data_dir",
            "\"/proc/immich-guard\": is under /proc".into(),
        ),
        (
            "[daemon]\ndata_dir = \"/sys/immich-guard\"\n".into(),
            "daemon.data_dir",
            "\"/sys/immich-guard\": is under /sys".into(),
        ),
        (
            format!("[daemon]\ndata_dir = \"{d}/into-proc/guard\"\n"),
            "daemon.data_dir",
            "kernel pseudo-filesystem".into(),
        ),
        (
            "[snapshots]\ndir = \"/srv/snap\\u0000shots\"\n".into(),
            "snapshots.dir",
            "\"/srv/snap\\0shots\": must not contain a NUL byte".into(),
        ),
        (
            "[stack]\nupload_location = \"/srv/up\\u0000load\"\n".into(),
            "stack.upload_location",
            "must not contain a NUL byte".into(),
        ),
        (
            "[docker]\nhost = \"ssh://root@docker.lan\"\n".into(),
            "docker.host",
            "\"ssh://root@docker.lan\": must start with unix://, tcp:// or http://".into(),
        ),
        (
            format!("[docker]\nhost = \"unix://{}\"\n", not_a_socket.display()),
            "docker.host",
            "exists but is not a socket".into(),
        ),
    ];
    for (i, (body, key, detail)) in cases.iter().enumerate() {
        let data = dir.path().join(format!("data-{i}"));
        let config = dir.path().join(format!("config-{i}.toml"));
        // Socket and data dir in the temp dir, unless the case's own table sets them (TOML
        // allows a table once).
        let mut text = String::new();
        if !body.contains("[control]") {
            text += &format!("[control]\nsocket = {:?}\n", socket.display().to_string());
        }
        if !body.contains("[daemon]") {
            text += &format!("[daemon]\ndata_dir = {:?}\n", data.display().to_string());
        }
        text += body;
        std::fs::write(&config, &text).unwrap();

        let checked = cli(&config, &["check-config"]);
        let check_err = String::from_utf8_lossy(&checked.stderr).to_string();
        assert!(!checked.status.success(), "check-config passed {text:?}");
        let expected = format!("config file {}: {key} = ", config.display());
        assert!(check_err.contains(&expected), "{text:?}: {check_err}");
        assert!(check_err.contains(detail.as_str()), "{text:?}: {check_err}");
        assert!(
            checked.stdout.is_empty(),
            "no settings printed for a refused file"
        );

        let ran = run_refused(&config);
        let run_err = String::from_utf8_lossy(&ran.stderr).to_string();
        assert!(!ran.status.success(), "run started on {text:?}");
        // The same message, from the same check.
        let message = check_err.lines().last().unwrap();
        assert!(run_err.contains(message), "{text:?}:\n{run_err}");
        assert!(!socket.exists() && !data.exists(), "nothing started");
    }
}

#[test]
fn a_missing_docker_socket_is_a_warning_from_check_config_and_a_state_in_run() {
    let guard = Guard::start(GuardOptions {
        extra_toml: NO_DOCKER,
        ..Default::default()
    });
    let out = guard.cli(&["check-config"]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning: config file"), "{err}");
    assert!(
        err.contains(
            "docker.host = \"unix:///nonexistent/immich-guard-test/docker.sock\": no socket at"
        ),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(": OK"),
        "{out:?}"
    );
    // The daemon runs and waits for Docker.
    guard.wait_socket(Duration::from_secs(10));
    let status = guard.status();
    assert!(!status.state.docker.reachable);
    assert!(
        guard.log().contains("will wait for Docker"),
        "{}",
        guard.log()
    );
}

/// A second config beside the guard's: the same socket and data dir unless replaced.
fn second_config(guard: &Guard, name: &str, replace: Option<(&Path, &Path)>) -> std::path::PathBuf {
    let mut text = std::fs::read_to_string(&guard.config_path).unwrap();
    if let Some((from, to)) = replace {
        text = text.replace(
            &format!("{:?}", from.display().to_string()),
            &format!("{:?}", to.display().to_string()),
        );
    }
    let path = guard.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_second_daemon_on_the_same_data_dir_or_socket_refuses_naming_the_first_pid() {
    let guard = Guard::start(GuardOptions {
        extra_toml: NO_DOCKER,
        ..Default::default()
    });
    guard.wait_socket(Duration::from_secs(10));
    let first = guard.status().pid;
    let data = guard.dir.path().join("data");
    let pid_file = data.join("daemon.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{first}\n")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&pid_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Held, as install.sh checks it: `flock -n` fails while the daemon runs.
    let flock = Command::new("flock")
        .args(["-n", &pid_file.display().to_string(), "true"])
        .status();
    if let Ok(flock) = flock {
        assert!(!flock.success(), "flock -n got the daemon's lock");
    }

    // Same data dir, another socket.
    let other_socket = guard.dir.path().join("run/other.sock");
    let config = second_config(
        &guard,
        "same-data.toml",
        Some((&guard.socket, &other_socket)),
    );
    let out = run_refused(&config);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "daemon.data_dir = {:?}: another immich-guard daemon (pid {first}) is already running",
            data.display().to_string()
        )),
        "{err}"
    );
    assert!(!other_socket.exists(), "the refused daemon bound nothing");

    // Same socket, another data dir.
    let other_data = guard.dir.path().join("other-data");
    let config = second_config(&guard, "same-socket.toml", Some((&data, &other_data)));
    let out = run_refused(&config);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "control.socket = {:?}: another immich-guard daemon (pid {first})",
            guard.socket.display().to_string()
        )),
        "{err}"
    );
    assert!(
        !other_data.join("snapshots").exists(),
        "the refused daemon opened no store"
    );

    // The first is unharmed: same pid on the socket and in its pid file.
    assert_eq!(guard.status().pid, first);
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{first}\n")
    );
}

#[test]
fn after_the_daemon_stops_the_next_one_takes_the_lock() {
    let mut guard = Guard::start(GuardOptions {
        extra_toml: NO_DOCKER,
        ..Default::default()
    });
    guard.wait_socket(Duration::from_secs(10));
    let first = guard.status().pid;
    // A SIGKILL leaves the pid file behind; the kernel dropped the lock with the process.
    guard.kill();
    let guard = guard.restart();
    let second = guard.status().pid;
    assert_ne!(first, second);
    assert_eq!(
        std::fs::read_to_string(guard.dir.path().join("data/daemon.pid")).unwrap(),
        format!("{second}\n")
    );
}

#[test]
fn list_and_incident_without_a_daemon_read_the_data_dir_and_say_so() {
    let mut guard = Guard::start(GuardOptions {
        extra_toml: NO_DOCKER,
        ..Default::default()
    });
    guard.wait_socket(Duration::from_secs(10));
    // Through the daemon: nothing said on stderr.
    let out = guard.cli(&["list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    assert!(guard.terminate().success());

    let data = guard.dir.path().join("data");
    let out = guard.cli(&["list"]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "daemon not running (no socket at {})",
            guard.socket.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "read {} directly",
            data.join("snapshots").display()
        )),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no sealed snapshots yet"));

    // --json: the same JSON on stdout, the note on stderr only.
    let out = guard.cli(&["list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("daemon not running"));

    // A stale socket (a crashed daemon) reads as "refused".
    drop(std::os::unix::net::UnixListener::bind(&guard.socket).unwrap());
    let out = guard.cli(&["incident"]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "daemon not running (connect to {} refused); read {} directly",
            guard.socket.display(),
            data.join("incidents").display()
        )),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no incidents"));
    let out = guard.cli(&["incident", "20261125T022301Z-immich-server"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no incident 20261125T022301Z-immich-server in"),
        "{out:?}"
    );

    // Any other socket trouble is an error, not a silent read of the disk.
    let under_a_file = guard.config_path.join("guard.sock");
    let out = guard.cli(&["--socket", &under_a_file.display().to_string(), "list"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Not a directory") && !err.contains("read "),
        "{err}"
    );
}

#[test]
fn a_data_dir_the_user_may_not_read_is_an_error_not_an_empty_list() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root to run the CLI as another user");
        return;
    }
    // World-readable down to the data dir, which is root's alone, as the daemon keeps it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("snapshots")).unwrap();
    std::fs::create_dir_all(data.join("incidents")).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[control]\nsocket = {:?}\n[daemon]\ndata_dir = {:?}\n",
            dir.path().join("guard.sock").display().to_string(),
            data.display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (verb, what) in [("list", "snapshots"), ("incident", "incidents")] {
        let out = Command::new(GUARD_BIN)
            .arg("--config")
            .arg(&config)
            .arg(verb)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{verb} as nobody: {out:?}");
        assert!(
            err.contains(&format!(
                "cannot read the {what} in {}",
                data.join(what).display()
            )) && err.contains("Permission denied"),
            "{verb}: {err}"
        );
        assert!(out.stdout.is_empty(), "{verb}: {out:?}");
    }
}
