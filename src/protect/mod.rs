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

/// The containers `protection.json` in `data_dir` says protection holds paused or stopped:
/// frozen, held, or paused by someone else (never unpaused without `release`). Read at start,
/// before the driver, so what an interrupted snapshot paused can be resumed without touching
/// them (snapshot/pause.rs). An unreadable file is an error: nothing may then be resumed.
pub fn gated_containers(
    data_dir: &std::path::Path,
    project: Option<&str>,
) -> Result<std::collections::BTreeSet<String>, String> {
    let path = data_dir.join(persist::STATE_FILE);
    let states = persist::load(&path, project).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(states
        .projects
        .values()
        .chain(states.unattributed.as_ref())
        .flat_map(|p| {
            [
                p.frozen.as_ref().map(|f| f.container.clone()),
                p.hold.as_ref().map(|h| h.container.clone()),
                p.paused_server.as_ref().map(|s| s.container.clone()),
            ]
        })
        .flatten()
        .collect())
}
