//! Filesystem images (btrfs, XFS) loop-mounted for a test: needs root and mkfs.btrfs /
//! mkfs.xfs; elsewhere the test says why it skips (and fails under CI).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

/// A filesystem image mounted on a temp dir, unmounted and removed on drop.
pub struct LoopFs {
    pub mnt: PathBuf,
    /// Removed after the unmount (fields drop after `Drop::drop`).
    _image_dir: tempfile::TempDir,
}

impl LoopFs {
    /// `None` (with the reason printed) where this machine cannot do it, except under CI.
    pub fn new(mkfs: &str, args: &[&str], size_mb: u64) -> Option<LoopFs> {
        // Missing mkfs.btrfs/mkfs.xfs: one message for the binary (exit 1 under CI).
        if !super::deps::filesystems_ready() {
            return None;
        }
        let skip = |why: String| {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must run the filesystem tests: {why}"
            );
            super::deps::skip(&why);
            None
        };
        if !rustix::process::geteuid().is_root() {
            return skip("loop mounts need root".into());
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        fs::File::create(&image)
            .unwrap()
            .set_len(size_mb << 20)
            .unwrap();
        match Command::new(mkfs).args(args).arg(&image).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => return skip(format!("{mkfs}: {}", String::from_utf8_lossy(&out.stderr))),
            Err(e) => return skip(format!("{mkfs}: {e}")),
        }
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt)
            .output()
            .unwrap();
        if !out.status.success() {
            return skip(format!(
                "mount -o loop: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Some(LoopFs {
            mnt,
            _image_dir: dir,
        })
    }

    pub fn btrfs() -> Option<LoopFs> {
        LoopFs::new("mkfs.btrfs", &["-q"], 256)
    }

    pub fn xfs(reflink: bool) -> Option<LoopFs> {
        let opt = format!("reflink={}", u8::from(reflink));
        LoopFs::new("mkfs.xfs", &["-q", "-m", &opt], 320)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Lazy: a test that failed half-way may still hold a handle inside.
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}
