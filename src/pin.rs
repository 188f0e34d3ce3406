//! Pinning the Immich version the compose config will run: `IMMICH_VERSION` in `.env`, or the
//! server and machine-learning `image:` lines where a compose file names the tag directly.
//! Edits are made on the text, one value at a time (comments, order, quoting, line endings
//! and every other byte kept), never by re-serialising YAML or `.env`.
//!
//! [`plan`] says what would change; [`apply`] makes exactly those changes (refusing when a file
//! changed since it was planned), keeping the previous files. [`judge`] decides whether the
//! database may run the target version at all, from the sealed snapshots' migration lists.
//! `immich-guard pin` and the restore use all three (docs/recovery.md).

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::compose::model::{interpolate, parse_env};
use crate::discover::Stack;
use crate::durable::sync_dir;
use crate::image_ref::ImageRef;
use crate::snapshot::store::Meta;
use crate::version::same_version;

const KEY: &str = "IMMICH_VERSION";
/// Under the data dir: one JSON line per pin made, forced or not.
pub const LOG_FILE: &str = "pins.jsonl";
/// The files `docker compose` reads when given none, in its order of preference.
const COMPOSE_DEFAULTS: &[&str] = &[
    "compose.yaml",
    "compose.yml",
    "docker-compose.yaml",
    "docker-compose.yml",
];

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "version {0:?}: not an Immich release tag (like v1.119.0: letters, digits, '.', '-', '_')"
    )]
    BadVersion(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Check { path: PathBuf, message: String },
    #[error("the compose project's working dir is unknown (no compose labels on the containers)")]
    NoComposeDir,
    #[error("{path} changed since the pin was planned; run the command again")]
    Changed { path: PathBuf },
    #[error("{path}: {action}: {source}")]
    Write {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
}

/// One line of one file, before and after (`old` None: an appended line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineChange {
    /// 1-based.
    pub line: usize,
    pub old: Option<String>,
    pub new: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEdit {
    pub path: PathBuf,
    /// The file does not exist yet (a `.env` compose would read).
    pub created: bool,
    pub changes: Vec<LineChange>,
    #[serde(skip)]
    before: Vec<u8>,
    #[serde(skip)]
    after: Vec<u8>,
}

impl FileEdit {
    /// The whole new content.
    pub fn after(&self) -> &[u8] {
        &self.after
    }
}

/// What pinning would change. No edits: the config already names the version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub version: String,
    pub edits: Vec<FileEdit>,
    /// What the admin should know: an appended line, a dropped digest, what `.env` covers.
    pub notes: Vec<String>,
}

impl Plan {
    /// The changes as the admin reads them before they are made: per changed line its place,
    /// `- old` and `+ new`; then the notes.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for edit in &self.edits {
            for change in &edit.changes {
                let at = format!("{}:{}", edit.path.display(), change.line);
                match &change.old {
                    Some(old) => out.push(format!("  {at}\n    - {old}\n    + {}", change.new)),
                    None => out.push(format!("  {at} (appended)\n    + {}", change.new)),
                }
            }
        }
        out.extend(self.notes.iter().map(|n| format!("  note: {n}")));
        out
    }
}

/// `1.119.0` → `v1.119.0`; anything a Docker tag cannot hold is refused.
pub fn normalize_version(version: &str) -> Result<String, PinError> {
    let v = version.trim();
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !v.starts_with(['.', '-']);
    if !ok {
        return Err(PinError::BadVersion(version.to_string()));
    }
    Ok(if v.starts_with(|c: char| c.is_ascii_digit()) {
        format!("v{v}")
    } else {
        v.to_string()
    })
}

/// [`plan`] for a discovered stack.
pub fn plan_for(stack: &Stack, version: &str) -> Result<Plan, PinError> {
    let dir = stack.compose_dir.as_deref().ok_or(PinError::NoComposeDir)?;
    plan(
        dir,
        &stack.compose_files,
        stack.env_file.as_deref(),
        version,
    )
}

