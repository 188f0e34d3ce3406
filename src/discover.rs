//! Finds the Immich stack from the Docker API alone: compose labels, images, mounts and env.
//! Read-only: it inspects containers and images and reads `.env`; it never changes anything.
//! `collect` talks to Docker, `assemble` is pure so every rule is a unit test.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::docker::{DockerError, classify, is_not_found};
use crate::image_ref::ImageRef;

const LABEL_PROJECT: &str = "com.docker.compose.project";
const LABEL_SERVICE: &str = "com.docker.compose.service";
const LABEL_WORKING_DIR: &str = "com.docker.compose.project.working_dir";
const LABEL_CONFIG_FILES: &str = "com.docker.compose.project.config_files";
const LABEL_ENV_FILE: &str = "com.docker.compose.project.environment_file";
const LABEL_OCI_VERSION: &str = "org.opencontainers.image.version";

/// Where the server keeps uploads inside its container: `/data` since ~v1.137, before that
/// `/usr/src/app/upload`.
const UPLOAD_MOUNTS: [&str; 2] = ["/data", "/usr/src/app/upload"];
const DEFAULT_PGDATA: &str = "/var/lib/postgresql/data";

#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoverError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("no Immich stack found: no compose project has a container running an immich-server image{}", seen(.compose_projects))]
    NoStack { compose_projects: Vec<String> },
    #[error(
        "found {} Immich stacks ({}): set stack.project in the config to the one to protect",
        .projects.len(),
        .projects.join(", ")
    )]
    Ambiguous { projects: Vec<String> },
    #[error("stack.project = {project:?} from the config is not running here{}", seen(.found))]
    ProjectNotFound { project: String, found: Vec<String> },
    #[error("stack.{key} = {name:?} from the config: no such container")]
    ContainerNotFound { key: &'static str, name: String },
}

fn seen(projects: &[String]) -> String {
    if projects.is_empty() {
        " (no compose projects at all on this Docker host)".to_string()
    } else {
        format!(" (compose projects seen: {})", projects.join(", "))
    }
}

/// The Immich stack as discovered. `notes` says what could not be found and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    pub project: String,
    pub compose_dir: Option<PathBuf>,
    pub compose_files: Vec<PathBuf>,
    pub env_file: Option<PathBuf>,
    /// `IMMICH_VERSION` in `.env`: the version compose will run on the next `up`.
    pub env_version: Option<String>,
    pub server: Option<Service>,
    pub machine_learning: Option<Service>,
    pub redis: Option<Service>,
    pub database: Option<Service>,
    /// Host path of the upload location and where the server sees it.
    pub upload_location: Option<PathBuf>,
    pub upload_mount: Option<String>,
    pub db_data_location: Option<PathBuf>,
    pub db: Option<DbAccess>,
    /// The version the server container runs.
    pub version: Option<ImmichVersion>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// Compose service name (`immich-server`, `database`, ...).
    pub service: String,
    pub container_id: String,
    pub container_name: String,
    /// The image as the container was created with it (`ghcr.io/...:v1.119.0`).
    pub image: String,
    pub image_id: String,
    pub state: ContainerState,
    pub restart_count: i64,
    pub restart_policy: String,
}

/// A container's state as Docker reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
    Stopping,
    #[default]
    #[serde(other)]
    Unknown,
}

impl From<bollard::models::ContainerStateStatusEnum> for ContainerState {
    fn from(s: bollard::models::ContainerStateStatusEnum) -> Self {
        use bollard::models::ContainerStateStatusEnum as S;
        match s {
            S::CREATED => ContainerState::Created,
            S::RUNNING => ContainerState::Running,
            S::PAUSED => ContainerState::Paused,
            S::RESTARTING => ContainerState::Restarting,
            S::REMOVING => ContainerState::Removing,
            S::EXITED => ContainerState::Exited,
            S::DEAD => ContainerState::Dead,
            S::STOPPING => ContainerState::Stopping,
            S::EMPTY => ContainerState::Unknown,
        }
    }
}

impl std::fmt::Display for ContainerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("unknown"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbAccess {
    pub user: String,
    /// Never serialized: status output is readable by a non-root group.
    #[serde(skip)]
    pub password: String,
    pub password_known: bool,
    pub database: String,
    pub host: Option<String>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImmichVersion {
    /// Tag the container was created with (`v1.119.0`, `release`); absent when the container
    /// was created from a bare image ID or the tag has since moved.
    pub tag: Option<String>,
    pub image_id: String,
    pub repo_digests: Vec<String>,
    pub repo_tags: Vec<String>,
    /// `org.opencontainers.image.version`, which real Immich images carry.
    pub label: Option<String>,
}

impl Stack {
    /// The containers of the stack that were found: server, machine learning, redis, database.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        [
            &self.server,
            &self.machine_learning,
            &self.redis,
            &self.database,
        ]
        .into_iter()
        .flatten()
    }
}

