//! `immich-guard pin` against a real stack watched by the daemon (issue 11 item 4): a
//! rollback to a version whose migrations cover the database is allowed and edits only the
//! `IMMICH_VERSION` line of `.env`; one across an applied migration is refused, naming the
//! snapshot to restore instead, unless forced (and then recorded).

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use harness::compose::docker_ok;
use harness::guard::Guard;
use harness::images::server_repo;
use harness::{Stack, StackSpec, docker_available, ensure_images};
use immich_guard::pin::{PinRecord, Verdict};
use immich_guard::snapshot::store::Meta;

const V120_MIGRATION: &str = "1731000000000-AddMemories";
const LONG: Duration = Duration::from_secs(120);

fn list(guard: &Guard) -> Vec<Meta> {
    let out = guard.cli(&["list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits for a sealed pre-update snapshot whose label names the change to `to`.
fn wait_pre_update(guard: &Guard, to: &str) -> Meta {
    let start = std::time::Instant::now();
    loop {
        if let Some(m) = list(guard)
            .into_iter()
            .find(|m| m.trigger == "pre-update" && m.label.as_deref().unwrap_or("").contains(to))
        {
            return m;
        }
        assert!(
            start.elapsed() < LONG,
            "no pre-update snapshot for {to}; log:\n{}",
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `.env` as the harness wrote it, the `IMMICH_VERSION` line excepted, and that line.
fn assert_env_pins(env: &Path, original: &str, version: &str) {
    let now = std::fs::read_to_string(env).unwrap();
    assert!(now.ends_with('\n'), "{now:?}");
    let (a, b): (Vec<&str>, Vec<&str>) = (original.lines().collect(), now.lines().collect());
    assert_eq!(a.len(), b.len(), "line count changed:\n{now}");
    for (n, (was, is)) in a.iter().zip(&b).enumerate() {
        if was.starts_with("IMMICH_VERSION=") {
            assert_eq!(*is, format!("IMMICH_VERSION={version}"), "line {}", n + 1);
        } else {
            assert_eq!(was, is, "line {} changed", n + 1);
        }
    }
    // Comments are among the lines kept: say so explicitly.
    assert!(now.contains("# The Immich version to use. You can pin this"));
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn pins(guard: &Guard) -> Vec<PinRecord> {
    let data = guard.dir.path().join("data");
    let log = data.join(immich_guard::pin::LOG_FILE);
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600,
        "pins.jsonl is owner-only"
    );
    immich_guard::pin::records(&data).unwrap()
}

fn upgrade(stack: &Stack, guard: &Guard, version: &str) {
    stack.set_env("IMMICH_VERSION", version);
    wait_pre_update(guard, &format!("→ {version}"));
    docker_ok(&[
        "tag",
        &format!("{}:{version}", server_repo()),
        &format!("{}:{version}", server_repo()),
    ]);
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version(version, LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    guard.wait_status(&format!("the {version} baseline"), LONG, |s| {
        s.state
            .protection
            .baseline
            .as_ref()
            .is_some_and(|b| b.version == version)
            && s.state.protection.pending.is_none()
    });
}

#[test]
fn pin_allows_a_rollback_without_migrations_and_refuses_one_across_them() {
    if !docker_available() {
        return;
    }
    ensure_images(&["v1.119.0", "v1.119.1", "v1.120.0"]);
    let stack = Stack::up(StackSpec::new("v1.119.0").boot_delay_ms(3000));
    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(&stack, snapshots.path(), "");
    guard.wait_status("a baseline", Duration::from_secs(60), |s| {
        s.state.protection.baseline.is_some()
    });
    let original = std::fs::read_to_string(&stack.env_file).unwrap();
    let out = guard.cli(&["snapshot", "--json"]);
    assert!(out.status.success(), "{}", text(&out));

    // v1.119.1 adds no migration: going back to v1.119.0 is safe.
    upgrade(&stack, &guard, "v1.119.1");
    let before = std::fs::read(&stack.env_file).unwrap();
    let out = guard.cli(&["pin", "v1.119.0", "--dry-run"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("- IMMICH_VERSION=v1.119.1"), "{said}");
    assert!(said.contains("+ IMMICH_VERSION=v1.119.0"), "{said}");
    assert!(said.contains("dry run: nothing changed"), "{said}");
    assert_eq!(std::fs::read(&stack.env_file).unwrap(), before);

    let out = guard.cli(&["pin", "1.119.0", "--yes", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"]["verdict"], "allowed", "{report:#}");
    assert_env_pins(&stack.env_file, &original, "v1.119.0");
    let backup = report["applied"]["backups"][0][1].as_str().unwrap();
    assert!(backup.contains(".env.immich-guard-"), "{backup}");
    assert_eq!(std::fs::read(backup).unwrap(), before);
    assert_eq!(
        std::fs::metadata(backup).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let said = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- pin 1.119.0 --yes --json (stderr) ---\n{said}");
    assert!(said.contains("pre-update snapshot"), "{said}");
    let recorded = pins(&guard);
    assert_eq!(recorded.len(), 1);
    assert!(!recorded[0].forced);
    assert_eq!(recorded[0].files, vec![stack.env_file.clone()]);
    // What the output promised: the daemon saw the edit and snapshotted first.
    wait_pre_update(&guard, "→ v1.119.0");

    // v1.120.0 migrates: v1.119.0 never had those migrations.
    upgrade(&stack, &guard, "v1.120.0");
    assert!(
        stack
            .applied_migrations()
            .iter()
            .any(|m| m == V120_MIGRATION)
    );
    let before = std::fs::read(&stack.env_file).unwrap();
    let newest_v119 = list(&guard)
        .into_iter()
        .filter(|m| m.version == "v1.119.0")
        .max_by_key(|m| m.started_at)
        .unwrap();
    let out = guard.cli(&["pin", "v1.119.0", "--yes"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(V120_MIGRATION), "{said}");
    assert!(
        said.contains(&format!("immich-guard restore {}", newest_v119.id)),
        "names the newest v1.119.0 snapshot {}: {said}",
        newest_v119.id
    );
    assert!(said.contains("--force"), "{said}");
    eprintln!("--- pin v1.119.0 --yes (refused) ---\n{said}");
    assert_eq!(
        std::fs::read(&stack.env_file).unwrap(),
        before,
        "refused: untouched"
    );

    // A version no snapshot knows: cannot be judged, so refused too.
    let out = guard.cli(&["pin", "v1.118.0", "--yes"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("cannot be judged"), "{said}");
    assert_eq!(std::fs::read(&stack.env_file).unwrap(), before);

    // --force pins anyway, and says so in the record.
    let out = guard.cli(&["pin", "v1.119.0", "--yes", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_env_pins(&stack.env_file, &original, "v1.119.0");
    let recorded = pins(&guard);
    assert_eq!(recorded.len(), 2);
    assert!(recorded[1].forced);
    assert!(
        matches!(&recorded[1].verdict, Verdict::Refused { migrations, restore }
            if migrations.iter().any(|m| m == V120_MIGRATION) && *restore == newest_v119.id),
        "{:?}",
        recorded[1].verdict
    );
}
