//! Incidents: when a container of the stack crash-loops, keep the evidence first (an
//! incident bundle written like a snapshot: partial dir, fsync, rename), then halt it
//! (restart policy `no`, recorded, then stop), then say what happened and what to do.

use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::{InspectContainerOptions, LogsOptionsBuilder};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::diagnose::{Category, Decision, Finding};
use crate::discover::Stack;
use crate::durable::PARTIAL_PREFIX;
use crate::image_ref::ImageRef;
use crate::redact::{self, Secrets};

/// Under the data dir.
pub const DIR: &str = "incidents";
/// The incident itself, in its bundle.
pub const INCIDENT_FILE: &str = "incident.json";
/// Log lines kept per service.
pub const LOG_LINES: &str = "300";

#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error("writing the incident bundle at {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `status` and `incident` show; also `incident.json` in the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    pub at: DateTime<Utc>,
    pub service: String,
    pub container: String,
    /// Deaths within the window.
    pub deaths: u32,
    /// Of those, deaths known only from Docker's RestartCount: their events were missed
    /// while the connection to Docker was down.
    #[serde(default)]
    pub missed_deaths: u32,
    #[serde(default)]
    pub last_death_at: Option<DateTime<Utc>>,
    pub window_secs: u64,
    pub baseline: Option<String>,
    pub pending: Option<String>,
    /// The finding that explains the others (`unknown` when none did).
    #[serde(default = "unknown")]
    pub cause: Category,
    pub findings: Vec<Finding>,
    /// Other facts worth knowing (a symptom explained, exit 137 without OOMKilled, …).
    #[serde(default)]
    pub notes: Vec<String>,
    pub decision: Decision,
    /// Containers halted, with the restart policy each had.
    pub halted: Vec<Halted>,
    pub dir: PathBuf,
}

fn unknown() -> Category {
    Category::Unknown
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halted {
    pub service: String,
    pub container: String,
    pub restart_policy: String,
    #[serde(default)]
    pub halted_at: Option<DateTime<Utc>>,
}

/// Logs (timestamps kept) and inspect output of every container of the stack, secrets
/// removed.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// (service, log text)
    pub logs: Vec<(String, String)>,
    /// (service, inspect JSON)
    pub inspect: Vec<(String, String)>,
    /// How each container last ended (exit code, OOMKilled), from inspect.
    pub exits: Vec<crate::diagnose::Exit>,
    /// The stack's secret values, for what the bundle adds later (config copies).
    pub secrets: Secrets,
}

pub async fn collect(docker: &Docker, stack: &Stack) -> Evidence {
    let mut logs = Vec::new();
    let mut inspects = Vec::new();
    for service in stack.services() {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .tail(LOG_LINES)
            .build();
        let mut stream = docker.logs(&service.container_id, Some(options));
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(out) => text.push_str(&String::from_utf8_lossy(&out.into_bytes())),
                Err(e) => {
                    text.push_str(&format!("\n[immich-guard: log read failed: {e}]\n"));
                    break;
                }
            }
        }
        logs.push((service.service.clone(), text));
        let inspect = docker
            .inspect_container(&service.container_id, None::<InspectContainerOptions>)
            .await
            .map(|i| serde_json::to_value(&i).unwrap_or_default())
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
        inspects.push((service.service.clone(), inspect));
    }
    let secrets = stack_secrets(stack, inspects.iter().map(|(_, v)| v));
    let exits = inspects
        .iter()
        .map(|(service, v)| crate::diagnose::Exit {
            service: service.clone(),
            exit_code: v["State"]["ExitCode"].as_i64(),
            oom_killed: v["State"]["OOMKilled"].as_bool().unwrap_or(false),
        })
        .collect();
    Evidence {
        exits,
        logs: logs
            .into_iter()
            .map(|(service, text)| (service, secrets.scrub_lines(&text)))
            .collect(),
        inspect: inspects
            .into_iter()
            .map(|(service, mut v)| {
                redact::json(&mut v, &secrets);
                (
                    service,
                    serde_json::to_string_pretty(&v).unwrap_or_default(),
                )
            })
            .collect(),
        secrets,
    }
}

