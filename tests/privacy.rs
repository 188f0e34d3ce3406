//! Private by default (issue 10, item 1): a daemon started by hand under umask 022 keeps its
//! data dir, snapshot dir, snapshots and incidents owner-only, never changes the live library
//! its hard-link snapshots share inodes with, and an incident bundle holds no password.
//! A data dir left wider by an older version is tightened at start, and the log says so.

mod harness;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::compose::docker_ok;
use harness::guard::{Guard, GuardOptions};
use harness::{Stack, StackSpec, docker_available};

const LONG: Duration = Duration::from_secs(120);

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every path under `root` with its mode.
fn modes_under(root: &Path) -> BTreeMap<PathBuf, u32> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap())
        .map(|e| (e.path().to_path_buf(), mode(e.path())))
        .collect()
}

/// Asserts 0700 dirs and 0600 files under `root`, except below a snapshot's `storage/` (a
/// hard-link tree of the live library, whose modes are the library's). Returns the listing.
fn assert_private(root: &Path, snapshot_root: &Path) -> Vec<String> {
    let mut listing = Vec::new();
    for (path, m) in modes_under(root) {
        let in_storage = path.strip_prefix(snapshot_root).is_ok_and(|rel| {
            rel.iter().nth(1).is_some_and(|c| c == "storage") && rel.iter().count() > 2
        });
        if in_storage {
            listing.push(format!(
                "{m:o} {} (below storage/: the library's mode)",
                path.display()
            ));
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        listing.push(format!("{m:o} {}", path.display()));
        if meta.is_dir() {
            assert_eq!(m, 0o700, "dir {} is {m:o}", path.display());
        } else {
            assert!(meta.is_file(), "{} is neither file nor dir", path.display());
            assert_eq!(m, 0o600, "file {} is {m:o}", path.display());
        }
    }
    listing
}

/// A crash loop: the server (started with `STANDIN_CRASH_FILE`) fails at every boot from its
/// restart on. Returns the incident bundle once the halt has rewritten its incident.json.
fn crash_loop_bundle(stack: &Stack, guard: &Guard) -> PathBuf {
    std::fs::write(stack.upload.join(".standin-crash"), "boot").unwrap();
    docker_ok(&["restart", &stack.container_name("immich-server")]);
    let s = guard.wait_status("the crash loop halted", LONG, |s| {
        s.state.protection.incident.is_some() && !s.state.protection.halted.is_empty()
    });
    let incident = s.state.protection.incident.unwrap();
    let start = std::time::Instant::now();
    while !guard.log().contains("incident bundle written") {
        assert!(
            start.elapsed() < LONG,
            "no bundle rewrite:\n{}",
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    incident.dir.join(&incident.id)
}

#[test]
fn a_daemon_run_by_hand_under_umask_022_keeps_snapshots_and_incidents_owner_only_without_secrets() {
    if !docker_available() {
        return;
    }
    // What a shell gives an admin who types `immich-guard run`; the daemon inherits it.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let stack = Stack::up(
        StackSpec::default()
            .restart("always")
            .boot_delay_ms(300)
            .env("STANDIN_CRASH_FILE", "/data/.standin-crash"),
    );
    let live_before = modes_under(&stack.upload);
    assert!(
        live_before.values().any(|m| m & 0o044 != 0),
        "the library has files others can read: {live_before:?}"
    );
    // Outside the data dir, and left wide by someone.
    let snapshots_parent = tempfile::tempdir().unwrap();
    let snapshots = snapshots_parent.path().join("snapshots");
    std::fs::create_dir(&snapshots).unwrap();
    chmod(&snapshots, 0o755);
    let guard = Guard::watching(
        &stack,
        &snapshots,
        "\n[crash_loop]\ndeaths = 3\nwindow_secs = 120\n",
    );
    guard.wait_status("a baseline", Duration::from_secs(30), |s| {
        s.state.protection.baseline.is_some()
    });
    let out = guard.cli(&["snapshot", "--json"]);
    assert!(out.status.success(), "{out:?}\nlog:\n{}", guard.log());
    let meta: immich_guard::snapshot::store::Meta = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        meta.storage.method,
        immich_guard::snapshot::storage::StorageMethod::Hardlink
    );

    let bundle = crash_loop_bundle(&stack, &guard);
    assert!(bundle.join("config/.env").is_file());

    let data = guard.dir.path().join("data");
    let mut listing = assert_private(&data, &snapshots);
    listing.extend(assert_private(&snapshots, &snapshots));
    let snapshot_dir = snapshots.join(&meta.id);
    assert_eq!(mode(&snapshot_dir.join("storage")), 0o700);
    // The live library as it was, and the snapshot's files are its inodes.
    let live_after = modes_under(&stack.upload);
    for (path, before) in &live_before {
        assert_eq!(live_after.get(path), Some(before), "{}", path.display());
    }
    let shared = live_before
        .keys()
        .filter(|p| p.is_file())
        .filter_map(|p| {
            let rel = p.strip_prefix(&stack.upload).unwrap();
            let copy = snapshot_dir.join("storage").join(rel);
            copy.exists().then(|| (p.clone(), copy))
        })
        .collect::<Vec<_>>();
    assert!(!shared.is_empty(), "the snapshot holds library files");
    for (live, copy) in &shared {
        let (a, b) = (
            std::fs::metadata(live).unwrap(),
            std::fs::metadata(copy).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "{} is a hard link", copy.display());
        assert_eq!(mode(copy), live_before[live]);
    }

    // The bundle is for sharing: no password anywhere in it. The snapshot keeps the real
    // `.env` (a restore needs it), owner-only.
    let password = stack.db_password.as_bytes();
    for entry in walkdir::WalkDir::new(&bundle) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert!(
                !bytes.windows(password.len()).any(|w| w == password),
                "{} holds the database password",
                entry.path().display()
            );
        }
    }
    let env = std::fs::read_to_string(bundle.join("config/.env")).unwrap();
    assert!(env.contains("DB_PASSWORD=<redacted>"), "{env}");
    assert!(env.contains("IMMICH_VERSION=v1.119.0"), "{env}");
    let inspect = std::fs::read_to_string(bundle.join("inspect/database.json")).unwrap();
    assert!(
        inspect.contains("POSTGRES_PASSWORD=<redacted>"),
        "{inspect}"
    );
    let kept = std::fs::read_to_string(snapshot_dir.join("config/.env")).unwrap();
    assert!(kept.contains(&format!("DB_PASSWORD={}", stack.db_password)));
    assert!(
        !guard.log().contains(&stack.db_password),
        "the log holds the password"
    );

    listing.sort_by(|a, b| {
        a.split_once(' ')
            .map(|x| x.1)
            .cmp(&b.split_once(' ').map(|x| x.1))
    });
    eprintln!(
        "permissions after a snapshot and an incident:\n{}",
        listing.join("\n")
    );
}

