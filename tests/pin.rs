//! `immich-guard pin` against a real stack watched by the daemon (issue 11 item 4): a
//! rollback to a version whose migrations cover the database is allowed and edits only the
//! `IMMICH_VERSION` line of `.env`; one across an applied migration is refused, naming the
//! snapshot to restore instead, unless forced (and then recorded).

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

use harness::compose::{assert_env_pins, docker_ok};
use harness::guard::Guard;
use harness::images::{ml_repo, server_repo};
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

/// Waits until the pending change to `to` (`→ v1.119.0`) is covered by a sealed snapshot: a
/// pre-update one, or an earlier one of the very same state (the guard does not snapshot an
/// unchanged state twice, README "How it protects").
fn wait_pre_update(guard: &Guard, to: &str) -> Meta {
    let version = to.trim_start_matches("→ ");
    let s = guard.wait_status(&format!("a snapshot covering {to}"), LONG, |s| {
        s.state
            .protection
            .pending
            .as_ref()
            .is_some_and(|p| p.to == version && p.snapshot.is_some())
    });
    let id = s.state.protection.pending.unwrap().snapshot.unwrap();
    list(guard)
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("{id} covers {to} but is not listed; log:\n{}", guard.log()))
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

/// A compose file that names the tags itself (no `${IMMICH_VERSION}`), machine learning on a
/// `-cuda` variant: pin edits those two `image:` lines and nothing else, with the daemon
/// stopped, and compose then runs the pinned version.
#[test]
fn pin_edits_image_lines_that_name_the_tag_with_the_daemon_stopped() {
    if !docker_available() {
        return;
    }
    ensure_images(&["v1.119.0", "v1.119.1"]);
    for v in ["v1.119.0", "v1.119.1"] {
        docker_ok(&[
            "tag",
            &format!("{}:{v}", ml_repo()),
            &format!("{}:{v}-cuda", ml_repo()),
        ]);
    }
    let stack = Stack::create(StackSpec::new("v1.119.0"));
    let templated = std::fs::read_to_string(&stack.compose_file).unwrap();
    let direct = |v: &str| {
        templated
            .replace(
                &format!("{}:${{IMMICH_VERSION:-release}}", server_repo()),
                &format!("\"{}:{v}\"  # pinned by hand", server_repo()),
            )
            .replace(
                &format!("{}:${{IMMICH_VERSION:-release}}", ml_repo()),
                &format!("{}:{v}-cuda", ml_repo()),
            )
    };
    let v119 = direct("v1.119.0");
    assert_ne!(v119, templated, "the harness compose file changed shape");
    std::fs::write(&stack.compose_file, &v119).unwrap();
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version("v1.119.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let snapshots = tempfile::tempdir().unwrap();
    let mut guard = Guard::watching(&stack, snapshots.path(), "");
    guard.wait_status("a baseline", Duration::from_secs(60), |s| {
        s.state.protection.baseline.is_some()
    });
    let out = guard.cli(&["snapshot", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    guard.terminate();

    // Upgraded by hand to v1.119.1 (no migrations), then pinned back.
    std::fs::write(&stack.compose_file, direct("v1.119.1")).unwrap();
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version("v1.119.1", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let env_before = std::fs::read(&stack.env_file).unwrap();
    let out = guard.cli(&["pin", "v1.119.0", "--yes"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    eprintln!("--- pin v1.119.0 --yes (direct tags, daemon stopped) ---\n{said}");
    assert_eq!(
        std::fs::read_to_string(&stack.compose_file).unwrap(),
        v119,
        "exactly the two image lines, quoting and comment kept"
    );
    // .env names v1.119.0 already (the harness wrote it): untouched.
    assert_eq!(std::fs::read(&stack.env_file).unwrap(), env_before);
    let backups: Vec<_> = std::fs::read_dir(&stack.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("docker-compose.yml.immich-guard-") && n.ends_with(".bak"))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");

    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version("v1.119.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let ml = docker_ok(&[
        "inspect",
        "-f",
        "{{.Config.Image}}",
        &stack.container_name("immich-machine-learning"),
    ]);
    assert_eq!(ml.trim(), format!("{}:v1.119.0-cuda", ml_repo()));
    for v in ["v1.119.0", "v1.119.1"] {
        docker_ok(&["rmi", &format!("{}:{v}-cuda", ml_repo())]);
    }
}

/// A rollback `pin` allowed (no migration applied since) starts on the older version without
/// a hold; a downgrade nobody recorded is still held, its hint names `pin`, and following the
/// hint (pin, then release) lets it go.
#[test]
fn an_allowed_pin_rollback_starts_and_an_unrecorded_downgrade_is_held() {
    if !docker_available() {
        return;
    }
    ensure_images(&["v1.119.0", "v1.119.1"]);
    let stack = Stack::up(StackSpec::new("v1.119.0").boot_delay_ms(3000));
    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(&stack, snapshots.path(), "");
    guard.wait_status("a baseline", Duration::from_secs(60), |s| {
        s.state.protection.baseline.is_some()
    });
    let out = guard.cli(&["snapshot", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    upgrade(&stack, &guard, "v1.119.1");

    // Pinned back: allowed, recorded; the daemon snapshots the change and lets v1.119.0 start.
    let out = guard.cli(&["pin", "v1.119.0", "--yes"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("the daemon lets this rollback start"),
        "{said}"
    );
    wait_pre_update(&guard, "→ v1.119.0");
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version("v1.119.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let s = guard.wait_status("the v1.119.0 baseline", LONG, |s| {
        s.state
            .protection
            .baseline
            .as_ref()
            .is_some_and(|b| b.version == "v1.119.0")
    });
    assert!(
        s.state.protection.hold.is_none(),
        "{:?}",
        s.state.protection.hold
    );
    assert!(
        guard
            .log()
            .contains("a rollback recorded by `immich-guard pin`: not held as a downgrade"),
        "{}",
        guard.log()
    );

    // Up again, then back by hand: nobody recorded this one, so it is held.
    upgrade(&stack, &guard, "v1.119.1");
    stack.set_env("IMMICH_VERSION", "v1.119.0");
    stack.compose(&["up", "-d"]);
    let s = guard.wait_status("a downgrade hold", LONG, |s| {
        s.state.protection.hold.is_some()
    });
    let hold = s.state.protection.hold.unwrap();
    assert_eq!(hold.kind, immich_guard::protect::HoldKind::Downgrade);
    eprintln!("--- the hold's hint ---\n{}", hold.hint);
    assert!(
        hold.hint.contains("`immich-guard pin v1.119.0`"),
        "{}",
        hold.hint
    );
    assert!(
        hold.hint.contains("`immich-guard release`"),
        "{}",
        hold.hint
    );
    assert_eq!(stack.state("immich-server").unwrap().status, "paused");
    let out = guard.cli(&["release"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("immich-guard pin v1.119.0"),
        "{}",
        text(&out)
    );

    // The hint followed: pin records the judgement (nothing to edit), release lets it go.
    let out = guard.cli(&["pin", "v1.119.0", "--yes"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("nothing to change (the judgement is recorded"),
        "{said}"
    );
    let out = guard.cli(&["release"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("rollback recorded by `immich-guard pin`"),
        "{said}"
    );
    stack
        .wait_server_version("v1.119.0", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    let recorded = pins(&guard);
    assert_eq!(recorded.len(), 2);
    assert!(recorded.iter().all(|r| !r.forced && r.verdict.allows()));
    assert!(recorded[1].files.is_empty(), "{:?}", recorded[1]);
}
