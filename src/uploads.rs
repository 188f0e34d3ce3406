//! Recent uploads, read from the Immich database: how many assets arrived in the last ten
//! minutes and when the newest did (docs/operations.md "Uploads"). A phone backing up while
//! an upgrade goes through uploads into a database the pre-update snapshot does not hold.
//! One cheap read-only query with a short timeout; a database that does not answer is
//! "unknown", never an error that stops protection.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::discover::DbAccess;

/// The window `status` counts uploads in.
pub const WINDOW_MINUTES: i64 = 10;
/// How often the daemon reads them while it runs (protect/driver.rs): one aggregate over the
/// asset table a minute.
pub const REFRESH: Duration = Duration::from_secs(60);
/// The whole read, connection included; the statement itself gets less.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
const STATEMENT_TIMEOUT_MS: u64 = 2000;

/// One reading of the upload activity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentUploads {
    pub read_at: DateTime<Utc>,
    #[serde(flatten)]
    pub seen: Seen,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Seen {
    Known {
        /// Assets whose upload (`createdAt`, when the server received them) is in the last
        /// `WINDOW_MINUTES`.
        last_10_min: i64,
        /// The newest upload; None for an empty library.
        newest: Option<DateTime<Utc>>,
    },
    /// The database did not answer (or has no asset table): why.
    Unknown { why: String },
}

impl RecentUploads {
    pub fn unknown(why: impl Into<String>, read_at: DateTime<Utc>) -> RecentUploads {
        RecentUploads {
            read_at,
            seen: Seen::Unknown { why: why.into() },
        }
    }

    /// Assets uploaded in the window, when known.
    pub fn count(&self) -> Option<i64> {
        match &self.seen {
            Seen::Known { last_10_min, .. } => Some(*last_10_min),
            Seen::Unknown { .. } => None,
        }
    }

    pub fn newest(&self) -> Option<DateTime<Utc>> {
        match &self.seen {
            Seen::Known { newest, .. } => *newest,
            Seen::Unknown { .. } => None,
        }
    }

    /// Some uploads in the window: the warning a pending change is shown with.
    pub fn busy(&self) -> bool {
        self.count().is_some_and(|n| n > 0)
    }

    /// `3 assets uploaded in the last 10 minutes; a phone may be backing up (newest …)`.
    pub fn line(&self) -> String {
        let at = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
        match &self.seen {
            Seen::Known {
                last_10_min: n,
                newest,
            } if *n > 0 => format!(
                "{n} asset{} uploaded in the last {WINDOW_MINUTES} minutes; a phone may be backing up{}",
                if *n == 1 { "" } else { "s" },
                newest
                    .map(|t| format!(" (newest {})", at(t)))
                    .unwrap_or_default()
            ),
            Seen::Known { newest, .. } => format!(
                "none in the last {WINDOW_MINUTES} minutes ({})",
                newest
                    .map(|t| format!("newest {}", at(t)))
                    .unwrap_or_else(|| "no asset yet".into())
            ),
            Seen::Unknown { why } => format!("unknown ({why})"),
        }
    }
}

/// Reads the upload activity; never fails: what cannot be read is `Unknown`, with why.
pub async fn read(access: &DbAccess) -> RecentUploads {
    match tokio::time::timeout(READ_TIMEOUT, query(access)).await {
        Ok(Ok(seen)) => RecentUploads {
            read_at: Utc::now(),
            seen,
        },
        Ok(Err(why)) => RecentUploads::unknown(why, Utc::now()),
        Err(_) => RecentUploads::unknown(
            format!(
                "the database did not answer within {} s",
                READ_TIMEOUT.as_secs()
            ),
            Utc::now(),
        ),
    }
}

async fn query(access: &DbAccess) -> Result<Seen, String> {
    // Read-only, and a statement that takes longer than the daemon waits is cancelled by
    // PostgreSQL itself rather than left running.
    let options =
        format!("-c statement_timeout={STATEMENT_TIMEOUT_MS} -c default_transaction_read_only=on");
    let db = crate::snapshot::db::connect(access, READ_TIMEOUT, &options)
        .await
        .map_err(|e| e.to_string())?;
    let table = db.asset_table().await.map_err(|e| db.describe(&e))?;
    let Some(table) = table else {
        db.close().await;
        return Err("no asset table in the database".into());
    };
    // `createdAt` is when the server received the asset (`fileCreatedAt` is when it was
    // taken). No index covers it: one scan of the table, a minute apart.
    let row = db
        .client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE \"createdAt\" > now() - interval '{WINDOW_MINUTES} minutes'), (extract(epoch FROM max(\"createdAt\")) * 1000)::bigint FROM {table}"
            ),
            &[],
        )
        .await
        .map_err(|e| format!("reading the uploads in {table}: {}", db.describe(&e)))?;
    let newest: Option<i64> = row.get(1);
    let seen = Seen::Known {
        last_10_min: row.get(0),
        newest: newest.and_then(DateTime::from_timestamp_millis),
    };
    db.close().await;
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_warns_only_when_something_was_uploaded() {
        let at = "2026-11-25T02:03:04Z".parse().unwrap();
        let known = |n, newest| RecentUploads {
            read_at: at,
            seen: Seen::Known {
                last_10_min: n,
                newest,
            },
        };
        assert_eq!(
            known(3, Some(at)).line(),
            "3 assets uploaded in the last 10 minutes; a phone may be backing up (newest 2026-11-25 02:03:04 UTC)"
        );
        assert_eq!(
            known(1, Some(at)).line(),
            "1 asset uploaded in the last 10 minutes; a phone may be backing up (newest 2026-11-25 02:03:04 UTC)"
        );
        assert_eq!(
            known(0, Some(at)).line(),
            "none in the last 10 minutes (newest 2026-11-25 02:03:04 UTC)"
        );
        assert_eq!(
            known(0, None).line(),
            "none in the last 10 minutes (no asset yet)"
        );
        assert!(known(2, None).busy() && !known(0, None).busy());
        let unknown = RecentUploads::unknown("connection refused", at);
        assert_eq!(unknown.line(), "unknown (connection refused)");
        assert!(!unknown.busy());
    }

    #[test]
    fn round_trips_through_json_flat() {
        let at = "2026-11-25T02:03:04Z".parse().unwrap();
        for r in [
            RecentUploads {
                read_at: at,
                seen: Seen::Known {
                    last_10_min: 4,
                    newest: Some(at),
                },
            },
            RecentUploads::unknown("no answer", at),
        ] {
            let json = serde_json::to_value(&r).unwrap();
            assert!(json["state"].is_string(), "{json}");
            assert_eq!(serde_json::from_value::<RecentUploads>(json).unwrap(), r);
        }
    }
}
