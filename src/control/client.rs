//! The CLI side of the control socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Request, Response};

/// Longest silence between two lines of an answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the immich-guard daemon is not running (no socket at {path}); start it with `systemctl start immich-guard` or `immich-guard run`"
    )]
    NotRunning { path: PathBuf },
    #[error(
        "the immich-guard daemon is not running (nothing listens on {path}); start it with `systemctl start immich-guard` or `immich-guard run`"
    )]
    Refused { path: PathBuf },
    #[error("permission denied on {path}: run as root or as a member of the control.group")]
    PermissionDenied { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: the daemon did not answer within {secs} s")]
    Timeout { path: PathBuf, secs: u64 },
    #[error("control socket {path}: unreadable answer from the daemon: {detail}")]
    Protocol { path: PathBuf, detail: String },
}

/// Sends one request and reads its one response.
pub async fn request(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    request_with_progress(socket, request, |_| {}).await
}

/// Sends one request; hands every `progress` line to `on_progress` and returns the final
/// answer. A snapshot may take long: the time limit is per line, not for the whole answer.
pub async fn request_with_progress(
    socket: &Path,
    request: &Request,
    mut on_progress: impl FnMut(&str),
) -> Result<Response, ClientError> {
    let path = socket.to_path_buf();
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ClientError::NotRunning { path: path.clone() },
            std::io::ErrorKind::ConnectionRefused => ClientError::Refused { path: path.clone() },
            std::io::ErrorKind::PermissionDenied => {
                ClientError::PermissionDenied { path: path.clone() }
            }
            _ => ClientError::Io {
                path: path.clone(),
                source,
            },
        })?;
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).expect("requests always serialize");
    line.push(b'\n');
    write.write_all(&line).await.map_err(io)?;
    let mut reader = BufReader::new(read);
    loop {
        let mut answer = String::new();
        tokio::time::timeout(RESPONSE_TIMEOUT, reader.read_line(&mut answer))
            .await
            .map_err(|_| ClientError::Timeout {
                path: path.clone(),
                secs: RESPONSE_TIMEOUT.as_secs(),
            })?
            .map_err(io)?;
        if answer.is_empty() {
            return Err(ClientError::Protocol {
                path,
                detail: "connection closed without an answer".into(),
            });
        }
        match serde_json::from_str(&answer) {
            Ok(Response::Progress { message }) => on_progress(&message),
            Ok(response) => return Ok(response),
            Err(e) => {
                return Err(ClientError::Protocol {
                    path,
                    detail: e.to_string(),
                });
            }
        }
    }
}
