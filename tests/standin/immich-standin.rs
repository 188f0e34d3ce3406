//! A stand-in for immich-server (and, by role, for machine-learning and redis) used by the
//! integration tests (README.md, the test section). It behaves like the real server where
//! immich-guard cares: it reads the `DB_*` env, boots slowly, applies its version's migrations in order and records
//! them where Immich does (TypeORM's `migrations` before v1.133, Kysely's `kysely_migrations`
//! from v1.133 on), refuses a database migrated by a newer version with Immich's own message,
//! checks the `.immich` markers of the media folders, writes assets (rows + files) and serves
//! the unauthenticated server endpoints. It can be told to crash at boot or halfway through its
//! migrations.
//!
//! Roles (argv[1]): `server` (default), `ml`, `redis`, `healthcheck` (the image's HEALTHCHECK,
//! like `immich-healthcheck`).
//!
//! Server env: `IMMICH_STANDIN_VERSION` (else `/etc/immich-version`), `DB_HOSTNAME`, `DB_PORT`,
//! `DB_USERNAME`, `DB_PASSWORD`, `DB_DATABASE_NAME`, `DB_SKIP_MIGRATIONS`,
//! `IMMICH_MEDIA_LOCATION` (/data), `IMMICH_PORT` (2283), `STANDIN_BOOT_DELAY_MS` (2000),
//! `STANDIN_DB_TIMEOUT_MS` (30000), `STANDIN_SEED_ASSETS` (3), `STANDIN_ASSETS_PER_BOOT` (1),
//! `STANDIN_UPLOAD_EVERY_MS` (0: off; else one more asset every so often while it runs, as
//! phones still uploading), `STANDIN_CRASH` (`boot` | `migration`), `STANDIN_CRASH_MESSAGE`, `STANDIN_CRASH_FILE` (a
//! path; when that file exists its content is the crash mode, so a test can make a running
//! container crash-loop without recreating it), `STANDIN_CRASH_TIMES` (crash only the first N
//! boots of this container: a restart loop that recovers by itself).
//!
//! The asset table's columns carry Immich's own names (`"ownerId"`, `"originalPath"`,
//! `"createdAt"`: when the server received the upload), which immich-guard reads.
//!
//! Only std and crates the package already depends on; never the `immich_guard` library.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_postgres::{Client, NoTls};

/// (version that introduced it, migration name). Names shaped like Immich's
/// (`<ms timestamp>-<PascalName>`), timestamps increase with the version.
const CATALOG: &[(&str, &str)] = &[
    ("v1.100.0", "1700000000000-InitialSchema"),
    ("v1.118.0", "1727000000000-AddAssetFaces"),
    ("v1.119.0", "1729000000000-AddAssetJobStatus"),
    ("v1.120.0", "1731000000000-AddMemories"),
    ("v1.120.0", "1731000000001-AddMemoryAssets"),
    ("v1.132.0", "1744000000000-AddTags"),
    ("v1.133.0", "1745000000000-KyselyBaseline"),
    ("v1.136.0", "1751000000000-AddAlbumDescription"),
    ("v1.137.0", "1752267649968-StandardizeNames"),
    ("v2.0.0", "1756000000000-AddWorkflows"),
    ("v2.1.0", "1758000000000-AddOcr"),
    ("v3.0.0", "1780000000000-DropPgvectors"),
];

/// The media folders Immich checks at boot, each with a `.immich` marker.
const FOLDERS: &[&str] = &[
    "library",
    "upload",
    "thumbs",
    "encoded-video",
    "profile",
    "backups",
];

/// From this version on, migrations are recorded by Kysely.
const KYSELY_SINCE: Version = (1, 133, 0);

type Version = (u64, u64, u64);

