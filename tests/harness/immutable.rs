//! Files nothing can remove: `chattr +i` (root, on ext4 and most other filesystems), for the
//! tests of what the daemon does when a snapshot or a partial cannot be deleted. The flag is
//! taken off the whole tree again on drop, also when the test panics, wherever the file has
//! been moved within it (retention renames a snapshot before removing it), so the temp dirs
//! can be deleted.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Immutable {
    tree: PathBuf,
}

impl Immutable {
    /// Makes `file` (inside `tree`) immutable. None, with a note, where that cannot be done:
    /// the calling test then returns.
    pub fn set(file: &Path, tree: &Path) -> Option<Immutable> {
        assert!(
            file.starts_with(tree),
            "{} is not in {}",
            file.display(),
            tree.display()
        );
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(file)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "skipped: cannot chattr +i {} (needs root and ext4 or similar)",
                file.display()
            );
            return None;
        }
        Some(Immutable {
            tree: tree.to_path_buf(),
        })
    }

    /// Takes the flag off now (and again, harmlessly, on drop).
    pub fn clear(&self) {
        let _ = Command::new("chattr")
            .arg("-R")
            .arg("-f")
            .arg("-i")
            .arg(&self.tree)
            .status();
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        self.clear();
    }
}
