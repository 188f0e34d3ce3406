//! Watches the compose working dir and says what the compose config now names as Immich's
//! version: `.env` `IMMICH_VERSION` and the server and ML images, interpolated like compose does.
//! It only reads: it never writes the compose dir, and never reports a change that isn't one.
//!
//! The daemon has not got the admin's shell environment, so `${VAR}` is filled from `.env` only;
//! compose would let a variable exported in the admin's shell override `.env`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

/// Long enough for an editor's write-temp-then-rename, short enough that the admin's
/// `docker compose up` right after saving still finds us decided.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(500);

/// Last path segment of the image repository of the services we report: matches
/// `ghcr.io/immich-app/…`, `altran1502/…`, mirrors and self-built images alike, as discovery
/// does (README.md "How it finds the stack"), so a stack discovery found is one we can describe.
pub(crate) const SERVER_IMAGE: &str = "immich-server";
pub(crate) const ML_IMAGE: &str = "immich-machine-learning";

/// inotify cannot watch a dir that is not there (and its parent may be gone too), so while
/// the dir is missing we look for it this often.
const MISSING_DIR_POLL: Duration = Duration::from_secs(2);

/// A file that never stops changing is still read, after this many debounce windows.
const MAX_SETTLE_WINDOWS: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// YAML errors carry "at line L column C" in `message`.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: service {service}: image: {message}")]
    Interpolate {
        path: PathBuf,
        service: String,
        message: String,
    },
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// What the compose config says about Immich, and the files it was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComposeView {
    /// `.env` `IMMICH_VERSION`; None when unset or empty (compose then uses the image default).
    pub immich_version: Option<String>,
    /// The server service's image, interpolated.
    pub server_image: Option<String>,
    pub ml_image: Option<String>,
    /// Each file read, with the hex SHA-256 of its content, so a view changes when any byte does.
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

/// Reads `.env` (missing is fine) and the compose files, later files overriding a service's
/// image as compose merges them. Relative paths are taken from `dir`.
pub fn read_view(
    dir: &Path,
    compose_files: &[PathBuf],
    env_file: Option<&Path>,
) -> Result<ComposeView, ComposeError> {
    let env_path = dir.join(env_file.unwrap_or(Path::new(".env")));
    let mut files = Vec::new();
    let env = match std::fs::read(&env_path) {
        Ok(bytes) => {
            // Parsed from the bytes we hash, so the hash and the values always agree.
            let env = parse_env(&env_path, &bytes)?;
            files.push((env_path, sha256_hex(&bytes)));
            env
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
        Err(source) => {
            return Err(ComposeError::Read {
                path: env_path,
                source,
            });
        }
    };

    // (service, image) in order of first appearance; a later file replaces the image.
    let mut images: Vec<(String, String)> = Vec::new();
    for file in compose_files {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|source| ComposeError::Read {
            path: path.clone(),
            source,
        })?;
        files.push((path.clone(), sha256_hex(&bytes)));
        let parse_error = |e: yaml_serde::Error| ComposeError::Parse {
            path: path.clone(),
            message: e.to_string(),
        };
        let mut doc: yaml_serde::Value = yaml_serde::from_slice(&bytes).map_err(parse_error)?;
        // Admins share settings between services with anchors and `<<: *x`.
        doc.apply_merge().map_err(parse_error)?;
        let Some(services) = doc.get("services").and_then(|s| s.as_mapping()) else {
            continue;
        };
        for (name, service) in services {
            let (Some(name), Some(image)) =
                (name.as_str(), service.get("image").and_then(|i| i.as_str()))
            else {
                continue;
            };
            let image = interpolate(image, &env).map_err(|message| ComposeError::Interpolate {
                path: path.clone(),
                service: name.to_string(),
                message,
            })?;
            match images.iter_mut().find(|(n, _)| n == name) {
                Some((_, old)) => *old = image,
                None => images.push((name.to_string(), image)),
            }
        }
    }

    let find = |name: &str| {
        images
            .iter()
            .find(|(_, image)| is_image_of(image, name))
            .map(|(_, image)| image.clone())
    };
    Ok(ComposeView {
        immich_version: env.get("IMMICH_VERSION").filter(|v| !v.is_empty()).cloned(),
        server_image: find(SERVER_IMAGE),
        ml_image: find(ML_IMAGE),
        files,
    })
}

