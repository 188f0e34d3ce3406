//! Watches the compose working dir and says what the compose config now names as Immich's
//! version: `.env` `IMMICH_VERSION` and the server image (interpolated like compose does).
//!
//! The directory is watched, not the files, so an editor that saves by writing a temp file
//! and renaming it over is seen; the parent is watched too, so a directory that is removed
//! and recreated is picked up again. Changes are debounced and compared with the last good
//! view: a change back and forth within the window, or a rewrite with the same content,
//! produces nothing. The daemon has not got the admin's shell environment, so variables are
//! taken from `.env` only (compose would let the shell override them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

const SERVER_IMAGES: &[&str] = &["immich-app/immich-server", "altran1502/immich-server"];
const ML_IMAGES: &[&str] = &[
    "immich-app/immich-machine-learning",
    "altran1502/immich-machine-learning",
];
/// While the dir is missing, look for it again this often.
const MISSING_DIR_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// What the compose config says about Immich, and the files it was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComposeView {
    /// `.env` `IMMICH_VERSION`.
    pub immich_version: Option<String>,
    /// The server service's image, interpolated.
    pub server_image: Option<String>,
    pub ml_image: Option<String>,
    /// Each file with the SHA-256 of its content.
    pub files: Vec<(PathBuf, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ComposeEvent {
    Changed {
        before: ComposeView,
        after: ComposeView,
    },
    /// A file became unreadable or unparseable; the last good view is kept.
    Error(String),
}

/// Reads `.env` (missing is fine) and the compose files (later ones override earlier ones).
pub fn read_view(
    dir: &Path,
    compose_files: &[PathBuf],
    env_file: Option<&Path>,
) -> Result<ComposeView, ComposeError> {
    let env_path = env_file
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join(".env"));
    let mut files = Vec::new();
    let env = match std::fs::read(&env_path) {
        Ok(bytes) => {
            files.push((env_path.clone(), hex(&bytes)));
            crate::discover::read_env_file(&env_path).map_err(|message| ComposeError::Parse {
                path: env_path.clone(),
                message,
            })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
        Err(source) => {
            return Err(ComposeError::Read {
                path: env_path,
                source,
            });
        }
    };
    let mut view = ComposeView {
        immich_version: env.get("IMMICH_VERSION").cloned(),
        server_image: None,
        ml_image: None,
        files: Vec::new(),
    };
    for file in compose_files {
        let path = if file.is_absolute() {
            file.clone()
        } else {
            dir.join(file)
        };
        let bytes = std::fs::read(&path).map_err(|source| ComposeError::Read {
            path: path.clone(),
            source,
        })?;
        files.push((path.clone(), hex(&bytes)));
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_slice(&bytes).map_err(|e| ComposeError::Parse {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let Some(services) = doc.get("services").and_then(|s| s.as_mapping()) else {
            continue;
        };
        for (_, service) in services {
            let Some(image) = service.get("image").and_then(|i| i.as_str()) else {
                continue;
            };
            let image = interpolate(image, &env);
            if SERVER_IMAGES.iter().any(|s| image.contains(s)) {
                view.server_image = Some(image);
            } else if ML_IMAGES.iter().any(|s| image.contains(s)) {
                view.ml_image = Some(image);
            }
        }
    }
    view.files = files;
    Ok(view)
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compose interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
/// `${VAR:?message}` / `${VAR?message}` (as the value, or empty).
pub fn interpolate(text: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let Some(end) = r.find('}') else {
                out.push_str("${");
                rest = r;
                continue;
            };
            let expr = &r[..end];
            rest = &r[end + 1..];
            let name_end = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_end);
            let value = env.get(name);
            let value = match op {
                "" => value.cloned().unwrap_or_default(),
                _ if op.starts_with(":-") => value
                    .filter(|v| !v.is_empty())
                    .cloned()
                    .unwrap_or_else(|| op[2..].to_string()),
                _ if op.starts_with('-') => value.cloned().unwrap_or_else(|| op[1..].to_string()),
                _ => value.cloned().unwrap_or_default(),
            };
            out.push_str(&value);
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if end == 0 {
                out.push('$');
                continue;
            }
            out.push_str(env.get(&rest[..end]).map(String::as_str).unwrap_or(""));
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// Watches until dropped.
pub struct ComposeWatcher {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ComposeWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ComposeWatcher {
    pub fn spawn(
        dir: PathBuf,
        compose_files: Vec<PathBuf>,
        env_file: Option<PathBuf>,
        debounce: Duration,
    ) -> Result<(ComposeWatcher, mpsc::Receiver<ComposeEvent>), ComposeError> {
        let initial = read_view(&dir, &compose_files, env_file.as_deref())?;
        let (raw_tx, raw_rx) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let _ = raw_tx.send(event.is_ok());
            })
            .map_err(|source| ComposeError::Watch {
                path: dir.clone(),
                source,
            })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| ComposeError::Watch {
                path: dir.clone(),
                source,
            })?;
        if let Some(parent) = dir.parent() {
            // Only to see the dir come back after being removed; failure is not fatal.
            let _ = watcher.watch(parent, RecursiveMode::NonRecursive);
        }
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(
            Follow {
                dir,
                compose_files,
                env_file,
                debounce,
                watcher,
                watching_dir: true,
                last_good: initial,
                last_error: None,
                tx,
            }
            .run(raw_rx),
        );
        Ok((ComposeWatcher { task }, rx))
    }
}

struct Follow {
    dir: PathBuf,
    compose_files: Vec<PathBuf>,
    env_file: Option<PathBuf>,
    debounce: Duration,
    watcher: notify::RecommendedWatcher,
    watching_dir: bool,
    last_good: ComposeView,
    last_error: Option<String>,
    tx: mpsc::Sender<ComposeEvent>,
}

impl Follow {
    async fn run(mut self, mut raw: mpsc::UnboundedReceiver<bool>) {
        loop {
            // Wait for something to happen (or, while the dir is missing, poll for it).
            let poll = if self.watching_dir {
                Duration::from_secs(3600)
            } else {
                MISSING_DIR_POLL
            };
            if let Ok(None) = tokio::time::timeout(poll, raw.recv()).await {
                return;
            }
            // Quiet for a whole window before reading: editors write in bursts.
            loop {
                match tokio::time::timeout(self.debounce, raw.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            self.rearm();
            // A missing dir reads as an error (said once), then as a change when it is back.
            self.reread().await;
        }
    }

    /// inotify drops the watch with the dir; add it again once the dir is back.
    fn rearm(&mut self) {
        let exists = self.dir.is_dir();
        if !exists {
            if self.watching_dir {
                tracing::warn!(dir = %self.dir.display(), "the compose dir is gone; waiting for it to come back");
            }
            let _ = self.watcher.unwatch(&self.dir);
            self.watching_dir = false;
        } else if !self.watching_dir {
            self.watching_dir = self
                .watcher
                .watch(&self.dir, RecursiveMode::NonRecursive)
                .is_ok();
            tracing::info!(dir = %self.dir.display(), "the compose dir is back");
        }
    }

    async fn reread(&mut self) {
        match read_view(&self.dir, &self.compose_files, self.env_file.as_deref()) {
            Ok(view) => {
                self.last_error = None;
                if view != self.last_good {
                    let before = std::mem::replace(&mut self.last_good, view.clone());
                    let _ = self
                        .tx
                        .send(ComposeEvent::Changed {
                            before,
                            after: view,
                        })
                        .await;
                }
            }
            Err(e) => {
                let message = e.to_string();
                if self.last_error.as_deref() != Some(&message) {
                    self.last_error = Some(message.clone());
                    let _ = self.tx.send(ComposeEvent::Error(message)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const COMPOSE: &str = r#"
name: immich
services:
  immich-server:
    container_name: immich_server
    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}
    volumes:
      - ${UPLOAD_LOCATION}:/data
    env_file:
      - .env
    restart: always
  immich-machine-learning:
    image: ghcr.io/immich-app/immich-machine-learning:${IMMICH_VERSION:-release}
  redis:
    image: docker.io/valkey/valkey:8-bookworm
  database:
    image: ghcr.io/immich-app/postgres:14-vectorchord0.4.3-pgvectors0.2.0
"#;

    fn stack(version: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("immich");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("docker-compose.yml"), COMPOSE).unwrap();
        write_env(&dir, version);
        root
    }

    fn write_env(dir: &Path, version: &str) {
        fs::write(
            dir.join(".env"),
            format!("UPLOAD_LOCATION=./library\nIMMICH_VERSION={version}\nDB_PASSWORD=postgres\n"),
        )
        .unwrap();
    }

    fn watch(root: &Path) -> (ComposeWatcher, mpsc::Receiver<ComposeEvent>) {
        let dir = root.join("immich");
        ComposeWatcher::spawn(
            dir.clone(),
            vec![dir.join("docker-compose.yml")],
            None,
            Duration::from_millis(300),
        )
        .unwrap()
    }

    async fn next(rx: &mut mpsc::Receiver<ComposeEvent>) -> ComposeEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event within 5 s")
            .unwrap()
    }

    async fn none(rx: &mut mpsc::Receiver<ComposeEvent>) {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await {
            panic!("unexpected event {e:?}");
        }
    }

    fn versions(e: &ComposeEvent) -> (Option<String>, Option<String>) {
        match e {
            ComposeEvent::Changed { before, after } => {
                (before.immich_version.clone(), after.immich_version.clone())
            }
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn interpolation_follows_compose() {
        let env: HashMap<String, String> = [("A", "1"), ("EMPTY", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(interpolate("x:${A}", &env), "x:1");
        assert_eq!(interpolate("x:$A/y", &env), "x:1/y");
        assert_eq!(interpolate("${B:-dflt}", &env), "dflt");
        assert_eq!(interpolate("${EMPTY:-dflt}", &env), "dflt");
        assert_eq!(interpolate("${EMPTY-dflt}", &env), "");
        assert_eq!(interpolate("${B-dflt}", &env), "dflt");
        assert_eq!(interpolate("$$A costs $$5", &env), "$A costs $5");
        assert_eq!(interpolate("${B:?must be set}", &env), "");
    }

    #[test]
    fn the_view_names_version_and_images() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let view = read_view(&dir, &[dir.join("docker-compose.yml")], None).unwrap();
        assert_eq!(view.immich_version.as_deref(), Some("v1.119.0"));
        assert_eq!(
            view.server_image.as_deref(),
            Some("ghcr.io/immich-app/immich-server:v1.119.0")
        );
        assert_eq!(
            view.ml_image.as_deref(),
            Some("ghcr.io/immich-app/immich-machine-learning:v1.119.0")
        );
        assert_eq!(view.files.len(), 2);
    }

    #[tokio::test]
    async fn a_version_bump_and_a_rename_over_save_are_each_one_change() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        write_env(&dir, "v1.120.0");
        assert_eq!(
            versions(&next(&mut rx).await),
            (Some("v1.119.0".into()), Some("v1.120.0".into()))
        );
        // vim / sed -i: a temp file renamed over the original.
        fs::write(
            dir.join(".env.tmp"),
            "UPLOAD_LOCATION=./library\nIMMICH_VERSION=v1.121.0\n",
        )
        .unwrap();
        fs::rename(dir.join(".env.tmp"), dir.join(".env")).unwrap();
        assert_eq!(
            versions(&next(&mut rx).await),
            (Some("v1.120.0".into()), Some("v1.121.0".into()))
        );
    }

    #[tokio::test]
    async fn back_and_forth_and_identical_rewrites_give_nothing() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        write_env(&dir, "v1.120.0");
        write_env(&dir, "v1.119.0");
        none(&mut rx).await;
        write_env(&dir, "v1.119.0");
        none(&mut rx).await;
    }

    #[tokio::test]
    async fn a_compose_image_change_is_seen() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        fs::write(
            dir.join("docker-compose.yml"),
            COMPOSE.replace(
                "immich-server:${IMMICH_VERSION:-release}",
                "immich-server:v1.122.0",
            ),
        )
        .unwrap();
        match next(&mut rx).await {
            ComposeEvent::Changed { before, after } => {
                assert_eq!(
                    before.server_image.as_deref(),
                    Some("ghcr.io/immich-app/immich-server:v1.119.0")
                );
                assert_eq!(
                    after.server_image.as_deref(),
                    Some("ghcr.io/immich-app/immich-server:v1.122.0")
                );
                assert_eq!(after.immich_version, before.immich_version);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_yaml_is_an_error_naming_the_file_then_a_fix_is_a_change() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        fs::write(
            dir.join("docker-compose.yml"),
            "services:\n  a: [unclosed\n",
        )
        .unwrap();
        match next(&mut rx).await {
            ComposeEvent::Error(m) => {
                assert!(m.contains("docker-compose.yml"), "{m}");
                assert!(m.contains("line"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        fs::write(
            dir.join("docker-compose.yml"),
            COMPOSE.replace("${IMMICH_VERSION:-release}", "v1.123.0"),
        )
        .unwrap();
        assert!(matches!(next(&mut rx).await, ComposeEvent::Changed { .. }));
    }

    #[tokio::test]
    async fn a_recreated_dir_is_watched_again() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        fs::remove_dir_all(&dir).unwrap();
        // Reading a missing dir is an error (compose file gone); then it comes back.
        assert!(matches!(next(&mut rx).await, ComposeEvent::Error(_)));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("docker-compose.yml"), COMPOSE).unwrap();
        write_env(&dir, "v1.124.0");
        let mut last = None;
        for _ in 0..3 {
            match next(&mut rx).await {
                ComposeEvent::Changed { after, .. } => {
                    last = after.immich_version;
                    break;
                }
                ComposeEvent::Error(_) => continue,
            }
        }
        assert_eq!(last.as_deref(), Some("v1.124.0"));
        write_env(&dir, "v1.125.0");
        assert_eq!(
            versions(&next(&mut rx).await).1.as_deref(),
            Some("v1.125.0")
        );
    }
}
