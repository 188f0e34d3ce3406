//! A Unix-socket proxy in front of the real Docker engine, so a test can make "Docker" appear
//! and vanish for the daemon without touching the engine other tests use.

use std::path::{Path, PathBuf};

pub const ENGINE_SOCKET: &str = "/var/run/docker.sock";

pub struct DockerProxy {
    path: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
}

impl DockerProxy {
    /// Listens at `path` and forwards every connection to the engine.
    pub fn start(path: &Path) -> DockerProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(async { tokio::net::UnixListener::bind(path) })
            .expect("bind proxy socket");
        runtime.spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut engine) = tokio::net::UnixStream::connect(ENGINE_SOCKET).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        });
        DockerProxy {
            path: path.to_path_buf(),
            runtime: Some(runtime),
        }
    }

    /// Closes the listener and every forwarded connection, like an engine going down.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        std::fs::remove_file(&self.path).ok();
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.stop();
    }
}
