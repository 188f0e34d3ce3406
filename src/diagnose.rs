//! Diagnosis of a failed start from the logs of the stack's services: each known failure is
//! a category with the lines that matched, quoted; the decision model (restore, rollback or
//! fix forward) comes from whether the new version applied migrations.
//!
//! The phrases are the ones Immich, Node and PostgreSQL really print (docs/incident-runbook.md, "The cases").

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// A migration failed or the database is newer than the server.
    Migration,
    /// The media folders: EACCES / permission denied.
    Permissions,
    /// `.immich` marker files missing: the upload location is not mounted where it was.
    FolderIntegrity,
    /// `relation "…" does not exist`: schema and code disagree.
    MissingRelation,
    /// `password authentication failed`: DB_PASSWORD changed after the database was created.
    DatabasePassword,
    /// `ECONNREFUSED` / `connection refused`: the database is not reachable.
    DatabaseUnreachable,
    /// The PostgreSQL data files are from another major version.
    DatabaseVersion,
    /// pgvecto.rs / VectorChord extension errors.
    VectorExtension,
}

impl Category {
    /// What to do about it, when fixing forward.
    pub fn hint(self) -> &'static str {
        match self {
            Category::Migration => {
                "a migration failed: read the quoted error; restore the pre-update snapshot and pin the previous version, or fix the cause and start the new version again"
            }
            Category::Permissions => {
                "the server cannot write its media folders: fix ownership/permissions of UPLOAD_LOCATION for the user the server runs as (e.g. `chown -R <uid>:<gid> <upload location>`), then start it again"
            }
            Category::FolderIntegrity => {
                "the .immich marker files are missing: the upload location is not mounted where it was (check UPLOAD_LOCATION in .env and the volume in the compose file); do not create the markers by hand before the right folder is mounted"
            }
            Category::MissingRelation => {
                "the schema does not match this version: a migration did not run or was rolled back; restore the pre-update snapshot, or run the version that created the schema"
            }
            Category::DatabasePassword => {
                "DB_PASSWORD in .env is not the password the database was created with: put the old one back (PostgreSQL keeps the password it was initialised with)"
            }
            Category::DatabaseUnreachable => {
                "the server cannot reach the database: check that the database container runs and that DB_HOSTNAME/DB_PORT point at it"
            }
            Category::DatabaseVersion => {
                "the database files were made by another PostgreSQL major version: use the database image the files were made with, or dump and restore into the new version"
            }
            Category::VectorExtension => {
                "the vector extension failed: use the database image Immich's release notes name for this version (pgvecto.rs / VectorChord), then start again"
            }
        }
    }
}

/// (category, lowercase phrase). Checked in order; a line counts for every category it matches.
const PHRASES: &[(Category, &str)] = &[
    (Category::Migration, "corrupted migrations"),
    (Category::Migration, "migration failed"),
    (Category::Migration, "migrations failed"),
    (Category::Migration, "invalid upgrade path"),
    (Category::Migration, "error running migration"),
    (Category::Migration, "migrationerror"),
    (Category::Migration, "failed to run migrations"),
    (Category::Migration, "queryfailederror"),
    (Category::Permissions, "eacces"),
    (Category::Permissions, "permission denied"),
    (Category::Permissions, "operation not permitted"),
    (Category::FolderIntegrity, ".immich"),
    (Category::FolderIntegrity, "failed to read"),
    (Category::FolderIntegrity, "folder integrity"),
    (Category::MissingRelation, "does not exist"),
    (Category::DatabasePassword, "password authentication failed"),
    (Category::DatabaseUnreachable, "econnrefused"),
    (Category::DatabaseUnreachable, "connection refused"),
    (
        Category::DatabaseUnreachable,
        "unable to connect to the database",
    ),
    (
        Category::DatabaseVersion,
        "database files are incompatible with server",
    ),
    (Category::DatabaseVersion, "unsupported version"),
    (Category::DatabaseVersion, "incompatible"),
    (Category::VectorExtension, "vectors"),
    (Category::VectorExtension, "vchord"),
    (Category::VectorExtension, "pgvecto"),
    (Category::VectorExtension, "extension \"vector"),
    (Category::VectorExtension, "no vector extension"),
];

