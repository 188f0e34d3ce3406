//! `verify`: a checklist that says whether the stack is whole, optionally against a snapshot
//! (docs/recovery.md §8, docs/operations.md "Verify"). `gather` does all the I/O (Docker,
//! HTTP, SQL, the upload location) into [`Facts`]; `evaluate` is pure and turns facts into
//! [`Check`]s, so the CLI, restore and the post-upgrade verify judge alike and every rule is a
//! unit test. Verify only reads: it never starts, stops or writes anything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::InspectContainerOptions;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

pub mod content;
pub mod not_restored;

use crate::discover::{ImmichVersion, Stack};
use crate::docker::{classify, error_chain};
use crate::snapshot::storage::{EntryKind, ManifestEntry, read_manifest};
use crate::snapshot::store::{MANIFEST_FILE, META_FILE, Meta};

/// The storage folders Immich checks at boot, each holding a `.immich` marker.
pub const MARKER_FOLDERS: &[&str] = &[
    "library",
    "upload",
    "thumbs",
    "encoded-video",
    "profile",
    "backups",
];
/// The folders holding originals (what cannot be regenerated): external-library-free uploads,
/// the storage-template library and profile pictures.
pub const ORIGINAL_FOLDERS: &[&str] = &["library", "upload", "profile"];
pub const MARKER: &str = ".immich";
/// Immich's port inside the server container, unless `IMMICH_PORT` says otherwise.
const DEFAULT_PORT: u16 = 2283;
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// `immich-admin` boots a Nest app and reads the schema; give it time, but not forever.
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(120);
/// Paths named in a failing line; the rest are counted.
const SHOWN: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no sealed snapshot {id} in {dir} (`immich-guard list` shows the sealed ones){detail}")]
    NoSnapshot {
        id: String,
        dir: PathBuf,
        detail: String,
    },
    #[error("cannot read the snapshots in {dir}: {detail}")]
    Store { dir: PathBuf, detail: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    /// Not checked, and why is in the detail (no snapshot to compare with, not in the image).
    Skipped,
}

/// One line of the checklist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// Stable names: `containers`, `ping`, `version`, `assets`, `users`, `originals`,
    /// `content` (with a snapshot), `markers`, `schema`.
    pub name: String,
    pub outcome: Outcome,
    /// The numbers, and on failure what is wrong.
    pub detail: String,
}

impl Check {
    fn new(name: &str, outcome: Outcome, detail: impl Into<String>) -> Check {
        Check {
            name: name.to_string(),
            outcome,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub project: String,
    /// The snapshot compared with, if any.
    pub against: Option<String>,
    /// Why that snapshot (or none): `--against`, or the newest of the running version.
    pub baseline_note: String,
    pub expected_version: Option<String>,
    /// Where the server was asked (`http://<container ip>:2283`).
    pub server_url: Option<String>,
    pub at: DateTime<Utc>,
    /// No check failed (skipped ones do not count).
    pub passed: bool,
    pub checks: Vec<Check>,
    /// After a restore: the assets only its pre-restore snapshot holds (not_restored.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_restored: Option<not_restored::NotRestored>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.outcome == Outcome::Fail)
    }

    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// What a snapshot says the stack held.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    pub id: String,
    pub version: String,
    pub assets: Option<i64>,
    pub users: Option<i64>,
    /// The snapshot's manifest, where the originals and markers are listed.
    pub manifest: PathBuf,
    /// Folders left out of the snapshot (`snapshots.exclude`): no marker recorded for them.
    pub excluded: Vec<String>,
    /// The snapshot's content hashes and stored files (verify/content.rs).
    pub content: content::Source,
}

impl Baseline {
    /// The baseline of the sealed snapshot at `dir` (its `meta.json` beside the manifest).
    pub fn of(meta: &Meta, dir: &Path) -> Baseline {
        Baseline {
            id: meta.id.clone(),
            version: meta.version.clone(),
            assets: meta.db.assets,
            users: meta.db.users,
            manifest: dir.join(MANIFEST_FILE),
            excluded: meta.storage.excluded.clone(),
            content: content::Source::of(meta, dir),
        }
    }
}

/// What one verify compares with: the snapshot (if any), why that one, and the version the
/// server must answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub baseline: Option<Baseline>,
    /// Said in the report: `snapshot X (--against)`, `no sealed snapshot of v1.2.3 …`.
    pub note: String,
    pub expected_version: Option<String>,
}

impl Plan {
    /// After a restore (and `--against`): everything as the snapshot recorded it, its version
    /// included.
    pub fn against(meta: &Meta, dir: &Path, note: String) -> Plan {
        Plan {
            baseline: Some(Baseline::of(meta, dir)),
            note,
            expected_version: Some(meta.version.clone()),
        }
    }

    /// After an upgrade settled: nothing lost since the pre-update snapshot (counts,
    /// originals, markers), while the server answers the version its image names.
    pub fn after_upgrade(meta: &Meta, dir: &Path, running: Option<&ImmichVersion>) -> Plan {
        Plan {
            baseline: Some(Baseline::of(meta, dir)),
            note: format!("pre-update snapshot {} ({})", meta.id, meta.version),
            expected_version: image_version(running),
        }
    }

    /// The stack alone: no snapshot.
    pub fn stack_only(note: String, running: Option<&ImmichVersion>) -> Plan {
        Plan {
            baseline: None,
            note,
            expected_version: image_version(running),
        }
    }
}

