//! Test images without a registry (README.md, the test section).
//!
//! Every image is one tarball we write ourselves (busybox-static with its applets, `/etc/passwd`
//! with root/postgres/nobody, and per image the stand-in binary or the PostgreSQL entrypoint)
//! fed to `docker import`. At run time containers mount the host's `/usr`, `/lib`, `/lib64`
//! read-only for shared libraries and the PostgreSQL 15 binaries, so nothing of ours lives under
//! `/usr` in an image; the stand-in sits at `/app/immich-standin`.
//!
//! Images are cached by content: the label `io.immich-guard.test.content` holds a SHA-256 of
//! every input (recipe version, busybox bytes, stand-in bytes, version, salt, image config), and
//! a build is skipped when the tag already carries it. Builders in parallel threads and
//! parallel test binaries serialize on a file lock.
//!
//! Every tag lives under a prefix of our own, `immich-guard-test/` by default
//! (`immich-guard-test/immich-server:v1.119.0`, `immich-guard-test/valkey:8`), so a test run
//! never retags an admin's `ghcr.io/immich-app/…` or `valkey/valkey` images; discovery finds
//! the stand-ins by their repository name ending in `immich-server`/`immich-machine-learning`.
//! `IMMICH_GUARD_TEST_IMAGE_PREFIX` (e.g. `igdev/`) replaces the prefix, so two checkouts with
//! different stand-in binaries can share one engine without retagging each other's images.
//! Every image carries [`TEST_LABEL`] and [`CONTENT_LABEL`]; the harness removes and prunes
//! only images with those labels.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use sha2::{Digest, Sha256};

pub const STANDIN_BIN: &str = env!("CARGO_BIN_EXE_immich-standin");
pub const BUSYBOX: &str = "/bin/busybox";
/// Unprefixed tags and repositories (see [`tag`] for the prefixed form used by the harness).
pub const BASE_IMAGE: &str = "base:latest";
pub const POSTGRES_IMAGE: &str = "postgres:15";
pub const REDIS_IMAGE: &str = "valkey:8";
pub const SERVER_REPO: &str = "immich-server";
pub const ML_REPO: &str = "immich-machine-learning";
/// The prefix of every tag unless `IMMICH_GUARD_TEST_IMAGE_PREFIX` says otherwise.
pub const DEFAULT_PREFIX: &str = "immich-guard-test/";
pub const CONTENT_LABEL: &str = "io.immich-guard.test.content";
/// On everything the harness creates (images, containers, networks, volumes): `1`.
pub const TEST_LABEL: &str = "io.immich-guard.test";
/// Bump when the recipe changes so cached images are rebuilt.
pub const RECIPE_VERSION: &str = "immich-guard-test-images/5";
pub const LOCK_PATH: &str = "/tmp/immich-guard-test-images.lock";
const PATH_ENV: &str = "PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/bin:/bin";

/// `IMMICH_GUARD_TEST_IMAGE_PREFIX`, else [`DEFAULT_PREFIX`].
pub fn prefix() -> String {
    std::env::var("IMMICH_GUARD_TEST_IMAGE_PREFIX")
        .ok()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PREFIX.to_string())
}

/// The tag the harness uses for `name` (one of the constants above, or `repo:tag`).
pub fn tag(name: &str) -> String {
    format!("{}{name}", prefix())
}

pub fn server_repo() -> String {
    tag(SERVER_REPO)
}

pub fn ml_repo() -> String {
    tag(ML_REPO)
}

pub fn postgres_image() -> String {
    tag(POSTGRES_IMAGE)
}

pub fn redis_image() -> String {
    tag(REDIS_IMAGE)
}

pub fn base_image() -> String {
    tag(BASE_IMAGE)
}

/// The official postgres image's entrypoint, emulated with busybox and the host's PostgreSQL 15.
pub const POSTGRES_ENTRYPOINT: &str = r#"#!/bin/sh
# Emulates the official postgres image's docker-entrypoint.sh with the host's PostgreSQL 15
# (mounted read-only under /usr): on an empty data dir initdb as the postgres user, trust on the
# Unix socket, scram-sha-256 over TCP, listen on all addresses, create $POSTGRES_DB; then exec
# postgres as the postgres user so it is PID 1 and gets the stop signal (STOPSIGNAL SIGINT).
set -eu
# busybox applets before the host's /usr/bin (whose su wants PAM)
export PATH="/bin:$PATH"
BIN=/usr/lib/postgresql/15/bin
export PGDATA="${PGDATA:-/var/lib/postgresql/data}"
POSTGRES_USER="${POSTGRES_USER:-postgres}"
POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"

