//! Shared test code: real Docker, real PostgreSQL, no registry (DESIGN.md §8).
//!
//! - [`images`]: registry-free images (`docker import` of tarballs we write), cached by content.
//! - [`compose`]: Immich-shaped compose stacks ([`Stack`], [`StackSpec`]) and a scratch
//!   PostgreSQL, torn down on drop.
//! - [`guard`], [`docker_proxy`]: the daemon under test and a Docker socket proxy.
#![allow(dead_code, unused_imports)]

pub mod compose;
pub mod docker_proxy;
pub mod guard;
pub mod images;
pub mod webhook;

pub use compose::{ContainerState, ScratchPostgres, Stack, StackSpec};
pub use images::{Images, build_ml_image, build_server_image, ensure_images};

/// Whether the Docker engine answers (`docker info`), checked once per process. When it does
/// not, a test should return early: this prints "skipping: Docker not available" — except
/// under `CI=true`, where a missing engine fails the test loudly instead of letting every
/// Docker test skip.
pub fn docker_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *AVAILABLE.get_or_init(|| {
        std::process::Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdin(std::process::Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but the Docker engine does not answer `docker info`: the Docker tests cannot run"
        );
        eprintln!("skipping: Docker not available");
    }
    ok
}
