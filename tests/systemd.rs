//! The unit and the install scripts under a real systemd: a container whose PID 1 is
//! systemd from Debian 12 packages (a debootstrap root imported as a test image, cached by
//! content like the other test images), the host's Docker engine reached through a socket
//! the test controls, the repo's `systemd/install.sh` and `uninstall.sh`, and the binary
//! cargo built for this test.
//!
//! The daemon inside is told to protect a compose project that does not exist, so it never
//! touches the stacks other tests run on the same engine.

mod harness;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use harness::images;
use sha2::{Digest, Sha256};

const GUARD_BIN: &str = env!("CARGO_BIN_EXE_immich-guard");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const ENGINE_SOCKET: &str = "/var/run/docker.sock";

/// Bump when the recipe below changes.
const SYSTEMD_RECIPE: &str = "immich-guard-test-systemd/1";
const SYSTEMD_IMAGE: &str = "systemd:bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const DEBOOTSTRAP_ARGS: &[&str] = &[
    "--variant=minbase",
    "--include=systemd,systemd-sysv,dbus",
    "bookworm",
];
const SYSTEMD_LOCK: &str = "/tmp/immich-guard-test-systemd-image.lock";
const IMPORT_CHANGES: &[&str] = &[r#"CMD ["/sbin/init"]"#, "ENV container=docker"];

/// What the test sets in a drop-in: a watchdog short enough to wait for.
const WATCHDOG: Duration = Duration::from_secs(4);
const RESTART: Duration = Duration::from_secs(1);
const UNIT: &str = "immich-guard.service";

/// The Debian 12 systemd image, built with debootstrap unless the tag already carries the
/// recipe's hash. debootstrap's output differs from run to run (timestamps), so the hash is
/// of what goes in: suite, variant, packages, mirror and image config.
fn systemd_image() -> String {
    let tag = images::tag(SYSTEMD_IMAGE);
    let mut h = Sha256::new();
    for part in [SYSTEMD_RECIPE, MIRROR]
        .iter()
        .chain(DEBOOTSTRAP_ARGS)
        .chain(IMPORT_CHANGES)
    {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let content = format!("{:x}", h.finalize());
    // Our own lock for the (slow) debootstrap, so the harness's image lock, which every test
    // binary takes to check its cache, is held only for the import.
    let own = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(SYSTEMD_LOCK)
        .unwrap_or_else(|e| panic!("cannot open {SYSTEMD_LOCK}: {e}"));
    own.lock()
        .unwrap_or_else(|e| panic!("cannot lock {SYSTEMD_LOCK}: {e}"));
    if images::image_label(&tag, images::CONTENT_LABEL).as_deref() == Some(content.as_str()) {
        return tag;
    }
    let started = Instant::now();
    let root = tempfile::tempdir().expect("temp dir for the debootstrap root");
    let out = Command::new("debootstrap")
        .args(DEBOOTSTRAP_ARGS)
        .arg(root.path())
        .arg(MIRROR)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run debootstrap ({e}): install it with `apt-get install debootstrap` (.ci/run does)")
        });
    assert!(
        out.status.success(),
        "debootstrap failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The package cache is half the root and nothing needs it.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let _ = Command::new("find")
            .arg(root.path().join(dir))
            .args(["-type", "f", "-delete"])
            .status();
    }
    let _images = images::lock_images();
    let mut import = Command::new("docker");
    import.arg("import");
    for change in IMPORT_CHANGES.iter().map(|c| c.to_string()).chain([
        format!("LABEL {}={content}", images::CONTENT_LABEL),
        format!("LABEL {}=1", images::TEST_LABEL),
    ]) {
        import.arg("--change").arg(change);
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tar");
    let out = import
        .args(["-", &tag])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .expect("run docker import");
    assert!(
        tar.wait().unwrap().success(),
        "tar of the debootstrap root failed"
    );
    assert!(
        out.status.success(),
        "docker import of {tag} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "built test image {tag} (debootstrap + import) in {:.1?}",
        started.elapsed()
    );
    tag
}

/// A Unix socket in front of the Docker engine that holds every connection until opened, so
/// the daemon's first discovery, and with it READY=1, waits for the test.
struct Gate {
    dir: tempfile::TempDir,
    open: Arc<(Mutex<bool>, Condvar)>,
}

impl Gate {
    fn closed() -> Gate {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = UnixListener::bind(dir.path().join("docker.sock")).expect("bind gate");
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let state = open.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let state = state.clone();
                std::thread::spawn(move || {
                    let (lock, cvar) = &*state;
                    let _open = cvar.wait_while(lock.lock().unwrap(), |o| !*o).unwrap();
                    drop(_open);
                    forward(client);
                });
            }
        });
        Gate { dir, open }
    }

    fn set(&self, open: bool) {
        *self.open.0.lock().unwrap() = open;
        self.open.1.notify_all();
    }

    fn open(&self) {
        self.set(true);
    }

    /// Holds new connections again (those already forwarded go on).
    fn close(&self) {
        self.set(false);
    }
}