as_postgres() {
    su -s /bin/sh postgres -c 'exec "$0" "$@"' -- "$@"
}

if [ "${1:-postgres}" != postgres ]; then
    exec "$@"
fi
[ "$#" -gt 0 ] && shift

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    chmod 2775 /var/run/postgresql
    chown postgres:postgres /var/run/postgresql
    # like the official image: hand anything not owned by postgres over to it
    find "$PGDATA" ! -user postgres -exec chown postgres:postgres {} +
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
        echo "Error: Database is uninitialized and superuser password is not specified." >&2
        echo "       You must specify POSTGRES_PASSWORD to a non-empty value for the" >&2
        echo "       superuser. For example, \"-e POSTGRES_PASSWORD=password\" on \"docker run\"." >&2
        exit 1
    fi
    pwfile="$(mktemp)"
    printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
    chown postgres "$pwfile"
    # shellcheck disable=SC2086
    as_postgres "$BIN/initdb" --username="$POSTGRES_USER" --pwfile="$pwfile" -E UTF8 --locale=C ${POSTGRES_INITDB_ARGS:-} -D "$PGDATA"
    rm -f "$pwfile"
    # initdb's own pg_hba.conf honours --auth-local (a hardened install asks for a password on
    # the socket too); the official image keeps it and adds the host line
    local_auth="$(printf '%s\n' " ${POSTGRES_INITDB_ARGS:-}" | sed -n 's/.* --auth\(-local\)\{0,1\}[= ]\([a-z0-9-]*\).*/\2/p')"
    printf 'local all all %s\nhost all all all %s\n' "${local_auth:-trust}" "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" > "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        echo "CREATE DATABASE \"$POSTGRES_DB\";" | as_postgres "$BIN/postgres" --single -D "$PGDATA" postgres > /dev/null
        echo "CREATE DATABASE"
    fi
    echo
    echo "PostgreSQL init process complete; ready for start up."
    echo
fi

exec su -s /bin/sh postgres -c 'exec "$0" "$@"' -- "$BIN/postgres" -D "$PGDATA" "$@"
"#;

/// One entry of an image's filesystem.
#[derive(Clone)]
enum Node {
    Dir { mode: u32, owner: u32 },
    File { content: Content, mode: u32 },
    Link { target: String },
}

/// A file's bytes, or a host file read only when an image is actually built.
#[derive(Clone)]
enum Content {
    Bytes(Vec<u8>),
    Host(&'static str),
}

impl Content {
    fn digest(&self) -> String {
        match self {
            Content::Bytes(b) => format!("{:x}", Sha256::digest(b)),
            Content::Host(path) => file_digest(path),
        }
    }

    fn bytes(&self) -> std::io::Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            Content::Bytes(b) => Ok(b.into()),
            Content::Host(path) => std::fs::read(path).map(Into::into),
        }
    }
}

/// What goes into one image besides the base tree.
struct Recipe {
    tag: String,
    files: Vec<(String, Node)>,
    /// `docker import --change` lines.
    changes: Vec<String>,
    /// Dockerfile lines applied on top with `docker build` (what `import --change` refuses,
    /// such as STOPSIGNAL).
    build_lines: Vec<String>,
    salt: String,
}

/// The images a set of versions needs; IDs are `sha256:…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Images {
    pub base: String,
    pub postgres: String,
    pub redis: String,
    /// (version, server image ID)
    pub servers: Vec<(String, String)>,
    /// (version, machine-learning image ID)
    pub ml: Vec<(String, String)>,
    /// Tags (re)built by this call; empty when everything came from the cache.
    pub built: Vec<String>,
}

impl Images {
    pub fn server(&self, version: &str) -> &str {
        &self
            .servers
            .iter()
            .find(|(v, _)| v == version)
            .unwrap_or_else(|| panic!("no server image for {version}"))
            .1
    }
}

/// SHA-256 of a file, computed once per process (the stand-in binary is tens of MB).
fn file_digest(path: &str) -> String {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(d) = cache.lock().unwrap().get(path) {
        return d.clone();
    }
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let digest = format!("{:x}", Sha256::digest(&bytes));
    cache
        .lock()
        .unwrap()
        .insert(path.to_string(), digest.clone());
    digest
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"))
}

