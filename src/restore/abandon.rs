//! `immich-guard restore --abandon`: ends an unfinished restore without finishing it, for
//! when it cannot go on (its snapshot is gone, the admin chose another way out). First it
//! says what state the stack is in, from the journal and from Docker, so the admin knows
//! what they are left with; then the journal goes to the history (`abandoned_at` set) and
//! protection is back on. Nothing of the stack's data is touched.

use std::path::Path;

use chrono::Utc;

use super::RestoreError;
use super::journal::{self, DbMode, Journal, Step};

/// The unfinished journal, or why there is none to abandon.
pub fn unfinished(data_dir: &Path) -> Result<Journal, RestoreError> {
    match journal::load(data_dir)? {
        Some(j) if !j.is_complete() => Ok(j),
        _ => Err(RestoreError::NothingToAbandon {
            path: journal::path(data_dir),
        }),
    }
}

/// What the stack is left with, line by line: each step's state, the snapshots and folders
/// that hold the state from before, the containers as Docker reports them (`containers`:
/// name and state; `None` when Docker could not be asked), and what to do next.
pub fn describe(j: &Journal, containers: Option<&[(String, String)]>) -> Vec<String> {
    let mut out = vec![format!(
        "unfinished restore of {} (project {}, started {} by {})",
        j.snapshot,
        j.project,
        j.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
        j.by
    )];
    let done = |s: Step| j.is_done(s);
    out.push(format!(
        "database: {}",
        if done(Step::Database) {
            format!("replayed from {} (the snapshot's state)", j.snapshot)
        } else if j.changed_data() {
            match &j.database {
                Some(DbMode::FreshCluster { .. }) => {
                    "its data dir was taken away (into the pre-restore snapshot or set aside) and the replay did not finish: the Immich database may be empty or partial".to_string()
                }
                _ => "the replay began and did not finish: the Immich database may be missing or partial".to_string(),
            }
        } else {
            "not touched (as it was before the restore)".to_string()
        }
    ));
    out.push(format!(
        "files: {}",
        if done(Step::Storage) {
            format!("put back to {}", j.snapshot)
        } else if done(Step::Database) {
            "not put back yet: they are as before the restore, so they may not match the database"
                .to_string()
        } else {
            "not touched".to_string()
        }
    ));
    out.push(format!(
        "version pin: {}",
        if done(Step::Pin) {
            "the compose config names the snapshot's version"
        } else {
            "not changed"
        }
    ));
    let pre = j.all_pre_restores();
    out.push(if pre.is_empty() {
        "the state before the restore: NOT kept (--no-preserve)".to_string()
    } else {
        format!(
            "the state before the restore is kept as snapshot {}",
            pre.join(", ")
        )
    });
    if !j.kept.is_empty() {
        out.push(format!(
            "set aside (not deleted): {}",
            j.kept
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    match containers {
        Some(list) if !list.is_empty() => out.push(format!(
            "containers: {}",
            list.iter()
                .map(|(name, state)| format!("{name} {state}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Some(_) => out.push("containers: none of the stack found".into()),
        None => out.push("containers: Docker could not be asked".into()),
    }
    out.push(format!("next: {}", next_step(j, &pre)));
    out
}

fn next_step(j: &Journal, pre: &[String]) -> String {
    let back = pre
        .last()
        .map(|p| format!("`immich-guard restore {p}` brings back the state from before it"))
        .unwrap_or_else(|| "no snapshot holds the state from before it".into());
    if !j.changed_data() {
        format!(
            "the data is as before the restore; start what it stopped ({}) with `docker compose up -d`",
            if j.stopped.is_empty() {
                "nothing".to_string()
            } else {
                j.stopped.join(", ")
            }
        )
    } else if j.is_done(Step::Storage) && j.is_done(Step::Database) {
        format!(
            "database and files are the snapshot's; `immich-guard restore {}` finishes the pin, start and verify, or {back}",
            j.snapshot
        )
    } else {
        format!(
            "database and files may not match: restore a snapshot (`immich-guard list`) before starting Immich; {back}"
        )
    }
}

/// Ends the unfinished restore: recorded in the history with `abandoned_at`, the journal
/// removed, both durably. Returns it as recorded.
pub fn abandon(data_dir: &Path) -> Result<Journal, RestoreError> {
    let mut j = unfinished(data_dir)?;
    j.abandoned_at = Some(Utc::now());
    journal::append_history(data_dir, &j)?;
    journal::remove(data_dir)?;
    Ok(j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_restore_says_its_state_goes_to_the_history_and_leaves_no_journal() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        assert!(matches!(
            abandon(data),
            Err(RestoreError::NothingToAbandon { .. })
        ));
        let mut j = Journal::new("20261125T022301Z-v1.119.0-manual", "immich", false);
        journal::save(data, &mut j).unwrap();
        journal::mark(data, &mut j, Step::Stop).unwrap();
        j.add_pre_restore("20261203T101010Z-v1.120.0-pre-restore".into());
        journal::mark(data, &mut j, Step::Preserve).unwrap();
        let said = describe(&j, Some(&[("immich_server".into(), "exited".into())])).join("\n");
        assert!(said.contains("database: not touched"), "{said}");
        assert!(said.contains("kept as snapshot 20261203T101010Z-v1.120.0-pre-restore"));
        assert!(said.contains("containers: immich_server exited"), "{said}");
        assert!(said.contains("the data is as before the restore"), "{said}");
        journal::touch_data(data, &mut j).unwrap();
        let said = describe(&j, None).join("\n");
        assert!(
            said.contains("the replay began and did not finish"),
            "{said}"
        );
        assert!(said.contains("may not match"), "{said}");

        let ended = abandon(data).unwrap();
        assert!(ended.abandoned_at.is_some());
        assert_eq!(journal::load(data).unwrap(), None);
        assert_eq!(journal::incomplete(data), None);
        let history = std::fs::read_to_string(data.join(journal::HISTORY_FILE)).unwrap();
        let last: Journal = serde_json::from_str(history.lines().last().unwrap()).unwrap();
        assert_eq!(last.snapshot, j.snapshot);
        assert!(last.abandoned_at.is_some());
    }
}
