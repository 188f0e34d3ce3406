//! The writers stopped for one point in time (docs/operations.md "One point in time"): the
//! stack's server and machine-learning containers are paused (`docker pause`: the cgroup
//! freezer; nothing restarts, open connections wait) while the database's point is exported
//! and the storage tree is built, then unpaused. It pauses only what runs, unpauses only what
//! it paused, and never touches a server that is already paused (a freeze or hold of
//! protection owns it). What it is about to pause is written down first ([`RECORD_FILE`] in the
//! snapshot dir, owner-only, replaced durably), so a daemon killed meanwhile resumes it when it
//! starts again ([`resume_leftover`]); every other way out of a snapshot resumes through the
//! guard's `Drop`.
//!
//! Why not Immich's maintenance mode (v2.3.0 on, `immich-admin enable-maintenance-mode`):
//! entering and leaving it restarts every worker of the server (a whole boot each way, far past
//! the 5 s a pause may last), the command returns before the workers have stopped, and it
//! writes `isMaintenanceMode: true` into `system_metadata`, the very database the snapshot
//! dumps: a restore of such a snapshot would boot into maintenance mode.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use bollard::Docker;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::discover::{ContainerState, Service, Stack};
use crate::docker::{classify, is_not_found};

/// What is paused right now, written before the pause and removed after the resume; in the
/// snapshot dir beside the partial it belongs to (never listed: its name starts with a dot).
pub const RECORD_FILE: &str = ".writers-paused.json";

/// How a snapshot's writers were stopped, in its meta.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PauseMethod {
    /// `docker pause` of the server and machine-learning containers.
    DockerPause,
    /// Nothing was paused; `notes` say why (not running, already paused by a freeze).
    None,
}

/// The pause of one snapshot: what was paused and for how long, or why nothing was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub method: PauseMethod,
    /// Container names paused (and resumed) by the snapshot.
    pub containers: Vec<String>,
    /// From the first pause to the last resume.
    pub duration_ms: u64,
    /// A writer left alone and why: `immich_server: not running`, `… already paused`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Pause {
    /// The `list` column: `1.2s`, or `none`.
    pub fn short(&self) -> String {
        match self.method {
            PauseMethod::DockerPause => format!("{:.1}s", self.duration_ms as f64 / 1000.0),
            PauseMethod::None => "none".to_string(),
        }
    }

    /// One line for the progress and the logs.
    pub fn describe(&self) -> String {
        let notes = if self.notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.notes.join("; "))
        };
        match self.method {
            PauseMethod::DockerPause => format!(
                "writers paused {:.1} s: {}{notes}",
                self.duration_ms as f64 / 1000.0,
                self.containers.join(", ")
            ),
            PauseMethod::None => format!("nothing paused{notes}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("writing {path} (what is about to be paused): {source}")]
    Record {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pausing {container}: {detail}")]
    Docker { container: String, detail: String },
}

/// One container paused by a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub id: String,
    pub name: String,
    pub service: String,
}

/// The record on disk: who paused what, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    at: DateTime<Utc>,
    pid: u32,
    snapshot: String,
    containers: Vec<Target>,
}

/// The container IDs a snapshot of this process holds paused: protection reads them as
/// running (`as_running`), so it never takes this pause for a foreign one.
static PAUSED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn registry() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    PAUSED.lock().unwrap_or_else(|e| e.into_inner())
}

/// `stack` as it was before a snapshot's pause: a container this process paused for a
/// snapshot is shown running. Protection judges that (a paused server it did not pause is a
/// foreign pause it must report and never unpause).
pub fn as_running(mut stack: Stack) -> Stack {
    let paused = registry();
    if paused.is_empty() {
        return stack;
    }
    for service in [&mut stack.server, &mut stack.machine_learning]
        .into_iter()
        .flatten()
    {
        if service.state == ContainerState::Paused && paused.contains(&service.container_id) {
            service.state = ContainerState::Running;
        }
    }
    stack
}