pub(crate) fn parse_env(
    path: &Path,
    bytes: &[u8],
) -> Result<HashMap<String, String>, ComposeError> {
    dotenvy::from_read_iter(bytes)
        .map(|item| {
            item.map_err(|e| ComposeError::Parse {
                path: path.to_path_buf(),
                message: crate::redact::env_error(&e),
            })
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `ghcr.io/immich-app/immich-server:v1.2@sha256:…` is an `immich-server` image;
/// `immich-app/immich-server-fork` is not.
pub(crate) fn is_image_of(image: &str, name: &str) -> bool {
    let no_digest = image.split('@').next().unwrap_or(image);
    let repo = match no_digest.rfind(':') {
        // A colon after the last slash is the tag; before it, a registry port.
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    };
    repo.rsplit('/').next() == Some(name)
}

/// Compose's interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
/// `${VAR:?message}`, `${VAR?message}`, `${VAR:+replacement}`, `${VAR+replacement}`, with
/// defaults that may themselves hold `${…}`. Errors are what compose would refuse to run with.
pub(crate) fn interpolate(text: &str, env: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = closing_brace(r).ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
            out.push_str(&braced(&r[..end], env)?);
            rest = &r[end + 1..];
        } else {
            let n = name_len(after);
            if n == 0 {
                return Err(format!(
                    "invalid interpolation in {text:?}: write $$ for a literal $"
                ));
            }
            out.push_str(env.get(&after[..n]).map_or("", String::as_str));
            rest = &after[n..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The inside of `${…}`.
fn braced(expr: &str, env: &HashMap<String, String>) -> Result<String, String> {
    let n = name_len(expr);
    if n == 0 {
        return Err(format!("invalid interpolation ${{{expr}}}"));
    }
    let (name, rest) = expr.split_at(n);
    let (op, word) = if rest.is_empty() {
        ("", "")
    } else {
        [":-", ":?", ":+", "-", "?", "+"]
            .into_iter()
            .find_map(|op| rest.strip_prefix(op).map(|word| (op, word)))
            .ok_or_else(|| format!("invalid interpolation ${{{expr}}}"))?
    };
    let value = env.get(name);
    let set_non_empty = value.filter(|v| !v.is_empty());
    // The word after the operator is only interpolated when it is used, as in compose.
    let used = || interpolate(word, env);
    let missing = || {
        Err(if word.is_empty() {
            format!("required variable {name} is missing a value")
        } else {
            format!("required variable {name} is missing a value: {word}")
        })
    };
    match op {
        ":-" => set_non_empty.map_or_else(used, |v| Ok(v.clone())),
        "-" => value.map_or_else(used, |v| Ok(v.clone())),
        ":?" => set_non_empty.map_or_else(missing, |v| Ok(v.clone())),
        "?" => value.map_or_else(missing, |v| Ok(v.clone())),
        ":+" => set_non_empty.map_or_else(|| Ok(String::new()), |_| used()),
        "+" => value.map_or_else(|| Ok(String::new()), |_| used()),
        _ => Ok(value.cloned().unwrap_or_default()),
    }
}

/// Length of a leading variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn name_len(s: &str) -> usize {
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, c)) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return 0,
    }
    chars
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
        .map_or(s.len(), |(i, _)| i)
}

/// Index of the `}` closing a `${` whose inside starts `s`, allowing nested `${…}`.
fn closing_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Watches until dropped. The directory is watched, not the files, so an editor that saves by
/// writing a temp file and renaming it over (vim, `sed -i`) is seen; the parent is watched too,
/// so a dir that is removed and recreated, or replaced by another, is watched again.
pub struct ComposeWatcher {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ComposeWatcher {
    fn drop(&mut self) {
        // The task owns the inotify watcher; dropping it there removes the watches.
        self.task.abort();
    }
}

impl ComposeWatcher {
    /// Starts watching; the first `Changed` is relative to the view read here.
    ///
    /// # Panics
    /// Outside a Tokio runtime, like `tokio::spawn`.
    pub fn spawn(
        dir: PathBuf,
        compose_files: Vec<PathBuf>,
        env_file: Option<PathBuf>,
        debounce: Duration,
    ) -> Result<(ComposeWatcher, mpsc::Receiver<ComposeEvent>), ComposeError> {
        let env_path = dir.join(env_file.as_deref().unwrap_or(Path::new(".env")));
        let names: Vec<OsString> = compose_files
            .iter()
            .map(|f| dir.join(f))
            .chain([env_path, dir.clone()])
            .filter_map(|p| p.file_name().map(OsString::from))
            .collect();
        let wake = Arc::new(Notify::new());
        let mut watcher = notify::recommended_watcher({
            let wake = wake.clone();
            move |event: notify::Result<notify::Event>| {
                if wakes_us(&event, &names) {
                    // Stores at most one permit: a burst of events is one wake-up.
                    wake.notify_one();
                }
            }
        })
        .map_err(|source| ComposeError::Watch {
            path: dir.clone(),
            source,
        })?;
        // Identity first, then the watch: if the dir is swapped in between, the next event
        // finds the identities differ and re-arms (the other order could miss that).
        let watched = dir_id(&dir);
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| ComposeError::Watch {
                path: dir.clone(),
                source,
            })?;
        if let Some(parent) = dir.parent() {
            // Only to see the dir come and go; without it the missing-dir poll still would.
            let _ = watcher.watch(parent, RecursiveMode::NonRecursive);
        }
        // Read after the watch is set, so a save in between is not lost.
        let last_good = read_view(&dir, &compose_files, env_file.as_deref())?;
        let (tx, rx) = mpsc::channel(16);
        let follow = Follow {
            dir,
            compose_files,
            env_file,
            debounce,
            watcher,
            watched,
            last_good,
            last_error: None,
            tx,
        };
        let task = tokio::spawn(follow.run(wake));
        Ok((ComposeWatcher { task }, rx))
    }
}

/// Whether an inotify event can change the view. Opens and reads cannot, and must not wake
/// us: our own reads would otherwise wake us again, for ever.
fn wakes_us(event: &notify::Result<notify::Event>, names: &[OsString]) -> bool {
    let Ok(event) = event else {
        return true;
    };
    if event.need_rescan() || event.paths.is_empty() {
        return true;
    }
    if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
    {
        return false;
    }
    // By name, not full path: the dir may be spelled differently (symlinks) than the files.
    event
        .paths
        .iter()
        .any(|p| p.file_name().is_some_and(|n| names.iter().any(|m| m == n)))
}

/// (device, inode) of a directory: a recreated or replaced dir has another one.
type DirId = (u64, u64);

fn dir_id(path: &Path) -> Option<DirId> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

struct Follow {
    dir: PathBuf,
    compose_files: Vec<PathBuf>,
    env_file: Option<PathBuf>,
    debounce: Duration,
    watcher: RecommendedWatcher,
    /// The dir the inotify watch is on; None while the dir is missing.
    watched: Option<DirId>,
    last_good: ComposeView,
    last_error: Option<String>,
    tx: mpsc::Sender<ComposeEvent>,
}

impl Follow {
    async fn run(mut self, wake: Arc<Notify>) {
        loop {
            if self.watched.is_some() {
                wake.notified().await;
            } else {
                let _ = tokio::time::timeout(MISSING_DIR_POLL, wake.notified()).await;
            }
            self.settle(&wake).await;
            self.rearm();
            if !self.reread().await {
                return;
            }
        }
    }

    /// Waits for a whole quiet window: editors and `git checkout` write in bursts.
    async fn settle(&self, wake: &Notify) {
        let give_up = Instant::now() + self.debounce * MAX_SETTLE_WINDOWS;
        while tokio::time::timeout(self.debounce, wake.notified())
            .await
            .is_ok()
        {
            if Instant::now() >= give_up {
                return;
            }
        }
    }

    /// inotify watches an inode, not a path: when the dir is removed the watch dies with it,
    /// and when it is renamed away the watch follows it. Point the watch at whatever is at the
    /// path now.
    fn rearm(&mut self) {
        let now = dir_id(&self.dir);
        if now == self.watched {
            return;
        }
        if self.watched.take().is_some() {
            // Fails when the kernel already dropped the watch; either way it is gone.
            let _ = self.watcher.unwatch(&self.dir);
        }
        if now.is_none() {
            tracing::warn!(dir = %self.dir.display(), "the compose dir is gone; waiting for it to come back");
        } else if let Err(e) = self.watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
            // Left unwatched: the missing-dir poll tries again.
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the compose dir");
        } else {
            self.watched = now;
        }
        if let Some(parent) = self.dir.parent() {
            // In case the parent was replaced too; on the same parent this changes nothing.
            let _ = self.watcher.watch(parent, RecursiveMode::NonRecursive);
        }
    }

    /// Returns false once nobody listens.
    async fn reread(&mut self) -> bool {
        let read = if dir_id(&self.dir).is_none() {
            Err(format!(
                "the compose dir {} is gone; keeping the last view until it is back",
                self.dir.display()
            ))
        } else {
            read_view(&self.dir, &self.compose_files, self.env_file.as_deref())
                .map_err(|e| e.to_string())
        };
        let event = match read {
            Ok(view) => {
                self.last_error = None;
                if view == self.last_good {
                    return !self.tx.is_closed();
                }
                let before = std::mem::replace(&mut self.last_good, view.clone());
                ComposeEvent::Changed {
                    before,
                    after: view,
                }
            }
            Err(message) => {
                // Said once, not on every poll while it lasts.
                if self.last_error.as_ref() == Some(&message) {
                    return !self.tx.is_closed();
                }
                self.last_error = Some(message.clone());
                ComposeEvent::Error(message)
            }
        };
        self.tx.send(event).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Immich's own docker-compose.yml (v1.1xx), trimmed of comments.
    const COMPOSE: &str = r#"
name: immich

services:
  immich-server:
    container_name: immich_server
    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}
    # extends:
    #   file: hwaccel.transcoding.yml
    #   service: cpu
    volumes:
      - ${UPLOAD_LOCATION}:/usr/src/app/upload
      - /etc/localtime:/etc/localtime:ro
    env_file:
      - .env
    ports:
      - '2283:2283'
    depends_on:
      - redis
      - database
    restart: always
    healthcheck:
      disable: false

  immich-machine-learning:
    container_name: immich_machine_learning
    image: ghcr.io/immich-app/immich-machine-learning:${IMMICH_VERSION:-release}
    volumes:
      - model-cache:/cache
    env_file:
      - .env
    restart: always
    healthcheck:
      disable: false

  redis:
    container_name: immich_redis
    image: docker.io/valkey/valkey:8-bookworm@sha256:ff21bc0f8194dc9c105b769aeabf9585fea6a8ed649c0781caeac5cb3c247884
    healthcheck:
      test: redis-cli ping || exit 1
    restart: always

  database:
    container_name: immich_postgres
    image: ghcr.io/immich-app/postgres:14-vectorchord0.4.3-pgvectors0.2.0
    environment:
      POSTGRES_PASSWORD: ${DB_PASSWORD}
      POSTGRES_USER: ${DB_USERNAME}
      POSTGRES_DB: ${DB_DATABASE_NAME}
      POSTGRES_INITDB_ARGS: '--data-checksums'
    volumes:
      - ${DB_DATA_LOCATION}:/var/lib/postgresql/data
    restart: always

volumes:
  model-cache:
"#;

    fn stack(version: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("immich");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("docker-compose.yml"), COMPOSE).unwrap();
        write_env(&dir, version);
        root
    }

    fn env_text(version: &str) -> String {
        format!(
            "UPLOAD_LOCATION=./library\nDB_DATA_LOCATION=./postgres\nIMMICH_VERSION={version}\n\
             DB_PASSWORD=postgres\nDB_USERNAME=postgres\nDB_DATABASE_NAME=immich\n"
        )
    }

    fn write_env(dir: &Path, version: &str) {
        fs::write(dir.join(".env"), env_text(version)).unwrap();
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
            .expect("the watcher is still running")
    }

    async fn nothing(rx: &mut mpsc::Receiver<ComposeEvent>) {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await {
            panic!("unexpected event {e:?}");
        }
    }

    fn versions(e: &ComposeEvent) -> (Option<&str>, Option<&str>) {
        match e {
            ComposeEvent::Changed { before, after } => (
                before.immich_version.as_deref(),
                after.immich_version.as_deref(),
            ),
            other => panic!("expected a change, got {other:?}"),
        }
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn interpolation_follows_compose() {
        let env = env(&[("A", "1"), ("EMPTY", "")]);
        let i = |t: &str| interpolate(t, &env);
        assert_eq!(i("x:${A}").unwrap(), "x:1");
        assert_eq!(i("x:$A/y").unwrap(), "x:1/y");
        assert_eq!(i("x:${B}$B").unwrap(), "x:");
        assert_eq!(i("${B:-dflt}").unwrap(), "dflt");
        assert_eq!(i("${EMPTY:-dflt}").unwrap(), "dflt");
        assert_eq!(i("${A:-dflt}").unwrap(), "1");
        assert_eq!(i("${B-dflt}").unwrap(), "dflt");
        assert_eq!(i("${EMPTY-dflt}").unwrap(), "");
        assert_eq!(i("${B:-${A}-x}").unwrap(), "1-x");
        assert_eq!(
            i("${A:+set}|${EMPTY:+set}|${EMPTY+set}|${B+set}").unwrap(),
            "set||set|"
        );
        assert_eq!(i("${A:?must be set}").unwrap(), "1");
        assert_eq!(i("${EMPTY?must be set}").unwrap(), "");
    }

    #[test]
    fn dollar_dollar_is_a_literal_dollar() {
        let env = env(&[("A", "1")]);
        assert_eq!(interpolate("$$A costs $$5", &env).unwrap(), "$A costs $5");
        assert_eq!(interpolate("$${A}", &env).unwrap(), "${A}");
        assert_eq!(interpolate("$$$A", &env).unwrap(), "$1");
    }

    #[test]
    fn interpolation_refuses_what_compose_refuses() {
        let env = env(&[("EMPTY", "")]);
        let err = interpolate("${EMPTY:?set IMMICH_VERSION}", &env).unwrap_err();
        assert!(
            err.contains("EMPTY") && err.contains("set IMMICH_VERSION"),
            "{err}"
        );
        assert!(interpolate("${B?}", &env).is_err());
        assert!(interpolate("${A", &env).is_err());
        assert!(interpolate("cost: 5$", &env).is_err());
        assert!(interpolate("${A:x}", &env).is_err());
    }

    #[test]
    fn the_view_names_version_and_images() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let view = read_view(&dir, &[PathBuf::from("docker-compose.yml")], None).unwrap();
        assert_eq!(view.immich_version.as_deref(), Some("v1.119.0"));
        assert_eq!(
            view.server_image.as_deref(),
            Some("ghcr.io/immich-app/immich-server:v1.119.0")
        );
        assert_eq!(
            view.ml_image.as_deref(),
            Some("ghcr.io/immich-app/immich-machine-learning:v1.119.0")
        );
        let names: Vec<_> = view.files.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(names, [dir.join(".env"), dir.join("docker-compose.yml")]);
    }

    #[test]
    fn without_env_the_images_fall_back_to_release() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        fs::remove_file(dir.join(".env")).unwrap();
        let view = read_view(&dir, &[dir.join("docker-compose.yml")], None).unwrap();
        assert_eq!(view.immich_version, None);
        assert_eq!(
            view.server_image.as_deref(),
            Some("ghcr.io/immich-app/immich-server:release")
        );
        assert_eq!(view.files.len(), 1);
    }

    #[test]
    fn an_override_file_and_merge_keys_are_applied() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        fs::write(
            dir.join("docker-compose.override.yml"),
            "x-immich: &immich\n  image: altran1502/immich-server:${IMMICH_VERSION}-custom\n\
             services:\n  immich-server:\n    <<: *immich\n",
        )
        .unwrap();
        let files = [
            PathBuf::from("docker-compose.yml"),
            PathBuf::from("docker-compose.override.yml"),
        ];
        let view = read_view(&dir, &files, None).unwrap();
        assert_eq!(
            view.server_image.as_deref(),
            Some("altran1502/immich-server:v1.119.0-custom")
        );
    }

    #[test]
    fn only_immich_repositories_count() {
        let server = SERVER_IMAGE;
        assert!(is_image_of(
            "ghcr.io/immich-app/immich-server:v1.2.3",
            server
        ));
        assert!(is_image_of("altran1502/immich-server", server));
        assert!(is_image_of("mirror.local:5000/immich-server", server));
        assert!(is_image_of(
            "mirror.local:5000/immich-app/immich-server:v1@sha256:abc",
            server
        ));
        assert!(!is_image_of("mirror.local:5000/other", server));
        assert!(!is_image_of(
            "ghcr.io/immich-app/immich-server-fork:v1",
            server
        ));
        assert!(!is_image_of(
            "ghcr.io/immich-app/immich-machine-learning:v1",
            server
        ));
        assert!(is_image_of(
            "ghcr.io/immich-app/immich-machine-learning:v1-cuda",
            ML_IMAGE
        ));
    }

    #[test]
    fn a_bad_env_line_names_the_env_file() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        fs::write(dir.join(".env"), "IMMICH_VERSION=v1\nnot a line\n").unwrap();
        let err = read_view(&dir, &[dir.join("docker-compose.yml")], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(".env"), "{err}");
    }

    #[tokio::test]
    async fn a_version_bump_in_env_is_one_change() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        write_env(&dir, "v1.120.0");
        assert_eq!(
            versions(&next(&mut rx).await),
            (Some("v1.119.0"), Some("v1.120.0"))
        );
        nothing(&mut rx).await;
    }

    #[tokio::test]
    async fn a_rename_over_save_is_seen() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        // vim / sed -i: a temp file renamed over the original.
        fs::write(dir.join(".env.tmp"), env_text("v1.121.0")).unwrap();
        fs::rename(dir.join(".env.tmp"), dir.join(".env")).unwrap();
        assert_eq!(
            versions(&next(&mut rx).await),
            (Some("v1.119.0"), Some("v1.121.0"))
        );
    }

    #[tokio::test]
    async fn back_and_forth_within_the_window_gives_nothing() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        write_env(&dir, "v1.120.0");
        write_env(&dir, "v1.119.0");
        nothing(&mut rx).await;
    }

    #[tokio::test]
    async fn rewriting_identical_content_gives_nothing() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        write_env(&dir, "v1.119.0");
        fs::write(dir.join("docker-compose.yml"), COMPOSE).unwrap();
        nothing(&mut rx).await;
    }

    #[tokio::test]
    async fn a_hard_coded_compose_tag_is_seen() {
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
                assert_eq!(after.ml_image, before.ml_image);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_yaml_is_an_error_naming_file_and_line_then_a_fix_is_a_change() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        fs::write(
            dir.join("docker-compose.yml"),
            "services:\n  immich-server:\n    image: [unclosed\n",
        )
        .unwrap();
        match next(&mut rx).await {
            ComposeEvent::Error(m) => {
                assert!(m.contains("docker-compose.yml"), "{m}");
                assert!(m.contains("line 4"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        fs::write(
            dir.join("docker-compose.yml"),
            COMPOSE.replace("${IMMICH_VERSION:-release}", "v1.123.0"),
        )
        .unwrap();
        match next(&mut rx).await {
            ComposeEvent::Changed { before, after } => {
                // Against the last good view, not the broken one.
                assert!(before.server_image.unwrap().ends_with(":v1.119.0"));
                assert!(after.server_image.unwrap().ends_with(":v1.123.0"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_removed_and_recreated_dir_is_watched_again() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        fs::remove_dir_all(&dir).unwrap();
        match next(&mut rx).await {
            ComposeEvent::Error(m) => assert!(m.contains("is gone"), "{m}"),
            other => panic!("{other:?}"),
        }
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("docker-compose.yml"), COMPOSE).unwrap();
        write_env(&dir, "v1.124.0");
        assert_eq!(
            versions(&next(&mut rx).await),
            (Some("v1.119.0"), Some("v1.124.0"))
        );
        write_env(&dir, "v1.125.0");
        assert_eq!(
            versions(&next(&mut rx).await),
            (Some("v1.124.0"), Some("v1.125.0"))
        );
    }

    #[tokio::test]
    async fn a_dir_replaced_within_the_window_is_watched_again() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        // Restoring from a backup: the new dir is put in place before we look.
        let staged = root.path().join("immich.restore");
        fs::create_dir(&staged).unwrap();
        fs::write(staged.join("docker-compose.yml"), COMPOSE).unwrap();
        write_env(&staged, "v1.119.0");
        fs::rename(&dir, root.path().join("immich.old")).unwrap();
        fs::rename(&staged, &dir).unwrap();
        nothing(&mut rx).await;
        write_env(&dir, "v1.126.0");
        assert_eq!(
            versions(&next(&mut rx).await),
            (Some("v1.119.0"), Some("v1.126.0"))
        );
        // The old dir, renamed away, is no longer what we follow.
        write_env(&root.path().join("immich.old"), "v9.9.9");
        nothing(&mut rx).await;
    }

    #[tokio::test]
    async fn reading_the_config_does_not_wake_the_watcher_again() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let (_w, mut rx) = watch(root.path());
        write_env(&dir, "v1.120.0");
        next(&mut rx).await;
        // An independent inotify watch: once settled, nobody should be opening the files.
        let (tx, mut opens) = mpsc::unbounded_channel();
        let mut spy = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            if let Ok(e) = e
                && matches!(e.kind, EventKind::Access(AccessKind::Open(_)))
            {
                let _ = tx.send(e.paths);
            }
        })
        .unwrap();
        spy.watch(&dir, RecursiveMode::NonRecursive).unwrap();
        let opened = tokio::time::timeout(Duration::from_millis(1500), opens.recv()).await;
        assert!(opened.is_err(), "the files were reopened: {opened:?}");
    }

    #[tokio::test]
    async fn dropping_the_watcher_ends_the_events() {
        let root = stack("v1.119.0");
        let (w, mut rx) = watch(root.path());
        drop(w);
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
    }
}
