//! The parallel walker: recreates the upload tree under the snapshot (hard links, reflink
//! clones or copies) or only lists it, and returns the manifest's entries.

use std::ffi::{CStr, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::StorageError;
use super::manifest::{EntryKind, ManifestEntry, Skipped};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WalkMode {
    /// Only read the tree (a native snapshot already froze it) for the manifest.
    List,
    Hardlink,
    Reflink,
    Copy,
}

impl WalkMode {
    pub(super) fn writes(self) -> bool {
        self != WalkMode::List
    }
}

pub(super) type Walked = (Vec<ManifestEntry>, Vec<Skipped>);

/// Walks `root`, recreating it under `out` (unless listing), spread over threads by directory:
/// linking and stat-ing wait on the filesystem more than on the CPU, so a few threads per
/// core pay off. Everything is relative to directory handles, so no path is resolved twice.
pub(super) fn walk(
    root: &Path,
    out: Option<&Path>,
    mode: WalkMode,
    exclude: &[String],
    skip_unreadable: bool,
) -> Result<Walked, StorageError> {
    let open_dir = |path: &Path| {
        rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let root_fd = open_dir(root).map_err(|e| StorageError::Read {
        path: root.to_path_buf(),
        source: e.into(),
    })?;
    let out_fd = out
        .map(|o| {
            open_dir(o).map_err(|e| StorageError::Write {
                path: o.to_path_buf(),
                source: e.into(),
            })
        })
        .transpose()?;
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .saturating_mul(2)
        .clamp(2, 16);
    let work = Work {
        queue: std::sync::Mutex::new(Queue {
            dirs: vec![PathBuf::new()],
            busy: 0,
            failed: None,
        }),
        wake: std::sync::Condvar::new(),
    };
    let job = Job {
        root,
        out: out.unwrap_or(root),
        root_fd,
        out_fd,
        mode,
        exclude,
        skip_unreadable,
        am_root: rustix::process::geteuid().is_root(),
    };
    let (entries, skipped) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| work.run(&job)))
            .collect();
        let mut all = (Vec::new(), Vec::new());
        for h in handles {
            let (e, s) = h.join().expect("storage worker panicked");
            all.0.extend(e);
            all.1.extend(s);
        }
        all
    });
    if let Some(e) = work.queue.into_inner().expect("queue lock").failed {
        return Err(e);
    }
    Ok((entries, skipped))
}

struct Job<'a> {
    root: &'a Path,
    out: &'a Path,
    root_fd: OwnedFd,
    out_fd: Option<OwnedFd>,
    mode: WalkMode,
    exclude: &'a [String],
    skip_unreadable: bool,
    am_root: bool,
}

struct Queue {
    /// Directories (relative to the root) waiting to be read.
    dirs: Vec<PathBuf>,
    /// Workers reading a directory now: the walk is over when none is and none waits.
    busy: usize,
    failed: Option<StorageError>,
}

struct Work {
    queue: std::sync::Mutex<Queue>,
    wake: std::sync::Condvar,
}

impl Work {
    fn run(&self, job: &Job<'_>) -> Walked {
        let mut done = (Vec::new(), Vec::new());
        loop {
            let dir = {
                let mut q = self.queue.lock().expect("queue lock");
                loop {
                    if q.failed.is_some() {
                        return done;
                    }
                    if let Some(dir) = q.dirs.pop() {
                        q.busy += 1;
                        break dir;
                    }
                    if q.busy == 0 {
                        return done;
                    }
                    q = self.wake.wait(q).expect("queue lock");
                }
            };
            let mut found = Vec::new();
            let result = job.copy_dir(&dir, &mut done, &mut found);
            let mut q = self.queue.lock().expect("queue lock");
            q.busy -= 1;
            match result {
                Ok(()) => q.dirs.extend(found),
                Err(e) => {
                    q.failed.get_or_insert(e);
                }
            }
            drop(q);
            self.wake.notify_all();
        }
    }
}

/// Which side an error is on: the source is "unreadable" (skippable), the target is not.
enum Side {
    Source,
    Target,
    /// Readable, but not ours to hard-link.
    LinkRefused,
}