impl ImmichVersion {
    /// The most specific human name: the label, then a version-looking tag, then any tag.
    pub fn name(&self) -> String {
        if let Some(l) = &self.label {
            return l.clone();
        }
        let tags = self.tag.iter().cloned().chain(
            self.repo_tags
                .iter()
                .filter_map(|t| ImageRef::parse(t).tag().map(str::to_string)),
        );
        let mut first = None;
        for t in tags {
            if t.starts_with('v') && t[1..].starts_with(|c: char| c.is_ascii_digit()) {
                return t;
            }
            first.get_or_insert(t);
        }
        first.unwrap_or_else(|| short_id(&self.image_id).to_string())
    }
}

pub fn short_id(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

/// What we need of one container, independent of bollard's types.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
    pub image: String,
    pub image_id: String,
    pub env: Vec<String>,
    pub command: Vec<String>,
    pub mounts: Vec<Mount>,
    /// Network name → IP address.
    pub networks: BTreeMap<String, String>,
    pub state: ContainerState,
    pub created: String,
    pub restart_count: i64,
    pub restart_policy: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub source: String,
    pub destination: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageInfo {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub labels: HashMap<String, String>,
}

impl ContainerInfo {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    fn project(&self) -> Option<&str> {
        self.label(LABEL_PROJECT)
    }

    fn service(&self) -> &str {
        self.label(LABEL_SERVICE).unwrap_or(&self.name)
    }

    pub fn env_var(&self, key: &str) -> Option<&str> {
        self.env.iter().find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v)
        })
    }

    fn running(&self) -> bool {
        matches!(
            self.state,
            ContainerState::Running | ContainerState::Paused | ContainerState::Restarting
        )
    }

    fn role(&self) -> Option<Role> {
        let image = ImageRef::parse(&self.image);
        let repo = image.repo().to_ascii_lowercase();
        if image.is_server() {
            Some(Role::Server)
        } else if image.is_ml() {
            Some(Role::MachineLearning)
        } else if ["postgres", "pgvecto", "vectorchord"]
            .iter()
            .any(|p| repo.contains(p))
            || self.command.iter().any(|c| c.ends_with("postgres"))
        {
            Some(Role::Database)
        } else if repo.contains("redis") || repo.contains("valkey") {
            Some(Role::Redis)
        } else {
            // Images referenced by ID (a moved tag) still carry their compose service name.
            match self.service() {
                "immich-server" => Some(Role::Server),
                "immich-machine-learning" => Some(Role::MachineLearning),
                "database" => Some(Role::Database),
                "redis" => Some(Role::Redis),
                _ => None,
            }
        }
    }

    fn to_service(&self) -> Service {
        Service {
            service: self.service().to_string(),
            container_id: self.id.clone(),
            container_name: self.name.clone(),
            image: self.image.clone(),
            image_id: self.image_id.clone(),
            state: self.state,
            restart_count: self.restart_count,
            restart_policy: self.restart_policy.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    MachineLearning,
    Redis,
    Database,
}

/// Discovers the stack: one `collect` from Docker, then the pure `assemble`.
pub async fn discover(
    docker: &Docker,
    host: &str,
    config: &Config,
) -> Result<Stack, DiscoverError> {
    let (containers, images) = collect(docker, host, config).await?;
    assemble(config, &containers, &images, &read_env_file)
}

/// Inspects every compose container (and the configured ones), plus the images the Immich
/// server containers run.
pub async fn collect(
    docker: &Docker,
    host: &str,
    config: &Config,
) -> Result<(Vec<ContainerInfo>, HashMap<String, ImageInfo>), DiscoverError> {
    let mut filters = HashMap::new();
    filters.insert("label".to_string(), vec![LABEL_PROJECT.to_string()]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let summaries = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| classify(host, e))?;
    let mut ids: Vec<String> = summaries.into_iter().filter_map(|s| s.id).collect();
    for (key, name) in [
        ("server_container", &config.stack.server_container),
        ("database_container", &config.stack.database_container),
    ] {
        if let Some(name) = name {
            match docker
                .inspect_container(name, None::<InspectContainerOptions>)
                .await
            {
                Ok(c) => ids.extend(c.id),
                Err(e) if is_not_found(&e) => {
                    return Err(DiscoverError::ContainerNotFound {
                        key,
                        name: name.clone(),
                    });
                }
                Err(e) => return Err(classify(host, e).into()),
            }
        }
    }
    ids.sort();
    ids.dedup();

    let mut containers = Vec::with_capacity(ids.len());
    for id in ids {
        match docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => containers.push(container_info(c)),
            // Removed between list and inspect: a recreate in progress; the next event
            // triggers another discovery.
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(classify(host, e).into()),
        }
    }

    let mut images = HashMap::new();
    for c in containers.iter().filter(|c| c.role() == Some(Role::Server)) {
        if images.contains_key(&c.image_id) {
            continue;
        }
        match docker.inspect_image(&c.image_id).await {
            Ok(i) => {
                let info = ImageInfo {
                    id: i.id.unwrap_or_default(),
                    repo_tags: i.repo_tags.unwrap_or_default(),
                    repo_digests: i.repo_digests.unwrap_or_default(),
                    labels: i.config.and_then(|c| c.labels).unwrap_or_default(),
                };
                images.insert(c.image_id.clone(), info);
            }
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(classify(host, e).into()),
        }
    }
    Ok((containers, images))
}

