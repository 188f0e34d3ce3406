//! The harness and the stand-in behave like the real Immich pieces they replace: real Docker,
//! real PostgreSQL 15, images without a registry, Immich-shaped compose stacks.
//! Each test skips (with a message) when Docker is absent, and fails under CI=true.

mod harness;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::images::{self, build_server_image, ensure_images, image_id, image_label};
use harness::{Images, Stack, StackSpec, docker_available};
use sha2::{Digest, Sha256};

const V119: [&str; 3] = [
    "1700000000000-InitialSchema",
    "1727000000000-AddAssetFaces",
    "1729000000000-AddAssetJobStatus",
];
/// What v1.137.0 adds on top of v1.119.0.
const V137_NEW: [&str; 6] = [
    "1731000000000-AddMemories",
    "1731000000001-AddMemoryAssets",
    "1744000000000-AddTags",
    "1745000000000-KyselyBaseline",
    "1751000000000-AddAlbumDescription",
    "1752267649968-StandardizeNames",
];
/// The folders Immich checks at boot, as the product knows them.
use immich_guard::verify::MARKER_FOLDERS as FOLDERS;

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker").args(args).output().unwrap()
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn inspect(container: &str, format: &str) -> String {
    docker_ok(&["inspect", "--format", format, container])
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Lines of a log that are Nest-style lines at `level` from `context` saying `message`
/// (`[Nest] 1  - 11/25/2026, 2:23:00 AM     LOG [Api:Bootstrap] ...`).
fn nest_lines<'a>(log: &'a str, level: &str, message: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| {
            let Some(rest) = l.strip_prefix("[Nest] 1  - ") else {
                return false;
            };
            // "11/25/2026, 2:23:00 AM" then the level right-aligned in 7 columns
            let Some((date, rest)) = rest.split_once(", ") else {
                return false;
            };
            let date_ok = date.split('/').count() == 3
                && date.chars().all(|c| c.is_ascii_digit() || c == '/');
            let Some(pos) = rest.find(" AM ").or_else(|| rest.find(" PM ")) else {
                return false;
            };
            let after = &rest[pos + 3..];
            date_ok && after.starts_with(&format!(" {level:>7} [")) && after.contains(message)
        })
        .collect()
}

fn host_path(stack: &Stack, container_path: &str) -> PathBuf {
    stack
        .upload
        .join(container_path.strip_prefix("/data/").expect("under /data"))
}

