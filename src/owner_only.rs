//! Private by default: the daemon's files are its owner's alone, however it was started
//! (systemd, by hand under umask 022, install.sh). The umask is set first; every directory and
//! file is also created with an explicit mode. What an older version left wider is tightened
//! at start (`private`).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;
pub(crate) const UMASK: u32 = 0o077;

/// umask 077 for the whole process: nothing the daemon creates is readable by others, even
/// where a mode is not given explicitly.
pub fn restrict_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(UMASK));
}

/// `mkdir -p -m 0700`: every directory it creates is owner-only.
pub fn create_dir_all(path: impl AsRef<Path>) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

pub fn create_dir(path: impl AsRef<Path>) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)
}

/// Creates (or truncates) a file, owner-only. A file already there (a temp file left by a
/// crash, from an older version) is made owner-only too: the mode of `open` counts only when
/// it creates.
pub fn create_file(path: impl AsRef<Path>) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        // Never through a symlink planted where the daemon writes its own file.
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .mode(FILE_MODE)
        .open(path)?;
    let st = rustix::fs::fstat(&file)?;
    if st.st_mode & UMASK != 0 && st.st_nlink == 1 {
        rustix::fs::fchmod(&file, Mode::from_raw_mode(st.st_mode & 0o7777 & !UMASK))?;
    }
    Ok(file)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    pub(crate) fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    pub(crate) fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    pub(crate) fn write(path: &Path, mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "x").unwrap();
        chmod(path, mode);
    }

    #[test]
    fn created_dirs_and_files_are_owner_only_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        // Explicit modes only: the test process keeps its own umask.
        create_dir_all(dir.path().join("a/b")).unwrap();
        create_dir(dir.path().join("a/c")).unwrap();
        drop(create_file(dir.path().join("a/f")).unwrap());
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        assert_eq!(mode(&dir.path().join("a/c")), 0o700);
        assert_eq!(mode(&dir.path().join("a/f")), 0o600);
        // Left wide by an older version: made owner-only when written again.
        chmod(&dir.path().join("a/f"), 0o644);
        drop(create_file(dir.path().join("a/f")).unwrap());
        assert_eq!(mode(&dir.path().join("a/f")), 0o600);
        // Never written through a symlink.
        std::os::unix::fs::symlink(dir.path().join("a/f"), dir.path().join("a/l")).unwrap();
        assert!(create_file(dir.path().join("a/l")).is_err());
    }
}
