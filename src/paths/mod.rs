//! Immich's upgrade paths: the table of documented constraints (table.toml, compiled in, a
//! later release updates it) and the pure check of one change against it (README.md
//! "Upgrade paths"). It owns no I/O but reading the host's CPU flags (`cpu`); protection
//! calls `check` with what the daemon sees and decides what a verdict does.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::version::parse_version;

mod cpu;

pub use cpu::Cpu;

#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error("src/paths/table.toml: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("src/paths/table.toml: row {row}: {field} {value:?}: {why}")]
    Field {
        row: String,
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

/// Hold the start, or only say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Hold,
    Warn,
}

/// What must also hold for a row to apply, beside its version ranges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Check {
    Always,
    Downgrade,
    NotRun {
        version: String,
    },
    HasRun {
        version: String,
    },
    Env {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<String>,
    },
    DatabaseImage {
        repo: String,
    },
    UploadMount {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unless_env: Option<String>,
    },
    CpuLacks {
        arch: String,
        flags: Vec<String>,
    },
}

/// One documented constraint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub id: String,
    pub from: String,
    pub to: String,
    pub check: Check,
    pub verdict: Level,
    pub reason: String,
    pub source: String,
    pub way_through: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    row: Vec<Row>,
}

/// What one row says about one change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub row: String,
    pub level: Level,
    pub reason: String,
    pub source: String,
    pub way_through: String,
}

impl Verdict {
    /// `HOLD typeorm-upgrade: … (source: …); way through: …`, for logs and notifications.
    pub fn line(&self) -> String {
        let level = match self.level {
            Level::Hold => "HOLD",
            Level::Warn => "WARN",
        };
        format!(
            "{level} {}: {} (source: {}); way through: {}",
            self.row, self.reason, self.source, self.way_through
        )
    }
}

/// What the database shows about the versions that ran on it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Database {
    /// Kysely migrations recorded (from the newest sealed snapshot of the baseline version);
    /// any means a version that records them (v1.132 on) has run. None: no snapshot says.
    pub kysely_migrations: Option<usize>,
    /// The database service's image (the compose file's, else the running one's).
    pub image: Option<String>,
}

/// One change as the daemon sees it: the check's whole input.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// The version the database last ran with (the baseline); None when not known.
    pub from: Option<String>,
    pub to: String,
    pub database: Database,
    /// The variables `watched` names, from `.env` and the services' `environment:`.
    pub env: BTreeMap<String, String>,
    /// Where the compose file mounts the upload location in the server container.
    pub upload_mount: Option<String>,
    pub cpu: Cpu,
    /// `immich-guard pin` recorded a rollback to `to`: not a downgrade to hold.
    pub rollback_pinned: bool,
}

/// The table compiled into this build.
pub fn table() -> &'static [Row] {
    static TABLE: OnceLock<Vec<Row>> = OnceLock::new();
    TABLE.get_or_init(|| {
        // Checked by the unit tests of every build: a bad table never ships.
        parse(include_str!("table.toml")).expect("src/paths/table.toml parses")
    })
}

/// Parses a table and checks every range and check field.
pub fn parse(text: &str) -> Result<Vec<Row>, PathsError> {
    let file: File = toml::from_str(text)?;
    for row in &file.row {
        let bad = |field, value: &str, why| PathsError::Field {
            row: row.id.clone(),
            field,
            value: value.to_string(),
            why,
        };
        Range::parse(&row.from).ok_or_else(|| bad("from", &row.from, "not a version range"))?;
        Range::parse(&row.to).ok_or_else(|| bad("to", &row.to, "not a version range"))?;
        if let Check::NotRun { version } | Check::HasRun { version } = &row.check
            && parse_version(version).is_none()
        {
            return Err(bad("check.version", version, "not a version"));
        }
    }
    Ok(file.row)
}

/// Whether protection keeps `name` from `.env` and `environment:` for the check: only the
/// variables a row names (none is a secret).
pub fn watched(name: &str) -> bool {
    table().iter().any(|row| match &row.check {
        Check::Env { name: n, .. } => env_name_matches(n, name),
        Check::UploadMount {
            unless_env: Some(n),
            ..
        } => n == name,
        _ => false,
    })
}

fn env_name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Every row of `rows` that applies to `change`, in table order. A target that is no
/// version (`release`) matches no range: it is judged when its image's version is known.
pub fn check(rows: &[Row], change: &Change) -> Vec<Verdict> {
    let Some(to) = parse_version(&change.to) else {
        return Vec::new();
    };
    let from = change.from.as_deref().and_then(parse_version);
    let mut out = Vec::new();
    for row in rows {
        let (Some(from_range), Some(to_range)) = (Range::parse(&row.from), Range::parse(&row.to))
        else {
            continue;
        };
        // A row with a from-range needs the from version; `*` does not.
        let from_ok = match from {
            Some(f) => from_range.contains(f),
            None => from_range.is_any(),
        };
        if !from_ok || !to_range.contains(to) {
            continue;
        }
        let Some(filled) = applies(&row.check, change, from, to) else {
            continue;
        };
        let fill = |text: &str| {
            text.replace("{from}", change.from.as_deref().unwrap_or("unknown"))
                .replace("{to}", &change.to)
                .replace("{missing}", &filled)
        };
        out.push(Verdict {
            row: row.id.clone(),
            level: row.verdict,
            reason: fill(&row.reason),
            source: row.source.clone(),
            way_through: fill(&row.way_through),
        });
    }
    out
}