#[test]
fn fresh_stack_boots_and_answers_ping_and_version() {
    if !docker_available() {
        return;
    }
    let started = Instant::now();
    let stack = Stack::up(StackSpec::default());
    eprintln!("stack up and ready in {:.1?}", started.elapsed());

    // The official names with the project in front; every container carries the owner label.
    for (service, suffix) in harness::compose::SERVICES {
        let name = stack.container_name(service);
        assert_eq!(name, format!("{}_{suffix}", stack.project));
        assert_eq!(
            inspect(
                &name,
                &format!(
                    "{{{{index .Config.Labels \"{}\"}}}}",
                    "io.immich-guard.test.owner"
                )
            ),
            std::process::id().to_string()
        );
        assert_eq!(stack.state(service).unwrap().status, "running", "{service}");
    }
    assert_eq!(
        inspect(&stack.container_name("immich-server"), "{{.Config.Image}}"),
        format!("{}:v1.119.0", images::server_repo())
    );

    assert_eq!(
        stack.wait_server_ready(Duration::from_secs(5)).unwrap(),
        "v1.119.0"
    );
    assert!(stack.server_url().ends_with(":2283"));
    assert_eq!(
        stack.get("/api/server/ping").unwrap(),
        (200, r#"{"res":"pong"}"#.to_string())
    );
    assert_eq!(
        stack.get("/api/server/version").unwrap(),
        (200, r#"{"major":1,"minor":119,"patch":0}"#.to_string())
    );
    let (status, history) = stack.get("/api/server/version-history").unwrap();
    assert_eq!(status, 200);
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");
    assert_eq!(history[0]["version"], "v1.119.0");
    assert_eq!(stack.get("/api/nope").unwrap().0, 404);

    // Migrations: v1.119 predates Kysely, so TypeORM's table with the ms timestamps.
    assert_eq!(stack.applied_migrations(), strings(&V119));
    assert_eq!(
        stack.psql("SELECT string_agg(timestamp || ' ' || name, ',' ORDER BY id) FROM migrations"),
        V119.iter()
            .map(|n| format!("{} {n}", &n[..13]))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(!stack.table_exists("kysely_migrations"));
    assert!(stack.table_exists("assets") && !stack.table_exists("asset"));

    // Data: an admin, 3 seeded assets + 1 for this boot, each a real file and thumbnail.
    assert_eq!(stack.user_count(), 1);
    assert_eq!(stack.asset_count(), 4);
    let owner = stack.psql("SELECT id FROM users");
    let rows = stack.psql("SELECT id || ' ' || \"originalPath\" || ' ' || encode(checksum, 'hex') FROM assets ORDER BY id");
    let mut contents = Vec::new();
    for row in rows.lines() {
        let parts: Vec<&str> = row.split(' ').collect();
        let (id, path, checksum) = (parts[0], parts[1], parts[2]);
        assert_eq!(
            path,
            format!("/data/upload/{owner}/{}/{}/{id}.jpg", &id[..2], &id[2..4])
        );
        let bytes = std::fs::read(host_path(&stack, path)).unwrap();
        assert!(bytes.len() > 1024 && bytes.starts_with(&[0xFF, 0xD8, 0xFF]));
        assert_eq!(format!("{:x}", Sha256::digest(&bytes)), checksum);
        let thumb = stack.upload.join(format!(
            "thumbs/{owner}/{}/{}/{id}-thumbnail.webp",
            &id[..2],
            &id[2..4]
        ));
        assert!(thumb.is_file(), "{}", thumb.display());
        contents.push(bytes);
    }
    contents.sort();
    contents.dedup();
    assert_eq!(contents.len(), 4, "every asset has its own content");
    for folder in FOLDERS {
        assert!(
            stack.upload.join(folder).join(".immich").is_file(),
            "{folder}"
        );
    }

    // Immich-style logs, PID 1 in the container.
    let log = stack.logs("immich-server");
    assert_eq!(
        nest_lines(
            &log,
            "LOG",
            "[Api:Bootstrap] Immich Server is listening on http://[::1]:2283 [v1.119.0] [production]"
        )
        .len(),
        1,
        "{log}"
    );
    for name in V119 {
        assert_eq!(
            nest_lines(&log, "LOG", &format!("Migrating database: {name}")).len(),
            1,
            "{log}"
        );
    }

    // The other services answer like theirs do.
    let ml = stack.ip("immich-machine-learning").unwrap();
    let (status, body) =
        harness::compose::http_get(format!("{ml}:3003").parse().unwrap(), "/ping").unwrap();
    assert_eq!((status, body.as_str()), (200, "pong"));
    let redis = stack.ip("redis").unwrap();
    let mut conn = std::net::TcpStream::connect((redis.as_str(), 6379)).unwrap();
    use std::io::{Read, Write};
    conn.write_all(b"PING\r\nPING\r\n").unwrap();
    let mut answer = [0u8; 14];
    conn.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"+PONG\r\n+PONG\r\n");

    // Every service stops at once on `docker stop` and exits 0 (SIGTERM, SIGINT for postgres).
    for service in [
        "immich-server",
        "immich-machine-learning",
        "redis",
        "database",
    ] {
        let t = Instant::now();
        docker_ok(&["stop", "-t", "10", &stack.container_name(service)]);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{service} took {:?} to stop",
            t.elapsed()
        );
        assert_eq!(stack.state(service).unwrap().exit_code, 0, "{service}");
    }
}

#[test]
fn upgrade_applies_only_new_migrations_and_records_them_in_kysely_table() {
    if !docker_available() {
        return;
    }
    ensure_images(&["v1.137.0"]);
    let stack = Stack::up(StackSpec::default());
    let typeorm_before =
        stack.psql("SELECT string_agg(id::text || ' ' || timestamp || ' ' || name, ',' ORDER BY id) FROM migrations");

    // The admin's upgrade: edit IMMICH_VERSION, `up -d` recreates the server.
    stack.set_env("IMMICH_VERSION", "v1.137.0");
    assert_eq!(stack.env_value("IMMICH_VERSION").unwrap(), "v1.137.0");
    stack.compose(&["up", "-d"]);
    stack
        .wait_server_version("v1.137.0", Duration::from_secs(60))
        .unwrap();

    // Only the new migrations ran, recorded by Kysely; TypeORM's table left as it was.
    let log = stack.logs("immich-server");
    let migrated: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("Migrating database: ").nth(1))
        .collect();
    assert_eq!(migrated, V137_NEW.to_vec(), "{log}");
    assert_eq!(stack.migrations_in("kysely_migrations"), strings(&V137_NEW));
    assert_eq!(
        stack.psql("SELECT string_agg(id::text || ' ' || timestamp || ' ' || name, ',' ORDER BY id) FROM migrations"),
        typeorm_before
    );
    let mut all = strings(&V119);
    all.extend(strings(&V137_NEW));
    assert_eq!(stack.applied_migrations(), all);
    // Kysely's timestamp column holds ISO times.
    let ts = stack.psql("SELECT min(timestamp) FROM kysely_migrations");
    assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");

    // StandardizeNames renamed the tables as v1.137 did; rows kept, one upload per boot.
    assert!(stack.table_exists("asset") && !stack.table_exists("assets"));
    assert!(stack.table_exists("\"user\"") && !stack.table_exists("users"));
    assert_eq!(stack.asset_count(), 5);
    assert_eq!(stack.user_count(), 1);
    assert_eq!(
        stack.psql("SELECT string_agg(version, ',' ORDER BY id) FROM version_history"),
        "v1.119.0,v1.137.0"
    );
    let (_, history) = stack.get("/api/server/version-history").unwrap();
    assert!(
        history.contains("v1.119.0") && history.contains("v1.137.0"),
        "{history}"
    );

    // A plain restart of the same version migrates nothing and records no new version.
    stack.compose(&["restart", "-t", "1", "immich-server"]);
    stack
        .wait_server_version("v1.137.0", Duration::from_secs(60))
        .unwrap();
    assert_eq!(stack.applied_migrations(), all);
    assert_eq!(stack.asset_count(), 6);
    assert_eq!(stack.psql("SELECT count(*) FROM version_history"), "2");
}

