//! The restore drill (docs/operations.md "Restore drills"): proves a sealed snapshot restores.
//! Its dump, read back from disk and checked against the SHA-256 in meta.json, is replayed the
//! way a restore replays it (restore/database.rs: the search_path fix, psql with
//! ON_ERROR_STOP) into a scratch database from the live database's image (`scratch`); the
//! migrations and asset/user counts read back must equal meta.json's, and every original of
//! the manifest must be in the snapshot's storage at its recorded size, with a sample read
//! whole and hashed. The result goes into meta.json (`store::update_meta`). A drill never
//! touches the live database or files: the scratch container has no network and no writable
//! mount of theirs. `queue` runs drills one at a time for the daemon.

pub mod queue;
pub mod scratch;

use std::path::Path;
use std::time::Instant;

use bollard::Docker;
use chrono::Utc;

use crate::config::Config;
use crate::discover::DbAccess;
use crate::restore::database;
use crate::snapshot::hashes;
use crate::snapshot::store::{DUMP_FILE, DrillResult, MANIFEST_FILE, Meta, read_meta, update_meta};
use scratch::Scratch;

/// Originals read whole and hashed per drill, spread evenly over the manifest: enough to catch
/// a storage that lists files it cannot give back, bounded so a drill of 200,000 files stays
/// short (the content-hash pass reads them all, at low priority).
pub const SAMPLE: usize = 32;

/// Why no drill could be run (nothing recorded: there is no result to record).
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("no sealed snapshot {id} in {dir}")]
    NoSnapshot { id: String, dir: std::path::PathBuf },
    #[error("snapshot {id}: meta.json cannot be read: {detail}")]
    Meta { id: String, detail: String },
    #[error(
        "snapshot {id} holds no database dump (a pre-restore snapshot of a database that would not answer): there is nothing to replay"
    )]
    NoDump { id: String },
    #[error("no sealed snapshot to drill in {dir}")]
    Empty { dir: std::path::PathBuf },
    #[error("the drill result of {id} cannot be recorded in its meta.json: {source}")]
    Record { id: String, source: std::io::Error },
}

/// What the drill knows of the live stack: its database container (for the image and its
/// settings) and how to connect.
#[derive(Clone, Default)]
pub struct Live {
    pub container: Option<String>,
    pub access: Option<DbAccess>,
}

impl Live {
    pub fn of(stack: Option<&crate::discover::Stack>) -> Live {
        Live {
            container: stack
                .and_then(|s| s.database.as_ref())
                .map(|d| d.container_name.clone()),
            access: stack.and_then(|s| s.db.clone()),
        }
    }
}

/// Where and with what a drill runs.
pub struct Context<'a> {
    pub docker: &'a Docker,
    pub host: &'a str,
    pub config: &'a Config,
    pub live: &'a Live,
}

/// A note for whoever watches (the CLI's progress lines, the daemon's log).
pub type Notes<'a> = &'a (dyn Fn(String) + Send + Sync);

/// Starts a scratch database for a drill of a snapshot not yet sealed (with its dump and
/// storage running meanwhile): sized from `size_hint`, the newest snapshot's database.
pub async fn prepare(
    ctx: &Context<'_>,
    size_hint: Option<&Meta>,
    label: &str,
) -> Result<Scratch, String> {
    let spec = scratch::spec(
        ctx.docker,
        ctx.live.container.as_deref(),
        ctx.live.access.as_ref(),
        size_hint,
    )
    .await?;
    scratch::start(
        ctx.docker,
        ctx.host,
        spec,
        label,
        &ctx.config.daemon.data_dir,
        &ctx.config.snapshots,
        size_hint.map_or(0, |m| m.db.database_bytes),
    )
    .await
}

