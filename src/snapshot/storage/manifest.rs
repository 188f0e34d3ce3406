//! The manifest: one JSON object per entry of the upload tree (path, size, mtime, inode),
//! zstd-compressed, with its SHA-256 so a restore can refuse a changed one.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub inode: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
}

/// A path left out because it could not be read (`snapshots.skip_unreadable`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub error: String,
}

/// One JSON object per line, zstd-compressed, fsynced. Returns the bytes on disk and their
/// SHA-256 (hex).
pub(super) fn write_manifest(
    path: &Path,
    entries: &[ManifestEntry],
) -> std::io::Result<(u64, String)> {
    let file = crate::owner_only::create_file(path)?;
    let hashing =
        crate::snapshot::db::Hashing::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let mut out = zstd::stream::Encoder::new(hashing, 3)?;
    for e in entries {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    let mut hashing = out.finish()?;
    hashing.flush()?;
    let (writer, bytes, sha256) = hashing.finish();
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((bytes, sha256))
}

/// Reads a manifest back.
pub fn read_manifest(path: &Path) -> std::io::Result<Vec<ManifestEntry>> {
    let file = std::fs::File::open(path)?;
    let text = std::io::read_to_string(zstd::stream::Decoder::new(file)?)?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
        .collect()
}