/// The plan for the CLI: the snapshot `against` when given (it must be sealed), else the
/// newest sealed snapshot of the running version of this project, else the stack alone.
/// `dir` is the snapshot dir; it is only read.
pub fn choose_plan(dir: &Path, against: Option<&str>, stack: &Stack) -> Result<Plan, VerifyError> {
    if let Some(id) = against {
        let snap = dir.join(id);
        let meta_path = snap.join(META_FILE);
        let no = |detail: String| VerifyError::NoSnapshot {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            detail,
        };
        if id.starts_with('.') || id.contains('/') {
            return Err(no(": not a snapshot id".into()));
        }
        let text = match std::fs::read_to_string(&meta_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(no(String::new())),
            Err(e) => return Err(no(format!(": {}: {e}", meta_path.display()))),
        };
        let meta: Meta = serde_json::from_str(&text)
            .map_err(|e| no(format!(": {} is unreadable: {e}", meta_path.display())))?;
        let note = format!("snapshot {} (--against)", meta.id);
        return Ok(Plan::against(&meta, &snap, note));
    }
    let all = match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        _ => crate::snapshot::store::Store::open(dir)
            .and_then(|s| s.list())
            .map_err(|e| VerifyError::Store {
                dir: dir.to_path_buf(),
                detail: e.to_string(),
            })?,
    };
    let running = stack.version.as_ref();
    Ok(match newest_of_running(&all, &stack.project, running) {
        Some(meta) => {
            let note = format!("snapshot {} (newest of the running version)", meta.id);
            Plan::against(meta, &dir.join(&meta.id), note)
        }
        None => Plan::stack_only(
            format!(
                "no sealed snapshot of {} in {}: stack checks only",
                running.map_or("the running version".into(), |v| v.name()),
                dir.display()
            ),
            running,
        ),
    })
}

/// The newest sealed snapshot of `project` taken of the running version (same version name or
/// same image).
pub fn newest_of_running<'a>(
    all: &'a [Meta],
    project: &str,
    running: Option<&ImmichVersion>,
) -> Option<&'a Meta> {
    let running = running?;
    let name = running.name();
    all.iter()
        .filter(|m| m.project == project)
        .filter(|m| m.version == name || m.image_id.as_deref() == Some(&running.image_id))
        .max_by_key(|m| (m.sealed_at, m.id.clone()))
}

/// The version the running image names (its label or a version tag); `None` when it names
/// none (`:release` without a label).
pub fn image_version(running: Option<&ImmichVersion>) -> Option<String> {
    running
        .map(|v| v.name())
        .filter(|n| parse_version(n).is_some())
}

/// `v1.2.3`, `1.2.3`, `v1.2.3-rc1` → (1, 2, 3).
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.trim().strip_prefix(['v', 'V']).unwrap_or(v.trim());
    let core = core.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

/// What happened to one file verify looked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    Size(u64),
    Missing,
    /// Present but unreadable, or not a file.
    Error(String),
}

/// One container of the stack as Docker reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerFact {
    /// `server`, `machine-learning`, `redis`, `database`.
    pub role: &'static str,
    /// `None`: discovery found no such container.
    pub name: Option<String>,
    pub state: String,
    /// The healthcheck's status, when the container has one.
    pub health: Option<String>,
}

/// Per original of a snapshot's manifest: (path, recorded size, what is there now); or why
/// they could not be looked at.
pub type Originals = Result<Vec<(String, u64, Observed)>, String>;

/// An HTTP answer (status, body) or why there was none.
pub type Probe = Result<(u16, String), String>;