/// The facts the diagnosis reads (docs/incident-runbook.md §3): the logs and exits of every
/// service, `service` looping; the database's migrations and counts now (`now`, none when it
/// could not be asked) against the pre-update snapshot `before`; whether server and machine
/// learning run images of the same release.
pub fn diagnosis_evidence(
    evidence: &Evidence,
    stack: &Stack,
    service: &str,
    now: Option<&crate::snapshot::db::DbFacts>,
    before: Option<&crate::snapshot::store::Meta>,
) -> crate::diagnose::Evidence {
    use crate::diagnose::{Counts, ServiceLog, SnapshotRef};
    let new_migrations: Option<Vec<String>> = match (now, before) {
        (Some(now), Some(before)) => Some(
            now.migrations
                .iter()
                .filter(|m| !before.db.migrations.contains(m))
                .cloned()
                .collect(),
        ),
        _ => None,
    };
    let counts = now.map(|n| Counts {
        assets_now: n.assets,
        users_now: n.users,
        assets_then: before.and_then(|b| b.db.assets),
        users_then: before.and_then(|b| b.db.users),
    });
    let release = |s: &Option<crate::discover::Service>| {
        s.as_ref().and_then(|s| ImageRef::parse(&s.image).release())
    };
    let images_same_release = match (release(&stack.server), release(&stack.machine_learning)) {
        (Some(a), Some(b)) => Some(a == b),
        _ => None,
    };
    crate::diagnose::Evidence {
        logs: evidence
            .logs
            .iter()
            .map(|(service, text)| ServiceLog {
                service: service.clone(),
                text: text.clone(),
            })
            .collect(),
        exits: evidence.exits.clone(),
        looping: Some(service.to_string()),
        migrations_applied: new_migrations.as_ref().map(|m| !m.is_empty()),
        new_migrations: new_migrations.unwrap_or_default(),
        counts,
        // A cluster without Immich's schema where the snapshot had one: counts cannot tell.
        database_empty: match (now, before) {
            (Some(now), Some(before))
                if now.migrations.is_empty() && !before.db.migrations.is_empty() =>
            {
                Some(true)
            }
            _ => None,
        },
        images_same_release,
        snapshot: before.map(|m| SnapshotRef {
            id: m.id.clone(),
            version: m.version.clone(),
        }),
    }
}

/// Every secret value known for the stack: the database password, and the values of secret
/// keys in `.env`, the compose files and the containers' environments.
pub fn stack_secrets<'a>(
    stack: &Stack,
    inspects: impl IntoIterator<Item = &'a serde_json::Value>,
) -> Secrets {
    let mut secrets = Secrets::default();
    if let Some(db) = stack.db.as_ref().filter(|db| db.password_known) {
        secrets.add(&db.password);
    }
    for path in &stack.compose_files {
        secrets.add_compose(&std::fs::read_to_string(path).unwrap_or_default());
    }
    if let Some(env) = &stack.env_file {
        secrets.add_env(&std::fs::read_to_string(env).unwrap_or_default());
    }
    for inspect in inspects {
        redact::add_json(&mut secrets, inspect);
    }
    secrets
}

/// `<UTC time>-<service>`; unique within the dir.
pub fn incident_id(at: DateTime<Utc>, service: &str, dir: &Path) -> String {
    crate::durable::unused_name(dir, &format!("{}-{service}", at.format("%Y%m%dT%H%M%SZ")))
}

/// Writes the bundle under `<dir>/.partial-<id>` and renames it into place.
pub fn write_bundle(
    dir: &Path,
    incident: &Incident,
    evidence: &Evidence,
    stack: &Stack,
    guard_view: &serde_json::Value,
) -> Result<PathBuf, IncidentError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IncidentError::Write { path, source }
    };
    crate::owner_only::create_dir_all(dir).map_err(err(dir))?;
    let partial = dir.join(format!("{PARTIAL_PREFIX}{}", incident.id));
    let final_dir = dir.join(&incident.id);
    crate::owner_only::create_dir_all(partial.join("logs")).map_err(err(&partial))?;
    crate::owner_only::create_dir_all(partial.join("inspect")).map_err(err(&partial))?;
    crate::owner_only::create_dir_all(partial.join("config")).map_err(err(&partial))?;
    let write = |path: PathBuf, bytes: &[u8]| {
        crate::durable::write_synced(&path, bytes).map_err(err(&path))
    };
    for (service, log) in &evidence.logs {
        write(partial.join(format!("logs/{service}.log")), log.as_bytes())?;
    }
    for (service, json) in &evidence.inspect {
        write(
            partial.join(format!("inspect/{service}.json")),
            json.as_bytes(),
        )?;
    }
    // Copies for sharing: secret values out (a snapshot keeps the real ones for a restore).
    let copies = stack
        .compose_files
        .iter()
        .map(|p| (p, redact::compose_text as fn(&str) -> String))
        .chain(
            stack
                .env_file
                .iter()
                .map(|p| (p, redact::env_text as fn(&str) -> String)),
        );
    for (path, strip) in copies {
        if let (Some(name), Ok(text)) = (path.file_name(), std::fs::read_to_string(path)) {
            let text = evidence.secrets.scrub(&strip(&text));
            write(partial.join("config").join(name), text.as_bytes())?;
        }
    }
    write(
        partial.join(INCIDENT_FILE),
        &incident_json(incident, &evidence.secrets),
    )?;
    let mut guard_view = guard_view.clone();
    redact::json(&mut guard_view, &evidence.secrets);
    let guard_json = serde_json::to_vec_pretty(&guard_view).expect("a JSON value serializes");
    write(partial.join("guard.json"), &guard_json)?;
    for sub in ["logs", "inspect", "config", ""] {
        let d = partial.join(sub);
        crate::durable::sync_dir(&d).map_err(err(&d))?;
    }
    std::fs::rename(&partial, &final_dir).map_err(err(&final_dir))?;
    crate::durable::sync_dir(dir).map_err(err(dir))?;
    Ok(final_dir)
}

