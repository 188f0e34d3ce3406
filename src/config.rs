//! The TOML configuration. Every key is optional: discovery fills in what it can, the config
//! only overrides what discovery cannot know. A bad file is refused as a whole, before the
//! daemon starts anything, with an error that names the file, the key and the value.

use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/immich-guard/config.toml";
pub const DEFAULT_SOCKET_PATH: &str = "/run/immich-guard/guard.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/immich-guard";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {key} = {value}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// A setting that works today but may not when the daemon needs it (the Docker socket is not
/// there yet): `check-config` prints it, `run` logs it and goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub path: PathBuf,
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config file {}: {} = {}: {}",
            self.path.display(),
            self.key,
            self.value,
            self.reason
        )
    }
}

/// Kernel pseudo-filesystems: nothing written there is kept, most of it cannot be created.
const PSEUDO_FS_ROOTS: &[&str] = &["/proc", "/sys"];
/// `sun_path` holds 108 bytes, the last one a NUL.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub stack: StackConfig,
    pub database: DatabaseConfig,
    pub docker: DockerConfig,
    pub control: ControlConfig,
    pub daemon: DaemonConfig,
    pub snapshots: SnapshotConfig,
    pub crash_loop: CrashLoopConfig,
    pub protect: ProtectConfig,
    pub notify: NotifyConfig,
}

/// Where protection events are sent; nothing is sent unless configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Receives every event as a JSON POST.
    pub webhook_url: Option<String>,
    /// ntfy server, e.g. `https://ntfy.sh`; with `ntfy_topic`.
    pub ntfy_url: Option<String>,
    pub ntfy_topic: Option<String>,
    #[serde(skip_serializing)]
    pub ntfy_token: Option<String>,
    pub timeout_secs: u64,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            webhook_url: None,
            ntfy_url: None,
            ntfy_topic: None,
            ntfy_token: None,
            timeout_secs: 10,
        }
    }
}

/// Passive protection (README.md "How it protects").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtectConfig {
    /// Let a frozen server go when its snapshot fails, instead of holding it (default: hold).
    pub fail_open: bool,
    /// Keep a frozen server frozen after its snapshot seals until no asset has been uploaded
    /// for this long (docs/operations.md "Uploads"); off when absent or 0.
    pub wait_for_quiet_uploads: Option<Minutes>,
    /// The longest that wait lasts; then the server goes anyway, and says so.
    pub wait_for_quiet_max_minutes: Minutes,
}

impl Default for ProtectConfig {
    fn default() -> Self {
        ProtectConfig {
            fail_open: false,
            wait_for_quiet_uploads: None,
            wait_for_quiet_max_minutes: Minutes::from_secs(60 * 60),
        }
    }
}

impl ProtectConfig {
    /// The quiet time a release waits for, when the wait is on.
    pub fn quiet_uploads(&self) -> Option<std::time::Duration> {
        self.wait_for_quiet_uploads
            .filter(|m| m.secs > 0)
            .map(Minutes::duration)
    }
}

/// A length of time given in minutes: a number (`10`, `0.5`) or a string with a unit
/// (`"90s"`, `"10m"`, `"1h"`). Parsed where it is read, so a bad value never travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Minutes {
    secs: u64,
}

impl Minutes {
    pub const fn from_secs(secs: u64) -> Minutes {
        Minutes { secs }
    }

    pub fn duration(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.secs)
    }

    fn parse(text: &str) -> Result<Minutes, String> {
        let t = text.trim();
        let (number, unit) =
            t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len()));
        let per = match unit.trim() {
            "s" | "sec" | "secs" => 1.0,
            "" | "m" | "min" | "mins" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("unknown unit {other:?} (s, m or h)")),
        };
        let n: f64 = number.trim().parse().map_err(|_| {
            format!("{text:?} is not a number of minutes (10, 0.5, \"90s\", \"10m\", \"1h\")")
        })?;
        Minutes::of(n * per)
    }

    fn of(secs: f64) -> Result<Minutes, String> {
        if !secs.is_finite() || !(0.0..=366.0 * 86_400.0).contains(&secs) {
            return Err(format!("{secs} s is not a length of time from 0 to a year"));
        }
        Ok(Minutes {
            secs: secs.round() as u64,
        })
    }
}

impl fmt::Display for Minutes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.secs.is_multiple_of(60) {
            write!(f, "{} min", self.secs / 60)
        } else {
            write!(f, "{} s", self.secs)
        }
    }
}

impl Serialize for Minutes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.secs.is_multiple_of(60) {
            s.serialize_u64(self.secs / 60)
        } else {
            s.serialize_str(&format!("{}s", self.secs))
        }
    }
}

impl<'de> Deserialize<'de> for Minutes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Minutes, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Minutes::of(n as f64 * 60.0),
            Raw::Float(n) => Minutes::of(n * 60.0),
            Raw::Text(t) => Minutes::parse(&t),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// Overrides for what discovery finds on the Docker host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StackConfig {
    /// Compose project to protect; required only when several Immich stacks run on one host.
    pub project: Option<String>,
    /// Compose working dir (where `docker-compose.yml` and `.env` live).
    pub compose_dir: Option<PathBuf>,
    /// The `.env` file, when it is not `<compose_dir>/.env`.
    pub env_file: Option<PathBuf>,
    pub server_container: Option<String>,
    pub database_container: Option<String>,
    /// Host path of the upload location (`UPLOAD_LOCATION`).
    pub upload_location: Option<PathBuf>,
    /// Host path of the database data dir (`DB_DATA_LOCATION`).
    pub db_data_location: Option<PathBuf>,
}