fn parse_version(v: &str) -> Version {
    let core = v.trim().trim_start_matches(['v', 'V']);
    let core = core.split(['-', '+']).next().unwrap_or("");
    let mut parts = core.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// A NestJS-style log line: `[Nest] 1  - 11/25/2026, 2:23:00 AM     LOG [Api:Bootstrap] ...`.
/// Errors go to stderr, like Nest's ConsoleLogger.
fn log(level: &str, context: &str, message: &str) {
    let now = chrono::Local::now().format("%-m/%-d/%Y, %-I:%M:%S %p");
    let line = format!(
        "[Nest] {}  - {now} {level:>7} [{context}] {message}",
        std::process::id()
    );
    if level == "ERROR" || level == "WARN" {
        eprintln!("{line}");
    } else {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Logs an error and exits 1, as the server process does when bootstrap fails.
fn fail(context: &str, message: &str) -> ! {
    log("ERROR", context, message);
    std::process::exit(1)
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn env_num(key: &str, default: u64) -> u64 {
    match std::env::var(key) {
        Ok(v) if !v.is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| fail("Bootstrap", &format!("invalid {key}={v:?}"))),
        _ => default,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let role = std::env::args().nth(1).unwrap_or_else(|| "server".into());
    if role == "healthcheck" {
        healthcheck();
    }
    // PID 1 in a container gets no default signal dispositions: exit promptly on stop.
    tokio::spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        std::process::exit(0);
    });
    match role.as_str() {
        "server" => server().await,
        "ml" => {
            println!(
                "[{}] INFO     Started server process [{}]",
                chrono::Local::now().format("%m/%d/%y %H:%M:%S"),
                std::process::id()
            );
            serve(3003, |req| match request_path(req) {
                "/ping" => http(200, "text/plain", "pong"),
                _ => http(404, "application/json", r#"{"detail":"Not Found"}"#),
            })
            .await
        }
        "redis" => {
            println!(
                "1:M {} * Ready to accept connections tcp",
                chrono::Local::now().format("%d %b %Y %H:%M:%S%.3f")
            );
            redis().await
        }
        other => fail("Bootstrap", &format!("unknown role {other:?}")),
    }
}

/// Answers every line of every connection with `+PONG`.
async fn redis() -> ! {
    let listener = match TcpListener::bind(("0.0.0.0", 6379)).await {
        Ok(l) => l,
        Err(e) => fail("Bootstrap", &format!("Error: listen {e} 0.0.0.0:6379")),
    };
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let (read, mut write) = sock.into_split();
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Ok(Some(_)) = lines.next_line().await {
                if write.write_all(b"+PONG\r\n").await.is_err() {
                    break;
                }
            }
        });
    }
}