/// The image ID behind `tag`, if it exists.
pub fn try_image_id(tag: &str) -> Option<String> {
    let out = docker(&["image", "inspect", "--format", "{{.Id}}", tag]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn image_id(tag: &str) -> String {
    try_image_id(tag).unwrap_or_else(|| panic!("no image {tag}"))
}

/// A label of an image, if the image exists and has it.
pub fn image_label(tag: &str, label: &str) -> Option<String> {
    let format = format!("{{{{index .Config.Labels \"{label}\"}}}}");
    let out = docker(&["image", "inspect", "--format", &format, tag]);
    let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !value.is_empty() && value != "<no value>").then_some(value)
}

/// Holds the cross-process image lock (an exclusive `flock` on [`LOCK_PATH`]).
pub struct ImageLock(std::fs::File);

pub fn lock_images() -> ImageLock {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .unwrap_or_else(|e| panic!("cannot open {LOCK_PATH}: {e}"));
    file.lock()
        .unwrap_or_else(|e| panic!("cannot lock {LOCK_PATH}: {e}"));
    ImageLock(file)
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn base_tree() -> Vec<(String, Node)> {
    let dir = |mode| Node::Dir { mode, owner: 0 };
    let file = |text: &str| Node::File {
        content: Content::Bytes(text.as_bytes().to_vec()),
        mode: 0o644,
    };
    let mut tree: Vec<(String, Node)> = vec![
        ("bin".into(), dir(0o755)),
        ("etc".into(), dir(0o755)),
        ("tmp".into(), dir(0o1777)),
        ("root".into(), dir(0o700)),
        ("app".into(), dir(0o755)),
        ("var".into(), dir(0o755)),
        ("var/run".into(), dir(0o755)),
        (
            "var/run/postgresql".into(),
            Node::Dir {
                mode: 0o2775,
                owner: 999,
            },
        ),
        ("var/lib".into(), dir(0o755)),
        (
            "var/lib/postgresql".into(),
            Node::Dir {
                mode: 0o755,
                owner: 999,
            },
        ),
        (
            "var/lib/postgresql/data".into(),
            Node::Dir {
                mode: 0o700,
                owner: 999,
            },
        ),
        (
            "bin/busybox".into(),
            Node::File {
                content: Content::Host(BUSYBOX),
                mode: 0o755,
            },
        ),
        (
            "etc/passwd".into(),
            file(
                "root:x:0:0:root:/root:/bin/sh\n\
                 postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/sh\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            ),
        ),
        (
            "etc/group".into(),
            file("root:x:0:\npostgres:x:999:\nnogroup:x:65534:\n"),
        ),
        (
            "etc/nsswitch.conf".into(),
            file("passwd: files\ngroup: files\nhosts: files dns\n"),
        ),
    ];
    let applets = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BUSYBOX} --list: {e}"));
    let mut seen = std::collections::HashSet::new();
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') || !seen.insert(applet)
        {
            continue;
        }
        tree.push((
            format!("bin/{applet}"),
            Node::Link {
                target: "busybox".into(),
            },
        ));
    }
    tree
}

/// Builds `recipe` unless the tag already carries the same content hash. Returns the image ID
/// and whether it was built now.
fn build(recipe: Recipe) -> (String, bool) {
    let mut h = Sha256::new();
    let mut feed = |s: &[u8]| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s);
    };
    feed(RECIPE_VERSION.as_bytes());
    feed(recipe.salt.as_bytes());
    let mut tree = base_tree();
    tree.extend(recipe.files);
    for (path, node) in &tree {
        feed(path.as_bytes());
        match node {
            Node::Dir { mode, owner } => feed(format!("dir {mode:o} {owner}").as_bytes()),
            Node::File { content, mode } => {
                feed(format!("file {mode:o}").as_bytes());
                feed(content.digest().as_bytes());
            }
            Node::Link { target } => feed(format!("link {target}").as_bytes()),
        }
    }
    for line in recipe.changes.iter().chain(&recipe.build_lines) {
        feed(line.as_bytes());
    }
    let content = format!("{:x}", h.finalize());

    let _lock = lock_images();
    let cached = image_label(&recipe.tag, CONTENT_LABEL);
    if cached.as_deref() == Some(content.as_str()) {
        return (image_id(&recipe.tag), false);
    }
    // Never move a tag of an image the harness did not build (a prefix set to `ghcr.io/…`).
    assert!(
        cached.is_some() || try_image_id(&recipe.tag).is_none(),
        "{} exists and is not a test image (no {CONTENT_LABEL} label); refusing to retag it. \
         Set IMMICH_GUARD_TEST_IMAGE_PREFIX to a prefix of its own (default {DEFAULT_PREFIX}).",
        recipe.tag
    );
    let started = Instant::now();
    let mut import = Command::new("docker");
    import.arg("import");
    let mut changes = recipe.changes.clone();
    changes.push(format!("LABEL {TEST_LABEL}=1"));
    changes.push(format!("LABEL {CONTENT_LABEL}={content}"));
    for c in &changes {
        import.arg("--change").arg(c);
    }
    import.arg("-");
    let direct = recipe.build_lines.is_empty();
    if direct {
        import.arg(&recipe.tag);
    }
    let mut child = import
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run docker import");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || write_tar(&mut stdin, &tree));
    let out = child.wait_with_output().expect("docker import");
    let written = writer.join().expect("tar writer");
    assert!(
        out.status.success(),
        "docker import for {} failed: {}",
        recipe.tag,
        String::from_utf8_lossy(&out.stderr)
    );
    written.unwrap_or_else(|e| panic!("writing the tar for {}: {e}", recipe.tag));
    let imported = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !direct {
        let dockerfile = format!("FROM {imported}\n{}\n", recipe.build_lines.join("\n"));
        build_dockerfile(&recipe.tag, &dockerfile);
    }
    let id = image_id(&recipe.tag);
    eprintln!(
        "built test image {} ({}) in {:.1?}",
        recipe.tag,
        &id[..19.min(id.len())],
        started.elapsed()
    );
    prune_stale_images();
    (id, true)
}