/// Lines quoted per category: enough to see the error, not the whole log.
const QUOTED: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub category: Category,
    /// `service: line`, first occurrences.
    pub lines: Vec<String>,
    pub count: usize,
}

/// Scans each service's log; returns findings ordered by category (most specific first).
pub fn scan<'a>(logs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<Finding> {
    let mut found: std::collections::BTreeMap<Category, Finding> = Default::default();
    for (service, log) in logs {
        for line in log.lines() {
            let lower = line.to_lowercase();
            let mut seen = Vec::new();
            for (category, phrase) in PHRASES {
                if seen.contains(category) || !lower.contains(phrase) {
                    continue;
                }
                // "does not exist" alone is too loose: only a relation (table) missing.
                if *category == Category::MissingRelation && !lower.contains("relation") {
                    continue;
                }
                // `.immich` appears in every path; only a failing read of a marker counts.
                if *category == Category::FolderIntegrity
                    && !(lower.contains(".immich")
                        && (lower.contains("enoent") || lower.contains("failed")))
                {
                    continue;
                }
                seen.push(*category);
                let f = found.entry(*category).or_insert_with(|| Finding {
                    category: *category,
                    lines: Vec::new(),
                    count: 0,
                });
                f.count += 1;
                if f.lines.len() < QUOTED {
                    f.lines.push(format!("{service}: {}", line.trim()));
                }
            }
        }
    }
    found.into_values().collect()
}

/// Puts the findings in the looping service's own log first (stable otherwise): a
/// database that will not start makes the server log `ECONNREFUSED`, but the database's own
/// line is the cause.
pub fn rank(findings: &mut [Finding], service: &str) {
    let prefix = format!("{service}: ");
    findings.sort_by_key(|f| !f.lines.iter().any(|l| l.starts_with(&prefix)));
}

/// The way out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Decision {
    /// The new version changed the database: bring back database and storage from before.
    Restore {
        snapshot: String,
        version: String,
        why: String,
    },
    /// Nothing was migrated: going back is just pinning the old version.
    Rollback { version: String, why: String },
    /// Fix the cause and start the same version again.
    FixForward { hint: String, why: String },
}

impl Decision {
    /// One line for a notification.
    pub fn summary(&self) -> String {
        match self {
            Decision::Restore {
                snapshot, version, ..
            } => format!(
                "restore snapshot {snapshot} (database and storage) and pin {version}: `immich-guard restore {snapshot}` with the daemon stopped."
            ),
            Decision::Rollback { version, .. } => {
                format!("roll back by pinning {version}; no migration was applied.")
            }
            Decision::FixForward { hint, .. } => format!("fix forward: {hint}."),
        }
    }
}