/// Issue 18: `!` and `@` are what URL userinfo must percent-encode.
const URL_PASSWORD: &str = "Pr0be!S3cret@9f";
const URL_ENCODED: &str = "Pr0be%21S3cret%409f";
/// `Authorization: Basic` of `postgres:Pr0be!S3cret@9f`.
const BASIC_AUTH: &str = "cG9zdGdyZXM6UHIwYmUhUzNjcmV0QDlm";

/// The bytes of every file under `dir`, zstd ones decompressed. Any other compressed format
/// fails the test: it would be unread.
fn files_decoded(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.unwrap();
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path().to_path_buf();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let bytes = std::fs::read(&path).unwrap();
        let bytes = if name.ends_with(".zst") {
            zstd::decode_all(&bytes[..]).unwrap()
        } else {
            assert!(
                ![".gz", ".tgz", ".xz", ".bz2", ".zip", ".tar"]
                    .iter()
                    .any(|ext| name.ends_with(ext)),
                "{}: a compressed file this test cannot read",
                path.display()
            );
            bytes
        };
        files.push((path, bytes));
    }
    files
}

#[test]
fn an_incident_bundle_holds_a_url_encoded_password_in_no_form() {
    if !docker_available() {
        return;
    }
    let db_url = format!("postgresql://postgres:{URL_ENCODED}@database:5432/immich");
    // The server's crash line names the password three more ways: in a URL with lowercase-hex
    // full encoding, JSON-escaped, and in a basic-auth header.
    let crash = format!(
        r#"Error: cannot connect to postgresql://postgres:%50%72%30%62%65%21%53%33%63%72%65%74%40%39%66@database/immich {{"password":"Pr0be\u0021S3cret\u00409f"}} Authorization: Basic {BASIC_AUTH}"#
    );
    harness::compose::remove_leftovers();
    let stack = Stack::create(
        StackSpec::default()
            .db_password(URL_PASSWORD)
            .restart("always")
            .boot_delay_ms(300)
            .env("STANDIN_CRASH_FILE", "/data/.standin-crash")
            .env("STANDIN_CRASH_MESSAGE", &crash)
            .env("DB_URL", &db_url),
    );
    // In `.env` too, where Immich documents DB_URL.
    let mut env = std::fs::read_to_string(&stack.env_file).unwrap();
    env.push_str(&format!("DB_URL={db_url}\n"));
    std::fs::write(&stack.env_file, &env).unwrap();
    stack.compose(&["up", "-d"]);
    // The stand-in connects with DB_PASSWORD: the stack works with this password.
    stack
        .wait_server_ready(stack.spec.ready_timeout)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stack.psql("SELECT 1"), "1");

    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(
        &stack,
        snapshots.path(),
        "\n[crash_loop]\ndeaths = 3\nwindow_secs = 120\n",
    );
    guard.wait_status("a baseline", Duration::from_secs(60), |s| {
        s.state.protection.baseline.is_some()
    });
    let bundle = crash_loop_bundle(&stack, &guard);

    // Compared in lower case: each percent-encoded form in either hex case at once.
    let json_escaped = serde_json::to_string(URL_PASSWORD).unwrap();
    let forms: Vec<String> = [
        URL_PASSWORD,
        URL_ENCODED,
        "Pr0be!S3cret%409f",
        "%50%72%30%62%65%21%53%33%63%72%65%74%40%39%66",
        r"Pr0be\u0021S3cret\u00409f",
        json_escaped.trim_matches('"'),
    ]
    .iter()
    .map(|f| f.to_ascii_lowercase())
    .collect();
    let files = files_decoded(&bundle);
    assert!(files.len() >= 10, "{files:?}");
    for (path, bytes) in &files {
        let lower = bytes.to_ascii_lowercase();
        for form in &forms {
            assert!(
                !lower.windows(form.len()).any(|w| w == form.as_bytes()),
                "{} holds the password as {form}:\n{}",
                path.display(),
                String::from_utf8_lossy(bytes)
            );
        }
        assert!(
            !bytes
                .windows(BASIC_AUTH.len())
                .any(|w| w == BASIC_AUTH.as_bytes()),
            "{} holds the basic-auth header",
            path.display()
        );
    }
    // Only the password went: what connects where is still there.
    let redacted_url = "postgresql://postgres:<redacted>@database:5432/immich";
    let read = |rel: &str| std::fs::read_to_string(bundle.join(rel)).unwrap();
    let env = read("config/.env");
    assert!(env.contains("DB_PASSWORD=<redacted>"), "{env}");
    assert!(env.contains(&format!("DB_URL={redacted_url}")), "{env}");
    let compose = read("config/docker-compose.yml");
    assert!(
        compose.contains(&format!("DB_URL: \"{redacted_url}\"")),
        "{compose}"
    );
    let inspect = read("inspect/immich-server.json");
    assert!(
        inspect.contains(&format!("\"DB_URL={redacted_url}\"")),
        "{inspect}"
    );
    let log = read("logs/immich-server.log");
    assert!(
        log.contains(immich_guard::redact::REDACTED_LINE),
        "the crash line held the password: {log}"
    );
    let daemon_log = guard.log().to_ascii_lowercase();
    for form in &forms {
        assert!(!daemon_log.contains(form.as_str()), "the log holds {form}");
    }
}