#[derive(Debug, Clone, PartialEq)]
pub enum SchemaFact {
    /// No running server to exec in.
    NoServer,
    /// `immich-admin`, or its `schema-check`, is not in this image.
    Absent(String),
    Ran {
        exit_code: i64,
        output: String,
    },
    Error(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Counts {
    pub assets: Option<i64>,
    pub users: Option<i64>,
}

/// Everything verify looked at, before judging.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub containers: Vec<ContainerFact>,
    pub server_url: Option<String>,
    /// `None`: no address to ask.
    pub ping: Option<Probe>,
    pub version: Option<Probe>,
    pub counts: Result<Counts, String>,
    /// Per original of the baseline's manifest: (path, recorded size, now). `None` without a
    /// baseline.
    pub originals: Option<Originals>,
    /// Per marker folder, what is at `<folder>/.immich`; `Err` when the upload location is
    /// unknown.
    pub markers: Result<Vec<(String, Observed)>, String>,
    /// Folders whose marker the baseline's manifest holds (or were excluded from it).
    pub marker_baseline: Option<BTreeSet<String>>,
    /// The originals' content against the baseline's hashes; `None` without a baseline.
    pub content: Option<content::Facts>,
    pub schema: SchemaFact,
}

/// The checklist, in a fixed order.
pub fn evaluate(facts: &Facts, baseline: Option<&Baseline>, expected: Option<&str>) -> Vec<Check> {
    let mut checks = vec![
        check_containers(&facts.containers),
        check_ping(facts.ping.as_ref()),
        check_version(facts.version.as_ref(), expected),
    ];
    checks.extend(check_counts(&facts.counts, baseline));
    checks.push(check_originals(facts.originals.as_ref(), baseline));
    if let (Some(found), Some(b)) = (&facts.content, baseline) {
        checks.push(content::check(found, &b.id));
    }
    checks.push(check_markers(
        &facts.markers,
        facts.marker_baseline.as_ref(),
    ));
    checks.push(check_schema(&facts.schema));
    checks
}

pub fn check_containers(containers: &[ContainerFact]) -> Check {
    let mut bad = Vec::new();
    let mut good = Vec::new();
    for c in containers {
        let Some(name) = &c.name else {
            bad.push(format!("{}: no container found", c.role));
            continue;
        };
        let healthy = matches!(c.health.as_deref(), None | Some("healthy" | "none" | ""));
        if c.state == "running" && healthy {
            good.push(match &c.health {
                Some(h) if h == "healthy" => format!("{} (healthy)", c.role),
                _ => c.role.to_string(),
            });
        } else {
            bad.push(match &c.health {
                Some(h) if c.state == "running" => format!("{} ({name}) running but {h}", c.role),
                _ => format!("{} ({name}) {}", c.role, c.state),
            });
        }
    }
    let total = containers.len();
    if bad.is_empty() {
        Check::new(
            "containers",
            Outcome::Pass,
            format!("{total}/{total} running: {}", good.join(", ")),
        )
    } else {
        Check::new(
            "containers",
            Outcome::Fail,
            format!("{}/{total} running; {}", good.len(), bad.join("; ")),
        )
    }
}

pub fn check_ping(probe: Option<&Probe>) -> Check {
    let fail = |d: String| Check::new("ping", Outcome::Fail, d);
    match probe {
        None => fail("no address to reach the server at (not running?)".into()),
        Some(Err(e)) => fail(format!("/api/server/ping: {e}")),
        Some(Ok((200, body)))
            if serde_json::from_str::<serde_json::Value>(body)
                .is_ok_and(|v| v["res"] == "pong") =>
        {
            Check::new("ping", Outcome::Pass, "/api/server/ping answered pong")
        }
        Some(Ok((status, body))) => fail(format!(
            "/api/server/ping answered {status} {:?}",
            shorten(body)
        )),
    }
}

/// `{"major":1,"minor":119,"patch":0}` → `v1.119.0`.
pub fn version_of(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(format!(
        "v{}.{}.{}",
        v["major"].as_u64()?,
        v["minor"].as_u64()?,
        v["patch"].as_u64()?
    ))
}

pub fn check_version(probe: Option<&Probe>, expected: Option<&str>) -> Check {
    let fail = |d: String| Check::new("version", Outcome::Fail, d);
    let answered = match probe {
        None => return fail("no address to reach the server at".into()),
        Some(Err(e)) => return fail(format!("/api/server/version: {e}")),
        Some(Ok((200, body))) => match version_of(body) {
            Some(v) => v,
            None => {
                return fail(format!(
                    "/api/server/version answered {:?}, not a version",
                    shorten(body)
                ));
            }
        },
        Some(Ok((status, body))) => {
            return fail(format!(
                "/api/server/version answered {status} {:?}",
                shorten(body)
            ));
        }
    };
    match expected {
        None => Check::new(
            "version",
            Outcome::Skipped,
            format!(
                "server answers {answered}; expected version unknown (the image names none and there is no snapshot)"
            ),
        ),
        Some(want)
            if parse_version(want).is_some() && parse_version(want) == parse_version(&answered) =>
        {
            Check::new(
                "version",
                Outcome::Pass,
                format!("server answers {answered}, expected {want}"),
            )
        }
        Some(want) => fail(format!("server answers {answered}, expected {want}")),
    }
}

pub fn check_counts(counts: &Result<Counts, String>, baseline: Option<&Baseline>) -> Vec<Check> {
    let counts = match counts {
        Ok(c) => c,
        Err(e) => {
            return ["assets", "users"]
                .map(|name| Check::new(name, Outcome::Fail, format!("cannot count: {e}")))
                .to_vec();
        }
    };
    [
        ("assets", counts.assets, baseline.map(|b| b.assets)),
        ("users", counts.users, baseline.map(|b| b.users)),
    ]
    .into_iter()
    .map(|(name, now, then)| {
        let shown = |n: Option<i64>| n.map_or("no table".to_string(), |n| n.to_string());
        match (now, then) {
            (now, None) => Check::new(
                name,
                Outcome::Skipped,
                format!("{} now; no snapshot to compare with", shown(now)),
            ),
            (now, Some(None)) => Check::new(
                name,
                Outcome::Skipped,
                format!("{} now; the snapshot recorded no {name} table", shown(now)),
            ),
            (Some(now), Some(Some(then))) if now >= then => Check::new(
                name,
                Outcome::Pass,
                format!("{now} now, {then} in the snapshot"),
            ),
            (now, Some(Some(then))) => Check::new(
                name,
                Outcome::Fail,
                format!("{} now, {then} in the snapshot", shown(now)),
            ),
        }
    })
    .collect()
}

/// The manifest entries that are originals: files under the original folders, markers aside
/// (the markers line checks those).
pub fn originals(entries: &[ManifestEntry]) -> impl Iterator<Item = &ManifestEntry> {
    entries.iter().filter(|e| {
        e.kind == EntryKind::File
            && ORIGINAL_FOLDERS.contains(&e.path.split('/').next().unwrap_or(""))
            && !e.path.ends_with(&format!("/{MARKER}"))
    })
}

/// Sidecars (`.xmp`) sit beside the originals but Immich rewrites them when metadata is
/// edited: they must be there, their size may change.
fn size_may_change(path: &str) -> bool {
    path.to_ascii_lowercase().ends_with(".xmp")
}

pub fn check_originals(found: Option<&Originals>, baseline: Option<&Baseline>) -> Check {
    let (found, baseline) = match (found, baseline) {
        (Some(f), Some(b)) => (f, b),
        _ => {
            return Check::new("originals", Outcome::Skipped, "no snapshot to compare with");
        }
    };
    let files = match found {
        Ok(files) => files,
        Err(e) => return Check::new("originals", Outcome::Fail, e.clone()),
    };
    let (mut missing, mut resized, mut broken) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0u64;
    for (path, size, observed) in files {
        bytes += size;
        match observed {
            Observed::Size(now) if now == size || size_may_change(path) => {}
            Observed::Size(now) => resized.push(format!("{path} ({size} B then, {now} B now)")),
            Observed::Missing => missing.push(path.clone()),
            Observed::Error(e) => broken.push(format!("{path} ({e})")),
        }
    }
    let total = files.len();
    if missing.is_empty() && resized.is_empty() && broken.is_empty() {
        return Check::new(
            "originals",
            Outcome::Pass,
            format!(
                "{total}/{total} present with their sizes ({bytes} B) as in {}",
                baseline.id
            ),
        );
    }
    let mut parts = Vec::new();
    for (what, list) in [
        ("missing", &missing),
        ("size changed", &resized),
        ("unreadable", &broken),
    ] {
        if !list.is_empty() {
            parts.push(format!("{} {what}: {}", list.len(), name_some(list)));
        }
    }
    Check::new(
        "originals",
        Outcome::Fail,
        format!(
            "{}/{total} intact; {}",
            total - missing.len() - resized.len() - broken.len(),
            parts.join("; ")
        ),
    )
}

/// The folders whose marker must be there: all of them, unless the baseline's manifest shows
/// the snapshot had none for a folder (an older Immich without `backups`, say).
pub fn check_markers(
    found: &Result<Vec<(String, Observed)>, String>,
    baseline: Option<&BTreeSet<String>>,
) -> Check {
    let found = match found {
        Ok(f) => f,
        Err(e) => return Check::new("markers", Outcome::Fail, e.clone()),
    };
    let mut bad = Vec::new();
    let mut required = 0;
    let mut not_required = Vec::new();
    for (folder, observed) in found {
        if baseline.is_some_and(|b| !b.contains(folder)) {
            not_required.push(folder.as_str());
            continue;
        }
        required += 1;
        match observed {
            Observed::Size(_) => {}
            Observed::Missing => bad.push(format!("{folder}/{MARKER} missing")),
            Observed::Error(e) => bad.push(format!("{folder}/{MARKER}: {e}")),
        }
    }
    let aside = if not_required.is_empty() {
        String::new()
    } else {
        format!(
            " ({} not checked: none in the snapshot)",
            not_required.join(", ")
        )
    };
    if bad.is_empty() {
        Check::new(
            "markers",
            Outcome::Pass,
            format!("{required}/{required} storage folders hold {MARKER}{aside}"),
        )
    } else {
        Check::new(
            "markers",
            Outcome::Fail,
            format!(
                "{}/{required} present; {}{aside}",
                required - bad.len(),
                bad.join("; ")
            ),
        )
    }
}

pub fn check_schema(fact: &SchemaFact) -> Check {
    match fact {
        SchemaFact::NoServer => Check::new(
            "schema",
            Outcome::Skipped,
            "server not running: nothing to run immich-admin in",
        ),
        SchemaFact::Absent(why) => Check::new(
            "schema",
            Outcome::Skipped,
            format!("skipped: not in this image ({why})"),
        ),
        SchemaFact::Ran {
            exit_code: 0,
            output,
        } => Check::new(
            "schema",
            Outcome::Pass,
            format!("immich-admin schema-check: {}", last_line(output)),
        ),
        SchemaFact::Ran { exit_code, output } => Check::new(
            "schema",
            Outcome::Fail,
            format!(
                "immich-admin schema-check exited {exit_code}: {}",
                last_line(output)
            ),
        ),
        SchemaFact::Error(e) => Check::new(
            "schema",
            Outcome::Fail,
            format!("immich-admin schema-check: {e}"),
        ),
    }
}

/// How an exec'd `immich-admin schema-check` ended, told apart from "not in this image":
/// the runtime's "executable file not found" (exit 126/127) or the CLI's "unknown command".
pub fn schema_fact(exit_code: i64, output: &str) -> SchemaFact {
    let lower = output.to_lowercase();
    if lower.contains("executable file not found") || lower.contains("no such file or directory") {
        SchemaFact::Absent("no immich-admin".into())
    } else if exit_code == 127 {
        SchemaFact::Absent("immich-admin not found".into())
    } else if exit_code != 0 && lower.contains("unknown command") {
        SchemaFact::Absent("immich-admin has no schema-check".into())
    } else {
        SchemaFact::Ran {
            exit_code,
            output: output.to_string(),
        }
    }
}

fn last_line(output: &str) -> String {
    shorten(
        output
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(no output)")
            .trim(),
    )
}

fn shorten(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn name_some(list: &[String]) -> String {
    let mut out = list[..list.len().min(SHOWN)].join(", ");
    if list.len() > SHOWN {
        out.push_str(&format!(" and {} more", list.len() - SHOWN));
    }
    out
}

// ---- gathering (I/O) ----

/// Gathers the facts and judges them: the one call restore and the daemon make.
pub async fn verify(docker: &Docker, docker_host: &str, stack: &Stack, plan: &Plan) -> Report {
    let baseline = plan.baseline.as_ref();
    let facts = gather(docker, docker_host, stack, baseline).await;
    let checks = evaluate(&facts, baseline, plan.expected_version.as_deref());
    let passed = checks.iter().all(|c| c.outcome != Outcome::Fail);
    Report {
        project: stack.project.clone(),
        against: baseline.map(|b| b.id.clone()),
        baseline_note: plan.note.clone(),
        expected_version: plan.expected_version.clone(),
        server_url: facts.server_url,
        at: Utc::now(),
        passed,
        checks,
        not_restored: None,
    }
}

/// Reads everything verify judges. Never fails: what cannot be read is a fact too.
pub async fn gather(
    docker: &Docker,
    docker_host: &str,
    stack: &Stack,
    baseline: Option<&Baseline>,
) -> Facts {
    let mut containers = Vec::new();
    let mut server = None;
    for (role, service, required) in [
        ("server", &stack.server, true),
        ("machine-learning", &stack.machine_learning, false),
        ("redis", &stack.redis, true),
        ("database", &stack.database, true),
    ] {
        let Some(service) = service else {
            if required {
                containers.push(ContainerFact {
                    role,
                    name: None,
                    state: String::new(),
                    health: None,
                });
            }
            continue;
        };
        let inspected = docker
            .inspect_container(&service.container_id, None::<InspectContainerOptions>)
            .await;
        let name = Some(service.container_name.clone());
        let (fact, inspected) = match inspected {
            Ok(c) => {
                let state = c.state.clone().unwrap_or_default();
                let fact = ContainerFact {
                    role,
                    name,
                    state: state.status.map(|s| s.to_string()).unwrap_or_default(),
                    health: state
                        .health
                        .and_then(|h| h.status)
                        .map(|s| s.to_string())
                        .filter(|s| !s.is_empty() && s != "none"),
                };
                (fact, Some(c))
            }
            Err(e) => {
                let state = format!("cannot inspect: {}", classify(docker_host, e));
                let fact = ContainerFact {
                    role,
                    name,
                    state,
                    health: None,
                };
                (fact, None)
            }
        };
        if role == "server" {
            server = inspected.map(|c| (c, fact.state == "running"));
        }
        containers.push(fact);
    }

    let candidates = server
        .as_ref()
        .map(|(c, _)| server_addresses(c))
        .unwrap_or_default();
    let (server_url, ping) = probe_server(&candidates).await;
    let version = match &server_url {
        Some(url) => Some(get(&format!("{url}/api/server/version")).await),
        None => None,
    };

    let counts = match &stack.db {
        Some(access) => crate::snapshot::db::facts(access)
            .await
            .map(|f| Counts {
                assets: f.assets,
                users: f.users,
            })
            .map_err(|e| e.to_string()),
        None => Err("database access unknown (no database container found)".into()),
    };

    let upload = stack.upload_location.clone();
    let manifest = baseline.map(|b| (b.manifest.clone(), b.excluded.clone()));
    let (originals, markers, marker_baseline) = tokio::task::spawn_blocking(move || {
        read_storage(
            upload.as_deref(),
            manifest.as_ref().map(|(p, e)| (p.as_path(), &e[..])),
        )
    })
    .await
    .unwrap_or_else(|e| {
        let e = format!("storage check thread: {e}");
        (Some(Err(e.clone())), Err(e), None)
    });

    let content = match baseline {
        Some(b) => {
            let (upload, source) = (stack.upload_location.clone(), b.content.clone());
            let looked =
                tokio::task::spawn_blocking(move || content::gather(upload.as_deref(), &source))
                    .await;
            Some(looked.unwrap_or_else(|e| Some(Err(format!("content check thread: {e}")))))
        }
        None => None,
    };
    let schema = match &server {
        Some((c, true)) => schema_check(docker, docker_host, c.id.as_deref().unwrap_or("")).await,
        _ => SchemaFact::NoServer,
    };
    Facts {
        containers,
        server_url,
        ping,
        version,
        counts,
        originals,
        markers,
        marker_baseline,
        content,
        schema,
    }
}

/// Where the host can reach the server, best first: its IP on each of its networks at the
/// port it listens on (the daemon runs on the host, which routes to bridge networks; no port
/// needs publishing), then any published port (rootless Docker, where container IPs are not
/// reachable from the host), then localhost (network_mode: host).
pub fn server_addresses(c: &bollard::models::ContainerInspectResponse) -> Vec<String> {
    let env = c
        .config
        .as_ref()
        .and_then(|c| c.env.clone())
        .unwrap_or_default();
    let port = env
        .iter()
        .find_map(|kv| kv.strip_prefix("IMMICH_PORT="))
        .and_then(|p| p.parse().ok())
        .unwrap_or(DEFAULT_PORT);
    let settings = c.network_settings.clone().unwrap_or_default();
    let mut out = Vec::new();
    let mut networks: Vec<_> = settings.networks.unwrap_or_default().into_iter().collect();
    networks.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, ep) in networks {
        if let Some(ip) = ep.ip_address.filter(|ip| !ip.is_empty()) {
            out.push(format!("http://{ip}:{port}"));
        }
    }
    if let Some(bindings) = settings
        .ports
        .unwrap_or_default()
        .remove(&format!("{port}/tcp"))
        .flatten()
    {
        for b in bindings {
            let Some(host_port) = b.host_port.filter(|p| !p.is_empty()) else {
                continue;
            };
            let ip = match b.host_ip.as_deref() {
                None | Some("" | "0.0.0.0") => "127.0.0.1".to_string(),
                Some("::") => "[::1]".to_string(),
                Some(ip) if ip.contains(':') => format!("[{ip}]"),
                Some(ip) => ip.to_string(),
            };
            out.push(format!("http://{ip}:{host_port}"));
        }
    }
    let host_mode = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        == Some("host");
    if host_mode {
        out.push(format!("http://127.0.0.1:{port}"));
    }
    out.dedup();
    out
}

/// Pings each candidate in turn; the first that answers HTTP at all is the server's address.
async fn probe_server(candidates: &[String]) -> (Option<String>, Option<Probe>) {
    let mut last = None;
    for url in candidates {
        match get(&format!("{url}/api/server/ping")).await {
            Ok(answer) => return (Some(url.clone()), Some(Ok(answer))),
            Err(e) => last = Some(Err(format!("{url}: {e}"))),
        }
    }
    (None, last)
}

/// One plain GET with a timeout; the status and body, or why there is none.
pub async fn get(url: &str) -> Probe {
    let client = reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(HTTP_TIMEOUT)
        // The server is on a local network; a proxy from the environment would not reach it.
        .no_proxy()
        .build()
        .map_err(|e| error_chain(&e))?;
    let response = client.get(url).send().await.map_err(|e| error_chain(&e))?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| error_chain(&e))?;
    Ok((status, body))
}

