//! `protection.json` (docs/architecture.md "On disk"): every compose project's protection
//! under its name, written whole (temporary file, fsync, rename) after each decision.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::state::Protection;

pub const STATE_FILE: &str = "protection.json";

/// `protection.json`: each compose project's state under its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    pub projects: BTreeMap<String, Protection>,
    /// From a file of an older version, which recorded no project, when it names containers
    /// (halted, frozen, held): kept until the stack with those containers is found, never
    /// shown as another stack's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unattributed: Option<Protection>,
}

const STATE_FORMAT: u32 = 2;

impl Default for StateFile {
    fn default() -> Self {
        StateFile {
            format: STATE_FORMAT,
            projects: BTreeMap::new(),
            unattributed: None,
        }
    }
}

/// Reads `protection.json`. A file of an older version (one project's state, unnamed) is the
/// state of the configured `stack.project`, or, without one, kept unattributed when it names
/// containers, else dropped (a baseline is learned again from the running server).
pub fn load(path: &Path, configured: Option<&str>) -> Result<StateFile, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateFile::default()),
        Err(e) => return Err(e.to_string()),
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if value.get("projects").is_some() {
        let mut file: StateFile = serde_json::from_value(value).map_err(|e| e.to_string())?;
        for (name, state) in &mut file.projects {
            state.project = Some(name.clone());
        }
        return Ok(file);
    }
    let old: Protection = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let mut file = StateFile::default();
    let baseline = old.baseline.as_ref().map_or("none", |b| b.version.as_str());
    match configured {
        Some(project) => {
            tracing::info!(file = %path.display(), project, baseline, "protection state of an older version: it is the configured stack's");
            file.projects.insert(
                project.to_string(),
                Protection {
                    project: Some(project.to_string()),
                    ..old
                },
            );
        }
        None if old.containers().next().is_some() => {
            tracing::info!(file = %path.display(), baseline, "protection state of an older version names no compose project: kept until the stack whose containers it names is found");
            file.unattributed = Some(old);
        }
        None => {
            tracing::warn!(file = %path.display(), baseline, "protection state of an older version names no compose project and no container: dropped; the baseline is learned again from the running server");
        }
    }
    Ok(file)
}

pub fn save(path: &Path, p: &StateFile) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        crate::private::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(p).map_err(std::io::Error::other)?;
    crate::durable::replace_synced(path, &bytes)
}