/// Database credentials, when the container's env does not carry them (e.g. Docker secrets).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub user: Option<String>,
    #[serde(skip_serializing)]
    pub password: Option<String>,
    pub name: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// `unix:///path` or `tcp://host:port`; default: `DOCKER_HOST`, else the local socket.
    pub host: Option<String>,
    /// First and longest wait between reconnect attempts when the engine is unreachable.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Full re-discovery even without events, as a safety net.
    pub reconcile_secs: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            host: None,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            reconcile_secs: 300,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// Group allowed to connect to the socket (read-only verbs). Default: root only.
    pub group: Option<String>,
}

impl ControlConfig {
    /// The socket's group as a gid; `Err` says why the group cannot be used.
    pub fn gid(&self) -> Result<Option<nix::unistd::Gid>, String> {
        let Some(group) = &self.group else {
            return Ok(None);
        };
        match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => Ok(Some(g.gid)),
            Ok(None) => Err("no such group on this system (see `getent group`)".to_string()),
            Err(e) => Err(format!("cannot look the group up: {e}")),
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET_PATH),
            group: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Where snapshots, incidents and the guard's own state live.
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    /// A tracing filter, e.g. `info` or `immich_guard=debug`.
    pub log_level: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            log_format: LogFormat::Text,
            log_level: "info".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Default: `<daemon.data_dir>/snapshots`.
    pub dir: Option<PathBuf>,
    pub keep_last: u32,
    pub keep_versions: u32,
    /// Top-level upload folders to leave out (only derived ones: `thumbs`, `encoded-video`).
    pub exclude: Vec<String>,
    /// Allow a full copy when the snapshot dir is on another filesystem than the uploads.
    pub copy_across: bool,
    /// Snapshot without files or folders that cannot be read, recording them in meta.json,
    /// instead of failing.
    pub skip_unreadable: bool,
    /// How long a server stays frozen for a snapshot that does not seal (a dump stuck behind
    /// a database lock) before it is HELD with a notification (docs/operations.md).
    pub max_wait_secs: u64,
    /// How fast the content-hash pass after each seal may read, in MB/s (0: unlimited); it
    /// also runs at the lowest CPU and I/O priority (README.md, "Storage").
    pub hash_rate_mb: u64,
    /// When the restore drill (src/drill/) runs after a seal, and whether a protective
    /// snapshot counts before its drill passed (docs/operations.md "Restore drills").
    pub drill: DrillMode,
    /// Memory PostgreSQL may use in a drill's scratch container, in MB (its tmpfs comes on top).
    pub drill_memory_mb: u64,
    /// CPUs the scratch container may use (fractions allowed).
    pub drill_cpus: f64,
    /// The largest tmpfs a drill's scratch database may take, in MB; a database whose replay
    /// needs more goes to a scratch dir under the data dir instead.
    pub drill_tmpfs_mb: u64,
}

/// `snapshots.drill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrillMode {
    /// A pre-update/pre-start snapshot counts (a frozen server goes) only once its drill
    /// passed; a failed drill holds the update like a failed snapshot.
    BeforeRelease,
    /// The server goes at the seal; the drill runs after, recorded and notified.
    AfterRelease,
    /// No drill after seals; `immich-guard drill` still works.
    Off,
}

/// The most `snapshots.hash_rate_mb` can say: beyond any disk, so a larger value is a typo
/// (bytes for megabytes).
pub const MAX_HASH_RATE_MB: u64 = 100_000;

/// Folders Immich can regenerate; everything else under the upload location is an original.
pub const DERIVED_FOLDERS: &[&str] = &["thumbs", "encoded-video"];

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            dir: None,
            keep_last: 10,
            keep_versions: 3,
            exclude: Vec::new(),
            copy_across: false,
            skip_unreadable: false,
            max_wait_secs: 1800,
            hash_rate_mb: 100,
            drill: DrillMode::BeforeRelease,
            drill_memory_mb: 1024,
            drill_cpus: 1.0,
            drill_tmpfs_mb: 2048,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrashLoopConfig {
    /// Deaths within `window_secs` that make a crash loop.
    pub deaths: u32,
    pub window_secs: u64,
}

impl Default for CrashLoopConfig {
    fn default() -> Self {
        Self {
            deaths: 3,
            window_secs: 120,
        }
    }
}

