//! The snapshot directory on disk. A snapshot is written under `.partial-<id>`, fsynced, and
//! renamed to `<id>` once `meta.json` is in place: a directory without that rename is never
//! listed as usable. This module never deletes a sealed snapshot (retention decides that,
//! and never the newest).

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::db::{DbFacts, DumpFile};
use super::storage::StorageTree;
use crate::durable::{PARTIAL_PREFIX, replace_synced, sync_dir, unused_name};

pub const META_FILE: &str = "meta.json";
pub const DUMP_FILE: &str = "db.sql.zst";
pub const STORAGE_DIR: &str = "storage";
pub const MANIFEST_FILE: &str = "manifest.jsonl.zst";
pub const CONFIG_DIR: &str = "config";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("snapshot dir {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("a snapshot named {id} already exists in {dir}")]
    Exists { id: String, dir: PathBuf },
}

fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        path,
        action,
        source,
    }
}

/// Everything recorded about one sealed snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub id: String,
    /// Why it was taken: `manual`, `pre-update`, ...
    pub trigger: String,
    pub label: Option<String>,
    pub project: String,
    /// Immich version the database was last run by when the snapshot began.
    pub version: String,
    pub image_id: Option<String>,
    pub repo_digests: Vec<String>,
    pub env_version: Option<String>,
    pub started_at: DateTime<Utc>,
    pub sealed_at: DateTime<Utc>,
    pub db: DbFacts,
    pub dump: DumpFile,
    pub storage: StorageTree,
    pub upload_location: PathBuf,
    /// Compose files and `.env` as copied into `config/`.
    pub config_files: Vec<String>,
    /// Config files that were not there to copy (a deleted `.env`): recorded, not a failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_config_files: Vec<String>,
    /// The upload location's top-level folders and their mtimes when it began: with the
    /// database's transaction snapshot, what says nothing was written since (snapshot/unchanged.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_mark: Option<Vec<(String, i64)>>,
    /// Bytes this snapshot added on disk (hard links cost none).
    pub size_bytes: u64,
    /// The newest check of the sealed snapshot (the content-hash pass after the seal,
    /// snapshot/hashes.rs): retention keeps the newest snapshot whose check passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<SnapshotCheck>,
    /// The manifest's content hashes, once the pass after the seal finished
    /// (snapshot/hashes.rs): `hashes.jsonl.zst` beside the manifest, and its SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<super::hashes::ContentHashes>,
    /// The live database container's image when the snapshot was taken: what a restore
    /// drill replays into when that container is gone (src/drill/).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_image: Option<DbImage>,
    /// The newest restore drill of this snapshot (src/drill/): retention keeps the newest
    /// snapshot whose drill passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillResult>,
    /// How the writers were stopped for the snapshot's point in time (snapshot/pause.rs):
    /// what was paused and how long, or why nothing was. None in snapshots of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<super::pause::Pause>,
}

/// The database container's image, as the snapshot saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbImage {
    /// As the container names it (`ghcr.io/immich-app/postgres:14-vectorchord…`).
    pub reference: String,
    /// `sha256:…`; what a drill starts when it still exists.
    pub id: String,
}

/// One restore drill: the snapshot's dump replayed into a scratch database and its storage
/// checked against the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillResult {
    pub at: DateTime<Utc>,
    pub passed: bool,
    /// The whole drill: scratch database, replay, checks.
    pub duration_ms: u64,
    /// The replay alone (0 when it did not run).
    pub replay_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Originals of the manifest found in the snapshot's storage with their recorded size.
    pub files_checked: u64,
    /// Originals read whole and hashed (a sample).
    pub sample_hashed: u64,
    /// What the sample was compared with: `content hashes` (the hash pass had run) or
    /// `readable at the recorded size`.
    pub sample_against: String,
    /// The image the scratch database ran.
    pub image: String,
    /// Where the scratch database lived, and why (`tmpfs`, or a dir when too large).
    pub scratch: String,
}

impl Meta {
    /// Whether the newest drill of this snapshot passed.
    pub fn drill_passed(&self) -> bool {
        self.drill.as_ref().is_some_and(|d| d.passed)
    }

    /// Whether a drill ran and failed.
    pub fn drill_failed(&self) -> bool {
        self.drill.as_ref().is_some_and(|d| !d.passed)
    }
}

/// One check of a sealed snapshot's contents, recorded in its meta.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotCheck {
    /// What was checked: `content-hashes` (every stored original read and hashed).
    pub kind: String,
    pub at: DateTime<Utc>,
    pub passed: bool,
    /// One line: what was found (counts, the first problem).
    pub summary: String,
}