/// `immich-healthcheck`: exit 0 when the local server answers its ping.
fn healthcheck() -> ! {
    let port = env_or("IMMICH_PORT", "2283");
    let ok = (|| {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(
            b"GET /api/server/ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .ok()?;
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("pong").then_some(())
    })();
    std::process::exit(if ok.is_some() { 0 } else { 1 })
}

fn request_path(req: &str) -> &str {
    let target = req.split_whitespace().nth(1).unwrap_or("");
    target.split('?').next().unwrap_or("")
}

fn http(status: u16, content_type: &str, body: &str) -> String {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Accepts connections on `port` and answers each one's first request with `answer`.
async fn serve(port: u16, answer: impl Fn(&str) -> String + Send + Sync + 'static) -> ! {
    let listener = match TcpListener::bind(("0.0.0.0", port)).await {
        Ok(l) => l,
        Err(e) => fail("Bootstrap", &format!("Error: listen {e} 0.0.0.0:{port}")),
    };
    let answer = Arc::new(answer);
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            // Read the whole head before answering, so closing never resets unread input.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            let complete = |b: &[u8]| {
                if b.starts_with(b"GET ") || b.starts_with(b"HEAD ") || b.starts_with(b"POST ") {
                    b.windows(4).any(|w| w == b"\r\n\r\n")
                } else {
                    b.ends_with(b"\n")
                }
            };
            while !complete(&buf) && buf.len() < 16 * 1024 {
                match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            if buf.is_empty() {
                return;
            }
            let req = String::from_utf8_lossy(&buf).into_owned();
            let _ = sock.write_all(answer(&req).as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

async fn server() {
    let version = std::env::var("IMMICH_STANDIN_VERSION")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/etc/immich-version").ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| {
            fail(
                "Bootstrap",
                "Error: ENOENT: no such file or directory, open '/etc/immich-version'",
            )
        });
    let v = parse_version(&version);
    log(
        "LOG",
        "Microservices:EventRepository",
        &format!("Initialized websocket server, immich-server {version}"),
    );
    tokio::time::sleep(Duration::from_millis(env_num(
        "STANDIN_BOOT_DELAY_MS",
        2000,
    )))
    .await;

    let crash = crash_mode();
    if crash == "boot" {
        fail(
            "Api:Bootstrap",
            &env_or(
                "STANDIN_CRASH_MESSAGE",
                "Error: Invalid upgrade path: this version cannot start on the current installation",
            ),
        );
    }

    let db = connect().await;

    let known: Vec<&str> = CATALOG
        .iter()
        .filter(|(introduced, _)| parse_version(introduced) <= v)
        .map(|(_, name)| *name)
        .collect();
    if env_or("DB_SKIP_MIGRATIONS", "false") == "true" {
        log(
            "LOG",
            "Microservices:DatabaseRepository",
            "Skipping migrations (DB_SKIP_MIGRATIONS=true)",
        );
    } else {
        migrate(&db, &known, v >= KYSELY_SINCE, crash == "migration").await;
    }

    let media = PathBuf::from(env_or("IMMICH_MEDIA_LOCATION", "/data"));
    check_mounts(&db, &media).await;
    record_version(&db, &version).await;
    add_data(&db, &media).await;
    let history = version_history(&db).await;

    let port = env_num("IMMICH_PORT", 2283);
    let port = u16::try_from(port).unwrap_or_else(|_| fail("Bootstrap", "invalid IMMICH_PORT"));
    log(
        "LOG",
        "Api:Bootstrap",
        &format!("Immich Server is listening on http://[::1]:{port} [{version}] [production]"),
    );
    // Keep the connection for the process's life, as the real server keeps its pool: a DROP
    // DATABASE during a restore fails while the server runs, as it does with Immich.
    let db = Arc::new(db);
    let every = env_num("STANDIN_UPLOAD_EVERY_MS", 0);
    if every > 0 {
        tokio::spawn(keep_uploading(db.clone(), media.clone(), every));
    }
    let _db = db;
    let (major, minor, patch) = v;
    serve(port, move |req| match request_path(req) {
        "/api/server/ping" => http(200, "application/json", r#"{"res":"pong"}"#),
        "/api/server/version" => http(
            200,
            "application/json",
            &format!(r#"{{"major":{major},"minor":{minor},"patch":{patch}}}"#),
        ),
        "/api/server/version-history" => http(200, "application/json", &history),
        _ => http(
            404,
            "application/json",
            r#"{"message":"Cannot GET","error":"Not Found","statusCode":404}"#,
        ),
    })
    .await
}

/// `STANDIN_CRASH`, or the content of `STANDIN_CRASH_FILE` when it exists; nothing once
/// `STANDIN_CRASH_TIMES` boots of this container have crashed (counted in its own /tmp, which
/// lives as long as the container).
fn crash_mode() -> String {
    let mut mode = env_or("STANDIN_CRASH", "");
    if let Ok(path) = std::env::var("STANDIN_CRASH_FILE")
        && let Ok(content) = std::fs::read_to_string(&path)
    {
        mode = content.trim().to_string();
    }
    if mode.is_empty() {
        return mode;
    }
    if let Ok(times) = std::env::var("STANDIN_CRASH_TIMES") {
        let times: u64 = times.trim().parse().unwrap_or_else(|_| {
            fail(
                "Bootstrap",
                &format!("invalid STANDIN_CRASH_TIMES={times:?}"),
            )
        });
        let counter = Path::new("/tmp/standin-crashes");
        let crashed: u64 = std::fs::read_to_string(counter)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if crashed >= times {
            return String::new();
        }
        let _ = std::fs::write(counter, (crashed + 1).to_string());
    }
    mode
}

/// Connects like the server does at boot: resolve, connect, retry while the database is not
/// there yet (logging Node's error texts), give up after `STANDIN_DB_TIMEOUT_MS`.
async fn connect() -> Client {
    const CONTEXT: &str = "Microservices:DatabaseRepository";
    let host = env_or("DB_HOSTNAME", "database");
    let port = env_num("DB_PORT", 5432);
    let port = u16::try_from(port).unwrap_or_else(|_| fail("Bootstrap", "invalid DB_PORT"));
    let user = env_or("DB_USERNAME", "postgres");
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(env_num("STANDIN_DB_TIMEOUT_MS", 30_000));
    let mut last = String::new();
    loop {
        let attempt = async {
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("Error: getaddrinfo ENOTFOUND {host}"))?;
            let mut config = tokio_postgres::Config::new();
            config
                .host(addr.ip().to_string())
                .port(addr.port())
                .user(&user)
                .password(env_or("DB_PASSWORD", "postgres"))
                .dbname(env_or("DB_DATABASE_NAME", "immich"))
                .application_name("immich")
                .connect_timeout(Duration::from_secs(5));
            match config.connect(NoTls).await {
                Ok(pair) => Ok(pair),
                Err(e) => Err(describe_connect_error(&e, addr)),
            }
        };
        match attempt.await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        // The real server logs and keeps serving what needs no database.
                        log("ERROR", CONTEXT, &format!("Error: {e}"));
                    }
                });
                return client;
            }
            Err(message) => {
                if message.contains("password authentication failed") {
                    fail(CONTEXT, &message);
                }
                if message != last {
                    log("ERROR", CONTEXT, &message);
                }
                if tokio::time::Instant::now() >= deadline {
                    fail(
                        "Api:Bootstrap",
                        &format!("Unable to connect to the database. Error: {message}"),
                    );
                }
                last = message;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// The text Node's `pg`/postgres.js would give for a failed connection.
fn describe_connect_error(e: &tokio_postgres::Error, addr: SocketAddr) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("error: {}", db.message());
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            let code = match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "ECONNREFUSED",
                std::io::ErrorKind::TimedOut => "ETIMEDOUT",
                std::io::ErrorKind::ConnectionReset => "ECONNRESET",
                std::io::ErrorKind::HostUnreachable => "EHOSTUNREACH",
                _ => "ECONNREFUSED",
            };
            return format!("Error: connect {code} {addr}");
        }
        source = s.source();
    }
    if e.to_string().contains("timeout") {
        return format!("Error: connect ETIMEDOUT {addr}");
    }
    format!("Error: {e}")
}

