//! What the tests need from the host, checked once per test binary, and an honest count of
//! the tests that skipped.
//!
//! The first test that asks ([`docker_ready`], [`filesystems_ready`]) checks every dependency
//! at once and, when something is missing, writes ONE message naming the packages and the
//! `apt-get install` line. Tests that need a missing piece skip; under `CI=true` the binary
//! exits with status 1 after that same message (no panic, no backtrace).
//!
//! Skips are counted, and a process-exit hook prints "immich-guard: N of M tests in this
//! binary skipped: <why>" at the end. Both messages go to stderr with `write_all` on the raw
//! handle: libtest captures `eprintln!` per test, not direct writes, so they show without
//! `--nocapture`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, Once, OnceLock};

use super::compose;

pub const BUSYBOX: &str = "/bin/busybox";
pub const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin/postgres";

/// One missing piece and the Debian package that brings it.
#[derive(Clone, Debug)]
pub struct Missing {
    pub what: String,
    pub package: &'static str,
    /// Needed by the Docker tests (else only by the filesystem tests).
    pub docker: bool,
}

#[derive(Debug)]
pub struct Report {
    pub missing: Vec<Missing>,
    /// Why the Docker engine cannot be used, when the CLI exists but `docker info` fails.
    pub engine: Option<String>,
}

impl Report {
    /// Why the Docker tests cannot run, if they cannot.
    pub fn docker_blocker(&self) -> Option<String> {
        let missing: Vec<&str> = self
            .missing
            .iter()
            .filter(|m| m.docker)
            .map(|m| m.package)
            .collect();
        if !missing.is_empty() {
            return Some(format!("missing {}", missing.join(", ")));
        }
        self.engine
            .as_ref()
            .map(|e| format!("Docker not available ({e})"))
    }

    /// Why the filesystem tests cannot run, if they cannot.
    pub fn filesystem_blocker(&self) -> Option<String> {
        let missing: Vec<&str> = self
            .missing
            .iter()
            .filter(|m| !m.docker)
            .map(|m| m.package)
            .collect();
        (!missing.is_empty()).then(|| format!("missing {}", missing.join(", ")))
    }

    /// The one message: what is missing and the command that installs it.
    pub fn message(&self) -> Option<String> {
        let mut text = String::new();
        if !self.missing.is_empty() {
            let what: Vec<String> = self
                .missing
                .iter()
                .map(|m| format!("{} ({})", m.what, m.package))
                .collect();
            let mut packages: Vec<&str> = self.missing.iter().map(|m| m.package).collect();
            packages.dedup();
            text.push_str(&format!(
                "immich-guard tests: missing test dependencies: {}\n  install them with: apt-get install {}\n  (or run .ci/run, which installs them and docker compose v2)\n",
                what.join(", "),
                packages.join(" ")
            ));
        }
        if let Some(e) = &self.engine {
            text.push_str(&format!(
                "immich-guard tests: the Docker engine does not answer `docker info`: {e}\n"
            ));
        }
        (!text.is_empty()).then_some(text)
    }
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Checks everything once per process.
pub fn report() -> &'static Report {
    static REPORT: OnceLock<Report> = OnceLock::new();
    REPORT.get_or_init(|| {
        let mut missing = Vec::new();
        let mut need = |ok: bool, what: &str, package: &'static str, docker: bool| {
            if !ok {
                missing.push(Missing {
                    what: what.to_string(),
                    package,
                    docker,
                });
            }
        };
        need(
            Path::new(BUSYBOX).is_file(),
            BUSYBOX,
            "busybox-static",
            true,
        );
        need(
            Path::new(POSTGRES_BIN).is_file(),
            "PostgreSQL 15 binaries",
            "postgresql-15",
            true,
        );
        let docker_cli = runs("docker", &["--version"]);
        need(docker_cli, "docker", "docker.io", true);
        let compose = compose::compose_command();
        let mut version: Vec<&str> = compose[1..].iter().map(String::as_str).collect();
        version.push("version");
        let compose_ok = docker_cli && runs(&compose[0], &version);
        // v2 has no Debian package: .ci/run installs it (named in the message).
        need(
            compose_ok || !docker_cli,
            &compose.join(" "),
            "docker-compose",
            true,
        );
        need(on_path("mkfs.btrfs"), "mkfs.btrfs", "btrfs-progs", false);
        need(on_path("mkfs.xfs"), "mkfs.xfs", "xfsprogs", false);
        let engine = if docker_cli {
            let out = Command::new("docker")
                .args(["info", "--format", "{{.ServerVersion}}"])
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .map(str::trim)
                        .find(|l| !l.is_empty())
                        .unwrap_or("docker info failed")
                        .to_string(),
                ),
                Err(e) => Some(format!("cannot run docker info: {e}")),
            }
        } else {
            None
        };
        let report = Report { missing, engine };
        if let Some(message) = report.message() {
            write_stderr(&message);
            if ci() {
                write_stderr("immich-guard tests: CI=true, so this is a failure, not a skip\n");
                std::process::exit(1);
            }
        }
        report
    })
}

pub fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Straight to fd 2, past libtest's per-test capture.
pub fn write_stderr(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

/// Whether the Docker tests can run (docker, the engine, compose, busybox, PostgreSQL 15).
/// When not, the calling test is counted as skipped.
pub fn docker_ready() -> bool {
    match report().docker_blocker() {
        None => true,
        Some(why) => {
            skip(&why);
            false
        }
    }
}

/// Whether the loop-mounted filesystem tests can run (mkfs.btrfs, mkfs.xfs).
pub fn filesystems_ready() -> bool {
    match report().filesystem_blocker() {
        None => true,
        Some(why) => {
            skip(&why);
            false
        }
    }
}

static SKIPS: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// Counts the calling test as skipped for `why` (shown in the end-of-binary summary) and says
/// so in the test's own output.
pub fn skip(why: &str) {
    static HOOK: Once = Once::new();
    // Not in the `--list` child of `test_count` (a bench's own main may run there).
    HOOK.call_once(|| {
        if std::env::var_os(COUNTING).is_none() {
            // SAFETY: registers a plain `extern "C" fn` without arguments, as atexit wants.
            unsafe {
                nix::libc::atexit(print_summary);
            }
        }
    });
    eprintln!("skipping: {why}");
    *SKIPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(why.to_string())
        .or_default() += 1;
}

/// Set in the `--list` child of [`test_count`].
const COUNTING: &str = "IMMICH_GUARD_TEST_COUNTING";

/// The number of tests in this binary, from its own `--list` (none for a bench).
fn test_count() -> Option<usize> {
    let exe = std::env::current_exe().ok()?;
    let out = Command::new(exe)
        .args(["--list", "--format", "terse"])
        .env(COUNTING, "1")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let n = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count();
    (n > 0).then_some(n)
}

extern "C" fn print_summary() {
    let skips = SKIPS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if skips.is_empty() {
        return;
    }
    let total = test_count().map(|n| format!(" of {n}")).unwrap_or_default();
    let mut text = String::new();
    for (why, n) in skips {
        let tests = if n == 1 && total.is_empty() {
            "test"
        } else {
            "tests"
        };
        text.push_str(&format!(
            "immich-guard: {n}{total} {tests} in this binary skipped: {why}\n"
        ));
    }
    write_stderr(&text);
}
