//! One daemon per data dir and per control socket. Two daemons on one data dir would both
//! write `protection.json` and remove each other's snapshots in progress as "interrupted";
//! two on one socket would unlink each other's socket. Each holds an exclusive `flock` on a
//! pid file for its whole life: the kernel drops it when the process dies, however it dies,
//! so a crashed daemon never leaves a stale lock.
//!
//! `<daemon.data_dir>/daemon.pid` is the flock'd file, holding the pid and a newline (mode
//! 0600); systemd/install.sh relies on that to find the running daemon.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{FlockOperation, flock};

use crate::config::Config;

/// Under the data dir.
pub const PID_FILE: &str = "daemon.pid";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{key} = {value:?}: another immich-guard daemon ({}) is already running with it (it holds the lock on {path}); stop it first (`systemctl stop immich-guard`) or give this one its own {key}",
        pid.map_or("pid unknown".to_string(), |p| format!("pid {p}"))
    )]
    Held {
        key: &'static str,
        value: PathBuf,
        path: PathBuf,
        pid: Option<u32>,
    },
    #[error("{key} = {value:?}: cannot lock {path}: {action}: {source}")]
    Io {
        key: &'static str,
        value: PathBuf,
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
}

/// Held while the daemon runs; dropping it (or the process ending) releases both locks.
#[derive(Debug)]
pub struct DaemonLock {
    _data_dir: File,
    _socket: File,
}

/// The lock file of a control socket: beside it, so any two daemons given the same socket
/// meet there whatever their data dirs.
pub fn socket_lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the data dir's lock, then the socket's; creates both dirs when missing.
pub fn acquire(config: &Config) -> Result<DaemonLock, LockError> {
    let data_dir = &config.daemon.data_dir;
    let data = lock_pid_file(
        ("daemon.data_dir", data_dir),
        data_dir,
        &data_dir.join(PID_FILE),
        0o700,
    )?;
    let socket = &config.control.socket;
    // The socket's group must be able to reach it: its dir is 0755, as ControlServer makes it.
    let socket = lock_pid_file(
        ("control.socket", socket),
        socket.parent().unwrap_or(Path::new("/")),
        &socket_lock_path(socket),
        0o755,
    )?;
    Ok(DaemonLock {
        _data_dir: data,
        _socket: socket,
    })
}

/// Locks `path` (in `dir`, created with `dir_mode` when missing) and writes our pid into it;
/// errors name the config key and value the lock stands for.
fn lock_pid_file(
    (key, value): (&'static str, &Path),
    dir: &Path,
    path: &Path,
    dir_mode: u32,
) -> Result<File, LockError> {
    let io = |action: &'static str| {
        move |source| LockError::Io {
            key,
            value: value.to_path_buf(),
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)
            .map_err(io("creating its directory"))?;
        // The umask may have taken bits the mode asked for.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
            .map_err(io("setting its directory's mode"))?;
    }
    // Never truncated before the lock is ours: the content is the holder's pid.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io("opening it"))?;
    if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
        if e != rustix::io::Errno::WOULDBLOCK {
            return Err(io("locking it")(e.into()));
        }
        return Err(LockError::Held {
            key,
            value: value.to_path_buf(),
            path: path.to_path_buf(),
            pid: holder_pid(&mut file),
        });
    }
    // The file may be an old one with a wider mode; the lock is its inode, so it is rewritten
    // in place, not replaced by a rename.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io("setting its mode"))?;
    file.set_len(0).map_err(io("truncating it"))?;
    file.rewind().map_err(io("rewinding it"))?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(io("writing our pid"))?;
    file.sync_all().map_err(io("syncing it"))?;
    Ok(file)
}

/// The pid the holder wrote; it may be between taking the lock and writing it, so wait a
/// moment for it.
fn holder_pid(file: &mut File) -> Option<u32> {
    for _ in 0..20 {
        let mut text = String::new();
        if file.rewind().is_ok()
            && file.read_to_string(&mut text).is_ok()
            && let Ok(pid) = text.trim().parse()
        {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_in(data: &Path, socket: &Path) -> Config {
        let mut config = Config::default();
        config.daemon.data_dir = data.to_path_buf();
        config.control.socket = socket.to_path_buf();
        config
    }

    #[test]
    fn pid_file_holds_our_pid_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let _lock = acquire(&config_in(&data, &dir.path().join("run/g.sock"))).unwrap();
        let pid_file = data.join(PID_FILE);
        assert_eq!(
            std::fs::read_to_string(&pid_file).unwrap(),
            format!("{}\n", std::process::id())
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&pid_file), 0o600);
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&dir.path().join("run")), 0o755);
        assert!(dir.path().join("run/g.sock.lock").exists());
    }

    #[test]
    fn a_second_lock_on_the_data_dir_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = acquire(&config_in(&data, &dir.path().join("a.sock"))).unwrap();
        // flock locks belong to the open file: a second open, even in this process, conflicts.
        let e = acquire(&config_in(&data, &dir.path().join("b.sock"))).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, LockError::Held { key: "daemon.data_dir", pid: Some(p), .. } if p == std::process::id()),
            "{text}"
        );
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains(&format!("{:?}", data)), "{text}");
        drop(first);
        // Released with the holder: the next daemon starts.
        acquire(&config_in(&data, &dir.path().join("b.sock"))).unwrap();
    }

    #[test]
    fn a_second_lock_on_the_socket_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("guard.sock");
        let _first = acquire(&config_in(&dir.path().join("one"), &socket)).unwrap();
        let e = acquire(&config_in(&dir.path().join("two"), &socket)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("control.socket = {socket:?}")),
            "{text}"
        );
        assert!(text.contains("guard.sock.lock"), "{text}");
        // The refused daemon did not overwrite the holder's pid.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("one").join(PID_FILE)).unwrap(),
            format!("{}\n", std::process::id())
        );
    }

    #[test]
    fn a_stale_pid_file_with_a_wide_mode_is_taken_over_and_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let pid_file = data.join(PID_FILE);
        std::fs::write(&pid_file, "999999999\nold junk\n").unwrap();
        std::fs::set_permissions(&pid_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _lock = acquire(&config_in(&data, &dir.path().join("g.sock"))).unwrap();
        assert_eq!(
            std::fs::read_to_string(&pid_file).unwrap(),
            format!("{}\n", std::process::id())
        );
        let mode = std::fs::metadata(&pid_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