/// What pinning `version` changes in the compose project at `dir` (compose files and env file
/// relative to it unless absolute; `.env` when no env file is given).
pub fn plan(
    dir: &Path,
    compose_files: &[PathBuf],
    env_file: Option<&Path>,
    version: &str,
) -> Result<Plan, PinError> {
    let version = normalize_version(version)?;
    let env_path = dir.join(env_file.unwrap_or(Path::new(".env")));
    let env_before = match std::fs::read(&env_path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(PinError::Read {
                path: env_path,
                source,
            });
        }
    };
    let env_text = text_of(&env_path, env_before.as_deref().unwrap_or_default())?;
    let env = parse_env(&env_path, env_text.as_bytes()).map_err(|e| PinError::Check {
        path: env_path.clone(),
        message: e.to_string(),
    })?;

    let mut edits = Vec::new();
    let mut notes = Vec::new();
    let mut env_used = false;
    let mut images_seen = 0;
    let mut composes = Vec::new();
    // No config files known (labels missing): the file compose itself would pick.
    let defaults: Vec<PathBuf> = COMPOSE_DEFAULTS
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .take(1)
        .collect();
    let compose_files = if compose_files.is_empty() {
        &defaults[..]
    } else {
        compose_files
    };
    for file in compose_files {
        let path = dir.join(file);
        let before = std::fs::read(&path).map_err(|source| PinError::Read {
            path: path.clone(),
            source,
        })?;
        let text = text_of(&path, &before)?;
        let edit = edit_compose(&path, &text, &env, &version)?;
        env_used |= edit.uses_env;
        images_seen += edit.images;
        notes.extend(edit.notes);
        composes.push((path.clone(), edit.text.clone()));
        if !edit.changes.is_empty() {
            edits.push(FileEdit {
                path,
                created: false,
                changes: edit.changes,
                before,
                after: edit.text.into_bytes(),
            });
        }
    }
    if images_seen == 0 {
        return Err(PinError::Check {
            path: dir.to_path_buf(),
            message: format!(
                "no immich-server or immich-machine-learning image in {}: nothing to pin",
                compose_files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }

    // The env file is edited when the images read it, and also when it names a version the
    // images do not use (so `.env` never says one version while compose runs another).
    let env_edit = edit_env(&env_text, &version, env_used);
    if env_edit.appended {
        notes.push(format!(
            "{} has no {KEY} line; appended {KEY}={version} at its end",
            env_path.display()
        ));
    }
    if env_used {
        notes.push(format!(
            "the images take their tag from {KEY} in {}: the .env edit pins them",
            env_path.display()
        ));
    }
    let new_env_text = env_edit.text;
    if !env_edit.changes.is_empty() {
        edits.push(FileEdit {
            path: env_path.clone(),
            created: env_before.is_none(),
            changes: env_edit.changes,
            before: env_before.unwrap_or_default(),
            after: new_env_text.clone().into_bytes(),
        });
    }
    check(&env_path, &new_env_text, &composes, &version)?;
    Ok(Plan {
        version,
        edits,
        notes,
    })
}

fn text_of(path: &Path, bytes: &[u8]) -> Result<String, PinError> {
    String::from_utf8(bytes.to_vec()).map_err(|e| PinError::Check {
        path: path.to_path_buf(),
        message: format!("not UTF-8 text ({e})"),
    })
}

/// The lines of `text` with their endings: (body, ending).
fn lines_of(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split_inclusive('\n').map(|l| {
        let body = l.strip_suffix('\n').unwrap_or(l);
        let body = body.strip_suffix('\r').unwrap_or(body);
        (body, &l[body.len()..])
    })
}

/// Where a value starts and ends in a line (byte offsets, quotes excluded).
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// The value after `at` in `line`: quoted (`"…"`, `'…'`, quotes excluded) or plain (up to an
/// inline ` #` comment, trailing blanks excluded). None: an unclosed quote.
fn value_span(line: &str, at: usize) -> Option<Span> {
    let rest = &line[at..];
    let lead = rest.len() - rest.trim_start().len();
    let start = at + lead;
    let rest = &line[start..];
    match rest.chars().next() {
        Some(q @ ('"' | '\'')) => {
            let mut escaped = false;
            for (i, c) in rest.char_indices().skip(1) {
                match c {
                    '\\' if q == '"' && !escaped => escaped = true,
                    c if c == q && !escaped => {
                        return Some(Span {
                            start: start + 1,
                            end: start + i,
                        });
                    }
                    _ => escaped = false,
                }
            }
            None
        }
        _ => {
            let comment = rest
                .char_indices()
                .find(|&(i, c)| c == '#' && (i == 0 || rest[..i].ends_with([' ', '\t'])))
                .map_or(rest.len(), |(i, _)| i);
            let value = rest[..comment].trim_end();
            Some(Span {
                start,
                end: start + value.len(),
            })
        }
    }
}

struct EnvEdit {
    text: String,
    changes: Vec<LineChange>,
    appended: bool,
}

/// `IMMICH_VERSION=<version>` in `.env` text: every assignment's value replaced in place
/// (compose reads the last; all agree afterwards), or a line appended when there is none and
/// `append` is set.
fn edit_env(text: &str, version: &str, append: bool) -> EnvEdit {
    let mut out = String::with_capacity(text.len() + 32);
    let mut changes = Vec::new();
    let mut found = false;
    for (n, (body, ending)) in lines_of(text).enumerate() {
        match env_value(body) {
            Some(span) => {
                found = true;
                if &body[span.start..span.end] != version {
                    let new = format!("{}{version}{}", &body[..span.start], &body[span.end..]);
                    changes.push(LineChange {
                        line: n + 1,
                        old: Some(body.to_string()),
                        new: new.clone(),
                    });
                    out.push_str(&new);
                } else {
                    out.push_str(body);
                }
            }
            None => out.push_str(body),
        }
        out.push_str(ending);
    }
    let appended = !found && append;
    if appended {
        let eol = if text.contains("\r\n") { "\r\n" } else { "\n" };
        if !out.is_empty() && !out.ends_with('\n') {
            out.push_str(eol);
        }
        let new = format!("{KEY}={version}");
        changes.push(LineChange {
            line: out.matches('\n').count() + 1,
            old: None,
            new: new.clone(),
        });
        out.push_str(&new);
        out.push_str(eol);
    }
    EnvEdit {
        text: out,
        changes,
        appended,
    }
}

/// The value span of an `IMMICH_VERSION=` assignment line (`export` allowed), else None.
fn env_value(body: &str) -> Option<Span> {
    let t = body.trim_start();
    let t = match t.strip_prefix("export") {
        Some(r) if r.starts_with([' ', '\t']) => r.trim_start(),
        _ => t,
    };
    let eq = t.strip_prefix(KEY)?.trim_start().strip_prefix('=')?;
    value_span(body, body.len() - eq.len())
}

struct ComposeEdit {
    text: String,
    changes: Vec<LineChange>,
    /// A server or ML image takes its tag from `IMMICH_VERSION`.
    uses_env: bool,
    /// Server and ML image lines found.
    images: usize,
    notes: Vec<String>,
}

/// The server's and machine learning's `image:` lines of one compose file: a tag named
/// directly is replaced (an ML variant suffix kept, a digest dropped); one taken from
/// `IMMICH_VERSION` is left to the `.env` edit.
fn edit_compose(
    path: &Path,
    text: &str,
    env: &std::collections::HashMap<String, String>,
    version: &str,
) -> Result<ComposeEdit, PinError> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let mut uses_env = false;
    let mut images = 0;
    for (n, (body, ending)) in lines_of(text).enumerate() {
        let err = |message: String| PinError::Parse {
            path: path.to_path_buf(),
            line: n + 1,
            message,
        };
        let t = body.trim_start();
        let Some(after) = t.strip_prefix("image:") else {
            out.push_str(body);
            out.push_str(ending);
            continue;
        };
        let at = body.len() - after.len();
        let span = value_span(body, at).ok_or_else(|| err("unclosed quote".into()))?;
        let raw = &body[span.start..span.end];
        let resolved = interpolate(raw, env).map_err(|m| err(format!("image: {m}")))?;
        let resolved = ImageRef::parse(&resolved);
        let is_ml = resolved.is_ml();
        if !(is_ml || resolved.is_server()) {
            out.push_str(body);
            out.push_str(ending);
            continue;
        }
        images += 1;
        let image = ImageRef::parse(raw);
        let digest = image.digest().map(|d| format!("@{d}"));
        if raw.contains(&format!("${{{KEY}")) || raw.contains(&format!("${KEY}")) {
            uses_env = true;
            if let Some(d) = digest {
                notes.push(format!(
                    "{}:{}: the image also names a digest ({d}), which pins it whatever {KEY} says; remove it by hand",
                    path.display(),
                    n + 1
                ));
            }
            out.push_str(body);
            out.push_str(ending);
            continue;
        }
        if image.name().contains('$') || image.tag().is_some_and(|t| t.contains('$')) {
            return Err(err(format!(
                "image: {raw}: the tag comes from a variable other than {KEY}; pin cannot edit it, set that variable to {version}"
            )));
        }
        let suffix = if is_ml { image.ml_suffix() } else { "" };
        let new_raw = format!("{}:{version}{suffix}", image.repo());
        if let Some(d) = digest {
            notes.push(format!(
                "{}:{}: dropped the digest {d}: it pinned the old image whatever the tag says",
                path.display(),
                n + 1
            ));
        }
        if new_raw == raw {
            out.push_str(body);
        } else {
            let new = format!("{}{new_raw}{}", &body[..span.start], &body[span.end..]);
            changes.push(LineChange {
                line: n + 1,
                old: Some(body.to_string()),
                new: new.clone(),
            });
            out.push_str(&new);
        }
        out.push_str(ending);
    }
    Ok(ComposeEdit {
        text: out,
        changes,
        uses_env,
        images,
        notes,
    })
}

/// The edited files read back as compose would: `.env` parses, every compose file parses,
/// and each server/ML image resolves to the pinned version.
fn check(
    env_path: &Path,
    env_text: &str,
    composes: &[(PathBuf, String)],
    version: &str,
) -> Result<(), PinError> {
    let env = parse_env(env_path, env_text.as_bytes()).map_err(|e| PinError::Check {
        path: env_path.to_path_buf(),
        message: format!("after the edit: {e}"),
    })?;
    for (path, text) in composes {
        let fail = |message: String| PinError::Check {
            path: path.clone(),
            message: format!("after the edit: {message}"),
        };
        let mut doc: yaml_serde::Value =
            yaml_serde::from_str(text).map_err(|e| fail(e.to_string()))?;
        doc.apply_merge().map_err(|e| fail(e.to_string()))?;
        let Some(services) = doc.get("services").and_then(|s| s.as_mapping()) else {
            continue;
        };
        for (name, service) in services {
            let Some(image) = service.get("image").and_then(|i| i.as_str()) else {
                continue;
            };
            let image = interpolate(image, &env).map_err(fail)?;
            let parsed = ImageRef::parse(&image);
            if !(parsed.is_server() || parsed.is_ml()) {
                continue;
            }
            let tag = parsed.release_tag().unwrap_or("");
            if tag != version {
                return Err(fail(format!(
                    "service {} would run {image}, not {version}",
                    name.as_str().unwrap_or("?")
                )));
            }
        }
    }
    Ok(())
}

/// Where [`apply`] keeps the files it replaces.
#[derive(Debug, Clone)]
pub enum Backup {
    /// `<file>.immich-guard-<time>.bak` beside each file.
    Beside,
    /// The same names in this dir (created owner-only).
    Dir(PathBuf),
    /// The caller keeps them (the restore: in its pre-restore snapshot's `config/`).
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// (file, its backup) for each file replaced.
    pub backups: Vec<(PathBuf, PathBuf)>,
    pub written: Vec<PathBuf>,
}

/// Makes the planned edits. Each file is first checked to hold what was planned on, copied to
/// its backup (owner-only: `.env` holds the database password), then replaced whole by a
/// synced temp file with the original's mode and owner.
pub fn apply(plan: &Plan, backup: &Backup, at: DateTime<Utc>) -> Result<Applied, PinError> {
    for edit in &plan.edits {
        let now = match std::fs::read(&edit.path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(PinError::Read {
                    path: edit.path.clone(),
                    source,
                });
            }
        };
        let planned = (!edit.created).then_some(&edit.before);
        if now.as_ref() != planned {
            return Err(PinError::Changed {
                path: edit.path.clone(),
            });
        }
    }
    let mut applied = Applied {
        backups: Vec::new(),
        written: Vec::new(),
    };
    let stamp = at.format("%Y%m%dT%H%M%SZ").to_string();
    for edit in &plan.edits {
        let meta = if edit.created {
            None
        } else {
            Some(
                std::fs::metadata(&edit.path).map_err(|source| PinError::Read {
                    path: edit.path.clone(),
                    source,
                })?,
            )
        };
        if let Some(meta) = &meta
            && let Some(dest) = backup_path(backup, &edit.path, &stamp)?
        {
            write_file(&dest, &edit.before, 0o600, Some((meta.uid(), meta.gid())))?;
            applied.backups.push((edit.path.clone(), dest));
        }
        let (mode, owner) = match &meta {
            Some(m) => (m.permissions().mode() & 0o7777, Some((m.uid(), m.gid()))),
            None => (0o644, dir_owner(&edit.path)),
        };
        // A symlinked .env (kept in a dotfiles repo, say) stays a link: its target is edited.
        let target = match &meta {
            Some(_) => std::fs::canonicalize(&edit.path).map_err(|source| PinError::Read {
                path: edit.path.clone(),
                source,
            })?,
            None => edit.path.clone(),
        };
        write_file(&target, &edit.after, mode, owner)?;
        applied.written.push(target);
    }
    Ok(applied)
}

