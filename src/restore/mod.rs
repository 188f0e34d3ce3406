//! `immich-guard restore <snapshot>`: the stack back to a sealed snapshot, database and
//! storage from the same moment, its version pinned, then verified (docs/recovery.md §3, §5,
//! §6, §8). [`plan`] checks the snapshot (sealed, dump and manifest matching their recorded
//! SHA-256) and says every step before anything is touched; [`run`] takes the steps in order,
//! each recorded in the journal when finished, so running the same command again after a
//! kill finishes the restore. The current state is always kept first (a `pre-restore`
//! snapshot) unless the admin said `--no-preserve`; nothing is deleted that is not in it.
//!
//! The engine talks to its caller only through [`Progress`], so the CLI (daemon stopped) and
//! the daemon (streaming over the control socket, control/restore.rs) run the same code.

pub mod abandon;
pub mod content;
pub mod database;
pub mod journal;
pub mod kept;
pub mod preserve;
pub mod stack;
pub mod storage;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;

use crate::config::Config;
use crate::discover::Stack;
use crate::durable::PARTIAL_PREFIX;
use crate::snapshot::storage::StorageMethod;
use crate::snapshot::store::{MANIFEST_FILE, META_FILE, Meta, STORAGE_DIR};
use journal::{DbMode, Journal, Step};

/// Progress of a restore: a numbered step begins, or a note within it.
pub use crate::progress::Progress;

/// How long the server gets to answer `/api/server/ping` after `compose up`.
const PING_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a database gets to answer before the replay (a fresh cluster is initialised
/// first).
const DB_READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no snapshot {id} in {dir}; `immich-guard list` shows the sealed ones")]
    NotFound { id: String, dir: PathBuf },
    #[error(
        "snapshot {id} is not sealed ({path} is missing or unreadable: it was interrupted or is still being made); it cannot be restored"
    )]
    NotSealed { id: String, path: PathBuf },
    #[error(
        "{path} does not match the SHA-256 recorded in the snapshot's meta.json (recorded {recorded}, now {actual}): the file changed after the snapshot was sealed; refusing to restore from it"
    )]
    Tampered {
        path: PathBuf,
        recorded: String,
        actual: String,
    },
    #[error("cannot read {path}: {source}")]
    ReadSnapshot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {id} holds no database dump ({why}); it cannot be restored")]
    NoDump { id: String, why: String },
    #[error(
        "snapshot {id} is of compose project {snapshot_project}, not of {project}; restore it on its own stack"
    )]
    OtherProject {
        id: String,
        snapshot_project: String,
        project: String,
    },
    #[error("another restore is not finished: {0}")]
    OtherIncomplete(String),
    #[error(
        "{why}; the unfinished restore of {snapshot} cannot go on: `immich-guard restore --abandon` shows the stack's state and ends it"
    )]
    CannotContinue {
        snapshot: String,
        why: Box<RestoreError>,
    },
    #[error("{0}")]
    RerunOption(String),
    #[error("no unfinished restore to abandon ({path} holds none)")]
    NothingToAbandon { path: PathBuf },
    #[error("cannot restore: {what} unknown ({hint})")]
    Missing {
        what: &'static str,
        hint: &'static str,
    },
    #[error(
        "keeping the current state failed, so nothing was changed: {0}; fix that and run the restore again (or, knowing that the current state is then lost, `--no-preserve --yes`)"
    )]
    Preserve(crate::snapshot::SnapshotError),
    #[error("restore journal {path}: {source}")]
    Journal {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("Docker: {action}: {detail}")]
    Docker { action: String, detail: String },
    #[error("discovering the stack again: {0}")]
    Discover(String),
    #[error("database in {container}: {what}: {detail}")]
    Sql {
        container: String,
        what: String,
        detail: String,
    },
    #[error("the database in {container} did not answer: {detail}")]
    DbNotReady { container: String, detail: String },
    #[error(
        "replaying the dump in {container}: psql stopped at the first SQL error (exit code {code}):\n{stderr}"
    )]
    Replay {
        container: String,
        code: i64,
        stderr: String,
    },
    #[error("reading the dump {path}: {source}")]
    ReadDump {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tree(#[from] storage::TreeError),
    #[error(transparent)]
    Content(#[from] content::ContentError),
    #[error("pinning the snapshot's version: {0}")]
    Pin(#[from] crate::pin::PinError),
    #[error("{command} failed: {detail}")]
    Compose { command: String, detail: String },
    #[error("the server {container} did not answer /api/server/ping within {secs} s ({last})")]
    NoPing {
        container: String,
        secs: u64,
        last: String,
    },
}

/// What the restore works with: the engine, the config, the stack as discovered.
pub struct Ctx<'a> {
    pub docker: &'a Docker,
    pub host: &'a str,
    pub config: &'a Config,
    pub stack: &'a Stack,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Do not keep the current state first (the CLI allows it only with `--yes`).
    pub no_preserve: bool,
    /// Put back everything but the stored files found damaged, and list those (restore/content.rs).
    pub force: bool,
}

/// What the restore will find and do, decided before anything is touched.
#[derive(Debug, Clone)]
pub struct Plan {
    pub meta: Meta,
    /// The sealed snapshot's directory.
    pub dir: PathBuf,
    pub no_preserve: bool,
    /// How this run's options apply to the interrupted restore it continues.
    pub notes: Vec<String>,
    /// The journal of an interrupted restore of the same snapshot, continued.
    pub resume: Option<Journal>,
    /// `Ok`: the database answers now; `Err`: why not (it is started, and if it cannot
    /// start, kept as files and replaced by a fresh cluster).
    pub database_now: Result<(), String>,
    /// Where the snapshot's files are (its `storage/`, or the ZFS snapshot's directory).
    pub storage_source: PathBuf,
    /// The live upload location the tree goes back to.
    pub upload: PathBuf,
    pub pin: crate::pin::Plan,
    /// The compose command line that brings the stack up.
    pub up: String,
    /// The stored files to put back, checked against the manifest's content hashes.
    pub content: content::Content,
}

/// What a finished restore did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub snapshot: String,
    pub pre_restore: Option<String>,
    pub resumed: bool,
    pub database: DbMode,
    pub tree: Option<storage::TreeRestored>,
    /// Set aside rather than deleted.
    pub kept: Vec<PathBuf>,
    pub verify: crate::verify::Report,
    pub journal: PathBuf,
}

impl Outcome {
    /// One line: what was restored, what was kept, what was set aside.
    pub fn summary(&self, project: &str) -> String {
        let skipped = self.tree.as_ref().map_or(&[][..], |t| &t.skipped[..]);
        format!(
            "restored {project} to {}{}{}{}",
            self.snapshot,
            if skipped.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} damaged file(s) in the snapshot NOT restored (--force): {}",
                    skipped.len(),
                    skipped.join(", ")
                )
            },
            self.pre_restore
                .as_deref()
                .map(|p| format!("; the state before is kept as snapshot {p}"))
                .unwrap_or_else(|| "; the state before was NOT kept (--no-preserve)".into()),
            if self.kept.is_empty() {
                String::new()
            } else {
                format!(
                    "; set aside: {}",
                    self.kept
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )
    }
}