impl Config {
    /// Loads `path`. A missing file is only acceptable at the default path (zero config).
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.snapshots
            .dir
            .clone()
            .unwrap_or_else(|| self.daemon.data_dir.join("snapshots"))
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, value: &dyn fmt::Debug, reason: &str| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                value: format!("{value:?}"),
                reason: reason.to_string(),
            })
        };
        let absolute: [(&'static str, Option<&PathBuf>); 7] = [
            ("stack.compose_dir", self.stack.compose_dir.as_ref()),
            ("stack.env_file", self.stack.env_file.as_ref()),
            ("stack.upload_location", self.stack.upload_location.as_ref()),
            (
                "stack.db_data_location",
                self.stack.db_data_location.as_ref(),
            ),
            ("control.socket", Some(&self.control.socket)),
            ("daemon.data_dir", Some(&self.daemon.data_dir)),
            ("snapshots.dir", self.snapshots.dir.as_ref()),
        ];
        for (key, value) in absolute {
            let Some(p) = value else { continue };
            if p.as_os_str().as_bytes().contains(&0) {
                return invalid(key, p, "must not contain a NUL byte");
            }
            if !p.is_absolute() {
                return invalid(
                    key,
                    p,
                    "must be an absolute path (the daemon's working dir is not yours)",
                );
            }
        }
        // Where the daemon writes: a kernel pseudo-filesystem keeps nothing.
        let written: [(&'static str, Option<&PathBuf>); 3] = [
            ("control.socket", Some(&self.control.socket)),
            ("daemon.data_dir", Some(&self.daemon.data_dir)),
            ("snapshots.dir", self.snapshots.dir.as_ref()),
        ];
        for (key, value) in written {
            if let Some(p) = value
                && let Some(root) = pseudo_fs_root(p)
            {
                return invalid(
                    key,
                    p,
                    &format!(
                        "is under {root}, a kernel pseudo-filesystem: nothing can be kept there"
                    ),
                );
            }
        }
        let socket_len = self.control.socket.as_os_str().len();
        if socket_len > MAX_SOCKET_PATH {
            return invalid(
                "control.socket",
                &self.control.socket,
                &format!(
                    "is {socket_len} bytes long; a Unix socket path may have at most {MAX_SOCKET_PATH}"
                ),
            );
        }
        if self.control.socket.file_name().is_none() {
            return invalid("control.socket", &self.control.socket, "must name a file");
        }
        if let Some(group) = &self.control.group
            && group.trim().is_empty()
        {
            return invalid(
                "control.group",
                group,
                "must not be empty; leave the key out for root only",
            );
        }
        let names: [(&'static str, Option<&String>); 5] = [
            ("stack.project", self.stack.project.as_ref()),
            (
                "stack.server_container",
                self.stack.server_container.as_ref(),
            ),
            (
                "stack.database_container",
                self.stack.database_container.as_ref(),
            ),
            ("database.user", self.database.user.as_ref()),
            ("database.name", self.database.name.as_ref()),
        ];
        for (key, value) in names {
            if let Some(v) = value
                && v.trim().is_empty()
            {
                return invalid(
                    key,
                    v,
                    "must not be empty; leave the key out to discover it",
                );
            }
        }
        if self.database.port == Some(0) {
            return invalid("database.port", &0, "must be between 1 and 65535");
        }
        if let Some(host) = &self.docker.host
            && let Err(reason) = docker_socket(host)
        {
            return invalid("docker.host", host, &reason);
        }
        if self.docker.reconnect_min_ms == 0 {
            return invalid("docker.reconnect_min_ms", &0, "must be at least 1 ms");
        }
        if self.docker.reconnect_max_ms < self.docker.reconnect_min_ms {
            return invalid(
                "docker.reconnect_max_ms",
                &self.docker.reconnect_max_ms,
                "must not be smaller than docker.reconnect_min_ms",
            );
        }
        if self.docker.reconcile_secs == 0 {
            return invalid("docker.reconcile_secs", &0, "must be at least 1 s");
        }
        if let Err(e) = self
            .daemon
            .log_level
            .parse::<tracing_subscriber::filter::Targets>()
        {
            return invalid("daemon.log_level", &self.daemon.log_level, &e.to_string());
        }
        if self.snapshots.keep_last == 0 {
            return invalid(
                "snapshots.keep_last",
                &0,
                "must be at least 1: the newest sealed snapshot is never deleted",
            );
        }
        if self.snapshots.max_wait_secs == 0 {
            return invalid(
                "snapshots.max_wait_secs",
                &0,
                "must be at least 1 s: a frozen server is held once its snapshot has run this long",
            );
        }
        if self.protect.wait_for_quiet_max_minutes.secs == 0 {
            return invalid(
                "protect.wait_for_quiet_max_minutes",
                &0,
                "must be more than 0: a server waiting for quiet uploads goes once it has waited this long",
            );
        }
        if self.snapshots.hash_rate_mb > MAX_HASH_RATE_MB {
            return invalid(
                "snapshots.hash_rate_mb",
                &self.snapshots.hash_rate_mb,
                &format!("is in MB/s: at most {MAX_HASH_RATE_MB} (0: unlimited)"),
            );
        }
        if !(self.snapshots.drill_cpus > 0.0 && self.snapshots.drill_cpus <= 1024.0) {
            return invalid(
                "snapshots.drill_cpus",
                &self.snapshots.drill_cpus,
                "must be more than 0 (a fraction of a CPU is allowed) and at most 1024",
            );
        }
        if self.snapshots.drill_memory_mb < 64 {
            return invalid(
                "snapshots.drill_memory_mb",
                &self.snapshots.drill_memory_mb,
                "must be at least 64 MB: PostgreSQL does not start in less",
            );
        }
        if let Some(x) = self
            .snapshots
            .exclude
            .iter()
            .find(|x| !DERIVED_FOLDERS.contains(&x.as_str()))
        {
            return invalid(
                "snapshots.exclude",
                x,
                "only derived folders (thumbs, encoded-video) may be left out; originals never are",
            );
        }
        if self.crash_loop.deaths < 2 {
            return invalid(
                "crash_loop.deaths",
                &self.crash_loop.deaths,
                "must be at least 2 (one death is not a loop)",
            );
        }
        if self.crash_loop.window_secs == 0 {
            return invalid(
                "crash_loop.window_secs",
                &0,
                "must be at least 1 s: a window of 0 s can never see a loop",
            );
        }
        for (key, url) in [
            ("notify.webhook_url", &self.notify.webhook_url),
            ("notify.ntfy_url", &self.notify.ntfy_url),
        ] {
            if let Some(url) = url
                && reqwest::Url::parse(url)
                    .map(|u| !matches!(u.scheme(), "http" | "https"))
                    .unwrap_or(true)
            {
                return invalid(key, url, "must be an http:// or https:// URL");
            }
        }
        const NTFY_PAIR: &str =
            "notify.ntfy_url and notify.ntfy_topic go together: set both or neither";
        match (&self.notify.ntfy_url, &self.notify.ntfy_topic) {
            // Name the key that is there, so the error points at a line of the file.
            (Some(url), None) => return invalid("notify.ntfy_url", url, NTFY_PAIR),
            (None, Some(topic)) => return invalid("notify.ntfy_topic", topic, NTFY_PAIR),
            (_, Some(topic))
                if topic.is_empty()
                    || topic.len() > 64
                    || !topic
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                return invalid(
                    "notify.ntfy_topic",
                    topic,
                    "1 to 64 letters, digits, '_' or '-'",
                );
            }
            _ => {}
        }
        if !(1..=120).contains(&self.notify.timeout_secs) {
            return invalid(
                "notify.timeout_secs",
                &self.notify.timeout_secs,
                "must be 1 to 120",
            );
        }
        Ok(())
    }
}