fn backup_path(backup: &Backup, file: &Path, stamp: &str) -> Result<Option<PathBuf>, PinError> {
    let name = format!(
        "{}.immich-guard-{stamp}.bak",
        file.file_name().unwrap_or_default().to_string_lossy()
    );
    Ok(match backup {
        Backup::None => None,
        Backup::Beside => Some(file.with_file_name(name)),
        Backup::Dir(dir) => {
            crate::owner_only::create_dir_all(dir).map_err(|source| PinError::Write {
                path: dir.clone(),
                action: "creating the backup dir",
                source,
            })?;
            Some(dir.join(name))
        }
    })
}

fn dir_owner(path: &Path) -> Option<(u32, u32)> {
    let m = std::fs::metadata(path.parent()?).ok()?;
    Some((m.uid(), m.gid()))
}

/// `path` replaced whole or not at all: a synced temp file beside it with `mode` and `owner`,
/// renamed over it, the dir synced.
fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), PinError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.immich-guard-pin.tmp"));
    let fail = |action: &'static str| {
        let path = path.to_path_buf();
        move |source| PinError::Write {
            path,
            action,
            source,
        }
    };
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        // Owner-only until the owner and mode are the original's.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("writing a temp file beside it")(e));
    }
    std::fs::rename(&tmp, path).map_err(fail("renaming the temp file over it"))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent).map_err(fail("syncing its dir"))?;
    }
    Ok(())
}

