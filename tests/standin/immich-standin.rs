//! A stand-in for immich-server (and, by role, for machine-learning and redis) used by the
//! integration tests. It behaves like the real server where immich-guard cares: it reads the
//! DB_* env, boots slowly, applies its version's migrations in order and records them where
//! Immich does, refuses a database migrated by a newer version with Immich's own message,
//! checks the `.immich` markers, writes assets (rows + files), and answers the unauthenticated
//! version endpoints. It can be told to crash at boot or halfway through its migrations.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_postgres::{Client, NoTls};

/// (version that introduced it, migration name); names shaped like Immich's.
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
];
const FOLDERS: &[&str] = &[
    "library",
    "upload",
    "thumbs",
    "encoded-video",
    "profile",
    "backups",
];

type Version = (u64, u64, u64);

fn parse_version(v: &str) -> Version {
    let mut parts = v
        .trim()
        .trim_start_matches('v')
        .split('.')
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn log(level: &str, context: &str, message: &str) {
    let now = chrono::Local::now().format("%m/%d/%Y, %-I:%M:%S %p");
    let line = format!(
        "[Nest] {}  - {now}     {level:>5} [{context}] {message}",
        std::process::id()
    );
    if level == "ERROR" {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    std::io::stdout().flush().ok();
}

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

#[tokio::main]
async fn main() {
    // PID 1 in a container gets no default signal handling: exit promptly on stop.
    tokio::spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).unwrap();
        let mut int = signal(SignalKind::interrupt()).unwrap();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        std::process::exit(0);
    });
    match std::env::args().nth(1).as_deref().unwrap_or("server") {
        "server" => server().await,
        "ml" => {
            serve_lines(3003, |req| {
                if req.starts_with("GET /ping") {
                    http(200, "text/plain", "pong")
                } else {
                    http(404, "text/plain", "not found")
                }
            })
            .await
        }
        "redis" => serve_lines(6379, |_| "+PONG\r\n".to_string()).await,
        other => fail("Bootstrap", &format!("unknown role {other:?}")),
    }
}

fn http(status: u16, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        if status == 200 { "OK" } else { "Not Found" },
        body.len()
    )
}

