//! The compose model: what `.env` and the compose files say about Immich (the version, the
//! server and machine-learning images), interpolated and merged like compose does. It only
//! reads; the file watcher that calls it on every change is `compose::watch`.
//!
//! The daemon has not got the admin's shell environment, so `${VAR}` is filled from `.env` only;
//! compose would let a variable exported in the admin's shell override `.env`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::image_ref::{ImageRef, ML_IMAGE, SERVER_IMAGE};

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// YAML errors carry "at line L column C" in `message`.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: service {service}: image: {message}")]
    Interpolate {
        path: PathBuf,
        service: String,
        message: String,
    },
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// What the compose config says about Immich, and the files it was read from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ComposeView {
    /// `.env` `IMMICH_VERSION`; None when unset or empty (compose then uses the image default).
    pub immich_version: Option<String>,
    /// `.env` is not there: `immich_version` is None because there is no file, not because the
    /// admin unset it (docs/operations.md "A missing .env").
    pub env_missing: bool,
    /// The server service's image, interpolated.
    pub server_image: Option<String>,
    pub ml_image: Option<String>,
    /// Each file read, with the hex SHA-256 of its content, so a view changes when any byte does.
    pub files: Vec<(PathBuf, String)>,
    /// What the upgrade-path check reads (crate::paths); boxed, the view travels in events.
    pub paths: Box<PathFacts>,
}

/// What the compose config says that Immich's upgrade-path table reads (crate::paths).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PathFacts {
    /// The variables a row of the table names, from `.env` then the machine learning's and
    /// the server's `environment:` (none is a secret; nothing else of `.env` is kept).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The database service's image, interpolated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_image: Option<String>,
    /// Where the server service mounts the upload location in the container (`/data` or
    /// `/usr/src/app/upload`), when it mounts one of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_mount: Option<String>,
}

/// The container paths Immich has mounted the upload location at (crate::paths reads which).
const UPLOAD_MOUNTS: [&str; 2] = ["/data", "/usr/src/app/upload"];

/// One service as the merged files describe it, for what the view keeps.
#[derive(Default)]
struct ServiceView {
    image: Option<String>,
    env: BTreeMap<String, String>,
    upload_mount: Option<String>,
}

