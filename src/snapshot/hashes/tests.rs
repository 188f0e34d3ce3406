use super::*;
use crate::snapshot::storage::{Options, Plan, snapshot_tree};
use crate::snapshot::store::Store;
use std::cell::Cell;
use std::fs;

pub(crate) const FILES: usize = 6;

pub(crate) struct Sealed {
    _root: tempfile::TempDir,
    pub upload: PathBuf,
    pub dir: PathBuf,
}

/// A library of FILES originals and a sealed snapshot `s1` of it made by `method`.
pub(crate) fn sealed(method: StorageMethod) -> Sealed {
    let root = tempfile::tempdir().unwrap();
    let upload = root.path().join("library");
    for n in 0..FILES {
        let path = upload.join(format!("upload/u1/{n:02}.jpg"));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, format!("photo number {n}").repeat(100)).unwrap();
    }
    fs::write(upload.join("upload/.immich"), "").unwrap();
    let store = Store::open(&root.path().join("snapshots")).unwrap();
    let partial = store.begin("s1").unwrap();
    let tree = snapshot_tree(
        &upload,
        partial.path(),
        STORAGE_DIR,
        &partial.path().join(MANIFEST_FILE),
        &Plan::walking(method),
        &Options::default(),
    )
    .unwrap();
    let mut meta = crate::snapshot::store::tests::meta("s1", Utc::now());
    meta.storage = tree;
    let dir = partial.seal(&meta).unwrap();
    Sealed {
        _root: root,
        upload,
        dir,
    }
}

pub(crate) fn meta_of(dir: &Path) -> Meta {
    serde_json::from_slice(&fs::read(dir.join(META_FILE)).unwrap()).unwrap()
}

pub(crate) fn go() -> Flow {
    Flow::Go
}

pub(crate) fn options() -> PassOptions {
    PassOptions { rate: 0 }
}

/// Puts the mtime of `path` back to `mtime` (as bit rot, or `touch -r`, leaves it).
fn set_mtime(path: &Path, mtime: std::time::SystemTime) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

/// Flips one byte of `path` in place, keeping its size and mtime.
pub(crate) fn flip_byte(path: &Path) {
    use std::os::unix::fs::FileExt;
    let mtime = fs::metadata(path).unwrap().modified().unwrap();
    let file = fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 7).unwrap();
    file.write_all_at(&[byte[0] ^ 0x20], 7).unwrap();
    drop(file);
    set_mtime(path, mtime);
}

#[test]
fn a_pass_records_every_file_and_a_passed_check() {
    let s = sealed(StorageMethod::Copy);
    let Finished::Done { hashes, check } = run_pass(&s.dir, &options(), &go).unwrap() else {
        panic!("not done")
    };
    assert_eq!((hashes.files, hashes.problems), (FILES as u64 + 1, 0));
    assert!(check.passed, "{check:?}");
    assert_eq!(check.kind, CHECK_KIND);
    let meta = meta_of(&s.dir);
    assert_eq!(meta.hashes.as_ref(), Some(&hashes));
    assert!(meta.check_passed());
    assert!(!s.dir.join(PARTIAL_FILE).exists());
    let all = read_hashes(&meta, &s.dir).unwrap().unwrap();
    let (sha, _) = crate::snapshot::db::file_sha256(&s.upload.join("upload/u1/03.jpg")).unwrap();
    assert_eq!(
        all["upload/u1/03.jpg"].sha256.as_deref(),
        Some(sha.as_str())
    );
    // Done once: a second pass only reports it.
    assert!(matches!(
        run_pass(&s.dir, &options(), &|| panic!("nothing to hash")).unwrap(),
        Finished::Done { .. }
    ));
    // A changed hashes file is refused, not believed.
    let mut bytes = fs::read(s.dir.join(HASHES_FILE)).unwrap();
    bytes.push(0);
    fs::write(s.dir.join(HASHES_FILE), bytes).unwrap();
    assert!(matches!(
        read_hashes(&meta, &s.dir),
        Err(HashError::Tampered { .. })
    ));
}

