//! An Immich-shaped compose stack for one test: the official docker-compose.yml's services,
//! `.env` keys, mounts and container-name suffixes, in a temp dir under a unique project name,
//! torn down on drop even when the test panicked. Container names carry the project, and no
//! ports are published, so parallel tests never collide. Every container, network and volume
//! carries `io.immich-guard.test=1` and `io.immich-guard.test.owner=<pid>`; leftovers of dead
//! test processes are removed on first use, and removals only ever filter on those labels.
//!
//! Both compose generations: `IMMICH_GUARD_TEST_COMPOSE=v1` (`docker-compose`) or `v2`
//! (`docker compose`), by default v2 when it is installed. Immich's compose file sets
//! `container_name`; a [`StackSpec::compose_names`] stack leaves it out, and the containers
//! get compose's own names (`project-service-1` under v2, `project_service_1` under v1).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use super::images;

pub const OWNER_LABEL: &str = "io.immich-guard.test.owner";
pub use super::images::TEST_LABEL;
/// Where a kept stack (IMMICH_GUARD_KEEP_STACK=1) is written down with its `down` command.
pub const KEPT_LIST: &str = "/tmp/immich-guard-kept-stacks.txt";
/// Prefix of every stack's temp dir (`<tmp>/immich-guard-stack-<pid>-…`).
pub const STACK_DIR_PREFIX: &str = "immich-guard-stack-";
/// File in a kept stack's temp dir that protects it from the leftover sweep.
pub const KEPT_MARKER: &str = "KEPT";

/// The compose services and the suffix of their container names (official: `immich_server`…).
pub const SERVICES: &[(&str, &str)] = &[
    ("immich-server", "immich_server"),
    ("immich-machine-learning", "immich_machine_learning"),
    ("redis", "immich_redis"),
    ("database", "immich_postgres"),
];

#[derive(Clone, Debug)]
pub struct StackSpec {
    /// `IMMICH_VERSION` in `.env`: a version (images built on demand) or a tag built before
    /// with `images::build_server_image` (e.g. `release`).
    pub version: String,
    /// `STANDIN_BOOT_DELAY_MS` of the server.
    pub boot_delay_ms: u64,
    /// `STANDIN_SEED_ASSETS`: assets created on a fresh install.
    pub seed_assets: u32,
    /// `STANDIN_ASSETS_PER_BOOT`: assets uploaded on every successful boot.
    pub assets_per_boot: u32,
    /// More `environment:` of the server (`STANDIN_CRASH`, `DB_SKIP_MIGRATIONS`, ...).
    pub server_env: Vec<(String, String)>,
    /// `restart:` of every service (`always` like the official file, or `no`).
    pub restart: String,
    /// `user:` of the server container (e.g. `65534:65534` to meet EACCES; root ignores modes).
    pub server_user: Option<String>,
    /// Wait in `up` until the server answers `/api/server/ping`.
    pub wait_ready: bool,
    pub ready_timeout: Duration,
    /// Leave `container_name` out (Immich's file sets it): compose names the containers
    /// `project-service-1` (v2) or `project_service_1` (v1).
    pub compose_names: bool,
    /// `DB_PASSWORD` in `.env` (random hex when None): a password with characters a URL
    /// must percent-encode, for the redaction tests.
    pub db_password: Option<String>,
}

impl Default for StackSpec {
    fn default() -> Self {
        StackSpec {
            version: "v1.119.0".into(),
            boot_delay_ms: 200,
            seed_assets: 3,
            assets_per_boot: 1,
            server_env: Vec::new(),
            restart: "always".into(),
            server_user: None,
            wait_ready: true,
            ready_timeout: Duration::from_secs(90),
            compose_names: false,
            db_password: None,
        }
    }
}