/// Reads `.env` (missing is fine) and the compose files, later files overriding a service's
/// image as compose merges them. Relative paths are taken from `dir`.
pub fn read_view(
    dir: &Path,
    compose_files: &[PathBuf],
    env_file: Option<&Path>,
) -> Result<ComposeView, ComposeError> {
    let env_path = dir.join(env_file.unwrap_or(Path::new(".env")));
    let mut files = Vec::new();
    let mut env_missing = false;
    let env = match std::fs::read(&env_path) {
        Ok(bytes) => {
            // Parsed from the bytes we hash, so the hash and the values always agree.
            let env = parse_env(&env_path, &bytes)?;
            files.push((env_path, sha256_hex(&bytes)));
            env
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            env_missing = true;
            HashMap::new()
        }
        Err(source) => {
            return Err(ComposeError::Read {
                path: env_path,
                source,
            });
        }
    };

    // Services in order of first appearance; a later file replaces what it sets.
    let mut services: Vec<(String, ServiceView)> = Vec::new();
    for file in compose_files {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|source| ComposeError::Read {
            path: path.clone(),
            source,
        })?;
        files.push((path.clone(), sha256_hex(&bytes)));
        let parse_error = |e: yaml_serde::Error| ComposeError::Parse {
            path: path.clone(),
            message: e.to_string(),
        };
        let mut doc: yaml_serde::Value = yaml_serde::from_slice(&bytes).map_err(parse_error)?;
        // Admins share settings between services with anchors and `<<: *x`.
        doc.apply_merge().map_err(parse_error)?;
        let Some(file_services) = doc.get("services").and_then(|s| s.as_mapping()) else {
            continue;
        };
        for (name, service) in file_services {
            let Some(name) = name.as_str() else { continue };
            let at = match services.iter().position(|(n, _)| n == name) {
                Some(i) => i,
                None => {
                    services.push((name.to_string(), ServiceView::default()));
                    services.len() - 1
                }
            };
            let view = &mut services[at].1;
            if let Some(image) = service.get("image").and_then(|i| i.as_str()) {
                let image =
                    interpolate(image, &env).map_err(|message| ComposeError::Interpolate {
                        path: path.clone(),
                        service: name.to_string(),
                        message,
                    })?;
                view.image = Some(image);
            }
            view.env.extend(watched_environment(service, &env));
            if let Some(mount) = upload_mount(service, &env) {
                view.upload_mount = Some(mount);
            }
        }
    }

    let find = |name: &str| {
        services
            .iter()
            .find(|(_, s)| {
                s.image
                    .as_deref()
                    .is_some_and(|i| ImageRef::parse(i).is_of(name))
            })
            .map(|(_, s)| s)
    };
    let (server, ml) = (find(SERVER_IMAGE), find(ML_IMAGE));
    // `.env` first (both Immich services read it), then what `environment:` sets over it.
    let mut path_env: BTreeMap<String, String> = env
        .iter()
        .filter(|(k, _)| crate::paths::watched(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for s in ml.into_iter().chain(server) {
        path_env.extend(s.env.clone());
    }
    let database = services.iter().find(|(name, s)| {
        name == "database"
            || s.image.as_deref().is_some_and(|i| {
                let name = ImageRef::parse(i).name().to_ascii_lowercase();
                name.contains("postgres") || name.contains("pgvecto")
            })
    });
    Ok(ComposeView {
        immich_version: env.get("IMMICH_VERSION").filter(|v| !v.is_empty()).cloned(),
        env_missing,
        server_image: server.and_then(|s| s.image.clone()),
        ml_image: ml.and_then(|s| s.image.clone()),
        files,
        paths: Box::new(PathFacts {
            env: path_env,
            database_image: database.and_then(|(_, s)| s.image.clone()),
            upload_mount: server.and_then(|s| s.upload_mount.clone()),
        }),
    })
}

/// The watched variables (crate::paths::watched) a service's `environment:` sets, in the
/// map or the list form, interpolated (a value compose would refuse is kept as written).
fn watched_environment(
    service: &yaml_serde::Value,
    env: &HashMap<String, String>,
) -> Vec<(String, String)> {
    let value = |v: &str| interpolate(v, env).unwrap_or_else(|_| v.to_string());
    let pairs: Vec<(String, String)> = match service.get("environment") {
        Some(yaml_serde::Value::Mapping(m)) => m
            .iter()
            .filter_map(|(k, v)| {
                let v = match v {
                    yaml_serde::Value::String(s) => s.clone(),
                    yaml_serde::Value::Number(n) => n.to_string(),
                    yaml_serde::Value::Bool(b) => b.to_string(),
                    _ => String::new(),
                };
                Some((k.as_str()?.to_string(), v))
            })
            .collect(),
        Some(yaml_serde::Value::Sequence(items)) => items
            .iter()
            .filter_map(|i| i.as_str())
            .map(|i| match i.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (i.to_string(), env.get(i).cloned().unwrap_or_default()),
            })
            .collect(),
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter(|(k, _)| crate::paths::watched(k))
        .map(|(k, v)| (k, value(&v)))
        .collect()
}

/// The container path among `UPLOAD_MOUNTS` a service mounts something at (short
/// `src:target[:mode]`, interpolated first, or long `target:` syntax).
fn upload_mount(service: &yaml_serde::Value, env: &HashMap<String, String>) -> Option<String> {
    let volumes = service.get("volumes")?.as_sequence()?;
    volumes.iter().find_map(|v| {
        let target = match v {
            yaml_serde::Value::String(s) => {
                interpolate(s, env).ok()?.split(':').nth(1)?.to_string()
            }
            other => other.get("target")?.as_str()?.to_string(),
        };
        let target = target.trim_end_matches('/');
        UPLOAD_MOUNTS.contains(&target).then(|| target.to_string())
    })
}

pub(crate) fn parse_env(
    path: &Path,
    bytes: &[u8],
) -> Result<HashMap<String, String>, ComposeError> {
    dotenvy::from_read_iter(bytes)
        .map(|item| {
            item.map_err(|e| ComposeError::Parse {
                path: path.to_path_buf(),
                message: crate::redact::env_error(&e),
            })
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compose's interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
/// `${VAR:?message}`, `${VAR?message}`, `${VAR:+replacement}`, `${VAR+replacement}`, with
/// defaults that may themselves hold `${…}`. Errors are what compose would refuse to run with.
pub(crate) fn interpolate(text: &str, env: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = closing_brace(r).ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
            out.push_str(&braced(&r[..end], env)?);
            rest = &r[end + 1..];
        } else {
            let n = name_len(after);
            if n == 0 {
                return Err(format!(
                    "invalid interpolation in {text:?}: write $$ for a literal $"
                ));
            }
            out.push_str(env.get(&after[..n]).map_or("", String::as_str));
            rest = &after[n..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The inside of `${…}`.
fn braced(expr: &str, env: &HashMap<String, String>) -> Result<String, String> {
    let n = name_len(expr);
    if n == 0 {
        return Err(format!("invalid interpolation ${{{expr}}}"));
    }
    let (name, rest) = expr.split_at(n);
    let (op, word) = if rest.is_empty() {
        ("", "")
    } else {
        [":-", ":?", ":+", "-", "?", "+"]
            .into_iter()
            .find_map(|op| rest.strip_prefix(op).map(|word| (op, word)))
            .ok_or_else(|| format!("invalid interpolation ${{{expr}}}"))?
    };
    let value = env.get(name);
    let set_non_empty = value.filter(|v| !v.is_empty());
    // The word after the operator is only interpolated when it is used, as in compose.
    let used = || interpolate(word, env);
    let missing = || {
        Err(if word.is_empty() {
            format!("required variable {name} is missing a value")
        } else {
            format!("required variable {name} is missing a value: {word}")
        })
    };
    match op {
        ":-" => set_non_empty.map_or_else(used, |v| Ok(v.clone())),
        "-" => value.map_or_else(used, |v| Ok(v.clone())),
        ":?" => set_non_empty.map_or_else(missing, |v| Ok(v.clone())),
        "?" => value.map_or_else(missing, |v| Ok(v.clone())),
        ":+" => set_non_empty.map_or_else(|| Ok(String::new()), |_| used()),
        "+" => value.map_or_else(|| Ok(String::new()), |_| used()),
        _ => Ok(value.cloned().unwrap_or_default()),
    }
}

/// Length of a leading variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn name_len(s: &str) -> usize {
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, c)) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return 0,
    }
    chars
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
        .map_or(s.len(), |(i, _)| i)
}

/// Index of the `}` closing a `${` whose inside starts `s`, allowing nested `${…}`.
fn closing_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Immich-shaped compose dirs for the model's and the watcher's tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::fs;
    use std::path::Path;

    /// Immich's own docker-compose.yml (v1.1xx), trimmed of comments.
    pub(crate) const COMPOSE: &str = r#"
name: immich

services:
  immich-server:
    container_name: immich_server
    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}
    # extends:
    #   file: hwaccel.transcoding.yml
    #   service: cpu
    volumes:
      - ${UPLOAD_LOCATION}:/usr/src/app/upload
      - /etc/localtime:/etc/localtime:ro
    env_file:
      - .env
    ports:
      - '2283:2283'
    depends_on:
      - redis
      - database
    restart: always
    healthcheck:
      disable: false

  immich-machine-learning:
    container_name: immich_machine_learning
    image: ghcr.io/immich-app/immich-machine-learning:${IMMICH_VERSION:-release}
    volumes:
      - model-cache:/cache
    env_file:
      - .env
    restart: always
    healthcheck:
      disable: false

  redis:
    container_name: immich_redis
    image: docker.io/valkey/valkey:8-bookworm@sha256:ff21bc0f8194dc9c105b769aeabf9585fea6a8ed649c0781caeac5cb3c247884
    healthcheck:
      test: redis-cli ping || exit 1
    restart: always

  database:
    container_name: immich_postgres
    image: ghcr.io/immich-app/postgres:14-vectorchord0.4.3-pgvectors0.2.0
    environment:
      POSTGRES_PASSWORD: ${DB_PASSWORD}
      POSTGRES_USER: ${DB_USERNAME}
      POSTGRES_DB: ${DB_DATABASE_NAME}
      POSTGRES_INITDB_ARGS: '--data-checksums'
    volumes:
      - ${DB_DATA_LOCATION}:/var/lib/postgresql/data
    restart: always

volumes:
  model-cache:
"#;

    pub(crate) fn stack(version: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("immich");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("docker-compose.yml"), COMPOSE).unwrap();
        write_env(&dir, version);
        root
    }

    pub(crate) fn env_text(version: &str) -> String {
        format!(
            "UPLOAD_LOCATION=./library\nDB_DATA_LOCATION=./postgres\nIMMICH_VERSION={version}\n\
             DB_PASSWORD=postgres\nDB_USERNAME=postgres\nDB_DATABASE_NAME=immich\n"
        )
    }

    pub(crate) fn write_env(dir: &Path, version: &str) {
        fs::write(dir.join(".env"), env_text(version)).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use std::fs;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn interpolation_follows_compose() {
        let env = env(&[("A", "1"), ("EMPTY", "")]);
        let i = |t: &str| interpolate(t, &env);
        assert_eq!(i("x:${A}").unwrap(), "x:1");
        assert_eq!(i("x:$A/y").unwrap(), "x:1/y");
        assert_eq!(i("x:${B}$B").unwrap(), "x:");
        assert_eq!(i("${B:-dflt}").unwrap(), "dflt");
        assert_eq!(i("${EMPTY:-dflt}").unwrap(), "dflt");
        assert_eq!(i("${A:-dflt}").unwrap(), "1");
        assert_eq!(i("${B-dflt}").unwrap(), "dflt");
        assert_eq!(i("${EMPTY-dflt}").unwrap(), "");
        assert_eq!(i("${B:-${A}-x}").unwrap(), "1-x");
        assert_eq!(
            i("${A:+set}|${EMPTY:+set}|${EMPTY+set}|${B+set}").unwrap(),
            "set||set|"
        );
        assert_eq!(i("${A:?must be set}").unwrap(), "1");
        assert_eq!(i("${EMPTY?must be set}").unwrap(), "");
    }

    #[test]
    fn dollar_dollar_is_a_literal_dollar() {
        let env = env(&[("A", "1")]);
        assert_eq!(interpolate("$$A costs $$5", &env).unwrap(), "$A costs $5");
        assert_eq!(interpolate("$${A}", &env).unwrap(), "${A}");
        assert_eq!(interpolate("$$$A", &env).unwrap(), "$1");
    }

    #[test]
    fn interpolation_refuses_what_compose_refuses() {
        let env = env(&[("EMPTY", "")]);
        let err = interpolate("${EMPTY:?set IMMICH_VERSION}", &env).unwrap_err();
        assert!(
            err.contains("EMPTY") && err.contains("set IMMICH_VERSION"),
            "{err}"
        );
        assert!(interpolate("${B?}", &env).is_err());
        assert!(interpolate("${A", &env).is_err());
        assert!(interpolate("cost: 5$", &env).is_err());
        assert!(interpolate("${A:x}", &env).is_err());
    }

    #[test]
    fn the_view_names_version_and_images() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        let view = read_view(&dir, &[PathBuf::from("docker-compose.yml")], None).unwrap();
        assert_eq!(view.immich_version.as_deref(), Some("v1.119.0"));
        assert_eq!(
            view.server_image.as_deref(),
            Some("ghcr.io/immich-app/immich-server:v1.119.0")
        );
        assert_eq!(
            view.ml_image.as_deref(),
            Some("ghcr.io/immich-app/immich-machine-learning:v1.119.0")
        );
        let names: Vec<_> = view.files.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(names, [dir.join(".env"), dir.join("docker-compose.yml")]);
    }

    #[test]
    fn the_view_keeps_what_the_upgrade_paths_read_and_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(".env"),
            "IMMICH_VERSION=v3.0.0\nDB_PASSWORD=hunter2\nDB_VECTOR_EXTENSION=pgvecto.rs\nMACHINE_LEARNING_PRELOAD__CLIP=ViT-B-32\nUPLOAD_LOCATION=./library\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("docker-compose.yml"),
            r#"
