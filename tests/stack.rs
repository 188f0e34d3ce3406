//! Discovery and the daemon against a real Immich-shaped compose stack: real Docker, real
//! PostgreSQL, the stand-in server. Tests that need to be the only Immich stack on the host
//! (zero config, two stacks) take the stack lock exclusively; the others share it. On an
//! engine with another Immich stack (an admin's, a parallel test run's) those two skip with a
//! line saying so; under CI=true a stack left over by the harness fails them.

mod harness;

use std::path::Path;
use std::process::Command;
use std::sync::RwLock;
use std::time::Duration;

use harness::guard::{GUARD_BIN, Guard, GuardOptions};
use harness::{Stack, StackSpec};
use immich_guard::discover::Stack as Discovered;

/// Held shared by tests with a configured project, exclusively by zero-config tests.
static STACKS: RwLock<()> = RwLock::new(());

fn discover(config_toml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_toml).unwrap();
    Command::new(GUARD_BIN)
        .arg("--config")
        .arg(&config)
        .args(["discover", "--json"])
        .output()
        .unwrap()
}

fn discovered(out: &std::process::Output) -> Discovered {
    assert!(
        out.status.success(),
        "discover failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Zero-config discovery; `None` (the test skips) when another Immich stack turned up on the
/// engine meanwhile, which discovery would have seen too.
fn discover_alone(test: &str) -> Option<std::process::Output> {
    let out = discover("");
    (!harness::host::foreign_stack_present(test)).then_some(out)
}

fn docker_inspect(what: &str, format: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "--format", format, what])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn project_config(stack: &Stack) -> String {
    format!("[stack]\nproject = {:?}\n", stack.project)
}

#[test]
fn stock_shaped_stack_is_discovered_with_zero_config() {
    const TEST: &str = "stock_shaped_stack_is_discovered_with_zero_config";
    if !harness::docker_available_and_alone(TEST) {
        return;
    }
    let _only = STACKS.write().unwrap_or_else(|e| e.into_inner());
    let stack = Stack::up(StackSpec::default());

    let Some(out) = discover_alone(TEST) else {
        return;
    };
    let found = discovered(&out);
    assert_eq!(found.project, stack.project);
    let server = found.server.as_ref().expect("server found");
    assert_eq!(server.container_name, stack.container_name("immich-server"));
    assert_eq!(server.service, "immich-server");
    assert_eq!(server.restart_policy, "always");
    assert_eq!(
        found.database.as_ref().unwrap().container_name,
        stack.container_name("database")
    );
    assert_eq!(
        found.redis.as_ref().unwrap().container_name,
        stack.container_name("redis")
    );
    assert_eq!(
        found.machine_learning.as_ref().unwrap().container_name,
        stack.container_name("immich-machine-learning")
    );
    assert_eq!(found.compose_dir.as_deref(), Some(stack.dir.as_path()));
    assert!(
        found
            .compose_files
            .iter()
            .any(|f| same_file(f, &stack.compose_file)),
        "{:?} should hold {}",
        found.compose_files,
        stack.compose_file.display()
    );
    assert_eq!(found.env_file.as_deref(), Some(stack.env_file.as_path()));
    assert_eq!(found.env_version.as_deref(), Some("v1.119.0"));
    assert_eq!(
        found.upload_location.as_deref(),
        Some(stack.upload.as_path())
    );
    assert_eq!(found.upload_mount.as_deref(), Some("/data"));
    assert_eq!(
        found.db_data_location.as_deref(),
        Some(stack.db_data.as_path())
    );

    let db = found.db.as_ref().unwrap();
    assert_eq!(db.user, stack.db_user);
    assert_eq!(db.database, stack.db_name);
    assert!(db.password_known);
    let db_ip = docker_inspect(
        &stack.container_id("database"),
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    assert_eq!(db.host.as_deref(), Some(db_ip.as_str()));

    let version = found.version.as_ref().unwrap();
    assert_eq!(version.tag.as_deref(), Some("v1.119.0"));
    assert_eq!(version.label.as_deref(), Some("v1.119.0"));
    assert_eq!(version.name(), "v1.119.0");
    assert_eq!(
        version.image_id,
        docker_inspect(&stack.container_id("immich-server"), "{{.Image}}")
    );
    assert!(
        found.notes.is_empty(),
        "nothing should be missing: {:?}",
        found.notes
    );

    // The password never leaves the process in output.
    let out = discover("");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&stack.db_password));

    let human = Command::new(GUARD_BIN)
        .args(["--config", "/nonexistent.toml"])
        .arg("discover")
        .output()
        .unwrap();
    // An explicit missing config is an error, before Docker is touched.
    assert!(!human.status.success());
    assert!(String::from_utf8_lossy(&human.stderr).contains("/nonexistent.toml"));
}

fn same_file(a: &Path, b: &Path) -> bool {
    a.canonicalize().ok() == b.canonicalize().ok()
}