async fn table_exists(db: &Client, name: &str) -> bool {
    db.query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .map(|r| r.get(0))
        .unwrap_or_else(|e| fail("Microservices:DatabaseRepository", &format!("error: {e}")))
}

/// Names recorded by TypeORM and by Kysely; Immich reads both.
async fn applied_migrations(db: &Client) -> Vec<String> {
    let mut names = Vec::new();
    for table in ["migrations", "kysely_migrations"] {
        if !table_exists(db, &format!("public.{table}")).await {
            continue;
        }
        let rows = db
            .query(&format!("SELECT name::text FROM public.{table}"), &[])
            .await
            .unwrap_or_else(|e| fail("Microservices:DatabaseRepository", &format!("error: {e}")));
        names.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
    names.sort();
    names.dedup();
    names
}

/// Applies the pending migrations of `known`, each in its own transaction with its record row.
async fn migrate(db: &Client, known: &[&str], kysely: bool, crash_halfway: bool) {
    const CONTEXT: &str = "Microservices:DatabaseRepository";
    let applied = applied_migrations(db).await;
    // Refuse a database migrated by a newer version before changing anything.
    if let Some(missing) = applied.iter().find(|a| !known.contains(&a.as_str())) {
        fail(
            CONTEXT,
            &format!("corrupted migrations: previously executed migration {missing} is missing"),
        );
    }
    let pending: Vec<&str> = known
        .iter()
        .copied()
        .filter(|k| !applied.iter().any(|a| a == k))
        .collect();
    let stop_at = if crash_halfway {
        pending.len() / 2
    } else {
        usize::MAX
    };
    let setup = if kysely {
        "CREATE TABLE IF NOT EXISTS kysely_migrations (name varchar(255) NOT NULL PRIMARY KEY, timestamp varchar(255) NOT NULL);
         CREATE TABLE IF NOT EXISTS kysely_migrations_lock (id varchar(255) NOT NULL PRIMARY KEY, is_locked integer NOT NULL DEFAULT 0);
         INSERT INTO kysely_migrations_lock (id, is_locked) VALUES ('migration_lock', 0) ON CONFLICT DO NOTHING;"
    } else {
        "CREATE TABLE IF NOT EXISTS migrations (id SERIAL NOT NULL PRIMARY KEY, timestamp bigint NOT NULL, name varchar NOT NULL);"
    };
    if (!pending.is_empty() || crash_halfway)
        && let Err(e) = db.batch_execute(setup).await
    {
        fail(CONTEXT, &format!("Kysely migrations failed: {e}"));
    }
    for (i, name) in pending.iter().enumerate() {
        if i == stop_at {
            break;
        }
        log("LOG", CONTEXT, &format!("Migrating database: {name}"));
        if let Err(e) = apply(db, name, kysely).await {
            fail(CONTEXT, &format!("Kysely migrations failed: {e}"));
        }
    }
    if crash_halfway {
        let next = pending
            .get(stop_at)
            .copied()
            .unwrap_or("1760000000000-Unknown");
        let relation = next.split_once('-').map_or(next, |(_, n)| n).to_lowercase();
        fail(
            CONTEXT,
            &format!(
                "Kysely migrations failed: error: relation \"{relation}\" does not exist (migration {next})"
            ),
        );
    }
    if !pending.is_empty() {
        log(
            "LOG",
            CONTEXT,
            &format!("Migrations complete ({} applied)", pending.len()),
        );
    }
}

/// Schema change of one migration.
fn migration_sql(name: &str) -> &'static str {
    match name.split_once('-').map_or(name, |(_, n)| n) {
        "InitialSchema" => {
            "CREATE TABLE users (id uuid PRIMARY KEY, email varchar NOT NULL UNIQUE, name varchar NOT NULL DEFAULT '', is_admin boolean NOT NULL DEFAULT false, created_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE assets (id uuid PRIMARY KEY, \"ownerId\" uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE, \"originalPath\" varchar NOT NULL, checksum bytea NOT NULL, \"createdAt\" timestamptz NOT NULL DEFAULT now());
             CREATE TABLE version_history (id SERIAL PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now(), version text NOT NULL);
             CREATE TABLE system_metadata (key varchar PRIMARY KEY, value jsonb NOT NULL);"
        }
        "AddAssetFaces" => {
            "CREATE TABLE asset_faces (id uuid PRIMARY KEY, asset_id uuid NOT NULL REFERENCES assets(id) ON DELETE CASCADE, bounding_box integer[] NOT NULL DEFAULT '{}');"
        }
        "AddAssetJobStatus" => {
            "CREATE TABLE asset_job_status (asset_id uuid PRIMARY KEY REFERENCES assets(id) ON DELETE CASCADE, metadata_extracted_at timestamptz);"
        }
        "AddMemories" => {
            "CREATE TABLE memories (id uuid PRIMARY KEY, owner_id uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE, created_at timestamptz NOT NULL DEFAULT now());"
        }
        "AddMemoryAssets" => {
            "CREATE TABLE memories_assets_assets (memories_id uuid NOT NULL REFERENCES memories(id) ON DELETE CASCADE, assets_id uuid NOT NULL REFERENCES assets(id) ON DELETE CASCADE, PRIMARY KEY (memories_id, assets_id));"
        }
        "AddTags" => "CREATE TABLE tags (id uuid PRIMARY KEY, value varchar NOT NULL);",
        "KyselyBaseline" => "ALTER TABLE assets ADD COLUMN deleted_at timestamptz;",
        "AddAlbumDescription" => {
            "CREATE TABLE albums (id uuid PRIMARY KEY, album_name varchar NOT NULL DEFAULT 'Untitled Album', description text NOT NULL DEFAULT '');"
        }
        "StandardizeNames" => {
            r#"ALTER TABLE assets RENAME TO asset; ALTER TABLE users RENAME TO "user"; ALTER TABLE albums RENAME TO album;"#
        }
        "AddWorkflows" => {
            "CREATE TABLE workflow (id uuid PRIMARY KEY, name varchar NOT NULL, enabled boolean NOT NULL DEFAULT true);"
        }
        "AddOcr" => {
            "CREATE TABLE asset_ocr (id uuid PRIMARY KEY, asset_id uuid NOT NULL REFERENCES asset(id) ON DELETE CASCADE, text text NOT NULL);"
        }
        _ => "SELECT 1;",
    }
}

