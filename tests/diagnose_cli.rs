//! `immich-guard diagnose`: logs collected without the daemon, through the binary (README.md,
//! "Diagnosing logs without the daemon"). No daemon, no Docker.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use immich_guard::diagnose::{Category, Diagnosis};

/// `docker compose logs` of a real failure (immich-app/immich#14896): the server's symptom,
/// the database's cause, compose v2 prefixes with colours.
const COMPOSE_LOGS: &str = "\
immich_server            | Error: getaddrinfo ENOTFOUND database
immich_server            |     at GetAddrInfoReqWrap.onlookupall [as oncomplete] (node:dns:120:26)
\u{1b}[33mimmich_postgres          |\u{1b}[0m chown: changing ownership of '/var/lib/postgresql/data': Operation not permitted
immich_postgres exited with code 1
";

fn run(args: &[&str], stdin: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_immich-guard"))
        .arg("--config")
        .arg(&config)
        .arg("diagnose")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn compose_logs_on_stdin_name_the_databases_cause() {
    let out = run(&["-"], COMPOSE_LOGS);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("cause: database-ownership\n"), "{text}");
    assert!(
        text.contains("  > immich_postgres: chown: changing ownership"),
        "{text}"
    );
    assert!(
        text.contains("diagnosis: database-unreachable (also seen)"),
        "{text}"
    );
    assert!(text.contains("recommended: fix forward"), "{text}");

    let out = run(&["-", "--json"], COMPOSE_LOGS);
    assert!(out.status.success(), "{out:?}");
    let d: Diagnosis = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d.cause, Category::DatabaseOwnership);
    assert_eq!(d.decision.action(), "fix-forward");
}

#[test]
fn log_files_take_their_service_names_and_a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ml = dir.path().join("ml.log");
    std::fs::write(
        &ml,
        "[03/23/24 12:31:58] ERROR    Can't connect to ('::', 3003)\n",
    )
    .unwrap();
    let out = run(
        &[
            "--logs",
            ml.to_str().unwrap(),
            "--service",
            "immich_machine_learning",
            "--json",
        ],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let d: Diagnosis = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d.cause, Category::MlBindAddress);
    assert!(
        d.findings[0].lines[0].starts_with("immich_machine_learning: "),
        "{d:?}"
    );

    let missing = dir.path().join("nope.log");
    let out = run(&["--logs", missing.to_str().unwrap()], "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.log"), "{err}");

    let out = run(&[], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no logs"),
        "{out:?}"
    );
}