#[test]
fn downgrade_after_migration_is_refused_with_corrupted_migrations_message() {
    if !docker_available() {
        return;
    }
    ensure_images(&["v1.119.0", "v1.120.0"]);
    let stack = Stack::up(StackSpec::new("v1.120.0"));
    // pg_dump (15.14+) brackets its output with \restrict/\unrestrict and a random key.
    let dump = || {
        docker_ok(&[
            "exec",
            &stack.container_name("database"),
            "pg_dump",
            "-U",
            "postgres",
            "immich",
        ])
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
    };
    let before = dump();
    let migrated = stack.applied_migrations();
    assert_eq!(migrated.len(), 5);

    stack.set_env("IMMICH_VERSION", "v1.119.0");
    stack.compose(&["up", "-d"]);
    // restart: always → it keeps coming back and failing.
    let state = stack.wait_restarts("immich-server", 2, Duration::from_secs(60));
    assert_eq!(state.exit_code, 1, "{state:?}");
    let log = stack.logs("immich-server");
    let refused = nest_lines(
        &log,
        "ERROR",
        "corrupted migrations: previously executed migration 1731000000000-AddMemories is missing",
    );
    assert!(refused.len() >= 2, "one refusal per start:\n{log}");
    assert!(!log.contains("is listening"), "{log}");
    assert!(stack.get("/api/server/ping").is_err());

    // Nothing changed: same migrations, same rows, same schema.
    assert_eq!(stack.applied_migrations(), migrated);
    assert!(dump() == before, "the database changed");
}

#[test]
fn crash_at_boot_mode_exits_before_touching_db() {
    if !docker_available() {
        return;
    }
    let message = "Error: Invalid upgrade path: test says no";
    let stack = Stack::up(
        StackSpec::default()
            .no_restart()
            .no_wait()
            .boot_delay_ms(1500)
            .env("STANDIN_CRASH", "boot")
            .env("STANDIN_CRASH_MESSAGE", message),
    );
    assert_eq!(
        stack.wait_exit_code("immich-server", Duration::from_secs(30)),
        1
    );
    let log = stack.logs("immich-server");
    assert_eq!(nest_lines(&log, "ERROR", message).len(), 1, "{log}");
    // It waited for its boot delay first.
    let server = stack.container_name("immich-server");
    let ran = |f: &str| chrono::DateTime::parse_from_rfc3339(&inspect(&server, f)).unwrap();
    let lived = ran("{{.State.FinishedAt}}") - ran("{{.State.StartedAt}}");
    assert!(lived.num_milliseconds() >= 1400, "{lived:?}");

    stack.wait_db_ready(Duration::from_secs(30));
    assert!(stack.applied_migrations().is_empty());
    assert_eq!(
        stack.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        "0"
    );
    assert!(!stack.upload.join("upload/.immich").exists());
}