/// Whether the database may run the target version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Every migration the database holds was applied by the target version or before it.
    Allowed {
        /// The snapshots of the target version the judgement rests on.
        snapshots: Vec<String>,
    },
    /// The database holds migrations the target never had: it would fail on start, or worse.
    Refused {
        migrations: Vec<String>,
        /// The newest sealed snapshot of the target version: restore it instead.
        restore: String,
    },
    /// Not enough known to judge; only `--force` pins.
    Unknown { reason: String },
}

impl Verdict {
    pub fn allows(&self) -> bool {
        matches!(self, Verdict::Allowed { .. })
    }

    /// One sentence for the admin.
    pub fn describe(&self, version: &str) -> String {
        match self {
            Verdict::Allowed { snapshots } => format!(
                "every migration in the database is one {version} had (judged from {} snapshot{} of {version}: {})",
                snapshots.len(),
                if snapshots.len() == 1 { "" } else { "s" },
                snapshots.join(", ")
            ),
            Verdict::Refused {
                migrations,
                restore,
            } => format!(
                "the database holds {} migration{} that {version} never had ({}): {version} cannot run on it; restore the snapshot taken on it instead: `immich-guard restore {restore}`",
                migrations.len(),
                if migrations.len() == 1 { "" } else { "s" },
                shorten(migrations)
            ),
            Verdict::Unknown { reason } => {
                format!("whether {version} can run on this database cannot be judged: {reason}")
            }
        }
    }
}

