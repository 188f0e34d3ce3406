//! A data dir or snapshot dir left wider by an older version is tightened at start, and the
//! log names each change (docs/operations.md).
//!
//! Never touched: anything inside a snapshot's `storage/` tree (hard links share their inode
//! with the live photos: a chmod there would change the admin's library) and any other file
//! with more than one link. The `storage/` directory itself is tightened, which makes the tree
//! below it unreachable to anyone else.

use std::io;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::durable::PARTIAL_PREFIX;
use rustix::fs::{Mode, OFlags};

use crate::owner_only::{UMASK, create_dir_all};
use crate::snapshot::store::{CONFIG_DIR, META_FILE, STORAGE_DIR};

/// Directories shared with everything else on the machine: a data dir or snapshot dir
/// configured as one of these is used, never chmod-ed.
const SHARED_DIRS: &[&str] = &[
    "/",
    "/etc",
    "/home",
    "/media",
    "/mnt",
    "/opt",
    "/root",
    "/run",
    "/srv",
    "/tmp",
    "/usr",
    "/var",
    "/var/backups",
    "/var/lib",
    "/var/tmp",
];

#[derive(Debug, thiserror::Error)]
pub enum TightenError {
    #[error("{key} {path}: creating it: {source}")]
    Create {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// One mode tightened at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tightened {
    pub path: PathBuf,
    pub old: u32,
    pub new: u32,
}

/// Start of `run`: the data dir, snapshot dir and incidents dir created owner-only, and what
/// an older version left wider tightened (each change logged). The umask is set earlier, by
/// `main` before any thread exists ([`restrict_umask`]): it is process-wide, so setting it
/// here would race with whatever else the process's threads create.
pub fn secure_start(config: &Config) -> Result<Vec<Tightened>, TightenError> {
    let data = &config.daemon.data_dir;
    let snapshots = config.snapshot_dir();
    let incidents = data.join(crate::incident::DIR);
    for (key, path) in [
        ("daemon.data_dir", data),
        ("snapshots.dir", &snapshots),
        ("daemon.data_dir", &incidents),
    ] {
        create_dir_all(path).map_err(|source| TightenError::Create {
            key,
            path: path.clone(),
            source,
        })?;
    }
    let mut t = Tightener::default();
    t.data_dir(data, &snapshots);
    t.snapshot_dir(&snapshots);
    for c in &t.changed {
        tracing::warn!(
            path = %c.path.display(),
            old = %format!("{:04o}", c.old),
            new = %format!("{:04o}", c.new),
            "permissions tightened to owner-only"
        );
    }
    Ok(t.changed)
}

#[derive(Default)]
struct Tightener {
    changed: Vec<Tightened>,
}

impl Tightener {
    /// The data dir, the files directly in it and the incident bundles. The snapshot dir,
    /// when it is inside, is left to `snapshot_dir`.
    fn data_dir(&mut self, data: &Path, snapshots: &Path) {
        if !self.shared_root(data) {
            self.one(data, true);
        }
        for entry in entries(data) {
            let path = entry.path();
            if path == snapshots {
                continue;
            }
            match entry.file_type() {
                Ok(t) if t.is_file() => self.one(&path, false),
                Ok(t) if t.is_dir() && entry.file_name() == crate::incident::DIR => {
                    self.tree(&path)
                }
                // Something else the daemon keeps there: the dir only, its content is not
                // known here.
                Ok(t) if t.is_dir() => self.one(&path, true),
                _ => {}
            }
        }
    }

    /// The snapshot dir and, in each snapshot (sealed or partial), the files the daemon wrote,
    /// `config/` and the `storage/` directory itself, never what is below it.
    fn snapshot_dir(&mut self, root: &Path) {
        if !self.shared_root(root) {
            self.one(root, true);
        }
        for entry in entries(root) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with(PARTIAL_PREFIX) || path.join(META_FILE).is_file();
            match entry.file_type() {
                Ok(t) if t.is_dir() && ours => {}
                Ok(t) if t.is_file() && name.starts_with('.') => {
                    self.one(&path, false);
                    continue;
                }
                // Not a snapshot (snapshots.dir may hold other things): not ours to change.
                _ => continue,
            }
            self.one(&path, true);
            for inner in entries(&path) {
                let inner_path = inner.path();
                match inner.file_type() {
                    Ok(t) if t.is_file() => self.one(&inner_path, false),
                    Ok(t) if t.is_dir() && inner.file_name() == CONFIG_DIR => {
                        self.tree(&inner_path)
                    }
                    Ok(t) if t.is_dir() && inner.file_name() == STORAGE_DIR => {
                        self.storage_top(&inner_path)
                    }
                    _ => {}
                }
            }
        }
    }