impl Meta {
    /// Whether the newest check of this snapshot passed.
    pub fn check_passed(&self) -> bool {
        self.check.as_ref().is_some_and(|c| c.passed)
    }
}

/// The `meta.json` of the snapshot at `dir` (sealed or not); a file that does not parse is
/// `InvalidData`.
pub fn read_meta(dir: &Path) -> std::io::Result<Meta> {
    let bytes = std::fs::read(dir.join(META_FILE))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Serializes every rewrite of a sealed snapshot's meta.json in this process: the
/// content-hash pass and the restore drill each add their own fields after the seal, and a
/// read-modify-write of one must not drop the other's.
static META_WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Rewrites the meta.json of the sealed snapshot at `dir` with `change` applied (temp file,
/// fsync, rename): read again under the lock, so only the fields `change` touches change.
/// `Ok(None)`: the snapshot is gone (retention or the admin removed it meanwhile).
pub fn update_meta(dir: &Path, change: impl FnOnce(&mut Meta)) -> std::io::Result<Option<Meta>> {
    let _one_writer = META_WRITES.lock().unwrap_or_else(|p| p.into_inner());
    let mut meta = match read_meta(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    change(&mut meta);
    let json = serde_json::to_vec_pretty(&meta).expect("meta serializes");
    match replace_synced(&dir.join(META_FILE), &json) {
        Ok(()) => Ok(Some(meta)),
        Err(_) if !dir.join(META_FILE).exists() => Ok(None),
        Err(e) => Err(e),
    }
}

pub struct Store {
    root: PathBuf,
}

/// `<UTC time>-<version>-<trigger>`, e.g. `20261125T022301Z-v1.119.0-pre-update`.
pub fn snapshot_id(at: DateTime<Utc>, version: &str, trigger: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!(
        "{}-{}-{}",
        at.format("%Y%m%dT%H%M%SZ"),
        clean(version),
        clean(trigger)
    )
}

impl Store {
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        crate::owner_only::create_dir_all(root).map_err(io(root, "creating it"))?;
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes what an interrupted snapshot left behind, going on past an entry it cannot
    /// remove (an immutable file, a busy mount): the daemon must start and protect anyway,
    /// and names what is left (README.md "Snapshots"). `Err` only when the dir cannot be
    /// listed. Never call it while a snapshot of this store may be running: its partial
    /// looks the same.
    pub fn clean_partials(&self) -> Result<Cleanup, StoreError> {
        let mut cleanup = Cleanup::default();
        for entry in std::fs::read_dir(&self.root).map_err(io(&self.root, "listing it"))? {
            let entry = entry.map_err(io(&self.root, "listing it"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(PARTIAL_PREFIX) {
                continue;
            }
            match self.remove_partial(&name) {
                Ok(()) => cleanup.removed.push(name),
                Err(e) => cleanup.left.push(Leftover::of(&e, entry.path())),
            }
        }
        Ok(cleanup)
    }

    /// Removes one leftover partial by name (`.partial-...` directly under the root); one
    /// already gone counts as removed. Anything else is refused: this never deletes a
    /// sealed snapshot.
    pub fn remove_partial(&self, name: &str) -> Result<(), StoreError> {
        let path = self.root.join(name);
        if !self.is_partial(&path) {
            return Err(StoreError::Io {
                path,
                action: "removing a partial snapshot",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a partial snapshot of this store",
                ),
            });
        }
        match super::storage::remove_snapshot_dir(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
                path,
                action: "removing a partial snapshot",
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Whether `path` is a partial (unsealed) snapshot directly under this store's root.
    pub fn is_partial(&self, path: &Path) -> bool {
        path.parent() == Some(self.root.as_path())
            && path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(PARTIAL_PREFIX))
    }

    /// `base`, or `base-2`, `base-3`... when snapshots were taken within the same second.
    pub fn unused_id(&self, base: &str) -> String {
        unused_name(&self.root, base)
    }

    /// Starts a snapshot: an empty `.partial-<id>` dir, removed again unless sealed. An old
    /// partial of that name that cannot be removed is left (the partial cleanup retries it)
    /// and the snapshot takes the next free name instead: see [`Partial::id`].
    pub fn begin(&self, id: &str) -> Result<Partial, StoreError> {
        let mut id = id.to_string();
        if self.root.join(&id).exists() {
            return Err(StoreError::Exists {
                id,
                dir: self.root.clone(),
            });
        }
        let old = self.root.join(format!("{PARTIAL_PREFIX}{id}"));
        if old.exists()
            && let Err(e) = super::storage::remove_snapshot_dir(&old)
        {
            tracing::warn!(path = %old.display(), error = %e, "cannot remove an old partial snapshot; using another name");
            id = self.unused_id(&id);
        }
        let dir = self.root.join(format!("{PARTIAL_PREFIX}{id}"));
        crate::owner_only::create_dir(&dir).map_err(io(&dir, "creating it"))?;
        Ok(Partial {
            final_dir: self.root.join(&id),
            id,
            dir,
            sealed: false,
        })
    }

    /// Deletes one sealed snapshot. Only retention calls this.
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.root.join(id);
        // Unseal first (rename to a partial name) so a crash mid-delete leaves a partial,
        // which the next start removes, never a half-deleted "sealed" snapshot.
        let doomed = self.root.join(format!("{PARTIAL_PREFIX}deleting-{id}"));
        std::fs::rename(&dir, &doomed).map_err(io(&dir, "unsealing it for deletion"))?;
        super::storage::remove_snapshot_dir(&doomed).map_err(io(&doomed, "deleting it"))
    }

    /// Sealed snapshots, oldest first. Partial and unreadable dirs are never listed.
    pub fn list(&self) -> Result<Vec<Meta>, StoreError> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io(&self.root, "listing it"))? {
            let entry = entry.map_err(io(&self.root, "listing it"))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let meta_path = entry.path().join(META_FILE);
            let Ok(text) = std::fs::read_to_string(&meta_path) else {
                continue;
            };
            match serde_json::from_str::<Meta>(&text) {
                Ok(meta) => all.push(meta),
                Err(e) => {
                    tracing::warn!(path = %meta_path.display(), error = %e, "unreadable snapshot meta; not listed")
                }
            }
        }
        all.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
        Ok(all)
    }
}

/// What [`Store::clean_partials`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Cleanup {
    /// Names removed.
    pub removed: Vec<String>,
    /// What could not be removed, and why.
    pub left: Vec<Leftover>,
}

/// A partial snapshot that could not be removed: shown in `status`, retried later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leftover {
    pub path: PathBuf,
    pub error: String,
}

