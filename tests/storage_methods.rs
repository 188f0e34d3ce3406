//! Storage methods on real filesystems: btrfs and XFS images loop-mounted for the test, and a
//! daemon without root meeting files it cannot read. Needs root and mkfs.btrfs/mkfs.xfs
//! (`.ci/run` installs them); elsewhere these tests say why they skip, and fail under CI.

mod harness;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use immich_guard::snapshot::storage::{
    EntryKind, Options, Plan, StorageError, StorageMethod, StorageTree, choose_method,
    read_manifest, remove_snapshot_dir, snapshot_tree,
};

use harness::loopfs::LoopFs;

fn library(root: &Path) {
    for (p, content) in [
        ("library/admin/2024/06/IMG_0001.jpg", "photo one"),
        ("upload/u1/ab/cd/a.jpg", "photo two"),
        ("thumbs/u1/ab/cd/a-thumbnail.webp", "thumb"),
        ("library/.immich", ""),
    ] {
        fs::create_dir_all(root.join(p).parent().unwrap()).unwrap();
        fs::write(root.join(p), content).unwrap();
    }
    std::os::unix::fs::symlink("../../etc/passwd", root.join("library/escape")).unwrap();
}

fn btrfs(args: &[&str]) -> String {
    let out = Command::new("btrfs").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "btrfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn options(exclude: &[&str]) -> Options {
    Options {
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        skip_unreadable: false,
        id: "20261125T000000Z-v1.119.0-test".into(),
    }
}

/// `storage/` and `manifest.zst` inside the snapshot dir `dir`.
fn tree_of(
    upload: &Path,
    dir: &Path,
    plan: &Plan,
    options: &Options,
) -> Result<StorageTree, StorageError> {
    snapshot_tree(
        upload,
        dir,
        "storage",
        &dir.join("manifest.zst"),
        plan,
        options,
    )
}

