//! The control socket cannot blind the daemon (issue 10, item 7). A daemon held to the open
//! file limit of a default host (1024) watches a real stack; a non-root user in the socket's group
//! (uid 65534 in `nogroup`, `control.group = "nogroup"`) floods the socket from a process of
//! its own, and protection must go on: the `.env` edit is seen and snapshotted, root's
//! `status` is answered, and the daemon's descriptors and memory stay bounded.
//!
//! The flooding process is this test binary again, run as uid 65534 with the ignored test
//! `flood_client` selected; it talks only to the Unix socket.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::guard::Guard;
use harness::{Stack, StackSpec, docker_available, ensure_images};
use immich_guard::control::MAX_REQUEST_BYTES;
use immich_guard::control::limits::Caps;
use rustix::process::{Resource, Rlimit};

const FLOOD_UID: u32 = 65534;
const FLOOD_GID: u32 = 65534;
const FLOOD_GROUP: &str = "nogroup";
const HOST_FD_LIMIT: u64 = 1024;
const IDLE_CONNECTIONS: usize = 1100;
const FAT_CONNECTIONS: usize = 3000;
/// uid 65534 and five more without a passwd entry, all with gid 65534 (`nogroup`).
const FAT_UIDS: [u32; 6] = [65534, 65533, 65532, 65531, 65530, 65529];
const FAT_BYTES: usize = 64 * 1024;
const LONG: Duration = Duration::from_secs(120);
/// Root's status must come back within this, flood or not.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
const MIB: u64 = 1024 * 1024;

