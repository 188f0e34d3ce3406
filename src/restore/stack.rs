//! Stopping and starting the stack for a restore: containers are stopped through the Docker
//! API (server and machine learning first, so nothing writes while the data goes back), and
//! the stack is brought up again by compose as it was deployed: `docker compose` (v2) when
//! the CLI has it, else `docker-compose` (v1), with the project's own files, env file and
//! project name from discovery.

use std::path::Path;
use std::time::{Duration, Instant};

use bollard::Docker;

use super::RestoreError;
use crate::discover::Stack;

/// Seconds a container gets to stop before it is killed (Immich's server finishes jobs).
const STOP_TIMEOUT_SECS: i32 = 30;

/// The containers the stop step stops so that nothing writes: server, machine learning
/// and redis, as discovered.
pub fn writers(stack: &Stack) -> Vec<String> {
    [&stack.server, &stack.machine_learning, &stack.redis]
        .into_iter()
        .flatten()
        .map(|s| s.container_name.clone())
        .collect()
}

/// Stops `container` (already stopped is fine); whether it was running.
pub async fn stop(docker: &Docker, host: &str, container: &str) -> Result<bool, RestoreError> {
    let options = bollard::query_parameters::StopContainerOptionsBuilder::default()
        .t(STOP_TIMEOUT_SECS)
        .build();
    match docker.stop_container(container, Some(options)).await {
        Ok(()) => Ok(true),
        // 304: not running.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(false),
        Err(e) => Err(RestoreError::Docker {
            action: format!("stopping {container}"),
            detail: crate::docker::classify(host, e).to_string(),
        }),
    }
}

/// Starts `container` (already running is fine).
pub async fn start(docker: &Docker, host: &str, container: &str) -> Result<(), RestoreError> {
    match docker
        .start_container(
            container,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(e) => Err(RestoreError::Docker {
            action: format!("starting {container}"),
            detail: crate::docker::classify(host, e).to_string(),
        }),
    }
}

/// The compose command line on this host: `docker compose` when it answers, else
/// `docker-compose`.
pub async fn compose_command() -> Vec<String> {
    let v2 = tokio::process::Command::new("docker")
        .args(["compose", "version"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if v2 {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

/// The arguments naming the project as it was deployed: `-p`, each `-f`, the project dir and
/// the env file when it is not the project dir's `.env`.
pub fn project_args(stack: &Stack) -> Vec<String> {
    let mut args = vec!["-p".to_string(), stack.project.clone()];
    for file in &stack.compose_files {
        args.push("-f".into());
        args.push(file.display().to_string());
    }
    if let Some(dir) = &stack.compose_dir {
        args.push("--project-directory".into());
        args.push(dir.display().to_string());
        if let Some(env) = &stack.env_file
            && env != &dir.join(".env")
        {
            args.push("--env-file".into());
            args.push(env.display().to_string());
        }
    }
    args
}

/// The command `up` runs, for the plan and the dry run.
pub async fn up_command_line(stack: &Stack) -> String {
    let mut all = compose_command().await;
    all.extend(project_args(stack));
    all.extend(["up".into(), "-d".into()]);
    all.join(" ")
}

/// `compose up -d` for the project, in its own dir.
pub async fn compose_up(stack: &Stack) -> Result<(), RestoreError> {
    let cmd = compose_command().await;
    let mut c = tokio::process::Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .args(project_args(stack))
        .args(["up", "-d"])
        .stdin(std::process::Stdio::null())
        // The pinned version is in `.env`; a value in our own environment would win over it.
        .env_remove("IMMICH_VERSION");
    if let Some(dir) = &stack.compose_dir {
        c.current_dir(dir);
    }
    let out = c.output().await.map_err(|e| RestoreError::Compose {
        command: cmd.join(" "),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RestoreError::Compose {
            command: format!("{} {} up -d", cmd.join(" "), project_args(stack).join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Waits until the server answers `/api/server/ping`; returns the address that answered.
pub async fn wait_ping(
    docker: &Docker,
    stack: &Stack,
    timeout: Duration,
) -> Result<String, RestoreError> {
    let server = stack.server.as_ref().ok_or(RestoreError::Missing {
        what: "server container",
        hint: "set stack.server_container",
    })?;
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match docker
            .inspect_container(
                &server.container_name,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(c) => {
                for url in crate::verify::server_addresses(&c) {
                    match crate::verify::get(&format!("{url}/api/server/ping")).await {
                        Ok((200, body)) if body.contains("pong") => return Ok(url),
                        Ok((status, body)) => last = format!("{url}: HTTP {status} {body}"),
                        Err(e) => last = format!("{url}: {e}"),
                    }
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(RestoreError::NoPing {
        container: server.container_name.clone(),
        secs: timeout.as_secs(),
        last,
    })
}

/// The compose dir, for messages.
pub fn compose_dir(stack: &Stack) -> &Path {
    stack
        .compose_dir
        .as_deref()
        .unwrap_or(Path::new("the compose dir"))
}