impl Config {
    /// What can only be checked on this machine, at this moment: the socket's group exists,
    /// the paths can be made what the daemon needs, the Docker host can work. `check-config`
    /// and `run` both call it after `parse`, so a config that passes one passes the other.
    pub fn check_environment(&self, path: &Path) -> Result<Vec<ConfigWarning>, ConfigError> {
        let invalid = |key: &'static str, value: &dyn fmt::Debug, reason: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                value: format!("{value:?}"),
                reason,
            })
        };
        if let (Some(group), Err(reason)) = (&self.control.group, self.control.gid()) {
            return invalid("control.group", group, reason);
        }
        if let Err(reason) = usable_dir(&self.daemon.data_dir) {
            return invalid("daemon.data_dir", &self.daemon.data_dir, reason);
        }
        if let Err(reason) = usable_dir(&self.snapshot_dir()) {
            return invalid("snapshots.dir", &self.snapshot_dir(), reason);
        }
        let socket = &self.control.socket;
        let socket_dir = socket.parent().unwrap_or(Path::new("/"));
        match std::fs::symlink_metadata(socket) {
            Ok(meta) if meta.file_type().is_socket() => {}
            Ok(meta) => {
                let what = if meta.is_dir() {
                    "a directory"
                } else {
                    "a file that is not a socket"
                };
                return invalid(
                    "control.socket",
                    socket,
                    format!("{what} is in the way; remove it or choose another path"),
                );
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                if let Err(reason) = usable_dir(socket_dir) {
                    return invalid("control.socket", socket, format!("its directory: {reason}"));
                }
            }
            Err(e) => return invalid("control.socket", socket, format!("cannot be checked: {e}")),
        }
        let mut warnings = Vec::new();
        // The host in effect, as `run` will use it; say where it came from when not from here.
        let (host, origin) = match (&self.docker.host, std::env::var("DOCKER_HOST")) {
            (Some(host), _) => (host.clone(), ""),
            (None, Ok(env)) if !env.is_empty() => (env, " (from DOCKER_HOST)"),
            _ => (crate::docker::engine_host(None), " (the default)"),
        };
        let value = format!("{host:?}{origin}");
        let docker_socket = match docker_socket(&host) {
            Ok(socket) => socket,
            Err(reason) => return invalid("docker.host", &format_args!("{value}"), reason),
        };
        if let Some(socket) = docker_socket {
            match std::fs::metadata(&socket) {
                Ok(meta) if meta.file_type().is_socket() => {}
                Ok(_) => {
                    return invalid(
                        "docker.host",
                        &format_args!("{value}"),
                        format!("{} exists but is not a socket", socket.display()),
                    );
                }
                // Docker may be starting (or installed later): the daemon waits for it.
                Err(e) => warnings.push(ConfigWarning {
                    path: path.to_path_buf(),
                    key: "docker.host",
                    value,
                    reason: if e.kind() == std::io::ErrorKind::NotFound {
                        format!(
                            "no socket at {} yet; the daemon will wait for Docker to start",
                            socket.display()
                        )
                    } else {
                        format!("cannot check {}: {e}", socket.display())
                    },
                }),
            }
        }
        Ok(warnings)
    }
}

