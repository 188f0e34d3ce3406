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
        crate::owner_only::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(p).map_err(std::io::Error::other)?;
    crate::durable::replace_synced(path, &bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::protect::state::{Baseline, ProtectState};

    pub(crate) fn with_baseline(project: &str, version: &str) -> Protection {
        Protection {
            baseline: Some(Baseline {
                version: version.into(),
                image_id: format!("sha256:{version}"),
            }),
            ..Protection::fresh(project)
        }
    }

    #[test]
    fn each_project_keeps_its_state_through_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/protection.json");
        assert_eq!(load(&path, None).unwrap(), StateFile::default());
        let mut a = with_baseline("a", "v1.119.0");
        a.state = ProtectState::Snapshotting;
        let b = with_baseline("b", "v1.120.0");
        let file = StateFile {
            projects: [("a".to_string(), a.clone()), ("b".to_string(), b.clone())].into(),
            ..StateFile::default()
        };
        save(&path, &file).unwrap();
        let back = load(&path, Some("b")).unwrap();
        assert_eq!(back, file);
        assert_eq!(back.projects["a"].state, ProtectState::Snapshotting);
        assert_eq!(back.projects["b"].project.as_deref(), Some("b"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"format\": 2"), "{text}");
        // The key names the project, whatever a hand-edited field says.
        std::fs::write(
            &path,
            text.replace("\"project\": \"a\"", "\"project\": \"b\""),
        )
        .unwrap();
        assert_eq!(
            load(&path, None).unwrap().projects["a"].project.as_deref(),
            Some("a")
        );
    }

    /// A v1.118.0 state that halted `container`.
    pub(crate) fn halted_in(container: &str) -> Protection {
        let mut p = with_baseline("x", "v1.118.0");
        p.halted.push(crate::incident::Halted {
            service: "immich-server".into(),
            container: container.into(),
            restart_policy: "always".into(),
            halted_at: None,
        });
        p
    }

    /// A file of the previous format: one unnamed state.
    pub(crate) fn old_file(dir: &Path, p: &Protection) -> PathBuf {
        let mut value = serde_json::to_value(p).unwrap();
        value.as_object_mut().unwrap().remove("project");
        let path = dir.join("protection.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
        path
    }

    #[test]
    fn an_old_file_is_the_configured_projects_state() {
        let dir = tempfile::tempdir().unwrap();
        let old = with_baseline("x", "v1.118.0");
        let path = old_file(dir.path(), &old);
        let file = load(&path, Some("immich")).unwrap();
        assert_eq!(file.projects.len(), 1);
        let state = &file.projects["immich"];
        assert_eq!(state.project.as_deref(), Some("immich"));
        assert_eq!(state.baseline, old.baseline);
        assert_eq!(file.unattributed, None);
    }

    #[test]
    fn an_old_file_without_a_project_is_kept_aside_or_dropped_never_adopted_blindly() {
        let dir = tempfile::tempdir().unwrap();
        // Only a baseline: nothing ties it to a stack.
        let path = old_file(dir.path(), &with_baseline("x", "v1.118.0"));
        assert_eq!(load(&path, None).unwrap(), StateFile::default());
        // A halted container: kept aside until the stack holding it is found.
        let path = old_file(dir.path(), &halted_in("c0ffee"));
        let file = load(&path, None).unwrap();
        assert!(file.projects.is_empty());
        let kept = file.unattributed.clone().unwrap();
        assert_eq!(kept.containers().collect::<Vec<_>>(), ["c0ffee"]);
        // And it survives the next save.
        save(&path, &file).unwrap();
        assert_eq!(load(&path, None).unwrap(), file);
    }
}
