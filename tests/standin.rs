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
    assert_eq!(stack.psql("SELECT to_regclass('kysely_migrations') IS NULL"), "t");
    assert_eq!(stack.psql("SELECT count(*) FROM assets"), "4");
    assert!(stack.upload.join("library/.immich").exists());
    assert!(stack.upload.join("upload/.immich").exists());
}