impl Leftover {
    /// `error` removing `path`, as the system said it (`Operation not permitted`).
    pub fn of(error: &StoreError, path: PathBuf) -> Leftover {
        let error = match error {
            StoreError::Io { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        Leftover { path, error }
    }
}

pub struct Partial {
    id: String,
    dir: PathBuf,
    final_dir: PathBuf,
    sealed: bool,
}

impl Partial {
    /// The snapshot's id: the one asked for, or the next free one (see [`Store::begin`]).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes meta.json (temp file, fsync, rename), fsyncs, and renames the dir into place.
    pub fn seal(mut self, meta: &Meta) -> Result<PathBuf, StoreError> {
        debug_assert_eq!(meta.id, self.id, "a snapshot is sealed under its own id");
        let json = serde_json::to_vec_pretty(meta).expect("meta serializes");
        let meta_path = self.dir.join(META_FILE);
        replace_synced(&meta_path, &json).map_err(io(&meta_path, "writing meta"))?;
        sync_dir(&self.dir).map_err(io(&self.dir, "syncing it"))?;
        std::fs::rename(&self.dir, &self.final_dir).map_err(io(&self.final_dir, "sealing it"))?;
        if let Some(parent) = self.final_dir.parent() {
            sync_dir(parent).map_err(io(parent, "syncing it"))?;
        }
        self.sealed = true;
        Ok(self.final_dir.clone())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.sealed
            && let Err(e) = super::storage::remove_snapshot_dir(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.dir.display(), error = %e, "could not remove partial snapshot; it is removed at next start");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An immutable file (`chattr +i`, root on ext4 and most others): nothing can remove
    /// it or the dir holding it. The flag goes again on drop, also when a test panics, so the
    /// temp dir can be removed.
    pub struct Immutable(PathBuf);

    impl Immutable {
        /// None (and a note) where the flag cannot be set: not root, or a filesystem without it.
        pub fn set(path: &Path) -> Option<Immutable> {
            let ok = std::process::Command::new("chattr")
                .arg("+i")
                .arg(path)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("skipped: cannot chattr +i {}", path.display());
            }
            ok.then(|| Immutable(path.to_path_buf()))
        }

        /// The file is at `path` now (its dir was renamed): the flag is taken off there.
        pub fn moved_to(&mut self, path: PathBuf) {
            self.0 = path;
        }
    }

    impl Drop for Immutable {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.0)
                .status();
        }
    }

    /// A drill of a snapshot at `at` that passed or failed.
    pub fn drill(passed: bool, at: DateTime<Utc>) -> DrillResult {
        DrillResult {
            at,
            passed,
            duration_ms: 1000,
            replay_ms: 500,
            first_error: (!passed).then(|| "psql stopped".to_string()),
            files_checked: 3,
            sample_hashed: 3,
            sample_against: "content hashes".into(),
            image: "postgres:15".into(),
            scratch: "tmpfs".into(),
        }
    }