#[test]
fn a_flood_on_the_socket_does_not_blind_protection() {
    if !docker_available() {
        return;
    }
    let _images = ensure_images(&["v1.119.0", "v1.120.0"]);
    let stack = Stack::up(StackSpec::new("v1.119.0"));
    let snapshots = tempfile::tempdir().unwrap();
    let guard = start_with_group(&stack, snapshots.path());
    guard.wait_status("a baseline", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    let pid = guard.status().pid;
    set_fd_limit(pid, HOST_FD_LIMIT, HOST_FD_LIMIT);
    assert_eq!(
        fd_limit_of(pid),
        HOST_FD_LIMIT,
        "the daemon runs with the host's limit"
    );
    let caps = Caps::for_fd_limit(HOST_FD_LIMIT);
    let fds_before = open_fds(pid);
    let rss_before = rss(pid);
    eprintln!(
        "daemon {pid}: {fds_before} fds, VmRSS {} KiB before the flood",
        rss_before / 1024
    );

    // Part 1: 1,100 idle connections, re-opened every second as the daemon closes them.
    let mut flood = Flood::start(&guard.socket, FLOOD_UID, IDLE_CONNECTIONS, 0, true);
    let mut fds_during = Sampler::start(move || open_fds(pid));
    let answers = time_status(&guard, 10);
    stack.set_env("IMMICH_VERSION", "v1.120.0");
    let edited = Instant::now();
    guard.wait_status("a pending v1.120.0 seen under the flood", LONG, |s| {
        s.state.last_snapshot.is_some()
    });
    let sealed_after = edited.elapsed();
    let answers_after = time_status(&guard, 10);
    let fds_peak = fds_during.stop();
    let client = flood.stop();
    eprintln!(
        "idle flood: {client}; daemon fds peak {fds_peak} (before {fds_before}); \
         root status answered in {} (max {:?}) before the edit, {} after the snapshot; \
         pre-update snapshot sealed {sealed_after:?} after the .env edit",
        answers.summary(),
        answers.max,
        answers_after.summary()
    );
    assert!(
        client.connected >= IDLE_CONNECTIONS,
        "the flood really ran: {client}"
    );
    assert!(answers.max < ANSWER_WITHIN && answers_after.max < ANSWER_WITHIN);
    let list = guard.cli(&["list", "--json"]);
    assert!(list.status.success(), "{list:?}");
    let metas: Vec<immich_guard::snapshot::store::Meta> =
        serde_json::from_slice(&list.stdout).unwrap();
    assert!(
        metas
            .iter()
            .any(|m| m.trigger == "pre-update" && m.version == "v1.119.0"),
        "the IMMICH_VERSION edit was snapshotted under the flood: {metas:?}"
    );
    // The flooding uid holds its share of slots; each refused connection is closed at once.
    // A snapshot adds its own descriptors on top.
    assert!(
        fds_peak <= fds_before + caps.per_uid as u64 + 40,
        "daemon fds {fds_peak} (before {fds_before}, per-uid cap {})",
        caps.per_uid
    );
    let log = guard.log();
    assert!(!log.contains("Too many open files"), "{log}");
    let refusal_lines = log.matches("refused a connection").count();
    assert!(
        (1..=5).contains(&refusal_lines),
        "refusals are logged once a minute, not once each: {refusal_lines} lines"
    );

    // Part 2: 3,000 connections with a line that never ends, from six uids of the group at
    // once: 64 KiB (over the request limit) from half of them; from the others exactly the
    // limit, which the daemon holds until the request deadline, so that together they keep
    // every slot root does not.
    std::thread::sleep(Duration::from_secs(2));
    let rss_base = rss(pid);
    let mut rss_during = Sampler::start(move || rss(pid));
    let mut fds_during = Sampler::start(move || open_fds(pid));
    let mut floods: Vec<Flood> = FAT_UIDS
        .iter()
        .enumerate()
        .map(|(i, &uid)| {
            let each = FAT_CONNECTIONS / FAT_UIDS.len();
            let bytes = if i % 2 == 0 {
                FAT_BYTES
            } else {
                MAX_REQUEST_BYTES
            };
            Flood::start(&guard.socket, uid, each, bytes, false)
        })
        .collect();
    let answers = time_status(&guard, 10);
    let clients: Vec<Report> = floods.iter_mut().map(Flood::stop).collect();
    let rss_peak = rss_during.stop();
    let fds_peak = fds_during.stop();
    // The held connections end at the request deadline; then only the allocator is left.
    std::thread::sleep(immich_guard::control::reader::REQUEST_TIMEOUT + Duration::from_secs(2));
    let rss_after = rss(pid);
    let connected: usize = clients.iter().map(|c| c.connected).sum();
    let refused: usize = clients.iter().map(|c| c.answered).sum();
    eprintln!(
        "fat flood: {connected} connections of {FAT_BYTES} or {MAX_REQUEST_BYTES} bytes from {} \
         uids, {refused} error lines back at once (refused or too large); daemon fds peak {fds_peak}; daemon VmRSS {} KiB before, {} KiB peak, {} KiB \
         after; root status answered in {} (max {:?})",
        FAT_UIDS.len(),
        rss_base / 1024,
        rss_peak / 1024,
        rss_after / 1024,
        answers.summary(),
        answers.max
    );
    assert!(connected >= FAT_CONNECTIONS, "the flood really ran");
    assert!(answers.max < ANSWER_WITHIN);
    let unprivileged = (caps.total - caps.reserved) as u64;
    assert!(
        fds_peak <= fds_before + unprivileged + 40,
        "daemon fds {fds_peak} (before {fds_before})"
    );
    assert!(rss_peak < 40 * MIB, "peak RSS {rss_peak}");
    assert!(
        rss_after <= rss_base + 2 * MIB,
        "RSS after {rss_after}, before {rss_base}"
    );
    assert_eq!(guard.status().pid, pid);

    // Part 3: out of descriptors altogether (a limit just above what the daemon holds, as if
    // something else had leaked them): accept backs off instead of spinning, the log says so
    // once, and the socket serves again as soon as descriptors are back.
    // Only the soft limit: lowering the hard one cannot be undone without CAP_SYS_RESOURCE.
    // The content-hash pass that follows the seal opens files and directories of its own;
    // once it is done the daemon's count is steady, so the limit leaves exactly two spare.
    guard.wait_all_checked(LONG);
    let steady = steady_fds(pid);
    set_fd_limit(pid, steady + 2, HOST_FD_LIMIT);
    let queued: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&guard.socket).unwrap())
        .collect();
    let failed_before = guard.log().matches("control socket accept failed").count();
    let cpu_before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(5));
    let cpu = cpu_ticks(pid) - cpu_before;
    let failed_lines = guard.log().matches("control socket accept failed").count() - failed_before;
    set_fd_limit(pid, HOST_FD_LIMIT, HOST_FD_LIMIT);
    let start = Instant::now();
    guard.status();
    let recovered = start.elapsed();
    drop(queued);
    eprintln!(
        "out of descriptors: {failed_lines} log lines and {cpu} CPU ticks in 5 s; status \
         answered {recovered:?} after the limit came back"
    );
    assert!(
        (1..=2).contains(&failed_lines),
        "{failed_lines} 'accept failed' lines"
    );
    assert!(
        cpu < 50,
        "the daemon used {cpu} ticks in 5 s of failing accepts"
    );
    assert!(recovered < ANSWER_WITHIN, "{recovered:?}");
    assert!(guard.log().contains("control socket accepts again"));
}