fn forward(client: UnixStream) {
    let Ok(engine) = UnixStream::connect(ENGINE_SOCKET) else {
        return;
    };
    let (mut c_in, mut e_out) = (client.try_clone().unwrap(), engine.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_in, &mut e_out);
        let _ = e_out.shutdown(std::net::Shutdown::Write);
    });
    let (mut e_in, mut c_out) = (engine, client);
    let _ = std::io::copy(&mut e_in, &mut c_out);
    let _ = c_out.shutdown(std::net::Shutdown::Write);
}

/// A container of the systemd image, removed on drop.
struct Machine {
    name: String,
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Machine {
    /// `init`: the image's /sbin/init (systemd), or another PID 1 such as `sleep infinity`.
    /// `mounts`: more `-v` arguments.
    fn start(image: &str, role: &str, gate: &Gate, mounts: &[String], init: &[&str]) -> Machine {
        let name = format!("immich-guard-systemd-test-{}-{role}", std::process::id());
        // Machines of test processes that died are removed like their stacks.
        harness::compose::remove_leftovers();
        let owner = format!("{}={}", harness::compose::OWNER_LABEL, std::process::id());
        let test_label = format!("{}=1", harness::compose::TEST_LABEL);
        let gate_mount = format!("{}:/gate", gate.dir.path().display());
        let repo_mount = format!("{REPO}:/src:ro");
        let bin_mount = format!("{GUARD_BIN}:/opt/immich-guard:ro");
        // `--privileged` is refused on this kind of host; systemd runs as PID 1 with
        // CAP_SYS_ADMIN (its mount namespaces for the unit's sandbox), without seccomp (it
        // sets its own filters), on the host's cgroup v1 tree read-only, with a fresh /run.
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            &owner,
            "--label",
            &test_label,
            "--cap-add",
            "SYS_ADMIN",
            "--security-opt",
            "seccomp=unconfined",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:ro",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "-v",
            &gate_mount,
            "-v",
            &repo_mount,
            "-v",
            &bin_mount,
        ];
        for mount in mounts {
            args.extend(["-v", mount]);
        }
        args.push(image);
        if !init.is_empty() {
            // Docker's init as PID 1 reaps the daemons install.sh leaves behind, as a
            // container's init would.
            args.insert(args.len() - 1, "--init");
        }
        args.extend(init);
        let out = docker(&args);
        assert!(out.status.success(), "docker run: {}", text(&out));
        Machine { name }
    }

    fn sh(&self, script: &str) -> Output {
        docker(&["exec", &self.name, "sh", "-c", script])
    }

