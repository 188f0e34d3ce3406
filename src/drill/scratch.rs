//! The drill's scratch database: a PostgreSQL container from the live database's image, on no
//! network, its data on a tmpfs (or a scratch dir under the data dir when the database is
//! larger than `snapshots.drill_tmpfs_mb`), memory- and CPU-limited, labelled as this daemon's
//! and removed afterwards. It copies the live container's `POSTGRES_*`/`PGDATA` environment,
//! entrypoint, command, shm size and read-only bind mounts; never a writable mount: a drill
//! never touches the live database or files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};

use crate::discover::DbAccess;
use crate::snapshot::store::Meta;

/// On every scratch container: the snapshot drilled (or what it is prepared for).
pub const LABEL_DRILL: &str = "immich-guard.drill";
/// On every scratch container: the data dir of the daemon (or CLI) that made it, so a daemon
/// removes only its own leftovers.
pub const LABEL_OWNER: &str = "immich-guard.data-dir";
/// On every scratch container: the process that made it, so a daemon at start removes those
/// of earlier runs only (only one process holds a data dir's lock at a time).
pub const LABEL_RUN: &str = "immich-guard.run";
/// Scratch dirs of databases too large for the tmpfs, under the data dir.
pub const SCRATCH_DIR: &str = "drill-scratch";
const DEFAULT_PGDATA: &str = "/var/lib/postgresql/data";
/// How long initdb and the first start may take.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// PostgreSQL settings for a database that is thrown away after: no fsync, little WAL.
const THROWAWAY_SETTINGS: &[&str] = &[
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_wal_size=64MB",
];

/// What the scratch container is made of. No `Debug`: it holds the database password.
#[derive(Clone)]
pub struct Spec {
    /// The image to run (an ID when known) and how to name it to the admin.
    pub image: String,
    pub image_name: String,
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `source:destination:ro`.
    pub binds: Vec<String>,
    pub shm_size: Option<i64>,
    pub pgdata: String,
    /// How the drill connects (inside the container, through `psql`).
    pub access: DbAccess,
}

/// Where the scratch database's files live.
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    Tmpfs { mb: u64 },
    Dir(PathBuf),
}

/// A running scratch container; [`remove`] it (also on failure).
pub struct Scratch {
    pub name: String,
    pub spec: Spec,
    pub storage: Storage,
    /// Why it is on a tmpfs or a dir, for the drill's record.
    pub storage_note: String,
}

/// The live container's environment entries a scratch copy takes.
fn copied_env(entry: &str) -> bool {
    let key = entry.split('=').next().unwrap_or("");
    (key.starts_with("POSTGRES_") && !key.ends_with("_FILE")) || key == "PGDATA"
}

fn env_value<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .find_map(|e| e.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// This process's run id (for [`LABEL_RUN`]).
fn run_id() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| random_hex(8))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spec from the live database container (running or stopped: its config is what counts),
/// else from what the snapshot recorded (its image; the environment of a stock install).
pub async fn spec(
    docker: &Docker,
    live: Option<&str>,
    access: Option<&DbAccess>,
    meta: Option<&Meta>,
) -> Result<Spec, String> {
    if let Some(name) = live
        && let Ok(inspect) = docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
    {
        let config = inspect.config.unwrap_or_default();
        let mut env: Vec<String> = config
            .env
            .unwrap_or_default()
            .into_iter()
            .filter(|e| copied_env(e))
            .collect();
        let binds = inspect
            .mounts
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.typ.as_deref() == Some("bind") && m.rw == Some(false))
            .filter_map(|m| Some(format!("{}:{}:ro", m.source?, m.destination?)))
            .collect();
        let image = inspect
            .image
            .clone()
            .or(config.image.clone())
            .unwrap_or_default();
        let image_name = config.image.unwrap_or_else(|| image.clone());
        let access = scratch_access(&mut env, access);
        return Ok(Spec {
            image,
            image_name,
            pgdata: env_value(&env, "PGDATA")
                .unwrap_or(DEFAULT_PGDATA)
                .to_string(),
            env,
            entrypoint: config.entrypoint.filter(|e| !e.is_empty()),
            cmd: config.cmd.filter(|c| !c.is_empty()),
            binds,
            shm_size: inspect.host_config.and_then(|h| h.shm_size),
            access,
        });
    }
    let Some(recorded) = meta.and_then(|m| m.db_image.as_ref()) else {
        return Err(match live {
            Some(name) => format!(
                "the database container {name} cannot be inspected and the snapshot recorded no database image"
            ),
            None => {
                "no database container is known and the snapshot recorded no database image".into()
            }
        });
    };
    // The recorded ID when the image is still here, else its reference (never pulled).
    let image = if docker.inspect_image(&recorded.id).await.is_ok() {
        recorded.id.clone()
    } else {
        recorded.reference.clone()
    };
    let mut env = Vec::new();
    if let Some(a) = access {
        env.push(format!("POSTGRES_USER={}", a.user));
        env.push(format!("POSTGRES_DB={}", a.database));
    }
    let access = scratch_access(&mut env, access);
    Ok(Spec {
        image,
        image_name: recorded.reference.clone(),
        env,
        entrypoint: None,
        cmd: None,
        binds: Vec::new(),
        shm_size: Some(128 << 20),
        pgdata: DEFAULT_PGDATA.into(),
        access,
    })
}

