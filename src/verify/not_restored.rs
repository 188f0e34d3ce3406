//! After a restore: the assets the pre-restore snapshot holds and the database now lacks,
//! i.e. what was uploaded after the snapshot restored, with owner and original path, so the
//! admin knows what the phones will upload again (docs/recovery.md "After a restore"). The
//! live asset IDs are read into a set (16 bytes each); the pre-restore snapshot's dump is
//! streamed (snapshot/dump_rows.rs), never held. Only reads.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::Path;

use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::discover::DbAccess;
use crate::snapshot::dump_rows::{Row, each_row};

/// Assets listed in full; beyond, they are counted.
pub const LISTED: usize = 1000;
const ASSET_TABLES: [&str; 2] = ["public.asset", "public.assets"];
const USER_TABLES: [&str; 2] = ["public.user", "public.users"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotRestored {
    /// The pre-restore snapshot compared with (the restore journal names it).
    pub pre_restore: String,
    /// How many assets it holds that the database lacks; None when it could not be told.
    pub count: Option<usize>,
    /// The first `LISTED` of them, in the dump's order.
    pub assets: Vec<LostAsset>,
    /// Why the comparison could not be made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LostAsset {
    pub id: String,
    /// The owner's email (or name, or ID when the user is gone too).
    pub owner: String,
    pub original_path: String,
    /// When the server received it (`createdAt`), as the dump has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_at: Option<String>,
}

/// Compares the pre-restore snapshot `id` in `snapshot_dir` with the database at `access`.
/// Never fails: what cannot be compared says why.
pub async fn compare(snapshot_dir: &Path, id: &str, access: &DbAccess) -> NotRestored {
    let failed = |error: String| NotRestored {
        pre_restore: id.to_string(),
        count: None,
        assets: Vec::new(),
        error: Some(error),
    };
    let dump = snapshot_dir
        .join(id)
        .join(crate::snapshot::store::DUMP_FILE);
    if !dump.exists() {
        return failed(format!(
            "{} is missing: the pre-restore snapshot holds the database's files, not a dump",
            dump.display()
        ));
    }
    let live = match live_ids(access).await {
        Ok(live) => live,
        Err(e) => return failed(format!("reading the asset IDs of the database: {e}")),
    };
    let database = access.database.clone();
    let found = tokio::task::spawn_blocking(move || only_in_dump(&dump, &database, &live)).await;
    match found {
        Ok(Ok((count, assets))) => NotRestored {
            pre_restore: id.to_string(),
            count: Some(count),
            assets,
            error: None,
        },
        Ok(Err(e)) => failed(e.to_string()),
        Err(e) => failed(format!("the comparison stopped: {e}")),
    }
}

/// Every asset ID of the live database, read as a stream.
async fn live_ids(access: &DbAccess) -> Result<HashSet<u128>, String> {
    let db = crate::snapshot::db::connect(
        access,
        std::time::Duration::from_secs(10),
        "-c default_transaction_read_only=on",
    )
    .await
    .map_err(|e| e.to_string())?;
    let table = db.asset_table().await.map_err(|e| db.describe(&e))?;
    let table = table.ok_or("no asset table")?;
    let rows = db
        .client
        .query_raw(
            &format!("SELECT id::text FROM {table}"),
            std::iter::empty::<&str>(),
        )
        .await
        .map_err(|e| db.describe(&e))?;
    futures_util::pin_mut!(rows);
    let mut ids = HashSet::new();
    while let Some(row) = rows.try_next().await.map_err(|e| db.describe(&e))? {
        if let Some(id) = uuid_bits(row.get(0)) {
            ids.insert(id);
        }
    }
    db.close().await;
    Ok(ids)
}

/// Streams the dump: the assets whose ID `live` lacks (counted, the first `LISTED` kept),
/// their owners named from the user table.
fn only_in_dump(
    dump: &Path,
    database: &str,
    live: &HashSet<u128>,
) -> Result<(usize, Vec<LostAsset>), crate::snapshot::dump_rows::DumpReadError> {
    let mut count = 0;
    let mut kept = Vec::new();
    // A household's users: few.
    let mut users: HashMap<String, String> = HashMap::new();
    let tables: Vec<&str> = ASSET_TABLES.iter().chain(&USER_TABLES).copied().collect();
    each_row(dump, database, &tables, |row: Row<'_>| {
        let Some(id) = row.get("id") else {
            return ControlFlow::Continue(());
        };
        if USER_TABLES.contains(&row.table) {
            let name = row
                .get("email")
                .or(row.get("name"))
                .unwrap_or(id)
                .to_string();
            users.insert(id.to_string(), name);
        } else if uuid_bits(id).is_some_and(|bits| !live.contains(&bits)) {
            count += 1;
            if kept.len() < LISTED {
                kept.push(LostAsset {
                    id: id.to_string(),
                    owner: row.get("ownerId").unwrap_or_default().to_string(),
                    original_path: row.get("originalPath").unwrap_or_default().to_string(),
                    uploaded_at: row.get("createdAt").map(str::to_string),
                });
            }
        }
        ControlFlow::Continue(())
    })?;
    for asset in &mut kept {
        if let Some(name) = users.get(&asset.owner) {
            asset.owner = name.clone();
        }
    }
    Ok((count, kept))
}

/// A UUID's 128 bits, from its text form.
fn uuid_bits(text: &str) -> Option<u128> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    (hex.len() == 32)
        .then(|| u128::from_str_radix(&hex, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_assets_the_database_lacks_are_listed_with_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let a = "00000000-0000-4000-8000-00000000000a";
        let b = "00000000-0000-4000-8000-00000000000b";
        let u = "00000000-0000-4000-8000-0000000000f1";
        let sql = format!(
            "\\connect immich\n\
             COPY public.asset (id, \"ownerId\", \"originalPath\", \"createdAt\") FROM stdin;\n\
             {a}\t{u}\t/data/upload/{u}/a.jpg\t2026-11-25 12:00:00+00\n\
             {b}\t{u}\t/data/upload/{u}/b\\\\c.jpg\t2026-11-25 12:05:00+00\n\
             \\.\n\
             COPY public.\"user\" (id, email, name) FROM stdin;\n\
             {u}\tadmin@example.com\tAdmin\n\
             \\.\n"
        );
        let dump = dir.path().join("db.sql.zst");
        std::fs::write(&dump, zstd::encode_all(sql.as_bytes(), 3).unwrap()).unwrap();
        let live: HashSet<u128> = [uuid_bits(a).unwrap()].into();
        let (count, assets) = only_in_dump(&dump, "immich", &live).unwrap();
        assert_eq!(count, 1);
        assert_eq!(
            assets,
            [LostAsset {
                id: b.into(),
                owner: "admin@example.com".into(),
                original_path: format!("/data/upload/{u}/b\\c.jpg"),
                uploaded_at: Some("2026-11-25 12:05:00+00".into()),
            }]
        );
        assert_eq!(uuid_bits("not-a-uuid"), None);
    }
}