type StorageFacts = (
    Option<Originals>,
    Result<Vec<(String, Observed)>, String>,
    Option<BTreeSet<String>>,
);

fn observe(path: &Path) -> Observed {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Observed::Size(m.len()),
        Ok(_) => Observed::Error("not a regular file".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Observed::Missing,
        Err(e) => Observed::Error(e.to_string()),
    }
}

/// The markers under `upload`, and with a manifest every original it lists, looked up in the
/// live upload location (not the snapshot's recorded one: the stack may have moved).
fn read_storage(upload: Option<&Path>, manifest: Option<(&Path, &[String])>) -> StorageFacts {
    let unknown = "upload location unknown (set stack.upload_location)".to_string();
    let markers = match upload {
        Some(root) => Ok(MARKER_FOLDERS
            .iter()
            .map(|f| (f.to_string(), observe(&root.join(f).join(MARKER))))
            .collect()),
        None => Err(unknown.clone()),
    };
    let Some((manifest, excluded)) = manifest else {
        return (None, markers, None);
    };
    let entries = match read_manifest(manifest) {
        Ok(e) => e,
        Err(e) => {
            let e = format!(
                "cannot read the snapshot's manifest {}: {e}",
                manifest.display()
            );
            return (Some(Err(e)), markers, None);
        }
    };
    let mut marker_baseline: BTreeSet<String> = excluded.iter().cloned().collect();
    for e in &entries {
        if let Some((folder, MARKER)) = e.path.split_once('/') {
            marker_baseline.insert(folder.to_string());
        }
    }
    let originals = match upload {
        Some(root) => Ok(originals(&entries)
            .map(|e| (e.path.clone(), e.size, observe(&root.join(&e.path))))
            .collect()),
        None => Err(unknown),
    };
    (Some(originals), markers, Some(marker_baseline))
}

