//! Snapshots: database and storage of the Immich stack, taken together and sealed.
//! `db` dumps and reads the database, `storage` makes the tree and manifest of the upload
//! location, `store` owns the on-disk layout (partial → sealed). `take` runs them in order;
//! any failure drops the partial, so nothing half-made is ever listed.

pub mod db;
pub mod dump_rows;
pub mod hash_queue;
pub mod hashes;
pub mod pause;
pub mod queue;
pub mod retention;
pub mod storage;
pub mod store;
pub mod unchanged;

use std::path::{Path, PathBuf};

use bollard::Docker;
use chrono::Utc;

use crate::config::Config;
use crate::discover::Stack;
use crate::progress::Progress;
use store::{CONFIG_DIR, DUMP_FILE, MANIFEST_FILE, Meta, STORAGE_DIR, Store};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot snapshot stack {project}: {what} unknown ({hint})")]
    Missing {
        project: String,
        what: &'static str,
        hint: &'static str,
    },
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Pause(#[from] pause::PauseError),
    #[error(
        "not enough free space in {dir}: a snapshot needs about {need_mb} MB (database {db_mb} MB{copy}), {free_mb} MB are free; free some space or move snapshots.dir"
    )]
    NoSpace {
        dir: PathBuf,
        need_mb: u64,
        free_mb: u64,
        db_mb: u64,
        copy: String,
    },
    #[error("copying {path} into the snapshot: {source}")]
    Config {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SnapshotError {
    /// Worth trying again in a moment: the database is starting or being recreated.
    pub fn is_transient(&self) -> bool {
        matches!(self, SnapshotError::Db(e) if e.is_transient())
    }
}

/// Why a snapshot asked of the queue did not seal, as every waiter gets it: the message
/// of the [`SnapshotError`] (or of the queue: no Docker, no stack) and whether it was worth
/// trying again (the database was starting, the stack was being recreated) when it was
/// given up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SnapshotFailure {
    pub message: String,
    pub transient: bool,
}

impl SnapshotFailure {
    /// A failure not worth retrying at once.
    pub fn lasting(message: impl Into<String>) -> SnapshotFailure {
        SnapshotFailure {
            message: message.into(),
            transient: false,
        }
    }
}

impl From<SnapshotError> for SnapshotFailure {
    fn from(e: SnapshotError) -> SnapshotFailure {
        SnapshotFailure {
            transient: e.is_transient(),
            message: e.to_string(),
        }
    }
}

/// The trigger of the snapshot a restore takes of the state it replaces. It runs no
/// retention: the snapshots the restore needs must all still be there when it reads them,
/// and the next ordinary seal runs retention anyway.
pub const PRE_RESTORE: &str = "pre-restore";

/// A sealed snapshot (or the one already sealed that covers the request) and what retention
/// did after the seal. The seal is what counts: a retention that fails is a warning.
#[derive(Debug, Clone)]
pub struct Taken {
    pub meta: Meta,
    /// None when retention did not run (a pre-restore snapshot, an existing snapshot reused).
    pub retention: Option<retention::RetentionOutcome>,
}

/// What to record about why a snapshot is taken, and (asked of the queue) of which stack.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The stack to snapshot, as the requester knows it; `None` when there is none right
    /// now (between `compose down` and `up`). The queue snapshots it, and retries with the
    /// stack discovery publishes meanwhile (`queue`); `take` is handed its stack directly.
    pub stack: Option<Stack>,
    pub trigger: String,
    pub label: Option<String>,
    /// The version (and image) the data belongs to, when not the server's current one: a
    /// snapshot taken while a new server is frozen holds the previous version's data.
    pub version: Option<(String, String)>,
}

impl Request {
    /// Taken for a version change (not asked for by the admin): an unchanged state already
    /// sealed covers it (see `unchanged`).
    pub fn covers_a_change(&self) -> bool {
        matches!(self.trigger.as_str(), "pre-update" | "pre-start")
    }
}

