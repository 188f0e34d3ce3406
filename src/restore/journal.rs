//! The restore's journal, `<data_dir>/restore.json`: which snapshot is being restored and
//! which steps are finished. Written (temp file, fsync, rename, owner-only) before the first
//! step starts and after each one ends, so a restore killed at any point is finished by
//! running the same command again (README.md, "How to recover"). A finished restore keeps
//! its journal (`completed_at` set) and appends one line to `restores.jsonl`.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::RestoreError;

pub const FILE: &str = "restore.json";
/// One JSON line per finished restore, under the data dir.
pub const HISTORY_FILE: &str = "restores.jsonl";

/// The steps of a restore, in order. Writers stop before the current state is kept, so the
/// pre-restore snapshot is the last state: nothing written after it can be lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Stop,
    Preserve,
    Database,
    Storage,
    Pin,
    Start,
    Verify,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Step::Stop,
        Step::Preserve,
        Step::Database,
        Step::Storage,
        Step::Pin,
        Step::Start,
        Step::Verify,
    ];

    /// 1-based position, for "step n of 7".
    pub fn number(self) -> usize {
        Step::ALL.iter().position(|s| *s == self).unwrap_or(0) + 1
    }

    pub fn name(self) -> &'static str {
        match self {
            Step::Preserve => "preserve",
            Step::Stop => "stop",
            Step::Database => "database",
            Step::Storage => "storage",
            Step::Pin => "pin",
            Step::Start => "start",
            Step::Verify => "verify",
        }
    }
}

