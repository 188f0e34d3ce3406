//! The TOML configuration. Every key is optional: discovery fills in what it can, the config
//! only overrides what discovery cannot know. A bad file is refused as a whole, before the
//! daemon starts anything, with an error that names the file, the key and the value.

use std::fmt;
use std::path::{Path, PathBuf};

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

/// Passive protection (DESIGN.md §4).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtectConfig {
    /// Let a frozen server go when its snapshot fails, instead of holding it (default: hold).
    pub fail_open: bool,
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
}

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
            if let Some(p) = value
                && !p.is_absolute()
            {
                return invalid(
                    key,
                    p,
                    "must be an absolute path (the daemon's working dir is not yours)",
                );
            }
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
            && !(host.starts_with("unix://")
                || host.starts_with("tcp://")
                || host.starts_with("http://"))
        {
            return invalid(
                "docker.host",
                host,
                "must start with unix://, tcp:// or http://",
            );
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
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.daemon.log_level) {
            return invalid("daemon.log_level", &self.daemon.log_level, &e.to_string());
        }
        if self.snapshots.keep_last == 0 {
            return invalid(
                "snapshots.keep_last",
                &0,
                "must be at least 1: the newest sealed snapshot is never deleted",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/immich-guard/config.toml"))
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
}
