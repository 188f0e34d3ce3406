//! Writing so that nothing is lost: a file is written whole or not at all (temp file, fsync,
//! rename, then the directory synced), a directory is built under a partial name and renamed
//! when complete, logs are appended and synced. Snapshots, incidents, the state file, pins and
//! the restore journal all write through these.

use std::path::Path;

pub const PARTIAL_PREFIX: &str = ".partial-";

/// `base`, or `base-2`, `base-3`...: the first name under `dir` that is neither a sealed
/// entry nor a partial one.
pub fn unused_name(dir: &Path, base: &str) -> String {
    let taken =
        |id: &str| dir.join(id).exists() || dir.join(format!("{PARTIAL_PREFIX}{id}")).exists();
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|id| !taken(id))
        .expect("some suffix is free")
}

/// Replaces `path` whole or not at all: a synced `.<name>.tmp` beside it, renamed over it.
pub fn replace_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Appends `line` and a newline to the owner-only log at `path` (created when missing, its
/// mode tightened if it was wider), synced.
pub fn append_line_synced(path: &Path, line: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let mut whole = line.to_vec();
    whole.push(b'\n');
    f.write_all(&whole)?;
    f.sync_all()
}

pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = crate::owner_only::create_file(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}
