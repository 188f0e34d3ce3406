//! Shared test code: real Docker, real PostgreSQL, no registry (README.md, the test section).
//!
//! - [`images`]: registry-free images (`docker import` of tarballs we write), cached by content.
//! - [`compose`]: Immich-shaped compose stacks ([`Stack`], [`StackSpec`]) and a scratch
//!   PostgreSQL, torn down on drop.
//! - [`guard`], [`docker_proxy`]: the daemon under test and a Docker socket proxy.
//! - [`deps`]: the host's test dependencies, checked once, and the skip summary at exit.
//! - [`host`]: other Immich stacks on the engine, and the cleanup of all the harness made.
//! - [`immutable`]: files nothing can remove (`chattr +i`), cleared on drop.
#![allow(dead_code, unused_imports)]

pub mod compose;
pub mod deps;
pub mod docker_proxy;
pub mod guard;
pub mod host;
pub mod images;
pub mod immutable;
pub mod loopfs;
pub mod webhook;

pub use compose::{ContainerState, ScratchPostgres, Stack, StackSpec};
pub use images::{Images, build_ml_image, build_server_image, ensure_images};

/// Whether the Docker tests can run here: docker, an answering engine, compose, busybox-static
/// and PostgreSQL 15, all checked once per process (one message naming what is missing and
/// the `apt-get install` line; under `CI=true` the binary exits 1 instead). When not, the
/// calling test is counted as skipped and should return; the binary's summary at exit says
/// how many skipped and why.
pub fn docker_available() -> bool {
    deps::docker_ready()
}

/// For a test that must be the only Immich stack on the engine (zero-config discovery): `true`
/// (return now) when Docker is missing or another stack is there; see
/// [`host::foreign_stack_present`].
pub fn docker_available_and_alone(test: &str) -> bool {
    docker_available() && !host::foreign_stack_present(test)
}