/// A partial snapshot dir under `snapshots`, as the store makes it.
fn partial(snapshots: &Path) -> PathBuf {
    let dir = snapshots.join(".partial-test");
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_btrfs_subvolume_gets_a_read_only_native_snapshot_without_excluded_folders() {
    let Some(fs_) = LoopFs::btrfs() else { return };
    let upload = fs_.mnt.join("upload");
    btrfs(&["subvolume", "create", upload.to_str().unwrap()]);
    library(&upload);
    let snapshots = fs_.mnt.join("snapshots");
    fs::create_dir(&snapshots).unwrap();

    let plan = choose_method(&upload, &snapshots, false).unwrap();
    assert_eq!(plan.method, StorageMethod::Btrfs);
    // btrfs clones across subvolumes: a failed snapshot would fall back on reflinks.
    assert_eq!(plan.fallback, Some(StorageMethod::Reflink));

    let dir = partial(&snapshots);
    let tree = tree_of(&upload, &dir, &plan, &options(&["thumbs"])).unwrap();
    assert_eq!(tree.method, StorageMethod::Btrfs, "{:?}", tree.notes);
    assert_eq!((tree.files, tree.symlinks), (3, 1));
    assert_eq!(tree.excluded, vec!["thumbs".to_string()]);
    let storage = dir.join("storage");
    assert_eq!(
        fs::metadata(&storage).unwrap().ino(),
        256,
        "a subvolume root"
    );
    assert!(!storage.join("thumbs").exists());
    let e = fs::write(storage.join("library/new.jpg"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(30), "read-only snapshot: {e}");

    // The live library changes in place; the snapshot does not.
    fs::write(upload.join("upload/u1/ab/cd/a.jpg"), "rewritten").unwrap();
    assert_eq!(
        fs::read(storage.join("upload/u1/ab/cd/a.jpg")).unwrap(),
        b"photo two"
    );
    let manifest = read_manifest(&dir.join("manifest.zst")).unwrap();
    let entry = manifest
        .iter()
        .find(|e| e.path == "library/admin/2024/06/IMG_0001.jpg")
        .unwrap();
    assert_eq!((entry.kind, entry.size), (EntryKind::File, 9));
    assert!(manifest.iter().all(|e| !e.path.starts_with("thumbs")));

    // Tightened at the daemon's start: the snapshot dirs, but a read-only subvolume cannot
    // be, and need not be (its parent is owner-only).
    fs::set_permissions(&snapshots, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let storage_mode = fs::metadata(&storage).unwrap().mode();
    let data = tempfile::tempdir().unwrap();
    let mut config = immich_guard::config::Config::default();
    config.daemon.data_dir = data.path().join("data");
    config.snapshots.dir = Some(snapshots.clone());
    let changed = immich_guard::private::secure_start(&config).unwrap();
    assert!(changed.iter().any(|c| c.path == dir), "{changed:?}");
    for d in [&snapshots, &dir] {
        assert_eq!(fs::metadata(d).unwrap().mode() & 0o777, 0o700);
    }
    assert_eq!(fs::metadata(&storage).unwrap().mode(), storage_mode);

    // Retention and partial cleanup go through this: the read-only subvolume goes too.
    remove_snapshot_dir(&dir).unwrap();
    assert!(!dir.exists());
    let subvolumes = btrfs(&["subvolume", "list", fs_.mnt.to_str().unwrap()]);
    assert!(!subvolumes.contains("storage"), "{subvolumes}");
}

#[test]
fn a_plain_folder_on_btrfs_gets_reflinks_that_do_not_follow_later_writes() {
    let Some(fs_) = LoopFs::btrfs() else { return };
    let upload = fs_.mnt.join("immich/library-root");
    library(&upload);
    let snapshots = fs_.mnt.join("snapshots");
    fs::create_dir(&snapshots).unwrap();
    let plan = choose_method(&upload, &snapshots, false).unwrap();
    assert_eq!(plan, Plan::walking(StorageMethod::Reflink));
    let dir = partial(&snapshots);
    let tree = tree_of(&upload, &dir, &plan, &options(&[])).unwrap();
    assert_eq!((tree.method, tree.files), (StorageMethod::Reflink, 4));
    let live = upload.join("upload/u1/ab/cd/a.jpg");
    let clone = dir.join("storage/upload/u1/ab/cd/a.jpg");
    assert_ne!(
        fs::metadata(&live).unwrap().ino(),
        fs::metadata(&clone).unwrap().ino()
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&live)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"PHOTO"))
        .unwrap();
    assert_eq!(fs::read(&clone).unwrap(), b"photo two");
    assert_eq!(
        fs::read_link(dir.join("storage/library/escape")).unwrap(),
        Path::new("../../etc/passwd")
    );
}

#[test]
fn a_failed_native_snapshot_falls_back_and_says_why() {
    let Some(fs_) = LoopFs::btrfs() else { return };
    let upload = fs_.mnt.join("upload");
    btrfs(&["subvolume", "create", upload.to_str().unwrap()]);
    library(&upload);
    // Snapshots on another filesystem: btrfs cannot snapshot there, a copy is allowed.
    let other = tempfile::tempdir().unwrap();
    let plan = choose_method(&upload, other.path(), true).unwrap();
    assert_eq!(
        (plan.method, plan.fallback),
        (StorageMethod::Btrfs, Some(StorageMethod::Copy))
    );
    let dir = partial(other.path());
    let tree = tree_of(&upload, &dir, &plan, &options(&[])).unwrap();
    assert_eq!(tree.method, StorageMethod::Copy);
    assert!(
        tree.notes.iter().any(|n| n.contains("btrfs")),
        "{:?}",
        tree.notes
    );
    assert_eq!(
        fs::read(dir.join("storage/library/admin/2024/06/IMG_0001.jpg")).unwrap(),
        b"photo one"
    );
    remove_snapshot_dir(&dir).unwrap();

    // Without copy_across there is nothing to fall back on: the error says what to change.
    let plan = choose_method(&upload, other.path(), false).unwrap();
    assert_eq!((plan.method, plan.fallback), (StorageMethod::Btrfs, None));
    let dir = partial(other.path());
    let e = tree_of(&upload, &dir, &plan, &options(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("btrfs") && e.contains("snapshots.copy_across"),
        "{e}"
    );
}

#[test]
fn xfs_with_reflink_clones_and_without_it_hard_links() {
    for (reflink, expected) in [
        (true, StorageMethod::Reflink),
        (false, StorageMethod::Hardlink),
    ] {
        let Some(fs_) = LoopFs::xfs(reflink) else {
            return;
        };
        let upload = fs_.mnt.join("upload");
        library(&upload);
        let snapshots = fs_.mnt.join("snapshots");
        fs::create_dir(&snapshots).unwrap();
        let plan = choose_method(&upload, &snapshots, false).unwrap();
        assert_eq!(plan.method, expected, "xfs reflink={reflink}");
        let dir = partial(&snapshots);
        let tree = tree_of(&upload, &dir, &plan, &options(&["thumbs"])).unwrap();
        assert_eq!((tree.method, tree.files), (expected, 3));
        let same_inode = fs::metadata(upload.join("upload/u1/ab/cd/a.jpg"))
            .unwrap()
            .ino()
            == fs::metadata(dir.join("storage/upload/u1/ab/cd/a.jpg"))
                .unwrap()
                .ino();
        assert_eq!(same_inode, expected == StorageMethod::Hardlink);
    }
}

/// Set by the parent test: the child (running as nobody) snapshots this upload location.
const CHILD_ENV: &str = "IMMICH_GUARD_TEST_UNREADABLE_UPLOAD";
const NOBODY: u32 = 65534;

#[test]
fn unreadable_entries_fail_by_name_or_are_skipped_and_recorded() {
    if let Ok(upload) = std::env::var(CHILD_ENV) {
        return unreadable_child(Path::new(&upload));
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping: needs root to make files another user cannot read");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let upload = root.path().join("upload");
    library(&upload);
    // The daemon's user owns the library (as root owns it for a root daemon)...
    for entry in walkdir::WalkDir::new(&upload) {
        let path = entry.unwrap().into_path();
        std::os::unix::fs::lchown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    // ...except these, root-owned and private: it can neither read nor link them.
    let secret = upload.join("library/admin/2024/06/secret.jpg");
    fs::write(&secret, "private").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let private = upload.join("private");
    fs::create_dir(&private).unwrap();
    fs::write(private.join("b.jpg"), "b").unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    // Readable by all but owned by root: protected_hardlinks refuses the link, by name.
    let shared = root.path().join("shared");
    fs::create_dir(&shared).unwrap();
    // Explicit: the test process's umask is not ours to rely on.
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(shared.join("c.jpg"), "c").unwrap();
    fs::set_permissions(shared.join("c.jpg"), fs::Permissions::from_mode(0o644)).unwrap();
    let snapshots = root.path().join("snapshots");
    fs::create_dir(&snapshots).unwrap();
    std::os::unix::fs::chown(&snapshots, Some(NOBODY), Some(NOBODY)).unwrap();

    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "unreadable_entries_fail_by_name_or_are_skipped_and_recorded",
            "--nocapture",
        ])
        .env(CHILD_ENV, &upload)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("child: done"), "{stdout}");
}

/// Runs as nobody: first the default (fail, naming the path), then skip_unreadable.
fn unreadable_child(upload: &Path) {
    let snapshots = upload.parent().unwrap().join("snapshots");
    let plan = Plan::walking(StorageMethod::Hardlink);
    let first = snapshots.join("first");
    fs::create_dir(&first).unwrap();
    let e = tree_of(upload, &first, &plan, &options(&[])).unwrap_err();
    let StorageError::Unreadable { path, .. } = &e else {
        panic!("expected Unreadable, got {e}");
    };
    assert!(
        path.ends_with("secret.jpg") || path.ends_with("private"),
        "{e}"
    );
    assert!(e.to_string().contains("snapshots.skip_unreadable"), "{e}");

    let second = snapshots.join("second");
    fs::create_dir(&second).unwrap();
    let tree = tree_of(
        upload,
        &second,
        &plan,
        &Options {
            skip_unreadable: true,
            ..options(&[])
        },
    )
    .unwrap();
    let mut skipped: Vec<_> = tree.skipped.iter().map(|s| s.path.as_str()).collect();
    skipped.sort();
    assert_eq!(
        skipped,
        vec!["library/admin/2024/06/secret.jpg", "private"],
        "{:?}",
        tree.skipped
    );
    assert_eq!(tree.files, 4, "everything readable is still there");

    let third = snapshots.join("third");
    fs::create_dir(&third).unwrap();
    let shared = upload.parent().unwrap().join("shared");
    let e = tree_of(&shared, &third, &plan, &options(&[])).unwrap_err();
    assert!(
        matches!(&e, StorageError::LinkRefused { path } if path.ends_with("c.jpg")),
        "{e}"
    );
    assert!(e.to_string().contains("run immich-guard as root"), "{e}");
    println!("child: done");
}