#[test]
fn half_migration_crash_leaves_some_migrations_applied() {
    if !docker_available() {
        return;
    }
    ensure_images(&["v1.120.0"]);
    // The crash switch goes into .env (env_file), so the admin's "fix" is an .env edit.
    let stack = Stack::create(StackSpec::new("v1.120.0").no_restart());
    stack.set_env("STANDIN_CRASH", "migration");
    stack.compose(&["up", "-d"]);
    assert_eq!(
        stack.wait_exit_code("immich-server", Duration::from_secs(60)),
        1
    );
    let log = stack.logs("immich-server");
    assert_eq!(
        nest_lines(&log, "ERROR", "Kysely migrations failed: ").len(),
        1,
        "{log}"
    );
    // 5 pending, 2 applied and committed, the rest not.
    let applied = stack.applied_migrations();
    assert_eq!(
        applied,
        strings(&["1700000000000-InitialSchema", "1727000000000-AddAssetFaces"])
    );
    assert!(stack.table_exists("asset_faces"));
    assert!(!stack.table_exists("asset_job_status"));

    // Fixing forward: the next start applies the rest and boots.
    stack.set_env("STANDIN_CRASH", "");
    stack.compose(&["up", "-d"]);
    assert_eq!(
        stack.wait_server_ready(Duration::from_secs(60)).unwrap(),
        "v1.120.0"
    );
    assert_eq!(stack.applied_migrations().len(), 5);
    let log = stack.logs("immich-server");
    assert!(
        !log.contains("Migrating database: 1700000000000-InitialSchema"),
        "{log}"
    );
    assert!(
        log.contains("Migrating database: 1731000000001-AddMemoryAssets"),
        "{log}"
    );
}

#[test]
fn missing_marker_file_fails_boot_with_enoent() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default().no_restart());
    let assets = stack.asset_count();
    std::fs::remove_file(stack.upload.join("thumbs/.immich")).unwrap();
    stack.compose(&["restart", "-t", "1", "immich-server"]);
    assert_eq!(
        stack.wait_exit_code("immich-server", Duration::from_secs(30)),
        1
    );
    let log = stack.logs("immich-server");
    assert_eq!(
        nest_lines(
            &log,
            "ERROR",
            "Failed to read \"/data/thumbs/.immich\": Error: ENOENT: no such file or directory, open '/data/thumbs/.immich'"
        )
        .len(),
        1,
        "{log}"
    );
    assert!(
        log.contains("microservices worker exited with code 1"),
        "{log}"
    );
    assert_eq!(stack.asset_count(), assets, "failed before uploading");

    // Putting the marker back is the fix.
    std::fs::write(stack.upload.join("thumbs/.immich"), b"").unwrap();
    stack.compose(&["start", "immich-server"]);
    stack.wait_server_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(stack.asset_count(), assets + 1);
}

#[test]
fn unwritable_media_dir_fails_boot_with_eacces() {
    if !docker_available() {
        return;
    }
    // Root in the container ignores modes; Immich's images may run as another user.
    let stack = Stack::create(StackSpec::default().no_restart().server_user("65534:65534"));
    std::os::unix::fs::chown(&stack.upload, Some(0), Some(0)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&stack.upload, std::fs::Permissions::from_mode(0o755)).unwrap();
    stack.compose(&["up", "-d"]);
    assert_eq!(
        stack.wait_exit_code("immich-server", Duration::from_secs(60)),
        1
    );
    let log = stack.logs("immich-server");
    assert_eq!(
        nest_lines(
            &log,
            "ERROR",
            "EACCES: permission denied, mkdir '/data/library'"
        )
        .len(),
        1,
        "{log}"
    );
    assert!(
        log.contains("microservices worker exited with code 1"),
        "{log}"
    );
    assert_eq!(std::fs::read_dir(&stack.upload).unwrap().count(), 0);
}

#[test]
fn database_errors_use_node_phrases_econnrefused_and_password_failed() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default().no_restart());
    let db_ip = stack.ip("database").unwrap();

    // Nothing listens on that port: ECONNREFUSED <ip>:<port> while retrying, then give up.
    stack.set_env("DB_PORT", "5433");
    stack.set_env("STANDIN_DB_TIMEOUT_MS", "1500");
    let log = restart_expecting_failure(&stack);
    assert_error_line(&log, &format!("Error: connect ECONNREFUSED {db_ip}:5433"));
    assert!(log.contains("Unable to connect to the database"), "{log}");

    // A DB_PASSWORD changed after the database was initialized: PostgreSQL keeps the old one.
    stack.set_env("DB_PORT", "5432");
    stack.set_env("DB_PASSWORD", "changed-after-init");
    let log = restart_expecting_failure(&stack);
    assert_error_line(&log, "password authentication failed for user \"postgres\"");
}