impl StackSpec {
    pub fn new(version: &str) -> StackSpec {
        StackSpec {
            version: version.into(),
            ..StackSpec::default()
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> StackSpec {
        self.server_env.push((key.into(), value.into()));
        self
    }

    pub fn restart(mut self, policy: &str) -> StackSpec {
        self.restart = policy.into();
        self
    }

    /// `restart: "no"` everywhere: a failing server stays exited (exit code observable).
    pub fn no_restart(self) -> StackSpec {
        self.restart("no")
    }

    pub fn boot_delay_ms(mut self, ms: u64) -> StackSpec {
        self.boot_delay_ms = ms;
        self
    }

    pub fn seed_assets(mut self, n: u32) -> StackSpec {
        self.seed_assets = n;
        self
    }

    pub fn server_user(mut self, user: &str) -> StackSpec {
        self.server_user = Some(user.into());
        self
    }

    /// Do not wait for the server in `up` (it is expected to fail, or the test waits itself).
    pub fn no_wait(mut self) -> StackSpec {
        self.wait_ready = false;
        self
    }

    /// `DB_PASSWORD` (and so `POSTGRES_PASSWORD`): written unquoted in `.env`, so no `$`,
    /// `#`, quote or space.
    pub fn db_password(mut self, password: &str) -> StackSpec {
        assert!(
            !password.contains(['$', '#', '"', '\'', ' ', '\n']),
            "{password:?} needs quoting in .env"
        );
        self.db_password = Some(password.into());
        self
    }

    /// No `container_name:`; compose's own names (see [`StackSpec::compose_names`]).
    pub fn compose_names(mut self) -> StackSpec {
        self.compose_names = true;
        self
    }
}

pub struct Stack {
    pub project: String,
    /// The compose working dir (holds docker-compose.yml and .env).
    pub dir: PathBuf,
    pub compose_file: PathBuf,
    pub env_file: PathBuf,
    /// `UPLOAD_LOCATION` (mounted at `/data` in the server).
    pub upload: PathBuf,
    /// `DB_DATA_LOCATION` (the PostgreSQL data dir; files owned by uid 999).
    pub db_data: PathBuf,
    pub db_user: String,
    pub db_password: String,
    pub db_name: String,
    pub spec: StackSpec,
    /// Owns the temp dir; taken (kept on disk) when IMMICH_GUARD_KEEP_STACK=1.
    root: Option<tempfile::TempDir>,
}

/// State of one service's container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerState {
    /// `created`, `running`, `restarting`, `exited`, `paused`, `dead`.
    pub status: String,
    pub exit_code: i64,
    pub restart_count: u64,
    /// Image ID the container runs.
    pub image: String,
    pub id: String,
}

/// The compose command: `IMMICH_GUARD_TEST_COMPOSE` = `v1` (`docker-compose`), `v2`
/// (`docker compose`) or a command line (split on spaces); by default `docker compose` when
/// that works, else `docker-compose`.
pub fn compose_command() -> Vec<String> {
    static CMD: OnceLock<Vec<String>> = OnceLock::new();
    CMD.get_or_init(|| {
        let v1 = || vec!["docker-compose".to_string()];
        let v2 = || vec!["docker".to_string(), "compose".to_string()];
        match std::env::var("IMMICH_GUARD_TEST_COMPOSE")
            .as_deref()
            .map(str::trim)
        {
            Ok("v1") => return v1(),
            Ok("v2") => return v2(),
            Ok(c) if !c.is_empty() => return c.split_whitespace().map(str::to_string).collect(),
            _ => {}
        }
        let has_v2 = Command::new("docker")
            .args(["compose", "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if has_v2 { v2() } else { v1() }
    })
    .clone()
}

/// Whether [`compose_command`] is compose v2 (`docker compose`, or a `docker-compose` that
/// says it is v2), which names containers `project-service-1`.
pub fn compose_v2() -> bool {
    static V2: OnceLock<bool> = OnceLock::new();
    *V2.get_or_init(|| {
        let cmd = compose_command();
        let out = Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(["version", "--short"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let v = String::from_utf8_lossy(&o.stdout);
                v.trim().trim_start_matches('v').starts_with('2')
            }
            _ => cmd.len() > 1 && cmd[1] == "compose",
        }
    })
}

pub fn pid_alive(pid: &str) -> bool {
    pid.parse::<u32>().is_ok() && Path::new(&format!("/proc/{pid}")).exists()
}

pub fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"))
}

/// Removes containers, networks, volumes and temp dirs left by test processes that died
/// (their owner label names a pid that no longer exists). Runs once per process.
pub fn remove_leftovers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Stacks kept on purpose (IMMICH_GUARD_KEEP_STACK=1) have a KEPT file beside their
        // compose dir: leave those, and everything named after their project, alone.
        let kept: Vec<String> = lines(&docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label={OWNER_LABEL}"),
            "--format",
            "{{.Label \"com.docker.compose.project\"}} {{.Label \"com.docker.compose.project.working_dir\"}}",
        ]))
        .into_iter()
        .filter_map(|l| {
            let (project, dir) = l.split_once(' ')?;
            let marker = Path::new(dir).parent()?.join(KEPT_MARKER);
            (!project.is_empty() && marker.exists()).then(|| project.to_string())
        })
        .collect();
        let is_kept = |name: &str| kept.iter().any(|p| name.starts_with(p.as_str()));
        let owner = |kind: &str| {
            let id = if kind == "volume" { "Name" } else { "ID" };
            let format = format!(
                "{{{{.{id}}}}} {{{{.Label \"{OWNER_LABEL}\"}}}} {{{{.{}}}}}",
                if kind == "container" { "Names" } else { "Name" }
            );
            let mut args = vec![kind, "ls", "--filter"];
            let filter = format!("label={OWNER_LABEL}");
            args.push(&filter);
            if kind == "container" {
                args.push("-a");
            }
            args.extend(["--format", &format]);
            lines(&docker(&args))
                .into_iter()
                .filter_map(|l| {
                    let mut parts = l.split(' ');
                    let (id, pid, name) = (parts.next()?, parts.next()?, parts.next()?);
                    (!pid_alive(pid) && !is_kept(name)).then(|| id.to_string())
                })
                .collect::<Vec<_>>()
        };
        let dead = owner("container");
        if !dead.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(dead.iter().map(String::as_str));
            docker(&args);
        }
        for kind in ["network", "volume"] {
            for id in owner(kind) {
                docker(&[kind, "rm", &id]);
            }
        }
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(STACK_DIR_PREFIX) else {
                    continue;
                };
                let pid = rest.split('-').next().unwrap_or("");
                let kept = entry.path().join(KEPT_MARKER).exists();
                if !pid.is_empty() && !pid_alive(pid) && !kept {
                    remove_tree(&entry.path());
                }
            }
        }
    });
}