/// Removes our images (both labels) that lost their tag to a rebuild more than an hour ago
/// and that no container uses (Docker refuses to remove those). `image prune` without `-a`
/// only takes untagged images, so nobody's tag is touched.
/// `docker build -t tag -` of `dockerfile` (no context; the classic builder, which needs no
/// registry for a local base). Panics with docker's words when it fails.
pub fn build_dockerfile(tag: &str, dockerfile: &str) {
    let mut child = Command::new("docker")
        .args(["build", "-q", "-t", tag, "-"])
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run docker build");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker build for {tag} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn prune_stale_images() {
    let _ = Command::new("docker")
        .args(["image", "prune", "-f", "--filter"])
        .arg(format!("label={CONTENT_LABEL}"))
        .arg("--filter")
        .arg(format!("label={TEST_LABEL}=1"))
        .args(["--filter", "until=1h"])
        .output();
}

/// A ustar archive of `tree` (deterministic: fixed mtime, numeric owners).
fn write_tar(out: &mut impl Write, tree: &[(String, Node)]) -> std::io::Result<()> {
    const MTIME: u64 = 1_700_000_000;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
    for (path, node) in tree {
        let bytes = match node {
            Node::File { content, .. } => content.bytes()?,
            _ => Default::default(),
        };
        let (kind, mode, owner, size, link, name) = match node {
            Node::Dir { mode, owner } => (b'5', *mode, *owner, 0, "", format!("{path}/")),
            Node::File { mode, .. } => (b'0', *mode, 0, bytes.len() as u64, "", path.clone()),
            Node::Link { target } => (b'2', 0o777, 0, 0, target.as_str(), path.clone()),
        };
        let mut h = [0u8; 512];
        assert!(
            name.len() <= 100 && link.len() <= 100,
            "path too long: {name}"
        );
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], mode as u64);
        octal(&mut h[108..116], owner as u64);
        octal(&mut h[116..124], owner as u64);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], MTIME);
        h[148..156].copy_from_slice(b"        ");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        let sum = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(sum.as_bytes());
        w.write_all(&h)?;
        if let Node::File { .. } = node {
            w.write_all(&bytes)?;
            let pad = (512 - bytes.len() % 512) % 512;
            w.write_all(&vec![0u8; pad])?;
        }
    }
    w.write_all(&[0u8; 1024])?;
    w.flush()
}

fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    assert!(
        text.len() == digits,
        "value {value} too large for tar field"
    );
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
}

