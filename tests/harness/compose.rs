//! An Immich-shaped compose stack for one test: the official file's services, names, `.env`
//! and mounts, in a temp dir under a unique project name, torn down on drop even when the
//! test panicked. Container names carry the project so parallel tests never collide.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::images::ensure_images;

pub const OWNER_LABEL: &str = "io.immich-guard.test.owner";

#[derive(Clone, Debug)]
pub struct StackSpec {
    pub version: String,
    pub boot_delay_ms: u64,
    pub seed_assets: u32,
    pub server_env: Vec<(String, String)>,
    pub restart: String,
    pub wait_ready: bool,
}

impl Default for StackSpec {
    fn default() -> Self {
        StackSpec {
            version: "v1.119.0".into(),
            boot_delay_ms: 200,
            seed_assets: 3,
            server_env: Vec::new(),
            restart: "always".into(),
            wait_ready: true,
        }
    }
}

pub struct Stack {
    pub project: String,
    pub dir: PathBuf,
    pub compose_file: PathBuf,
    pub env_file: PathBuf,
    pub upload: PathBuf,
    pub db_data: PathBuf,
    pub db_user: String,
    pub db_password: String,
    pub db_name: String,
    /// Owns the temp dir; taken (kept on disk) when IMMICH_GUARD_KEEP_STACK=1.
    root: Option<tempfile::TempDir>,
}

fn compose_command() -> Vec<String> {
    if let Ok(c) = std::env::var("IMMICH_GUARD_TEST_COMPOSE") {
        return c.split_whitespace().map(str::to_string).collect();
    }
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

/// Removes containers (and their networks) left by test processes that died.
fn remove_leftovers() {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label={OWNER_LABEL}"),
            "--format",
            &format!("{{{{.ID}}}} {{{{.Label \"{OWNER_LABEL}\"}}}} {{{{.Label \"com.docker.compose.project\"}}}}"),
        ])
        .output()
        .unwrap();
    let mut projects = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut parts = line.split_whitespace();
        let (Some(id), Some(pid), project) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            Command::new("docker").args(["rm", "-f", id]).output().ok();
            projects.extend(project.map(str::to_string));
        }
    }
    projects.sort();
    projects.dedup();
    for p in projects {
        Command::new("docker")
            .args(["network", "rm", &format!("{p}_default")])
            .output()
            .ok();
    }
}

impl Stack {
    pub fn up(spec: StackSpec) -> Stack {
        static CLEAN: Once = Once::new();
        CLEAN.call_once(remove_leftovers);
        ensure_images(&[spec.version.as_str()]);

        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let project = format!(
            "igt{}x{}x{:04x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos & 0xffff
        );
        let root = tempfile::Builder::new()
            .prefix("immich-guard-stack-")
            .tempdir()
            .unwrap();
        let dir = root.path().join("immich");
        let upload = root.path().join("library");
        let db_data = root.path().join("postgres");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&upload).unwrap();
        let db_password = format!("pw{nanos:x}");
        let env_file = dir.join(".env");
        std::fs::write(
            &env_file,
            format!(
                "# Immich-shaped .env written by the test harness\nUPLOAD_LOCATION={}\nDB_DATA_LOCATION={}\nIMMICH_VERSION={}\nDB_PASSWORD={db_password}\nDB_USERNAME=postgres\nDB_DATABASE_NAME=immich\n",
                upload.display(),
                db_data.display(),
                spec.version
            ),
        )
        .unwrap();
        let compose_file = dir.join("docker-compose.yml");
        std::fs::write(&compose_file, compose_yaml(&project, &spec)).unwrap();
        let stack = Stack {
            project,
            dir,
            compose_file,
            env_file,
            upload,
            db_data,
            db_user: "postgres".into(),
            db_password,
            db_name: "immich".into(),
            root: Some(root),
        };
        stack.compose(&["up", "-d"]);
        if spec.wait_ready {
            stack
                .wait_server_ready(Duration::from_secs(90))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        stack
    }

    pub fn try_compose(&self, args: &[&str]) -> Output {
        let cmd = compose_command();
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(&self.compose_file)
            .arg("--project-directory")
            .arg(&self.dir)
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run compose")
    }