/// `up -d` after an env change; the server must exit with 1. Returns its log.
fn restart_expecting_failure(stack: &Stack) -> String {
    stack.compose(&["up", "-d"]);
    assert_eq!(
        stack.wait_exit_code("immich-server", Duration::from_secs(30)),
        1
    );
    stack.logs("immich-server")
}

fn assert_error_line(log: &str, phrase: &str) {
    assert!(
        !nest_lines(log, "ERROR", phrase).is_empty(),
        "{phrase} not in:\n{log}"
    );
}

#[test]
fn pg_dumpall_via_docker_exec_works() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default());
    let db = stack.container_name("database");
    let out = docker(&[
        "exec",
        &db,
        "pg_dumpall",
        "--clean",
        "--if-exists",
        "-U",
        "postgres",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains("CREATE ROLE postgres;"), "roles are in it");
    assert!(dump.contains("CREATE DATABASE immich"), "the database");
    assert!(dump.contains("CREATE TABLE public.assets"), "the schema");
    assert!(dump.contains("1729000000000-AddAssetJobStatus"), "the data");

    // Restores into an empty PostgreSQL with the same rows.
    let rows = "SELECT string_agg(id || \"originalPath\" || encode(checksum, 'hex'), ',' ORDER BY id) FROM assets";
    let scratch = harness::ScratchPostgres::start();
    let restored = scratch.restore(&out.stdout);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert_eq!(scratch.psql("immich", rows), stack.psql(rows));
}

#[test]
fn postgres_container_behaves_like_the_official_image() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up(StackSpec::default());
    let db = stack.container_name("database");
    // POSTGRES_INITDB_ARGS reached initdb; TCP with scram-sha-256 (the server logged in).
    assert_eq!(stack.psql("SHOW data_checksums"), "on");
    assert_eq!(stack.psql("SHOW listen_addresses"), "*");
    assert_eq!(stack.psql("SHOW server_version_num")[..2], *"15");
    assert_eq!(
        stack.psql("SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = 'immich'"),
        "t"
    );
    assert!(
        std::fs::read_to_string(stack.db_data.join("pg_hba.conf"))
            .unwrap()
            .contains("host all all all scram-sha-256")
    );
    // postgres itself is PID 1, as the postgres user, and the image's stop signal is SIGINT.
    assert_eq!(docker_ok(&["exec", &db, "cat", "/proc/1/comm"]), "postgres");
    assert_eq!(
        docker_ok(&["exec", &db, "stat", "-c", "%u", "/proc/1"]),
        "999"
    );
    assert_eq!(inspect(&db, "{{.Config.StopSignal}}"), "SIGINT");
    let meta = std::fs::metadata(stack.db_data.join("PG_VERSION")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 999);
    let log = stack.logs("database");
    assert!(
        log.contains("PostgreSQL init process complete; ready for start up."),
        "{log}"
    );
    assert!(
        log.contains("database system is ready to accept connections"),
        "{log}"
    );

    // A restarted database keeps its data and does not initialize again.
    stack.compose(&["restart", "-t", "10", "database"]);
    stack.wait_db_ready(Duration::from_secs(30));
    assert_eq!(stack.asset_count(), 4);
    let log = stack.logs("database");
    assert_eq!(log.matches("init process complete").count(), 1, "{log}");
}

#[test]
fn same_tag_salt_gives_new_image_id() {
    if !docker_available() {
        return;
    }
    let tag = format!("igt-salt-{}", std::process::id());
    let full = format!("{}:{tag}", images::server_repo());
    let first = build_server_image("v1.119.0", &tag, "one");
    assert_eq!(build_server_image("v1.119.0", &tag, "one"), first, "cached");
    let second = build_server_image("v1.119.0", &tag, "two");
    assert_ne!(first, second, "a re-pushed tag");
    assert_eq!(image_id(&full), second);
    assert_eq!(
        image_label(&full, "org.opencontainers.image.version").as_deref(),
        Some("v1.119.0")
    );
    assert_eq!(
        image_label(&full, "org.opencontainers.image.source").as_deref(),
        Some("https://github.com/immich-app/immich")
    );
    docker(&["rmi", &full, &first]);
}