/// Accepts connections and answers the first request line each with `answer`.
async fn serve_lines(port: u16, answer: impl Fn(&str) -> String + Send + Sync + 'static) -> ! {
    let listener = TcpListener::bind(("0.0.0.0", port)).await.unwrap();
    let answer = std::sync::Arc::new(answer);
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
                if b.starts_with(b"GET ") || b.starts_with(b"HEAD ") {
                    b.windows(4).any(|w| w == b"\r\n\r\n")
                } else {
                    b.ends_with(b"\n")
                }
            };
            while !complete(&buf) {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if buf.len() > 16 * 1024 {
                    break;
                }
            }
            let req = String::from_utf8_lossy(&buf).to_string();
            let _ = sock.write_all(answer(&req).as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

async fn server() {
    let version = std::env::var("IMMICH_STANDIN_VERSION")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/immich-version").ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| fail("Bootstrap", "no /etc/immich-version"));
    let v = parse_version(&version);
    log(
        "LOG",
        "Bootstrap",
        &format!("Bootstrapping immich-server {version}"),
    );
    let delay: u64 = env_or("STANDIN_BOOT_DELAY_MS", "2000")
        .parse()
        .unwrap_or(2000);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let crash = env_or("STANDIN_CRASH", "");
    if crash == "boot" {
        fail(
            "Bootstrap",
            &env_or(
                "STANDIN_CRASH_MESSAGE",
                "Error: Invalid upgrade path: the server cannot start",
            ),
        );
    }

    let host = env_or("DB_HOSTNAME", "database");
    let port = env_or("DB_PORT", "5432");
    let conn = format!(
        "host={host} port={port} user={} password={} dbname={}",
        env_or("DB_USERNAME", "postgres"),
        env_or("DB_PASSWORD", "postgres"),
        env_or("DB_DATABASE_NAME", "immich")
    );
    let db = connect(&conn, &host, &port).await;

    let known: Vec<&str> = CATALOG
        .iter()
        .filter(|(introduced, _)| parse_version(introduced) <= v)
        .map(|(_, name)| *name)
        .collect();
    let applied = applied_migrations(&db).await;
    if let Some(missing) = applied.iter().find(|a| !known.contains(&a.as_str())) {
        fail(
            "DatabaseRepository",
            &format!("corrupted migrations: previously executed migration {missing} is missing"),
        );
    }
    let fresh = applied.is_empty();
    let kysely = v >= (1, 133, 0);
    let pending: Vec<&str> = known
        .iter()
        .copied()
        .filter(|k| !applied.iter().any(|a| a == k))
        .collect();
    let stop_after = if crash == "migration" {
        (pending.len() / 2).max(1)
    } else {
        usize::MAX
    };
    for (i, name) in pending.iter().enumerate() {
        if i == stop_after {
            fail(
                "DatabaseRepository",
                &format!(
                    "Kysely migrations failed: error: relation \"{}\" does not exist",
                    name.split('-').nth(1).unwrap_or("x").to_lowercase()
                ),
            );
        }
        log(
            "LOG",
            "DatabaseRepository",
            &format!("Migrating database: {name}"),
        );
        apply(&db, name, kysely).await;
    }

    let media = PathBuf::from(env_or("IMMICH_MEDIA_LOCATION", "/data"));
    for folder in FOLDERS {
        let dir = media.join(folder);
        let marker = dir.join(".immich");
        if fresh {
            write_file(&marker, b"");
        } else if !marker.exists() {
            let m = marker.display();
            log(
                "ERROR",
                "StorageService",
                &format!(
                    "Failed to read \"{m}\": Error: ENOENT: no such file or directory, open '{m}'"
                ),
            );
            fail("Microservices", "microservices worker exited with code 1");
        }
    }

    let table = |new: &str, old: &str| {
        if v >= (1, 137, 0) {
            new.to_string()
        } else {
            old.to_string()
        }
    };
    let (users, assets) = (table("\"user\"", "users"), table("asset", "assets"));
    let last: Option<String> = db
        .query_opt(
            "SELECT version FROM version_history ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    if last.as_deref() != Some(version.as_str()) {
        db.execute(
            "INSERT INTO version_history (created_at, version) VALUES (now(), $1)",
            &[&version],
        )
        .await
        .unwrap();
    }
    let owner: String = match db
        .query_opt(&format!("SELECT id FROM {users} LIMIT 1"), &[])
        .await
        .unwrap()
    {
        Some(row) => row.get(0),
        None => {
            let id = new_id();
            db.execute(
                &format!("INSERT INTO {users} (id, email, created_at) VALUES ($1, 'admin@example.com', now())"),
                &[&id],
            )
            .await
            .unwrap();
            let seed: u32 = env_or("STANDIN_SEED_ASSETS", "3").parse().unwrap_or(3);
            for _ in 0..seed {
                add_asset(&db, &assets, &id, &media).await;
            }
            id
        }
    };
    let per_boot: u32 = env_or("STANDIN_ASSETS_PER_BOOT", "1").parse().unwrap_or(1);
    for _ in 0..per_boot {
        add_asset(&db, &assets, &owner, &media).await;
    }

    let listen_port: u16 = env_or("IMMICH_PORT", "2283").parse().unwrap_or(2283);
    let (major, minor, patch) = v;
    let history = std::sync::Arc::new(std::sync::Mutex::new(String::from("[]")));
    let rows = db
        .query(
            "SELECT id, created_at::text, version FROM version_history ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let entries: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({"id": r.get::<_, i32>(0), "createdAt": r.get::<_, String>(1), "version": r.get::<_, String>(2)})
        })
        .collect();
    *history.lock().unwrap() = serde_json::to_string(&entries).unwrap();
    log(
        "LOG",
        "Api:Bootstrap",
        &format!(
            "Immich Server is listening on http://[::1]:{listen_port} [{version}] [production]"
        ),
    );
    // Keep the connection: a real server holds a pool for its whole life.
    let _db = db;
    serve_lines(listen_port, move |req| {
        let path = req.split_whitespace().nth(1).unwrap_or("");
        match path {
            "/api/server/ping" => http(200, "application/json", r#"{"res":"pong"}"#),
            "/api/server/version" => http(
                200,
                "application/json",
                &format!(r#"{{"major":{major},"minor":{minor},"patch":{patch}}}"#),
            ),
            "/api/server/version-history" => {
                http(200, "application/json", &history.lock().unwrap())
            }
            _ => http(404, "application/json", r#"{"message":"Not Found"}"#),
        }
    })
    .await
}

async fn connect(conn: &str, host: &str, port: &str) -> Client {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio_postgres::connect(conn, NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        fail(
                            "DatabaseRepository",
                            &format!("database connection lost: {e}"),
                        );
                    }
                });
                return client;
            }
            Err(e) => {
                let text = e.to_string();
                if text.contains("password authentication failed") {
                    fail("DatabaseRepository", &format!("error: {text}"));
                }
                log(
                    "ERROR",
                    "DatabaseRepository",
                    &format!("Error: connect ECONNREFUSED {host}:{port} ({text})"),
                );
                if tokio::time::Instant::now() > deadline {
                    fail("Bootstrap", "could not connect to the database, giving up");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn applied_migrations(db: &Client) -> Vec<String> {
    let mut names = Vec::new();
    for table in ["migrations", "kysely_migrations"] {
        let exists: bool = db
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .unwrap()
            .get(0);
        if exists {
            for row in db
                .query(&format!("SELECT name::text FROM {table}"), &[])
                .await
                .unwrap()
            {
                names.push(row.get(0));
            }
        }
    }
    names.sort();
    names
}

async fn apply(db: &Client, name: &str, kysely: bool) {
    let body = match name.split_once('-').map(|(_, n)| n).unwrap_or(name) {
        "InitialSchema" => {
            "CREATE TABLE users (id text PRIMARY KEY, email text NOT NULL, created_at timestamptz NOT NULL);
             CREATE TABLE assets (id text PRIMARY KEY, owner_id text NOT NULL REFERENCES users(id),
                 original_path text NOT NULL, checksum text NOT NULL, created_at timestamptz NOT NULL);
             CREATE TABLE version_history (id serial PRIMARY KEY, created_at timestamptz NOT NULL, version text NOT NULL);"
                .to_string()
        }
        "StandardizeNames" => "ALTER TABLE assets RENAME TO asset; ALTER TABLE users RENAME TO \"user\";".to_string(),
        other => format!("CREATE TABLE standin_{} (id serial PRIMARY KEY, note text);", other.to_lowercase()),
    };
    let record = if kysely {
        format!(
            "CREATE TABLE IF NOT EXISTS kysely_migrations (name varchar(255) PRIMARY KEY, timestamp varchar(255) NOT NULL);
             INSERT INTO kysely_migrations (name, timestamp) VALUES ('{name}', now()::text);"
        )
    } else {
        let ts = name.split('-').next().unwrap_or("0");
        format!(
            "CREATE TABLE IF NOT EXISTS migrations (id serial PRIMARY KEY, timestamp bigint NOT NULL, name varchar NOT NULL);
             INSERT INTO migrations (timestamp, name) VALUES ({ts}, '{name}');"
        )
    };
    let sql = format!("BEGIN; {body} {record} COMMIT;");
    if let Err(e) = db.batch_execute(&sql).await {
        fail(
            "DatabaseRepository",
            &format!("Kysely migrations failed: {e}"),
        );
    }
}

fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}{:08x}{:08x}", nanos, std::process::id(), n)
}

fn write_file(path: &Path, content: &[u8]) {
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| std::fs::write(path, content));
    if let Err(e) = result {
        let p = path.display();
        let message = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                format!("EACCES: permission denied, open '{p}'")
            }
            _ => format!("Error: {e}, open '{p}'"),
        };
        log("ERROR", "StorageService", &message);
        fail("Microservices", "microservices worker exited with code 1");
    }
}

async fn add_asset(db: &Client, table: &str, owner: &str, media: &Path) {
    let id = new_id();
    let (a, b) = (&id[id.len() - 4..id.len() - 2], &id[id.len() - 2..]);
    let rel = format!("upload/{owner}/{a}/{b}/{id}.jpg");
    // A few KB that differ per asset, like photos do.
    let content: Vec<u8> = id.bytes().cycle().take(4096).collect();
    write_file(&media.join(&rel), &content);
    write_file(
        &media.join(format!("thumbs/{owner}/{a}/{b}/{id}-thumbnail.webp")),
        &content[..512],
    );
    db.execute(
        &format!("INSERT INTO {table} (id, owner_id, original_path, checksum, created_at) VALUES ($1, $2, $3, $4, now())"),
        &[&id, &owner, &format!("/data/{rel}"), &format!("{:x}", content.len() as u64 ^ id.len() as u64)],
    )
    .await
    .unwrap();
}
