//! immich-guard: keeps a self-hosted Immich Docker Compose stack safe through upgrades.
//!
//! The data path is the module layout: `discover` finds the stack, `daemon` watches Docker
//! and publishes `status`, `control` serves it over a Unix socket, `systemd` tells systemd.

pub mod compose;
pub mod compose_logs;
pub mod config;
pub mod control;
pub mod crashloop;
pub mod daemon;
pub mod diagnose;
pub mod discover;
pub mod docker;
pub mod drill;
pub mod durable;
pub mod image_ref;
pub mod incident;
pub mod lock;
pub mod memory;
pub mod notification;
pub mod owner_only;
pub mod paths;
pub mod pg_error;
pub mod pin;
pub mod post_upgrade;
pub mod private;
pub mod progress;
pub mod protect;
pub mod redact;
pub mod render;
pub mod restore;
pub mod snapshot;
pub mod status;
pub mod systemd;
pub mod uploads;
pub mod verify;
pub mod version;