fn container_info(c: bollard::models::ContainerInspectResponse) -> ContainerInfo {
    let config = c.config.unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let mut command = config.entrypoint.unwrap_or_default();
    command.extend(config.cmd.unwrap_or_default());
    ContainerInfo {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        labels: config.labels.unwrap_or_default(),
        image: config.image.unwrap_or_default(),
        image_id: c.image.unwrap_or_default(),
        env: config.env.unwrap_or_default(),
        command,
        mounts: c
            .mounts
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                Some(Mount {
                    source: m.source?,
                    destination: m.destination?,
                })
            })
            .collect(),
        networks: c
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, ep)| Some((name, ep.ip_address.filter(|ip| !ip.is_empty())?)))
            .collect(),
        state: state.status.map(ContainerState::from).unwrap_or_default(),
        created: c.created.map(|d| d.to_string()).unwrap_or_default(),
        restart_count: c.restart_count.unwrap_or(0),
        restart_policy: c
            .host_config
            .and_then(|h| h.restart_policy)
            .and_then(|p| p.name)
            .map(|n| n.to_string())
            .unwrap_or_default(),
    }
}

/// What `status` says while `.env` is gone (docs/operations.md "A missing .env").
pub fn env_missing_note(path: &Path) -> String {
    format!(
        "{} is missing: compose would run each image's default tag; no version change is inferred from its absence",
        path.display()
    )
}

/// Reads `KEY=value` pairs of a compose `.env` file.
pub fn read_env_file(path: &Path) -> Result<HashMap<String, String>, String> {
    let iter = dotenvy::from_path_iter(path).map_err(|e| match e {
        dotenvy::Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
            env_missing_note(path)
        }
        e => format!("cannot read {}: {e}", path.display()),
    })?;
    let mut vars = HashMap::new();
    for item in iter {
        let (k, v) = item.map_err(|e| {
            format!(
                "cannot parse {}: {}",
                path.display(),
                crate::redact::env_error(&e)
            )
        })?;
        vars.insert(k, v);
    }
    Ok(vars)
}

type EnvReader<'a> = &'a dyn Fn(&Path) -> Result<HashMap<String, String>, String>;