/// How the drill connects to the scratch database: the live user and database, and the
/// password the container is initialised with (the live one when its environment names it,
/// so the dump's `ALTER ROLE … PASSWORD` leaves it working; else a fresh one set here).
fn scratch_access(env: &mut Vec<String>, live: Option<&DbAccess>) -> DbAccess {
    let user = env_value(env, "POSTGRES_USER")
        .map(str::to_string)
        .or_else(|| live.map(|a| a.user.clone()))
        .unwrap_or_else(|| "postgres".into());
    let database = env_value(env, "POSTGRES_DB")
        .map(str::to_string)
        .or_else(|| live.map(|a| a.database.clone()))
        .unwrap_or_else(|| user.clone());
    let password = match env_value(env, "POSTGRES_PASSWORD") {
        Some(p) if !p.is_empty() => p.to_string(),
        _ => {
            let p = live
                .filter(|a| a.password_known && !a.password.is_empty())
                .map(|a| a.password.clone())
                .unwrap_or_else(|| random_hex(16));
            env.retain(|e| !e.starts_with("POSTGRES_PASSWORD="));
            env.push(format!("POSTGRES_PASSWORD={p}"));
            p
        }
    };
    DbAccess {
        user,
        password,
        password_known: true,
        database,
        host: None,
        port: 5432,
    }
}

/// Where a database of `database_bytes` is replayed: a tmpfs when the replay fits the budget
/// (the data plus indexes and a little WAL), else a scratch dir under the data dir.
pub fn choose_storage(
    database_bytes: i64,
    tmpfs_mb: u64,
    data_dir: &Path,
    name: &str,
) -> (Storage, String) {
    let db_mb = (database_bytes.max(0) as u64) / 1_000_000;
    // The replayed database is about its recorded size; WAL is capped by max_wal_size.
    let need_mb = db_mb + db_mb / 2 + 256;
    if need_mb <= tmpfs_mb {
        (
            Storage::Tmpfs {
                mb: need_mb.max(512).min(tmpfs_mb),
            },
            format!(
                "tmpfs ({} MB; the database is {db_mb} MB)",
                need_mb.max(512).min(tmpfs_mb)
            ),
        )
    } else {
        let dir = data_dir.join(SCRATCH_DIR).join(name);
        let note = format!(
            "scratch dir {} (the database is {db_mb} MB; a replay needs about {need_mb} MB, more than snapshots.drill_tmpfs_mb = {tmpfs_mb})",
            dir.display()
        );
        (Storage::Dir(dir), note)
    }
}

/// Creates and starts the scratch container and waits until its database answers.
pub async fn start(
    docker: &Docker,
    host: &str,
    spec: Spec,
    label: &str,
    data_dir: &Path,
    config: &crate::config::SnapshotConfig,
    database_bytes: i64,
) -> Result<Scratch, String> {
    let name = format!("immich-guard-drill-{}", random_hex(6));
    let (storage, storage_note) =
        choose_storage(database_bytes, config.drill_tmpfs_mb, data_dir, &name);
    let mut binds = spec.binds.clone();
    let mut tmpfs = HashMap::new();
    let mut memory_mb = config.drill_memory_mb;
    match &storage {
        // tmpfs pages are charged to the container's memory: the limit covers both.
        Storage::Tmpfs { mb } => {
            tmpfs.insert(spec.pgdata.clone(), format!("rw,size={mb}m,mode=0700"));
            memory_mb += mb;
        }
        Storage::Dir(dir) => {
            crate::owner_only::create_dir_all(dir)
                .map_err(|e| format!("creating the scratch dir {}: {e}", dir.display()))?;
            binds.push(format!("{}:{}", dir.display(), spec.pgdata));
        }
    }
    let mut labels = HashMap::new();
    labels.insert(LABEL_DRILL.to_string(), label.to_string());
    labels.insert(LABEL_OWNER.to_string(), data_dir.display().to_string());
    labels.insert(LABEL_RUN.to_string(), run_id().to_string());
    // Appended to PostgreSQL's own command line: a throwaway database needs no durability.
    let cmd = spec.cmd.clone().map(|mut cmd| {
        if cmd.first().map(String::as_str) == Some("postgres") {
            for s in THROWAWAY_SETTINGS {
                cmd.extend(["-c".to_string(), s.to_string()]);
            }
        }
        cmd
    });
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        env: Some(spec.env.clone()),
        entrypoint: spec.entrypoint.clone(),
        cmd,
        labels: Some(labels),
        network_disabled: Some(true),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            binds: Some(binds),
            tmpfs: Some(tmpfs),
            memory: Some((memory_mb as i64) << 20),
            nano_cpus: Some((config.drill_cpus * 1e9) as i64),
            shm_size: spec.shm_size,
            restart_policy: None,
            auto_remove: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::default().name(&name).build();
    docker
        .create_container(Some(options), body)
        .await
        .map_err(|e| {
            if crate::docker::is_not_found(&e) {
                format!(
                    "the database image {} is not on this host (a drill never pulls an image)",
                    spec.image_name
                )
            } else {
                format!(
                    "creating the scratch database: {}",
                    crate::docker::classify(host, e)
                )
            }
        })?;
    let scratch = Scratch {
        name,
        spec,
        storage,
        storage_note,
    };
    if let Err(e) = ready(docker, host, &scratch).await {
        remove(docker, &scratch).await;
        return Err(e);
    }
    Ok(scratch)
}