#[test]
fn a_pass_stopped_part_way_resumes_where_it_stopped() {
    let s = sealed(StorageMethod::Hardlink);
    let asked = Cell::new(0);
    let stop_after_three = || {
        asked.set(asked.get() + 1);
        if asked.get() > 3 {
            Flow::Stop
        } else {
            Flow::Go
        }
    };
    assert_eq!(
        run_pass(&s.dir, &options(), &stop_after_three).unwrap(),
        Finished::Stopped { hashed: 3 }
    );
    assert!(meta_of(&s.dir).hashes.is_none());
    // A kill mid-write leaves a torn line: dropped, and the file cut back to whole lines.
    let partial = s.dir.join(PARTIAL_FILE);
    let mut text = fs::read_to_string(&partial).unwrap();
    assert_eq!(text.lines().count(), 3);
    text.push_str("{\"path\":\"upload/u1/0");
    fs::write(&partial, text).unwrap();

    let again = Cell::new(0);
    let counting = || {
        again.set(again.get() + 1);
        Flow::Go
    };
    let Finished::Done { hashes, check } = run_pass(&s.dir, &options(), &counting).unwrap() else {
        panic!("not done")
    };
    // Only what was not hashed before went through the gate again.
    assert_eq!(again.get(), FILES + 1 - 3);
    assert_eq!(hashes.files, FILES as u64 + 1);
    assert!(check.passed, "{check:?}");
    let all = read_hashes(&meta_of(&s.dir), &s.dir).unwrap().unwrap();
    assert!(all.values().all(|r| r.sha256.is_some()));
}

#[test]
fn a_snapshot_deleted_under_the_pass_stops_it_quietly() {
    let s = sealed(StorageMethod::Copy);
    let asked = Cell::new(0);
    let root = s.dir.parent().unwrap().to_path_buf();
    let retention = || {
        asked.set(asked.get() + 1);
        if asked.get() == 3 {
            Store::open(&root).unwrap().delete("s1").unwrap();
        }
        Flow::Go
    };
    assert_eq!(
        run_pass(&s.dir, &options(), &retention).unwrap(),
        Finished::Gone
    );
    assert!(!s.dir.exists());
    assert_eq!(
        fs::read_dir(&root).unwrap().count(),
        0,
        "nothing left behind"
    );
    assert_eq!(run_pass(&s.dir, &options(), &go).unwrap(), Finished::Gone);
}

#[test]
fn two_passes_never_hash_one_snapshot_at_once() {
    let s = sealed(StorageMethod::Copy);
    let held = open_partial(&s.dir.join(PARTIAL_FILE)).unwrap();
    let e = run_pass(&s.dir, &options(), &go).unwrap_err();
    assert!(matches!(e, HashError::Busy { .. }), "{e}");
    drop(held);
    assert!(matches!(
        run_pass(&s.dir, &options(), &go).unwrap(),
        Finished::Done { .. }
    ));
}

#[test]
fn a_stored_copy_modified_before_the_pass_fails_the_check() {
    let s = sealed(StorageMethod::Hardlink);
    let live = s.upload.join("upload/u1/05.jpg");
    let later = fs::metadata(&live).unwrap().modified().unwrap() + Duration::from_secs(60);
    set_mtime(&live, later);
    let Finished::Done { hashes, check } = run_pass(&s.dir, &options(), &go).unwrap() else {
        panic!("not done")
    };
    assert!(!check.passed);
    assert_eq!(hashes.problems, 1);
    assert!(
        check.summary.contains("upload/u1/05.jpg") && check.summary.contains("in place"),
        "{}",
        check.summary
    );
}

#[test]
fn the_throttle_holds_the_rate() {
    let mut t = Throttle::new(4 << 20);
    let began = Instant::now();
    for _ in 0..8 {
        t.spent(1 << 20);
    }
    // 8 MiB at 4 MiB/s: about two seconds, less a first window.
    assert!(
        began.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        began.elapsed()
    );
}
