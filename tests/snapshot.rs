//! Snapshots against a real stack: the dump restores into an empty PostgreSQL with the same
//! rows, a whole snapshot seals with storage and config, faults give errors that name their
//! cause and leave nothing half-made behind.

mod harness;

use std::path::Path;

use harness::compose::ScratchPostgres;
use harness::{Stack, StackSpec, docker_available};
use immich_guard::config::Config;
use immich_guard::snapshot::db::{self, DbError};
use immich_guard::snapshot::storage::StorageMethod;
use immich_guard::snapshot::store::Store;
use immich_guard::snapshot::{self, SnapshotError};
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
    // As a snapshot dumps: of a point taken first; a row written after it is not dumped.
    let rows = "SELECT string_agg(id || ':' || \"originalPath\" || ':' || checksum, ',' ORDER BY id) FROM assets";
    let original_rows = stack.psql(rows);
    let point = db::Point::take(&stack.db_access()).await.unwrap();
    stack.psql("INSERT INTO assets (id, \"ownerId\", \"originalPath\", checksum) SELECT gen_random_uuid(), \"ownerId\", '/data/upload/after-the-point.jpg', '\\x00' FROM assets LIMIT 1");
    assert_ne!(
        stack.psql(rows),
        original_rows,
        "the row after the point is written"
    );
    assert_eq!(
        point.facts().await.unwrap().assets,
        Some(4),
        "facts are of the point"
    );
    let dump = db::dump(
        &docker(),
        HOST,
        &stack.container_name("database"),
        &stack.db_access(),
        Some(&point),
        &path,
    )
    .await
    .unwrap();
    point.end().await;
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(dump.bytes, bytes.len() as u64);
    assert_eq!(dump.sha256, format!("{:x}", Sha256::digest(&bytes)));
    let sql = zstd::decode_all(&bytes[..]).unwrap();
    assert_eq!(dump.sql_bytes, sql.len() as u64);

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
    let e = db::dump(&docker(), HOST, &name, &stack.db_access(), None, &path)
        .await
        .unwrap_err();
    assert!(matches!(e, DbError::NotRunning { .. }), "{e:?}");
    assert!(e.to_string().contains(&name), "{e}");
    assert!(!path.exists());
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

/// A small tmpfs at `dir`, unmounted on drop; None (a skip) only outside CI.
fn tmpfs<'a>(dir: &'a Path, size: &str) -> Option<Unmount<'a>> {
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs to mount a tmpfs"
        );
        eprintln!("skipping: cannot mount a tmpfs here");
        return None;
    }
    Some(Unmount(dir))
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_during_the_dump_names_the_cause() {
    if !docker_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(_unmount) = tmpfs(dir.path(), "256k") else {
        return;
    };
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
        &stack.db_access(),
        None,
        &path,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, DbError::Write { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("No space left on device"), "{text}");
    assert!(text.contains("db.sql.zst"), "{text}");
}

async fn discovered(stack: &Stack) -> immich_guard::discover::Stack {
    let mut config = Config::default();
    config.stack.project = Some(stack.project.clone());
    immich_guard::discover::discover(&docker(), HOST, &config)
        .await
        .unwrap()
}

/// A running stack, what discovery finds of it, and a snapshot dir on the same filesystem
/// as its upload location (both under the temp dir), configured.
async fn fixture() -> (
    Stack,
    immich_guard::discover::Stack,
    tempfile::TempDir,
    Config,
) {
    let snapshots = tempfile::tempdir().unwrap();
    let (stack, found, config) = fixture_at(snapshots.path()).await;
    (stack, found, snapshots, config)
}

/// A running stack, what discovery finds of it, and a config writing snapshots to `dir`.
async fn fixture_at(dir: &Path) -> (Stack, immich_guard::discover::Stack, Config) {
    let stack = tokio::task::spawn_blocking(|| Stack::up(StackSpec::default()))
        .await
        .unwrap();
    let found = discovered(&stack).await;
    let mut config = Config::default();
    config.snapshots.dir = Some(dir.to_path_buf());
    (stack, found, config)
}

/// A manual snapshot of `found` as the CLI asks for one, without progress lines.
async fn take_manual(
    found: &immich_guard::discover::Stack,
    config: &Config,
) -> Result<snapshot::store::Meta, snapshot::SnapshotError> {
    snapshot::take(&docker(), HOST, found, config, &manual(), &|_| {})
        .await
        .map(|taken| taken.meta)
}

