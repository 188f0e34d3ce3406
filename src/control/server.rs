//! The daemon side of the control socket. It only reads the published state (a
//! `watch::Receiver` borrow, copied out before any await), so a slow or hostile client can
//! never stall the workers; each connection has its own task and its own time limits, and
//! the connections together are capped (limits.rs) so that a flood cannot take the file
//! descriptors and memory protection needs.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::answer::{answer, encode, send};
use super::limits::{AcceptBackoff, Caps, LogEvery, Slots};
use super::reader::{Next, RequestReader};
use super::{Response, parse_request};
use crate::config::ControlConfig;
use crate::protect::GuardHandle;
use crate::snapshot::queue::SnapshotQueue;
use crate::status::DaemonState;

/// What the socket answers from: the published state, the snapshot queue, the store; what a
/// restore runs with.
#[derive(Clone)]
pub struct Control {
    pub state: watch::Receiver<DaemonState>,
    pub queue: SnapshotQueue,
    /// Restore drills, one at a time (src/drill/).
    pub drills: crate::drill::queue::DrillQueue,
    pub snapshot_dir: PathBuf,
    pub incident_dir: PathBuf,
    pub guard: GuardHandle,
    /// What a restore runs with: the daemon's config and Docker connection.
    pub config: crate::config::Config,
    pub docker: crate::snapshot::queue::DockerHandle,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: another immich-guard daemon is already listening there")]
    InUse { path: PathBuf },
    #[error(
        "control socket {path}: a file that is not a socket is in the way; remove it or set control.socket"
    )]
    NotASocket { path: PathBuf },
    #[error("control socket {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("control.group = {group:?}: no such group on this system")]
    NoSuchGroup { group: String },
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Binds the socket, replacing a stale one left by a crashed daemon.
    pub fn bind(config: &ControlConfig) -> Result<ControlServer, ControlError> {
        let path = config.socket.clone();
        let io = |action: &'static str| {
            let path = path.clone();
            move |source| ControlError::Io {
                path,
                action,
                source,
            }
        };
        // Checked with the config at start (Config::check_environment); this is the group
        // vanishing since.
        let gid = config.gid().map_err(|_| ControlError::NoSuchGroup {
            group: config.group.clone().unwrap_or_default(),
        })?;
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(io("creating its directory"))?;
            // The directory must be traversable for the socket's group to reach the socket.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io("setting its directory's mode"))?;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(ControlError::InUse { path });
                }
                std::fs::remove_file(&path).map_err(io("removing the stale socket"))?;
            }
            Ok(_) => return Err(ControlError::NotASocket { path }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("checking for an old socket")(e)),
        }
        let listener = UnixListener::bind(&path).map_err(io("binding"))?;
        // The daemon runs as root and can pause or stop containers; only root, and the
        // configured group for read-only verbs, may talk to it. Set explicitly: the umask
        // of whoever started us is not a security policy.
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        if let Some(gid) = gid {
            nix::unistd::chown(&path, None, Some(gid))
                .map_err(|e| io("setting its group")(std::io::Error::from(e)))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io("setting its mode"))?;
        Ok(ControlServer { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until the task is dropped; dropping it also ends every open connection.
    pub async fn serve(self, control: Control) {
        let slots = Slots::new(Caps::for_fd_limit(super::limits::fd_limit()));
        let caps = slots.caps();
        tracing::info!(
            total = caps.total,
            per_uid = caps.per_uid,
            reserved_for_root = caps.reserved,
            "control socket connection limits"
        );
        let mut connections = JoinSet::new();
        let mut backoff = AcceptBackoff::default();
        let mut accept_errors = LogEvery::new(Duration::from_secs(60));
        let mut refusals = LogEvery::new(Duration::from_secs(60));
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let failed = backoff.succeeded();
                        if failed > 0 {
                            tracing::info!(failed, "control socket accepts again");
                        }
                        // Who is asking, from the kernel (SO_PEERCRED), not from anything
                        // the client says.
                        let peer_uid = stream.peer_cred().ok().map(|c| c.uid());
                        match slots.take(peer_uid, allowed_to_change(peer_uid)) {
                            Ok(slot) => {
                                let control = control.clone();
                                connections.spawn(async move {
                                    serve_connection(stream, peer_uid, control).await;
                                    drop(slot);
                                });
                            }
                            Err(refusal) => {
                                // Never queued: one line if the socket takes it now, closed.
                                let message = Response::error(refusal.to_string());
                                let _ = stream.try_write(&encode(&message));
                                drop(stream);
                                if let Some(more) = refusals.note(std::time::Instant::now()) {
                                    let (held, unprivileged) = slots.in_use();
                                    tracing::warn!(
                                        uid = ?peer_uid, reason = %refusal, more, held, unprivileged,
                                        "control socket refused a connection"
                                    );
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let delay = backoff.failed(&e);
                        if let Some(more) = accept_errors.note(std::time::Instant::now()) {
                            tracing::warn!(
                                error = %e, more, retry_ms = delay.as_millis() as u64,
                                "control socket accept failed"
                            );
                        }
                        tokio::time::sleep(delay).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    /// Removes the socket file; called on a clean shutdown.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove control socket");
        }
    }
}

async fn serve_connection(stream: UnixStream, peer_uid: Option<u32>, control: Control) {
    let (read, mut write) = stream.into_split();
    let mut requests = RequestReader::new(read);
    loop {
        let (request, last) = match requests.next().await {
            Next::Request { line, last } => (parse_request(&line), last),
            Next::Close(message) => {
                let _ = send(&mut write, &Response::error(message)).await;
                return;
            }
            Next::Gone => return,
        };
        let request = match request {
            Ok(request) => request,
            Err(message) => {
                if send(&mut write, &Response::error(message)).await.is_err() || last {
                    return;
                }
                continue;
            }
        };
        if request.is_mutating() && !allowed_to_change(peer_uid) {
            let message =
                "permission denied: only root may change things (snapshot, release, ack, restore)";
            if send(&mut write, &Response::error(message)).await.is_err() {
                return;
            }
            continue;
        }
        let sent = answer(request, &control, &mut write).await;
        if sent.is_err() || last {
            return;
        }
    }
}

fn allowed_to_change(peer_uid: Option<u32>) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    matches!(peer_uid, Some(uid) if uid == 0 || uid == me)
}