/// Chooses the stack and fills in every field from what Docker reported.
pub fn assemble(
    config: &Config,
    containers: &[ContainerInfo],
    images: &HashMap<String, ImageInfo>,
    read_env: EnvReader<'_>,
) -> Result<Stack, DiscoverError> {
    let project = choose_project(config, containers)?;
    let members: Vec<&ContainerInfo> = containers
        .iter()
        .filter(|c| c.project() == Some(project.as_str()))
        .collect();
    let mut notes = Vec::new();

    let pick = |role: Role, configured: Option<&String>| -> Option<&ContainerInfo> {
        if let Some(name) = configured {
            return containers
                .iter()
                .find(|c| &c.name == name || c.id.starts_with(name.as_str()));
        }
        // During a recreate old and new containers coexist: the running, then newest, wins.
        members
            .iter()
            .copied()
            .filter(|c| c.role() == Some(role))
            .max_by(|a, b| (a.running(), &a.created).cmp(&(b.running(), &b.created)))
    };
    let server = pick(Role::Server, config.stack.server_container.as_ref());
    let database = pick(Role::Database, config.stack.database_container.as_ref());
    let ml = pick(Role::MachineLearning, None);
    let redis = pick(Role::Redis, None);
    for (what, found) in [
        ("machine-learning", ml.is_some()),
        ("redis", redis.is_some()),
    ] {
        if !found {
            notes.push(format!("no {what} container in project {project}"));
        }
    }

    // Any member carries the compose labels; prefer the server's.
    let labelled = server.or_else(|| members.first().copied());
    let compose_dir = config.stack.compose_dir.clone().or_else(|| {
        labelled
            .and_then(|c| c.label(LABEL_WORKING_DIR))
            .map(PathBuf::from)
    });
    let compose_files: Vec<PathBuf> = labelled
        .and_then(|c| c.label(LABEL_CONFIG_FILES))
        .map(|files| {
            files
                .split(',')
                .filter(|f| !f.is_empty())
                .map(|f| match &compose_dir {
                    Some(dir) if Path::new(f).is_relative() => dir.join(f),
                    _ => PathBuf::from(f),
                })
                .collect()
        })
        .unwrap_or_default();
    if compose_dir.is_none() {
        notes.push(format!(
            "compose working dir unknown: the containers of {project} carry no {LABEL_WORKING_DIR} label; set stack.compose_dir"
        ));
    }
    let env_file = config
        .stack
        .env_file
        .clone()
        .or_else(|| {
            labelled
                .and_then(|c| c.label(LABEL_ENV_FILE))
                .filter(|f| !f.is_empty() && !f.contains(','))
                .map(PathBuf::from)
        })
        .or_else(|| compose_dir.as_ref().map(|d| d.join(".env")));
    let env_version = match &env_file {
        Some(path) => match read_env(path) {
            Ok(vars) => vars.get("IMMICH_VERSION").cloned(),
            Err(e) => {
                notes.push(e);
                None
            }
        },
        None => None,
    };

    let (upload_location, upload_mount) = match (&config.stack.upload_location, server) {
        (Some(p), _) => (Some(p.clone()), None),
        (None, Some(s)) => match upload_mount(s) {
            Some(m) => (Some(PathBuf::from(&m.source)), Some(m.destination.clone())),
            None => {
                notes.push(format!(
                    "upload location unknown: server container {} has no mount at {} (or at IMMICH_MEDIA_LOCATION); set stack.upload_location",
                    s.name,
                    UPLOAD_MOUNTS.join(" or ")
                ));
                (None, None)
            }
        },
        (None, None) => (None, None),
    };

    let db_data_location = config.stack.db_data_location.clone().or_else(|| {
        let db = database?;
        let found = db_data_mount(db);
        if found.is_none() {
            notes.push(format!(
                "database data dir unknown: container {} has no mount holding PGDATA; set stack.db_data_location",
                db.name
            ));
        }
        found
    });

    let db = match (database, server) {
        (None, None) => None,
        _ => Some(db_access(config, database, server, &mut notes)),
    };
    if database.is_none() {
        notes.push(format!(
            "no database container found in project {project} (looked for a postgres image or command); set stack.database_container"
        ));
    }

    let version = server.map(|s| {
        let image = images.get(&s.image_id).cloned().unwrap_or_default();
        ImmichVersion {
            tag: ImageRef::parse(&s.image).tag().map(str::to_string),
            image_id: s.image_id.clone(),
            repo_digests: image.repo_digests,
            repo_tags: image.repo_tags,
            label: image.labels.get(LABEL_OCI_VERSION).cloned(),
        }
    });

    Ok(Stack {
        project,
        compose_dir,
        compose_files,
        env_file,
        env_version,
        server: server.map(ContainerInfo::to_service),
        machine_learning: ml.map(ContainerInfo::to_service),
        redis: redis.map(ContainerInfo::to_service),
        database: database.map(ContainerInfo::to_service),
        upload_location,
        upload_mount,
        db_data_location,
        db,
        version,
        notes,
    })
}

