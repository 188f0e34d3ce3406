//! Keeping the current state before a restore changes it (docs/recovery.md §3): a snapshot
//! with trigger `pre-restore`. A database that answers is dumped as any snapshot is
//! (`snapshot::take`). One that does not (it will not start, wrong PostgreSQL version,
//! corrupt files) is kept as its data directory, moved (or, across filesystems, copied) into
//! the sealed snapshot as `database-files/` with the database stopped; that snapshot holds no
//! dump and says so in its label. Either way the upload location and the compose files are
//! in it, so the files added since the restored snapshot are kept, never deleted.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;

use super::{Ctx, Progress, RestoreError};
use crate::discover::Stack;
use crate::snapshot::db::{DbFacts, DumpFile};
use crate::snapshot::store::{META_FILE, Meta, Store};
use crate::snapshot::{self, storage};

/// Where a database that could not be dumped is kept inside the pre-restore snapshot.
pub const DB_FILES_DIR: &str = "database-files";
pub const TRIGGER: &str = snapshot::PRE_RESTORE;

/// The preserved state: the snapshot's id (and meta), and whether its database was dumped.
pub struct Preserved {
    pub meta: Meta,
    pub dumped: bool,
}

/// A dumpable database: the ordinary snapshot, with its progress lines passed on as notes.
pub async fn take_dumped(
    ctx: &Ctx<'_>,
    stack: &Stack,
    label: String,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Preserved, RestoreError> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let say = move |p: Progress| {
        let _ = tx.send(p);
    };
    let request = snapshot::Request {
        trigger: TRIGGER.into(),
        label: Some(label),
        ..Default::default()
    };
    let take = snapshot::take(ctx.docker, ctx.host, stack, ctx.config, &request, &say);
    tokio::pin!(take);
    let result = loop {
        tokio::select! {
            result = &mut take => break result,
            Some(p) = rx.recv() => progress(Progress::Note(p.text().to_string())),
        }
    };
    while let Ok(p) = rx.try_recv() {
        progress(Progress::Note(p.text().to_string()));
    }
    Ok(Preserved {
        meta: result.map_err(RestoreError::Preserve)?.meta,
        dumped: true,
    })
}