    pub fn compose(&self, args: &[&str]) -> Output {
        let out = self.try_compose(args);
        assert!(
            out.status.success(),
            "compose {args:?} failed for {}: {}",
            self.project,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Rewrites one `.env` key in place (temp file + rename, as editors do).
    pub fn set_env(&self, key: &str, value: &str) {
        let text = std::fs::read_to_string(&self.env_file).unwrap();
        let mut found = false;
        let mut lines: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key}=")) {
                    found = true;
                    format!("{key}={value}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        if !found {
            lines.push(format!("{key}={value}"));
        }
        let tmp = self.env_file.with_extension("tmp");
        std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
        std::fs::rename(&tmp, &self.env_file).unwrap();
    }

    pub fn container_name(&self, service: &str) -> String {
        let suffix = match service {
            "immich-server" => "immich_server",
            "immich-machine-learning" => "immich_machine_learning",
            "redis" => "immich_redis",
            "database" => "immich_postgres",
            other => panic!("no service {other}"),
        };
        format!("{}_{suffix}", self.project)
    }

    pub fn container_id(&self, service: &str) -> String {
        inspect(&self.container_name(service), "{{.Id}}").expect("container exists")
    }

    pub fn server_url(&self) -> Option<String> {
        let ip = inspect(
            &self.container_name("immich-server"),
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        )?;
        (!ip.is_empty()).then(|| format!("{ip}:2283"))
    }

    /// Waits until `/api/server/ping` answers; returns `/api/server/version`.
    pub fn wait_server_ready(&self, timeout: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            if let Some(addr) = self.server_url()
                && http_get(&addr, "/api/server/ping").is_some_and(|b| b.contains("pong"))
            {
                return http_get(&addr, "/api/server/version")
                    .ok_or_else(|| "version endpoint did not answer".to_string());
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "server of {} not ready after {timeout:?}; server log:\n{}\ndatabase log:\n{}",
                    self.project,
                    self.logs("immich-server"),
                    self.logs("database")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn psql(&self, sql: &str) -> String {
        psql(
            &self.container_name("database"),
            &self.db_user,
            &self.db_name,
            sql,
        )
    }

    /// Names in TypeORM's and Kysely's migration tables, sorted.
    pub fn applied_migrations(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for table in ["migrations", "kysely_migrations"] {
            if self.psql(&format!("SELECT to_regclass('{table}') IS NOT NULL")) == "t" {
                let list = self.psql(&format!("SELECT string_agg(name::text, ',') FROM {table}"));
                names.extend(
                    list.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                );
            }
        }
        names.sort();
        names
    }

    /// Waits until PostgreSQL accepts connections (initdb on a fresh data dir takes a while).
    pub fn wait_db_ready(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let ok = Command::new("docker")
                .args([
                    "exec",
                    &self.container_name("database"),
                    "pg_isready",
                    "-U",
                    &self.db_user,
                    "-d",
                    &self.db_name,
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "database of {} not ready after {timeout:?}; log:\n{}",
                self.project,
                self.logs("database")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the service's container has `status` (`exited`, `running`, ...).
    pub fn wait_status(&self, service: &str, status: &str, timeout: Duration) -> String {
        let name = self.container_name(service);
        let start = Instant::now();
        loop {
            let now = inspect(&name, "{{.State.Status}} {{.State.ExitCode}}").unwrap_or_default();
            if now.split_whitespace().next() == Some(status) {
                return now;
            }
            assert!(
                start.elapsed() < timeout,
                "{name} not {status} after {timeout:?} (is {now}); log:\n{}",
                self.logs(service)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What discovery would find for the database, built from the stack's own facts.
    pub fn db_access(&self) -> immich_guard::discover::DbAccess {
        let ip = inspect(
            &self.container_name("database"),
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        );
        immich_guard::discover::DbAccess {
            user: self.db_user.clone(),
            password: self.db_password.clone(),
            password_known: true,
            database: self.db_name.clone(),
            host: ip.filter(|ip| !ip.is_empty()),
            port: 5432,
        }
    }

    pub fn logs(&self, service: &str) -> String {
        let out = Command::new("docker")
            .args(["logs", "--tail", "200", &self.container_name(service)])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // For looking at a stack by hand after a test: keep it running, and its files.
        if std::env::var("IMMICH_GUARD_KEEP_STACK").as_deref() == Ok("1") {
            if let Some(root) = self.root.take() {
                eprintln!(
                    "keeping stack {} in {} (IMMICH_GUARD_KEEP_STACK=1)",
                    self.project,
                    root.keep().display()
                );
            }
            return;
        }
        let out = self.try_compose(&["down", "-v", "--remove-orphans", "-t", "1"]);
        if !out.status.success() {
            eprintln!(
                "compose down for {} failed: {}",
                self.project,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// One query through `docker exec … psql`, unaligned, tuples only.
fn psql(container: &str, user: &str, db: &str, sql: &str) -> String {
    let out = Command::new("docker")
        .args(["exec", container, "psql", "-U", user, "-d", db, "-tAc", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql:?} in {container}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn inspect(what: &str, format: &str) -> Option<String> {
    let out = Command::new("docker")
        .args(["inspect", "--format", format, what])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: immich\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    // A reset after the answer arrived still leaves the answer.
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn compose_yaml(project: &str, spec: &StackSpec) -> String {
    let libs = "      - /usr:/usr:ro\n      - /lib:/lib:ro\n      - /lib64:/lib64:ro\n";
    let owner = std::process::id();
    let mut server_env = format!(
        "      STANDIN_BOOT_DELAY_MS: \"{}\"\n      STANDIN_SEED_ASSETS: \"{}\"\n",
        spec.boot_delay_ms, spec.seed_assets
    );
    for (k, v) in &spec.server_env {
        server_env.push_str(&format!("      {k}: \"{v}\"\n"));
    }
    let restart = &spec.restart;
    format!(
        r#"# Shaped like Immich's official docker-compose.yml (service and container names, .env, mounts).
version: "3.8"

services:
  immich-server:
    container_name: {project}_immich_server
    image: ghcr.io/immich-app/immich-server:${{IMMICH_VERSION:-release}}
    volumes:
      - ${{UPLOAD_LOCATION}}:/data
{libs}    env_file:
      - .env
    environment:
{server_env}    depends_on:
      - redis
      - database
    restart: {restart}
    labels:
      {owner_label}: "{owner}"

  immich-machine-learning:
    container_name: {project}_immich_machine_learning
    image: ghcr.io/immich-app/immich-machine-learning:${{IMMICH_VERSION:-release}}
    volumes:
{libs}    env_file:
      - .env
    restart: {restart}
    labels:
      {owner_label}: "{owner}"

  redis:
    container_name: {project}_immich_redis
    image: docker.io/valkey/valkey:8-bookworm
    volumes:
{libs}    restart: {restart}
    labels:
      {owner_label}: "{owner}"

  database:
    container_name: {project}_immich_postgres
    image: immich-guard-test/postgres:15
    environment:
      POSTGRES_PASSWORD: ${{DB_PASSWORD}}
      POSTGRES_USER: ${{DB_USERNAME}}
      POSTGRES_DB: ${{DB_DATABASE_NAME}}
      POSTGRES_INITDB_ARGS: '--data-checksums'
    volumes:
      - ${{DB_DATA_LOCATION}}:/var/lib/postgresql/data
{libs}    shm_size: 128mb
    # The official postgres image declares STOPSIGNAL SIGINT; `docker import` cannot.
    stop_signal: SIGINT
    restart: {restart}
    labels:
      {owner_label}: "{owner}"
"#,
        owner_label = OWNER_LABEL
    )
}

/// A lone, empty PostgreSQL container (same image as the stacks), removed on drop.
pub struct ScratchPostgres {
    pub name: String,
}

impl ScratchPostgres {
    pub fn start() -> ScratchPostgres {
        super::images::ensure_images(&[]);
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "igt{}scratch{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("docker")
            .args(["run", "-d", "--name", &name, "--label"])
            .arg(format!("{OWNER_LABEL}={}", std::process::id()))
            .args(["-e", "POSTGRES_PASSWORD=scratch", "--stop-signal", "SIGINT"])
            .args([
                "-v",
                "/usr:/usr:ro",
                "-v",
                "/lib:/lib:ro",
                "-v",
                "/lib64:/lib64:ro",
            ])
            .arg(super::images::POSTGRES_IMAGE)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let db = ScratchPostgres { name };
        let start = Instant::now();
        while !db.ready() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "scratch postgres not ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        db
    }

    fn ready(&self) -> bool {
        Command::new("docker")
            .args(["exec", &self.name, "pg_isready", "-U", "postgres"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Feeds `sql` to psql connected to `postgres` (as Immich's restore docs do).
    pub fn restore(&self, sql: &[u8]) -> Output {
        let mut child = Command::new("docker")
            .args([
                "exec", "-i", &self.name, "psql", "-q", "-U", "postgres", "-d", "postgres",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let sql = sql.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&sql));
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap().unwrap();
        out
    }

    pub fn psql(&self, db: &str, sql: &str) -> String {
        psql(&self.name, "postgres", db, sql)
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        Command::new("docker")
            .args(["rm", "-f", "-v", &self.name])
            .output()
            .ok();
    }
}
