//! Runs the real `immich-guard` binary as a daemon for a test: its own config, socket and data
//! dir in a temp dir, stderr captured to a file, killed on drop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use immich_guard::control::Response;
use immich_guard::status::StatusReport;

pub const GUARD_BIN: &str = env!("CARGO_BIN_EXE_immich-guard");

pub struct Guard {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    log_path: PathBuf,
}

#[derive(Default)]
pub struct GuardOptions<'a> {
    /// Extra TOML appended to the config; must not repeat the [control] or [daemon] tables.
    pub extra_toml: &'a str,
    pub env: Vec<(&'a str, String)>,
}

impl Guard {
    /// A daemon watching `stack` (by project) with its snapshots in `snapshots`; `extra_toml`
    /// adds tables. Returns once the socket answers.
    pub fn watching(stack: &super::Stack, snapshots: &Path, extra_toml: &str) -> Guard {
        let guard = Guard::start(GuardOptions {
            extra_toml: &format!(
                "[stack]\nproject = {:?}\n\n[snapshots]\ndir = {:?}\n{extra_toml}",
                stack.project,
                snapshots.display().to_string()
            ),
            ..Default::default()
        });
        guard.wait_socket(Duration::from_secs(10));
        guard
    }

    pub fn start(options: GuardOptions<'_>) -> Guard {
        let dir = tempfile::Builder::new()
            .prefix(&format!(
                "{}{}-",
                super::host::GUARD_DIR_PREFIX,
                std::process::id()
            ))
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("run/guard.sock");
        let config_path = dir.path().join("config.toml");
        let config = format!(
            "[control]\nsocket = {socket:?}\n\n[daemon]\ndata_dir = {data:?}\nlog_level = \"immich_guard=debug,info\"\n\n{extra}\n",
            socket = socket.display().to_string(),
            data = dir.path().join("data").display().to_string(),
            extra = options.extra_toml
        );
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.path().join("guard.log");
        let child = spawn(&config_path, &log_path, &options.env);
        Guard {
            child: Some(child),
            dir,
            socket,
            config_path,
            log_path,
        }
    }

    /// Starts the daemon again on the same config, socket and data dir (after `terminate` or
    /// `kill`); the log goes on in the same file.
    pub fn restart(mut self) -> Guard {
        assert!(self.child.is_none(), "stop the daemon first");
        self.child = Some(spawn(&self.config_path, &self.log_path, &[]));
        self.wait_socket(Duration::from_secs(10));
        self
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn wait_socket(&self, timeout: Duration) {
        let start = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            assert!(
                start.elapsed() < timeout,
                "daemon socket {} did not appear within {timeout:?}; log:\n{}",
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes raw bytes on a fresh connection and returns the first response line.
    pub fn raw(&self, bytes: &[u8]) -> String {
        let mut stream = UnixStream::connect(&self.socket).expect("connect to daemon");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(bytes).unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        line
    }

    pub fn status(&self) -> StatusReport {
        let line = self.raw(b"{\"verb\":\"status\"}\n");
        match serde_json::from_str::<Response>(&line) {
            Ok(Response::Status(r)) => *r,
            other => panic!("unexpected status answer {line:?}: {other:?}"),
        }
    }

    /// Polls status until `pred` holds.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&StatusReport) -> bool,
    ) -> StatusReport {
        let start = Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; last status: {}\nlog:\n{}",
                serde_json::to_string_pretty(&s).unwrap(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the CLI against this daemon's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config_path, args)
    }

    /// `list --json`: the sealed snapshots, oldest first.
    pub fn list(&self) -> Vec<immich_guard::snapshot::store::Meta> {
        let out = self.cli(&["list", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Until the daemon's content-hash pass (snapshot/hash_queue.rs) has checked every sealed
    /// snapshot.
    pub fn wait_all_checked(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.list().iter().all(|m| m.check_passed()) {
            assert!(Instant::now() < deadline, "{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL: the daemon gets no chance to clean up, like a power cut or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(10) {
                child.kill().ok();
                panic!(
                    "daemon did not stop within 10 s of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

fn spawn(config_path: &Path, log_path: &Path, env: &[(&str, String)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    let mut cmd = Command::new(GUARD_BIN);
    cmd.arg("--config")
        .arg(config_path)
        .arg("run")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("IMMICH_GUARD_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn immich-guard")
}

pub fn cli(config: &Path, args: &[&str]) -> Output {
    cli_env(config, args, &[])
}

/// [`cli`] with more environment, and no terminal on stdin (a prompt is refused, not waited
/// for).
pub fn cli_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(GUARD_BIN);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run immich-guard")
}

/// A config for the CLI with no daemon: the stack by project, snapshots in `<dir>/snapshots`,
/// data in `<dir>/data`, a socket (`<dir>/run/guard.sock`) no daemon serves.
pub fn cli_config(stack: &super::Stack, dir: &Path) -> PathBuf {
    cli_config_with(stack, dir, &dir.join("snapshots"), "")
}

/// [`cli_config`] with the snapshots in `snapshots` and more `[snapshots]` keys.
pub fn cli_config_with(
    stack: &super::Stack,
    dir: &Path,
    snapshots: &Path,
    snapshot_keys: &str,
) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[stack]\nproject = {:?}\n\n[snapshots]\ndir = {:?}\n{snapshot_keys}\n[daemon]\ndata_dir = {:?}\n\n[control]\nsocket = {:?}\n",
            stack.project,
            snapshots.display().to_string(),
            dir.join("data").display().to_string(),
            dir.join("run/guard.sock").display().to_string(),
        ),
    )
    .unwrap();
    path
}

/// Takes a manual snapshot of the stack as the daemon would, through the library, into
/// `<dir>/snapshots` (the [`cli_config`] layout).
pub fn snapshot_of(stack: &super::Stack, dir: &Path) -> immich_guard::snapshot::store::Meta {
    let mut config = immich_guard::config::Config::default();
    config.snapshots.dir = Some(dir.join("snapshots"));
    snapshot_with(stack, config)
}

/// [`snapshot_of`] with `config` (its snapshot dir, method settings); the stack by project.
pub fn snapshot_with(
    stack: &super::Stack,
    mut config: immich_guard::config::Config,
) -> immich_guard::snapshot::store::Meta {
    use immich_guard::snapshot;
    config.stack.project = Some(stack.project.clone());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let host = "unix:///var/run/docker.sock";
        let docker = bollard::Docker::connect_with_local_defaults().unwrap();
        let found = immich_guard::discover::discover(&docker, host, &config)
            .await
            .unwrap();
        let request = snapshot::Request {
            trigger: "manual".into(),
            ..Default::default()
        };
        snapshot::take(&docker, host, &found, &config, &request, &|_| {})
            .await
            .unwrap()
            .meta
    })
}