/// User + system CPU time of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The flooding side, run by the test above as a non-root uid (see `Flood::start`).
#[test]
#[ignore = "the flooding process of a_flood_on_the_socket_does_not_blind_protection"]
fn flood_client() {
    let socket = std::env::var("FLOOD_SOCKET").expect("FLOOD_SOCKET");
    let count: usize = std::env::var("FLOOD_CONNECTIONS").unwrap().parse().unwrap();
    let bytes: usize = std::env::var("FLOOD_BYTES").unwrap().parse().unwrap();
    let reconnect = std::env::var("FLOOD_RECONNECT").as_deref() == Ok("1");
    let stop = Arc::new(AtomicBool::new(false));
    {
        // The parent closes our stdin to stop us.
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            stop.store(true, Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let payload = vec![b'x'; bytes];
    let connect = || -> Option<UnixStream> {
        let mut stream = UnixStream::connect(&socket).ok()?;
        stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        if !payload.is_empty() {
            // A refused connection may be closed before this is written.
            let _ = stream.write_all(&payload);
        }
        stream.set_nonblocking(true).unwrap();
        Some(stream)
    };
    let mut streams = Vec::with_capacity(count);
    let mut failed = 0;
    while streams.len() < count && Instant::now() < deadline {
        match connect() {
            Some(s) => streams.push(s),
            None => failed += 1,
        }
    }
    let mut reconnects = 0usize;
    let mut answered = 0usize;
    println!(
        "FLOOD connected={} failed={failed} reconnects=0 answered=0",
        streams.len()
    );
    std::io::stdout().flush().unwrap();
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        if !reconnect {
            continue;
        }
        for stream in streams.iter_mut() {
            if closed_by_peer(stream, &mut answered)
                && let Some(fresh) = connect()
            {
                *stream = fresh;
                reconnects += 1;
            }
        }
    }
    for stream in streams.iter_mut() {
        closed_by_peer(stream, &mut answered);
    }
    println!(
        "FLOOD connected={} failed={failed} reconnects={reconnects} answered={answered}",
        streams.len()
    );
}

/// Drains what the daemon sent (counting its answer lines); true once it closed.
fn closed_by_peer(stream: &mut UnixStream, answered: &mut usize) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => *answered += buf[..n].iter().filter(|b| **b == b'\n').count(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// The daemon on `stack` with `control.group = "nogroup"`, reachable by uid 65534. The harness
/// writes the `[control]` table itself, so the group goes in and the daemon is started again
/// on the same config.
fn start_with_group(stack: &Stack, snapshots: &Path) -> Guard {
    let mut guard = Guard::watching(stack, snapshots, "");
    guard.terminate();
    let config = std::fs::read_to_string(&guard.config_path).unwrap();
    let config = config.replacen(
        "[control]\n",
        &format!("[control]\ngroup = {FLOOD_GROUP:?}\n"),
        1,
    );
    std::fs::write(&guard.config_path, config).unwrap();
    // The temp dir is 0700: let the group's members reach the socket inside it.
    std::fs::set_permissions(guard.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    guard.restart()
}

/// Gives the daemon the open file limit of a default host, soft and hard. (Set from outside
/// once it runs: the test process cannot lower its own hard limit and raise it back without
/// CAP_SYS_RESOURCE. The daemon sizes its caps the same at 1024 as at any higher limit.)
fn set_fd_limit(pid: u32, soft: u64, hard: u64) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::prlimit(
        Some(pid),
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: Some(hard),
        },
    )
    .expect("prlimit the daemon");
}

fn fd_limit_of(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// The daemon's descriptor count once it has been the same for a second.
fn steady_fds(pid: u32) -> u64 {
    let deadline = Instant::now() + LONG;
    let mut last = open_fds(pid);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = open_fds(pid);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// VmRSS in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// The flooding process: this test binary as `uid` with gid 65534 (std drops the
/// supplementary groups), with the ignored `flood_client` test selected.
struct Flood {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Flood {
    /// Starts it and returns once all its connections are open (or tried).
    fn start(socket: &Path, uid: u32, connections: usize, bytes: usize, reconnect: bool) -> Flood {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "flood_client", "--ignored", "--nocapture"])
            .env("FLOOD_SOCKET", socket)
            .env("FLOOD_CONNECTIONS", connections.to_string())
            .env("FLOOD_BYTES", bytes.to_string())
            .env("FLOOD_RECONNECT", if reconnect { "1" } else { "0" })
            .uid(uid)
            .gid(FLOOD_GID)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the flooding process");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(report) = line.strip_prefix("FLOOD ") {
                    sink.lock().unwrap().push(report.to_string());
                }
            }
        });
        let start = Instant::now();
        while lines.lock().unwrap().is_empty() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the flooding process ended before it connected: {status}");
            }
            assert!(start.elapsed() < LONG, "the flood did not connect");
            std::thread::sleep(Duration::from_millis(50));
        }
        Flood { child, lines }
    }

    /// Stops it (closes its stdin) and returns its last report.
    fn stop(&mut self) -> Report {
        drop(self.child.stdin.take());
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                self.child.kill().ok();
                self.child.wait().ok();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The reader thread may still hold the final line for a moment.
        std::thread::sleep(Duration::from_millis(200));
        let last = self
            .lines
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default();
        Report::parse(&last)
    }
}