services:
  immich-server:
    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}
    volumes:
      - ${UPLOAD_LOCATION:-./x}:/usr/src/app/upload
    environment:
      - IMMICH_MACHINE_LEARNING_PING_TIMEOUT=2000
      - DB_PASSWORD
  immich-machine-learning:
    image: ghcr.io/immich-app/immich-machine-learning:${IMMICH_VERSION:-release}
    environment:
      DB_VECTOR_EXTENSION: vectorchord
  database:
    image: tensorchord/pgvecto-rs:pg14-v0.2.0
"#,
        )
        .unwrap();
        let view = read_view(dir.path(), &[PathBuf::from("docker-compose.yml")], None).unwrap();
        let env: Vec<(&str, &str)> = view
            .paths
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // The server's `environment:` wins over the machine learning's, which wins over .env.
        assert_eq!(
            env,
            [
                ("DB_VECTOR_EXTENSION", "vectorchord"),
                ("IMMICH_MACHINE_LEARNING_PING_TIMEOUT", "2000"),
                ("MACHINE_LEARNING_PRELOAD__CLIP", "ViT-B-32"),
            ]
        );
        assert_eq!(
            view.paths.database_image.as_deref(),
            Some("tensorchord/pgvecto-rs:pg14-v0.2.0")
        );
        assert_eq!(
            view.paths.upload_mount.as_deref(),
            Some("/usr/src/app/upload")
        );
        let json = serde_json::to_string(&view).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
    }

    #[test]
    fn without_env_the_images_fall_back_to_release() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        fs::remove_file(dir.join(".env")).unwrap();
        let view = read_view(&dir, &[dir.join("docker-compose.yml")], None).unwrap();
        assert_eq!(view.immich_version, None);
        assert!(view.env_missing);
        assert_eq!(
            view.server_image.as_deref(),
            Some("ghcr.io/immich-app/immich-server:release")
        );
        assert_eq!(view.files.len(), 1);
    }

    #[test]
    fn an_override_file_and_merge_keys_are_applied() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        fs::write(
            dir.join("docker-compose.override.yml"),
            "x-immich: &immich\n  image: altran1502/immich-server:${IMMICH_VERSION}-custom\n\
             services:\n  immich-server:\n    <<: *immich\n",
        )
        .unwrap();
        let files = [
            PathBuf::from("docker-compose.yml"),
            PathBuf::from("docker-compose.override.yml"),
        ];
        let view = read_view(&dir, &files, None).unwrap();
        assert_eq!(
            view.server_image.as_deref(),
            Some("altran1502/immich-server:v1.119.0-custom")
        );
    }

    #[test]
    fn a_bad_env_line_names_the_env_file() {
        let root = stack("v1.119.0");
        let dir = root.path().join("immich");
        fs::write(dir.join(".env"), "IMMICH_VERSION=v1\nnot a line\n").unwrap();
        let err = read_view(&dir, &[dir.join("docker-compose.yml")], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(".env"), "{err}");
    }
}
