//! `immich-guard verify` against a real stack (real Docker, real PostgreSQL, the stand-in
//! server), run as the CLI with no daemon: a healthy stack passes against its snapshot, then
//! each fault on its own fails exactly its own line and the exit code.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use harness::compose::docker_ok;
use harness::{Stack, StackSpec, docker_available};
use immich_guard::snapshot;
use immich_guard::verify::{Outcome, Report};

fn write_config(stack: &Stack, dir: &Path) -> PathBuf {
    harness::guard::cli_config(stack, dir)
}

fn snapshot_of(stack: &Stack, dir: &Path) -> snapshot::store::Meta {
    harness::guard::snapshot_of(stack, dir)
}

/// Runs `verify --json` with `args`; the exit code and the report.
fn verify(config: &Path, args: &[&str]) -> (Output, Report) {
    let mut all = vec!["verify", "--json"];
    all.extend_from_slice(args);
    let out = harness::guard::cli(config, &all);
    let report: Report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

/// The report failed exactly the line `name`, whose detail contains `needle`; exit code 1.
fn fails_only(out: &Output, report: &Report, name: &str, needle: &str) {
    let failed: Vec<_> = report.failures().collect();
    assert!(
        failed.len() == 1 && failed[0].name == name && failed[0].detail.contains(needle),
        "expected only {name} failing with {needle:?}, got {:#?}",
        report.checks
    );
    assert!(!report.passed && !report.passed());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

fn passes(out: &Output, report: &Report) {
    assert!(
        report.passed && out.status.success(),
        "{:#?}\n{}",
        report.checks,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One original the stand-in uploaded (`upload/<owner>/xx/yy/<id>.jpg`).
fn some_original(upload: &Path) -> PathBuf {
    walkdir::WalkDir::new(upload.join("upload"))
        .into_iter()
        .filter_map(|e| e.ok())
        .find(|e| e.path().extension().is_some_and(|x| x == "jpg"))
        .map(|e| e.into_path())
        .expect("the stand-in uploads originals")
}

/// Stands in for `immich-admin` in the server container (the stand-in image has none): a
/// real program `verify` execs, answering `schema-check` with `line` and `code`.
fn install_immich_admin(stack: &Stack, line: &str, code: i32) {
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = schema-check ] || {{ echo \"error: unknown command '$1'\"; exit 1; }}\necho 'Checking the database schema...'\necho '{line}'\nexit {code}\n"
    );
    docker_ok(&[
        "exec",
        &stack.container_name("immich-server"),
        "sh",
        "-c",
        &format!("cat > /bin/immich-admin <<'EOF'\n{script}EOF\nchmod 755 /bin/immich-admin"),
    ]);
}

#[test]
fn verify_passes_a_healthy_stack_and_catches_each_fault_on_its_own() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&stack, dir.path());
    let meta = snapshot_of(&stack, dir.path());
    assert_eq!((meta.db.assets, meta.db.users), (Some(4), Some(1)));

    // Healthy, against its snapshot: every line passes; schema-check is not in the image.
    let started = std::time::Instant::now();
    let (out, report) = verify(&config, &["--against", &meta.id]);
    eprintln!("verify --against took {:?}", started.elapsed());
    passes(&out, &report);
    assert_eq!(report.against.as_deref(), Some(meta.id.as_str()));
    let outcome = |r: &Report, name: &str| r.check(name).unwrap().outcome;
    for name in [
        "containers",
        "ping",
        "version",
        "assets",
        "users",
        "originals",
        "markers",
    ] {
        assert_eq!(
            outcome(&report, name),
            Outcome::Pass,
            "{:#?}",
            report.checks
        );
    }
    let detail = |r: &Report, name: &str| r.check(name).unwrap().detail.clone();
    assert_eq!(
        detail(&report, "schema"),
        "skipped: not in this image (no immich-admin)"
    );
    assert_eq!(detail(&report, "assets"), "4 now, 4 in the snapshot");
    assert_eq!(
        detail(&report, "version"),
        "server answers v1.119.0, expected v1.119.0"
    );
    assert!(
        detail(&report, "originals").starts_with("4/4 present"),
        "{}",
        detail(&report, "originals")
    );
    assert_eq!(
        detail(&report, "markers"),
        "6/6 storage folders hold .immich"
    );
    let ip = stack.ip("immich-server").unwrap();
    assert_eq!(
        report.server_url.as_deref(),
        Some(format!("http://{ip}:2283").as_str())
    );
    // The daemon is not running: verify does not need it.
    assert!(!dir.path().join("run/guard.sock").exists());

    // Without --against: the newest snapshot of the running version is the baseline.
    let (out, report) = verify(&config, &[]);
    passes(&out, &report);
    assert_eq!(report.against.as_deref(), Some(meta.id.as_str()));
    assert!(
        report
            .baseline_note
            .contains("newest of the running version"),
        "{}",
        report.baseline_note
    );

    // A missing original.
    let original = some_original(&stack.upload);
    let rel = original
        .strip_prefix(&stack.upload)
        .unwrap()
        .display()
        .to_string();
    let aside = dir.path().join("aside.jpg");
    std::fs::rename(&original, &aside).unwrap();
    let (out, report) = verify(&config, &["--against", &meta.id]);
    fails_only(&out, &report, "originals", &format!("1 missing: {rel}"));
    assert!(detail(&report, "originals").starts_with("3/4 intact"));
    std::fs::rename(&aside, &original).unwrap();

    // A lower asset count (rows deleted; put back afterwards).
    stack.psql(
        "CREATE TABLE verify_kept AS SELECT * FROM assets ORDER BY id LIMIT 2; \
         DELETE FROM assets WHERE id IN (SELECT id FROM verify_kept)",
    );
    assert_eq!(stack.asset_count(), 2);
    let (out, report) = verify(&config, &["--against", &meta.id]);
    fails_only(&out, &report, "assets", "2 now, 4 in the snapshot");
    stack.psql("INSERT INTO assets SELECT * FROM verify_kept; DROP TABLE verify_kept");

    // A stopped container; the human checklist names it too.
    let redis = stack.container_name("redis");
    docker_ok(&["stop", "-t", "5", &redis]);
    let (out, report) = verify(&config, &["--against", &meta.id]);
    fails_only(
        &out,
        &report,
        "containers",
        &format!("3/4 running; redis ({redis}) exited"),
    );
    let text = harness::guard::cli(&config, &["verify", "--against", &meta.id]);
    assert_eq!(text.status.code(), Some(1));
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    eprintln!("{text}");
    assert!(
        text.contains(&format!(
            "  [FAIL] containers  3/4 running; redis ({redis}) exited\n"
        )) && text.contains("  [PASS] ping ")
            && text.ends_with("FAILED: 1 of 9 checks failed\n"),
        "{text}"
    );
    docker_ok(&["start", &redis]);
    let (out, report) = verify(&config, &["--against", &meta.id]);
    passes(&out, &report);

    // When the image has immich-admin, its schema-check is run and judged by its exit code.
    install_immich_admin(&stack, "drift: column asset.foo is missing", 1);
    let (out, report) = verify(&config, &["--against", &meta.id]);
    fails_only(
        &out,
        &report,
        "schema",
        "immich-admin schema-check exited 1: drift: column asset.foo is missing",
    );
    install_immich_admin(&stack, "No schema drift detected", 0);
    let (out, report) = verify(&config, &["--against", &meta.id]);
    passes(&out, &report);
    assert_eq!(
        detail(&report, "schema"),
        "immich-admin schema-check: No schema drift detected"
    );

    // A healthcheck counts where there is one: redis recreated with one that fails until
    // /tmp/healthy exists.
    let yaml = std::fs::read_to_string(&stack.compose_file).unwrap();
    let anchor = format!("    container_name: {redis}\n");
    assert!(yaml.contains(&anchor));
    let check = "    healthcheck:\n      test: [\"CMD-SHELL\", \"test -e /tmp/healthy\"]\n      interval: 1s\n      timeout: 1s\n      retries: 1\n";
    std::fs::write(
        &stack.compose_file,
        yaml.replace(&anchor, &format!("{anchor}{check}")),
    )
    .unwrap();
    stack.compose(&["up", "-d"]);
    stack.wait_server_ready(Duration::from_secs(60)).unwrap();
    let health = || docker_ok(&["inspect", "-f", "{{.State.Health.Status}}", &redis]);
    let start = std::time::Instant::now();
    while health() != "unhealthy" {
        assert!(start.elapsed() < Duration::from_secs(30), "{}", health());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (out, report) = verify(&config, &["--against", &meta.id]);
    fails_only(
        &out,
        &report,
        "containers",
        &format!("3/4 running; redis ({redis}) running but unhealthy"),
    );
    docker_ok(&["exec", &redis, "touch", "/tmp/healthy"]);
    while health() != "healthy" {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", health());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (out, report) = verify(&config, &["--against", &meta.id]);
    passes(&out, &report);
    assert!(
        detail(&report, "containers").contains("redis (healthy)"),
        "{}",
        detail(&report, "containers")
    );

    // The server on another version than the snapshot's.
    harness::ensure_images(&["v1.120.0"]);
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version("v1.120.0", Duration::from_secs(90))
        .unwrap();
    let (out, report) = verify(&config, &["--against", &meta.id]);
    fails_only(
        &out,
        &report,
        "version",
        "server answers v1.120.0, expected v1.119.0",
    );
    // Each boot since uploaded one more: more than the snapshot is fine.
    let now = stack.asset_count();
    assert!(now > 4);
    assert_eq!(
        detail(&report, "assets"),
        format!("{now} now, 4 in the snapshot")
    );

    // No snapshot of v1.120.0 yet: only the stack is judged, and it is fine.
    let (out, report) = verify(&config, &[]);
    passes(&out, &report);
    assert_eq!(report.against, None);
    assert!(
        report
            .baseline_note
            .starts_with("no sealed snapshot of v1.120.0"),
        "{}",
        report.baseline_note
    );
    assert_eq!(outcome(&report, "version"), Outcome::Pass);
    for name in ["assets", "users", "originals", "schema"] {
        assert_eq!(outcome(&report, name), Outcome::Skipped, "{name}");
    }

    // An unknown snapshot is an error naming it, not a pass.
    let out = harness::guard::cli(&config, &["verify", "--against", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no sealed snapshot nope"),
        "{out:?}"
    );

    // A wrong database password (issue 18): the counts say what was tried and what
    // PostgreSQL answered, not "db error", and not the password.
    let wrong = "Wr0ng!pass@word";
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[database]\npassword = {wrong:?}\n"));
    std::fs::write(&config, text).unwrap();
    let (out, report) = verify(&config, &[]);
    let ip = stack.ip("database").unwrap();
    for name in ["assets", "users"] {
        assert_eq!(
            detail(&report, name),
            format!(
                "cannot count: connecting to the database at {ip}:5432 (database immich, user postgres): \
                 FATAL: password authentication failed for user \"postgres\" (SQLSTATE 28P01)"
            )
        );
    }
    assert_eq!(out.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(wrong) && !all.contains(&stack.db_password));
}