/// The steps of one snapshot, in order; everything else it says is a note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Migrations, counts and size of the database.
    Facts = 1,
    /// The point in time: writers paused, the database's snapshot exported, the storage
    /// tree built, writers resumed.
    Storage,
    /// The dump of the database as of the point.
    Dump,
    Config,
    Seal,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Facts,
        Stage::Storage,
        Stage::Dump,
        Stage::Config,
        Stage::Seal,
    ];

    /// This step beginning, saying `msg`.
    pub fn begins(self, msg: String) -> Progress {
        Progress::Step {
            n: self as usize,
            of: Stage::ALL.len(),
            msg,
        }
    }
}

/// The number of steps of one snapshot (facts, storage, dump, config, seal).
pub const STEPS: u64 = Stage::ALL.len() as u64;

/// Receives the steps and notes of a snapshot, for the admin watching it.
pub type Report<'a> = &'a (dyn Fn(Progress) + Send + Sync);

/// Takes one snapshot of `stack` and seals it. Database facts are read first, then the dump,
/// then the storage tree, then the compose config; the seal comes last, then retention
/// (best effort: once sealed, nothing that follows makes this an error).
pub async fn take(
    docker: &Docker,
    docker_host: &str,
    stack: &Stack,
    config: &Config,
    request: &Request,
    progress: Report<'_>,
) -> Result<Taken, SnapshotError> {
    let missing = |what, hint| SnapshotError::Missing {
        project: stack.project.clone(),
        what,
        hint,
    };
    let database = stack
        .database
        .as_ref()
        .ok_or_else(|| missing("database container", "set stack.database_container"))?;
    let access = stack
        .db
        .as_ref()
        .ok_or_else(|| missing("database access", "set the [database] keys"))?;
    let upload = stack
        .upload_location
        .clone()
        .ok_or_else(|| missing("upload location", "set stack.upload_location"))?;

    // Before anything is written: a stopped database is the commonest failure, name it.
    db::ensure_running(docker, docker_host, &database.container_name).await?;
    let started_at = Utc::now();
    let version = match &request.version {
        Some((name, _)) => name.clone(),
        None => stack
            .version
            .as_ref()
            .map(|v| v.name())
            .unwrap_or_else(|| "unknown".to_string()),
    };
    let store = Store::open(&config.snapshot_dir())?;
    let plan = storage::choose_method(&upload, store.root(), config.snapshots.copy_across)?;
    let id = store.unused_id(&store::snapshot_id(started_at, &version, &request.trigger));

    progress(Stage::Facts.begins(format!("snapshot {id}: reading migrations and counts")));
    let facts = db::facts(access).await?;
    let upload_mark = unchanged::upload_mark(&upload);
    if request.covers_a_change() {
        let image_id = request.version.as_ref().map(|(_, image)| image.as_str());
        let sealed = store.list()?;
        if let Some(same) = unchanged::covering(
            &sealed,
            &stack.project,
            &version,
            image_id,
            &facts,
            upload_mark.as_deref(),
        ) {
            progress(Progress::Note(format!(
                "nothing written since {} (same version, migrations, transaction counter and upload folders): it covers this change",
                same.id
            )));
            return Ok(Taken {
                meta: same.clone(),
                retention: None,
            });
        }
    }
    check_space(store.root(), &upload, &plan, facts.database_bytes).await?;
    let partial = store.begin(&id)?;
    let id = partial.id().to_string();

    // One point in time: the writers stop, the database's snapshot is exported and the
    // storage tree built, the writers go on. The dump and the facts are read from the
    // exported snapshot afterwards, so database and files are of the same moment.
    progress(Stage::Storage.begins(format!(
        "point in time: pausing {}; then the database's snapshot and the storage tree by {}",
        writer_names(stack),
        plan.method
    )));
    let paused = pause::pause_writers(docker, docker_host, stack, store.root(), &id).await?;
    let (taken, pause) = match db::Point::take(access).await {
        Ok(point) => {
            let (frozen, tree) = storage_tree_frozen(&upload, partial.path(), plan, config, &id);
            // Until the tree's moment is fixed (or the tree failed); the rest of it (the
            // manifest, a native snapshot's listing) runs with the writers going on.
            let _ = frozen.await;
            let pause = paused.resume().await;
            let tree = tree.await.expect("storage snapshot thread");
            (
                tree.map(|tree| (point, tree)).map_err(SnapshotError::from),
                pause,
            )
        }
        // Whatever happened: the writers go on (an early return would too, by the guard's Drop).
        Err(e) => (Err(e.into()), paused.resume().await),
    };
    progress(Progress::Note(format!("resumed: {}", pause.describe())));
    let (point, tree) = taken?;

    let facts = point.facts().await?;
    progress(Stage::Dump.begins(format!(
        "storage: {} files, {} MB in {:.1} s by {}{}; database: {} migrations, {} assets, {} MB; dumping with pg_dumpall, {} by pg_dump of the point",
        tree.files,
        tree.bytes / 1_000_000,
        tree.duration_ms as f64 / 1000.0,
        tree.method,
        if tree.skipped.is_empty() {
            String::new()
        } else {
            format!("; {} unreadable entries skipped", tree.skipped.len())
        },
        facts.migrations.len(),
        facts.assets.map_or("?".to_string(), |n| n.to_string()),
        facts.database_bytes / 1_000_000,
        access.database
    )));
    let dump = db::dump(
        docker,
        docker_host,
        &database.container_name,
        access,
        Some(&point),
        &partial.path().join(DUMP_FILE),
    )
    .await;
    point.end().await;
    let dump = dump?;

    progress(Stage::Config.begins(format!(
        "dump: {} MB of SQL, {} MB on disk in {:.1} s; compose config",
        dump.sql_bytes / 1_000_000,
        dump.bytes / 1_000_000,
        dump.duration_ms as f64 / 1000.0,
    )));
    let copied_config = copy_config(
        &stack.compose_files,
        stack.env_file.as_deref(),
        &partial.path().join(CONFIG_DIR),
    )?;
    if !copied_config.missing.is_empty() {
        progress(Progress::Note(format!(
            "not in the snapshot (missing): {}",
            copied_config.missing.join(", ")
        )));
    }

    let copied = if tree.method.copies_data() {
        tree.bytes
    } else {
        0
    };
    let meta = Meta {
        format: 1,
        id,
        trigger: request.trigger.clone(),
        label: request.label.clone(),
        project: stack.project.clone(),
        version,
        image_id: match &request.version {
            Some((_, image)) => Some(image.clone()),
            None => stack.version.as_ref().map(|v| v.image_id.clone()),
        },
        repo_digests: match &request.version {
            Some(_) => Vec::new(),
            None => stack
                .version
                .as_ref()
                .map(|v| v.repo_digests.clone())
                .unwrap_or_default(),
        },
        env_version: stack.env_version.clone(),
        started_at,
        sealed_at: Utc::now(),
        db: facts,
        size_bytes: dump.bytes + tree.manifest_bytes + copied_config.bytes + copied,
        dump,
        storage: tree,
        upload_location: upload,
        config_files: copied_config.files,
        upload_mark,
        missing_config_files: copied_config.missing,
        check: None,
        hashes: None,
        db_image: Some(store::DbImage {
            reference: database.image.clone(),
            id: database.image_id.clone(),
        }),
        drill: None,
        pause: Some(pause),
    };
    partial.seal(&meta)?;
    progress(Stage::Seal.begins(format!("sealed {}", meta.id)));
    if request.trigger == PRE_RESTORE {
        return Ok(Taken {
            meta,
            retention: None,
        });
    }
    let outcome = run_retention(store, config).await;
    if !outcome.removed.is_empty() {
        progress(Progress::Note(format!(
            "retention removed {}",
            outcome.removed.join(", ")
        )));
    }
    if let Some(warning) = outcome.warning() {
        tracing::warn!(snapshot = %meta.id, "{warning}");
        progress(Progress::Note(format!(
            "warning: {warning}; snapshot {} is sealed",
            meta.id
        )));
    }
    Ok(Taken {
        meta,
        retention: Some(outcome),
    })
}

