//! The database half of a snapshot: `pg_dumpall --clean --if-exists` run inside the database
//! container through the Docker exec API, streamed through zstd and SHA-256 straight to disk
//! (never held whole in memory), and the facts read over SQL: applied migrations (TypeORM's
//! and Kysely's tables), asset and user counts, database size. A [`Point`] fixes the moment:
//! its exported snapshot is what the Immich database's dump and the facts are read from, so
//! they agree with the storage tree taken while the writers were paused (snapshot/pause.rs).
//! It only reads the database.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bollard::Docker;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

use crate::discover::DbAccess;
use crate::docker::{classify, is_not_found};

/// zstd level: 3 is zstd's default, fast enough to keep up with pg_dumpall.
const ZSTD_LEVEL: i32 = 3;
/// Chunks in flight between the exec stream and the compressor (backpressure, bounded memory).
const CHANNEL_CHUNKS: usize = 64;
const STDERR_KEPT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database container {name} is not running ({state}); start it before snapshotting")]
    NotRunning { name: String, state: String },
    #[error("database container {name} does not exist")]
    NoContainer { name: String },
    #[error("Docker exec in {name} failed: {detail}")]
    Exec { name: String, detail: String },
    #[error("{program} in {name} exited with code {code}: {stderr}")]
    DumpFailed {
        name: String,
        program: String,
        code: i64,
        stderr: String,
    },
    #[error("writing the dump to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `detail` is PostgreSQL's own words (pg_error.rs).
    #[error("{operation}: {detail}")]
    Sql { operation: String, detail: String },
    #[error("connecting to the database at {target}: {detail}")]
    Connect { target: String, detail: String },
}

impl DbError {
    /// A database that is starting (or restarting, or being recreated) answers in seconds;
    /// worth waiting for. A stopped one, a wrong password or a failed dump is not.
    pub fn is_transient(&self) -> bool {
        const STARTING: &[&str] = &[
            "starting up",
            "not yet accepting",
            "shutting down",
            "connection refused",
            "timed out",
            "timeout",
            "no route to host",
            "unknown (database container not running",
            // cannot_connect_now: starting up, shutting down, in recovery.
            "sqlstate 57p03",
        ];
        match self {
            DbError::Connect { detail, .. } => {
                let detail = detail.to_lowercase();
                STARTING.iter().any(|p| detail.contains(p))
            }
            DbError::NotRunning { state, .. } => matches!(state.as_str(), "restarting" | "created"),
            DbError::NoContainer { .. } => true,
            _ => false,
        }
    }
}

/// `Default`: no dump (a snapshot that holds the database's files instead).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DumpFile {
    /// Bytes pg_dumpall wrote (uncompressed SQL).
    pub sql_bytes: u64,
    /// Bytes on disk (zstd).
    pub bytes: u64,
    /// SHA-256 of the file on disk, hex.
    pub sha256: String,
    pub duration_ms: u64,
}

/// The environment of a `pg_dumpall`/`psql` exec in the database container: the password as
/// `PGPASSWORD`, so a database that asks for one on its local socket too (hardened
/// `pg_hba.conf`) answers. In the exec's environment only: never on a command line, which
/// every process in the container (and `docker top`) can read.
pub fn exec_env(access: &DbAccess) -> Option<Vec<String>> {
    access
        .password_known
        .then(|| vec![format!("PGPASSWORD={}", access.password)])
}