async fn ready(docker: &Docker, host: &str, scratch: &Scratch) -> Result<(), String> {
    docker
        .start_container(&scratch.name, None)
        .await
        .map_err(|e| {
            format!(
                "starting the scratch database: {}",
                crate::docker::classify(host, e)
            )
        })?;
    // TCP on the container's own loopback: the entrypoint's initialising server is socket-only.
    crate::restore::database::wait_ready(
        docker,
        host,
        &scratch.name,
        &scratch.spec.access,
        true,
        READY_TIMEOUT,
    )
    .await
    .map_err(|detail| {
        format!(
            "the scratch database from {} did not start: {detail}",
            scratch.spec.image_name
        )
    })
}

/// Removes the container (and its anonymous volumes) and its scratch dir; failures are logged.
pub async fn remove(docker: &Docker, scratch: &Scratch) {
    remove_container(docker, &scratch.name).await;
    if let Storage::Dir(dir) = &scratch.storage
        && let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a drill's scratch dir");
    }
}

async fn remove_container(docker: &Docker, name: &str) {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => {}
        Err(e) if crate::docker::is_not_found(&e) => {}
        Err(e) => {
            tracing::warn!(container = %name, error = %e, "cannot remove a drill's scratch container")
        }
    }
}

/// Removes the scratch containers (and dirs) an earlier run of this data dir left behind (a
/// kill mid-drill): never one this process started (its run label), never one another data
/// dir's daemon labelled. Call it holding the data dir's lock. Returns their names.
pub async fn remove_leftovers(docker: &Docker, data_dir: &Path) -> Vec<String> {
    let mut filters = HashMap::new();
    filters.insert(
        "label".to_string(),
        vec![
            LABEL_DRILL.to_string(),
            format!("{LABEL_OWNER}={}", data_dir.display()),
        ],
    );
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let mut removed = Vec::new();
    for c in docker
        .list_containers(Some(options))
        .await
        .unwrap_or_default()
    {
        let Some(id) = c.id else { continue };
        let ours = c
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_RUN))
            .is_some_and(|r| r == run_id());
        if ours {
            continue;
        }
        remove_container(docker, &id).await;
        let name = c
            .names
            .and_then(|n| n.first().cloned())
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or(id);
        removed.push(name);
    }
    for name in &removed {
        let _ = std::fs::remove_dir_all(data_dir.join(SCRATCH_DIR).join(name));
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_database_settings_of_the_live_environment_are_copied() {
        for (entry, copied) in [
            ("POSTGRES_USER=immich", true),
            ("POSTGRES_INITDB_ARGS=--data-checksums", true),
            ("PGDATA=/var/lib/postgresql/data", true),
            ("POSTGRES_PASSWORD_FILE=/run/secrets/db", false),
            ("DB_PASSWORD=x", false),
            ("PATH=/usr/bin", false),
        ] {
            assert_eq!(copied_env(entry), copied, "{entry}");
        }
    }

    #[test]
    fn a_database_larger_than_the_tmpfs_budget_goes_to_a_scratch_dir_and_says_why() {
        let data = Path::new("/var/lib/immich-guard");
        let (small, note) = choose_storage(236_000_000, 2048, data, "d1");
        assert_eq!(small, Storage::Tmpfs { mb: 610 });
        assert!(note.starts_with("tmpfs (610 MB"), "{note}");
        let (large, note) = choose_storage(3_000_000_000, 2048, data, "d1");
        assert_eq!(large, Storage::Dir(data.join(SCRATCH_DIR).join("d1")));
        assert!(note.contains("snapshots.drill_tmpfs_mb = 2048"), "{note}");
    }

    #[test]
    fn the_scratch_password_is_the_live_one_when_known_else_a_fresh_one() {
        let mut env = vec![
            "POSTGRES_USER=immich".to_string(),
            "POSTGRES_PASSWORD=pw".into(),
        ];
        let a = scratch_access(&mut env, None);
        assert_eq!(
            (a.user.as_str(), a.database.as_str(), a.password.as_str()),
            ("immich", "immich", "pw")
        );
        let mut env = vec!["POSTGRES_USER=immich".to_string()];
        let a = scratch_access(&mut env, None);
        assert_eq!(a.password.len(), 32);
        assert!(env.contains(&format!("POSTGRES_PASSWORD={}", a.password)));
    }
}
