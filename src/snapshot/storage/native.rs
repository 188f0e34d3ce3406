//! Native snapshots: btrfs subvolume snapshots and ZFS snapshots, with the marker that lets a
//! crash never leave one behind that nobody removes.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::{BTRFS_SUBVOLUME_INODE, StorageError};

#[derive(Debug, Clone, PartialEq)]
pub(super) struct ZfsDataset {
    name: String,
    mountpoint: PathBuf,
}

/// The ZFS dataset mounted at or above `path`, from /proc/self/mountinfo.
pub(super) fn zfs_dataset(path: &Path) -> Option<ZfsDataset> {
    let path = std::fs::canonicalize(path).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_zfs_mounts(&mountinfo)
        .into_iter()
        .filter(|d| path.starts_with(&d.mountpoint))
        .max_by_key(|d| d.mountpoint.as_os_str().len())
}

fn parse_zfs_mounts(mountinfo: &str) -> Vec<ZfsDataset> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            (right.next()? == "zfs").then_some(())?;
            Some(ZfsDataset {
                name: unescape_mountinfo(right.next()?),
                mountpoint: PathBuf::from(unescape_mountinfo(mountpoint)),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Written before a native snapshot exists, so a crash cannot leave one nobody removes.
const NATIVE_MARKER: &str = "native.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum NativeMarker {
    /// The subvolume at `<snapshot>/storage`.
    Btrfs,
    Zfs {
        snapshot: String,
    },
}

fn write_marker(snap_dir: &Path, marker: &NativeMarker) -> Result<(), StorageError> {
    let path = snap_dir.join(NATIVE_MARKER);
    let bytes = serde_json::to_vec(marker).expect("marker serializes");
    crate::durable::write_synced(&path, &bytes)
        .and_then(|()| crate::durable::sync_dir(snap_dir))
        .map_err(|source| StorageError::Write { path, source })
}

fn run_tool(tool: &'static str, path: &Path, args: &[&OsStr]) -> Result<(), StorageError> {
    let failed = |detail: String| StorageError::Native {
        tool,
        path: path.to_path_buf(),
        detail,
    };
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| failed(format!("cannot run {tool}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(format!(
            "{tool} {}: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A writable snapshot first, so excluded folders can be removed from it, then read-only.
pub(super) fn btrfs_snapshot(
    upload: &Path,
    snap_dir: &Path,
    dest: &Path,
    exclude: &[String],
) -> Result<(), StorageError> {
    write_marker(snap_dir, &NativeMarker::Btrfs)?;
    run_tool(
        "btrfs",
        upload,
        &[
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            upload.as_os_str(),
            dest.as_os_str(),
        ],
    )?;
    for name in exclude {
        let path = dest.join(name);
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StorageError::Write { path, source: e });
            }
            _ => {}
        }
    }
    run_tool(
        "btrfs",
        dest,
        &[
            "property".as_ref(),
            "set".as_ref(),
            "-ts".as_ref(),
            dest.as_os_str(),
            "ro".as_ref(),
            "true".as_ref(),
        ],
    )
}

/// Returns the snapshot's name and where the upload location's files are inside it.
pub(super) fn zfs_snapshot(
    upload: &Path,
    snap_dir: &Path,
    dataset: &ZfsDataset,
    id: &str,
) -> Result<(String, PathBuf), StorageError> {
    let short = format!("immich-guard-{id}");
    let name = format!("{}@{short}", dataset.name);
    write_marker(
        snap_dir,
        &NativeMarker::Zfs {
            snapshot: name.clone(),
        },
    )?;
    run_tool("zfs", upload, &["snapshot".as_ref(), name.as_ref()])?;
    let canonical = std::fs::canonicalize(upload).map_err(|source| StorageError::Read {
        path: upload.to_path_buf(),
        source,
    })?;
    let inside = canonical
        .strip_prefix(&dataset.mountpoint)
        .unwrap_or(Path::new(""));
    let root = dataset
        .mountpoint
        .join(".zfs/snapshot")
        .join(&short)
        .join(inside);
    Ok((name, root))
}

/// Destroys the native snapshot a snapshot dir owns, if any. Safe to call twice.
pub fn remove_native(snap_dir: &Path) -> std::io::Result<()> {
    let marker = snap_dir.join(NATIVE_MARKER);
    let bytes = match std::fs::read(&marker) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let result = match serde_json::from_slice(&bytes).map_err(std::io::Error::other)? {
        NativeMarker::Btrfs => {
            let sub = snap_dir.join(crate::snapshot::store::STORAGE_DIR);
            match std::fs::symlink_metadata(&sub) {
                Ok(m) if m.ino() == BTRFS_SUBVOLUME_INODE => run_tool(
                    "btrfs",
                    &sub,
                    &["subvolume".as_ref(), "delete".as_ref(), sub.as_os_str()],
                ),
                _ => Ok(()),
            }
        }
        NativeMarker::Zfs { snapshot } => {
            match run_tool("zfs", snap_dir, &["destroy".as_ref(), snapshot.as_ref()]) {
                Err(StorageError::Native { detail, .. }) if detail.contains("could not find") => {
                    Ok(())
                }
                other => other,
            }
        }
    };
    result.map_err(std::io::Error::other)?;
    std::fs::remove_file(&marker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zfs_datasets_come_from_mountinfo_with_escapes() {
        let mountinfo = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
90 22 0:50 / /tank rw shared:40 - zfs tank rw,xattr,noacl
91 90 0:51 / /tank/immich\\040photos rw shared:41 - zfs tank/immich\\040photos rw,xattr
";
        let found = parse_zfs_mounts(mountinfo);
        assert_eq!(
            found,
            vec![
                ZfsDataset {
                    name: "tank".into(),
                    mountpoint: "/tank".into()
                },
                ZfsDataset {
                    name: "tank/immich photos".into(),
                    mountpoint: "/tank/immich photos".into()
                },
            ]
        );
    }
}