fn choose_project(config: &Config, containers: &[ContainerInfo]) -> Result<String, DiscoverError> {
    let mut all: Vec<String> = containers
        .iter()
        .filter_map(|c| c.project().map(str::to_string))
        .collect();
    all.sort();
    all.dedup();
    let mut immich: Vec<String> = containers
        .iter()
        .filter(|c| c.role() == Some(Role::Server))
        .filter_map(|c| c.project().map(str::to_string))
        .collect();
    immich.sort();
    immich.dedup();

    if let Some(name) = &config.stack.server_container {
        // The configured server decides, compose project or not.
        let c = containers
            .iter()
            .find(|c| &c.name == name || c.id.starts_with(name.as_str()))
            .ok_or_else(|| DiscoverError::ContainerNotFound {
                key: "server_container",
                name: name.clone(),
            })?;
        return Ok(c.project().unwrap_or(&c.name).to_string());
    }
    if let Some(project) = &config.stack.project {
        return if all.contains(project) {
            Ok(project.clone())
        } else {
            Err(DiscoverError::ProjectNotFound {
                project: project.clone(),
                found: all,
            })
        };
    }
    match immich.len() {
        0 => Err(DiscoverError::NoStack {
            compose_projects: all,
        }),
        1 => Ok(immich.remove(0)),
        _ => Err(DiscoverError::Ambiguous { projects: immich }),
    }
}

fn upload_mount(server: &ContainerInfo) -> Option<&Mount> {
    let media = server.env_var("IMMICH_MEDIA_LOCATION");
    let wanted = |m: &&Mount| {
        media.is_some_and(|p| p.trim_end_matches('/') == m.destination)
            || UPLOAD_MOUNTS.contains(&m.destination.as_str())
    };
    server.mounts.iter().find(wanted)
}

/// The host dir holding PGDATA: the mount at PGDATA itself, or a parent mount plus the rest.
fn db_data_mount(db: &ContainerInfo) -> Option<PathBuf> {
    let pgdata = Path::new(db.env_var("PGDATA").unwrap_or(DEFAULT_PGDATA));
    db.mounts
        .iter()
        .filter_map(|m| {
            let rest = pgdata.strip_prefix(&m.destination).ok()?;
            let source = Path::new(&m.source);
            // join("") would add a trailing slash.
            let host = if rest.as_os_str().is_empty() {
                source.to_path_buf()
            } else {
                source.join(rest)
            };
            Some((m.destination.len(), host))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, p)| p)
}