/// A failed restore's message, with how to finish it when it stopped part-way.
pub fn failure_message(data_dir: &Path, error: &RestoreError) -> String {
    match journal::load(data_dir)
        .ok()
        .flatten()
        .filter(|j| !j.is_complete())
    {
        Some(j) => {
            let done: Vec<&str> = j.done.iter().map(|s| s.name()).collect();
            format!(
                "{error}\nthe restore is not finished (done: {}); once the cause is fixed, `{}` continues it",
                if done.is_empty() {
                    "nothing".to_string()
                } else {
                    done.join(", ")
                },
                j.finish_command()
            )
        }
        None => error.to_string(),
    }
}

/// Reads and checks the snapshot, the journal and the stack; touches nothing.
pub async fn plan(ctx: &Ctx<'_>, id: &str, options: Options) -> Result<Plan, RestoreError> {
    let data_dir = &ctx.config.daemon.data_dir;
    let resume = match journal::load(data_dir)? {
        Some(j) if !j.is_complete() && j.snapshot != id => {
            return Err(RestoreError::OtherIncomplete(j.describe()));
        }
        Some(j) if !j.is_complete() => Some(j),
        _ => None,
    };
    let snapshots = ctx.config.snapshot_dir();
    let (meta, dir) = check_snapshot(&snapshots, id).map_err(|e| match &resume {
        Some(_) => RestoreError::CannotContinue {
            snapshot: id.to_string(),
            why: Box::new(e),
        },
        None => e,
    })?;
    let (no_preserve, notes) = rerun_options(resume.as_ref(), options)?;
    if meta.project != ctx.stack.project {
        return Err(RestoreError::OtherProject {
            id: id.to_string(),
            snapshot_project: meta.project.clone(),
            project: ctx.stack.project.clone(),
        });
    }
    let database_now = match &ctx.stack.database {
        Some(db) => {
            let access = access(ctx.stack)?;
            database::psql(
                ctx.docker,
                ctx.host,
                &db.container_name,
                access,
                "postgres",
                "SELECT 1",
                false,
            )
            .await
            .map(|_| ())
        }
        None => Err("no database container found".to_string()),
    };
    let storage_source = meta
        .storage
        .source
        .clone()
        .unwrap_or_else(|| dir.join(STORAGE_DIR));
    let upload = ctx
        .stack
        .upload_location
        .clone()
        .unwrap_or_else(|| meta.upload_location.clone());
    let pin = crate::pin::plan_for(ctx.stack, &meta.version)?;
    let content = {
        let (meta, dir) = (meta.clone(), dir.clone());
        let (source, upload) = (storage_source.clone(), upload.clone());
        tokio::task::spawn_blocking(move || {
            let manifest = dir.join(MANIFEST_FILE);
            let entries = crate::snapshot::storage::read_manifest(&manifest).map_err(|source| {
                RestoreError::ReadSnapshot {
                    path: manifest.clone(),
                    source,
                }
            })?;
            let method = meta.storage.method;
            let would_replace =
                |snap: &std::fs::Metadata, live: &Path| storage::would_replace(snap, live, method);
            content::check_before(
                &meta,
                &dir,
                &source,
                &upload,
                &entries,
                options.force,
                &would_replace,
            )
            .map_err(RestoreError::from)
        })
        .await
        .expect("content check thread")?
    };
    Ok(Plan {
        no_preserve,
        notes,
        content,
        resume,
        database_now,
        storage_source,
        upload,
        pin,
        up: stack::up_command_line(ctx.stack).await,
        meta,
        dir,
    })
}

