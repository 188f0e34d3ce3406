//! Test images without a registry (DESIGN.md §8): each image is a tarball we assemble from
//! local files (busybox-static, our stand-in binary, a shell entrypoint) and `docker import`.
//! At run time containers mount the host's /usr, /lib, /lib64 read-only for shared libraries
//! and the PostgreSQL 15 binaries, so nothing of ours lives under /usr in an image.
//! Images are cached by content: a label holds the hash of every input.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

pub const STANDIN_BIN: &str = env!("CARGO_BIN_EXE_immich-standin");
pub const POSTGRES_IMAGE: &str = "immich-guard-test/postgres:15";
pub const REDIS_IMAGE: &str = "docker.io/valkey/valkey:8-bookworm";
pub const SERVER_REPO: &str = "ghcr.io/immich-app/immich-server";
pub const ML_REPO: &str = "ghcr.io/immich-app/immich-machine-learning";
const CONTENT_LABEL: &str = "io.immich-guard.test.content";
/// Bump when the recipe changes so cached images are rebuilt.
const RECIPE: &str = "3";
const LOCK_PATH: &str = "/tmp/immich-guard-test-images.lock";

const POSTGRES_ENTRYPOINT: &str = r#"#!/bin/sh
# Emulates the official postgres image's entrypoint with the host's PostgreSQL 15.
set -e
export PGDATA="${PGDATA:-/var/lib/postgresql/data}"
BIN=/usr/lib/postgresql/15/bin
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "${POSTGRES_PASSWORD:-postgres}" > /tmp/pwfile
    chown postgres /tmp/pwfile
    su -s /bin/sh postgres -c "$BIN/initdb -D $PGDATA --username=${POSTGRES_USER:-postgres} --pwfile=/tmp/pwfile -E UTF8 --locale=C $POSTGRES_INITDB_ARGS"
    rm -f /tmp/pwfile
    printf 'local all all trust\nhost all all all scram-sha-256\n' > "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    DB="${POSTGRES_DB:-${POSTGRES_USER:-postgres}}"
    if [ "$DB" != postgres ]; then
        echo "CREATE DATABASE \"$DB\";" | su -s /bin/sh postgres -c "$BIN/postgres --single -D $PGDATA postgres" >/dev/null
    fi
    echo "PostgreSQL init process complete; ready for start up."
fi
exec su -s /bin/sh postgres -c "exec $BIN/postgres -D $PGDATA"
"#;

fn sha256_file(path: &str) -> String {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    format!("{:x}", Sha256::digest(bytes))
}