#[test]
fn stack_on_a_non_version_tag_runs_the_version_baked_into_the_image() {
    if !docker_available() {
        return;
    }
    // Like `IMMICH_VERSION=release`: the tag says nothing, the image knows its version.
    let tag = format!("igt-release-{}", std::process::id());
    let id = build_server_image("v1.120.0", &tag, "");
    let stack = Stack::up(StackSpec::new(&tag));
    assert_eq!(
        stack.wait_server_ready(Duration::from_secs(5)).unwrap(),
        "v1.120.0"
    );
    assert_eq!(stack.state("immich-server").unwrap().image, id);
    assert_eq!(stack.applied_migrations().len(), 5);
    drop(stack);
    docker(&[
        "rmi",
        &format!("{}:{tag}", images::server_repo()),
        &format!("{}:{tag}", images::ml_repo()),
    ]);
}

#[test]
fn images_are_cached_by_content() {
    if !docker_available() {
        return;
    }
    let first = ensure_images(&["v1.119.0", "v1.120.0"]);
    let again = ensure_images(&["v1.119.0", "v1.120.0"]);
    assert!(again.built.is_empty(), "rebuilt {:?}", again.built);
    assert_eq!(
        Images {
            built: Vec::new(),
            ..first.clone()
        },
        again
    );
    // One image per version, server and ML apart, each labelled with its content hash.
    assert_ne!(first.server("v1.119.0"), first.server("v1.120.0"));
    assert_ne!(first.servers, first.ml);
    for id in [&first.base, &first.postgres, &first.redis, &first.ml[0].1] {
        assert_eq!(
            image_label(id, images::CONTENT_LABEL).map(|h| h.len()),
            Some(64),
            "{id}"
        );
    }
    // The version is baked in; nothing of ours under /usr (the host's is mounted there).
    let tag = format!("{}:v1.120.0", images::server_repo());
    assert_eq!(
        docker_ok(&[
            "run",
            "--rm",
            "--label",
            "io.immich-guard.test=1",
            "--entrypoint",
            "/bin/cat",
            &tag,
            "/etc/immich-version"
        ]),
        "v1.120.0"
    );
    let listing = docker_ok(&[
        "run",
        "--rm",
        "--label",
        "io.immich-guard.test=1",
        "--entrypoint",
        "/bin/sh",
        &tag,
        "-c",
        "test ! -e /usr && ls /app",
    ]);
    assert_eq!(listing, "immich-standin");
}

/// This binary run again without a Docker engine (DOCKER_HOST at a dead socket): the Docker
/// tests skip with one message and a summary at exit that libtest does not capture; under
/// CI=true the same message ends the run with status 1, no panic, no backtrace.
#[test]
fn without_docker_tests_skip_with_a_summary_and_fail_under_ci() {
    let run = |ci: bool| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "fresh_stack_boots_and_answers_ping_and_version"])
            .args(["--test-threads", "1"])
            .env(
                "DOCKER_HOST",
                "unix:///nonexistent/immich-guard-test/docker.sock",
            )
            .env_remove("CI")
            .env_remove("RUST_BACKTRACE");
        if ci {
            c.env("CI", "true");
        }
        c.output().unwrap()
    };
    let out = run(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        err.matches("the Docker engine does not answer `docker info`")
            .count(),
        1,
        "{err}"
    );
    let listed = String::from_utf8_lossy(
        &Command::new(std::env::current_exe().unwrap())
            .args(["--list", "--format", "terse"])
            .output()
            .unwrap()
            .stdout,
    )
    .lines()
    .filter(|l| l.ends_with(": test"))
    .count();
    assert!(
        err.contains(&format!(
            "immich-guard: 1 of {listed} tests in this binary skipped: Docker not available ("
        )),
        "{err}"
    );

    let out = run(true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("the Docker engine does not answer `docker info`")
            && err.contains("CI=true, so this is a failure"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

/// Removes everything the harness ever made (containers, networks, volumes, images with our
/// labels, kept stacks, temp dirs, lock files); README: `cargo test --test standin --
/// --ignored --exact cleanup`. What a running test process owns is left and listed.
#[test]
#[ignore = "removes every test stack and image; run by hand"]
fn cleanup() {
    if !docker_available() {
        return;
    }
    harness::host::cleanup_and_report();
}