/// `--no-preserve` on a rerun: honoured while it still means something, refused (with the
/// reason) once it cannot; never silently replaced by what the journal says.
fn rerun_options(
    resume: Option<&Journal>,
    options: Options,
) -> Result<(bool, Vec<String>), RestoreError> {
    let Some(j) = resume else {
        return Ok((options.no_preserve, Vec::new()));
    };
    match (j.no_preserve, options.no_preserve) {
        (false, true) if j.pre_restore.is_some() => Ok((
            true,
            vec![format!(
                "--no-preserve: the state before the restore was kept before the interruption as {}; it stays, and it is not kept again",
                j.pre_restore.as_deref().unwrap_or_default()
            )],
        )),
        (false, true) => Ok((
            true,
            vec!["--no-preserve: the state before the restore is not kept (nothing was kept before the interruption)".into()],
        )),
        (true, false) if j.changed_data() => Err(RestoreError::RerunOption(format!(
            "this restore of {} began with --no-preserve and has already changed the data, so the state before it can no longer be kept; finish it with `{}`, or end it with `immich-guard restore --abandon`",
            j.snapshot,
            j.finish_command()
        ))),
        (true, false) => Ok((
            false,
            vec!["the interrupted restore began with --no-preserve; it changed no data yet, so the current state is kept now".into()],
        )),
        (same, _) => Ok((same, Vec::new())),
    }
}

fn access(stack: &Stack) -> Result<&crate::discover::DbAccess, RestoreError> {
    stack.db.as_ref().ok_or(RestoreError::Missing {
        what: "database access",
        hint: "set the [database] keys",
    })
}

/// The sealed snapshot `id` in `snapshots`, its dump and manifest checked against the
/// SHA-256 recorded when it was sealed.
pub fn check_snapshot(snapshots: &Path, id: &str) -> Result<(Meta, PathBuf), RestoreError> {
    let dir = snapshots.join(id);
    if id.is_empty() || id.starts_with('.') || id.contains('/') || !dir.is_dir() {
        let partial = snapshots.join(format!("{PARTIAL_PREFIX}{id}"));
        if !id.is_empty() && !id.contains('/') && partial.exists() {
            return Err(RestoreError::NotSealed {
                id: id.to_string(),
                path: partial.join(META_FILE),
            });
        }
        return Err(RestoreError::NotFound {
            id: id.to_string(),
            dir: snapshots.to_path_buf(),
        });
    }
    let meta_path = dir.join(META_FILE);
    let meta = crate::snapshot::store::read_meta(&dir)
        .ok()
        .ok_or_else(|| RestoreError::NotSealed {
            id: id.to_string(),
            path: meta_path.clone(),
        })?;
    if meta.dump.sha256.is_empty() {
        return Err(RestoreError::NoDump {
            id: id.to_string(),
            why: meta
                .label
                .clone()
                .unwrap_or_else(|| "no checksum recorded".into()),
        });
    }
    let dump = dir.join(crate::snapshot::store::DUMP_FILE);
    check_sha(&dump, &meta.dump.sha256)?;
    let manifest = dir.join(MANIFEST_FILE);
    match &meta.storage.manifest_sha256 {
        Some(sha) => check_sha(&manifest, sha)?,
        // Snapshots sealed before the manifest's checksum was recorded: its size at least.
        None => {
            let (actual, len) = crate::snapshot::db::file_sha256(&manifest).map_err(|source| {
                RestoreError::ReadSnapshot {
                    path: manifest.clone(),
                    source,
                }
            })?;
            if len != meta.storage.manifest_bytes {
                return Err(RestoreError::Tampered {
                    path: manifest,
                    recorded: format!("{} bytes", meta.storage.manifest_bytes),
                    actual: format!("{len} bytes, SHA-256 {actual}"),
                });
            }
        }
    }
    Ok((meta, dir))
}

fn check_sha(path: &Path, recorded: &str) -> Result<(), RestoreError> {
    let (actual, _) =
        crate::snapshot::db::file_sha256(path).map_err(|source| RestoreError::ReadSnapshot {
            path: path.to_path_buf(),
            source,
        })?;
    if actual != recorded {
        return Err(RestoreError::Tampered {
            path: path.to_path_buf(),
            recorded: recorded.to_string(),
            actual,
        });
    }
    Ok(())
}