/// The writers a snapshot pauses, for its first line.
fn writer_names(stack: &Stack) -> String {
    let names: Vec<&str> = [&stack.server, &stack.machine_learning]
        .into_iter()
        .flatten()
        .map(|s| s.container_name.as_str())
        .collect();
    if names.is_empty() {
        "nothing (no server or machine learning found)".to_string()
    } else {
        format!("the writers ({})", names.join(", "))
    }
}

/// Retention on a blocking thread: deleting a snapshot of many files takes a while.
async fn run_retention(store: Store, config: &Config) -> retention::RetentionOutcome {
    let config = config.clone();
    tokio::task::spawn_blocking(move || retention::apply(&store, &config))
        .await
        .unwrap_or_else(|e| retention::RetentionOutcome {
            skipped: Some(format!("the retention thread failed: {e}")),
            ..Default::default()
        })
}

/// The storage half of a snapshot into `snap_dir` (`storage/` and the manifest), on a
/// blocking thread.
pub async fn storage_tree(
    upload: &std::path::Path,
    snap_dir: &std::path::Path,
    plan: storage::Plan,
    config: &Config,
    id: &str,
) -> Result<storage::StorageTree, storage::StorageError> {
    let (_, tree) = storage_tree_frozen(upload, snap_dir, plan, config, id);
    tree.await.expect("storage snapshot thread")
}