/// Removes a tree that may hold files of uid 999 (database) or of containers' root; when we
/// cannot (not root), a throwaway container of the base image does it.
pub fn remove_tree(path: &Path) {
    if std::fs::remove_dir_all(path).is_ok() || !path.exists() {
        return;
    }
    let mount = format!("{}:/victim", path.display());
    let ours = format!("{TEST_LABEL}=1");
    docker(&[
        "run",
        "--rm",
        "--label",
        &ours,
        "-v",
        &mount,
        &images::base_image(),
        "sh",
        "-c",
        "rm -rf /victim/* /victim/.[!.]* /victim/..?*",
    ]);
    let _ = std::fs::remove_dir_all(path);
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Stack {
    /// Writes an Immich-shaped `docker-compose.yml` and `.env` into a new temp dir, runs
    /// `compose up -d` and (with `spec.wait_ready`) waits until the server answers.
    pub fn up(spec: StackSpec) -> Stack {
        remove_leftovers();
        let stack = Stack::create(spec);
        stack.compose(&["up", "-d"]);
        if stack.spec.wait_ready {
            stack
                .wait_server_ready(stack.spec.ready_timeout)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        stack
    }

    /// Like [`Stack::up`] without running anything: the files are written and the images
    /// exist, the test starts the stack itself.
    pub fn create(spec: StackSpec) -> Stack {
        if images::is_version(&spec.version) {
            images::ensure_images(&[spec.version.as_str()]);
        } else {
            images::ensure_images(&[]);
            let server = format!("{}:{}", images::server_repo(), spec.version);
            let version = images::image_label(&server, "org.opencontainers.image.version")
                .unwrap_or_else(|| {
                    panic!(
                        "no image {server}: build it first with images::build_server_image(version, {:?}, salt)",
                        spec.version
                    )
                });
            let ml = format!("{}:{}", images::ml_repo(), spec.version);
            if images::try_image_id(&ml).is_none() {
                images::build_ml_image(&version, &spec.version, "");
            }
        }

        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let project = format!(
            "igt{pid}x{}x{}",
            COUNTER.fetch_add(1, Ordering::Relaxed),
            random_hex(2)
        );
        let root = tempfile::Builder::new()
            .prefix(&format!("{STACK_DIR_PREFIX}{pid}-"))
            .tempdir()
            .expect("temp dir for the stack");
        let dir = root.path().join("immich");
        let upload = root.path().join("library");
        let db_data = root.path().join("postgres");
        for d in [&dir, &upload, &db_data] {
            std::fs::create_dir_all(d).unwrap();
        }
        if let Some(user) = &spec.server_user {
            // A non-root server needs to own its media dir (as on a real host).
            let ids: Vec<u32> = user.split(':').filter_map(|p| p.parse().ok()).collect();
            if let Some(&uid) = ids.first() {
                std::os::unix::fs::chown(&upload, Some(uid), ids.get(1).copied()).ok();
            }
        }
        let db_password = spec.db_password.clone().unwrap_or_else(|| random_hex(12));
        let env_file = dir.join(".env");
        std::fs::write(
            &env_file,
            format!(
                "# You can find documentation for all the supported env variables at https://immich.app/docs/install/environment-variables\n\
                 \n\
                 # The location where your uploaded files are stored\n\
                 UPLOAD_LOCATION={}\n\
                 # The location where your database files are stored\n\
                 DB_DATA_LOCATION={}\n\
                 \n\
                 # The Immich version to use. You can pin this to a specific version like \"v1.71.0\"\n\
                 IMMICH_VERSION={}\n\
                 \n\
                 # Connection secret for postgres. You should change it to a random password\n\
                 DB_PASSWORD={db_password}\n\
                 \n\
                 # The values below this line do not need to be changed\n\
                 DB_USERNAME=postgres\n\
                 DB_DATABASE_NAME=immich\n",
                upload.display(),
                db_data.display(),
                spec.version
            ),
        )
        .unwrap();
        let compose_file = dir.join("docker-compose.yml");
        std::fs::write(&compose_file, compose_yaml(&project, &spec)).unwrap();
        Stack {
            project,
            dir,
            compose_file,
            env_file,
            upload,
            db_data,
            db_user: "postgres".into(),
            db_password,
            db_name: "immich".into(),
            spec,
            root: Some(root),
        }
    }

    /// [`Stack::up`] with a database that asks for a password on its local socket too (initdb
    /// `--auth-local=scram-sha-256`, as a hardened install does).
    pub fn up_hardened(version: &str) -> Stack {
        remove_leftovers();
        let stack = Stack::create(StackSpec::new(version));
        let yaml = std::fs::read_to_string(&stack.compose_file).unwrap();
        let hardened = yaml.replace(
            "POSTGRES_INITDB_ARGS: '--data-checksums'",
            &format!("POSTGRES_INITDB_ARGS: '{HARDENED_INITDB}'"),
        );
        assert_ne!(yaml, hardened, "the harness compose file changed shape");
        std::fs::write(&stack.compose_file, hardened).unwrap();
        stack.compose(&["up", "-d"]);
        stack
            .wait_server_ready(stack.spec.ready_timeout)
            .unwrap_or_else(|e| panic!("{e}"));
        stack
    }

    /// Runs compose for this project (`-p`, `-f`, `--project-directory` set) without judging
    /// the outcome. The stack's `.env` keys are removed from compose's environment so only
    /// the file counts.
    pub fn try_compose(&self, args: &[&str]) -> Output {
        let cmd = compose_command();
        let mut c = Command::new(&cmd[0]);
        c.args(&cmd[1..])
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(&self.compose_file)
            .arg("--project-directory")
            .arg(&self.dir)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        for key in [
            "UPLOAD_LOCATION",
            "DB_DATA_LOCATION",
            "IMMICH_VERSION",
            "DB_PASSWORD",
            "DB_USERNAME",
            "DB_DATABASE_NAME",
            "COMPOSE_PROJECT_NAME",
            "COMPOSE_FILE",
            "COMPOSE_PROFILES",
        ] {
            c.env_remove(key);
        }
        c.output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?} (set IMMICH_GUARD_TEST_COMPOSE?): {e}"))
    }

    /// [`Stack::try_compose`], panicking with compose's stderr on failure.
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

    /// What Watchtower does, by API calls: stop, remove, create with the new image and the old
    /// container's settings, start. Returns the new container's ID.
    pub fn recreate_server(&self, image: &str) -> String {
        let name = self.container_name("immich-server");
        let inspect: serde_json::Value =
            serde_json::from_str(&docker_ok(&["inspect", &name])).unwrap();
        let c = &inspect[0];
        let mut args: Vec<String> = vec!["create".into(), "--name".into(), name.clone()];
        for (k, v) in c["Config"]["Labels"].as_object().unwrap() {
            args.push("--label".into());
            args.push(format!("{k}={}", v.as_str().unwrap()));
        }
        for e in c["Config"]["Env"].as_array().unwrap() {
            args.push("--env".into());
            args.push(e.as_str().unwrap().into());
        }
        for b in c["HostConfig"]["Binds"].as_array().unwrap() {
            args.push("--volume".into());
            args.push(b.as_str().unwrap().into());
        }
        let networks = c["NetworkSettings"]["Networks"].as_object().unwrap();
        let (network, settings) = networks.iter().next().unwrap();
        args.push("--network".into());
        args.push(network.clone());
        for alias in settings["Aliases"].as_array().into_iter().flatten() {
            args.push("--network-alias".into());
            args.push(alias.as_str().unwrap().into());
        }
        if let Some(user) = c["Config"]["User"].as_str().filter(|u| !u.is_empty()) {
            args.push("--user".into());
            args.push(user.into());
        }
        args.push("--restart".into());
        args.push(
            c["HostConfig"]["RestartPolicy"]["Name"]
                .as_str()
                .unwrap()
                .into(),
        );
        args.push(image.into());
        for part in c["Config"]["Cmd"].as_array().into_iter().flatten() {
            args.push(part.as_str().unwrap().into());
        }
        let started = std::time::Instant::now();
        docker_ok(&["stop", "-t", "5", &name]);
        docker_ok(&["rm", &name]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = docker_ok(&args);
        docker_ok(&["start", &id]);
        eprintln!("watchtower-like recreate took {:?}", started.elapsed());
        id
    }

    /// Sets one `.env` key (added when absent), written to a temp file and renamed over the
    /// old one as editors do.
    pub fn set_env(&self, key: &str, value: &str) {
        let text = std::fs::read_to_string(&self.env_file).unwrap();
        let mut found = false;
        let mut out: Vec<String> = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with(&format!("{key}=")) {
                    found = true;
                    format!("{key}={value}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        if !found {
            out.push(format!("{key}={value}"));
        }
        let tmp = self.dir.join(format!(".env.{}.tmp", std::process::id()));
        std::fs::write(&tmp, out.join("\n") + "\n").unwrap();
        std::fs::rename(&tmp, &self.env_file).unwrap();
    }

    /// The value of one `.env` key.
    pub fn env_value(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(&self.env_file)
            .ok()?
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&format!("{key}="))
                    .map(str::to_string)
            })
    }

    /// `<project>_immich_server` etc. (the official names with the project in front), or with
    /// [`StackSpec::compose_names`] compose's own: `<project>-immich-server-1` (v2),
    /// `<project>_immich-server_1` (v1).
    pub fn container_name(&self, service: &str) -> String {
        let suffix = SERVICES
            .iter()
            .find(|(s, _)| *s == service)
            .unwrap_or_else(|| panic!("no service {service:?} in the stack"))
            .1;
        match (self.spec.compose_names, compose_v2()) {
            (false, _) => format!("{}_{suffix}", self.project),
            (true, true) => format!("{}-{service}-1", self.project),
            (true, false) => format!("{}_{service}_1", self.project),
        }
    }

    pub fn try_container_id(&self, service: &str) -> Option<String> {
        inspect(&self.container_name(service), "{{.Id}}")
    }

    pub fn container_id(&self, service: &str) -> String {
        self.try_container_id(service)
            .unwrap_or_else(|| panic!("no container for {service} in {}", self.project))
    }

    /// The state of a service's container, if it exists.
    pub fn state(&self, service: &str) -> Option<ContainerState> {
        let line = inspect(
            &self.container_name(service),
            "{{.State.Status}}|{{.State.ExitCode}}|{{.RestartCount}}|{{.Image}}|{{.Id}}",
        )?;
        let p: Vec<&str> = line.split('|').collect();
        Some(ContainerState {
            status: p.first()?.to_string(),
            exit_code: p.get(1)?.parse().ok()?,
            restart_count: p.get(2)?.parse().ok()?,
            image: p.get(3)?.to_string(),
            id: p.get(4)?.to_string(),
        })
    }

    /// The IP of a service's container on the stack's network (the host reaches bridge IPs).
    pub fn ip(&self, service: &str) -> Option<String> {
        inspect(
            &self.container_name(service),
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        )?
        .split_whitespace()
        .next()
        .map(str::to_string)
    }

    fn server_addr(&self) -> Option<SocketAddr> {
        format!("{}:2283", self.ip("immich-server")?).parse().ok()
    }

    /// `http://<server ip>:2283`; panics when the server container has no address.
    pub fn server_url(&self) -> String {
        let addr = self.server_addr().unwrap_or_else(|| {
            panic!(
                "server of {} has no IP (not running?); log:\n{}",
                self.project,
                self.logs("immich-server")
            )
        });
        format!("http://{addr}")
    }

    /// One GET against the server: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        let addr = self
            .server_addr()
            .ok_or_else(|| "server has no IP".to_string())?;
        http_get(addr, path)
    }

    /// Waits until `/api/server/ping` answers `pong`; returns the version from
    /// `/api/server/version` as `vX.Y.Z`. The error holds the server's and database's logs.
    /// Gives up early when the server exited and its restart policy will not bring it back.
    pub fn wait_server_ready(&self, timeout: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            let last = match self.get("/api/server/ping") {
                Ok((200, body)) if body.contains("pong") => {
                    let (status, body) = self.get("/api/server/version")?;
                    return parse_version_json(&body)
                        .ok_or_else(|| format!("version endpoint answered {status} {body:?}"));
                }
                Ok((status, body)) => format!("ping answered {status} {body:?}"),
                Err(e) => e,
            };
            let state = self.state("immich-server");
            let gone = state.as_ref().is_some_and(|s| {
                (s.status == "exited" || s.status == "dead")
                    && self.spec.restart.trim_matches('"') == "no"
            });
            if gone || start.elapsed() > timeout {
                return Err(format!(
                    "server of {} not ready after {:.1?} ({last}; container {state:?})\n\
                     --- immich-server log ---\n{}\n--- database log ---\n{}",
                    self.project,
                    start.elapsed(),
                    self.logs("immich-server"),
                    self.logs("database")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the server answers with `version` (after an upgrade or downgrade).
    pub fn wait_server_version(&self, version: &str, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match self.wait_server_ready(left) {
                Ok(v) if v == version => return Ok(()),
                Ok(v) if start.elapsed() > timeout => {
                    return Err(format!("server still answers {v}, not {version}"));
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until PostgreSQL accepts connections (initdb on a fresh data dir takes a while).
    pub fn wait_db_ready(&self, timeout: Duration) {
        let start = Instant::now();
        let name = self.container_name("database");
        loop {
            let ok = docker(&["exec", &name, "pg_isready", "-q", "-U", &self.db_user])
                .status
                .success();
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

    /// Waits until the service's container has `status` (`exited`, `running`, ...); returns
    /// `"<status> <exit code>"`, e.g. `"exited 1"`.
    pub fn wait_status(&self, service: &str, status: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let now = self.state(service);
            if let Some(s) = &now
                && s.status == status
            {
                return format!("{} {}", s.status, s.exit_code);
            }
            assert!(
                start.elapsed() < timeout,
                "{} not {status} after {timeout:?} (is {now:?}); log:\n{}",
                self.container_name(service),
                self.logs(service)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the service's container exited; returns its exit code.
    pub fn wait_exit_code(&self, service: &str, timeout: Duration) -> i64 {
        let s = self.wait_status(service, "exited", timeout);
        s.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Waits until Docker restarted the service's container at least `n` times.
    pub fn wait_restarts(&self, service: &str, n: u64, timeout: Duration) -> ContainerState {
        let start = Instant::now();
        loop {
            let now = self.state(service);
            if let Some(s) = &now
                && s.restart_count >= n
            {
                return s.clone();
            }
            assert!(
                start.elapsed() < timeout,
                "{} not restarted {n} times after {timeout:?} (is {now:?}); log:\n{}",
                self.container_name(service),
                self.logs(service)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One query through `docker exec <db> psql -tA`; the trimmed output, or psql's stderr.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        psql(
            &self.container_name("database"),
            &self.db_user,
            &self.db_password,
            &self.db_name,
            sql,
        )
    }

    /// What [`Stack::try_psql`] needs, to query from another thread.
    pub fn psql_handle(&self) -> Psql {
        Psql {
            container: self.container_name("database"),
            user: self.db_user.clone(),
            password: self.db_password.clone(),
            db: self.db_name.clone(),
        }
    }

    /// [`Stack::try_psql`], panicking on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .unwrap_or_else(|e| panic!("psql {sql:?} in {}: {e}", self.project))
    }

    /// Whether a table exists (`asset`, `"user"`, `kysely_migrations`, ...).
    pub fn table_exists(&self, table: &str) -> bool {
        let table = table.replace('\'', "''");
        self.psql(&format!("SELECT to_regclass('public.{table}') IS NOT NULL")) == "t"
    }

    /// Migration names in TypeORM's and Kysely's tables together, sorted (= applied order).
    pub fn applied_migrations(&self) -> Vec<String> {
        let mut names = Vec::new();
        for table in ["migrations", "kysely_migrations"] {
            names.extend(self.migrations_in(table));
        }
        names.sort();
        names.dedup();
        names
    }

    /// Migration names in one table (`migrations` or `kysely_migrations`), sorted; empty when
    /// the table does not exist.
    pub fn migrations_in(&self, table: &str) -> Vec<String> {
        if !self.table_exists(table) {
            return Vec::new();
        }
        let list = self.psql(&format!(
            "SELECT string_agg(name::text, E'\\n' ORDER BY name) FROM {table}"
        ));
        list.lines()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Rows in the asset table (`asset` since v1.137, `assets` before).
    pub fn asset_count(&self) -> u64 {
        let table = if self.table_exists("asset") {
            "asset"
        } else {
            "assets"
        };
        self.psql(&format!("SELECT count(*) FROM {table}"))
            .parse()
            .unwrap()
    }

    /// Rows in the user table (`"user"` since v1.137, `users` before).
    pub fn user_count(&self) -> u64 {
        let table = if self.table_exists("\"user\"") {
            "\"user\""
        } else {
            "users"
        };
        self.psql(&format!("SELECT count(*) FROM {table}"))
            .parse()
            .unwrap()
    }

    /// What discovery would find for the database, built from the stack's own facts.
    pub fn db_access(&self) -> immich_guard::discover::DbAccess {
        immich_guard::discover::DbAccess {
            user: self.db_user.clone(),
            password: self.db_password.clone(),
            password_known: true,
            database: self.db_name.clone(),
            host: self.ip("database"),
            port: 5432,
        }
    }

    /// The service's whole log, stdout and stderr interleaved as written.
    pub fn logs(&self, service: &str) -> String {
        container_logs(&self.container_name(service))
    }
}

impl Stack {
    /// The shell command that removes this stack and its files.
    pub fn down_command(&self, root: &Path) -> String {
        format!(
            "cd {dir} && {compose} -p {project} -f {file} --project-directory {dir} down -v --remove-orphans && rm -rf {root}",
            dir = self.dir.display(),
            compose = compose_command().join(" "),
            project = self.project,
            file = self.compose_file.display(),
            root = root.display()
        )
    }

    /// IMMICH_GUARD_KEEP_STACK=1: start whatever the test stopped, keep the files, and say
    /// where the stack is and how to remove it (stderr past libtest's capture, and
    /// [`KEPT_LIST`]).
    fn keep(&mut self) {
        let Some(root) = self.root.take() else {
            return;
        };
        let root = root.keep();
        let down = self.down_command(&root);
        std::fs::write(
            root.join(KEPT_MARKER),
            format!("kept by IMMICH_GUARD_KEEP_STACK=1; remove with:\n{down}\n"),
        )
        .ok();
        // The test may have stopped services (or left the server crashed): bring it back up.
        let up = self.try_compose(&["up", "-d"]);
        let state = if up.status.success() {
            "running".to_string()
        } else {
            format!(
                "NOT running (compose up -d failed: {})",
                String::from_utf8_lossy(&up.stderr).trim()
            )
        };
        let text = format!(
            "immich-guard: kept stack {project} {state} (IMMICH_GUARD_KEEP_STACK=1)\n  compose dir: {dir}\n  remove it:   {down}\n",
            project = self.project,
            dir = self.dir.display(),
        );
        super::deps::write_stderr(&text);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(KEPT_LIST)
        {
            let _ = f.write_all(text.as_bytes());
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // For looking at a stack by hand after a test: keep it running, and its files.
        if std::env::var("IMMICH_GUARD_KEEP_STACK").as_deref() == Ok("1") {
            self.keep();
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
        // Whatever compose left (it failed, or a test made containers of its own): only
        // containers of this project that carry our label.
        let project = format!("label=com.docker.compose.project={}", self.project);
        let ours = format!("label={TEST_LABEL}=1");
        let left = lines(&docker(&[
            "ps", "-aq", "--filter", &project, "--filter", &ours,
        ]));
        if !left.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(left.iter().map(String::as_str));
            docker(&args);
            docker(&["network", "rm", &format!("{}_default", self.project)]);
        }
        if let Some(root) = self.root.take() {
            let path = root.path().to_path_buf();
            if root.close().is_err() {
                remove_tree(&path);
            }
        }
    }
}

/// initdb's arguments for [`Stack::up_hardened`].
pub const HARDENED_INITDB: &str =
    "--data-checksums --auth-local=scram-sha-256 --auth-host=scram-sha-256";

/// `.env` at `env` is `original` except its `IMMICH_VERSION` line, which names `version`:
/// a pin that kept every other line, comments included.
pub fn assert_env_pins(env: &Path, original: &str, version: &str) {
    let now = std::fs::read_to_string(env).unwrap();
    assert!(now.ends_with('\n'), "{now:?}");
    let (a, b): (Vec<&str>, Vec<&str>) = (original.lines().collect(), now.lines().collect());
    assert_eq!(a.len(), b.len(), "line count changed:\n{now}");
    for (n, (was, is)) in a.iter().zip(&b).enumerate() {
        if was.starts_with("IMMICH_VERSION=") {
            assert_eq!(*is, format!("IMMICH_VERSION={version}"), "line {}", n + 1);
        } else {
            assert_eq!(was, is, "line {} changed", n + 1);
        }
    }
    // Comments are among the lines kept: say so explicitly.
    assert!(now.contains("# The Immich version to use. You can pin this"));
}

/// `docker logs` of a container, both streams through one pipe so lines keep their order.
pub fn container_logs(container: &str) -> String {
    let Ok((mut reader, writer)) = std::io::pipe() else {
        return String::new();
    };
    let Ok(writer2) = writer.try_clone() else {
        return String::new();
    };
    let child = Command::new("docker")
        .args(["logs", container])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .spawn();
    let Ok(mut child) = child else {
        return String::new();
    };
    let mut text = Vec::new();
    let _ = reader.read_to_end(&mut text);
    let _ = child.wait();
    String::from_utf8_lossy(&text).into_owned()
}

/// One query through `docker exec … psql`, unaligned, tuples only, stopping at the first error.
/// The password (for a database that asks for one on its socket too) goes to the exec as
/// `PGPASSWORD` through the docker CLI's own environment (`-e NAME` without a value), never
/// on a command line.
/// The stack's database, to query from a thread of its own.
#[derive(Clone, Debug)]
pub struct Psql {
    container: String,
    user: String,
    password: String,
    db: String,
}

impl Psql {
    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        psql(&self.container, &self.user, &self.password, &self.db, sql)
    }
}

fn psql(
    container: &str,
    user: &str,
    password: &str,
    db: &str,
    sql: &str,
) -> Result<String, String> {
    let out = Command::new("docker")
        .env("PGPASSWORD", password)
        .args(["exec", "-e", "PGPASSWORD", container, "psql", "-X"])
        .args(["-v", "ON_ERROR_STOP=1", "-U", user, "-d", db, "-tAc", sql])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker exec psql: {e}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn inspect(what: &str, format: &str) -> Option<String> {
    let out = docker(&["inspect", "--type", "container", "--format", format, what]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A minimal HTTP/1.1 GET with `Connection: close`: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write to {addr}: {e}"))?;
    let mut raw = Vec::new();
    // A reset after the answer arrived still leaves the answer.
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer from {addr}{path}: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line from {addr}: {head:?}"))?;
    Ok((status, body.to_string()))
}

/// `{"major":1,"minor":119,"patch":0}` → `v1.119.0`.
pub fn parse_version_json(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(format!(
        "v{}.{}.{}",
        v.get("major")?.as_u64()?,
        v.get("minor")?.as_u64()?,
        v.get("patch")?.as_u64()?
    ))
}

/// A YAML double-quoted scalar with compose's `$` interpolation escaped.
fn yaml_str(s: &str) -> String {
    serde_json::Value::String(s.replace('$', "$$")).to_string()
}

/// Shaped like Immich's official docker-compose.yml (services, container-name suffixes,
/// `${…}` variables, mounts, `env_file`, `depends_on`, `restart`), plus the host's /usr, /lib
/// and /lib64 read-only for shared libraries, no published ports, owner labels, and the
/// stand-in's knobs in the server's `environment:`.
pub fn compose_yaml(project: &str, spec: &StackSpec) -> String {
    let libs = "      - /usr:/usr:ro\n      - /lib:/lib:ro\n      - /lib64:/lib64:ro\n";
    let owner = std::process::id();
    let labels =
        format!("    labels:\n      {TEST_LABEL}: \"1\"\n      {OWNER_LABEL}: \"{owner}\"\n");
    let name = |suffix: &str| {
        if spec.compose_names {
            String::new()
        } else {
            format!("    container_name: {project}_{suffix}\n")
        }
    };
    let (server_name, ml_name, redis_name, db_name) = (
        name("immich_server"),
        name("immich_machine_learning"),
        name("immich_redis"),
        name("immich_postgres"),
    );
    let restart = match spec.restart.trim_matches('"') {
        // YAML 1.1 reads a bare no as false
        "no" => "\"no\"".to_string(),
        other => other.to_string(),
    };
    let mut server_env = vec![
        (
            "STANDIN_BOOT_DELAY_MS".to_string(),
            spec.boot_delay_ms.to_string(),
        ),
        (
            "STANDIN_SEED_ASSETS".to_string(),
            spec.seed_assets.to_string(),
        ),
        (
            "STANDIN_ASSETS_PER_BOOT".to_string(),
            spec.assets_per_boot.to_string(),
        ),
        // The upload is mounted at /data for every version, as an admin who moved to /data
        // before v1.137 had to say (else the upgrade-path table holds a pre-1.137 server).
        ("IMMICH_MEDIA_LOCATION".to_string(), "/data".to_string()),
    ];
    server_env.extend(spec.server_env.iter().cloned());
    let server_env: String = server_env
        .iter()
        .map(|(k, v)| format!("      {k}: {}\n", yaml_str(v)))
        .collect();
    let user = spec
        .server_user
        .as_ref()
        .map(|u| format!("    user: {}\n", yaml_str(u)))
        .unwrap_or_default();
    let localtime = if Path::new("/etc/localtime").exists() {
        "      - /etc/localtime:/etc/localtime:ro\n"
    } else {
        ""
    };
    let server_repo = images::server_repo();
    let ml_repo = images::ml_repo();
    let redis = images::redis_image();
    let postgres = images::postgres_image();
    format!(
        r#"#
# Shaped like Immich's official docker-compose.yml, written by the immich-guard test harness.
# The project name comes from `-p {project}` (compose v1 has no top-level `name:`).
#

services:
  immich-server:
{server_name}    image: {server_repo}:${{IMMICH_VERSION:-release}}
{user}    volumes:
      # Do not edit the next line. If you want to change the media storage location on your system, edit the value of UPLOAD_LOCATION in the .env file
      - ${{UPLOAD_LOCATION}}:/data
{localtime}{libs}    env_file:
      - .env
    environment:
{server_env}    depends_on:
      - redis
      - database
    restart: {restart}
{labels}
  immich-machine-learning:
{ml_name}    image: {ml_repo}:${{IMMICH_VERSION:-release}}
    volumes:
      - model-cache:/cache
{libs}    env_file:
      - .env
    restart: {restart}
{labels}
  redis:
{redis_name}    image: {redis}
    volumes:
{libs}    restart: {restart}
{labels}
  database:
{db_name}    image: {postgres}
    environment:
      POSTGRES_PASSWORD: ${{DB_PASSWORD}}
      POSTGRES_USER: ${{DB_USERNAME}}
      POSTGRES_DB: ${{DB_DATABASE_NAME}}
      POSTGRES_INITDB_ARGS: '--data-checksums'
    volumes:
      # Do not edit the next line. If you want to change the database storage location on your system, edit the value of DB_DATA_LOCATION in the .env file
      - ${{DB_DATA_LOCATION}}:/var/lib/postgresql/data
{libs}    shm_size: 128mb
    restart: {restart}
{labels}
volumes:
  model-cache:
    labels:
      {TEST_LABEL}: "1"
      {OWNER_LABEL}: "{owner}"

networks:
  default:
    labels:
      {TEST_LABEL}: "1"
      {OWNER_LABEL}: "{owner}"
"#
    )
}

/// A lone, empty PostgreSQL container (same image as the stacks, no volume), removed on drop.
pub struct ScratchPostgres {
    pub name: String,
}

impl ScratchPostgres {
    pub fn start() -> ScratchPostgres {
        remove_leftovers();
        images::ensure_images(&[]);
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "igt{}scratch{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            random_hex(2)
        );
        let owner = format!("{OWNER_LABEL}={}", std::process::id());
        let ours = format!("{TEST_LABEL}=1");
        let out = docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            &ours,
            "--label",
            &owner,
            "-e",
            "POSTGRES_PASSWORD=scratch",
            "-v",
            "/usr:/usr:ro",
            "-v",
            "/lib:/lib:ro",
            "-v",
            "/lib64:/lib64:ro",
            &images::postgres_image(),
        ]);
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
                "scratch postgres not ready; log:\n{}",
                container_logs(&db.name)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        db
    }

    fn ready(&self) -> bool {
        docker(&["exec", &self.name, "pg_isready", "-q", "-U", "postgres"])
            .status
            .success()
    }

    /// Feeds `sql` to psql connected to `postgres` (as Immich's restore docs do).
    pub fn restore(&self, sql: &[u8]) -> Output {
        let mut child = Command::new("docker")
            .args([
                "exec", "-i", &self.name, "psql", "-X", "-q", "-U", "postgres", "-d", "postgres",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
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
        psql(&self.name, "postgres", "scratch", db, sql)
            .unwrap_or_else(|e| panic!("psql {sql:?} in {}: {e}", self.name))
    }

    pub fn logs(&self) -> String {
        container_logs(&self.name)
    }

    /// Its address on Docker's network (PostgreSQL listens on 5432, password `scratch`).
    pub fn ip(&self) -> String {
        inspect(
            &self.name,
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        )
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| panic!("{} has no address", self.name))
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        docker(&["rm", "-f", "-v", &self.name]);
    }
}

/// Runs docker; panics with its stderr unless it succeeds. Returns trimmed stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