fn shorten(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", and {} more", names.len() - SHOWN));
    }
    s
}

/// The migrations `version` had are those recorded in its sealed snapshots (of `project`, when
/// given); the database's are `current` (or why they could not be read).
pub fn judge(
    version: &str,
    project: Option<&str>,
    snapshots: &[Meta],
    current: Result<&[String], String>,
) -> Verdict {
    let mine: Vec<&Meta> = snapshots
        .iter()
        .filter(|m| project.is_none_or(|p| m.project == p) && same_version(&m.version, version))
        .collect();
    let Some(newest) = mine.iter().max_by_key(|m| (m.started_at, &m.id)) else {
        return Verdict::Unknown {
            reason: format!(
                "no sealed snapshot of {version}, so which migrations {version} had is not known"
            ),
        };
    };
    let current = match current {
        Ok(c) => c,
        Err(reason) => {
            return Verdict::Unknown {
                reason: format!("the database's migrations could not be read: {reason}"),
            };
        }
    };
    let had: BTreeSet<&String> = mine.iter().flat_map(|m| &m.db.migrations).collect();
    let extra: Vec<String> = current
        .iter()
        .filter(|m| !had.contains(m))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if extra.is_empty() {
        Verdict::Allowed {
            snapshots: mine.iter().map(|m| m.id.clone()).collect(),
        }
    } else {
        Verdict::Refused {
            migrations: extra,
            restore: newest.id.clone(),
        }
    }
}

/// One pin made, as kept in `pins.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinRecord {
    pub at: DateTime<Utc>,
    pub project: String,
    pub version: String,
    /// Made against a refusal or without a judgement.
    pub forced: bool,
    pub verdict: Verdict,
    pub files: Vec<PathBuf>,
    pub backups: Vec<PathBuf>,
    /// Who ran it: `SUDO_USER` or the uid.
    pub by: String,
}

/// Appends `record` to `<data_dir>/pins.jsonl` (owner-only), synced; returns the log's path.
pub fn record(data_dir: &Path, record: &PinRecord) -> Result<PathBuf, PinError> {
    let path = data_dir.join(LOG_FILE);
    let fail = |action: &'static str| {
        let path = path.clone();
        move |source| PinError::Write {
            path,
            action,
            source,
        }
    };
    let line = serde_json::to_vec(record).expect("pin record serializes");
    crate::durable::append_line_synced(&path, &line).map_err(fail("appending"))?;
    Ok(path)
}

