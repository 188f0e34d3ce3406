//! Passive protection (README.md "How it protects"; docs/operations.md "Protection, held
//! servers and releases"; docs/architecture.md): snapshot before every Immich version change,
//! freeze a server that starts on an image no sealed snapshot covers, fail closed, refuse
//! downgrades, halt crash loops.
//!
//! `policy` decides (no I/O: events in, effects out), `driver` carries the effects out and
//! owns the connections, `state` is what is known per project, `persist` its file.

mod driver;
mod persist;
pub mod policy;
pub mod state;

pub use driver::{Guard, GuardHandle, Input, RestoreInput, Show, Shown};
pub use policy::{ContainerEvent, RestoreEnd};
pub use state::{
    Baseline, ChangeSource, Frozen, Hold, HoldKind, PausedServer, PendingChange, Phase,
    ProjectState, ProtectState, Protection, Release, Settling, SnapshotRun, parse_version,
    percentiles, same_version,
};