/// The kernel pseudo-filesystem `path` is under, judged from its text (`..` resolved).
fn pseudo_fs_root(path: &Path) -> Option<&'static str> {
    let mut clean = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    PSEUDO_FS_ROOTS
        .iter()
        .copied()
        .find(|root| clean.starts_with(root))
}

/// The socket path of a `unix://` Docker host (`None` for tcp/http), or why the host
/// cannot work.
fn docker_socket(host: &str) -> Result<Option<PathBuf>, String> {
    if let Some(path) = host.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        if path.as_os_str().as_bytes().contains(&0) {
            return Err("must not contain a NUL byte".to_string());
        }
        if !path.is_absolute() {
            return Err("unix:// must be followed by an absolute socket path".to_string());
        }
        return Ok(Some(path));
    }
    if !(host.starts_with("tcp://") || host.starts_with("http://")) {
        return Err("must start with unix://, tcp:// or http://".to_string());
    }
    match reqwest::Url::parse(host) {
        Ok(url) if url.host_str().is_some_and(|h| !h.is_empty()) => Ok(None),
        Ok(_) => Err("names no host".to_string()),
        Err(e) => Err(format!("not a valid address: {e}")),
    }
}

/// Whether the daemon can have a directory at `dir`: it is one, or the nearest part of the
/// path that exists is a directory it can create it in, and none of it is on a kernel
/// pseudo-filesystem (a symlink into /proc counts).
fn usable_dir(dir: &Path) -> Result<(), String> {
    let existing = dir
        .ancestors()
        .find(|p| std::fs::symlink_metadata(p).is_ok())
        .unwrap_or(Path::new("/"));
    let meta = std::fs::metadata(existing)
        .map_err(|e| format!("cannot check {}: {e}", existing.display()))?;
    if !meta.is_dir() {
        return Err(if existing == dir {
            "exists and is not a directory".to_string()
        } else {
            format!(
                "{} is not a directory, so nothing can be created under it",
                existing.display()
            )
        });
    }
    use nix::sys::statfs::{PROC_SUPER_MAGIC, SYSFS_MAGIC, statfs};
    if let Ok(fs) = statfs(existing)
        && [PROC_SUPER_MAGIC, SYSFS_MAGIC].contains(&fs.filesystem_type())
    {
        return Err(format!(
            "{} is on a kernel pseudo-filesystem: nothing can be kept there",
            existing.display()
        ));
    }
    // Only root's view is the daemon's; an admin checking as themselves may not write here.
    if nix::unistd::geteuid().is_root()
        && nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK)
            == Err(nix::errno::Errno::EROFS)
    {
        return Err(format!(
            "{} is on a read-only filesystem",
            existing.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/immich-guard/config.toml"))
    }

    #[test]
    fn quiet_uploads_take_minutes_or_a_duration_with_its_unit() {
        let c = parse("").unwrap();
        assert_eq!(c.protect.quiet_uploads(), None);
        assert_eq!(
            c.protect.wait_for_quiet_max_minutes.duration().as_secs(),
            3600
        );
        let secs = |text: &str| {
            parse(&format!("[protect]\nwait_for_quiet_uploads = {text}\n"))
                .map(|c| c.protect.quiet_uploads().map(|d| d.as_secs()))
        };
        assert_eq!(secs("10").unwrap(), Some(600));
        assert_eq!(secs("0.5").unwrap(), Some(30));
        assert_eq!(secs("\"30s\"").unwrap(), Some(30));
        assert_eq!(secs("\"10m\"").unwrap(), Some(600));
        assert_eq!(secs("\"1h\"").unwrap(), Some(3600));
        assert_eq!(secs("0").unwrap(), None);
        for bad in ["-1", "\"10 parsecs\"", "\"soon\"", "true"] {
            let e = secs(bad).unwrap_err().to_string();
            assert!(e.contains("wait_for_quiet_uploads"), "{bad}: {e}");
        }
        let e = parse("[protect]\nwait_for_quiet_max_minutes = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("protect.wait_for_quiet_max_minutes"), "{e}");
        // What `check-config` prints reads back as the same value.
        let c =
            parse("[protect]\nwait_for_quiet_uploads = \"90s\"\nwait_for_quiet_max_minutes = 20\n")
                .unwrap();
        let again = parse(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.crash_loop.deaths, 3);
        assert_eq!(c.crash_loop.window_secs, 120);
        assert_eq!(
            c.snapshot_dir(),
            PathBuf::from("/var/lib/immich-guard/snapshots")
        );
    }

    #[test]
    fn example_config_in_repo_parses() {
        let text = include_str!("../config/immich-guard.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.control.socket, PathBuf::from(DEFAULT_SOCKET_PATH));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = parse("[stack]\nprojekt = \"immich\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/immich-guard/config.toml"), "{e}");
        assert!(e.contains("projekt"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let e = parse("[stak]\nproject = \"immich\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("stak"), "{e}");
    }

    #[test]
    fn wrong_type_names_key_and_value() {
        let e = parse("[crash_loop]\nwindow_secs = \"two minutes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("window_secs"), "{e}");
        assert!(e.contains("two minutes"), "{e}");
    }

    #[test]
    fn zero_window_is_refused() {
        let e = parse("[crash_loop]\nwindow_secs = 0\n").unwrap_err();
        assert!(matches!(
            e,
            ConfigError::Invalid {
                key: "crash_loop.window_secs",
                ..
            }
        ));
        let e = e.to_string();
        assert!(e.contains("crash_loop.window_secs = 0"), "{e}");
    }

    #[test]
    fn the_drill_mode_is_one_of_three_and_its_limits_are_checked() {
        assert_eq!(Config::default().snapshots.drill, DrillMode::BeforeRelease);
        let c = parse("[snapshots]\ndrill = \"after-release\"\ndrill_cpus = 0.5\n").unwrap();
        assert_eq!(c.snapshots.drill, DrillMode::AfterRelease);
        assert_eq!(c.snapshots.drill_cpus, 0.5);
        for (toml, names) in [
            ("drill = \"sometimes\"", "before-release"),
            ("drill_cpus = 0.0", "snapshots.drill_cpus"),
            ("drill_memory_mb = 10", "snapshots.drill_memory_mb"),
        ] {
            let e = parse(&format!("[snapshots]\n{toml}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(names), "{toml}: {e}");
        }
    }

    #[test]
    fn relative_snapshot_dir_is_refused() {
        let e = parse("[snapshots]\ndir = \"snapshots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshots.dir"), "{e}");
        assert!(e.contains("\"snapshots\""), "{e}");
        assert!(e.contains("absolute"), "{e}");
    }

    #[test]
    fn bad_docker_host_and_log_level_are_refused() {
        let e = parse("[docker]\nhost = \"/var/run/docker.sock\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("docker.host"), "{e}");
        let e = parse("[daemon]\nlog_level = \"loud=[\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("daemon.log_level"), "{e}");
    }

    #[test]
    fn empty_project_and_zero_port_are_refused() {
        assert!(parse("[stack]\nproject = \" \"\n").is_err());
        assert!(parse("[database]\nport = 0\n").is_err());
        assert!(parse("[database]\nport = 70000\n").is_err());
        assert!(parse("[snapshots]\nkeep_last = 0\n").is_err());
        let e = parse("[snapshots]\nmax_wait_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshots.max_wait_secs"), "{e}");
        let e = parse("[snapshots]\nmax_wait_secs = \"30m\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_wait_secs"), "{e}");
        assert_eq!(Config::default().snapshots.max_wait_secs, 1800);
        let e = parse("[snapshots]\nhash_rate_mb = 100000000\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("snapshots.hash_rate_mb") && e.contains("MB/s"),
            "{e}"
        );
        assert_eq!(
            parse("[snapshots]\nhash_rate_mb = 0\n")
                .unwrap()
                .snapshots
                .hash_rate_mb,
            0
        );
        assert!(parse("[crash_loop]\ndeaths = 1\n").is_err());
        let e = parse("[snapshots]\nexclude = [\"thumbs\", \"library\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshots.exclude = \"library\""), "{e}");
        assert!(parse("[snapshots]\nexclude = [\"thumbs\", \"encoded-video\"]\n").is_ok());
    }

    #[test]
    fn missing_file_is_fine_only_at_the_default_path() {
        let p = Path::new("/nonexistent/immich-guard.toml");
        assert_eq!(Config::load(p, false).unwrap(), Config::default());
        let e = Config::load(p, true).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/immich-guard.toml"), "{e}");
    }

    #[test]
    fn password_is_never_serialized() {
        let c = parse("[database]\npassword = \"hunter2\"\n").unwrap();
        assert_eq!(c.database.password.as_deref(), Some("hunter2"));
        assert!(!serde_json::to_string(&c).unwrap().contains("hunter2"));
    }

    /// The error message for a file that must be refused.
    fn refused(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn notify_keys_are_checked() {
        let e = refused("[notify]\nwebhook_url = \"ftp://x\"\n");
        assert!(e.contains("notify.webhook_url = \"ftp://x\""), "{e}");
        let e = refused("[notify]\nntfy_url = \"https://ntfy.sh\"\n");
        assert!(
            e.contains("notify.ntfy_url and notify.ntfy_topic go together"),
            "{e}"
        );
        let e = refused("[notify]\nntfy_url = \"https://ntfy.sh\"\nntfy_topic = \"a b\"\n");
        assert!(e.contains("notify.ntfy_topic"), "{e}");
        assert!(
            parse("[notify]\nntfy_url = \"https://ntfy.sh\"\nntfy_topic = \"immich\"\n[protect]\nfail_open = true\n")
                .is_ok()
        );
    }

    #[test]
    fn notify_is_off_by_default_with_a_ten_second_timeout() {
        let c = parse("").unwrap();
        assert_eq!(c.notify.webhook_url, None);
        assert_eq!(c.notify.ntfy_url, None);
        assert_eq!(c.notify.timeout_secs, 10);
    }

    #[test]
    fn a_lone_ntfy_topic_names_both_keys() {
        let e = refused("[notify]\nntfy_topic = \"immich\"\n");
        assert!(e.contains("notify.ntfy_topic = \"immich\""), "{e}");
        assert!(e.contains("notify.ntfy_url"), "{e}");
    }

    #[test]
    fn notify_urls_must_parse_and_be_http() {
        for (key, value) in [
            ("webhook_url", "not a url"),
            ("webhook_url", "file:///etc/passwd"),
            ("ntfy_url", "ntfy.sh"),
        ] {
            let text = format!("[notify]\n{key} = \"{value}\"\nntfy_topic = \"t\"\n");
            let e = refused(&text);
            assert!(e.contains(&format!("notify.{key} = \"{value}\"")), "{e}");
            assert!(e.contains("http:// or https://"), "{e}");
        }
        assert!(parse("[notify]\nwebhook_url = \"http://10.0.0.2:8080/hook\"\n").is_ok());
    }

    #[test]
    fn ntfy_topic_is_one_to_sixty_four_safe_characters() {
        let topic = |t: &str| {
            parse(&format!(
                "[notify]\nntfy_url = \"https://ntfy.sh\"\nntfy_topic = \"{t}\"\n"
            ))
        };
        assert!(topic("immich_guard-01").is_ok());
        assert!(topic(&"a".repeat(64)).is_ok());
        for bad in ["", "a/b", "immich?x=1", "ümlaut", &"a".repeat(65)] {
            let e = topic(bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::Invalid {
                        key: "notify.ntfy_topic",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn notify_timeout_is_one_to_a_hundred_and_twenty_seconds() {
        assert!(parse("[notify]\ntimeout_secs = 1\n").is_ok());
        assert!(parse("[notify]\ntimeout_secs = 120\n").is_ok());
        for bad in [0, 121] {
            let e = refused(&format!("[notify]\ntimeout_secs = {bad}\n"));
            assert!(e.contains(&format!("notify.timeout_secs = {bad}")), "{e}");
        }
    }

    #[test]
    fn ntfy_token_is_never_serialized() {
        let c = parse(
            "[notify]\nntfy_url = \"https://ntfy.sh\"\nntfy_topic = \"immich\"\nntfy_token = \"tk_hunter2\"\n",
        )
        .unwrap();
        assert_eq!(c.notify.ntfy_token.as_deref(), Some("tk_hunter2"));
        assert!(!serde_json::to_string(&c).unwrap().contains("tk_hunter2"));
        assert!(!toml::to_string(&c).unwrap().contains("tk_hunter2"));
    }

    #[test]
    fn a_nul_byte_in_any_path_key_is_refused() {
        for (table, key) in [
            ("stack", "compose_dir"),
            ("stack", "env_file"),
            ("stack", "upload_location"),
            ("stack", "db_data_location"),
            ("control", "socket"),
            ("daemon", "data_dir"),
            ("snapshots", "dir"),
        ] {
            let e = refused(&format!("[{table}]\n{key} = \"/srv/a\\u0000b\"\n"));
            assert!(
                e.contains(&format!(
                    "{table}.{key} = \"/srv/a\\0b\": must not contain a NUL byte"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn written_paths_under_proc_or_sys_are_refused() {
        for (table, key, value, root) in [
            ("daemon", "data_dir", "/proc/immich-guard", "/proc"),
            ("daemon", "data_dir", "/sys/fs/immich-guard", "/sys"),
            ("snapshots", "dir", "/var/lib/../../proc/1/x", "/proc"),
            ("control", "socket", "/sys/guard.sock", "/sys"),
        ] {
            let e = refused(&format!("[{table}]\n{key} = {value:?}\n"));
            assert!(e.contains(&format!("{table}.{key} = {value:?}")), "{e}");
            assert!(e.contains(&format!("is under {root}")), "{e}");
        }
        // Only a whole component counts.
        assert!(parse("[daemon]\ndata_dir = \"/process/immich-guard\"\n").is_ok());
        assert!(parse("[daemon]\ndata_dir = \"/system/immich-guard\"\n").is_ok());
    }

    #[test]
    fn socket_path_must_fit_a_unix_socket_address() {
        let long = format!("/run/{}/guard.sock", "x".repeat(100));
        let e = refused(&format!("[control]\nsocket = {long:?}\n"));
        assert!(
            e.contains("control.socket") && e.contains("at most 107"),
            "{e}"
        );
        let fits = format!("/{}", "x".repeat(106));
        assert!(parse(&format!("[control]\nsocket = {fits:?}\n")).is_ok());
        let e = refused("[control]\nsocket = \"/\"\n");
        assert!(
            e.contains("control.socket = \"/\": must name a file"),
            "{e}"
        );
        let e = refused("[control]\ngroup = \"\"\n");
        assert!(e.contains("control.group = \"\""), "{e}");
    }

    #[test]
    fn docker_hosts_that_cannot_work_are_refused() {
        for (host, reason) in [
            (
                "ftp://example",
                "must start with unix://, tcp:// or http://",
            ),
            (
                "ssh://me@example",
                "must start with unix://, tcp:// or http://",
            ),
            ("unix://var/run/docker.sock", "absolute socket path"),
            ("unix://", "absolute socket path"),
            ("tcp://", "names no host"),
        ] {
            let e = refused(&format!("[docker]\nhost = {host:?}\n"));
            assert!(e.contains(&format!("docker.host = {host:?}")), "{e}");
            assert!(e.contains(reason), "{host}: {e}");
        }
        for host in [
            "unix:///var/run/docker.sock",
            "tcp://10.0.0.2:2375",
            "http://docker.lan:2375",
        ] {
            assert!(
                parse(&format!("[docker]\nhost = {host:?}\n")).is_ok(),
                "{host}"
            );
        }
    }

    /// A config whose paths all live in `dir`, with a Docker socket that is really there
    /// (bound in `dir`), so only what a test changes can fail.
    fn local(dir: &Path) -> (Config, std::os::unix::net::UnixListener) {
        let docker = dir.join("docker.sock");
        let listener = std::os::unix::net::UnixListener::bind(&docker).unwrap();
        let mut c = Config::default();
        c.daemon.data_dir = dir.join("data");
        c.control.socket = dir.join("run/guard.sock");
        c.docker.host = Some(format!("unix://{}", docker.display()));
        (c, listener)
    }

    fn environment_error(c: &Config) -> String {
        c.check_environment(Path::new("/etc/immich-guard/config.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_good_local_config_passes_the_environment_check_without_warnings() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _docker) = local(dir.path());
        let warnings = c
            .check_environment(Path::new("/etc/immich-guard/config.toml"))
            .unwrap();
        assert_eq!(warnings, vec![]);
        // Checking creates nothing.
        assert!(!dir.path().join("data").exists());
        assert!(!dir.path().join("run").exists());
    }

    #[test]
    fn a_group_that_does_not_exist_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _docker) = local(dir.path());
        c.control.group = Some("no-such-group-immich-guard".into());
        let e = environment_error(&c);
        assert!(
            e.starts_with("config file /etc/immich-guard/config.toml: control.group = \"no-such-group-immich-guard\": no such group"),
            "{e}"
        );
        c.control.group = Some("root".into());
        assert!(c.check_environment(Path::new("c.toml")).is_ok());
    }

    #[test]
    fn a_directory_or_file_where_the_socket_goes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _docker) = local(dir.path());
        c.control.socket = dir.path().join("sockdir");
        std::fs::create_dir(&c.control.socket).unwrap();
        let e = environment_error(&c);
        assert!(e.contains("control.socket = \""), "{e}");
        assert!(e.contains("a directory is in the way"), "{e}");
        c.control.socket = dir.path().join("plain");
        std::fs::write(&c.control.socket, "").unwrap();
        assert!(environment_error(&c).contains("not a socket"));
        // Its dir cannot be made under a file.
        c.control.socket = dir.path().join("plain/guard.sock");
        let e = environment_error(&c);
        assert!(
            e.contains("control.socket") && e.contains("is not a directory"),
            "{e}"
        );
        // A stale socket is fine: the daemon replaces it.
        c.control.socket = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&c.control.socket).unwrap());
        assert!(c.check_environment(Path::new("c.toml")).is_ok());
    }

    #[test]
    fn data_and_snapshot_dirs_must_be_or_become_directories_off_proc() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _docker) = local(dir.path());
        std::fs::write(dir.path().join("file"), "").unwrap();
        c.daemon.data_dir = dir.path().join("file");
        let e = environment_error(&c);
        assert!(
            e.contains("daemon.data_dir") && e.contains("exists and is not a directory"),
            "{e}"
        );
        c.daemon.data_dir = dir.path().join("file/data");
        let e = environment_error(&c);
        assert!(
            e.contains("daemon.data_dir") && e.contains("is not a directory, so nothing"),
            "{e}"
        );
        // A symlink into /proc is /proc, whatever the path says.
        std::os::unix::fs::symlink("/proc/self", dir.path().join("proc-link")).unwrap();
        c.daemon.data_dir = dir.path().join("proc-link/data");
        let e = environment_error(&c);
        assert!(
            e.contains("daemon.data_dir") && e.contains("kernel pseudo-filesystem"),
            "{e}"
        );
        c.daemon.data_dir = dir.path().join("data");
        c.snapshots.dir = Some(dir.path().join("file/snapshots"));
        let e = environment_error(&c);
        assert!(
            e.contains("snapshots.dir") && e.contains("file/snapshots"),
            "{e}"
        );
        // The default snapshot dir is checked under the key that moves it.
        c.snapshots.dir = None;
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/snapshots"), "").unwrap();
        let e = environment_error(&c);
        assert!(
            e.contains("snapshots.dir") && e.contains("data/snapshots"),
            "{e}"
        );
    }

    #[test]
    fn docker_socket_missing_is_a_warning_and_not_a_socket_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _docker) = local(dir.path());
        let missing = dir.path().join("missing/docker.sock");
        c.docker.host = Some(format!("unix://{}", missing.display()));
        let warnings = c.check_environment(Path::new("c.toml")).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let w = warnings[0].to_string();
        assert!(
            w.starts_with("config file c.toml: docker.host = \"unix://"),
            "{w}"
        );
        assert!(w.contains("will wait for Docker"), "{w}");
        std::fs::write(dir.path().join("docker.txt"), "").unwrap();
        c.docker.host = Some(format!("unix://{}/docker.txt", dir.path().display()));
        let e = environment_error(&c);
        assert!(
            e.contains("docker.host") && e.contains("exists but is not a socket"),
            "{e}"
        );
    }
}