/// The id of the newest sealed snapshot in `dir` (for `drill` without an ID).
pub fn newest(dir: &Path) -> Result<String, DrillError> {
    let store = crate::snapshot::store::Store::open(dir).map_err(|e| DrillError::Meta {
        id: String::new(),
        detail: e.to_string(),
    })?;
    store
        .list()
        .map_err(|e| DrillError::Meta {
            id: String::new(),
            detail: e.to_string(),
        })?
        .into_iter()
        .max_by(|a, b| (a.sealed_at, &a.id).cmp(&(b.sealed_at, &b.id)))
        .map(|m| m.id)
        .ok_or_else(|| DrillError::Empty {
            dir: dir.to_path_buf(),
        })
}

/// Drills the sealed snapshot `id`, in a scratch database `prepared` beforehand when given
/// (else started now), and records the result in its meta.json. `Err` only when there is
/// nothing to drill or the result cannot be recorded; a failed drill is `Ok` with
/// `passed: false`.
pub async fn run(
    ctx: &Context<'_>,
    id: &str,
    prepared: Option<Result<Scratch, String>>,
    notes: Notes<'_>,
) -> Result<DrillResult, DrillError> {
    let dir = ctx.config.snapshot_dir().join(id);
    let meta = match read_meta(&dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(Ok(s)) = prepared {
                scratch::remove(ctx.docker, &s).await;
            }
            return Err(DrillError::NoSnapshot {
                id: id.to_string(),
                dir: ctx.config.snapshot_dir(),
            });
        }
        Err(e) => {
            if let Some(Ok(s)) = prepared {
                scratch::remove(ctx.docker, &s).await;
            }
            return Err(DrillError::Meta {
                id: id.to_string(),
                detail: e.to_string(),
            });
        }
    };
    if meta.dump.sha256.is_empty() {
        if let Some(Ok(s)) = prepared {
            scratch::remove(ctx.docker, &s).await;
        }
        return Err(DrillError::NoDump { id: id.to_string() });
    }
    let started = Instant::now();
    let at = Utc::now();
    // The storage is checked on its own thread while the database is replayed.
    let storage = {
        let (meta, dir) = (meta.clone(), dir.clone());
        tokio::task::spawn_blocking(move || check_storage(&meta, &dir))
    };
    let mut outcome = Outcome::default();
    let dump = dir.join(DUMP_FILE);
    let recorded = meta.dump.sha256.clone();
    let actual = tokio::task::spawn_blocking({
        let dump = dump.clone();
        move || crate::snapshot::db::file_sha256(&dump)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    match actual {
        Ok((sha, _)) if sha == recorded => {
            replay_and_compare(ctx, &meta, &dump, prepared, notes, &mut outcome).await
        }
        found => {
            if let Some(Ok(s)) = prepared {
                scratch::remove(ctx.docker, &s).await;
            }
            outcome.fail(match found {
                Ok((sha, _)) => format!(
                    "{} does not match the SHA-256 recorded in meta.json (recorded {recorded}, now {sha}): the dump changed after the seal",
                    dump.display()
                ),
                Err(e) => format!("reading {}: {e}", dump.display()),
            });
        }
    }
    let files = storage.await.unwrap_or_else(|e| StorageChecked {
        problem: Some(format!("the storage check thread failed: {e}")),
        ..Default::default()
    });
    if let Some(problem) = files.problem {
        outcome.fail(problem);
    }
    let result = DrillResult {
        at,
        passed: outcome.first_error.is_none(),
        duration_ms: started.elapsed().as_millis() as u64,
        replay_ms: outcome.replay_ms,
        first_error: outcome.first_error,
        files_checked: files.checked,
        sample_hashed: files.hashed,
        sample_against: files.against,
        image: outcome.image,
        scratch: outcome.scratch,
    };
    let recorded = update_meta(&dir, |m| m.drill = Some(result.clone())).map_err(|source| {
        DrillError::Record {
            id: id.to_string(),
            source,
        }
    })?;
    if recorded.is_none() {
        tracing::info!(snapshot = %id, "deleted during its drill; the result is not recorded");
    }
    Ok(result)
}

/// What the database half of a drill found.
#[derive(Default)]
struct Outcome {
    first_error: Option<String>,
    replay_ms: u64,
    image: String,
    scratch: String,
}

impl Outcome {
    fn fail(&mut self, error: String) {
        if self.first_error.is_none() {
            self.first_error = Some(error);
        }
    }
}

/// Starts the scratch database unless prepared (or prepared too small), replays the dump,
/// compares what the database holds with meta.json, and removes the container whatever
/// happened.
async fn replay_and_compare(
    ctx: &Context<'_>,
    meta: &Meta,
    dump: &Path,
    prepared: Option<Result<Scratch, String>>,
    notes: Notes<'_>,
    outcome: &mut Outcome,
) {
    let fits = |s: &Scratch| {
        let (wanted, _) = scratch::choose_storage(
            meta.db.database_bytes,
            ctx.config.snapshots.drill_tmpfs_mb,
            &ctx.config.daemon.data_dir,
            &s.name,
        );
        match (&s.storage, wanted) {
            (scratch::Storage::Tmpfs { mb: have }, scratch::Storage::Tmpfs { mb: need }) => {
                *have >= need
            }
            (scratch::Storage::Dir(_), _) => true,
            (scratch::Storage::Tmpfs { .. }, scratch::Storage::Dir(_)) => false,
        }
    };
    let scratch = match prepared {
        Some(Ok(s)) if fits(&s) => Ok(s),
        other => {
            if let Some(Ok(s)) = other {
                notes("the scratch database started beforehand is too small for this dump: starting another".into());
                scratch::remove(ctx.docker, &s).await;
            }
            notes(format!("starting a scratch database for {}", meta.id));
            match scratch::spec(
                ctx.docker,
                ctx.live.container.as_deref(),
                ctx.live.access.as_ref(),
                Some(meta),
            )
            .await
            {
                Ok(spec) => {
                    scratch::start(
                        ctx.docker,
                        ctx.host,
                        spec,
                        &meta.id,
                        &ctx.config.daemon.data_dir,
                        &ctx.config.snapshots,
                        meta.db.database_bytes,
                    )
                    .await
                }
                Err(e) => Err(e),
            }
        }
    };
    let scratch = match scratch {
        Ok(s) => s,
        Err(e) => {
            outcome.fail(e);
            return;
        }
    };
    outcome.image = scratch.spec.image_name.clone();
    outcome.scratch = scratch.storage_note.clone();
    notes(format!(
        "replaying {} MB of SQL into {} ({}, {})",
        meta.dump.sql_bytes / 1_000_000,
        scratch.name,
        scratch.spec.image_name,
        scratch.storage_note
    ));
    if let Err(e) = replay_into(ctx, &scratch, meta, dump, outcome).await {
        outcome.fail(e);
    }
    scratch::remove(ctx.docker, &scratch).await;
}

async fn replay_into(
    ctx: &Context<'_>,
    scratch: &Scratch,
    meta: &Meta,
    dump: &Path,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let access = &scratch.spec.access;
    database::drop_database(ctx.docker, ctx.host, &scratch.name, access)
        .await
        .map_err(|e| e.to_string())?;
    let replay_started = Instant::now();
    let replayed = database::replay(
        ctx.docker,
        ctx.host,
        &scratch.name,
        access,
        dump,
        &mut || {},
    )
    .await;
    outcome.replay_ms = replay_started.elapsed().as_millis() as u64;
    replayed.map_err(|e| e.to_string())?;
    let found = facts(ctx, scratch).await?;
    let differences = compare(meta, &found);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the replayed database differs from meta.json: {}",
            differences.join("; ")
        ))
    }
}

