//! Watches the compose working dir and reports what the compose config now names as Immich's
//! version (read by `compose::model`). It only reads: it never writes the compose dir, and
//! never reports a change that isn't one.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::model::{ComposeError, ComposeView, read_view};

/// Long enough for an editor's write-temp-then-rename, short enough that the admin's
/// `docker compose up` right after saving still finds us decided.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(500);

/// inotify cannot watch a dir that is not there (and its parent may be gone too), so while
/// the dir is missing we look for it this often.
const MISSING_DIR_POLL: Duration = Duration::from_secs(2);

/// A file that never stops changing is still read, after this many debounce windows.
const MAX_SETTLE_WINDOWS: u32 = 10;

#[derive(Debug, Clone, PartialEq)]
pub enum ComposeEvent {
    Changed {
        before: ComposeView,
        after: ComposeView,
    },
    /// A file became unreadable or unparseable; the last good view is kept.
    Error(String),
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
    use super::super::model::fixtures::*;
    use super::*;
    use std::fs;

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
