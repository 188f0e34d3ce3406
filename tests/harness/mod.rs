//! Shared test code: real Docker, real PostgreSQL, no registry (DESIGN.md §8).
#![allow(dead_code, unused_imports)]

pub mod compose;
pub mod docker_proxy;
pub mod guard;
pub mod images;

pub use compose::{Stack, StackSpec};

/// Whether the Docker engine answers. Under CI=true a missing engine fails loudly instead
/// of letting every Docker test skip.
pub fn docker_available() -> bool {
    let ok = std::process::Command::new("docker")
        .arg("info")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but the Docker engine does not answer `docker info`"
        );
        eprintln!("skipping: Docker not available");
    }
    ok
}