async fn apply(db: &Client, name: &str, kysely: bool) -> Result<(), tokio_postgres::Error> {
    // tokio_postgres::Transaction needs `&mut Client`; plain BEGIN/COMMIT does the same here.
    db.batch_execute("BEGIN").await?;
    let result = async {
        db.batch_execute(migration_sql(name)).await?;
        if kysely {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            db.execute(
                "INSERT INTO kysely_migrations (name, timestamp) VALUES ($1, $2)",
                &[&name, &now],
            )
            .await?;
        } else {
            let ts: i64 = name
                .split('-')
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            db.execute(
                "INSERT INTO migrations (timestamp, name) VALUES ($1, $2)",
                &[&ts, &name],
            )
            .await?;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => db.batch_execute("COMMIT").await,
        Err(e) => {
            let _ = db.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Immich's mount checks: a folder seen before must still hold its `.immich` marker; a folder
/// never seen (first boot) gets one. Which folders were seen is kept in `system_metadata`
/// (`system-flags` → `mountChecks`), as Immich does; so a fresh install creates every marker and
/// any later boot verifies them all.
async fn check_mounts(db: &Client, media: &Path) {
    const CONTEXT: &str = "Microservices:StorageService";
    let flags: serde_json::Value = if table_exists(db, "public.system_metadata").await {
        db.query_opt(
            "SELECT value::text FROM system_metadata WHERE key = 'system-flags'",
            &[],
        )
        .await
        .unwrap_or_else(|e| fail(CONTEXT, &format!("error: {e}")))
        .and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok())
        .unwrap_or_else(|| serde_json::json!({}))
    } else {
        serde_json::json!({})
    };
    let mut checks = flags
        .get("mountChecks")
        .and_then(|m| m.as_object())
        .cloned()
        .unwrap_or_default();
    let mut changed = false;
    for folder in FOLDERS {
        let dir = media.join(folder);
        let marker = dir.join(".immich");
        if checks.get(*folder).and_then(|v| v.as_bool()) == Some(true) {
            if let Err(e) = std::fs::read(&marker) {
                let m = marker.display();
                let code = node_code(&e);
                log(
                    "ERROR",
                    CONTEXT,
                    &format!(
                        "Failed to read \"{m}\": Error: {code}: {}, open '{m}'",
                        node_text(code)
                    ),
                );
                log(
                    "ERROR",
                    "Microservices:StorageService",
                    &format!(
                        "Failed to validate {folder} folder, please check that the mount exists and is readable"
                    ),
                );
                fail("Bootstrap", "microservices worker exited with code 1");
            }
        } else {
            create_dir(&dir);
            write_file(&marker, b"");
            log(
                "LOG",
                CONTEXT,
                &format!("Verified access to {}", dir.display()),
            );
            checks.insert((*folder).to_string(), serde_json::Value::Bool(true));
            changed = true;
        }
    }
    if changed {
        let value = serde_json::json!({ "mountChecks": checks });
        db.execute(
            "INSERT INTO system_metadata (key, value) VALUES ('system-flags', $1::text::jsonb)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&value.to_string()],
        )
        .await
        .unwrap_or_else(|e| fail(CONTEXT, &format!("error: {e}")));
    }
}

fn node_code(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => "ENOENT",
        std::io::ErrorKind::PermissionDenied => "EACCES",
        std::io::ErrorKind::ReadOnlyFilesystem => "EROFS",
        std::io::ErrorKind::StorageFull => "ENOSPC",
        std::io::ErrorKind::IsADirectory => "EISDIR",
        std::io::ErrorKind::NotADirectory => "ENOTDIR",
        _ => "EIO",
    }
}

fn node_text(code: &str) -> &'static str {
    match code {
        "ENOENT" => "no such file or directory",
        "EACCES" => "permission denied",
        "EROFS" => "read-only file system",
        "ENOSPC" => "no space left on device",
        "EISDIR" => "illegal operation on a directory",
        "ENOTDIR" => "not a directory",
        _ => "i/o error",
    }
}

/// Node's message for a failed write, then the worker's exit, then exit 1.
fn storage_failure(e: &std::io::Error, op: &str, path: &Path) -> ! {
    let code = node_code(e);
    log(
        "ERROR",
        "Microservices:StorageService",
        &format!("{code}: {}, {op} '{}'", node_text(code), path.display()),
    );
    fail("Bootstrap", "microservices worker exited with code 1")
}

fn create_dir(dir: &Path) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        storage_failure(&e, "mkdir", dir);
    }
}

