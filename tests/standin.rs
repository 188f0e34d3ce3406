//! The test stand-in and images behave like the real Immich pieces they replace.

mod harness;

use std::time::Duration;

use harness::{Stack, StackSpec, docker_available};

#[test]
fn fresh_stack_boots_migrates_and_answers_version() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default());
    let version = stack.wait_server_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(version, r#"{"major":1,"minor":119,"patch":0}"#);
    let applied = stack.applied_migrations();
    assert_eq!(
        applied,
        vec![
            "1700000000000-InitialSchema",
            "1727000000000-AddAssetFaces",
            "1729000000000-AddAssetJobStatus"
        ]
    );
    // v1.119 predates Kysely: TypeORM's table, old table names.
    assert_eq!(
        stack.psql("SELECT to_regclass('kysely_migrations') IS NULL"),
        "t"
    );
    assert_eq!(stack.psql("SELECT count(*) FROM assets"), "4");
    assert!(stack.upload.join("library/.immich").exists());
    assert!(stack.upload.join("upload/.immich").exists());
}

fn no_restart(version: &str, env: &[(&str, &str)]) -> StackSpec {
    StackSpec {
        version: version.into(),
        restart: "\"no\"".into(),
        server_env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        wait_ready: false,
        ..StackSpec::default()
    }
}

#[test]
fn upgrade_applies_only_new_migrations_and_records_them_in_kysely_table() {
    if !docker_available() {
        return;
    }
    harness::images::ensure_images(&["v1.137.0"]);
    let stack = Stack::up(StackSpec::default());
    let before = stack.applied_migrations();
    stack.set_env("IMMICH_VERSION", "v1.137.0");
    stack.compose(&["up", "-d"]);
    let version = stack.wait_server_ready(Duration::from_secs(60)).unwrap();
    assert_eq!(version, r#"{"major":1,"minor":137,"patch":0}"#);
    let after = stack.applied_migrations();
    assert!(before.iter().all(|m| after.contains(m)));
    let kysely = stack.psql("SELECT string_agg(name, ',' ORDER BY name) FROM kysely_migrations");
    assert_eq!(
        kysely,
        "1731000000000-AddMemories,1731000000001-AddMemoryAssets,1744000000000-AddTags,\
         1745000000000-KyselyBaseline,1751000000000-AddAlbumDescription,1752267649968-StandardizeNames"
    );
    // StandardizeNames renamed the tables, as v1.137 did; data kept, one asset per boot added.
    assert_eq!(stack.psql("SELECT count(*) FROM asset"), "5");
    assert_eq!(stack.psql("SELECT count(*) FROM \"user\""), "1");
    assert_eq!(stack.psql("SELECT to_regclass('assets') IS NULL"), "t");
    assert_eq!(
        stack.psql("SELECT string_agg(version, ',' ORDER BY id) FROM version_history"),
        "v1.119.0,v1.137.0"
    );
}

#[test]
fn downgrade_after_migration_is_refused_with_corrupted_migrations_message() {
    if !docker_available() {
        return;
    }
    harness::images::ensure_images(&["v1.120.0"]);
    let stack = Stack::up(StackSpec {
        version: "v1.120.0".into(),
        restart: "\"no\"".into(),
        ..StackSpec::default()
    });
    let migrated = stack.applied_migrations();
    let assets = stack.psql("SELECT count(*) FROM assets");
    stack.set_env("IMMICH_VERSION", "v1.119.0");
    stack.compose(&["up", "-d"]);
    let state = stack.wait_status("immich-server", "exited", Duration::from_secs(30));
    assert_eq!(state, "exited 1");
    let log = stack.logs("immich-server");
    assert!(
        log.contains("corrupted migrations: previously executed migration 1731000000000-AddMemories is missing"),
        "{log}"
    );
    assert_eq!(stack.applied_migrations(), migrated, "nothing changed");
    assert_eq!(stack.psql("SELECT count(*) FROM assets"), assets);
}

#[test]
fn crash_at_boot_mode_exits_before_touching_db() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(no_restart("v1.119.0", &[("STANDIN_CRASH", "boot")]));
    assert_eq!(
        stack.wait_status("immich-server", "exited", Duration::from_secs(30)),
        "exited 1"
    );
    assert!(stack.logs("immich-server").contains("Invalid upgrade path"));
    stack.wait_db_ready(Duration::from_secs(30));
    assert!(stack.applied_migrations().is_empty());
}

#[test]
fn half_migration_crash_leaves_some_migrations_applied() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(no_restart("v1.119.0", &[("STANDIN_CRASH", "migration")]));
    assert_eq!(
        stack.wait_status("immich-server", "exited", Duration::from_secs(30)),
        "exited 1"
    );
    assert!(
        stack
            .logs("immich-server")
            .contains("Kysely migrations failed")
    );
    let applied = stack.applied_migrations();
    assert_eq!(
        applied,
        vec!["1700000000000-InitialSchema"],
        "one of three applied"
    );
}

#[test]
fn missing_marker_file_fails_boot_with_enoent() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec {
        restart: "\"no\"".into(),
        ..StackSpec::default()
    });
    std::fs::remove_file(stack.upload.join("thumbs/.immich")).unwrap();
    stack.compose(&["restart", "immich-server"]);
    assert_eq!(
        stack.wait_status("immich-server", "exited", Duration::from_secs(30)),
        "exited 1"
    );
    let log = stack.logs("immich-server");
    assert!(log.contains("thumbs/.immich\": Error: ENOENT"), "{log}");
    assert!(
        log.contains("microservices worker exited with code 1"),
        "{log}"
    );
}

#[test]
fn pg_dumpall_via_docker_exec_works() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default());
    let out = std::process::Command::new("docker")
        .args([
            "exec",
            &stack.container_name("database"),
            "pg_dumpall",
            "--clean",
            "--if-exists",
            "-U",
            "postgres",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        dump.contains("CREATE TABLE public.assets"),
        "dump holds the schema"
    );
    assert!(
        dump.contains("1729000000000-AddAssetJobStatus"),
        "and the data"
    );
}

#[test]
fn same_tag_with_salt_gives_a_new_image_id_and_builds_are_cached() {
    if !docker_available() {
        return;
    }
    use harness::images::{build_server_image, image_id};
    let first = build_server_image("v1.119.0", "igt-latest", "one");
    assert_eq!(
        build_server_image("v1.119.0", "igt-latest", "one"),
        first,
        "cached"
    );
    let second = build_server_image("v1.119.0", "igt-latest", "two");
    assert_ne!(first, second);
    assert_eq!(
        image_id("ghcr.io/immich-app/immich-server:igt-latest"),
        second
    );
    let images = harness::images::ensure_images(&["v1.119.0"]);
    assert_eq!(
        harness::images::ensure_images(&["v1.119.0"]).servers,
        images.servers
    );
}