/// The writers of `stack` that a snapshot pauses: the server and machine learning.
fn writers(stack: &Stack) -> impl Iterator<Item = &Service> {
    [&stack.server, &stack.machine_learning]
        .into_iter()
        .flatten()
}

/// Paused writers; resumed by [`Paused::resume`], or by `Drop` on any other way out (an
/// error, a cancelled task), or at the next start from the record if the process dies.
pub struct Paused {
    docker: Docker,
    host: String,
    record: PathBuf,
    targets: Vec<Target>,
    notes: Vec<String>,
    started: Instant,
    resumed: bool,
}

/// Pauses the running writers of `stack` for the snapshot `snapshot`, after writing down
/// what it pauses in `dir`/[`RECORD_FILE`]. A writer that is not running or already paused is
/// left alone and noted. An error resumes what was paused already.
pub async fn pause_writers(
    docker: &Docker,
    host: &str,
    stack: &Stack,
    dir: &Path,
    snapshot: &str,
) -> Result<Paused, PauseError> {
    let mut notes = Vec::new();
    let mut targets = Vec::new();
    for service in writers(stack) {
        // Fresh: discovery's view may be seconds old.
        let state = match docker
            .inspect_container(
                &service.container_id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(inspect) => inspect.state.unwrap_or_default(),
            Err(e) if is_not_found(&e) => {
                notes.push(format!("{}: gone", service.container_name));
                continue;
            }
            Err(e) => {
                return Err(PauseError::Docker {
                    container: service.container_name.clone(),
                    detail: classify(host, e).to_string(),
                });
            }
        };
        if state.paused == Some(true) {
            notes.push(format!(
                "{}: already paused (a freeze or someone else owns it)",
                service.container_name
            ));
        } else if state.running != Some(true) {
            notes.push(format!("{}: not running", service.container_name));
        } else {
            targets.push(Target {
                id: service.container_id.clone(),
                name: service.container_name.clone(),
                service: service.service.clone(),
            });
        }
    }
    let record = dir.join(RECORD_FILE);
    let mut paused = Paused {
        docker: docker.clone(),
        host: host.to_string(),
        record,
        targets: Vec::new(),
        notes,
        started: Instant::now(),
        resumed: false,
    };
    if targets.is_empty() {
        return Ok(paused);
    }
    write_record(&paused.record, snapshot, &targets)?;
    registry().extend(targets.iter().map(|t| t.id.clone()));
    paused.started = Instant::now();
    let results = futures_util::future::join_all(
        targets
            .iter()
            .map(|t| async move { (t, docker.pause_container(&t.id).await) }),
    )
    .await;
    let mut failure = None;
    for (target, result) in results {
        match result {
            Ok(()) => paused.targets.push(target.clone()),
            // Stopped or paused by someone between the inspect and the pause: not ours.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                message,
            }) => {
                registry().remove(&target.id);
                paused
                    .notes
                    .push(format!("{}: {}", target.name, message.trim()));
            }
            Err(e) => {
                registry().remove(&target.id);
                failure.get_or_insert(PauseError::Docker {
                    container: target.name.clone(),
                    detail: classify(host, e).to_string(),
                });
            }
        }
    }
    if let Some(e) = failure {
        // `paused` drops here: what was paused is resumed.
        return Err(e);
    }
    if paused.targets.len() < targets.len() {
        write_record(&paused.record, snapshot, &paused.targets)?;
    }
    Ok(paused)
}

fn write_record(path: &Path, snapshot: &str, targets: &[Target]) -> Result<(), PauseError> {
    let record = Record {
        at: Utc::now(),
        pid: std::process::id(),
        snapshot: snapshot.to_string(),
        containers: targets.to_vec(),
    };
    let bytes = serde_json::to_vec_pretty(&record).expect("the record serializes");
    crate::durable::replace_synced(path, &bytes)
        .and_then(|()| crate::durable::sync_dir(path.parent().unwrap_or(Path::new("."))))
        .map_err(|source| PauseError::Record {
            path: path.to_path_buf(),
            source,
        })
}