fn write_file(path: &Path, content: &[u8]) {
    if let Some(parent) = path.parent() {
        create_dir(parent);
    }
    if let Err(e) = std::fs::write(path, content) {
        storage_failure(&e, "open", path);
    }
}

async fn record_version(db: &Client, version: &str) {
    const CONTEXT: &str = "Microservices:VersionService";
    let last: Option<String> = db
        .query_opt(
            "SELECT version FROM version_history ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap_or_else(|e| fail(CONTEXT, &format!("error: {e}")))
        .map(|r| r.get(0));
    if last.as_deref() != Some(version) {
        db.execute(
            "INSERT INTO version_history (created_at, version) VALUES (now(), $1)",
            &[&version],
        )
        .await
        .unwrap_or_else(|e| fail(CONTEXT, &format!("error: {e}")));
        match last {
            Some(previous) => log(
                "LOG",
                CONTEXT,
                &format!("Version has changed from {previous} to {version}"),
            ),
            None => log("LOG", CONTEXT, &format!("First start of version {version}")),
        }
    }
}

/// Whichever name the schema has (`asset`/`assets`, `user`/`users`), quoted for SQL.
async fn table_name(db: &Client, new: &str, old: &str) -> String {
    if table_exists(db, &format!("public.\"{new}\"")).await {
        format!("\"{new}\"")
    } else {
        old.to_string()
    }
}

/// A fresh install gets an admin and `STANDIN_SEED_ASSETS` assets; every boot uploads
/// `STANDIN_ASSETS_PER_BOOT` more.
async fn add_data(db: &Client, media: &Path) {
    const CONTEXT: &str = "Microservices:AssetService";
    let users = table_name(db, "user", "users").await;
    let assets = table_name(db, "asset", "assets").await;
    let existing: Option<String> = db
        .query_opt(
            &format!("SELECT id::text FROM {users} ORDER BY created_at LIMIT 1"),
            &[],
        )
        .await
        .unwrap_or_else(|e| fail(CONTEXT, &format!("error: {e}")))
        .map(|r| r.get(0));
    let (owner, count) = match existing {
        Some(owner) => (owner, env_num("STANDIN_ASSETS_PER_BOOT", 1)),
        None => {
            let owner = new_uuid();
            db.execute(
                &format!("INSERT INTO {users} (id, email, name, is_admin) VALUES ($1::text::uuid, 'admin@example.com', 'Admin', true)"),
                &[&owner],
            )
            .await
            .unwrap_or_else(|e| fail(CONTEXT, &format!("error: {e}")));
            log("LOG", CONTEXT, "Admin user created (admin@example.com)");
            let count = env_num("STANDIN_SEED_ASSETS", 3) + env_num("STANDIN_ASSETS_PER_BOOT", 1);
            (owner, count)
        }
    };
    for _ in 0..count {
        add_asset(db, &assets, &owner, media).await;
    }
}

/// Phones still uploading: one asset (file, thumbnail, row) every `every_ms`, for as long as
/// the server runs. A failed upload is logged and the next one tried, as the app retries.
async fn keep_uploading(db: Arc<Client>, media: PathBuf, every_ms: u64) {
    const CONTEXT: &str = "Api:AssetMediaService";
    let users = table_name(&db, "user", "users").await;
    let assets = table_name(&db, "asset", "assets").await;
    let owner: String = match db
        .query_one(
            &format!("SELECT id::text FROM {users} ORDER BY created_at LIMIT 1"),
            &[],
        )
        .await
    {
        Ok(row) => row.get(0),
        Err(e) => {
            log("ERROR", CONTEXT, &format!("no user to upload as: {e}"));
            return;
        }
    };
    loop {
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
        if let Err(e) = try_add_asset(&db, &assets, &owner, &media).await {
            log("ERROR", CONTEXT, &format!("upload failed: {e}"));
        }
    }
}

async fn add_asset(db: &Client, table: &str, owner: &str, media: &Path) {
    try_add_asset(db, table, owner, media)
        .await
        .unwrap_or_else(|e| fail("Microservices:AssetService", &format!("error: {e}")));
}

/// The file first, then its row, as Immich's upload does.
async fn try_add_asset(
    db: &Client,
    table: &str,
    owner: &str,
    media: &Path,
) -> Result<(), tokio_postgres::Error> {
    let id = new_uuid();
    let (a, b) = (&id[0..2], &id[2..4]);
    let rel = format!("upload/{owner}/{a}/{b}/{id}.jpg");
    let content = fake_jpeg(&id);
    write_file(&media.join(&rel), &content);
    write_file(
        &media.join(format!("thumbs/{owner}/{a}/{b}/{id}-thumbnail.webp")),
        &fake_webp(&content),
    );
    let checksum: Vec<u8> = Sha256::digest(&content).to_vec();
    let original_path = media.join(&rel).display().to_string();
    db.execute(
        &format!("INSERT INTO {table} (id, \"ownerId\", \"originalPath\", checksum, \"createdAt\") VALUES ($1::text::uuid, $2::text::uuid, $3, $4, now())"),
        &[&id, &owner, &original_path, &checksum],
    )
    .await
    .map(|_| ())
}

/// A few KB that start like a JPEG and differ per asset.
fn fake_jpeg(id: &str) -> Vec<u8> {
    let seed = Sha256::digest(id.as_bytes());
    let mut state = u64::from_le_bytes(seed[0..8].try_into().unwrap_or([7; 8])) | 1;
    let len = 2048 + (state % 4096) as usize;
    let mut out = vec![
        0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00,
    ];
    while out.len() < len - 2 {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len - 2);
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

fn fake_webp(original: &[u8]) -> Vec<u8> {
    let body = &original[..original.len().min(512)];
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&((body.len() + 4) as u32).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(body);
    out
}

/// A random UUID v4 from the kernel's generator.
fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = Sha256::digest(format!("{nanos}-{}", std::process::id()).as_bytes())[..16]
            .try_into()
            .unwrap_or([0; 16]);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

async fn version_history(db: &Client) -> String {
    let rows = db
        .query(
            "SELECT id, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), version FROM version_history ORDER BY id DESC",
            &[],
        )
        .await
        .unwrap_or_else(|e| fail("Api:ServerService", &format!("error: {e}")));
    let entries: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "id": r.get::<_, i32>(0).to_string(),
                "createdAt": r.get::<_, String>(1),
                "version": r.get::<_, String>(2),
            })
        })
        .collect();
    serde_json::Value::Array(entries).to_string()
}