/// Migrations and counts as the scratch database has them.
#[derive(Debug, Default, PartialEq)]
struct Found {
    migrations: Vec<String>,
    assets: Option<i64>,
    users: Option<i64>,
}

async fn facts(ctx: &Context<'_>, scratch: &Scratch) -> Result<Found, String> {
    let access = &scratch.spec.access;
    let query = |sql: String| async move {
        database::psql(
            ctx.docker,
            ctx.host,
            &scratch.name,
            access,
            &access.database,
            &sql,
            false,
        )
        .await
        .map_err(|e| format!("reading the replayed database: {e}"))
    };
    let exists = |table: &'static str| async move {
        query(format!("SELECT to_regclass('{table}') IS NOT NULL"))
            .await
            .map(|t| t.trim() == "t")
    };
    let mut migrations = Vec::new();
    // As snapshot::db::facts reads them: TypeORM's table, then Kysely's, each sorted.
    for table in crate::snapshot::db::MIGRATION_TABLES {
        if exists(table).await? {
            let names = query(format!("SELECT name::text FROM {table} ORDER BY 1")).await?;
            let mut names: Vec<String> = names
                .lines()
                .map(str::to_string)
                .filter(|l| !l.is_empty())
                .collect();
            names.sort();
            migrations.extend(names);
        }
    }
    let mut counts = Vec::new();
    // StandardizeNames (~v1.137) renamed assets→asset and users→user.
    for tables in [
        crate::snapshot::db::ASSET_TABLES,
        crate::snapshot::db::USER_TABLES,
    ] {
        let mut n = None;
        for table in tables {
            if exists(table).await? {
                let text = query(format!("SELECT count(*) FROM {table}")).await?;
                n = text.trim().parse::<i64>().ok();
                break;
            }
        }
        counts.push(n);
    }
    Ok(Found {
        migrations,
        assets: counts[0],
        users: counts[1],
    })
}