impl Plan {
    /// Every step, as the dry run and the confirmation show it.
    pub fn lines(&self, stack: &Stack) -> Vec<String> {
        let m = &self.meta;
        let mut out = vec![format!(
            "restore {} to snapshot {} (Immich {}, taken {}, trigger {}{}): {} assets, {} users, {} migrations; storage {} files by {}",
            stack.project,
            m.id,
            m.version,
            m.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            m.trigger,
            m.label
                .as_deref()
                .map(|l| format!(", {l}"))
                .unwrap_or_default(),
            m.db.assets.map_or("?".into(), |n| n.to_string()),
            m.db.users.map_or("?".into(), |n| n.to_string()),
            m.db.migrations.len(),
            m.storage.files,
            m.storage.method,
        )];
        out.push(format!(
            "checked: sealed; {} and {} match their recorded SHA-256",
            crate::snapshot::store::DUMP_FILE,
            MANIFEST_FILE
        ));
        out.extend(self.content.lines());
        if let Some(j) = &self.resume {
            out.push(format!(
                "continuing the interrupted restore started {} (done: {})",
                j.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
                if j.done.is_empty() {
                    "nothing".to_string()
                } else {
                    j.done
                        .iter()
                        .map(|s| s.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
        out.extend(self.notes.iter().cloned());
        let done = |s: Step| {
            if self.resume.as_ref().is_some_and(|j| j.is_done(s)) {
                " (done)"
            } else {
                ""
            }
        };
        let name =
            |s: &Option<crate::discover::Service>| s.as_ref().map(|s| s.container_name.clone());
        let db = name(&stack.database).unwrap_or_else(|| "the database".into());
        let s = Step::Stop;
        let stops = stack::writers(stack);
        out.push(format!(
            "{}. stop{}: {}, so that nothing writes from here on (the database too if it cannot start)",
            s.number(),
            done(s),
            stops.join(", ")
        ));
        let s = Step::Preserve;
        out.push(if self.no_preserve {
            format!(
                "{}. preserve{}: SKIPPED (--no-preserve): the current database and files are not kept",
                s.number(),
                done(s)
            )
        } else {
            format!(
                "{}. preserve{}: snapshot the current state (trigger pre-restore): {}; the upload location {}; the compose files",
                s.number(),
                done(s),
                match &self.database_now {
                    Ok(()) => "the database answers: dumped with pg_dumpall".to_string(),
                    Err(e) => format!(
                        "the database does not answer now ({e}): it is started; if it cannot start, it is stopped and its data dir {} is kept as files",
                        stack
                            .db_data_location
                            .as_deref()
                            .map_or("(unknown)".into(), |p| p.display().to_string())
                    ),
                },
                self.upload.display()
            )
        });
        let s = Step::Database;
        let dbname = stack
            .db
            .as_ref()
            .map_or("immich".into(), |a| a.database.clone());
        out.push(format!(
            "{}. database{}: drop database {dbname} in {db} and replay {} ({} MB of SQL) through psql with ON_ERROR_STOP and the search_path fix (a database that cannot start: a fresh cluster made by its image's entrypoint first)",
            s.number(),
            done(s),
            crate::snapshot::store::DUMP_FILE,
            m.dump.sql_bytes / 1_000_000
        ));
        let s = Step::Storage;
        out.push(format!(
            "{}. storage{}: {} back to the snapshot ({} files from {}, by {}); {}",
            s.number(),
            done(s),
            self.upload.display(),
            m.storage.files,
            self.storage_source.display(),
            match m.storage.method {
                StorageMethod::Btrfs => "its subvolume back in place, the live one kept beside it",
                StorageMethod::Hardlink => "hard links",
                StorageMethod::Reflink => "reflink copies",
                StorageMethod::Zfs | StorageMethod::Copy => "copies",
            },
            if self.no_preserve {
                "files added since are left in place; a changed file is moved aside to the data dir's kept/ before the snapshot's copy takes its place"
            } else {
                "a live file is removed or overwritten only where a pre-restore snapshot holds it (same size and bytes); anything else is moved aside to the data dir's kept/"
            }
        ));
        let s = Step::Pin;
        if self.pin.edits.is_empty() {
            out.push(format!(
                "{}. pin{}: the compose config already names {}",
                s.number(),
                done(s),
                self.pin.version
            ));
        } else {
            out.push(format!(
                "{}. pin{}: {} (the previous files are in the pre-restore snapshot's config/)",
                s.number(),
                done(s),
                self.pin.version
            ));
            out.extend(self.pin.lines().into_iter().map(|l| format!("   {l}")));
        }
        let s = Step::Start;
        out.push(format!(
            "{}. start{}: {} in {}, then wait for /api/server/ping",
            s.number(),
            done(s),
            self.up,
            stack::compose_dir(stack).display()
        ));
        let s = Step::Verify;
        out.push(format!(
            "{}. verify: immich-guard verify --against {}",
            s.number(),
            m.id
        ));
        out
    }
}

/// Test hook (debug builds only): `IMMICH_GUARD_RESTORE_KILL_AFTER=<point>` kills this
/// process with SIGKILL at that point, as a power cut would.
fn kill_point(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("IMMICH_GUARD_RESTORE_KILL_AFTER").as_deref() == Ok(point) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        std::thread::sleep(Duration::from_secs(60));
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

async fn rediscover(ctx: &Ctx<'_>) -> Result<Stack, RestoreError> {
    crate::discover::discover(ctx.docker, ctx.host, ctx.config)
        .await
        .map_err(|e| RestoreError::Discover(e.to_string()))
}

/// Runs the plan. Each finished step is recorded in the journal before the next begins. A
/// restore that fails before it changed any data (its stop or preserve step) gives the stack
/// back as it was: what it stopped is started again and no journal is left, so protection
/// stays on (the journal goes to the history with the reason).
pub async fn run(
    ctx: &Ctx<'_>,
    plan: &Plan,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Outcome, RestoreError> {
    let data_dir = &ctx.config.daemon.data_dir;
    let mut j = plan
        .resume
        .clone()
        .unwrap_or_else(|| Journal::new(&plan.meta.id, &ctx.stack.project, plan.no_preserve));
    // This run's options; `plan` refused the ones a resumed restore can no longer honour.
    j.no_preserve = plan.no_preserve;
    journal::save(data_dir, &mut j)?;
    let result = run_steps(ctx, plan, &mut j, progress).await;
    if let Err(e) = &result
        && !j.changed_data()
    {
        give_back(ctx, &mut j, e, progress).await;
    }
    result
}

/// A restore refused before it changed any data: the containers it stopped are started
/// again, the journal ends in the history (with the reason) and is removed.
async fn give_back(
    ctx: &Ctx<'_>,
    j: &mut Journal,
    error: &RestoreError,
    progress: &mut (dyn FnMut(Progress) + Send),
) {
    let data_dir = &ctx.config.daemon.data_dir;
    let mut not_started = Vec::new();
    for name in j.stopped.clone() {
        if let Err(e) = stack::start(ctx.docker, ctx.host, &name).await {
            not_started.push(format!("{name} ({e})"));
        }
    }
    j.refused = Some(error.to_string());
    let ended = journal::append_history(data_dir, j).and_then(|_| journal::remove(data_dir));
    progress(Progress::Note(match (&ended, not_started.is_empty()) {
        (Ok(()), true) => format!(
            "nothing was changed{}; no restore is pending and protection stays on",
            if j.stopped.is_empty() {
                String::new()
            } else {
                format!(": started {} again", j.stopped.join(", "))
            }
        ),
        (Ok(()), false) => {
            format!(
                "nothing was changed, but these did not start again: {}; start them by hand (`{}`)",
                not_started.join(", "),
                ctx.stack.compose_dir.as_deref().map_or(
                    "docker compose up -d".into(),
                    |d| format!("docker compose up -d in {}", d.display())
                )
            )
        }
        (Err(e), _) => format!(
            "nothing was changed, but the journal could not be ended ({e}); `immich-guard restore --abandon` ends it"
        ),
    }));
}

async fn run_steps(
    ctx: &Ctx<'_>,
    plan: &Plan,
    j: &mut Journal,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Outcome, RestoreError> {
    let data_dir = &ctx.config.daemon.data_dir;
    let resumed = plan.resume.is_some();
    let of = Step::ALL.len();
    let step = |progress: &mut (dyn FnMut(Progress) + Send), s: Step, msg: String| {
        progress(Progress::Step {
            n: s.number(),
            of,
            msg: format!("{}: {msg}", s.name()),
        })
    };
    let database = ctx.stack.database.as_ref().ok_or(RestoreError::Missing {
        what: "database container",
        hint: "set stack.database_container",
    })?;
    let db_name = database.container_name.clone();
    let access = access(ctx.stack)?;

    // 1. Nothing writes from here on: the state kept next is the last one. Until the data
    // is touched this is done again on every run: a resumed restore may find the stack
    // started meanwhile (by hand, or by Docker at boot), writing.
    if !j.changed_data() {
        let names = stack::writers(ctx.stack);
        step(progress, Step::Stop, names.join(", "));
        for name in &names {
            if stack::stop(ctx.docker, ctx.host, name).await? && !j.stopped.contains(name) {
                j.stopped.push(name.clone());
                journal::save(data_dir, j)?;
            }
        }
        journal::mark(data_dir, j, Step::Stop)?;
        kill_point("stop");
    }

    // 2. Keep the current state.
    let keep_now =
        !j.changed_data() && (!j.is_done(Step::Preserve) || !unchanged_since_kept(ctx, j).await);
    if keep_now {
        // A preserve cut off by a kill left a partial snapshot: never usable, removed.
        if let Ok(store) = crate::snapshot::store::Store::open(&ctx.config.snapshot_dir()) {
            let _ = store.clean_partials();
        }
        step(
            progress,
            Step::Preserve,
            if j.is_done(Step::Preserve) {
                "the stack ran since the state was kept: keeping it again".into()
            } else {
                "keeping the current state".into()
            },
        );
        let ready = match &plan.database_now {
            Ok(()) => Ok(()),
            Err(_) => {
                progress(Progress::Note(format!(
                    "starting {db_name} to see whether it can run"
                )));
                stack::start(ctx.docker, ctx.host, &db_name).await?;
                database::wait_ready(
                    ctx.docker,
                    ctx.host,
                    &db_name,
                    access,
                    false,
                    preserve::START_WAIT,
                )
                .await
            }
        };
        let mode = match ready {
            Ok(()) => DbMode::Replay,
            Err(last) => {
                let reason = match database::log_tail(ctx.docker, &db_name, 3).await {
                    tail if tail.is_empty() => last,
                    tail => format!("{last}; its log ends: {tail}"),
                };
                progress(Progress::Note(format!(
                    "{db_name} cannot run: {reason}; stopping it"
                )));
                stack::stop(ctx.docker, ctx.host, &db_name).await?;
                DbMode::FreshCluster { reason, kept: None }
            }
        };
        let label = format!("before restoring {}", plan.meta.id);
        let mode = match (plan.no_preserve, mode) {
            (true, DbMode::FreshCluster { reason, .. }) => {
                let dir = db_data_dir(ctx.stack)?;
                let kept = aside_name(&dir);
                progress(Progress::Note(format!(
                    "not preserving (--no-preserve); the database data dir is set aside as {}",
                    kept.display()
                )));
                DbMode::FreshCluster {
                    reason,
                    kept: Some(kept),
                }
            }
            (true, mode) => {
                progress(Progress::Note(
                    "not preserving the current state (--no-preserve)".into(),
                ));
                mode
            }
            (false, DbMode::Replay) => {
                let fresh = rediscover(ctx).await?;
                let kept = preserve::take_dumped(ctx, &fresh, label, progress).await?;
                j.add_pre_restore(kept.meta.id);
                DbMode::Replay
            }
            (false, DbMode::FreshCluster { reason, .. }) => {
                // Its data dir moves into the snapshot: from here the data is changed, and
                // a failure is finished, never given back.
                j.database = Some(DbMode::FreshCluster {
                    reason: reason.clone(),
                    kept: None,
                });
                journal::save(data_dir, j)?;
                let kept = preserve::take_files(ctx, ctx.stack, &reason, progress).await?;
                j.add_pre_restore(kept.meta.id);
                DbMode::FreshCluster { reason, kept: None }
            }
        };
        j.database = Some(mode);
        journal::mark(data_dir, j, Step::Preserve)?;
        if let Some(id) = &j.pre_restore {
            progress(Progress::Note(format!(
                "current state kept as snapshot {id}"
            )));
        }
        kill_point("preserve");
    } else if j.is_done(Step::Preserve) && !j.changed_data() {
        step(
            progress,
            Step::Preserve,
            format!(
                "kept before the interruption as {} (nothing written since)",
                j.pre_restore
                    .as_deref()
                    .unwrap_or("nothing (--no-preserve)")
            ),
        );
    }
    let mode = j.database.clone().unwrap_or(DbMode::Replay);

    // The database is stopped too when a fresh cluster replaces it.
    if matches!(mode, DbMode::FreshCluster { .. }) && !j.is_done(Step::Database) {
        stack::stop(ctx.docker, ctx.host, &db_name).await?;
    }

    // 3. The database.
    if !j.is_done(Step::Database) {
        journal::touch_data(data_dir, j)?;
        let dump = plan.dir.join(crate::snapshot::store::DUMP_FILE);
        let tcp = match &mode {
            DbMode::Replay => {
                step(
                    progress,
                    Step::Database,
                    format!("replaying the dump into {db_name}"),
                );
                false
            }
            DbMode::FreshCluster { kept, .. } => {
                step(
                    progress,
                    Step::Database,
                    format!("a fresh cluster in {db_name}, then the dump"),
                );
                stack::stop(ctx.docker, ctx.host, &db_name).await?;
                let dir = db_data_dir(ctx.stack)?;
                match kept {
                    Some(aside) if !aside.exists() => {
                        let like = std::fs::metadata(&dir).map_err(|source| RestoreError::Io {
                            path: dir.clone(),
                            action: "reading it",
                            source,
                        })?;
                        std::fs::rename(&dir, aside).map_err(|source| RestoreError::Io {
                            path: dir.clone(),
                            action: "setting it aside",
                            source,
                        })?;
                        preserve::recreate_empty(&dir, &like)?;
                        if !j.kept.contains(aside) {
                            j.kept.push(aside.clone());
                            journal::save(data_dir, j)?;
                        }
                    }
                    // Its old contents are in the pre-restore snapshot (or aside); what is
                    // there now is at most a cluster an interrupted restore made.
                    _ => preserve::empty_dir(&dir)?,
                }
                progress(Progress::Note(format!(
                    "starting {db_name} on an empty data dir: its entrypoint initialises the cluster"
                )));
                true
            }
        };
        stack::start(ctx.docker, ctx.host, &db_name).await?;
        database::wait_ready(
            ctx.docker,
            ctx.host,
            &db_name,
            access,
            tcp,
            DB_READY_TIMEOUT,
        )
        .await
        .map_err(|detail| RestoreError::DbNotReady {
            container: db_name.clone(),
            detail,
        })?;
        let ended = database::end_earlier_replays(ctx.docker, ctx.host, &db_name, access).await?;
        if ended > 0 {
            progress(Progress::Note(format!(
                "ended {ended} session(s) of the interrupted replay"
            )));
        }
        database::drop_database(ctx.docker, ctx.host, &db_name, access).await?;
        progress(Progress::Note(format!(
            "dropped database {}; replaying {} MB of SQL",
            access.database,
            plan.meta.dump.sql_bytes / 1_000_000
        )));
        let replayed = database::replay(ctx.docker, ctx.host, &db_name, access, &dump, &mut || {
            kill_point("database-replay")
        })
        .await?;
        progress(Progress::Note(format!(
            "replayed {} MB of SQL in {:.1} s",
            replayed.sql_bytes / 1_000_000,
            replayed.duration_ms as f64 / 1000.0
        )));
        journal::mark(data_dir, j, Step::Database)?;
        kill_point("database");
    }

    // 4. The files.
    let mut tree = None;
    if !j.is_done(Step::Storage) {
        step(
            progress,
            Step::Storage,
            format!(
                "{} back to the snapshot by {}",
                plan.upload.display(),
                plan.meta.storage.method
            ),
        );
        // A subvolume goes back whole: with damaged files to leave out, file by file.
        let swapped = if plan.meta.storage.method == StorageMethod::Btrfs
            && plan.content.damaged.is_empty()
            && crate::snapshot::storage::is_btrfs_subvolume(&plan.storage_source)
            && (crate::snapshot::storage::is_btrfs_subvolume(&plan.upload) || !plan.upload.exists())
        {
            let stamp = j.started_at.format("%Y%m%dT%H%M%SZ").to_string();
            let (_, kept) = storage::btrfs_names(&plan.upload, &stamp);
            if !j.kept.contains(&kept) {
                j.kept.push(kept.clone());
                journal::save(data_dir, j)?;
            }
            let (snap, upload) = (plan.storage_source.clone(), plan.upload.clone());
            match tokio::task::spawn_blocking(move || {
                storage::swap_subvolume(&snap, &upload, &kept)
            })
            .await
            .expect("btrfs thread")
            {
                Ok(kept) => {
                    progress(Progress::Note(format!(
                        "the snapshot's subvolume is in place; the replaced one is kept as {}",
                        kept.display()
                    )));
                    true
                }
                Err(e) => {
                    progress(Progress::Note(format!(
                        "{e}; putting the files back one by one instead"
                    )));
                    j.kept.retain(|k| k.exists());
                    false
                }
            }
        } else {
            false
        };
        if !swapped {
            let manifest = plan.dir.join(MANIFEST_FILE);
            let entries = crate::snapshot::storage::read_manifest(&manifest).map_err(|source| {
                RestoreError::ReadSnapshot {
                    path: manifest.clone(),
                    source,
                }
            })?;
            let (source, upload) = (plan.storage_source.clone(), plan.upload.clone());
            let method = plan.meta.storage.method;
            let excluded = plan.meta.storage.excluded.clone();
            // Only what a pre-restore snapshot holds may be removed; without one (as with
            // --no-preserve) what the snapshot does not list stays.
            let pre_restores = j.all_pre_restores();
            let mut keep = kept::Keep::new(
                kept::Holders::new(&ctx.config.snapshot_dir(), pre_restores),
                kept::Aside::new(data_dir, &j.id()),
            );
            let content = plan.content.clone();
            let (done, keep) = tokio::task::spawn_blocking(move || {
                storage::restore_tree(
                    &source, &entries, &upload, method, &excluded, &mut keep, &content,
                )
                .map(|done| (done, keep))
            })
            .await
            .expect("storage restore thread")?;
            let aside = keep.aside.dir().to_path_buf();
            if aside.exists() && !j.kept.contains(&aside) {
                j.kept.push(aside.clone());
                journal::save(data_dir, j)?;
            }
            for line in storage_lines(&done, &keep) {
                progress(Progress::Note(line));
            }
            if !done.skipped.is_empty() {
                progress(Progress::Note(format!(
                    "--force: {} damaged file(s) NOT put back, left as they were: {}",
                    done.skipped.len(),
                    done.skipped.join(", ")
                )));
            }
            tree = Some(done);
        }
        journal::mark(data_dir, j, Step::Storage)?;
        kill_point("storage");
    }

    // 5. The version that matches the data.
    if !j.is_done(Step::Pin) {
        step(progress, Step::Pin, plan.meta.version.clone());
        let pin = crate::pin::plan_for(ctx.stack, &plan.meta.version)?;
        if pin.edits.is_empty() {
            progress(Progress::Note(format!(
                "the compose config already names {}",
                pin.version
            )));
        } else {
            for line in pin.lines() {
                progress(Progress::Note(line));
            }
            let at = chrono::Utc::now();
            // The previous files are in the pre-restore snapshot's config/; without one, beside.
            let backup = if j.pre_restore.is_some() {
                crate::pin::Backup::None
            } else {
                crate::pin::Backup::Beside
            };
            let applied = crate::pin::apply(&pin, &backup, at)?;
            let verdict = crate::pin::judge(
                &pin.version,
                Some(&plan.meta.project),
                std::slice::from_ref(&plan.meta),
                Ok(&plan.meta.db.migrations),
            );
            crate::pin::record(
                data_dir,
                &crate::pin::PinRecord {
                    at,
                    project: ctx.stack.project.clone(),
                    version: pin.version.clone(),
                    forced: false,
                    verdict,
                    files: applied.written.clone(),
                    backups: applied.backups.iter().map(|(_, b)| b.clone()).collect(),
                    by: crate::pin::who(),
                },
            )?;
        }
        journal::mark(data_dir, j, Step::Pin)?;
        kill_point("pin");
    }

    // 6. Up, as deployed.
    if !j.is_done(Step::Start) {
        step(progress, Step::Start, plan.up.clone());
        stack::compose_up(ctx.stack).await?;
        let fresh = rediscover(ctx).await?;
        let url = stack::wait_ping(ctx.docker, &fresh, PING_TIMEOUT).await?;
        progress(Progress::Note(format!(
            "{url}/api/server/ping answers pong"
        )));
        journal::mark(data_dir, j, Step::Start)?;
        kill_point("start");
    }

    // 7. Proof.
    step(
        progress,
        Step::Verify,
        format!("verify --against {}", plan.meta.id),
    );
    let fresh = rediscover(ctx).await?;
    let mut verify_plan = crate::verify::Plan::against(
        &plan.meta,
        &plan.dir,
        format!("the restored snapshot {}", plan.meta.id),
    );
    if let Some(b) = &mut verify_plan.baseline {
        b.content.left_by_restore = plan
            .content
            .damaged
            .iter()
            .map(|d| d.path.clone())
            .collect();
    }
    let mut report = crate::verify::verify(ctx.docker, ctx.host, &fresh, &verify_plan).await;
    // What was uploaded after the restored snapshot: the phones upload it again.
    if let (Some(id), Some(access)) = (&j.pre_restore, fresh.db.as_ref()) {
        let dir = ctx.config.snapshot_dir();
        report.not_restored = Some(crate::verify::not_restored::compare(&dir, id, access).await);
    }
    j.verify_passed = Some(report.passed());
    j.completed_at = Some(chrono::Utc::now());
    journal::mark(data_dir, j, Step::Verify)?;
    journal::append_history(data_dir, j)?;
    Ok(Outcome {
        snapshot: plan.meta.id.clone(),
        pre_restore: j.pre_restore.clone(),
        resumed,
        database: mode,
        tree,
        kept: j.kept.clone(),
        verify: report,
        journal: journal::path(data_dir),
    })
}

/// Whether nothing was written since the newest pre-restore snapshot of this restore (the
/// database's transaction snapshot and the upload folders as it recorded them: the rule that
/// keeps protection from snapshotting one state twice, snapshot/unchanged.rs). Anything that
/// cannot be read counts as written: the state is kept again.
async fn unchanged_since_kept(ctx: &Ctx<'_>, j: &Journal) -> bool {
    let Some(id) = &j.pre_restore else {
        // --no-preserve: nothing was kept, nothing is to keep.
        return j.no_preserve;
    };
    let Ok(meta) = crate::snapshot::store::read_meta(&ctx.config.snapshot_dir().join(id)) else {
        return false;
    };
    let (Some(access), Some(upload)) = (ctx.stack.db.as_ref(), &ctx.stack.upload_location) else {
        return false;
    };
    let Ok(now) = crate::snapshot::db::facts(access).await else {
        return false;
    };
    let mark = crate::snapshot::unchanged::upload_mark(upload);
    crate::snapshot::unchanged::covering(
        std::slice::from_ref(&meta),
        &meta.project,
        &meta.version,
        None,
        &now,
        mark.as_deref(),
    )
    .is_some()
}

/// What the storage step did, truthfully: what went back, what was removed and which
/// pre-restore snapshot holds it, what was moved aside and where.
fn storage_lines(done: &storage::TreeRestored, keep: &kept::Keep) -> Vec<String> {
    const LISTED: usize = 20;
    let held: Vec<String> = keep
        .held
        .iter()
        .map(|(id, n)| format!("{n} in {id}"))
        .collect();
    let mut out = vec![format!(
        "{} files put back, {} unchanged; {} removed or overwritten, each held by a pre-restore snapshot{}; {} moved aside to {}; {} left in place",
        done.replaced,
        done.unchanged,
        keep.held.values().sum::<u64>(),
        if held.is_empty() {
            String::new()
        } else {
            format!(" ({})", held.join(", "))
        },
        done.moved_aside,
        keep.aside.dir().display(),
        done.left,
    )];
    if !keep.aside.moved.is_empty() {
        out.push(format!(
            "in no snapshot, so moved aside (kept under {}): {}{}",
            keep.aside.dir().display(),
            keep.aside
                .moved
                .iter()
                .take(LISTED)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if keep.aside.moved.len() > LISTED {
                format!(" and {} more", keep.aside.moved.len() - LISTED)
            } else {
                String::new()
            }
        ));
    }
    out
}

fn db_data_dir(stack: &Stack) -> Result<PathBuf, RestoreError> {
    stack.db_data_location.clone().ok_or(RestoreError::Missing {
        what: "database data dir",
        hint: "set stack.db_data_location",
    })
}

/// `<dir>.immich-guard-set-aside-<time>`, beside it.
fn aside_name(dir: &Path) -> PathBuf {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    dir.with_file_name(format!(
        "{name}.immich-guard-set-aside-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon will run the engine in a task of its own: its future must be `Send`.
    #[allow(dead_code)]
    fn run_can_be_spawned(ctx: &Ctx<'_>, plan: &Plan, progress: &mut (dyn FnMut(Progress) + Send)) {
        fn send<T: Send>(_: T) {}
        send(run(ctx, plan, progress));
    }

    #[test]
    fn a_missing_or_unsealed_snapshot_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_snapshot(dir.path(), "nope").unwrap_err();
        assert!(matches!(e, RestoreError::NotFound { .. }), "{e}");
        std::fs::create_dir(dir.path().join(".partial-half")).unwrap();
        let e = check_snapshot(dir.path(), "half").unwrap_err();
        assert!(e.to_string().contains("is not sealed"), "{e}");
        std::fs::create_dir(dir.path().join("nometa")).unwrap();
        let e = check_snapshot(dir.path(), "nometa").unwrap_err();
        assert!(e.to_string().contains("meta.json"), "{e}");
        for bad in ["", "../x", ".partial-half"] {
            assert!(check_snapshot(dir.path(), bad).is_err(), "{bad:?}");
        }
    }
}
