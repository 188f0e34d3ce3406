//! The manifest's content hashes against real stacks (real Docker, real PostgreSQL, the
//! stand-in server): a byte flipped in a copied snapshot's stored original (its mtime put
//! back, as bit rot leaves it) is refused by `restore` before anything changes, and with
//! `--force` the rest is restored and the damaged file listed; and with the daemon hashing a
//! hard-linked snapshot in the background after its seal, an in-place write to a live
//! original is reported by `verify --against` as changed in place since the snapshot.

mod harness;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use harness::compose::docker_ok;
use harness::guard::{Guard, cli, cli_config_with, snapshot_with};
use harness::loopfs::LoopFs;
use harness::{Stack, StackSpec, docker_available, ensure_images};
use immich_guard::restore::journal;
use immich_guard::snapshot::storage::StorageMethod;
use immich_guard::snapshot::store::Meta;

const V1: &str = "v1.119.0";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn meta_of(snapshots: &Path, id: &str) -> Meta {
    serde_json::from_slice(&std::fs::read(snapshots.join(id).join("meta.json")).unwrap()).unwrap()
}

/// The originals of the library (`upload/…jpg`) with their bytes.
fn originals(upload: &Path) -> BTreeMap<String, Vec<u8>> {
    walkdir::WalkDir::new(upload.join("upload"))
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "jpg"))
        .map(|e| {
            let rel = e.path().strip_prefix(upload).unwrap().display().to_string();
            (rel, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

fn asset_ids(stack: &Stack) -> String {
    stack.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM assets")
}

/// A snapshot dir on another filesystem than the stack's upload location (so the storage is
/// a real copy): tmpfs when the uploads are not on one, else an XFS image.
fn other_filesystem(upload: &Path) -> (PathBuf, Option<tempfile::TempDir>, Option<LoopFs>) {
    let shm = Path::new("/dev/shm");
    let upload_dev = std::fs::metadata(upload).unwrap().dev();
    if std::fs::metadata(shm).is_ok_and(|m| m.dev() != upload_dev) {
        let dir = tempfile::tempdir_in(shm).unwrap();
        return (dir.path().join("snapshots"), Some(dir), None);
    }
    let fs = LoopFs::xfs(false).expect("an XFS image for a snapshot dir on another filesystem");
    (fs.mnt.join("snapshots"), None, Some(fs))
}

#[test]
fn a_flipped_byte_in_a_stored_original_is_refused_at_restore_and_skipped_with_force() {
    if !docker_available() {
        return;
    }
    ensure_images(&[V1]);
    let stack = Stack::up(StackSpec::new(V1).seed_assets(4));
    let dir = tempfile::tempdir().unwrap();
    let (snapshots, _shm, _xfs) = other_filesystem(&stack.upload);
    let config_path = cli_config_with(&stack, dir.path(), &snapshots, "copy_across = true\n");
    let mut config = immich_guard::config::Config::default();
    config.snapshots.dir = Some(snapshots.clone());
    config.snapshots.copy_across = true;
    let meta = snapshot_with(&stack, config);
    assert_eq!(meta.storage.method, StorageMethod::Copy);
    let id = meta.id.clone();

    // The pass, here and now (the daemon would run it after the seal).
    let out = cli(&config_path, &["hash", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let hashed = meta_of(&snapshots, &id);
    let recorded = hashed.hashes.clone().expect("hashes recorded");
    assert!(hashed.check_passed(), "{:?}", hashed.check);
    assert!(recorded.files >= 4, "{recorded:?}");
    let out = cli(&config_path, &["list"]);
    assert!(
        text(&out)
            .lines()
            .any(|l| l.starts_with(&id) && l.contains(" ok ")),
        "{}",
        text(&out)
    );

    // Two originals differ from the snapshot now: `damaged` was replaced by other bytes of
    // the same size, `gone` was deleted with its row. The snapshot's copy of `damaged` has
    // one byte flipped, its mtime put back.
    let then = originals(&stack.upload);
    let mut names = then.keys();
    let (damaged, gone) = (names.next().unwrap().clone(), names.next().unwrap().clone());
    let live_damaged = stack.upload.join(&damaged);
    let edited: Vec<u8> = then[&damaged].iter().map(|b| b ^ 0xff).collect();
    std::fs::remove_file(&live_damaged).unwrap();
    std::fs::write(&live_damaged, &edited).unwrap();
    std::fs::remove_file(stack.upload.join(&gone)).unwrap();
    let gone_id = Path::new(&gone)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    stack.psql(&format!("DELETE FROM assets WHERE id = '{gone_id}'"));
    let stored = snapshots.join(&id).join("storage").join(&damaged);
    let mtime = std::fs::metadata(&stored).unwrap().modified().unwrap();
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&stored)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 3).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], 3).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    let (actual, _) = immich_guard::snapshot::db::file_sha256(&stored).unwrap();

    let files_before = originals(&stack.upload);
    let rows_before = asset_ids(&stack);
    let started_at = || {
        docker_ok(&[
            "inspect",
            "--format",
            "{{.State.StartedAt}}",
            &stack.container_name("immich-server"),
        ])
    };
    let (server, server_started) = (stack.state("immich-server").unwrap(), started_at());
    let snapshots_before = std::fs::read_dir(&snapshots).unwrap().count();

    let out = cli(&config_path, &["restore", &id, "--yes"]);
    let said = text(&out);
    eprintln!("refused:\n{said}");
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("is damaged, so nothing was changed"),
        "{said}"
    );
    assert!(said.contains(&damaged), "{said}");
    assert!(said.contains(&actual), "the SHA-256 found: {said}");
    assert!(said.contains("--force"), "{said}");
    assert_eq!(originals(&stack.upload), files_before, "no file changed");
    assert_eq!(asset_ids(&stack), rows_before, "no row changed");
    assert_eq!(stack.state("immich-server").unwrap().id, server.id);
    assert_eq!(started_at(), server_started, "nothing stopped");
    assert_eq!(
        std::fs::read_dir(&snapshots).unwrap().count(),
        snapshots_before,
        "no pre-restore snapshot"
    );
    assert!(
        !journal::path(&dir.path().join("data")).exists(),
        "no journal"
    );

    // The dry run says the same before anything.
    let out = cli(&config_path, &["restore", &id, "--dry-run", "--force"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("damaged file(s) NOT put back"), "{said}");

    let out = cli(&config_path, &["restore", &id, "--yes", "--force"]);
    let said = text(&out);
    eprintln!("forced:\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(said.contains("NOT restored (--force)"), "{said}");
    // The verify after it does not judge the file the admin chose to leave, and says so.
    assert!(
        said.contains(
            "1 left as they were by restore --force (their stored copy is damaged), not judged"
        ),
        "{said}"
    );
    assert!(said.contains(&damaged), "{said}");
    let now = originals(&stack.upload);
    assert_eq!(now.get(&gone), Some(&then[&gone]), "the rest is restored");
    assert_eq!(
        now.get(&damaged),
        Some(&edited),
        "the damaged one is left as it was"
    );
    assert!(
        asset_ids(&stack).contains(&gone_id),
        "the database is restored"
    );
    let j = journal::load(&dir.path().join("data")).unwrap().unwrap();
    assert!(j.is_complete(), "{j:?}");
}

#[test]
fn the_daemon_hashes_after_the_seal_and_verify_reports_an_in_place_write_to_a_hard_link() {
    if !docker_available() {
        return;
    }
    ensure_images(&[V1]);
    let stack = Stack::up(StackSpec::new(V1));
    let dir = tempfile::tempdir_in(stack.upload.parent().unwrap()).unwrap();
    let snapshots = dir.path().join("snapshots");
    let guard = Guard::watching(&stack, &snapshots, "");
    guard.wait_status("the stack discovered", Duration::from_secs(60), |s| {
        s.state.stack.is_some()
    });
    let out = guard.cli(&["snapshot"]);
    assert!(out.status.success(), "{}", text(&out));
    let id = std::fs::read_dir(&snapshots)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| !n.starts_with('.'))
        .expect("a sealed snapshot");
    assert_eq!(
        meta_of(&snapshots, &id).storage.method,
        StorageMethod::Hardlink
    );

    // The pass runs in the background after the seal.
    let began = Instant::now();
    let meta = loop {
        let meta = meta_of(&snapshots, &id);
        if meta.hashes.is_some() {
            break meta;
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "no hashes after 60 s; the daemon said:\n{}",
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(meta.check_passed(), "{:?}", meta.check);
    assert_eq!(meta.check.as_ref().unwrap().kind, "content-hashes");
    let out = guard.cli(&["list", "--json"]);
    let listed: Vec<Meta> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed.iter().any(|m| m.id == id && m.hashes.is_some()));

    let out = guard.cli(&["verify", "--against", &id]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("content"), "{said}");

    // Immich never does this, an editor or a script might: open for writing without
    // truncating and change bytes. The snapshot's hard link is the same inode.
    let (path, _) = originals(&stack.upload).into_iter().next().unwrap();
    let live = std::fs::File::options()
        .write(true)
        .open(stack.upload.join(&path))
        .unwrap();
    live.write_all_at(b"EDITED", 0).unwrap();
    drop(live);
    let out = guard.cli(&["verify", "--against", &id]);
    let said = text(&out);
    eprintln!("verify after the in-place write:\n{said}");
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("changed in place since the snapshot"),
        "{said}"
    );
    assert!(said.contains(&path), "{said}");
}