/// What differs between the replayed database and the snapshot's record.
fn compare(meta: &Meta, found: &Found) -> Vec<String> {
    let mut out = Vec::new();
    if found.migrations != meta.db.migrations {
        let missing: Vec<&str> = meta
            .db
            .migrations
            .iter()
            .filter(|m| !found.migrations.contains(m))
            .map(String::as_str)
            .collect();
        out.push(format!(
            "{} migrations replayed, {} recorded{}",
            found.migrations.len(),
            meta.db.migrations.len(),
            missing
                .first()
                .map(|m| format!(
                    " (missing {m}{})",
                    if missing.len() > 1 { ", …" } else { "" }
                ))
                .unwrap_or_default()
        ));
    }
    let show = |n: Option<i64>| n.map_or("none".to_string(), |n| n.to_string());
    if found.assets != meta.db.assets {
        out.push(format!(
            "assets: {} replayed, {} recorded",
            show(found.assets),
            show(meta.db.assets)
        ));
    }
    if found.users != meta.db.users {
        out.push(format!(
            "users: {} replayed, {} recorded",
            show(found.users),
            show(meta.db.users)
        ));
    }
    out
}

/// The storage half of a drill.
#[derive(Debug, Default)]
struct StorageChecked {
    checked: u64,
    hashed: u64,
    against: String,
    problem: Option<String>,
}