    /// Runs `script`, asserts it succeeded, returns its stdout and stderr.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        let t = text(&out);
        assert!(out.status.success(), "`{script}` failed:\n{t}");
        t
    }

    fn write(&self, path: &str, content: &str) {
        let mut child = Command::new("docker")
            .args(["exec", "-i", &self.name, "sh", "-c"])
            .arg(format!("mkdir -p \"$(dirname {path})\" && cat > {path}"))
            .stdin(Stdio::piped())
            .spawn()
            .expect("docker exec");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(content.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "writing {path}");
    }

    fn exists(&self, path: &str) -> bool {
        self.sh(&format!("test -e {path} || test -L {path}"))
            .status
            .success()
    }

    /// `systemctl show` properties of the unit.
    fn show(&self) -> Unit {
        let out = self.ok(&format!(
            "systemctl show -p ActiveState,SubState,MainPID,NRestarts,StatusText,ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic {UNIT}"
        ));
        let get = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or("")
                .to_string()
        };
        Unit {
            active: get("ActiveState"),
            sub: get("SubState"),
            main_pid: get("MainPID").parse().unwrap_or(0),
            restarts: get("NRestarts").parse().unwrap_or(0),
            status_text: get("StatusText"),
            main_start_us: get("ExecMainStartTimestampMonotonic").parse().unwrap_or(0),
            active_enter_us: get("ActiveEnterTimestampMonotonic").parse().unwrap_or(0),
        }
    }

    /// The whole boot's journal, PID 1's lines about the unit and the daemon's own. Not
    /// `-u`: on this container's read-only cgroup tree journald left some of the daemon's
    /// lines without `_SYSTEMD_UNIT` after a restart, so `-u` missed them.
    fn journal(&self) -> String {
        self.ok("journalctl -b --no-pager -o cat")
    }

    /// The journal once it holds `needle` (the daemon's own lines arrive through a stream
    /// and may trail PID 1's).
    fn wait_journal(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let journal = self.journal();
            if journal.contains(needle) {
                return journal;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the journal:\n{journal}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait(&self, what: &str, timeout: Duration, mut done: impl FnMut(&Unit) -> bool) -> Unit {
        let deadline = Instant::now() + timeout;
        loop {
            let unit = self.show();
            if done(&unit) {
                return unit;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; last: {unit:?}\n{}",
                self.journal()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

#[derive(Debug, Clone)]
struct Unit {
    active: String,
    sub: String,
    main_pid: u32,
    restarts: u32,
    status_text: String,
    main_start_us: u64,
    active_enter_us: u64,
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"))
}

/// The config the daemon gets: Docker through the gate, a project nobody runs, and a
/// control group, so the daemon chowns its socket (the sandbox must allow chown: snapshots
/// keep owners the same way).
fn config() -> String {
    format!(
        "[stack]\nproject = \"immich-guard-systemd-test-{}\"\n\n[docker]\nhost = \"unix:///gate/docker.sock\"\n\n[control]\ngroup = \"{SOCKET_GROUP}\"\n",
        std::process::id()
    )
}

/// A group every Debian root has.
const SOCKET_GROUP: &str = "users";

/// Waits until systemd in `m` has finished booting.
fn wait_booted(m: &Machine) {
    let boot = Instant::now() + Duration::from_secs(30);
    loop {
        let state = m.sh("systemctl is-system-running");
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        if state == "running" || state == "degraded" {
            break;
        }
        assert!(
            Instant::now() < boot,
            "systemd did not finish booting: {state}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The unit's sandbox is in force for the running daemon, not skipped by this systemd in a
/// container: no new privileges, a seccomp filter, capabilities within the unit's bounding
/// set, /etc and /usr read-only, and /proc with other processes hidden and only pid dirs.
fn assert_sandboxed(m: &Machine, pid: u32) {
    let status = m.ok(&format!("cat /proc/{pid}/status"));
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
            .trim()
            .to_string()
    };
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2", "no seccomp filter");
    // CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID, SYS_ADMIN; Docker's default set
    // lacks DAC_READ_SEARCH, so the container's daemon has one fewer.
    let allowed: u64 = 0b1_1111 | 1 << 21;
    let bounding = u64::from_str_radix(&field("CapBnd"), 16).unwrap();
    assert_eq!(
        bounding & !allowed,
        0,
        "CapBnd {bounding:x} beyond the unit's set"
    );
    assert_ne!(bounding & 1 << 21, 0, "CAP_SYS_ADMIN missing: {bounding:x}");
    let mounts = m.ok(&format!("cat /proc/{pid}/mountinfo"));
    for (dir, option) in [
        ("/etc", "ro"),
        ("/usr", "ro"),
        ("/proc", "hidepid=invisible"),
        ("/proc", "subset=pid"),
    ] {
        assert!(
            mounts.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.get(4) == Some(&dir) && l.split([' ', ',']).any(|o| o == option)
            }),
            "{dir} is not mounted {option} for the daemon:\n{mounts}"
        );
    }
}

/// install.sh, the service's life under systemd, and uninstall.sh, in one booted machine.
#[test]
fn unit_under_real_systemd() {
    if !harness::docker_available() {
        return;
    }
    let started = Instant::now();
    let image = systemd_image();
    let gate = Gate::closed();
    let m = Machine::start(&image, "systemd", &gate, &[], &[]);
    wait_booted(&m);
    eprintln!(
        "systemd booted in the container after {:.1?}",
        started.elapsed()
    );

    m.write("/etc/immich-guard/config.toml", &config());
    // LimitCORE=0: the watchdog's SIGABRT would drop a core into the container's / (the
    // host's core_pattern is a plain file name).
    m.write(
        &format!("/etc/systemd/system/{UNIT}.d/test.conf"),
        &format!(
            "[Service]\nWatchdogSec={}s\nRestartSec={}s\nLimitCORE=0\n",
            WATCHDOG.as_secs(),
            RESTART.as_secs()
        ),
    );
    // PID 1 logs every sd_notify message it gets at debug level.
    m.ok("systemd-analyze log-level debug");

    // install.sh blocks in `systemctl start` until READY=1, which the gate holds back.
    let install = Command::new("docker")
        .args([
            "exec",
            &m.name,
            "/src/systemd/install.sh",
            "--binary",
            "/opt/immich-guard",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run install.sh");
    let starting = m.wait("daemon started", Duration::from_secs(20), |u| {
        u.main_pid != 0
    });
    m.wait("control socket up", Duration::from_secs(10), |_| {
        m.sh("immich-guard status").status.success()
    });
    let held_from = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let held = m.show();
    assert_eq!(
        (held.active.as_str(), held.sub.as_str(), held.main_pid),
        ("activating", "start", starting.main_pid),
        "the daemon answers on its socket but has not sent READY=1: the unit must still be starting"
    );
    let held_for = held_from.elapsed();
    gate.open();
    let out = install.wait_with_output().unwrap();
    let install_out = text(&out);
    eprintln!("install.sh:\n{install_out}");
    assert!(out.status.success(), "install.sh failed:\n{install_out}");
    let up = m.show();
    assert_eq!(
        (up.active.as_str(), up.sub.as_str()),
        ("active", "running"),
        "{up:?}"
    );
    let waited = Duration::from_micros(up.active_enter_us - up.main_start_us);
    eprintln!(
        "active (running) {waited:.1?} after the daemon started (READY=1 held back {held_for:.1?} by the test)"
    );
    assert!(
        waited >= held_for,
        "active after {waited:?}, but READY=1 was held back for {held_for:?}"
    );
    let journal = m.journal();
    let ready_line = journal
        .lines()
        .find(|l| l.contains("Got notification message") && l.contains("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 notification in the journal:\n{journal}"));
    eprintln!("journal: {ready_line}");
    assert!(
        up.status_text.contains("no stack to protect")
            && up.status_text.contains("not running here"),
        "STATUS= should say why there is nothing to protect: {:?}",
        up.status_text
    );
    let status = m.sh(&format!("systemctl status --no-pager {UNIT}"));
    let status = text(&status);
    assert!(
        status.contains("Active: active (running)")
            // The line's tail lists the compose projects seen, which other tests change.
            && status.contains(&format!(
                "Status: \"no stack to protect: stack.project = \"immich-guard-systemd-test-{}\"",
                std::process::id()
            )),
        "systemctl status shows neither the state nor the STATUS= line:\n{status}"
    );
    for (what, path) in [
        ("binary", "/usr/local/bin/immich-guard"),
        ("unit", "/etc/systemd/system/immich-guard.service"),
        (
            "enablement",
            "/etc/systemd/system/multi-user.target.wants/immich-guard.service",
        ),
        ("socket", "/run/immich-guard/guard.sock"),
    ] {
        assert!(m.exists(path), "install.sh left no {what} at {path}");
    }
    assert!(
        m.ok("systemd-analyze verify /etc/systemd/system/immich-guard.service 2>&1; echo rc=$?")
            .trim()
            .ends_with("rc=0"),
        "systemd-analyze verify is not clean"
    );
    let exposure = m.ok(&format!(
        "systemd-analyze security --no-pager {UNIT} | tail -n 1"
    ));
    eprintln!("systemd-analyze security: {}", exposure.trim());
    assert_sandboxed(&m, up.main_pid);
    assert_eq!(
        m.ok("stat -c %G /run/immich-guard/guard.sock").trim(),
        SOCKET_GROUP,
        "the control socket did not get its group"
    );

    // A wedged daemon (stopped, so it cannot ping) is killed by the watchdog and restarted.
    let before = m.show();
    m.ok(&format!("kill -STOP {}", before.main_pid));
    let stopped_at = Instant::now();
    // Restarted means a new main process; its READY=1 (a discovery) is waited for apart.
    let respawned = m.wait(
        "watchdog restart",
        WATCHDOG + RESTART + Duration::from_secs(10),
        |u| u.main_pid != 0 && u.main_pid != before.main_pid,
    );
    let took = stopped_at.elapsed();
    let after = m.wait("active after the restart", Duration::from_secs(30), |u| {
        u.active == "active"
    });
    eprintln!(
        "SIGSTOP of pid {} → new pid {} after {took:.1?}, active {:.1?} after the SIGSTOP (NRestarts {} → {})",
        before.main_pid,
        respawned.main_pid,
        stopped_at.elapsed(),
        before.restarts,
        after.restarts
    );
    assert_eq!(after.restarts, before.restarts + 1);
    assert_eq!(after.main_pid, respawned.main_pid);
    // The allowance beyond WatchdogSec + RestartSec is for polling through `docker exec`.
    assert!(
        took <= WATCHDOG + RESTART + Duration::from_secs(2),
        "restart took {took:?}"
    );
    m.wait_journal("Watchdog timeout");

    // Installing again is an upgrade: same result, the running service restarted.
    let again = m.ok("/src/systemd/install.sh --binary /opt/immich-guard");
    assert!(
        again.contains("kept /etc/immich-guard/config.toml") && again.contains("restarting"),
        "{again}"
    );
    let restarted = m.show();
    assert_eq!(restarted.active, "active");
    assert_ne!(restarted.main_pid, after.main_pid, "not restarted");

    // A stop while the daemon still waits for its first discovery is obeyed at once, not
    // after that wait (30 s) or TimeoutStopSec.
    gate.close();
    m.ok(&format!("systemctl restart --no-block {UNIT}"));
    let starting = m.wait(
        "restart held before READY=1",
        Duration::from_secs(20),
        |u| u.active == "activating" && u.main_pid != 0 && u.main_pid != restarted.main_pid,
    );
    m.wait("control socket up", Duration::from_secs(10), |_| {
        m.sh("immich-guard status").status.success()
    });
    let asked = Instant::now();
    m.ok(&format!("systemctl stop {UNIT}"));
    let took = asked.elapsed();
    eprintln!(
        "systemctl stop of pid {} before READY=1 took {took:.1?}",
        starting.main_pid
    );
    assert!(
        took < Duration::from_secs(5),
        "stop before READY=1 took {took:?}"
    );
    m.wait_journal("SIGTERM before ready: stopping");
    m.wait_journal(&format!(
        "Got notification message from PID {} (STOPPING=1",
        starting.main_pid
    ));
    gate.open();
    m.ok(&format!("systemctl start {UNIT}"));
    let running = m.show();

    // systemctl stop: the daemon says STOPPING=1 and leaves no socket behind.
    m.ok(&format!("systemctl stop {UNIT}"));
    let stopped = m.show();
    assert_eq!(stopped.active, "inactive", "{stopped:?}");
    let needle = format!(
        "Got notification message from PID {} (STOPPING=1",
        running.main_pid
    );
    let journal = m.wait_journal(&needle);
    let stopping = journal.lines().find(|l| l.contains(&needle)).unwrap();
    eprintln!("journal: {stopping}");
    assert!(
        !m.exists("/run/immich-guard/guard.sock"),
        "socket left after stop"
    );

    // uninstall.sh stops the (again running) service and removes it, keeping config and data.
    m.ok(&format!("systemctl start {UNIT}"));
    m.write(
        "/var/lib/immich-guard/snapshots/kept-by-uninstall",
        "a snapshot's stand-in\n",
    );
    let out = m.ok("/src/systemd/uninstall.sh");
    eprintln!("uninstall.sh:\n{out}");
    let gone = m.show();
    assert_eq!(gone.active, "inactive", "{gone:?}");
    for path in [
        "/usr/local/bin/immich-guard",
        "/etc/systemd/system/immich-guard.service",
        "/etc/systemd/system/multi-user.target.wants/immich-guard.service",
        "/run/immich-guard/guard.sock",
        "/usr/local/share/doc/immich-guard",
    ] {
        assert!(!m.exists(path), "uninstall.sh left {path}");
    }
    for path in [
        "/etc/immich-guard/config.toml",
        "/var/lib/immich-guard/snapshots/kept-by-uninstall",
    ] {
        assert!(m.exists(path), "uninstall.sh removed {path}");
    }
    let again = m.ok("/src/systemd/uninstall.sh");
    assert!(again.contains("no /usr/local/bin/immich-guard"), "{again}");

    // --purge: refused without a terminal and without --yes, and then nothing is removed.
    let refused = m.sh("/src/systemd/uninstall.sh --purge </dev/null");
    assert!(
        !refused.status.success(),
        "purge without --yes on no TTY ran"
    );
    assert!(text(&refused).contains("add --yes"), "{}", text(&refused));
    assert!(m.exists("/var/lib/immich-guard/snapshots/kept-by-uninstall"));
    // On a terminal it asks; anything but "yes" keeps everything.
    let declined = m.sh("echo no | script -qec '/src/systemd/uninstall.sh --purge' /dev/null");
    assert!(
        !declined.status.success() && text(&declined).contains("Type yes"),
        "{}",
        text(&declined)
    );
    assert!(m.exists("/var/lib/immich-guard/snapshots/kept-by-uninstall"));
    let out = m.ok("/src/systemd/uninstall.sh --purge --yes");
    eprintln!("uninstall.sh --purge --yes:\n{out}");
    for path in [
        "/etc/immich-guard",
        "/var/lib/immich-guard",
        "/etc/systemd/system/immich-guard.service.d",
    ] {
        assert!(!m.exists(path), "--purge --yes left {path}");
    }
    eprintln!("systemd test took {:.1?}", started.elapsed());
}

/// Without systemd as PID 1 (a container, a chroot): the unit is installed and enabled for a
/// later boot, the daemon runs in the background, and a second install restarts it through
/// its pid file.
#[test]
fn install_without_systemd_running() {
    if !harness::docker_available() {
        return;
    }
    let started = Instant::now();
    let image = systemd_image();
    let gate = Gate::closed();
    gate.open();
    let m = Machine::start(&image, "no-systemd", &gate, &[], &["sleep", "infinity"]);
    m.write("/etc/immich-guard/config.toml", &config());
    let out = m.ok("/src/systemd/install.sh --binary /opt/immich-guard");
    eprintln!("install.sh:\n{out}");
    assert!(out.contains("systemd is not running here"), "{out}");
    assert!(
        m.exists("/etc/systemd/system/multi-user.target.wants/immich-guard.service"),
        "the unit is not enabled for the next boot"
    );
    assert!(m.ok("immich-guard status").contains("immich-guard"));
    let pid_file = "/var/lib/immich-guard/daemon.pid";
    let status_pid = || {
        let status = m.ok("immich-guard status");
        status
            .split_once("(pid ")
            .and_then(|(_, rest)| rest.split(')').next())
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no pid in `immich-guard status`:\n{status}"))
    };
    let wait_gone = |pid: u32| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.sh(&format!("readlink /proc/{pid}/exe")).status.success() {
            assert!(Instant::now() < deadline, "daemon {pid} still runs");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The daemon writes its pid to <data_dir>/daemon.pid and holds its lock (src/lock.rs):
    // that file, never a process name, is how install.sh finds it.
    assert!(m.exists(pid_file), "the daemon wrote no {pid_file}");
    let pid = m
        .ok(&format!("cat {pid_file}"))
        .trim()
        .parse::<u32>()
        .unwrap();
    assert_eq!(status_pid(), pid, "the pid file names another process");
    let again = m.ok("/src/systemd/install.sh --binary /opt/immich-guard");
    eprintln!("install.sh again:\n{again}");
    assert!(
        again.contains(&format!("stopping the daemon (pid {pid}"))
            && again.contains(&format!("daemon {pid} stopped")),
        "{again}"
    );
    wait_gone(pid);
    let new_pid = status_pid();
    assert_ne!(new_pid, pid, "not restarted");
    let out = m.ok("/src/systemd/uninstall.sh");
    assert!(out.contains(&format!("daemon {new_pid} stopped")), "{out}");
    wait_gone(new_pid);
    let out = m.ok("/src/systemd/uninstall.sh");
    assert!(!m.exists("/usr/local/bin/immich-guard"));
    assert!(!m.exists("/etc/systemd/system/multi-user.target.wants/immich-guard.service"));
    assert!(!m.exists("/run/immich-guard/guard.sock"));
    assert!(m.exists("/etc/immich-guard/config.toml"), "{out}");

    // A locked pid file that names some other program: never signalled.
    m.ok(&format!(
        "setsid sh -c 'exec 9>>{pid_file}; flock -n 9; echo $$ >{pid_file}; exec sleep 600' </dev/null >/dev/null 2>&1 &"
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !m
        .sh(&format!(
            "readlink /proc/$(cat {pid_file})/exe | grep -q sleep"
        ))
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "decoy did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let decoy = m.ok(&format!("cat {pid_file}")).trim().to_string();
    let out = m.ok("/src/systemd/uninstall.sh");
    assert!(
        out.contains(&format!("pid {decoy} from {pid_file} is "))
            && out.contains("not touching it"),
        "{out}"
    );
    assert!(
        m.exists(&format!("/proc/{decoy}/exe")),
        "uninstall.sh killed pid {decoy}"
    );
    eprintln!("install without systemd took {:.1?}", started.elapsed());
}

/// The job itself inside the sandbox: a snapshot of an Immich-shaped stack (pg_dumpall through
/// Docker, a hardlink tree of the uploads, the compose config) taken by the installed service.
/// The stack lives under the host's /tmp, which the unit's PrivateTmp hides: the machine gets
/// it at the same path and the service through a BindPaths= drop-in, as an admin with a stack
/// under /tmp would do; every hardening directive stays.
#[test]
fn snapshot_under_the_sandbox() {
    if !harness::docker_available() {
        return;
    }
    let started = Instant::now();
    let image = systemd_image();
    let stack = harness::Stack::up(harness::StackSpec::default());
    let root = stack.dir.parent().unwrap().to_path_buf();
    let root_str = root.display().to_string();
    let gate = Gate::closed();
    gate.open();
    let m = Machine::start(
        &image,
        "snapshot",
        &gate,
        &[format!("{root_str}:{root_str}")],
        &[],
    );
    // The daemon reaches PostgreSQL on the stack's network, as it would on the host.
    let network = format!("{}_default", stack.project);
    let out = docker(&["network", "connect", &network, &m.name]);
    assert!(
        out.status.success(),
        "docker network connect: {}",
        text(&out)
    );
    wait_booted(&m);
    m.write(
        &format!("/etc/systemd/system/{UNIT}.d/stack.conf"),
        &format!("[Service]\nBindPaths={root_str}\n"),
    );
    // Snapshots beside the uploads: the same filesystem and mount, so a hardlink tree.
    m.write(
        "/etc/immich-guard/config.toml",
        &format!(
            "[stack]\nproject = \"{}\"\n\n[docker]\nhost = \"unix:///gate/docker.sock\"\n\n[snapshots]\ndir = \"{root_str}/snapshots\"\n",
            stack.project
        ),
    );
    let out = m.ok("/src/systemd/install.sh --binary /opt/immich-guard");
    eprintln!("install.sh:\n{out}");
    let snap = m.sh("immich-guard snapshot --label sandbox");
    let snap_out = text(&snap);
    eprintln!("immich-guard snapshot:\n{snap_out}");
    assert!(
        snap.status.success() && snap_out.contains("sealed snapshot"),
        "snapshot under the sandbox failed:\n{snap_out}\n{}",
        m.journal()
    );
    assert!(snap_out.contains("by hardlink tree"), "{snap_out}");
    let sealed = std::fs::read_dir(root.join("snapshots"))
        .expect("snapshot dir on the host")
        .flatten()
        .any(|e| e.path().join("meta.json").exists());
    assert!(
        sealed,
        "no sealed snapshot (meta.json) under {root_str}/snapshots"
    );
    m.ok("/src/systemd/uninstall.sh --purge --yes");
    eprintln!("snapshot under the sandbox took {:.1?}", started.elapsed());
}
