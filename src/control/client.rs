//! The CLI side of the control socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Request, Response};

const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

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
    let exchange = async {
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(request).expect("requests always serialize");
        line.push(b'\n');
        write.write_all(&line).await?;
        let mut answer = String::new();
        BufReader::new(read).read_line(&mut answer).await?;
        Ok::<String, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(RESPONSE_TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout {
            path: path.clone(),
            secs: RESPONSE_TIMEOUT.as_secs(),
        })?
        .map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
    if answer.is_empty() {
        return Err(ClientError::Protocol {
            path,
            detail: "connection closed without an answer".into(),
        });
    }
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
        path,
        detail: e.to_string(),
    })
}