/// `applied_now`: migrations in the database now; `before`: those of the last pre-update
/// snapshot (`snapshot` id, `version`). `findings` pick the fix-forward hint.
pub fn decide(
    applied_now: Option<&[String]>,
    before: Option<(&str, &str, &[String])>,
    findings: &[Finding],
) -> Decision {
    let hint = findings
        .first()
        .map(|f| f.category.hint().to_string())
        .unwrap_or_else(|| "no known failure in the logs; read the incident's logs".into());
    let fixable = findings.iter().any(|f| {
        matches!(
            f.category,
            Category::Permissions
                | Category::FolderIntegrity
                | Category::DatabasePassword
                | Category::DatabaseUnreachable
                | Category::DatabaseVersion
                | Category::VectorExtension
        )
    });
    let (Some(now), Some((snapshot, version, then))) = (applied_now, before) else {
        return Decision::FixForward {
            hint,
            why: "no pre-update snapshot or no database to compare with".into(),
        };
    };
    let new: Vec<&String> = now.iter().filter(|m| !then.contains(m)).collect();
    if new.is_empty() {
        return if fixable {
            Decision::FixForward {
                hint,
                why: format!(
                    "no migration was applied since {snapshot}; the cause is outside the schema"
                ),
            }
        } else {
            Decision::Rollback {
                version: version.to_string(),
                why: format!(
                    "no migration was applied since {snapshot}: pinning {version} again is safe"
                ),
            }
        };
    }
    if fixable {
        return Decision::FixForward {
            hint,
            why: format!(
                "{} migration(s) were applied ({}), and the failure is fixable in place; restoring {snapshot} is the fallback",
                new.len(),
                new.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    }
    Decision::Restore {
        snapshot: snapshot.to_string(),
        version: version.to_string(),
        why: format!(
            "the new version applied {} migration(s) ({}) and does not start: {version} cannot run on this database; restore {snapshot} (database and storage) and pin {version}",
            new.len(),
            new.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER_LOG: &str = "\
[Nest] 7  - 11/25/2026, 2:23:01 AM     LOG [Microservices:EventRepository] Initialized websocket server
[Nest] 7  - 11/25/2026, 2:23:02 AM   ERROR [Api:DatabaseRepository] Migration failed: QueryFailedError: relation \"memories\" does not exist
Error: EACCES: permission denied, open '/data/upload/.immich'
[Nest] 7  - 11/25/2026, 2:23:03 AM   ERROR Failed to read: \"/data/library/.immich (ENOENT: no such file or directory)\"
";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn findings_quote_the_lines_per_category() {
        let found = scan([("immich-server", SERVER_LOG)]);
        let categories: Vec<Category> = found.iter().map(|f| f.category).collect();
        assert_eq!(
            categories,
            vec![
                Category::Migration,
                Category::Permissions,
                Category::FolderIntegrity,
                Category::MissingRelation
            ]
        );
        assert!(found[0].lines[0].starts_with("immich-server: [Nest]"));
        assert!(found[0].lines[0].contains("Migration failed"));
    }

    #[test]
    fn database_phrases_are_recognised() {
        let log = "Error: connect ECONNREFUSED 172.18.0.2:5432\n\
                   error: password authentication failed for user \"postgres\"\n\
                   FATAL:  database files are incompatible with server\n\
                   Error: No vector extension found\n";
        let found = scan([("database", log)]);
        let categories: Vec<Category> = found.iter().map(|f| f.category).collect();
        assert_eq!(
            categories,
            vec![
                Category::DatabasePassword,
                Category::DatabaseUnreachable,
                Category::DatabaseVersion,
                Category::VectorExtension
            ]
        );
    }

    #[test]
    fn the_looping_services_own_findings_come_first() {
        let mut found = scan([
            (
                "immich-server",
                "Error: connect ECONNREFUSED 172.18.0.2:5432\n",
            ),
            (
                "database",
                "FATAL:  database files are incompatible with server\n",
            ),
        ]);
        assert_eq!(found[0].category, Category::DatabaseUnreachable);
        rank(&mut found, "database");
        assert_eq!(found[0].category, Category::DatabaseVersion);
        match decide(None, None, &found) {
            Decision::FixForward { hint, .. } => {
                assert!(hint.contains("PostgreSQL major"), "{hint}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_ordinary_log_has_no_findings() {
        let log = "LOG [Api:Bootstrap] Immich Server is listening on http://[::1]:2283\n\
                   reading /data/upload/.immich ok\n";
        assert!(scan([("immich-server", log)]).is_empty());
    }

    #[test]
    fn migrations_applied_and_not_fixable_means_restore() {
        let then = strings(&["a", "b"]);
        let now = strings(&["a", "b", "c"]);
        let found = scan([("immich-server", "Migration failed: boom\n")]);
        match decide(Some(&now), Some(("S1", "v1.119.0", &then)), &found) {
            Decision::Restore {
                snapshot, version, ..
            } => assert_eq!((snapshot.as_str(), version.as_str()), ("S1", "v1.119.0")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_applied_means_rollback_and_permissions_mean_fix_forward() {
        let then = strings(&["a", "b"]);
        let found = scan([("immich-server", "Migration failed: boom\n")]);
        assert!(matches!(
            decide(Some(&then), Some(("S1", "v1.119.0", &then)), &found),
            Decision::Rollback { .. }
        ));
        let perms = scan([(
            "immich-server",
            "Error: EACCES: permission denied, mkdir '/data/thumbs'\n",
        )]);
        match decide(Some(&then), Some(("S1", "v1.119.0", &then)), &perms) {
            Decision::FixForward { hint, .. } => assert!(hint.contains("chown"), "{hint}"),
            other => panic!("{other:?}"),
        }
    }
}
