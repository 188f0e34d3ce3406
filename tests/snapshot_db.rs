//! The database half of a snapshot against a real stack: the dump restores into an empty
//! PostgreSQL with the same rows; faults give errors that name their cause.

mod harness;

use std::path::Path;

use harness::compose::ScratchPostgres;
use harness::{Stack, StackSpec, docker_available};
use immich_guard::snapshot::db::{self, DbError};
use sha2::{Digest, Sha256};

fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_local_defaults().unwrap()
}

const HOST: &str = "unix:///var/run/docker.sock";

#[tokio::test(flavor = "multi_thread")]
async fn dump_restores_into_an_empty_postgres_with_the_same_rows() {
    if !docker_available() {
        return;
    }
    let stack = tokio::task::spawn_blocking(|| Stack::up(StackSpec::default()))
        .await
        .unwrap();
    let facts = db::facts(&stack.db_access()).await.unwrap();
    assert_eq!(facts.migrations, stack.applied_migrations());
    assert_eq!((facts.typeorm_migrations, facts.kysely_migrations), (3, 0));
    assert_eq!(facts.assets, Some(4));
    assert_eq!(facts.users, Some(1));
    assert!(facts.database_bytes > 1_000_000, "{}", facts.database_bytes);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sql.zst");
    let dump = db::dump(
        &docker(),
        HOST,
        &stack.container_name("database"),
        "postgres",
        &path,
    )
    .await
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(dump.bytes, bytes.len() as u64);
    assert_eq!(dump.sha256, format!("{:x}", Sha256::digest(&bytes)));
    let sql = zstd::decode_all(&bytes[..]).unwrap();
    assert_eq!(dump.sql_bytes, sql.len() as u64);

    let rows = "SELECT string_agg(id || ':' || original_path || ':' || checksum, ',' ORDER BY id) FROM assets";
    let original_rows = stack.psql(rows);
    let scratch = tokio::task::spawn_blocking(ScratchPostgres::start)
        .await
        .unwrap();
    let out = scratch.restore(&sql);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(scratch.psql("immich", rows), original_rows);
    assert_eq!(
        scratch.psql(
            "immich",
            "SELECT string_agg(name, ',' ORDER BY name) FROM migrations"
        ),
        stack.applied_migrations().join(",")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_database_gives_a_clear_error_and_no_file() {
    if !docker_available() {
        return;
    }
    let stack = tokio::task::spawn_blocking(|| Stack::up(StackSpec::default()))
        .await
        .unwrap();
    stack.compose(&["stop", "-t", "1", "database"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sql.zst");
    let name = stack.container_name("database");
    let e = db::dump(&docker(), HOST, &name, "postgres", &path)
        .await
        .unwrap_err();
    assert!(matches!(e, DbError::NotRunning { .. }), "{e:?}");
    assert!(e.to_string().contains(&name), "{e}");
    assert!(!path.exists());
}

fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_during_the_dump_names_the_cause() {
    if !docker_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !mount_tmpfs(dir.path(), "256k") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs to mount a tmpfs"
        );
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            std::process::Command::new("umount")
                .arg(self.0)
                .status()
                .ok();
        }
    }
    let _unmount = Unmount(dir.path());
    let stack = tokio::task::spawn_blocking(|| Stack::up(StackSpec::default()))
        .await
        .unwrap();
    // Random text compresses badly: a few MB of dump cannot fit in 256 KiB.
    stack.psql(
        "CREATE TABLE filler AS SELECT md5(random()::text) AS h FROM generate_series(1, 100000)",
    );
    let path = dir.path().join("db.sql.zst");
    let e = db::dump(
        &docker(),
        HOST,
        &stack.container_name("database"),
        "postgres",
        &path,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, DbError::Write { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("No space left on device"), "{text}");
    assert!(text.contains("db.sql.zst"), "{text}");
}