#[test]
fn two_stacks_need_stack_project_and_it_chooses() {
    const TEST: &str = "two_stacks_need_stack_project_and_it_chooses";
    if !harness::docker_available_and_alone(TEST) {
        return;
    }
    let _only = STACKS.write().unwrap_or_else(|e| e.into_inner());
    let a = Stack::up(StackSpec::default());
    let b = Stack::up(StackSpec {
        version: "v1.120.0".into(),
        ..StackSpec::default()
    });

    let Some(out) = discover_alone(TEST) else {
        return;
    };
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("found 2 Immich stacks"), "{err}");
    assert!(
        err.contains(&a.project) && err.contains(&b.project),
        "{err}"
    );
    assert!(err.contains("stack.project"), "{err}");

    let found = discovered(&discover(&project_config(&b)));
    assert_eq!(found.project, b.project);
    assert_eq!(found.version.unwrap().name(), "v1.120.0");

    let out = discover("[stack]\nproject = \"no-such-project\"\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"no-such-project\"") && err.contains(&a.project),
        "{err}"
    );
}

#[test]
fn daemon_shows_the_stack_and_follows_a_recreate_to_a_new_version() {
    if !harness::docker_available() {
        return;
    }
    let _shared = STACKS.read().unwrap_or_else(|e| e.into_inner());
    // Compose's own container names (no container_name:), as many admins' files have.
    let stack = Stack::up(StackSpec::default().compose_names());
    let guard = Guard::start(GuardOptions {
        extra_toml: &project_config(&stack),
        ..Default::default()
    });
    guard.wait_socket(Duration::from_secs(10));
    let first = guard.wait_status("stack discovered", Duration::from_secs(20), |s| {
        s.state.stack.is_some()
    });
    let discovered = first.state.stack.as_ref().unwrap();
    assert_eq!(discovered.project, stack.project);
    assert_eq!(discovered.version.as_ref().unwrap().name(), "v1.119.0");
    assert!(first.state.docker.reachable);
    assert!(
        first.status_line.contains(&stack.project),
        "{}",
        first.status_line
    );
    let server = discovered.server.as_ref().unwrap();
    // Compose's naming of this generation: `<project>-immich-server-1` or `…_immich-server_1`.
    assert_eq!(server.container_name, stack.container_name("immich-server"));
    let compose_style = [
        format!("{}-immich-server-1", stack.project),
        format!("{}_immich-server_1", stack.project),
    ];
    assert!(
        compose_style.contains(&server.container_name),
        "{}",
        server.container_name
    );
    assert_eq!(
        discovered.compose_dir.as_deref(),
        Some(stack.dir.as_path()),
        "from com.docker.compose.project.working_dir"
    );
    let old_server = server.container_id.clone();

    let out = guard.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(&format!("Immich stack: {}", stack.project)),
        "{text}"
    );
    assert!(text.contains("v1.119.0"), "{text}");

    // An upgrade the admin's way: pull (here: the locally built image), edit .env, up -d.
    // The server container is recreated.
    harness::images::ensure_images(&["v1.120.0"]);
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    stack.compose(&["up", "-d"]);
    let after = guard.wait_status("the new version", Duration::from_secs(60), |s| {
        s.state
            .stack
            .as_ref()
            .and_then(|st| st.version.as_ref())
            .is_some_and(|v| v.name() == "v1.120.0")
    });
    let st = after.state.stack.as_ref().unwrap();
    assert_ne!(st.server.as_ref().unwrap().container_id, old_server);
    assert_eq!(st.env_version.as_deref(), Some("v1.120.0"));
    let event = after.state.last_event.as_ref().expect("events were seen");
    assert!(
        ["container", "image"].contains(&event.kind.as_str()),
        "{event:?}"
    );
}

#[test]
fn daemon_says_why_there_is_no_stack() {
    if !harness::docker_available() {
        return;
    }
    let guard = Guard::start(GuardOptions {
        extra_toml: "[stack]\nproject = \"immich-guard-test-absent\"\n",
        ..Default::default()
    });
    guard.wait_socket(Duration::from_secs(10));
    let s = guard.wait_status("a discovery error", Duration::from_secs(20), |s| {
        s.state.discovery_error.is_some()
    });
    let e = s.state.discovery_error.unwrap();
    assert!(
        e.contains("immich-guard-test-absent") && e.contains("not running here"),
        "{e}"
    );
    assert!(
        s.status_line.starts_with("no stack to protect"),
        "{}",
        s.status_line
    );
}

#[test]
fn discover_without_docker_access_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[docker]\nhost = \"unix:///nonexistent/immich-guard/docker.sock\"\n",
    )
    .unwrap();
    let out = Command::new(GUARD_BIN)
        .arg("--config")
        .arg(&config)
        .arg("discover")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no Docker socket at /nonexistent/immich-guard/docker.sock"),
        "{err}"
    );

    // As an unprivileged user the engine's socket (root:docker 0660) is off limits.
    let socket = Path::new("/var/run/docker.sock");
    if !socket.exists() || nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipping the permission half: needs root and a Docker socket");
        return;
    }
    use std::os::unix::process::CommandExt;
    let out = Command::new(GUARD_BIN)
        .arg("discover")
        .env_remove("DOCKER_HOST")
        .env_remove("IMMICH_GUARD_CONFIG")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("permission denied on the Docker socket"),
        "{err}"
    );
}