/// How the database is brought back, decided once (when the current state is preserved) and
/// kept: a resumed restore must not judge a cluster it made itself as "the current state".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum DbMode {
    /// The database answered: the Immich database is dropped and the dump replayed into it.
    Replay,
    /// It did not (`reason`): its data dir went into the pre-restore snapshot (or aside, at
    /// `kept`), a fresh cluster is made by the image's own entrypoint, then the dump replayed.
    FreshCluster {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kept: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub format: u32,
    /// The snapshot being restored.
    pub snapshot: String,
    pub project: String,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub by: String,
    /// `--no-preserve`: the current state was not kept (asked for with `--yes`).
    pub no_preserve: bool,
    /// The newest snapshot of the state before the restore (trigger `pre-restore`).
    pub pre_restore: Option<String>,
    /// Every pre-restore snapshot this restore took, oldest first: a restore resumed after
    /// the stack ran again keeps the new state too. Retention never deletes these, nor
    /// `snapshot`, while the restore is unfinished (snapshot/retention.rs).
    #[serde(default)]
    pub pre_restores: Vec<String>,
    pub database: Option<DbMode>,
    pub done: Vec<Step>,
    /// What was set aside rather than deleted (a replaced btrfs subvolume, a data dir, the
    /// `kept/<restore id>/` folder of files no pre-restore snapshot holds).
    #[serde(default)]
    pub kept: Vec<PathBuf>,
    /// Containers the stop step stopped (they were running): started again when the restore
    /// is refused before it changed any data.
    #[serde(default)]
    pub stopped: Vec<String>,
    /// Set (durably) before the first step that changes data begins: from then on a failure
    /// is finished, never given back, and the state is not kept again. `None` in journals
    /// written before it existed, whose stop step came right before the database step.
    #[serde(default)]
    pub data_touched: Option<bool>,
    pub completed_at: Option<DateTime<Utc>>,
    pub verify_passed: Option<bool>,
    /// Ended by `restore --abandon` instead of finished (kept in the history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned_at: Option<DateTime<Utc>>,
    /// Ended before it changed any data (the journal is kept in the history only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl Journal {
    pub fn new(snapshot: &str, project: &str, no_preserve: bool) -> Journal {
        let now = Utc::now();
        Journal {
            format: 1,
            snapshot: snapshot.to_string(),
            project: project.to_string(),
            started_at: now,
            updated_at: now,
            by: crate::pin::who(),
            no_preserve,
            pre_restore: None,
            pre_restores: Vec::new(),
            database: None,
            done: Vec::new(),
            kept: Vec::new(),
            stopped: Vec::new(),
            data_touched: Some(false),
            completed_at: None,
            verify_passed: None,
            abandoned_at: None,
            refused: None,
        }
    }

    /// Names this restore in paths (`kept/<id>/`): its start, to the second, and its snapshot.
    pub fn id(&self) -> String {
        format!(
            "{}-{}",
            self.started_at.format("%Y%m%dT%H%M%SZ"),
            self.snapshot
        )
    }

    /// A new pre-restore snapshot, now the newest.
    pub fn add_pre_restore(&mut self, id: String) {
        if let Some(old) = self.pre_restore.take()
            && !self.pre_restores.contains(&old)
        {
            self.pre_restores.push(old);
        }
        if !self.pre_restores.contains(&id) {
            self.pre_restores.push(id.clone());
        }
        self.pre_restore = Some(id);
    }

    /// Every pre-restore snapshot of this restore, oldest first.
    pub fn all_pre_restores(&self) -> Vec<String> {
        let mut all = self.pre_restores.clone();
        if let Some(p) = &self.pre_restore
            && !all.contains(p)
        {
            all.push(p.clone());
        }
        all
    }

    /// Whether any step changed data (the database, the files, the compose config): until
    /// then a failure can give the stack back as it was and leave no journal.
    pub fn changed_data(&self) -> bool {
        self.data_touched
            .unwrap_or_else(|| self.is_done(Step::Stop))
            || self
                .done
                .iter()
                .any(|s| !matches!(s, Step::Stop | Step::Preserve))
            || matches!(self.database, Some(DbMode::FreshCluster { .. }))
    }

    pub fn is_done(&self, step: Step) -> bool {
        self.done.contains(&step)
    }

    pub fn is_complete(&self) -> bool {
        self.completed_at.is_some()
    }

    /// The command that finishes this restore.
    pub fn finish_command(&self) -> String {
        format!(
            "immich-guard restore {}{} --yes",
            self.snapshot,
            if self.no_preserve {
                " --no-preserve"
            } else {
                ""
            }
        )
    }

    /// One line for `status`: what is incomplete and how to finish it.
    pub fn describe(&self) -> String {
        let next = Step::ALL
            .iter()
            .find(|s| !self.is_done(**s))
            .map_or("verify", |s| s.name());
        format!(
            "restore of {} incomplete (started {}, {} of {} steps done, next: {next}); finish it with `{}`, or end it with `immich-guard restore --abandon`",
            self.snapshot,
            self.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            self.done.len(),
            Step::ALL.len(),
            self.finish_command()
        )
    }
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The journal in `data_dir`, if any.
pub fn load(data_dir: &Path) -> Result<Option<Journal>, RestoreError> {
    let path = path(data_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RestoreError::Journal { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| RestoreError::Journal {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
}

/// The journal of a restore that has not finished, for `status` and the daemon. A journal
/// that cannot be read counts as incomplete: a restore may be half done.
pub fn incomplete(data_dir: &Path) -> Option<String> {
    match load(data_dir) {
        Ok(Some(j)) if !j.is_complete() => Some(j.describe()),
        Ok(_) => None,
        Err(e) => Some(format!(
            "{e}; a restore may be incomplete: read it, then finish or remove it"
        )),
    }
}

/// Writes the journal whole or not at all (temp file, fsync, rename, dir fsync), owner-only.
pub fn save(data_dir: &Path, journal: &mut Journal) -> Result<(), RestoreError> {
    let path = path(data_dir);
    let io = |source| RestoreError::Journal {
        path: path.clone(),
        source,
    };
    crate::owner_only::create_dir_all(data_dir).map_err(io)?;
    journal.updated_at = Utc::now();
    let json = serde_json::to_vec_pretty(journal).expect("journal serializes");
    crate::durable::replace_synced(&path, &json).map_err(io)?;
    crate::durable::sync_dir(data_dir).map_err(io)
}

/// Removes the journal (after it went to the history), durably.
pub fn remove(data_dir: &Path) -> Result<(), RestoreError> {
    let path = path(data_dir);
    let io = |source| RestoreError::Journal {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    crate::durable::sync_dir(data_dir).map_err(io)
}

/// Records, durably, that a step changing data begins.
pub fn touch_data(data_dir: &Path, journal: &mut Journal) -> Result<(), RestoreError> {
    if journal.data_touched == Some(true) {
        return Ok(());
    }
    journal.data_touched = Some(true);
    save(data_dir, journal)
}

/// Records `step` as finished, durably.
pub fn mark(data_dir: &Path, journal: &mut Journal, step: Step) -> Result<(), RestoreError> {
    if !journal.is_done(step) {
        journal.done.push(step);
    }
    save(data_dir, journal)
}

/// Appends the ended restore (finished, refused or abandoned) to `restores.jsonl`
/// (owner-only), synced.
pub fn append_history(data_dir: &Path, journal: &Journal) -> Result<PathBuf, RestoreError> {
    let path = data_dir.join(HISTORY_FILE);
    let line = serde_json::to_vec(journal).expect("journal serializes");
    crate::durable::append_line_synced(&path, &line).map_err(|source| RestoreError::Journal {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_journal_is_owner_only_and_names_the_command_that_finishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert_eq!(load(&data).unwrap(), None);
        assert_eq!(incomplete(&data), None);
        let mut j = Journal::new("20261125T022301Z-v1.119.0-manual", "immich", false);
        save(&data, &mut j).unwrap();
        mark(&data, &mut j, Step::Preserve).unwrap();
        mark(&data, &mut j, Step::Preserve).unwrap();
        let mode = std::fs::metadata(path(&data)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = load(&data).unwrap().unwrap();
        assert_eq!(back.done, vec![Step::Preserve]);
        let said = incomplete(&data).unwrap();
        assert!(said.contains("1 of 7 steps done, next: stop"), "{said}");
        assert!(
            said.contains("`immich-guard restore 20261125T022301Z-v1.119.0-manual --yes`"),
            "{said}"
        );
        j.completed_at = Some(Utc::now());
        save(&data, &mut j).unwrap();
        assert_eq!(incomplete(&data), None);
    }

    #[test]
    fn an_unreadable_journal_counts_as_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "{not json").unwrap();
        let said = incomplete(dir.path()).unwrap();
        assert!(said.contains("restore.json"), "{said}");
    }

    /// Retention reads this file as plain JSON (it may not depend on this module): what it
    /// takes a real journal to claim must be what the journal names, while unfinished.
    #[test]
    fn retention_reads_the_snapshots_a_journal_claims() {
        use crate::snapshot::retention::{RESTORE_JOURNAL, restore_claims};
        assert_eq!(FILE, RESTORE_JOURNAL);
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new("20261125T022301Z-v1.119.0-manual", "immich", false);
        save(dir.path(), &mut j).unwrap();
        assert_eq!(
            restore_claims(dir.path()).unwrap(),
            ["20261125T022301Z-v1.119.0-manual"]
        );
        j.pre_restore = Some("20261126T080000Z-v1.120.0-pre-restore".into());
        mark(dir.path(), &mut j, Step::Preserve).unwrap();
        assert_eq!(
            restore_claims(dir.path()).unwrap(),
            [
                "20261125T022301Z-v1.119.0-manual",
                "20261126T080000Z-v1.120.0-pre-restore"
            ]
        );
        j.completed_at = Some(Utc::now());
        save(dir.path(), &mut j).unwrap();
        assert!(restore_claims(dir.path()).unwrap().is_empty());
    }
}