fn image_label(tag: &str) -> Option<String> {
    let out = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            &format!("{{{{index .Config.Labels \"{CONTENT_LABEL}\"}}}}"),
            tag,
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn image_id(tag: &str) -> String {
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", tag])
        .output()
        .unwrap();
    assert!(out.status.success(), "no image {tag}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// What goes into one image.
struct Recipe<'a> {
    tag: &'a str,
    files: Vec<(&'a str, Vec<u8>, u32)>,
    changes: Vec<String>,
    salt: &'a str,
}

/// Builds `recipe` unless the tag already carries the same content hash. Returns the image ID.
fn build(recipe: Recipe<'_>) -> String {
    let busybox = sha256_file("/bin/busybox");
    let mut hasher = Sha256::new();
    hasher.update(RECIPE);
    hasher.update(&busybox);
    hasher.update(recipe.salt);
    for (path, content, mode) in &recipe.files {
        hasher.update(path);
        hasher.update(content);
        hasher.update(mode.to_le_bytes());
    }
    for c in &recipe.changes {
        hasher.update(c);
    }
    let content = format!("{:x}", hasher.finalize());

    let lock = fs::File::create(LOCK_PATH).unwrap();
    lock.lock().unwrap();
    if image_label(recipe.tag).as_deref() == Some(content.as_str()) {
        return image_id(recipe.tag);
    }
    let stage = tempfile::tempdir().unwrap();
    let root = stage.path();
    for dir in [
        "bin",
        "etc",
        "tmp",
        "app",
        "var/run/postgresql",
        "var/lib/postgresql",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let applets = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" {
            symlink("busybox", root.join("bin").join(applet)).ok();
        }
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\npostgres:x:999:999:postgres:/var/lib/postgresql:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    fs::write(
        root.join("etc/group"),
        "root:x:0:\npostgres:x:999:\nnogroup:x:65534:\n",
    )
    .unwrap();
    for (path, bytes, mode) in &recipe.files {
        let p = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
    }
    let mut tar = Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut import = Command::new("docker");
    import.arg("import");
    let mut changes = recipe.changes.clone();
    changes.push(format!("LABEL {CONTENT_LABEL}={content}"));
    for c in &changes {
        import.arg("--change").arg(c);
    }
    let out = import
        .arg("-")
        .arg(recipe.tag)
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(
        tar.wait().unwrap().success(),
        "tar of {} failed",
        recipe.tag
    );
    assert!(
        out.status.success(),
        "docker import {} failed: {}",
        recipe.tag,
        String::from_utf8_lossy(&out.stderr)
    );
    image_id(recipe.tag)
}

fn standin_files(version: &str) -> Vec<(&'static str, Vec<u8>, u32)> {
    vec![
        ("/app/immich-standin", fs::read(STANDIN_BIN).unwrap(), 0o755),
        (
            "/etc/immich-version",
            format!("{version}\n").into_bytes(),
            0o644,
        ),
    ]
}

const BASE_ENV: &str = "ENV PATH=/usr/lib/postgresql/15/bin:/bin";

/// An image running the stand-in in `role`, with `version` baked in.
fn standin_image(tag: &str, role: &str, version: &str, labels: &[String], salt: &str) -> String {
    let mut changes = vec![
        BASE_ENV.to_string(),
        format!(r#"ENTRYPOINT ["/app/immich-standin", "{role}"]"#),
    ];
    changes.extend(labels.iter().map(|l| format!("LABEL {l}")));
    build(Recipe {
        tag,
        files: standin_files(version),
        changes,
        salt,
    })
}

/// The stand-in server for `version` under `tag` (e.g. `v1.119.0`, or `release`); a different
/// `salt` gives a different image ID under the same tag, like a re-pushed `latest`.
pub fn build_server_image(version: &str, tag: &str, salt: &str) -> String {
    standin_image(
        &format!("{SERVER_REPO}:{tag}"),
        "server",
        version,
        &[
            format!("org.opencontainers.image.version={version}"),
            "org.opencontainers.image.source=https://github.com/immich-app/immich".to_string(),
        ],
        salt,
    )
}

pub struct Images {
    pub postgres: String,
    pub redis: String,
    pub servers: Vec<(String, String)>,
}

/// Builds (or finds cached) every image a stack of these versions needs.
pub fn ensure_images(versions: &[&str]) -> Images {
    let postgres = build(Recipe {
        tag: POSTGRES_IMAGE,
        files: vec![(
            "/docker-entrypoint.sh",
            POSTGRES_ENTRYPOINT.as_bytes().to_vec(),
            0o755,
        )],
        changes: vec![
            BASE_ENV.to_string(),
            "ENV PGDATA=/var/lib/postgresql/data".to_string(),
            r#"ENTRYPOINT ["/docker-entrypoint.sh"]"#.to_string(),
        ],
        salt: "",
    });
    let redis = standin_image(REDIS_IMAGE, "redis", "redis", &[], "");
    let servers = versions
        .iter()
        .map(|v| {
            standin_image(&format!("{ML_REPO}:{v}"), "ml", v, &[], "");
            (v.to_string(), build_server_image(v, v, ""))
        })
        .collect();
    Images {
        postgres,
        redis,
        servers,
    }
}