    pub fn meta(id: &str, started: DateTime<Utc>) -> Meta {
        Meta {
            format: 1,
            id: id.into(),
            trigger: "manual".into(),
            label: None,
            project: "immich".into(),
            version: "v1.119.0".into(),
            image_id: None,
            repo_digests: vec![],
            env_version: None,
            started_at: started,
            sealed_at: started,
            db: DbFacts::default(),
            dump: DumpFile::default(),
            storage: StorageTree {
                method: super::super::storage::StorageMethod::Hardlink,
                files: 0,
                dirs: 0,
                symlinks: 0,
                bytes: 0,
                excluded: vec![],
                manifest_bytes: 0,
                manifest_sha256: None,
                duration_ms: 0,
                source: None,
                native: None,
                notes: vec![],
                skipped: vec![],
            },
            upload_location: "/srv".into(),
            config_files: vec![],
            missing_config_files: vec![],
            upload_mark: None,
            size_bytes: 0,
            check: None,
            hashes: None,
            db_image: None,
            drill: None,
            pause: None,
        }
    }

    #[test]
    fn ids_sort_by_time_and_name_version_and_trigger() {
        let at = "2026-11-25T02:23:01Z".parse().unwrap();
        assert_eq!(
            snapshot_id(at, "v1.119.0", "pre-update"),
            "20261125T022301Z-v1.119.0-pre-update"
        );
        assert_eq!(snapshot_id(at, "a/b c", "x"), "20261125T022301Z-a_b_c-x");
    }

    #[test]
    fn only_sealed_snapshots_are_listed_and_partials_are_cleaned() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let t0: DateTime<Utc> = "2026-11-25T02:00:00Z".parse().unwrap();

        let p = store.begin("a").unwrap();
        std::fs::write(p.path().join("x"), "1").unwrap();
        p.seal(&meta("a", t0)).unwrap();

        // Dropped without sealing: gone.
        let p = store.begin("b").unwrap();
        let partial_path = p.path().to_path_buf();
        drop(p);
        assert!(!partial_path.exists());

        // A crash leaves a partial: never listed, removed by clean_partials.
        let p = store.begin("c").unwrap();
        let leftover = p.path().to_path_buf();
        std::mem::forget(p);
        assert_eq!(
            store
                .list()
                .unwrap()
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(
            store.clean_partials().unwrap(),
            Cleanup {
                removed: vec![".partial-c".to_string()],
                left: vec![],
            }
        );
        assert!(!leftover.exists());
        assert!(root.path().join("a/meta.json").exists());
        assert!(matches!(store.begin("a"), Err(StoreError::Exists { .. })));
        assert_eq!(store.unused_id("a"), "a-2");
        assert_eq!(store.unused_id("d"), "d");
    }

    /// Issue 18: an entry that cannot be removed is named and skipped; the others go, and a
    /// snapshot that wants its name takes the next one.
    #[test]
    fn a_partial_that_cannot_be_removed_is_named_and_the_rest_go_on() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        for name in ["a", "stuck", "z"] {
            let p = store.begin(name).unwrap();
            std::fs::write(p.path().join("f"), "1").unwrap();
            std::mem::forget(p);
        }
        let stuck = root.path().join(".partial-stuck");
        let Some(flag) = Immutable::set(&stuck.join("f")) else {
            return;
        };
        let cleanup = store.clean_partials().unwrap();
        assert_eq!(cleanup.removed, [".partial-a", ".partial-z"]);
        assert_eq!(cleanup.left.len(), 1);
        assert_eq!(cleanup.left[0].path, stuck);
        assert!(
            cleanup.left[0].error.contains("Operation not permitted"),
            "{:?}",
            cleanup.left
        );
        // begin("stuck") cannot clear the old partial: it takes another name and seals.
        let p = store.begin("stuck").unwrap();
        assert_eq!(p.id(), "stuck-2");
        let t0 = "2026-11-25T02:00:00Z".parse().unwrap();
        p.seal(&meta("stuck-2", t0)).unwrap();
        assert!(root.path().join("stuck-2/meta.json").is_file());
        // Only partials are removed by name; once the flag is gone, the leftover goes.
        assert!(store.remove_partial("stuck-2").is_err());
        assert!(store.remove_partial("../x").is_err());
        assert!(store.remove_partial(".partial-stuck").is_err());
        drop(flag);
        store.remove_partial(".partial-stuck").unwrap();
        assert!(!stuck.exists());
        store.remove_partial(".partial-stuck").unwrap();
        assert!(
            root.path().join("stuck-2").is_dir(),
            "sealed is never touched"
        );
    }
}