/// [`storage_tree`] started on a blocking thread: a signal once the tree's moment is fixed
/// (`storage::snapshot_tree_frozen`; dropped unsent when the tree fails first), and the tree.
fn storage_tree_frozen(
    upload: &Path,
    snap_dir: &Path,
    plan: storage::Plan,
    config: &Config,
    id: &str,
) -> (
    tokio::sync::oneshot::Receiver<()>,
    tokio::task::JoinHandle<Result<storage::StorageTree, storage::StorageError>>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (upload, dir) = (upload.to_path_buf(), snap_dir.to_path_buf());
    let options = storage_options(config, id);
    let task = tokio::task::spawn_blocking(move || {
        let tx = std::sync::Mutex::new(Some(tx));
        let frozen = || {
            if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(());
            }
        };
        storage::snapshot_tree_frozen(
            &upload,
            &dir,
            STORAGE_DIR,
            &dir.join(MANIFEST_FILE),
            &plan,
            &options,
            &frozen,
        )
    });
    (rx, task)
}

fn storage_options(config: &Config, id: &str) -> storage::Options {
    storage::Options {
        exclude: config.snapshots.exclude.clone(),
        skip_unreadable: config.snapshots.skip_unreadable,
        id: id.to_string(),
    }
}

/// A pg_dumpall compressed with zstd is far smaller than the database on disk; half of it is
/// a safe upper bound. A hard-link tree costs only directories and the manifest (the margin);
/// a copy costs the whole upload location.
const DUMP_RATIO: f64 = 0.5;
const SPACE_MARGIN: u64 = 16 << 20;