/// Every original of the manifest present in the snapshot's storage at its recorded size; a
/// sample of [`SAMPLE`] read whole and hashed, compared with the content hashes when the
/// hash pass has recorded them.
fn check_storage(meta: &Meta, dir: &Path) -> StorageChecked {
    let mut out = StorageChecked {
        against: "readable at the recorded size".into(),
        ..Default::default()
    };
    let manifest = dir.join(MANIFEST_FILE);
    if let Some(recorded) = &meta.storage.manifest_sha256 {
        match crate::snapshot::db::file_sha256(&manifest) {
            Ok((sha, _)) if sha == *recorded => {}
            Ok((sha, _)) => {
                out.problem = Some(format!(
                    "{} does not match the SHA-256 recorded in meta.json (recorded {recorded}, now {sha})",
                    manifest.display()
                ));
                return out;
            }
            Err(e) => {
                out.problem = Some(format!("reading {}: {e}", manifest.display()));
                return out;
            }
        }
    }
    let entries = match crate::snapshot::storage::read_manifest(&manifest) {
        Ok(e) => e,
        Err(e) => {
            out.problem = Some(format!("reading {}: {e}", manifest.display()));
            return out;
        }
    };
    let root = hashes::storage_root(meta, dir);
    let mut originals: Vec<_> = crate::verify::originals(&entries).collect();
    originals.sort_by(|a, b| a.path.cmp(&b.path));
    let mut bad = Vec::new();
    for e in &originals {
        match std::fs::symlink_metadata(root.join(&e.path)) {
            Ok(m) if m.is_file() && m.len() == e.size => out.checked += 1,
            Ok(m) if m.is_file() => bad.push(format!(
                "{} is {} bytes, {} recorded",
                e.path,
                m.len(),
                e.size
            )),
            Ok(_) => bad.push(format!("{} is not a file", e.path)),
            Err(err) => bad.push(format!("{}: {err}", e.path)),
        }
    }
    if let Some(first) = bad.first() {
        out.problem = Some(format!(
            "{} of {} originals are not in the snapshot's storage as recorded; first: {first}",
            bad.len(),
            originals.len()
        ));
        return out;
    }
    let recorded = match hashes::read_hashes(meta, dir) {
        Ok(r) => r,
        Err(e) => {
            out.problem = Some(e.to_string());
            return out;
        }
    };
    if recorded.is_some() {
        out.against = "content hashes".into();
    }
    for e in sample(&originals) {
        let path = root.join(&e.path);
        match crate::snapshot::db::file_sha256(&path) {
            Ok((_, bytes)) if bytes != e.size => {
                out.problem = Some(format!(
                    "{}: read {bytes} bytes, {} recorded",
                    e.path, e.size
                ));
                return out;
            }
            Ok((sha, _)) => {
                let expected = recorded
                    .as_ref()
                    .and_then(|r| r.get(&e.path))
                    .and_then(|r| r.sha256.as_ref());
                if let Some(expected) = expected
                    && *expected != sha
                {
                    out.problem = Some(format!(
                        "{}: SHA-256 {sha}, {expected} recorded by the content-hash pass",
                        e.path
                    ));
                    return out;
                }
                out.hashed += 1;
            }
            Err(err) => {
                out.problem = Some(format!("reading {}: {err}", path.display()));
                return out;
            }
        }
    }
    out
}

/// Up to [`SAMPLE`] entries spread evenly over `all` (the first always).
fn sample<T>(all: &[T]) -> impl Iterator<Item = &T> {
    let n = all.len().min(SAMPLE);
    (0..n).map(move |i| &all[i * all.len() / n])
}

/// One line on a drill, for `status` and notifications.
pub fn summary(r: &DrillResult) -> String {
    if r.passed {
        format!(
            "passed in {:.1} s (replay {:.1} s; {} originals present, {} hashed against {})",
            r.duration_ms as f64 / 1000.0,
            r.replay_ms as f64 / 1000.0,
            r.files_checked,
            r.sample_hashed,
            r.sample_against
        )
    } else {
        format!(
            "FAILED after {:.1} s: {}",
            r.duration_ms as f64 / 1000.0,
            r.first_error.as_deref().unwrap_or("unknown")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::store::tests::meta;

    #[test]
    fn the_sample_is_spread_over_the_originals_and_bounded() {
        let all: Vec<usize> = (0..1000).collect();
        let picked: Vec<usize> = sample(&all).copied().collect();
        assert_eq!(picked.len(), SAMPLE);
        assert_eq!(picked[0], 0);
        assert!(*picked.last().unwrap() > 950);
        let few = [1, 2, 3];
        assert_eq!(sample(&few).copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(sample::<u8>(&[]).count(), 0);
    }

    #[test]
    fn a_replayed_database_must_hold_the_recorded_migrations_and_counts() {
        let mut m = meta("s", Utc::now());
        m.db.migrations = vec!["1-Init".into(), "2-Add".into()];
        m.db.assets = Some(10);
        m.db.users = Some(2);
        let same = Found {
            migrations: m.db.migrations.clone(),
            assets: Some(10),
            users: Some(2),
        };
        assert!(compare(&m, &same).is_empty());
        let half = Found {
            migrations: vec!["1-Init".into()],
            assets: Some(4),
            users: None,
        };
        assert_eq!(
            compare(&m, &half),
            vec![
                "1 migrations replayed, 2 recorded (missing 2-Add)",
                "assets: 4 replayed, 10 recorded",
                "users: none replayed, 2 recorded"
            ]
        );
    }
}