/// Runs `immich-admin schema-check` in the server container, bounded by a timeout.
async fn schema_check(docker: &Docker, host: &str, container: &str) -> SchemaFact {
    let run = async {
        let cmd = vec!["immich-admin".into(), "schema-check".into()];
        let (exec_id, mut stream) =
            crate::docker::exec_attached(docker, host, container, cmd, None, None)
                .await
                .map_err(|e| e.to_string())?;
        let mut output = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => output.push_str(&String::from_utf8_lossy(&chunk.into_bytes())),
                Err(e) => return Err(classify(host, e).to_string()),
            }
        }
        let code = crate::docker::exec_exit_code(docker, host, &exec_id)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((code, output))
    };
    match tokio::time::timeout(SCHEMA_TIMEOUT, run).await {
        Err(_) => SchemaFact::Error(format!("no answer within {} s", SCHEMA_TIMEOUT.as_secs())),
        // A runtime that refuses the exec outright says "executable file not found" here.
        Ok(Err(e)) => match schema_fact(-1, &e) {
            SchemaFact::Ran { .. } => SchemaFact::Error(e),
            absent => absent,
        },
        Ok(Ok((code, output))) => schema_fact(code, &output),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline() -> Baseline {
        Baseline {
            id: "20261125T020000Z-v1.119.0-manual".into(),
            version: "v1.119.0".into(),
            assets: Some(40_000),
            users: Some(2),
            manifest: PathBuf::from("/nonexistent"),
            excluded: Vec::new(),
            content: content::Source::default(),
        }
    }

    fn running(role: &'static str) -> ContainerFact {
        ContainerFact {
            role,
            name: Some(format!("immich_{role}")),
            state: "running".into(),
            health: None,
        }
    }

    fn healthy_facts() -> Facts {
        Facts {
            containers: ["server", "machine-learning", "redis", "database"]
                .map(running)
                .to_vec(),
            server_url: Some("http://172.18.0.5:2283".into()),
            ping: Some(Ok((200, r#"{"res":"pong"}"#.into()))),
            version: Some(Ok((200, r#"{"major":1,"minor":119,"patch":0}"#.into()))),
            counts: Ok(Counts {
                assets: Some(40_002),
                users: Some(2),
            }),
            originals: Some(Ok(vec![
                ("upload/u/a.jpg".into(), 10, Observed::Size(10)),
                ("library/u/b.jpg".into(), 20, Observed::Size(20)),
                ("upload/u/a.jpg.xmp".into(), 5, Observed::Size(9)),
            ])),
            markers: Ok(MARKER_FOLDERS
                .iter()
                .map(|f| (f.to_string(), Observed::Size(0)))
                .collect()),
            marker_baseline: None,
            content: None,
            schema: SchemaFact::Absent("no immich-admin".into()),
        }
    }

    fn only_failure(facts: &Facts) -> Check {
        let b = baseline();
        let checks = evaluate(facts, Some(&b), Some("v1.119.0"));
        let failed: Vec<_> = checks
            .iter()
            .filter(|c| c.outcome == Outcome::Fail)
            .collect();
        assert_eq!(failed.len(), 1, "{checks:#?}");
        failed[0].clone()
    }

    #[test]
    fn a_healthy_stack_passes_every_line() {
        let b = baseline();
        let checks = evaluate(&healthy_facts(), Some(&b), Some("v1.119.0"));
        let names: Vec<_> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "containers",
                "ping",
                "version",
                "assets",
                "users",
                "originals",
                "markers",
                "schema"
            ]
        );
        for c in &checks[..7] {
            assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
        }
        assert_eq!(checks[7].outcome, Outcome::Skipped);
        assert_eq!(
            checks[7].detail,
            "skipped: not in this image (no immich-admin)"
        );
        assert_eq!(checks[3].detail, "40002 now, 40000 in the snapshot");
        assert!(
            checks[5].detail.starts_with("3/3 present"),
            "{}",
            checks[5].detail
        );
        assert_eq!(
            checks[0].detail,
            "4/4 running: server, machine-learning, redis, database"
        );
    }

    #[test]
    fn each_fault_fails_its_own_line() {
        let mut f = healthy_facts();
        f.containers[2].state = "exited".into();
        let c = only_failure(&f);
        assert_eq!(c.name, "containers");
        assert_eq!(c.detail, "3/4 running; redis (immich_redis) exited");

        let mut f = healthy_facts();
        f.containers[3].health = Some("unhealthy".into());
        assert!(
            only_failure(&f)
                .detail
                .contains("database (immich_database) running but unhealthy")
        );

        let mut f = healthy_facts();
        f.containers[1] = ContainerFact {
            name: None,
            ..running("machine-learning")
        };
        assert!(
            only_failure(&f)
                .detail
                .contains("machine-learning: no container found")
        );

        let mut f = healthy_facts();
        f.counts = Ok(Counts {
            assets: Some(0),
            users: Some(2),
        });
        let c = only_failure(&f);
        assert_eq!(
            (c.name.as_str(), c.detail.as_str()),
            ("assets", "0 now, 40000 in the snapshot")
        );

        let mut f = healthy_facts();
        f.counts = Ok(Counts {
            assets: Some(40_000),
            users: Some(1),
        });
        assert_eq!(only_failure(&f).name, "users");

        let mut f = healthy_facts();
        f.version = Some(Ok((200, r#"{"major":1,"minor":120,"patch":0}"#.into())));
        let c = only_failure(&f);
        assert_eq!(c.detail, "server answers v1.120.0, expected v1.119.0");

        let mut f = healthy_facts();
        f.ping = Some(Ok((502, "Bad Gateway".into())));
        assert_eq!(
            only_failure(&f).detail,
            "/api/server/ping answered 502 \"Bad Gateway\""
        );

        let mut f = healthy_facts();
        f.originals = Some(Ok(vec![
            ("upload/u/a.jpg".into(), 10, Observed::Missing),
            ("upload/u/b.jpg".into(), 10, Observed::Size(3)),
            ("upload/u/c.jpg".into(), 10, Observed::Size(10)),
        ]));
        let c = only_failure(&f);
        assert_eq!(c.name, "originals");
        assert_eq!(
            c.detail,
            "1/3 intact; 1 missing: upload/u/a.jpg; 1 size changed: upload/u/b.jpg (10 B then, 3 B now)"
        );

        let mut f = healthy_facts();
        f.markers.as_mut().unwrap()[1].1 = Observed::Missing;
        assert_eq!(
            only_failure(&f).detail,
            "5/6 present; upload/.immich missing"
        );

        let mut f = healthy_facts();
        f.schema = SchemaFact::Ran {
            exit_code: 1,
            output: "checking\nschema drift: column asset.foo missing\n".into(),
        };
        assert_eq!(
            only_failure(&f).detail,
            "immich-admin schema-check exited 1: schema drift: column asset.foo missing"
        );
    }

    #[test]
    fn without_a_snapshot_only_stack_lines_are_judged() {
        let mut f = healthy_facts();
        f.originals = None;
        f.counts = Ok(Counts {
            assets: Some(0),
            users: None,
        });
        let checks = evaluate(&f, None, Some("v1.119.0"));
        assert!(
            checks.iter().all(|c| c.outcome != Outcome::Fail),
            "{checks:#?}"
        );
        let skipped: Vec<_> = checks
            .iter()
            .filter(|c| c.outcome == Outcome::Skipped)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(skipped, ["assets", "users", "originals", "schema"]);
        assert_eq!(checks[3].detail, "0 now; no snapshot to compare with");
        assert_eq!(
            checks[4].detail,
            "no table now; no snapshot to compare with"
        );
        // An image that names no version: nothing to compare with, not a failure.
        let v = check_version(f.version.as_ref(), None);
        assert_eq!(v.outcome, Outcome::Skipped);
    }

    #[test]
    fn many_missing_originals_are_counted_not_all_named() {
        let files: Vec<_> = (0..10)
            .map(|i| (format!("upload/{i}.jpg"), 1, Observed::Missing))
            .collect();
        let c = check_originals(Some(&Ok(files)), Some(&baseline()));
        assert_eq!(
            c.detail,
            "0/10 intact; 10 missing: upload/0.jpg, upload/1.jpg, upload/2.jpg and 7 more"
        );
    }

    #[test]
    fn markers_the_snapshot_never_had_are_not_required() {
        let found: Vec<_> = MARKER_FOLDERS
            .iter()
            .map(|f| {
                let o = if *f == "backups" {
                    Observed::Missing
                } else {
                    Observed::Size(0)
                };
                (f.to_string(), o)
            })
            .collect();
        let had: BTreeSet<String> = MARKER_FOLDERS[..5].iter().map(|s| s.to_string()).collect();
        let c = check_markers(&Ok(found.clone()), Some(&had));
        assert_eq!(c.outcome, Outcome::Pass);
        assert_eq!(
            c.detail,
            "5/5 storage folders hold .immich (backups not checked: none in the snapshot)"
        );
        assert_eq!(check_markers(&Ok(found), None).outcome, Outcome::Fail);
    }

    #[test]
    fn schema_check_absence_is_told_from_a_failure() {
        let oci = "OCI runtime exec failed: exec failed: unable to start container process: exec: \"immich-admin\": executable file not found in $PATH: unknown\r\n";
        assert_eq!(
            schema_fact(126, oci),
            SchemaFact::Absent("no immich-admin".into())
        );
        assert_eq!(
            schema_fact(127, "sh: immich-admin: not found"),
            SchemaFact::Absent("immich-admin not found".into())
        );
        assert_eq!(
            schema_fact(1, "error: unknown command 'schema-check'"),
            SchemaFact::Absent("immich-admin has no schema-check".into())
        );
        assert!(matches!(
            schema_fact(1, "drift"),
            SchemaFact::Ran { exit_code: 1, .. }
        ));
        assert_eq!(
            check_schema(&schema_fact(0, "No schema drift detected\n")).outcome,
            Outcome::Pass
        );
    }

    #[test]
    fn originals_are_files_under_the_original_folders() {
        let entry = |path: &str, kind| ManifestEntry {
            path: path.into(),
            kind,
            size: 1,
            mtime: 0,
            inode: 0,
            target: None,
        };
        let entries = vec![
            entry("upload", EntryKind::Dir),
            entry("upload/.immich", EntryKind::File),
            entry("upload/u/a.jpg", EntryKind::File),
            entry("library/u/2024/b.heic", EntryKind::File),
            entry("profile/u/p.jpg", EntryKind::File),
            entry("thumbs/u/a-thumbnail.webp", EntryKind::File),
            entry("encoded-video/u/v.mp4", EntryKind::File),
            entry("backups/dump.sql.gz", EntryKind::File),
            entry("library/escape", EntryKind::Symlink),
        ];
        let paths: Vec<_> = originals(&entries).map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["upload/u/a.jpg", "library/u/2024/b.heic", "profile/u/p.jpg"]
        );
    }

    fn image(tag: &str) -> ImmichVersion {
        ImmichVersion {
            tag: Some(tag.into()),
            image_id: format!("sha256:{tag}"),
            repo_digests: Vec::new(),
            repo_tags: Vec::new(),
            label: None,
        }
    }

    #[test]
    fn plans_expect_the_snapshot_version_or_the_image_version() {
        let meta: Meta = serde_json::from_value(serde_json::json!({
            "format": 1, "id": "20261125T020000Z-v1.119.0-pre-update", "trigger": "pre-update",
            "label": null, "project": "immich", "version": "v1.119.0",
            "image_id": "sha256:v1.119.0", "repo_digests": [], "env_version": "v1.120.0",
            "started_at": "2026-11-25T02:00:00Z", "sealed_at": "2026-11-25T02:00:05Z",
            "db": {"migrations": [], "typeorm_migrations": 0, "kysely_migrations": 0,
                   "assets": 40000, "users": 2, "database_bytes": 1},
            "dump": {"sql_bytes": 1, "bytes": 1, "sha256": "00", "duration_ms": 1},
            "storage": {"method": "hardlink", "files": 1, "dirs": 1, "symlinks": 0, "bytes": 1,
                        "excluded": ["thumbs"], "manifest_bytes": 1, "duration_ms": 1},
            "upload_location": "/srv/immich/library", "config_files": [], "size_bytes": 1
        }))
        .unwrap();
        let dir = Path::new("/snaps").join(&meta.id);
        let running = image("v1.120.0");
        // Restore / --against: the snapshot's version.
        let p = Plan::against(&meta, &dir, "x".into());
        assert_eq!(p.expected_version.as_deref(), Some("v1.119.0"));
        assert_eq!(
            p.baseline.as_ref().unwrap().manifest,
            dir.join(MANIFEST_FILE)
        );
        assert_eq!(p.baseline.as_ref().unwrap().assets, meta.db.assets);
        // After an upgrade: counts from the pre-update snapshot, the new image's version.
        let p = Plan::after_upgrade(&meta, &dir, Some(&running));
        assert_eq!(p.expected_version.as_deref(), Some("v1.120.0"));
        assert_eq!(p.baseline.unwrap().id, meta.id);
        // `:release` names no version: nothing to expect.
        assert_eq!(
            Plan::stack_only(String::new(), Some(&image("release"))).expected_version,
            None
        );
        // The newest of the running version, by name or by image, of this project only.
        let mut other = meta.clone();
        other.id = "later".into();
        other.sealed_at = meta.sealed_at + chrono::Duration::hours(1);
        other.project = "someone-else".into();
        let all = vec![meta.clone(), other];
        let v119 = image("v1.119.0");
        assert_eq!(
            newest_of_running(&all, &meta.project, Some(&v119))
                .unwrap()
                .id,
            meta.id
        );
        assert!(newest_of_running(&all, &meta.project, Some(&running)).is_none());
    }

    #[test]
    fn versions_compare_with_or_without_v() {
        assert_eq!(parse_version("v1.119.0"), Some((1, 119, 0)));
        assert_eq!(parse_version("1.119.0"), Some((1, 119, 0)));
        assert_eq!(parse_version("v2.0.0-rc.1"), Some((2, 0, 0)));
        assert_eq!(parse_version("release"), None);
        assert_eq!(parse_version("1.2"), None);
        let p = Some(Ok((
            200,
            r#"{"major":1,"minor":119,"patch":0}"#.to_string(),
        )));
        assert_eq!(
            check_version(p.as_ref(), Some("1.119.0")).outcome,
            Outcome::Pass
        );
        assert_eq!(
            check_version(p.as_ref(), Some("release")).outcome,
            Outcome::Fail
        );
    }

    #[test]
    fn the_server_is_reached_at_its_network_ip_then_published_ports() {
        let c: bollard::models::ContainerInspectResponse = serde_json::from_value(serde_json::json!({
            "Config": {"Env": ["IMMICH_PORT=3001"]},
            "NetworkSettings": {
                "Networks": {"b_net": {"IPAddress": "172.20.0.3"}, "a_net": {"IPAddress": "172.19.0.4"}},
                "Ports": {"3001/tcp": [{"HostIp": "0.0.0.0", "HostPort": "2283"}, {"HostIp": "::", "HostPort": "2283"}]}
            }
        }))
        .unwrap();
        assert_eq!(
            server_addresses(&c),
            [
                "http://172.19.0.4:3001",
                "http://172.20.0.3:3001",
                "http://127.0.0.1:2283",
                "http://[::1]:2283"
            ]
        );
    }
}