/// The flooding process's count of connections.
#[derive(Debug, Default)]
struct Report {
    connected: usize,
    failed: usize,
    reconnects: usize,
    /// Lines the daemon wrote to it (the refusals).
    answered: usize,
}

impl Report {
    fn parse(line: &str) -> Report {
        let mut r = Report::default();
        for (key, value) in line.split(' ').filter_map(|kv| kv.split_once('=')) {
            let value = value.parse().unwrap_or(0);
            match key {
                "connected" => r.connected = value,
                "failed" => r.failed = value,
                "reconnects" => r.reconnects = value,
                "answered" => r.answered = value,
                _ => {}
            }
        }
        r
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} connections open at once, {} failed to connect, {} re-opened, {} answer lines",
            self.connected, self.failed, self.reconnects, self.answered
        )
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Samples a number in a thread until stopped; returns the peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Sampler {
    fn start(sample: impl Fn() -> u64 + Send + 'static) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::SeqCst) {
                peak = peak.max(sample());
                std::thread::sleep(Duration::from_millis(50));
            }
            peak.max(sample())
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

struct Answers {
    times: Vec<Duration>,
    max: Duration,
}

impl Answers {
    fn summary(&self) -> String {
        let mut sorted = self.times.clone();
        sorted.sort();
        format!("median {:?}", sorted[sorted.len() / 2])
    }
}

/// Root asks for status `n` times, a little apart, and times each answer.
fn time_status(guard: &Guard, n: usize) -> Answers {
    let times: Vec<Duration> = (0..n)
        .map(|_| {
            let start = Instant::now();
            guard.status();
            let took = start.elapsed();
            std::thread::sleep(Duration::from_millis(100));
            took
        })
        .collect();
    let max = times.iter().copied().max().unwrap();
    Answers { times, max }
}