type Version = (u64, u64, u64);

/// Whether `check` holds; Some(what fills `{missing}`).
fn applies(check: &Check, change: &Change, from: Option<Version>, to: Version) -> Option<String> {
    let yes = Some(String::new());
    match check {
        Check::Always => yes,
        Check::Downgrade => {
            (from.is_some_and(|f| to < f) && !change.rollback_pinned).then_some(String::new())
        }
        Check::NotRun { version } => {
            let v = parse_version(version)?;
            let baseline_ran = from.is_some_and(|f| f >= v);
            let kysely_ran = change.database.kysely_migrations.is_some_and(|n| n > 0);
            // No baseline and no snapshot: nothing says it has not run; say nothing.
            let known = from.is_some() || change.database.kysely_migrations.is_some();
            (known && !baseline_ran && !kysely_ran).then_some(String::new())
        }
        Check::HasRun { version } => {
            let v = parse_version(version)?;
            from.is_some_and(|f| f >= v).then_some(String::new())
        }
        Check::Env { name, value } => change
            .env
            .iter()
            .any(|(k, v)| {
                env_name_matches(name, k) && value.as_ref().is_none_or(|want| v.trim() == want)
            })
            .then_some(String::new()),
        Check::DatabaseImage { repo } => change
            .database
            .image
            .as_deref()
            .is_some_and(|image| crate::image_ref::ImageRef::parse(image).is_of(repo))
            .then_some(String::new()),
        Check::UploadMount { path, unless_env } => {
            let mounted = change.upload_mount.as_deref() == Some(path.as_str());
            let unless = unless_env
                .as_ref()
                .is_some_and(|n| change.env.get(n).is_some_and(|v| !v.trim().is_empty()));
            (mounted && !unless).then_some(String::new())
        }
        Check::CpuLacks { arch, flags } => {
            if change.cpu.arch != *arch {
                return None;
            }
            let have = change.cpu.flags.as_ref()?;
            let missing: Vec<&str> = flags
                .iter()
                .filter(|f| !have.contains(f.as_str()))
                .map(String::as_str)
                .collect();
            (!missing.is_empty()).then(|| missing.join(", "))
        }
    }
}

/// `*`, or constraints like `>=1.132.0, <1.137.0` (all must hold).
struct Range(Vec<(Op, Version)>);

#[derive(Clone, Copy)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
}

impl Range {
    fn parse(text: &str) -> Option<Range> {
        let text = text.trim();
        if text == "*" {
            return Some(Range(Vec::new()));
        }
        text.split(',')
            .map(|c| {
                let c = c.trim();
                let (op, rest) = [
                    (">=", Op::Ge),
                    ("<=", Op::Le),
                    (">", Op::Gt),
                    ("<", Op::Lt),
                    ("=", Op::Eq),
                ]
                .into_iter()
                .find_map(|(p, op)| c.strip_prefix(p).map(|r| (op, r)))?;
                Some((op, parse_version(rest.trim())?))
            })
            .collect::<Option<Vec<_>>>()
            .filter(|v| !v.is_empty())
            .map(Range)
    }

    fn is_any(&self) -> bool {
        self.0.is_empty()
    }

    fn contains(&self, v: Version) -> bool {
        self.0.iter().all(|&(op, bound)| match op {
            Op::Lt => v < bound,
            Op::Le => v <= bound,
            Op::Gt => v > bound,
            Op::Ge => v >= bound,
            Op::Eq => v == bound,
        })
    }
}

/// The table as `immich-guard paths` prints it.
pub fn render(rows: &[Row]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for row in rows {
        let level = match row.verdict {
            Level::Hold => "HOLD",
            Level::Warn => "WARN",
        };
        let _ = writeln!(out, "{level} {}: from {} to {}", row.id, row.from, row.to);
        let _ = writeln!(out, "  when:   {}", describe(&row.check));
        let _ = writeln!(out, "  why:    {}", row.reason);
        let _ = writeln!(out, "  source: {}", row.source);
        let _ = writeln!(out, "  way:    {}", row.way_through);
    }
    out
}

fn describe(check: &Check) -> String {
    match check {
        Check::Always => "always".into(),
        Check::Downgrade => "the target is older than the version that last migrated the database (a rollback `pin` recorded is not)".into(),
        Check::NotRun { version } => format!("no version >= {version} has run on the database (the baseline, and the Kysely migrations a snapshot recorded)"),
        Check::HasRun { version } => format!("a version >= {version} has run on the database (the baseline)"),
        Check::Env { name, value: Some(v) } => format!("{name}={v} in .env or environment:"),
        Check::Env { name, value: None } => format!("{name} set in .env or environment:"),
        Check::DatabaseImage { repo } => format!("the database image is a {repo} image (the last segment of its repository)"),
        Check::UploadMount { path, unless_env: Some(e) } => format!("the server mounts the upload location at {path}, {e} not set"),
        Check::UploadMount { path, unless_env: None } => format!("the server mounts the upload location at {path}"),
        Check::CpuLacks { arch, flags } => format!("an {arch} host whose CPU lacks one of {} (/proc/cpuinfo)", flags.join(" ")),
    }
}

#[cfg(test)]
mod tests;
