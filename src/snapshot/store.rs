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

    /// Removes what an interrupted snapshot left behind; returns the removed names.
    pub fn clean_partials(&self) -> Result<Vec<String>, StoreError> {
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io(&self.root, "listing it"))? {
            let entry = entry.map_err(io(&self.root, "listing it"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PARTIAL_PREFIX) {
                super::storage::remove_snapshot_dir(&entry.path())
                    .map_err(io(&entry.path(), "removing a partial snapshot"))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// `base`, or `base-2`, `base-3`... when snapshots were taken within the same second.
    pub fn unused_id(&self, base: &str) -> String {
        unused_name(&self.root, base)
    }

    /// Starts a snapshot: an empty `.partial-<id>` dir, removed again unless sealed.
    pub fn begin(&self, id: &str) -> Result<Partial, StoreError> {
        let final_dir = self.root.join(id);
        if final_dir.exists() {
            return Err(StoreError::Exists {
                id: id.to_string(),
                dir: self.root.clone(),
            });
        }
        let dir = self.root.join(format!("{PARTIAL_PREFIX}{id}"));
        if dir.exists() {
            super::storage::remove_snapshot_dir(&dir)
                .map_err(io(&dir, "removing an old partial"))?;
        }
        crate::owner_only::create_dir(&dir).map_err(io(&dir, "creating it"))?;
        Ok(Partial {
            dir,
            final_dir,
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

pub struct Partial {
    dir: PathBuf,
    final_dir: PathBuf,
    sealed: bool,
}

impl Partial {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes meta.json (temp file, fsync, rename), fsyncs, and renames the dir into place.
    pub fn seal(mut self, meta: &Meta) -> Result<PathBuf, StoreError> {
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
            vec![".partial-c".to_string()]
        );
        assert!(!leftover.exists());
        assert!(root.path().join("a/meta.json").exists());
        assert!(matches!(store.begin("a"), Err(StoreError::Exists { .. })));
        assert_eq!(store.unused_id("a"), "a-2");
        assert_eq!(store.unused_id("d"), "d");
    }
}