fn manual() -> snapshot::Request {
    snapshot::Request {
        trigger: "manual".into(),
        label: Some("test".into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_seals_database_storage_and_config_together() {
    if !docker_available() {
        return;
    }
    let (stack, found, snapshots, config) = fixture().await;

    let meta = take_manual(&found, &config).await.unwrap();
    assert_eq!(meta.version, "v1.119.0");
    assert_eq!(meta.db.migrations, stack.applied_migrations());
    assert_eq!(meta.db.assets, Some(4));
    assert_eq!(meta.storage.method, StorageMethod::Hardlink);
    assert!(meta.id.ends_with("-v1.119.0-manual"), "{}", meta.id);

    let dir = snapshots.path().join(&meta.id);
    let dump = std::fs::read(dir.join("db.sql.zst")).unwrap();
    assert_eq!(meta.dump.sha256, format!("{:x}", Sha256::digest(&dump)));
    // Every asset file is in the storage tree.
    let paths = stack.psql("SELECT string_agg(\"originalPath\", ',') FROM assets");
    for p in paths.split(',') {
        let rel = p.strip_prefix("/data/").unwrap();
        assert!(dir.join("storage").join(rel).is_file(), "{rel} in snapshot");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("config/.env")).unwrap(),
        std::fs::read_to_string(&stack.env_file).unwrap()
    );
    assert!(dir.join("config/docker-compose.yml").is_file());
    let listed = Store::open(snapshots.path()).unwrap().list().unwrap();
    assert_eq!(listed, vec![meta]);
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_dir_on_another_filesystem_is_refused_unless_copy_is_allowed() {
    if !docker_available() {
        return;
    }
    let snapshots = tempfile::tempdir().unwrap();
    let Some(_unmount) = tmpfs(snapshots.path(), "64m") else {
        return;
    };
    let (_stack, found, mut config) = fixture_at(snapshots.path()).await;

    let e = take_manual(&found, &config).await.unwrap_err();
    assert!(matches!(e, SnapshotError::Storage(_)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("another filesystem") && text.contains("copy_across"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(snapshots.path()).unwrap().count(),
        0,
        "nothing left"
    );

    config.snapshots.copy_across = true;
    let meta = take_manual(&found, &config).await.unwrap();
    assert_eq!(meta.storage.method, StorageMethod::Copy);
    assert!(meta.size_bytes >= meta.storage.bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_database_fails_the_snapshot_and_leaves_no_partial() {
    if !docker_available() {
        return;
    }
    let (stack, found, snapshots, config) = fixture().await;
    let first = take_manual(&found, &config).await.unwrap();
    stack.compose(&["stop", "-t", "1", "database"]);
    let e = take_manual(&found, &config).await.unwrap_err();
    assert!(
        e.to_string().contains(&stack.container_name("database")),
        "{e}"
    );
    let names: Vec<String> = std::fs::read_dir(snapshots.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![first.id],
        "the earlier snapshot is intact, no partial"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_is_refused_up_front_when_space_is_short() {
    if !docker_available() {
        return;
    }
    let snapshots = tempfile::tempdir().unwrap();
    let Some(_unmount) = tmpfs(snapshots.path(), "8m") else {
        return;
    };
    let (_stack, found, mut config) = fixture_at(snapshots.path()).await;
    config.snapshots.copy_across = true;
    let e = take_manual(&found, &config).await.unwrap_err();
    assert!(matches!(e, SnapshotError::NoSpace { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("not enough free space") && text.contains("MB are free"),
        "{text}"
    );
    assert_eq!(std::fs::read_dir(snapshots.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_last_n_and_never_the_newest_goes() {
    if !docker_available() {
        return;
    }
    let (_stack, found, snapshots, mut config) = fixture().await;
    config.snapshots.keep_last = 2;
    config.snapshots.keep_versions = 1;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(take_manual(&found, &config).await.unwrap().id);
    }
    let left: Vec<String> = Store::open(snapshots.path())
        .unwrap()
        .list()
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(
        left,
        ids[1..].to_vec(),
        "the oldest went, the newest two stay"
    );
    assert_eq!(
        std::fs::read_dir(snapshots.path()).unwrap().count(),
        2,
        "no partials"
    );
}