fn standin_files(version: &str) -> Vec<(String, Node)> {
    vec![
        (
            "app/immich-standin".into(),
            Node::File {
                content: Content::Host(STANDIN_BIN),
                mode: 0o755,
            },
        ),
        (
            "etc/immich-version".into(),
            Node::File {
                content: Content::Bytes(format!("{version}\n").into_bytes()),
                mode: 0o644,
            },
        ),
    ]
}

/// An image running the stand-in in `role`, `version` baked into `/etc/immich-version`.
fn standin_image(full_tag: &str, role: &str, version: &str, salt: &str) -> (String, bool) {
    let mut changes = vec![
        format!("ENV {PATH_ENV}"),
        "WORKDIR /app".to_string(),
        format!(r#"ENTRYPOINT ["/app/immich-standin", "{role}"]"#),
        format!("LABEL org.opencontainers.image.version={version}"),
        "LABEL org.opencontainers.image.source=https://github.com/immich-app/immich".to_string(),
    ];
    if !salt.is_empty() {
        changes.push(format!("LABEL io.immich-guard.test.salt={salt}"));
    }
    build(Recipe {
        tag: full_tag.to_string(),
        files: standin_files(version),
        changes,
        build_lines: Vec::new(),
        salt: salt.to_string(),
    })
}

/// The stand-in server for `version` under `<server repo>:<tag>` (`tag` e.g. `v1.119.0`,
/// `release`). A different `salt` gives a different image ID under the same tag, like a
/// re-pushed `release`. Returns the image ID.
pub fn build_server_image(version: &str, tag: &str, salt: &str) -> String {
    standin_image(&format!("{}:{tag}", server_repo()), "server", version, salt).0
}

/// The machine-learning stand-in, like [`build_server_image`].
pub fn build_ml_image(version: &str, tag: &str, salt: &str) -> String {
    standin_image(&format!("{}:{tag}", ml_repo()), "ml", version, salt).0
}

/// Whether `s` looks like an Immich version (`v1.2.3`), as opposed to a tag like `release`.
pub fn is_version(s: &str) -> bool {
    let core = s.strip_prefix('v').unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| p.parse::<u64>().is_ok())
}

/// Builds (or finds cached) the base, PostgreSQL and valkey stand-in images and, per version, the
/// server and machine-learning images tagged with that version.
pub fn ensure_images(versions: &[&str]) -> Images {
    let mut built = Vec::new();
    let mut note = |tag: String, (id, fresh): (String, bool)| {
        if fresh {
            built.push(tag);
        }
        id
    };
    let base = note(
        base_image(),
        build(Recipe {
            tag: base_image(),
            files: Vec::new(),
            changes: vec![format!("ENV {PATH_ENV}"), r#"CMD ["/bin/sh"]"#.into()],
            build_lines: Vec::new(),
            salt: String::new(),
        }),
    );
    let postgres = note(
        postgres_image(),
        build(Recipe {
            tag: postgres_image(),
            files: vec![(
                "docker-entrypoint.sh".into(),
                Node::File {
                    content: Content::Bytes(POSTGRES_ENTRYPOINT.as_bytes().to_vec()),
                    mode: 0o755,
                },
            )],
            changes: vec![
                format!("ENV {PATH_ENV}"),
                "ENV PGDATA=/var/lib/postgresql/data".into(),
                "ENV PG_MAJOR=15".into(),
                r#"ENTRYPOINT ["/docker-entrypoint.sh"]"#.into(),
                r#"CMD ["postgres"]"#.into(),
                "EXPOSE 5432".into(),
            ],
            // `docker import --change` refuses STOPSIGNAL; the official image has SIGINT.
            build_lines: vec!["STOPSIGNAL SIGINT".into()],
            salt: String::new(),
        }),
    );
    let redis = note(
        redis_image(),
        standin_image(&redis_image(), "redis", "8.0.0", ""),
    );
    let mut servers = Vec::new();
    let mut ml = Vec::new();
    for v in versions {
        assert!(
            is_version(v),
            "ensure_images wants versions like v1.119.0, got {v:?}; use build_server_image for other tags"
        );
        let server_tag = format!("{}:{v}", server_repo());
        let id = note(
            server_tag.clone(),
            standin_image(&server_tag, "server", v, ""),
        );
        servers.push((v.to_string(), id));
        let ml_tag = format!("{}:{v}", ml_repo());
        let id = note(ml_tag.clone(), standin_image(&ml_tag, "ml", v, ""));
        ml.push((v.to_string(), id));
    }
    Images {
        base,
        postgres,
        redis,
        servers,
        ml,
        built,
    }
}