/// `incident.json` as the bundle holds it: redacted like the rest, since its findings and
/// notes quote logs and error messages.
pub fn incident_json(incident: &Incident, secrets: &Secrets) -> Vec<u8> {
    let mut value = serde_json::to_value(incident).expect("incident serializes");
    redact::json(&mut value, secrets);
    serde_json::to_vec_pretty(&value).expect("a JSON value serializes")
}

/// Sealed incidents, newest last.
pub fn list(dir: &Path) -> Vec<Incident> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut all: Vec<Incident> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| std::fs::read(e.path().join(INCIDENT_FILE)).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    all
}

/// What `incident [ID]` shows: every incident, or only the one named (an error when there is
/// none by that name).
pub fn find(dir: &Path, id: Option<&str>) -> Result<Vec<Incident>, String> {
    // "No incidents" must mean none, not "not allowed to look".
    if let Err(e) = std::fs::read_dir(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(format!(
            "cannot read the incidents in {}: {e}",
            dir.display()
        ));
    }
    let mut incidents = list(dir);
    if let Some(id) = id {
        incidents.retain(|i| i.id == id);
        if incidents.is_empty() {
            return Err(format!("no incident {id} in {}", dir.display()));
        }
    }
    Ok(incidents)
}

/// Sets the restart policy to `no` (the old one returned) and stops the container.
pub async fn halt(docker: &Docker, container: &str) -> Result<String, bollard::errors::Error> {
    let inspect = docker
        .inspect_container(container, None::<InspectContainerOptions>)
        .await?;
    let policy = inspect
        .host_config
        .and_then(|h| h.restart_policy)
        .and_then(|p| p.name)
        .map(|n| n.to_string())
        .unwrap_or_else(|| "no".into());
    set_restart_policy(docker, container, "no").await?;
    docker
        .stop_container(
            container,
            None::<bollard::query_parameters::StopContainerOptions>,
        )
        .await?;
    Ok(policy)
}

/// Puts the recorded policy back and starts the container.
pub async fn unhalt(
    docker: &Docker,
    container: &str,
    policy: &str,
) -> Result<(), bollard::errors::Error> {
    set_restart_policy(docker, container, policy).await?;
    match docker
        .start_container(
            container,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
    {
        // Already started by hand (`docker compose up -d` starts stopped containers): the
        // policy was all that was missing.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        other => other,
    }
}

async fn set_restart_policy(
    docker: &Docker,
    container: &str,
    policy: &str,
) -> Result<(), bollard::errors::Error> {
    use bollard::models::{RestartPolicy, RestartPolicyNameEnum};
    let name = match policy {
        "always" => RestartPolicyNameEnum::ALWAYS,
        "unless-stopped" => RestartPolicyNameEnum::UNLESS_STOPPED,
        "on-failure" => RestartPolicyNameEnum::ON_FAILURE,
        _ => RestartPolicyNameEnum::NO,
    };
    docker
        .update_container(
            container,
            bollard::models::ContainerUpdateBody {
                restart_policy: Some(RestartPolicy {
                    name: Some(name),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            },
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_in_their_dir() {
        let dir = tempfile::tempdir().unwrap();
        let at = "2026-11-25T02:23:01Z".parse().unwrap();
        let id = incident_id(at, "immich-server", dir.path());
        assert_eq!(id, "20261125T022301Z-immich-server");
        std::fs::create_dir(dir.path().join(&id)).unwrap();
        assert_eq!(
            incident_id(at, "immich-server", dir.path()),
            "20261125T022301Z-immich-server-2"
        );
    }

    #[test]
    fn find_names_a_missing_incident_and_an_unreadable_dir() {
        let dir = tempfile::tempdir().unwrap();
        // A data dir without incidents yet has none.
        assert_eq!(find(&dir.path().join("incidents"), None), Ok(vec![]));
        let e = find(dir.path(), Some("20261125T022301Z-immich-server")).unwrap_err();
        assert!(
            e.contains("no incident 20261125T022301Z-immich-server in"),
            "{e}"
        );
        // Not "no incidents" when the dir cannot be read.
        let file = dir.path().join("incidents-file");
        std::fs::write(&file, "").unwrap();
        let e = find(&file, None).unwrap_err();
        assert!(e.contains("cannot read the incidents in"), "{e}");
    }
}