/// Unpauses `targets`, each tried a few times (a busy engine); what could not be resumed,
/// with why.
async fn unpause_all(docker: &Docker, host: &str, targets: &[Target]) -> Vec<(Target, String)> {
    let mut left = Vec::new();
    for target in targets {
        let mut last = None;
        for attempt in 0..3u64 {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            }
            match docker.unpause_container(&target.id).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                // Gone, or not paused any more (unpaused by hand): nothing left to resume.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 409,
                    ..
                }) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(classify(host, e).to_string()),
            }
        }
        match last {
            Some(why) => left.push((target.clone(), why)),
            None => {
                registry().remove(&target.id);
            }
        }
    }
    left
}

impl Paused {
    /// The containers paused, by name.
    pub fn containers(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.name.clone()).collect()
    }

    /// Unpauses what was paused and removes the record. A container that will not unpause is
    /// logged and stays in the record (the next start resumes it); the pause is what it was.
    pub async fn resume(mut self) -> Pause {
        self.resumed = true;
        let left = unpause_all(&self.docker, &self.host, &self.targets).await;
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let mut notes = std::mem::take(&mut self.notes);
        finish_record(&self.record, &left);
        for (target, why) in &left {
            notes.push(format!(
                "{}: could not be unpaused ({why}); resumed at the daemon's next start",
                target.name
            ));
        }
        Pause {
            method: if self.targets.is_empty() {
                PauseMethod::None
            } else {
                PauseMethod::DockerPause
            },
            containers: self.containers(),
            duration_ms: if self.targets.is_empty() {
                0
            } else {
                duration_ms
            },
            notes,
        }
    }
}

/// Removes the record once nothing it names is left paused; else logs what is left.
fn finish_record(record: &Path, left: &[(Target, String)]) {
    if left.is_empty() {
        if let Err(e) = std::fs::remove_file(record)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %record.display(), error = %e, "cannot remove the pause record; the next start finds nothing paused in it");
        }
        return;
    }
    for (target, why) in left {
        tracing::error!(container = %target.name, error = %why, file = %record.display(), "cannot unpause a writer paused for a snapshot; the daemon's next start resumes it");
    }
}

impl Drop for Paused {
    /// Any way out but `resume` (an error, a cancelled snapshot): resume in a task of the
    /// runtime. Without one (the runtime is shutting down) the record stays and the next
    /// start resumes.
    fn drop(&mut self) {
        if self.resumed || self.targets.is_empty() {
            return;
        }
        let (docker, host, record) = (self.docker.clone(), self.host.clone(), self.record.clone());
        let targets = std::mem::take(&mut self.targets);
        let names: Vec<_> = targets.iter().map(|t| t.name.clone()).collect();
        tracing::warn!(containers = ?names, "snapshot ended before its resume: resuming the writers it paused");
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let left = unpause_all(&docker, &host, &targets).await;
                    finish_record(&record, &left);
                });
            }
            Err(_) => {
                tracing::error!(containers = ?names, file = %record.display(), "no runtime to resume the writers; the daemon's next start resumes them");
            }
        }
    }
}

