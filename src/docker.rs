//! The Docker engine connection: where it is, how we reach it, and errors an admin can act on.
//! A thin layer over bollard; it never changes a container by itself.

use std::path::PathBuf;

use bollard::Docker;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DockerError {
    #[error(
        "no Docker socket at {path}: is Docker installed and running? (set DOCKER_HOST or docker.host to use another engine)"
    )]
    NoSocket { path: PathBuf },
    #[error(
        "permission denied on the Docker socket {path}: run immich-guard as root or as a member of the docker group"
    )]
    PermissionDenied { path: PathBuf },
    #[error("Docker engine at {host} is not answering: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("Docker host {host} is not supported: {detail}")]
    BadHost { host: String, detail: String },
    #[error("Docker API call failed: {0}")]
    Api(String),
}

impl DockerError {
    /// Whether waiting and retrying may help (the engine may come back); a bad host never will.
    pub fn is_transient(&self) -> bool {
        !matches!(self, DockerError::BadHost { .. })
    }
}

/// The engine address in effect: the config's, else `DOCKER_HOST`, else the local socket.
pub fn engine_host(configured: Option<&str>) -> String {
    configured
        .map(str::to_string)
        .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

fn socket_path(host: &str) -> Option<PathBuf> {
    host.strip_prefix("unix://").map(PathBuf::from)
}

/// Connects and negotiates the API version (the engine may be older than bollard's default).
pub async fn connect(host: &str) -> Result<Docker, DockerError> {
    let docker = Docker::connect_with_host(host).map_err(|e| classify(host, e))?;
    docker
        .negotiate_version()
        .await
        .map_err(|e| classify(host, e))
}

/// Maps a bollard error to what the admin should do about it.
pub fn classify(host: &str, err: bollard::errors::Error) -> DockerError {
    use bollard::errors::Error as E;
    let socket = socket_path(host);
    match &err {
        E::SocketNotFoundError(path) => {
            return DockerError::NoSocket {
                path: PathBuf::from(path),
            };
        }
        E::UnsupportedURISchemeError { .. } | E::InvalidURIError { .. } => {
            return DockerError::BadHost {
                host: host.to_string(),
                detail: err.to_string(),
            };
        }
        E::DockerResponseServerError { .. } => return DockerError::Api(err.to_string()),
        _ => {}
    }
    if let Some(kind) = io_error_kind(&err) {
        match (kind, socket) {
            (std::io::ErrorKind::PermissionDenied, Some(path)) => {
                return DockerError::PermissionDenied { path };
            }
            (std::io::ErrorKind::NotFound, Some(path)) => return DockerError::NoSocket { path },
            _ => {}
        }
    }
    DockerError::Unreachable {
        host: host.to_string(),
        detail: error_chain(&err),
    }
}

fn io_error_kind(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        current = e.source();
    }
    None
}

/// The error and its causes on one line; bollard's top-level messages alone are often vague.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut current = err.source();
    while let Some(e) = current {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        current = e.source();
    }
    parts.join(": ")
}

/// An exec's output as bollard streams it (stdout and stderr frames).
pub type ExecOutput = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = Result<bollard::container::LogOutput, bollard::errors::Error>,
            > + Send,
    >,
>;

/// Starts `cmd` in `container` through the exec API with stdout and stderr attached (`env`
/// goes into the exec's environment, never onto a command line). Returns the exec's id, for
/// [`exec_exit_code`] once the output has ended, and the output.
pub async fn exec_attached(
    docker: &Docker,
    host: &str,
    container: &str,
    cmd: Vec<String>,
    env: Option<Vec<String>>,
    output_capacity: Option<usize>,
) -> Result<(String, ExecOutput), DockerError> {
    let (id, output, _) =
        start_exec(docker, host, container, cmd, env, output_capacity, false).await?;
    Ok((id, output))
}

/// The stdin of an exec started by [`exec_piped`].
pub type ExecInput = std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// [`exec_attached`] with the exec's stdin attached too: what `docker exec -i` does. The
/// caller writes the input (a program that must see the end of it should be told in-band,
/// e.g. psql's `\q`: not every engine passes a half-close on to the process).
pub async fn exec_piped(
    docker: &Docker,
    host: &str,
    container: &str,
    cmd: Vec<String>,
    env: Option<Vec<String>>,
) -> Result<(String, ExecOutput, ExecInput), DockerError> {
    start_exec(docker, host, container, cmd, env, Some(1 << 16), true).await
}

async fn start_exec(
    docker: &Docker,
    host: &str,
    container: &str,
    cmd: Vec<String>,
    env: Option<Vec<String>>,
    output_capacity: Option<usize>,
    stdin: bool,
) -> Result<(String, ExecOutput, ExecInput), DockerError> {
    use bollard::exec::{StartExecOptions, StartExecResults};
    let exec = docker
        .create_exec(
            container,
            bollard::models::ExecConfig {
                attach_stdin: Some(stdin),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(cmd),
                env,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| classify(host, e))?;
    let started = docker
        .start_exec(
            &exec.id,
            Some(StartExecOptions {
                detach: false,
                tty: false,
                output_capacity,
            }),
        )
        .await
        .map_err(|e| classify(host, e))?;
    match started {
        StartExecResults::Attached { output, input } => Ok((exec.id, output, input)),
        StartExecResults::Detached => Err(DockerError::Api("exec started detached".into())),
    }
}

/// The exit code of a finished exec (-1 when the engine does not say).
pub async fn exec_exit_code(docker: &Docker, host: &str, id: &str) -> Result<i64, DockerError> {
    Ok(docker
        .inspect_exec(id)
        .await
        .map_err(|e| classify(host, e))?
        .exit_code
        .unwrap_or(-1))
}

/// Whether bollard says "no such container/image" (a 404 from the engine).
pub fn is_not_found(err: &bollard::errors::Error) -> bool {
    matches!(
        err,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_host_wins_over_default() {
        assert_eq!(
            engine_host(Some("unix:///tmp/x.sock")),
            "unix:///tmp/x.sock"
        );
    }

    #[tokio::test]
    async fn missing_socket_is_reported_as_no_socket() {
        let dir = tempfile::tempdir().unwrap();
        let host = format!("unix://{}/docker.sock", dir.path().display());
        let e = connect(&host).await.unwrap_err();
        assert!(matches!(e, DockerError::NoSocket { .. }), "{e:?}");
        assert!(e.to_string().contains("docker.sock"), "{e}");
        assert!(e.is_transient());
    }

    #[tokio::test]
    async fn socket_nobody_listens_on_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        // A socket file that exists but has no listener: a crashed engine.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = connect(&format!("unix://{}", path.display()))
            .await
            .unwrap_err();
        assert!(matches!(e, DockerError::Unreachable { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn unsupported_scheme_is_not_transient() {
        let e = connect("ftp://example").await.unwrap_err();
        assert!(matches!(e, DockerError::BadHost { .. }), "{e:?}");
        assert!(!e.is_transient());
    }
}