#[test]
fn a_data_dir_left_wide_is_tightened_at_start_and_the_log_says_so() {
    let mut guard = Guard::start(GuardOptions {
        extra_toml: "[stack]\nproject = \"igt-privacy-no-such-stack\"\n",
        ..Default::default()
    });
    guard.wait_socket(Duration::from_secs(10));
    guard.terminate();
    let data = guard.dir.path().join("data");
    assert_eq!(mode(&data), 0o700, "created owner-only");

    // As an older version left it, with a snapshot whose storage/ links a live file.
    let live = guard.dir.path().join("library/photo.jpg");
    std::fs::create_dir_all(live.parent().unwrap()).unwrap();
    std::fs::write(&live, "jpeg").unwrap();
    chmod(&live, 0o644);
    let snap = data.join("snapshots/20261125T000000Z-v1.119.0-manual");
    std::fs::create_dir_all(snap.join("storage")).unwrap();
    std::fs::create_dir_all(snap.join("config")).unwrap();
    std::fs::hard_link(&live, snap.join("storage/photo.jpg")).unwrap();
    for (path, m) in [
        (snap.join("meta.json"), 0o644),
        (snap.join("config/.env"), 0o644),
        (data.join("protection.json"), 0o644),
    ] {
        if !path.exists() {
            std::fs::write(&path, "{}").unwrap();
        }
        chmod(&path, m);
    }
    for dir in [
        &data,
        &data.join("snapshots"),
        &data.join("incidents"),
        &snap,
        &snap.join("storage"),
        &snap.join("config"),
    ] {
        chmod(dir, 0o755);
    }

    let guard = guard.restart();
    let snapshots = data.join("snapshots");
    assert_private(&data, &snapshots);
    assert_eq!(mode(&live), 0o644, "the live file is not the daemon's");
    assert_eq!(mode(&snap.join("storage/photo.jpg")), 0o644);
    let log = guard.log();
    let line = log
        .lines()
        .find(|l| {
            l.contains("permissions tightened") && l.contains(&format!("path={} ", data.display()))
        })
        .unwrap_or_else(|| panic!("no line for the data dir in the log:\n{log}"));
    assert!(
        line.contains("old=0755") && line.contains("new=0700"),
        "{line}"
    );
    assert!(
        log.lines().any(|l| l.contains("permissions tightened")
            && l.contains("protection.json")
            && l.contains("old=0644")
            && l.contains("new=0600")),
        "{log}"
    );
}