/// At the daemon's start, before protection decides anything: resumes what a snapshot of a
/// daemon killed meanwhile had paused ([`RECORD_FILE`] in `dir`), except a container named in
/// `protected` (frozen, held or reported paused in `protection.json`: protection owns it),
/// then removes the record. Returns the names resumed. A container that is gone or no longer
/// paused needs nothing.
pub async fn resume_leftover(
    docker: &Docker,
    host: &str,
    dir: &Path,
    protected: &BTreeSet<String>,
) -> Vec<String> {
    let path = dir.join(RECORD_FILE);
    let record: Record = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(record) => record,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "the pause record does not parse; nothing resumed from it (check `docker ps` for paused Immich containers)");
                return Vec::new();
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot read the pause record; nothing resumed from it");
            return Vec::new();
        }
    };
    let (kept, mine): (Vec<Target>, Vec<Target>) = record
        .containers
        .into_iter()
        .partition(|t| protected.contains(&t.id));
    for target in &kept {
        tracing::warn!(container = %target.name, "paused by an interrupted snapshot, but protection holds it: left to protection");
    }
    // Only what is still paused: a container recreated meanwhile has another ID.
    let left = unpause_all(docker, host, &mine).await;
    finish_record(&path, &left);
    let resumed: Vec<String> = mine
        .iter()
        .filter(|t| !left.iter().any(|(l, _)| l.id == t.id))
        .map(|t| t.name.clone())
        .collect();
    if !resumed.is_empty() {
        tracing::warn!(snapshot = %record.snapshot, paused_at = %record.at, containers = ?resumed, "resumed the writers an interrupted snapshot had paused");
    }
    resumed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(id: &str, state: ContainerState) -> Service {
        Service {
            service: "immich-server".into(),
            container_id: id.into(),
            container_name: format!("{id}_name"),
            image: "ghcr.io/immich-app/immich-server:v2.0.0".into(),
            image_id: "sha256:1".into(),
            state,
            restart_count: 0,
            restart_policy: "always".into(),
        }
    }

    #[test]
    fn protection_sees_only_the_snapshots_own_pause_as_running() {
        let mut stack: Stack = serde_json::from_value(serde_json::json!({
            "project": "immich", "compose_dir": null, "compose_files": [], "env_file": null,
            "env_version": null, "server": null, "machine_learning": null, "redis": null,
            "database": null, "upload_location": null, "upload_mount": null,
            "db_data_location": null, "db": null, "version": null, "notes": []
        }))
        .unwrap();
        stack.server = Some(service("c-snapshot", ContainerState::Paused));
        stack.machine_learning = Some(service("c-foreign", ContainerState::Paused));
        registry().insert("c-snapshot".into());
        let seen = as_running(stack);
        registry().remove("c-snapshot");
        assert_eq!(seen.server.unwrap().state, ContainerState::Running);
        // A pause nobody here made stays what it is: protection must report it.
        assert_eq!(seen.machine_learning.unwrap().state, ContainerState::Paused);
    }

    #[test]
    fn the_pause_is_shown_short_and_in_words() {
        let pause = Pause {
            method: PauseMethod::DockerPause,
            containers: vec!["immich_server".into(), "immich_machine_learning".into()],
            duration_ms: 1234,
            notes: Vec::new(),
        };
        assert_eq!(pause.short(), "1.2s");
        assert_eq!(
            pause.describe(),
            "writers paused 1.2 s: immich_server, immich_machine_learning"
        );
        let none = Pause {
            method: PauseMethod::None,
            containers: Vec::new(),
            duration_ms: 0,
            notes: vec!["immich_server: not running".into()],
        };
        assert_eq!(none.short(), "none");
        assert_eq!(
            none.describe(),
            "nothing paused (immich_server: not running)"
        );
    }

    #[tokio::test]
    async fn a_missing_record_resumes_nothing_and_a_bad_one_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        // No Docker call is made when there is nothing to resume.
        let docker =
            Docker::connect_with_http("http://127.0.0.1:9", 1, bollard::API_DEFAULT_VERSION)
                .unwrap();
        let none = BTreeSet::new();
        assert!(
            resume_leftover(&docker, "x", dir.path(), &none)
                .await
                .is_empty()
        );
        std::fs::write(dir.path().join(RECORD_FILE), b"{not json").unwrap();
        assert!(
            resume_leftover(&docker, "x", dir.path(), &none)
                .await
                .is_empty()
        );
        assert!(
            dir.path().join(RECORD_FILE).exists(),
            "kept for the admin to read"
        );
    }
}