/// Streams the dump of the cluster from `container` into `dest` (zstd). `dest` is fsynced
/// before return. Without a point, `pg_dumpall --clean --if-exists`. With one, the same dump
/// in two parts: `pg_dumpall --clean --if-exists --exclude-database=<immich>` (roles and the
/// other databases, which Immich does not write), then the Immich database as pg_dumpall
/// would have written it (`pg_dump --clean --if-exists --create`) of the point's snapshot
/// (`--snapshot`): one SQL script that the restore replays the same way.
pub async fn dump(
    docker: &Docker,
    host: &str,
    container: &str,
    access: &DbAccess,
    point: Option<&Point>,
    dest: &Path,
) -> Result<DumpFile, DbError> {
    let started = Instant::now();
    ensure_running(docker, host, container).await?;

    // Compression and hashing run on a blocking thread; the async side only moves bytes.
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(CHANNEL_CHUNKS);
    let path = dest.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || write_compressed(rx, &path));
    let user = ["--username", &access.user].map(String::from);
    let streamed = async {
        let Some(point) = point else {
            let cmd = ["pg_dumpall", "--clean", "--if-exists"].map(String::from);
            return stream_exec(docker, host, container, access, [&cmd[..], &user].concat(), &tx)
                .await;
        };
        let others = [
            "pg_dumpall".to_string(),
            "--clean".into(),
            "--if-exists".into(),
            format!("--exclude-database={}", exact_pattern(&access.database)),
        ];
        stream_exec(docker, host, container, access, [&others[..], &user].concat(), &tx).await?;
        // The header pg_dumpall writes before each database.
        let header = format!(
            "--\n-- Database \"{}\" dump (immich-guard: pg_dump of the snapshot's point in time)\n--\n\n",
            access.database
        );
        if tx.send(bytes::Bytes::from(header)).await.is_err() {
            return Ok(()); // the writer failed; its error is reported below
        }
        let immich = [
            "pg_dump".to_string(),
            "--clean".into(),
            "--if-exists".into(),
            "--create".into(),
            format!("--snapshot={}", point.snapshot),
            "--dbname".into(),
            access.database.clone(),
        ];
        stream_exec(docker, host, container, access, [&immich[..], &user].concat(), &tx).await
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| DbError::Exec {
            name: container.to_string(),
            detail: format!("compressor thread: {e}"),
        })?
        .map_err(|source| DbError::Write {
            path: dest.to_path_buf(),
            source,
        })?;
    streamed?;
    let (sql_bytes, bytes, sha256) = written;
    Ok(DumpFile {
        sql_bytes,
        bytes,
        sha256,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// `name` as a pg_dumpall pattern matching exactly that name (quoted: no wildcards).
fn exact_pattern(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Runs `cmd` in `container` and sends its stdout to `tx`; an exit code other than 0 is an
/// error with the end of its stderr. A writer gone away ends the stream early (its own error
/// is what the caller reports).
async fn stream_exec(
    docker: &Docker,
    host: &str,
    container: &str,
    access: &DbAccess,
    cmd: Vec<String>,
    tx: &mpsc::Sender<bytes::Bytes>,
) -> Result<(), DbError> {
    let program = cmd[0].clone();
    let exec_err = |detail: String| DbError::Exec {
        name: container.to_string(),
        detail: format!("{program}: {detail}"),
    };
    let (exec_id, mut output) = crate::docker::exec_attached(
        docker,
        host,
        container,
        cmd,
        exec_env(access),
        Some(1 << 20),
    )
    .await
    .map_err(|e| exec_err(e.to_string()))?;
    let mut stderr = Vec::new();
    while let Some(item) = output.next().await {
        match item {
            Ok(bollard::container::LogOutput::StdOut { message }) => {
                if tx.send(message).await.is_err() {
                    return Ok(());
                }
            }
            Ok(bollard::container::LogOutput::StdErr { message }) => {
                stderr.extend_from_slice(&message);
                if stderr.len() > 2 * STDERR_KEPT {
                    stderr.drain(..stderr.len() - STDERR_KEPT);
                }
            }
            Ok(_) => {}
            Err(e) => return Err(exec_err(classify(host, e).to_string())),
        }
    }
    let code = crate::docker::exec_exit_code(docker, host, &exec_id)
        .await
        .map_err(|e| exec_err(e.to_string()))?;
    if code != 0 {
        let tail = String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(STDERR_KEPT)..])
            .trim()
            .to_string();
        return Err(DbError::DumpFailed {
            name: container.to_string(),
            program,
            code,
            stderr: tail,
        });
    }
    Ok(())
}

/// Fails with a message naming the container unless it is running (and not paused).
pub async fn ensure_running(docker: &Docker, host: &str, container: &str) -> Result<(), DbError> {
    let inspect = docker
        .inspect_container(
            container,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .map_err(|e| {
            if is_not_found(&e) {
                DbError::NoContainer {
                    name: container.to_string(),
                }
            } else {
                DbError::Exec {
                    name: container.to_string(),
                    detail: classify(host, e).to_string(),
                }
            }
        })?;
    let state = inspect.state.unwrap_or_default();
    if state.running != Some(true) || state.paused == Some(true) {
        return Err(DbError::NotRunning {
            name: container.to_string(),
            state: state.status.map(|s| s.to_string()).unwrap_or_default(),
        });
    }
    Ok(())
}

/// Counts and hashes what reaches the file, so the checksum is of the bytes on disk.
pub(crate) struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W> Hashing<W> {
    pub(crate) fn new(inner: W) -> Hashing<W> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The writer, the bytes written and their SHA-256 (hex).
    pub(crate) fn finish(self) -> (W, u64, String) {
        (
            self.inner,
            self.bytes,
            format!("{:x}", self.hasher.finalize()),
        )
    }
}

/// SHA-256 (hex) and length of a file's bytes, read in large chunks.
pub fn file_sha256(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hashing = Hashing::new(std::io::sink());
    std::io::copy(&mut file, &mut hashing)?;
    let (_, bytes, sha) = hashing.finish();
    Ok((sha, bytes))
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_compressed(
    mut rx: mpsc::Receiver<bytes::Bytes>,
    path: &Path,
) -> std::io::Result<(u64, u64, String)> {
    let file = crate::owner_only::create_file(path)?;
    let hashing = Hashing::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let mut encoder = zstd::stream::Encoder::new(hashing, ZSTD_LEVEL)?;
    let mut sql_bytes = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        sql_bytes += chunk.len() as u64;
        encoder.write_all(&chunk)?;
    }
    let mut hashing = encoder.finish()?;
    hashing.flush()?;
    let (writer, bytes, sha256) = hashing.finish();
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((sql_bytes, bytes, sha256))
}

/// What the database says about itself, recorded in the snapshot's meta.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DbFacts {
    /// Applied migration names, TypeORM's table then Kysely's, each sorted.
    pub migrations: Vec<String>,
    pub typeorm_migrations: usize,
    pub kysely_migrations: usize,
    pub assets: Option<i64>,
    pub users: Option<i64>,
    pub database_bytes: i64,
    /// `txid_current_snapshot()` before the dump (`xmin:xmax:in-progress`): what says
    /// nothing was written since (snapshot/unchanged.rs). None when it could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid_snapshot: Option<String>,
}

/// A connection made with the discovered credentials, and how to quote PostgreSQL's errors
/// without the password.
/// Where Immich records applied migrations: TypeORM's table (up to v1.136), then Kysely's
/// (from v1.133); both are read.
pub const MIGRATION_TABLES: [&str; 2] = ["migrations", "kysely_migrations"];
/// The asset table by its names, newest first: StandardizeNames (~v1.137) renamed
/// `assets` to `asset`.
pub const ASSET_TABLES: [&str; 2] = ["asset", "assets"];
/// The user table by its names, newest first (`users` → `"user"` in the same rename).
pub const USER_TABLES: [&str; 2] = ["\"user\"", "users"];

pub struct Connection {
    pub client: tokio_postgres::Client,
    secrets: crate::redact::Secrets,
    task: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl Connection {
    /// PostgreSQL's own words (pg_error.rs), the password scrubbed.
    pub fn describe(&self, e: &tokio_postgres::Error) -> String {
        self.secrets.scrub(&crate::pg_error::describe(e))
    }

    pub fn sql(
        &self,
        operation: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> DbError + '_ {
        let operation = operation.into();
        move |e| DbError::Sql {
            operation,
            detail: self.describe(&e),
        }
    }

    /// The asset table: `asset`, or `assets` before StandardizeNames (~v1.137) renamed it
    /// (the columns kept their names); None when there is neither.
    pub async fn asset_table(&self) -> Result<Option<&'static str>, tokio_postgres::Error> {
        for name in ASSET_TABLES {
            if exists(&self.client, name).await? {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Closes the connection and waits for it to end.
    pub async fn close(self) {
        drop(self.client);
        let _ = self.task.await;
    }
}

/// Connects to the Immich database. `options`: PostgreSQL settings for the session
/// (`-c statement_timeout=2000`), empty for none.
pub async fn connect(
    access: &DbAccess,
    timeout: std::time::Duration,
    options: &str,
) -> Result<Connection, DbError> {
    let mut secrets = crate::redact::Secrets::default();
    secrets.add(&access.password);
    let host = access.host.as_deref().ok_or_else(|| DbError::Connect {
        target: "the database".into(),
        detail: "address unknown (database container not running, or set database.host)".into(),
    })?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(access.port)
        .user(&access.user)
        .password(&access.password)
        .dbname(&access.database)
        .connect_timeout(timeout);
    if !options.is_empty() {
        config.options(options);
    }
    let (client, connection) = config.connect(NoTls).await.map_err(|e| DbError::Connect {
        target: format!(
            "{host}:{} (database {}, user {})",
            access.port, access.database, access.user
        ),
        detail: secrets.scrub(&crate::pg_error::describe(&e)),
    })?;
    Ok(Connection {
        client,
        secrets,
        task: tokio::spawn(connection),
    })
}

/// Connects with the discovered credentials and reads migrations, counts and size. An error
/// names what was being done and what PostgreSQL said, never the password.
pub async fn facts(access: &DbAccess) -> Result<DbFacts, DbError> {
    let session = connect(access, std::time::Duration::from_secs(10), "").await?;
    let facts = read_facts(&session).await;
    session.close().await;
    facts
}

/// The database's point in time for a snapshot: a `REPEATABLE READ, READ ONLY` transaction
/// whose snapshot is exported (`pg_export_snapshot()`). The dump of the Immich database
/// imports it (`pg_dump --snapshot`) and the facts are read inside it, so both are of the
/// moment it was taken, however long after it they run. Held open until the dump has
/// finished (an exported snapshot can be imported only while its transaction lives); dropping
/// it ends the transaction.
pub struct Point {
    session: Connection,
    /// The exported snapshot's name, for `pg_dump --snapshot`.
    pub snapshot: String,
}

impl Point {
    /// Begins the transaction and exports its snapshot: the moment the snapshot holds. Fast
    /// (one round trip each); taken while the writers are paused.
    pub async fn take(access: &DbAccess) -> Result<Point, DbError> {
        let session = connect(access, std::time::Duration::from_secs(10), "").await?;
        session
            .client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(session.sql("beginning the snapshot's transaction"))?;
        let snapshot: String = session
            .client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(session.sql("exporting the snapshot's point in time (pg_export_snapshot)"))?
            .get(0);
        Ok(Point { session, snapshot })
    }

    /// Migrations, counts and size as of the point (the transaction's snapshot).
    pub async fn facts(&self) -> Result<DbFacts, DbError> {
        read_facts(&self.session).await
    }

    /// Ends the transaction (once the dump that imported it has finished).
    pub async fn end(self) {
        let _ = self.session.client.batch_execute("COMMIT").await;
        self.session.close().await;
    }
}

async fn read_facts(session: &Connection) -> Result<DbFacts, DbError> {
    let client = &session.client;
    // First: a write after this is a write after the snapshot's state. Inside a point's
    // transaction it is the transaction's own snapshot.
    let xid_snapshot = client
        .query_one("SELECT txid_current_snapshot()::text", &[])
        .await
        .ok()
        .map(|r| r.get::<_, String>(0));
    let mut counts = Vec::new();
    let mut migrations = Vec::new();
    for table in MIGRATION_TABLES {
        let found = exists(client, table)
            .await
            .map_err(session.sql(format!("looking for the migrations table {table}")))?;
        let mut names: Vec<String> = if found {
            client
                .query(&format!("SELECT name::text FROM {table}"), &[])
                .await
                .map_err(session.sql(format!("reading the applied migrations in {table}")))?
                .iter()
                .map(|r| r.get(0))
                .collect()
        } else {
            Vec::new()
        };
        names.sort();
        counts.push(names.len());
        migrations.extend(names);
    }
    // StandardizeNames (~v1.137) renamed assets→asset and users→user.
    let assets = count_first(client, &ASSET_TABLES)
        .await
        .map_err(session.sql("counting assets"))?;
    let users = count_first(client, &USER_TABLES)
        .await
        .map_err(session.sql("counting users"))?;
    let database_bytes: i64 = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .map_err(session.sql("reading the database size"))?
        .get(0);
    Ok(DbFacts {
        migrations,
        typeorm_migrations: counts[0],
        kysely_migrations: counts[1],
        assets,
        users,
        database_bytes,
        xid_snapshot,
    })
}

async fn exists(
    client: &tokio_postgres::Client,
    table: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0))
}

async fn count_first(
    client: &tokio_postgres::Client,
    tables: &[&str],
) -> Result<Option<i64>, tokio_postgres::Error> {
    for table in tables {
        if exists(client, table).await? {
            let n: i64 = client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await?
                .get(0);
            return Ok(Some(n));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_goes_in_the_exec_environment_only_when_known() {
        let mut access = DbAccess {
            user: "postgres".into(),
            password: "s3cret".into(),
            password_known: true,
            database: "immich".into(),
            host: None,
            port: 5432,
        };
        assert_eq!(exec_env(&access), Some(vec!["PGPASSWORD=s3cret".into()]));
        access.password_known = false;
        assert_eq!(exec_env(&access), None);
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_target_and_the_cause() {
        // A port nothing listens on: bound, then let go.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let access = DbAccess {
            user: "postgres".into(),
            password: "Pr0be!S3cret@9f".into(),
            password_known: true,
            database: "immich".into(),
            host: Some("127.0.0.1".into()),
            port,
        };
        let e = facts(&access).await.unwrap_err();
        let message = e.to_string();
        assert!(
            message.starts_with(&format!(
                "connecting to the database at 127.0.0.1:{port} (database immich, user postgres): error connecting to server: "
            )),
            "{message}"
        );
        assert!(
            message.to_lowercase().contains("connection refused"),
            "{message}"
        );
        assert!(e.is_transient(), "{message}");
        assert!(!message.contains("Pr0be"), "{message}");
    }

    #[test]
    fn compressed_file_checksum_is_of_the_bytes_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sql.zst");
        let (tx, rx) = mpsc::channel(4);
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || write_compressed(rx, &path))
        };
        let sql = "INSERT INTO t VALUES (1);\n".repeat(10_000);
        for chunk in sql.as_bytes().chunks(7_000) {
            tx.blocking_send(bytes::Bytes::copy_from_slice(chunk))
                .unwrap();
        }
        drop(tx);
        let (sql_bytes, bytes, sha) = writer.join().unwrap().unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(sql_bytes, sql.len() as u64);
        assert_eq!(bytes, on_disk.len() as u64);
        assert!(bytes < sql_bytes / 10, "compressed: {bytes} of {sql_bytes}");
        assert_eq!(sha, format!("{:x}", Sha256::digest(&on_disk)));
        assert_eq!(zstd::decode_all(&on_disk[..]).unwrap(), sql.as_bytes());
    }
}