/// Every pin recorded in `data_dir`, oldest first; none when there is no log.
pub fn records(data_dir: &Path) -> Result<Vec<PinRecord>, PinError> {
    let path = data_dir.join(LOG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PinError::Read { path, source }),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l).map_err(|e| PinError::Parse {
                path: path.clone(),
                line: n + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

/// Who is pinning, for the record.
pub fn who() -> String {
    std::env::var("SUDO_USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| format!("uid {}", nix::unistd::Uid::current()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::store::tests::meta;

    const ENV: &str = "# The Immich version to use. You can pin this to a specific version like \"v1.71.0\"\n\
UPLOAD_LOCATION=./library\n\
IMMICH_VERSION=v1.120.0  # pinned after the 1.120 notes\n\
\n\
DB_PASSWORD=postgres\n";

    const COMPOSE_ENV: &str = "services:\n  immich-server:\n    image: ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}\n  immich-machine-learning:\n    # cuda build\n    image: ghcr.io/immich-app/immich-machine-learning:${IMMICH_VERSION:-release}-cuda\n  database:\n    image: docker.io/tensorchord/pgvecto-rs:pg14-v0.2.0@sha256:90724186\n";

    fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn plan_in(dir: &Path, files: &[&str], version: &str) -> Result<Plan, PinError> {
        let files: Vec<PathBuf> = files.iter().map(PathBuf::from).collect();
        plan(dir, &files, None, version)
    }

    fn after(plan: &Plan, name: &str) -> String {
        let edit = plan
            .edits
            .iter()
            .find(|e| e.path.file_name().unwrap() == name)
            .unwrap_or_else(|| panic!("no edit of {name}: {plan:?}"));
        String::from_utf8(edit.after.clone()).unwrap()
    }

    #[test]
    fn env_value_is_replaced_in_place_and_nothing_else_changes() {
        let dir = project(&[(".env", ENV), ("docker-compose.yml", COMPOSE_ENV)]);
        let plan = plan_in(dir.path(), &["docker-compose.yml"], "1.119.0").unwrap();
        assert_eq!(plan.version, "v1.119.0");
        assert_eq!(plan.edits.len(), 1, "only .env: {plan:?}");
        assert_eq!(
            after(&plan, ".env"),
            ENV.replace("IMMICH_VERSION=v1.120.0  #", "IMMICH_VERSION=v1.119.0  #")
        );
        assert_eq!(
            plan.edits[0].changes,
            vec![LineChange {
                line: 3,
                old: Some("IMMICH_VERSION=v1.120.0  # pinned after the 1.120 notes".into()),
                new: "IMMICH_VERSION=v1.119.0  # pinned after the 1.120 notes".into(),
            }]
        );
        assert!(
            plan.notes
                .iter()
                .any(|n| n.contains("the .env edit pins them"))
        );
        // Already there: nothing to do.
        let dir = project(&[
            (".env", "IMMICH_VERSION=v1.119.0\n"),
            ("docker-compose.yml", COMPOSE_ENV),
        ]);
        assert!(
            plan_in(dir.path(), &["docker-compose.yml"], "v1.119.0")
                .unwrap()
                .edits
                .is_empty()
        );
    }

    #[test]
    fn env_quoting_export_crlf_and_missing_line() {
        for (before, want) in [
            (
                "IMMICH_VERSION=\"v1.120.0\"\n",
                "IMMICH_VERSION=\"v1.119.0\"\n",
            ),
            (
                "IMMICH_VERSION='release' # x\n",
                "IMMICH_VERSION='v1.119.0' # x\n",
            ),
            (
                "export IMMICH_VERSION = v1.120.0\n",
                "export IMMICH_VERSION = v1.119.0\n",
            ),
            (
                "A=1\r\nIMMICH_VERSION=release\r\nB=2\r\n",
                "A=1\r\nIMMICH_VERSION=v1.119.0\r\nB=2\r\n",
            ),
            // No trailing newline: none added.
            (
                "A=1\nIMMICH_VERSION=release",
                "A=1\nIMMICH_VERSION=v1.119.0",
            ),
            // Commented-out lines are left alone; both assignments agree afterwards.
            (
                "#IMMICH_VERSION=v1.0.0\nIMMICH_VERSION=v1.2.0\nIMMICH_VERSION=v1.3.0\n",
                "#IMMICH_VERSION=v1.0.0\nIMMICH_VERSION=v1.119.0\nIMMICH_VERSION=v1.119.0\n",
            ),
            // Missing: appended, in the file's line ending, after a missing final newline.
            ("A=1\n# c\n", "A=1\n# c\nIMMICH_VERSION=v1.119.0\n"),
            ("A=1\r\nB=2", "A=1\r\nB=2\r\nIMMICH_VERSION=v1.119.0\r\n"),
            ("", "IMMICH_VERSION=v1.119.0\n"),
        ] {
            let e = edit_env(before, "v1.119.0", true);
            assert_eq!(e.text, want, "from {before:?}");
        }
        let e = edit_env("A=1\n", "v1.119.0", true);
        assert!(e.appended);
        assert_eq!(
            e.changes,
            vec![LineChange {
                line: 2,
                old: None,
                new: "IMMICH_VERSION=v1.119.0".into()
            }]
        );
        // No compose files named: the one compose picks by default.
        let dir = project(&[("docker-compose.yml", COMPOSE_ENV), (".env", "A=1\n")]);
        let plan = plan_in(dir.path(), &[], "v1.119.0").unwrap();
        assert_eq!(after(&plan, ".env"), "A=1\nIMMICH_VERSION=v1.119.0\n");
        // Not read by the images and not there: not added.
        assert!(edit_env("A=1\n", "v1.119.0", false).changes.is_empty());

        let dir = project(&[("docker-compose.yml", COMPOSE_ENV), (".env", "A=1\n")]);
        let plan = plan_in(dir.path(), &["docker-compose.yml"], "v1.119.0").unwrap();
        assert_eq!(after(&plan, ".env"), "A=1\nIMMICH_VERSION=v1.119.0\n");
        assert!(
            plan.notes.iter().any(|n| n.contains("appended")),
            "{plan:?}"
        );
        // No .env at all: created.
        let dir = project(&[("docker-compose.yml", COMPOSE_ENV)]);
        let plan = plan_in(dir.path(), &["docker-compose.yml"], "v1.119.0").unwrap();
        assert!(plan.edits[0].created);
    }

    #[test]
    fn compose_direct_tags_ml_suffixes_digests_and_override_files() {
        let compose = "services:\n  immich-server:\n    image: \"ghcr.io/immich-app/immich-server:v1.120.0\" # pinned\r\n  immich-machine-learning:\n    image: ghcr.io/immich-app/immich-machine-learning:v1.120.0-openvino\n  redis:\n    image: docker.io/valkey/valkey:8-bookworm@sha256:ff21bc\n";
        let overrides = "services:\n  immich-machine-learning:\n    image: 'ghcr.io/immich-app/immich-machine-learning:release-cuda@sha256:abcd'\n";
        let dir = project(&[
            ("docker-compose.yml", compose),
            ("hwaccel.yml", overrides),
            (".env", "IMMICH_VERSION=v1.120.0\n"),
        ]);
        let plan = plan_in(
            dir.path(),
            &["docker-compose.yml", "hwaccel.yml"],
            "v1.119.0",
        )
        .unwrap();
        assert_eq!(
            after(&plan, "docker-compose.yml"),
            compose.replace(":v1.120.0", ":v1.119.0")
        );
        assert_eq!(
            after(&plan, "hwaccel.yml"),
            overrides.replace("release-cuda@sha256:abcd", "v1.119.0-cuda")
        );
        assert!(plan.notes.iter().any(|n| n.contains("dropped the digest")));
        // .env names a version too: kept in agreement.
        assert_eq!(after(&plan, ".env"), "IMMICH_VERSION=v1.119.0\n");
        let compose_edit = &plan.edits[0];
        assert_eq!(
            compose_edit
                .changes
                .iter()
                .map(|c| c.line)
                .collect::<Vec<_>>(),
            [3, 5]
        );
    }

    #[test]
    fn refuses_what_it_cannot_pin() {
        let dir = project(&[(
            "docker-compose.yml",
            "services:\n  immich-server:\n    image: ghcr.io/immich-app/immich-server:${MY_TAG:-v1}\n",
        )]);
        let e = plan_in(dir.path(), &["docker-compose.yml"], "v1.119.0").unwrap_err();
        assert!(
            e.to_string().contains("docker-compose.yml:3") && e.to_string().contains("MY_TAG"),
            "{e}"
        );
        let dir = project(&[(
            "docker-compose.yml",
            "services:\n  redis:\n    image: redis\n",
        )]);
        assert!(plan_in(dir.path(), &["docker-compose.yml"], "v1.119.0").is_err());
        for bad in ["", "v1 .2", "-x", "v1;rm", "a:b"] {
            assert!(
                matches!(normalize_version(bad), Err(PinError::BadVersion(_))),
                "{bad}"
            );
        }
        assert_eq!(normalize_version("release").unwrap(), "release");
    }

    #[test]
    fn apply_keeps_mode_owner_and_a_private_backup_and_refuses_a_changed_file() {
        let dir = project(&[(".env", ENV), ("docker-compose.yml", COMPOSE_ENV)]);
        let env = dir.path().join(".env");
        std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o640)).unwrap();
        let at: DateTime<Utc> = "2026-11-25T02:23:01Z".parse().unwrap();
        let plan = plan_in(dir.path(), &["docker-compose.yml"], "v1.119.0").unwrap();
        let applied = apply(&plan, &Backup::Beside, at).unwrap();
        let bak = dir.path().join(".env.immich-guard-20261125T022301Z.bak");
        assert_eq!(applied.backups, vec![(env.clone(), bak.clone())]);
        assert_eq!(std::fs::read_to_string(&bak).unwrap(), ENV);
        assert_eq!(
            std::fs::metadata(&bak).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(&env).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(std::fs::read_to_string(&env).unwrap(), after(&plan, ".env"));
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        // A symlink stays one; its target is what changes.
        let real = dir.path().join("env.real");
        std::fs::write(&real, ENV).unwrap();
        std::fs::remove_file(&env).unwrap();
        std::os::unix::fs::symlink("env.real", &env).unwrap();
        let relinked = plan_in(dir.path(), &["docker-compose.yml"], "v1.118.0").unwrap();
        let baks = dir.path().join("data/pins");
        let applied = apply(&relinked, &Backup::Dir(baks.clone()), at).unwrap();
        let kept = baks.join(".env.immich-guard-20261125T022301Z.bak");
        assert_eq!(applied.backups, vec![(env.clone(), kept.clone())]);
        assert_eq!(
            std::fs::metadata(&baks).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), ENV);
        assert!(
            std::fs::symlink_metadata(&env)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            std::fs::read_to_string(&real)
                .unwrap()
                .contains("IMMICH_VERSION=v1.118.0  #")
        );
        // Planned on the old content: refused now.
        assert!(matches!(
            apply(&plan, &Backup::None, at),
            Err(PinError::Changed { .. })
        ));
    }

    fn snap(id: &str, minute: u32, version: &str, migrations: &[&str]) -> Meta {
        let mut m = meta(
            id,
            format!("2026-11-25T02:{minute:02}:00Z").parse().unwrap(),
        );
        m.version = version.into();
        m.db.migrations = migrations.iter().map(|s| s.to_string()).collect();
        m
    }

    #[test]
    fn judgement_from_the_snapshots_migration_lists() {
        let snaps = [
            snap("a", 1, "v1.119.0", &["m1", "m2"]),
            snap("b", 2, "v1.119.0", &["m1", "m2", "m3"]),
            snap("c", 3, "v1.120.0", &["m1", "m2", "m3", "m4"]),
        ];
        let cur = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let db = cur(&["m1", "m2", "m3", "m4", "m5"]);
        assert_eq!(
            judge("1.119.0", None, &snaps, Ok(&db)),
            Verdict::Refused {
                migrations: vec!["m4".into(), "m5".into()],
                restore: "b".into()
            }
        );
        let db = cur(&["m1", "m2", "m3"]);
        assert_eq!(
            judge("v1.119.0", None, &snaps, Ok(&db)),
            Verdict::Allowed {
                snapshots: vec!["a".into(), "b".into()]
            }
        );
        // Another project's snapshots do not count.
        assert!(matches!(
            judge("v1.119.0", Some("other"), &snaps, Ok(&db)),
            Verdict::Unknown { .. }
        ));
        assert!(matches!(
            judge("v1.118.0", None, &snaps, Ok(&db)),
            Verdict::Unknown { reason } if reason.contains("no sealed snapshot of v1.118.0")
        ));
        assert!(matches!(
            judge("v1.119.0", None, &snaps, Err("refused".into())),
            Verdict::Unknown { reason } if reason.contains("refused")
        ));
        let refused = judge("v1.119.0", None, &snaps, Ok(&cur(&["m9"])));
        assert!(
            refused
                .describe("v1.119.0")
                .contains("immich-guard restore b")
        );
    }

    #[test]
    fn pins_are_recorded_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let rec = PinRecord {
            at: Utc::now(),
            project: "immich".into(),
            version: "v1.119.0".into(),
            forced: true,
            verdict: Verdict::Unknown { reason: "x".into() },
            files: vec!["/opt/immich/.env".into()],
            backups: vec![],
            by: who(),
        };
        let path = record(dir.path(), &rec).unwrap();
        record(dir.path(), &rec).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(records(dir.path()).unwrap(), vec![rec.clone(), rec]);
    }
}