fn db_access(
    config: &Config,
    database: Option<&ContainerInfo>,
    server: Option<&ContainerInfo>,
    notes: &mut Vec<String>,
) -> DbAccess {
    let from_db = |k: &str| database.and_then(|d| d.env_var(k)).map(str::to_string);
    let from_server = |k: &str| server.and_then(|s| s.env_var(k)).map(str::to_string);
    let cfg = &config.database;

    let user = cfg
        .user
        .clone()
        .or_else(|| from_db("POSTGRES_USER"))
        .or_else(|| from_server("DB_USERNAME"))
        .unwrap_or_else(|| "postgres".to_string());
    let password = cfg
        .password
        .clone()
        .or_else(|| from_db("POSTGRES_PASSWORD"))
        .or_else(|| from_server("DB_PASSWORD"));
    let name = cfg
        .name
        .clone()
        .or_else(|| from_db("POSTGRES_DB"))
        .or_else(|| from_server("DB_DATABASE_NAME"))
        .unwrap_or_else(|| user.clone());
    if password.is_none() {
        notes.push(
            "database password unknown: neither POSTGRES_PASSWORD on the database nor DB_PASSWORD on the server (Docker secrets?); set database.password".to_string(),
        );
    }
    // A disagreement means the server cannot log in either; worth saying, unless the
    // config settles it.
    for (db_key, server_key, overridden) in [
        ("POSTGRES_USER", "DB_USERNAME", cfg.user.is_some()),
        ("POSTGRES_PASSWORD", "DB_PASSWORD", cfg.password.is_some()),
        ("POSTGRES_DB", "DB_DATABASE_NAME", cfg.name.is_some()),
    ] {
        if let (Some(d), Some(s)) = (from_db(db_key), from_server(server_key))
            && d != s
            && !overridden
        {
            let shown = if db_key == "POSTGRES_PASSWORD" {
                String::new()
            } else {
                format!(" ({d:?} vs {s:?})")
            };
            notes.push(format!(
                "database {db_key} and server {server_key} disagree{shown}; using the database's"
            ));
        }
    }

    let host = cfg.host.clone().or_else(|| {
        let db = database?;
        // An address on a network the server shares is one the server itself uses.
        let shared = server.and_then(|s| {
            db.networks
                .iter()
                .find(|(net, _)| s.networks.contains_key(*net))
                .map(|(_, ip)| ip.clone())
        });
        shared.or_else(|| db.networks.values().next().cloned())
    });
    if host.is_none() && database.is_some() {
        notes.push(
            "database address unknown: the database container has no IP (not running?)".to_string(),
        );
    }
    DbAccess {
        user,
        password_known: password.is_some(),
        password: password.unwrap_or_default(),
        database: name,
        host,
        port: cfg.port.unwrap_or(5432),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(project: &str, service: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_PROJECT.to_string(), project.to_string()),
            (LABEL_SERVICE.to_string(), service.to_string()),
            (LABEL_WORKING_DIR.to_string(), "/opt/immich".to_string()),
            (
                LABEL_CONFIG_FILES.to_string(),
                "/opt/immich/docker-compose.yml".to_string(),
            ),
        ])
    }

    fn stock(project: &str) -> Vec<ContainerInfo> {
        let net = format!("{project}_default");
        vec![
            ContainerInfo {
                id: format!("{project}-server-id"),
                name: "immich_server".into(),
                labels: labels(project, "immich-server"),
                image: "ghcr.io/immich-app/immich-server:v1.119.0".into(),
                image_id: "sha256:aaaa".into(),
                env: vec![
                    "DB_USERNAME=postgres".into(),
                    "DB_PASSWORD=secret".into(),
                    "DB_DATABASE_NAME=immich".into(),
                ],
                mounts: vec![
                    Mount {
                        source: "/srv/immich/library".into(),
                        destination: "/data".into(),
                    },
                    Mount {
                        source: "/etc/localtime".into(),
                        destination: "/etc/localtime".into(),
                    },
                ],
                networks: BTreeMap::from([(net.clone(), "172.18.0.5".into())]),
                state: ContainerState::Running,
                created: "2026-11-25T02:00:00Z".into(),
                restart_policy: "always".into(),
                ..Default::default()
            },
            ContainerInfo {
                id: format!("{project}-db-id"),
                name: "immich_postgres".into(),
                labels: labels(project, "database"),
                image: "ghcr.io/immich-app/postgres:14-vectorchord0.4.3-pgvectors0.2.0".into(),
                env: vec![
                    "POSTGRES_USER=postgres".into(),
                    "POSTGRES_PASSWORD=secret".into(),
                    "POSTGRES_DB=immich".into(),
                ],
                mounts: vec![Mount {
                    source: "/srv/immich/postgres".into(),
                    destination: "/var/lib/postgresql/data".into(),
                }],
                networks: BTreeMap::from([(net.clone(), "172.18.0.3".into())]),
                state: ContainerState::Running,
                ..Default::default()
            },
            ContainerInfo {
                id: format!("{project}-redis-id"),
                name: "immich_redis".into(),
                labels: labels(project, "redis"),
                image: "docker.io/valkey/valkey:8-bookworm@sha256:ff21".into(),
                state: ContainerState::Running,
                ..Default::default()
            },
            ContainerInfo {
                id: format!("{project}-ml-id"),
                name: "immich_machine_learning".into(),
                labels: labels(project, "immich-machine-learning"),
                image: "ghcr.io/immich-app/immich-machine-learning:v1.119.0".into(),
                state: ContainerState::Running,
                ..Default::default()
            },
        ]
    }

    fn images() -> HashMap<String, ImageInfo> {
        HashMap::from([(
            "sha256:aaaa".to_string(),
            ImageInfo {
                id: "sha256:aaaa".into(),
                repo_tags: vec!["ghcr.io/immich-app/immich-server:v1.119.0".into()],
                repo_digests: vec!["ghcr.io/immich-app/immich-server@sha256:beef".into()],
                labels: HashMap::from([(LABEL_OCI_VERSION.to_string(), "v1.119.0".to_string())]),
            },
        )])
    }

    fn env_with_version(path: &Path) -> Result<HashMap<String, String>, String> {
        assert_eq!(path, Path::new("/opt/immich/.env"));
        Ok(HashMap::from([(
            "IMMICH_VERSION".to_string(),
            "v1.120.0".to_string(),
        )]))
    }

    #[test]
    fn stock_stack_is_found_without_config() {
        let s = assemble(
            &Config::default(),
            &stock("immich"),
            &images(),
            &env_with_version,
        )
        .unwrap();
        assert_eq!(s.project, "immich");
        assert_eq!(s.server.as_ref().unwrap().container_name, "immich_server");
        assert_eq!(
            s.database.as_ref().unwrap().container_name,
            "immich_postgres"
        );
        assert_eq!(s.redis.as_ref().unwrap().container_name, "immich_redis");
        assert_eq!(
            s.machine_learning.as_ref().unwrap().container_name,
            "immich_machine_learning"
        );
        assert_eq!(s.compose_dir, Some(PathBuf::from("/opt/immich")));
        assert_eq!(
            s.compose_files,
            vec![PathBuf::from("/opt/immich/docker-compose.yml")]
        );
        assert_eq!(s.env_file, Some(PathBuf::from("/opt/immich/.env")));
        assert_eq!(s.env_version.as_deref(), Some("v1.120.0"));
        assert_eq!(
            s.upload_location,
            Some(PathBuf::from("/srv/immich/library"))
        );
        assert_eq!(s.upload_mount.as_deref(), Some("/data"));
        assert_eq!(
            s.db_data_location,
            Some(PathBuf::from("/srv/immich/postgres"))
        );
        let db = s.db.unwrap();
        assert_eq!(
            (db.user.as_str(), db.database.as_str()),
            ("postgres", "immich")
        );
        assert_eq!(db.password, "secret");
        assert_eq!(db.host.as_deref(), Some("172.18.0.3"));
        let v = s.version.unwrap();
        assert_eq!(v.tag.as_deref(), Some("v1.119.0"));
        assert_eq!(v.name(), "v1.119.0");
        assert_eq!(v.repo_digests.len(), 1);
        assert!(s.notes.is_empty(), "{:?}", s.notes);
    }

    #[test]
    fn two_stacks_need_a_choice_and_the_choice_works() {
        let mut all = stock("immich");
        all.extend(stock("immich-test"));
        let e = assemble(&Config::default(), &all, &images(), &env_with_version).unwrap_err();
        assert!(matches!(e, DiscoverError::Ambiguous { .. }));
        assert!(e.to_string().contains("immich, immich-test"), "{e}");
        assert!(e.to_string().contains("stack.project"), "{e}");

        let mut config = Config::default();
        config.stack.project = Some("immich-test".into());
        let s = assemble(&config, &all, &images(), &env_with_version).unwrap();
        assert_eq!(s.project, "immich-test");
        assert_eq!(s.server.unwrap().container_id, "immich-test-server-id");
    }

    #[test]
    fn no_immich_server_means_no_stack() {
        let mut other = stock("nextcloud");
        other.retain(|c| c.name == "immich_postgres");
        let e = assemble(&Config::default(), &other, &images(), &env_with_version).unwrap_err();
        assert!(matches!(e, DiscoverError::NoStack { .. }));
        assert!(e.to_string().contains("nextcloud"), "{e}");
        let e = assemble(&Config::default(), &[], &images(), &env_with_version).unwrap_err();
        assert!(e.to_string().contains("no compose projects at all"), "{e}");
    }

    #[test]
    fn configured_project_that_is_absent_is_an_error() {
        let mut config = Config::default();
        config.stack.project = Some("photos".into());
        let e = assemble(&config, &stock("immich"), &images(), &env_with_version).unwrap_err();
        assert!(e.to_string().contains("\"photos\""), "{e}");
        assert!(e.to_string().contains("immich"), "{e}");
    }

    #[test]
    fn recreated_server_prefers_the_running_container() {
        let mut all = stock("immich");
        let mut old = all[0].clone();
        old.id = "old".into();
        old.state = ContainerState::Exited;
        old.created = "2026-11-25T03:00:00Z".into();
        all.push(old);
        let s = assemble(&Config::default(), &all, &images(), &env_with_version).unwrap();
        assert_eq!(s.server.unwrap().container_id, "immich-server-id");
    }

    #[test]
    fn moved_tag_still_identifies_the_server_by_service_and_repo_tags() {
        let mut all = stock("immich");
        all[0].image = "sha256:aaaa".into();
        let s = assemble(&Config::default(), &all, &images(), &env_with_version).unwrap();
        let v = s.version.unwrap();
        assert_eq!(v.tag, None);
        assert_eq!(v.image_id, "sha256:aaaa");
    }

    #[test]
    fn older_upload_mount_and_parent_pgdata_mount_are_understood() {
        let mut all = stock("immich");
        all[0].mounts[0].destination = "/usr/src/app/upload".into();
        all[1].mounts[0] = Mount {
            source: "/srv/pg".into(),
            destination: "/var/lib/postgresql".into(),
        };
        let s = assemble(&Config::default(), &all, &images(), &env_with_version).unwrap();
        assert_eq!(s.upload_mount.as_deref(), Some("/usr/src/app/upload"));
        assert_eq!(s.db_data_location, Some(PathBuf::from("/srv/pg/data")));
    }

    #[test]
    fn a_missing_env_file_is_named_as_missing_not_as_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        let e = read_env_file(&path).unwrap_err();
        assert_eq!(e, env_missing_note(&path));
        assert!(e.contains("no version change is inferred"), "{e}");
        std::fs::write(&path, "IMMICH_VERSION=v1.119.0\n").unwrap();
        assert_eq!(read_env_file(&path).unwrap()["IMMICH_VERSION"], "v1.119.0");
    }

    #[test]
    fn missing_pieces_are_named_in_notes() {
        let mut all = stock("immich");
        all[0].mounts.clear();
        all[1].env.retain(|e| !e.starts_with("POSTGRES_PASSWORD"));
        all[0].env.retain(|e| !e.starts_with("DB_PASSWORD"));
        all.retain(|c| c.name != "immich_redis");
        let s = assemble(&Config::default(), &all, &images(), &|_: &Path| {
            Err("cannot read /opt/immich/.env: permission denied".to_string())
        })
        .unwrap();
        let notes = s.notes.join("\n");
        assert!(notes.contains("upload location unknown"), "{notes}");
        assert!(notes.contains("stack.upload_location"), "{notes}");
        assert!(notes.contains("password unknown"), "{notes}");
        assert!(notes.contains("no redis container"), "{notes}");
        assert!(notes.contains("permission denied"), "{notes}");
        assert!(!s.db.unwrap().password_known);
    }

    #[test]
    fn config_overrides_discovery() {
        let mut config = Config::default();
        config.stack.upload_location = Some("/mnt/photos".into());
        config.database.host = Some("10.0.0.9".into());
        config.database.password = Some("from-config".into());
        let s = assemble(&config, &stock("immich"), &images(), &env_with_version).unwrap();
        assert_eq!(s.upload_location, Some(PathBuf::from("/mnt/photos")));
        let db = s.db.unwrap();
        assert_eq!(db.host.as_deref(), Some("10.0.0.9"));
        assert_eq!(db.password, "from-config");
    }

    /// The test harness tags its stand-ins `immich-guard-test/immich-server:…` so it never
    /// touches a host's real tags; stock references (tag, `release`, digest) must still be
    /// found by the repository name alone, and the stand-in references as well.
    #[test]
    fn stock_and_test_image_references_are_found_by_repository_name() {
        let role = |image: &str| {
            ContainerInfo {
                image: image.into(),
                name: "renamed".into(),
                ..Default::default()
            }
            .role()
        };
        let digest = "sha256:5f1b7e8c1d0a4e6f8b9c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a";
        for repo in [
            "ghcr.io/immich-app/immich-server",
            "immich-guard-test/immich-server",
            "harness/immich-server",
            "registry.local:5000/immich-app/immich-server",
        ] {
            for image in [
                format!("{repo}:v1.119.0"),
                format!("{repo}:release"),
                format!("{repo}@{digest}"),
                format!("{repo}:v1.119.0@{digest}"),
                repo.to_string(),
            ] {
                assert_eq!(role(&image), Some(Role::Server), "{image}");
                let ml = image.replace("immich-server", "immich-machine-learning");
                assert_eq!(role(&ml), Some(Role::MachineLearning), "{ml}");
            }
        }
        assert_eq!(role("immich-guard-test/valkey:8"), Some(Role::Redis));
        assert_eq!(role("immich-guard-test/postgres:15"), Some(Role::Database));
        assert_eq!(role("ghcr.io/immich-app/immich-server-fork:v1"), None);

        // The whole stack with the stand-in's references is discovered like the stock one.
        let mut stack = stock("immich");
        for c in &mut stack {
            c.image = c
                .image
                .replace("ghcr.io/immich-app/immich-", "immich-guard-test/immich-")
                .replace(
                    "docker.io/valkey/valkey:8-bookworm",
                    "immich-guard-test/valkey:8",
                );
        }
        let s = assemble(&Config::default(), &stack, &images(), &env_with_version).unwrap();
        assert_eq!(s.project, "immich");
        assert_eq!(s.server.unwrap().container_name, "immich_server");
        assert_eq!(
            s.machine_learning.unwrap().container_name,
            "immich_machine_learning"
        );
        assert_eq!(s.redis.unwrap().container_name, "immich_redis");
    }

    #[test]
    fn password_never_appears_in_serialized_stack() {
        let s = assemble(
            &Config::default(),
            &stock("immich"),
            &images(),
            &env_with_version,
        )
        .unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("secret"), "{json}");
        assert!(json.contains("\"password_known\":true"));
    }
}