async fn check_space(
    dir: &std::path::Path,
    upload: &std::path::Path,
    plan: &storage::Plan,
    database_bytes: i64,
) -> Result<(), SnapshotError> {
    // A native fallback to a copy needs the room too.
    let copy_bytes = if plan.method.copies_data() || plan.fallback.is_some_and(|m| m.copies_data())
    {
        let upload = upload.to_path_buf();
        tokio::task::spawn_blocking(move || {
            walkdir::WalkDir::new(upload)
                .into_iter()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_file())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum::<u64>()
        })
        .await
        .expect("size walk")
    } else {
        0
    };
    let db = database_bytes.max(0) as u64;
    let need = (db as f64 * DUMP_RATIO) as u64 + copy_bytes + SPACE_MARGIN;
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| store::StoreError::Io {
        path: dir.to_path_buf(),
        action: "checking free space",
        source: e.into(),
    })?;
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    if free < need {
        return Err(SnapshotError::NoSpace {
            dir: dir.to_path_buf(),
            need_mb: need.div_ceil(1 << 20),
            free_mb: free >> 20,
            db_mb: db >> 20,
            copy: if copy_bytes > 0 {
                format!(", copy of the uploads {} MB", copy_bytes >> 20)
            } else {
                String::new()
            },
        });
    }
    Ok(())
}

/// The compose config as copied into a snapshot's `config/`.
#[derive(Debug, Default, PartialEq)]
pub struct CopiedConfig {
    pub files: Vec<String>,
    pub bytes: u64,
    /// A `.env` that is not there: compose runs without one, so it is recorded, not an error.
    pub missing: Vec<String>,
}

/// Copies the compose files and `.env` into `config_dir` (owner-only: `.env` holds the
/// database password).
pub fn copy_config(
    compose_files: &[PathBuf],
    env_file: Option<&Path>,
    config_dir: &Path,
) -> Result<CopiedConfig, SnapshotError> {
    let mut copied = CopiedConfig::default();
    crate::owner_only::create_dir(config_dir).map_err(|source| SnapshotError::Config {
        path: config_dir.to_path_buf(),
        source,
    })?;
    let files = compose_files.iter().map(|p| (p.as_path(), false));
    for (path, optional) in files.chain(env_file.map(|p| (p, true))) {
        let Some(name) = path.file_name() else {
            continue;
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => {
                copied.missing.push(path.display().to_string());
                continue;
            }
            Err(source) => {
                return Err(SnapshotError::Config {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        crate::durable::write_synced(&config_dir.join(name), &bytes).map_err(|source| {
            SnapshotError::Config {
                path: config_dir.join(name),
                source,
            }
        })?;
        copied.bytes += bytes.len() as u64;
        copied.files.push(name.to_string_lossy().into_owned());
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steps_of_a_snapshot_are_numbered_one_to_their_count() {
        let numbers: Vec<_> = Stage::ALL
            .iter()
            .map(|s| match s.begins(String::new()) {
                Progress::Step { n, of, .. } => (n, of),
                Progress::Note(_) => panic!("a stage is a step"),
            })
            .collect();
        let expected: Vec<_> = (1..=STEPS as usize).map(|n| (n, STEPS as usize)).collect();
        assert_eq!(numbers, expected);
        // The bar stands at the steps done: from 0 at the first to all but one at the seal.
        assert_eq!(Stage::Facts.begins(String::new()).done(), Some(0));
        assert_eq!(Stage::Seal.begins(String::new()).done(), Some(STEPS - 1));
    }

    #[test]
    fn a_missing_env_is_recorded_and_a_missing_compose_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let compose = dir.path().join("docker-compose.yml");
        std::fs::write(&compose, "services: {}\n").unwrap();
        let env = dir.path().join(".env");
        let copied = copy_config(
            std::slice::from_ref(&compose),
            Some(&env),
            &dir.path().join("config"),
        )
        .unwrap();
        assert_eq!(copied.files, ["docker-compose.yml"]);
        assert_eq!(copied.missing, [env.display().to_string()]);
        assert!(dir.path().join("config/docker-compose.yml").exists());
        // The compose file itself is what compose runs: without it there is nothing to save.
        let err = copy_config(
            &[dir.path().join("gone.yml")],
            Some(&env),
            &dir.path().join("config2"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("gone.yml"), "{err}");
    }
}