impl Job<'_> {
    fn dir_fd(base: &OwnedFd, rel: &Path) -> rustix::io::Result<OwnedFd> {
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        rustix::fs::openat(
            base,
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
    }

    fn error(&self, side: Side, rel: &Path, e: impl Into<std::io::Error>) -> StorageError {
        match side {
            Side::Source => StorageError::Unreadable {
                path: self.root.join(rel),
                source: e.into(),
            },
            Side::Target => StorageError::Write {
                path: self.out.join(rel),
                source: e.into(),
            },
            Side::LinkRefused => StorageError::LinkRefused {
                path: self.root.join(rel),
            },
        }
    }

    /// Recreates the entries of one directory; subdirectories go to `found` for any worker.
    fn copy_dir(
        &self,
        rel_dir: &Path,
        (entries, skipped): &mut Walked,
        found: &mut Vec<PathBuf>,
    ) -> Result<(), StorageError> {
        let source_dir = match Self::dir_fd(&self.root_fd, rel_dir)
            .and_then(|fd| rustix::fs::Dir::read_from(&fd).map(|d| (fd, d)))
        {
            Ok(d) => d,
            Err(e) => return self.skip_or_fail(rel_dir, e.into(), skipped),
        };
        let (src_fd, listing) = source_dir;
        let out_fd = match &self.out_fd {
            Some(out) => {
                Some(Self::dir_fd(out, rel_dir).map_err(|e| self.error(Side::Target, rel_dir, e))?)
            }
            None => None,
        };
        for item in listing {
            let item = match item {
                Ok(item) => item,
                Err(e) => return self.skip_or_fail(rel_dir, e.into(), skipped),
            };
            let name = item.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let name_os = OsStr::from_bytes(name.to_bytes());
            // Excluded folders are top-level names only: `thumbs`, not every `thumbs` below.
            if rel_dir.as_os_str().is_empty() && self.exclude.iter().any(|x| name_os == x.as_str())
            {
                continue;
            }
            let rel = rel_dir.join(name_os);
            match self.copy_entry(&src_fd, out_fd.as_ref(), name, &rel, found) {
                Ok(Some(entry)) => entries.push(entry),
                Ok(None) => {}
                Err((Side::Source, e)) => self.skip_or_fail(&rel, e, skipped)?,
                Err((side, e)) => return Err(self.error(side, &rel, e)),
            }
        }
        Ok(())
    }

    fn skip_or_fail(
        &self,
        rel: &Path,
        e: std::io::Error,
        skipped: &mut Vec<Skipped>,
    ) -> Result<(), StorageError> {
        if !self.skip_unreadable {
            return Err(self.error(Side::Source, rel, e));
        }
        tracing::warn!(path = %self.root.join(rel).display(), error = %e, "skipping an unreadable entry");
        skipped.push(Skipped {
            path: rel.to_string_lossy().into_owned(),
            error: e.to_string(),
        });
        Ok(())
    }

    fn copy_entry(
        &self,
        src: &OwnedFd,
        out: Option<&OwnedFd>,
        name: &CStr,
        rel: &Path,
        found: &mut Vec<PathBuf>,
    ) -> Result<Option<ManifestEntry>, (Side, std::io::Error)> {
        let source = |e: Errno| (Side::Source, std::io::Error::from(e));
        let target = |e: Errno| (Side::Target, std::io::Error::from(e));
        let st = rustix::fs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW).map_err(source)?;
        let kind = FileType::from_raw_mode(st.st_mode);
        let perms = Mode::from_raw_mode(st.st_mode & 0o7777);
        let mut link = None;
        let entry_kind = match (kind, out) {
            (FileType::Directory, out) => {
                if let Some(out) = out {
                    rustix::fs::mkdirat(out, name, perms).map_err(target)?;
                    // The library's mode, not the one the daemon's umask 077 left.
                    rustix::fs::chmodat(out, name, perms, AtFlags::empty()).map_err(target)?;
                    if self.am_root {
                        self.chown_at(out, name, &st).map_err(target)?;
                    }
                }
                found.push(rel.to_path_buf());
                EntryKind::Dir
            }
            (FileType::Symlink, out) => {
                let to = rustix::fs::readlinkat(src, name, Vec::new()).map_err(source)?;
                if let Some(out) = out {
                    rustix::fs::symlinkat(&to, out, name).map_err(target)?;
                }
                link = Some(to.to_string_lossy().into_owned());
                EntryKind::Symlink
            }
            (FileType::RegularFile, None) => EntryKind::File,
            (FileType::RegularFile, Some(out)) => {
                match self.mode {
                    WalkMode::Hardlink => {
                        rustix::fs::linkat(src, name, out, name, AtFlags::empty()).map_err(|e| {
                            match e {
                                // protected_hardlinks: unreadable (skippable), or readable but
                                // not ours to link (run as root).
                                Errno::PERM | Errno::ACCESS => {
                                    let readable = rustix::fs::accessat(
                                        src,
                                        name,
                                        rustix::fs::Access::READ_OK,
                                        AtFlags::empty(),
                                    )
                                    .is_ok();
                                    if readable {
                                        (Side::LinkRefused, e.into())
                                    } else {
                                        source(e)
                                    }
                                }
                                _ => target(e),
                            }
                        })?
                    }
                    WalkMode::Reflink | WalkMode::Copy => {
                        self.clone_file(src, out, name, &st, perms)?
                    }
                    WalkMode::List => unreachable!("listing has no output dir"),
                }
                EntryKind::File
            }
            // Sockets, fifos, devices have no place in a photo library: not recreated.
            _ => return Ok(None),
        };
        Ok(Some(ManifestEntry {
            path: rel.to_string_lossy().into_owned(),
            kind: entry_kind,
            size: if entry_kind == EntryKind::File {
                st.st_size as u64
            } else {
                0
            },
            mtime: st.st_mtime,
            inode: st.st_ino,
            target: link,
        }))
    }

    fn chown_at(
        &self,
        dir: &OwnedFd,
        name: &CStr,
        st: &rustix::fs::Stat,
    ) -> rustix::io::Result<()> {
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(st.st_uid)),
            Some(rustix::fs::Gid::from_raw(st.st_gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
    }

    /// A reflink clone (or a byte copy), with the source's mode, owner and mtime.
    fn clone_file(
        &self,
        src: &OwnedFd,
        out: &OwnedFd,
        name: &CStr,
        st: &rustix::fs::Stat,
        perms: Mode,
    ) -> Result<(), (Side, std::io::Error)> {
        let source = |e: Errno| (Side::Source, std::io::Error::from(e));
        let target = |e: std::io::Error| (Side::Target, e);
        let from = rustix::fs::openat(
            src,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(source)?;
        let to = rustix::fs::openat(
            out,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            perms,
        )
        .map_err(|e| target(e.into()))?;
        if self.mode == WalkMode::Reflink {
            rustix::fs::ioctl_ficlone(&to, &from).map_err(|e| target(e.into()))?;
        } else {
            let mut from = std::fs::File::from(from);
            let mut to_file = std::fs::File::from(to.try_clone().map_err(target)?);
            std::io::copy(&mut from, &mut to_file).map_err(target)?;
        }
        if self.am_root {
            rustix::fs::fchown(
                &to,
                Some(rustix::fs::Uid::from_raw(st.st_uid)),
                Some(rustix::fs::Gid::from_raw(st.st_gid)),
            )
            .map_err(|e| target(e.into()))?;
        }
        // After the chown (which clears set-id bits), and past the daemon's umask 077.
        rustix::fs::fchmod(&to, perms).map_err(|e| target(e.into()))?;
        rustix::fs::futimens(
            &to,
            &rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: st.st_atime,
                    tv_nsec: st.st_atime_nsec as _,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: st.st_mtime,
                    tv_nsec: st.st_mtime_nsec as _,
                },
            },
        )
        .map_err(|e| target(e.into()))?;
        Ok(())
    }
}