/// A database that cannot be dumped: the storage and config as any snapshot, sealed with no
/// dump, then the (stopped) database's data dir moved or copied into it.
pub async fn take_files(
    ctx: &Ctx<'_>,
    stack: &Stack,
    reason: &str,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Preserved, RestoreError> {
    let data_dir = stack
        .db_data_location
        .clone()
        .ok_or(RestoreError::Missing {
            what: "database data dir",
            hint: "set stack.db_data_location",
        })?;
    let upload = stack.upload_location.clone().ok_or(RestoreError::Missing {
        what: "upload location",
        hint: "set stack.upload_location",
    })?;
    let store_err = |e| RestoreError::Preserve(snapshot::SnapshotError::Store(e));
    let store = Store::open(&ctx.config.snapshot_dir()).map_err(store_err)?;
    let started_at = Utc::now();
    let version = stack
        .version
        .as_ref()
        .map(|v| v.name())
        .unwrap_or_else(|| "unknown".into());
    let id = store.unused_id(&crate::snapshot::store::snapshot_id(
        started_at, &version, TRIGGER,
    ));
    let partial = store.begin(&id).map_err(store_err)?;
    let id = partial.id().to_string();
    progress(Progress::Note(format!(
        "snapshot {id}: the database cannot be dumped ({reason}); keeping its data dir {} as files",
        data_dir.display()
    )));
    let plan = storage::choose_method(&upload, store.root(), ctx.config.snapshots.copy_across)
        .map_err(|e| RestoreError::Preserve(e.into()))?;
    let tree = snapshot::storage_tree(&upload, partial.path(), plan, ctx.config, &id)
        .await
        .map_err(|e| RestoreError::Preserve(e.into()))?;
    progress(Progress::Note(format!(
        "storage: {} files, {} MB by {}",
        tree.files,
        tree.bytes / 1_000_000,
        tree.method
    )));
    let copied = snapshot::copy_config(
        &stack.compose_files,
        stack.env_file.as_deref(),
        &partial.path().join(crate::snapshot::store::CONFIG_DIR),
    )
    .map_err(RestoreError::Preserve)?;
    let meta = Meta {
        format: 1,
        id: id.clone(),
        trigger: TRIGGER.into(),
        label: Some(format!(
            "no database dump: the database could not be dumped ({reason}); its data dir is in {DB_FILES_DIR}/"
        )),
        project: stack.project.clone(),
        version,
        image_id: stack.version.as_ref().map(|v| v.image_id.clone()),
        repo_digests: Vec::new(),
        env_version: stack.env_version.clone(),
        started_at,
        sealed_at: Utc::now(),
        db: DbFacts::default(),
        dump: DumpFile::default(),
        size_bytes: tree.manifest_bytes + copied.bytes,
        storage: tree,
        upload_location: upload,
        config_files: copied.files,
        missing_config_files: copied.missing,
        upload_mark: None,
        check: None,
        hashes: None,
        db_image: None,
        drill: None,
        pause: None,
    };
    let sealed = partial.seal(&meta).map_err(store_err)?;
    // After the seal: a partial dir is removed by the next daemon start, and these files must
    // never be in one.
    let dest = sealed.join(DB_FILES_DIR);
    let how = keep_data_dir(&data_dir, &dest).await?;
    progress(Progress::Note(format!(
        "database data dir {} {how} {}",
        data_dir.display(),
        dest.display()
    )));
    Ok(Preserved {
        meta,
        dumped: false,
    })
}

/// Moves `data_dir` to `dest` and leaves an empty dir with the same owner and mode in its
/// place (compose mounts it); across filesystems, copies it (the caller empties it later).
async fn keep_data_dir(data_dir: &Path, dest: &Path) -> Result<&'static str, RestoreError> {
    let io = |path: &Path, action: &'static str| {
        let path = path.to_path_buf();
        move |source| RestoreError::Io {
            path,
            action,
            source,
        }
    };
    let meta = std::fs::metadata(data_dir).map_err(io(data_dir, "reading it"))?;
    match std::fs::rename(data_dir, dest) {
        Ok(()) => {
            recreate_empty(data_dir, &meta)?;
            if let Some(parent) = data_dir.parent() {
                crate::durable::sync_dir(parent).map_err(io(parent, "syncing it"))?;
            }
            Ok("moved to")
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let (from, to) = (data_dir.to_path_buf(), dest.to_path_buf());
            let parent = to.parent().map(Path::to_path_buf).unwrap_or_default();
            let name = to.file_name().unwrap_or_default().to_owned();
            tokio::task::spawn_blocking(move || {
                storage::snapshot_tree(
                    &from,
                    &parent,
                    &name.to_string_lossy(),
                    &parent.join(format!("{}.manifest.jsonl.zst", name.to_string_lossy())),
                    &storage::Plan::walking(storage::StorageMethod::Copy),
                    &storage::Options::default(),
                )
            })
            .await
            .expect("copy thread")
            .map_err(|e| RestoreError::Preserve(e.into()))?;
            Ok("copied to")
        }
        Err(e) => Err(io(data_dir, "moving it into the pre-restore snapshot")(e)),
    }
}

/// An empty data dir with the old one's owner and mode (the database image's entrypoint
/// initialises a cluster in it).
pub fn recreate_empty(path: &Path, like: &std::fs::Metadata) -> Result<(), RestoreError> {
    let io = |action: &'static str| {
        let path = path.to_path_buf();
        move |source| RestoreError::Io {
            path,
            action,
            source,
        }
    };
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(io("creating it empty")(e));
        }
        _ => {}
    }
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(like.permissions().mode() & 0o7777),
    )
    .map_err(io("setting its mode"))?;
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(path, Some(like.uid()), Some(like.gid()))
            .map_err(io("setting its owner"))?;
    }
    Ok(())
}

/// Empties `path` (a data dir whose contents are kept elsewhere: in the pre-restore snapshot,
/// or a cluster the restore itself made).
pub fn empty_dir(path: &Path) -> Result<(), RestoreError> {
    let io = |path: PathBuf, action: &'static str| {
        move |source| RestoreError::Io {
            path,
            action,
            source,
        }
    };
    let entries = match std::fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path.to_path_buf(), "listing it")(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(path.to_path_buf(), "listing it"))?;
        let p = entry.path();
        let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        result.map_err(io(p, "removing it"))?;
    }
    Ok(())
}

/// Whether a sealed snapshot holds a database data dir (a pre-restore of a broken database).
pub fn holds_db_files(snapshot_dir: &Path) -> bool {
    snapshot_dir.join(DB_FILES_DIR).exists() && snapshot_dir.join(META_FILE).exists()
}

/// How long a database that is not running gets to start and answer before it counts as
/// one that cannot start.
pub const START_WAIT: Duration = Duration::from_secs(45);