    /// `storage/` itself; a read-only native snapshot (btrfs) cannot be changed, and needs
    /// not be: its parent is owner-only.
    fn storage_top(&mut self, path: &Path) {
        match self.try_one(path, true) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) => {
                tracing::info!(path = %path.display(), "read-only native snapshot: its mode is left as taken; the snapshot dir above it is owner-only");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot make it owner-only")
            }
        }
    }

    /// A tree the daemon wrote whole (an incident bundle, a snapshot's config copies).
    fn tree(&mut self, root: &Path) {
        self.one(root, true);
        for entry in walkdir::WalkDir::new(root)
            .min_depth(1)
            .into_iter()
            .filter_map(Result::ok)
        {
            let t = entry.file_type();
            if t.is_dir() || t.is_file() {
                self.one(entry.path(), t.is_dir());
            }
        }
    }

    fn shared_root(&self, path: &Path) -> bool {
        let shared = std::fs::canonicalize(path)
            .is_ok_and(|p| SHARED_DIRS.iter().any(|s| p == Path::new(s)));
        if shared {
            tracing::warn!(path = %path.display(), "a directory shared with the rest of the system is configured for the daemon's files; its mode is not changed (configure a directory of its own)");
        }
        shared
    }

    fn one(&mut self, path: &Path, dir: bool) {
        if let Err(e) = self.try_one(path, dir) {
            tracing::warn!(path = %path.display(), error = %e, "cannot make it owner-only");
        }
    }

    /// Through a handle opened without following symlinks, so the mode read and the one
    /// changed are of the same inode.
    fn try_one(&mut self, path: &Path, dir: bool) -> io::Result<()> {
        let mut flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        if dir {
            flags |= OFlags::DIRECTORY;
        }
        let fd = match rustix::fs::open(path, flags, Mode::empty()) {
            Ok(fd) => fd,
            // A symlink: not followed, not ours to change.
            Err(rustix::io::Errno::LOOP) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let st = rustix::fs::fstat(&fd)?;
        let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
        let expected = if dir {
            rustix::fs::FileType::Directory
        } else {
            rustix::fs::FileType::RegularFile
        };
        // A file with another link may be a photo of the live library.
        if kind != expected || (!dir && st.st_nlink > 1) {
            return Ok(());
        }
        let old = st.st_mode & 0o7777;
        if old & UMASK == 0 {
            return Ok(());
        }
        let new = old & !UMASK;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(new))?;
        self.changed.push(Tightened {
            path: path.to_path_buf(),
            old,
            new,
        });
        Ok(())
    }
}

fn entries(dir: &Path) -> Vec<std::fs::DirEntry> {
    std::fs::read_dir(dir)
        .map(|r| r.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::owner_only::tests::{chmod, mode, write};

    #[test]
    fn wide_modes_are_tightened_but_never_inside_storage_or_on_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("library");
        write(&live.join("upload/photo.jpg"), 0o644);
        let data = dir.path().join("data");
        let snaps = dir.path().join("elsewhere/snapshots");
        let snap = snaps.join("20261125T000000Z-v1.119.0-manual");
        write(&data.join("protection.json"), 0o644);
        write(&data.join("incidents/i1/logs/immich-server.log"), 0o644);
        write(&snap.join(META_FILE), 0o644);
        write(&snap.join("config/.env"), 0o644);
        fs::create_dir_all(snap.join("storage/upload")).unwrap();
        fs::hard_link(
            live.join("upload/photo.jpg"),
            snap.join("storage/upload/photo.jpg"),
        )
        .unwrap();
        // A hard link outside storage/ too: never changed.
        fs::hard_link(live.join("upload/photo.jpg"), data.join("linked.jpg")).unwrap();
        // Not a snapshot: left alone.
        write(&snaps.join("other-backup/file"), 0o644);
        for d in [
            &data,
            &data.join("incidents"),
            &data.join("incidents/i1"),
            &snaps,
            &snap,
            &snap.join("config"),
            &snap.join("storage"),
            &snap.join("storage/upload"),
            &snaps.join("other-backup"),
        ] {
            chmod(d, 0o755);
        }
        let mut t = Tightener::default();
        t.data_dir(&data, &snaps);
        t.snapshot_dir(&snaps);
        for p in [
            data.clone(),
            data.join("incidents"),
            data.join("incidents/i1"),
            data.join("incidents/i1/logs"),
            snaps.clone(),
            snap.clone(),
            snap.join("config"),
            snap.join("storage"),
        ] {
            assert_eq!(mode(&p), 0o700, "{}", p.display());
        }
        for p in [
            data.join("protection.json"),
            data.join("incidents/i1/logs/immich-server.log"),
            snap.join(META_FILE),
            snap.join("config/.env"),
        ] {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        // The live library and everything below storage/ as they were.
        assert_eq!(mode(&live.join("upload/photo.jpg")), 0o644);
        assert_eq!(
            fs::metadata(live.join("upload/photo.jpg")).unwrap().nlink(),
            3
        );
        assert_eq!(mode(&snap.join("storage/upload")), 0o755);
        assert_eq!(mode(&snaps.join("other-backup")), 0o755);
        assert_eq!(mode(&snaps.join("other-backup/file")), 0o644);
        let protection = t
            .changed
            .iter()
            .find(|c| c.path == data.join("protection.json"))
            .unwrap();
        assert_eq!((protection.old, protection.new), (0o644, 0o600));
        // Already tight: nothing more to do.
        let mut again = Tightener::default();
        again.data_dir(&data, &snaps);
        again.snapshot_dir(&snaps);
        assert_eq!(again.changed, vec![]);
    }

    #[test]
    fn symlinks_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        write(&outside, 0o644);
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("link")).unwrap();
        let mut t = Tightener::default();
        t.data_dir(&data, &data.join("snapshots"));
        assert_eq!(mode(&outside), 0o644);
    }
}
