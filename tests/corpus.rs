//! The diagnosis against real failures: every `tests/corpus/*.toml` (logs posted in public
//! Immich issue threads, with the thread's conclusion, expected category and action) runs
//! through the same engine as an incident. The score table is printed
//! (`cargo test --test corpus -- --nocapture`); the test fails when a number drops below
//! `tests/corpus/score.toml`. README.md, "Tests".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use immich_guard::diagnose::{self, Category, Evidence, Exit, SnapshotRef};
use serde::Deserialize;

// Unknown keys are tolerated: the corpus may carry more about a case than the runner reads.
#[derive(Deserialize)]
struct Case {
    source: String,
    from: String,
    #[allow(dead_code)]
    to: String,
    #[allow(dead_code)]
    conclusion: String,
    category: Category,
    action: String,
    #[serde(default)]
    facts: Facts,
    logs: Vec<Log>,
}

#[derive(Deserialize, Default)]
struct Facts {
    exit_code: Option<i64>,
    oom_killed: Option<bool>,
    migrations_applied: Option<bool>,
    database_empty: Option<bool>,
    images_same_release: Option<bool>,
}

#[derive(Deserialize)]
struct Log {
    service: String,
    text: String,
}

#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
struct Score {
    cases: usize,
    category_right: usize,
    action_right: usize,
}

const ACTIONS: &[&str] = &["restore", "rollback", "fix-forward", "unknown"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn load(path: &Path) -> Result<Case, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let case: Case = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if !ACTIONS.contains(&case.action.as_str()) {
        return Err(format!(
            "{}: action {:?} is not one of {ACTIONS:?}",
            path.display(),
            case.action
        ));
    }
    if case.logs.is_empty() || !case.source.starts_with("https://") {
        return Err(format!(
            "{}: a case needs a source URL and at least one [[logs]]",
            path.display()
        ));
    }
    Ok(case)
}

/// What the daemon would know: the logs (compose prefixes split, `exited with code` read), the
/// facts of the thread, and a pre-update snapshot of the `from` version (the guard takes one
/// before every update).
fn evidence(case: &Case) -> Evidence {
    let inputs: Vec<(String, String)> = case
        .logs
        .iter()
        .map(|l| (l.text.clone(), l.service.clone()))
        .collect();
    let mut e = immich_guard::compose_logs::evidence(&inputs);
    let looping = case.logs[0].service.clone();
    if case.facts.exit_code.is_some() || case.facts.oom_killed.is_some() {
        e.exits.push(Exit {
            service: looping.clone(),
            exit_code: case.facts.exit_code,
            oom_killed: case.facts.oom_killed.unwrap_or(false),
        });
    }
    e.looping = Some(looping);
    e.migrations_applied = case.facts.migrations_applied;
    e.database_empty = case.facts.database_empty;
    e.images_same_release = case.facts.images_same_release;
    e.snapshot = Some(SnapshotRef {
        id: "pre-update".into(),
        version: if case.from.is_empty() {
            "the previous version".into()
        } else {
            case.from.clone()
        },
    });
    e
}

#[derive(Default)]
struct Row {
    cases: usize,
    category: usize,
    action: usize,
}

#[test]
fn the_corpus_scores_at_least_the_recorded_score() {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("tests/corpus")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "toml")
                && p.file_name().is_some_and(|n| n != "score.toml")
        })
        .collect();
    paths.sort();
    let mut per_category: BTreeMap<Category, Row> = BTreeMap::new();
    let mut total = Score::default();
    let mut unknown = 0;
    let mut wrong = Vec::new();
    let mut errors = Vec::new();
    for path in &paths {
        let case = match load(path) {
            Ok(c) => c,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let d = diagnose::diagnose(&evidence(&case));
        let category_right = d.cause == case.category;
        let action_right = d.decision.action() == case.action;
        let row = per_category.entry(case.category).or_default();
        row.cases += 1;
        total.cases += 1;
        if category_right {
            row.category += 1;
            total.category_right += 1;
        }
        if action_right {
            row.action += 1;
            total.action_right += 1;
        }
        if d.cause == Category::Unknown {
            unknown += 1;
        }
        if !(category_right && action_right) {
            wrong.push(format!(
                "  {}: expected {} / {}, got {} / {}{}",
                path.file_name().unwrap().to_string_lossy(),
                case.category,
                case.action,
                d.cause,
                d.decision.action(),
                d.findings
                    .first()
                    .and_then(|f| f.lines.first())
                    .map(|l| format!(" (from {l:?})"))
                    .unwrap_or_default()
            ));
        }
    }
    let pct = |n: usize, of: usize| {
        if of == 0 {
            0.0
        } else {
            100.0 * n as f64 / of as f64
        }
    };
    let mut table = String::from("\ncorpus score (tests/corpus)\n");
    table.push_str(&format!(
        "{:<22} {:>5} {:>10} {:>10}\n",
        "category", "cases", "category", "action"
    ));
    for (category, row) in &per_category {
        table.push_str(&format!(
            "{:<22} {:>5} {:>10} {:>10}\n",
            category.slug(),
            row.cases,
            row.category,
            row.action
        ));
    }
    table.push_str(&format!(
        "{:<22} {:>5} {:>5} {:>3.0}% {:>5} {:>3.0}%\nunknown (nothing recognised): {unknown}\n",
        "all",
        total.cases,
        total.category_right,
        pct(total.category_right, total.cases),
        total.action_right,
        pct(total.action_right, total.cases)
    ));
    if !wrong.is_empty() {
        table.push_str("wrong:\n");
        table.push_str(&wrong.join("\n"));
        table.push('\n');
    }
    eprintln!("{table}");
    assert!(
        errors.is_empty(),
        "bad corpus files:\n{}",
        errors.join("\n")
    );

    let score_path = dir().join("score.toml");
    let recorded: Score = toml::from_str(
        &std::fs::read_to_string(&score_path)
            .unwrap_or_else(|e| panic!("{}: {e}", score_path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", score_path.display()));
    assert!(
        total.cases >= recorded.cases,
        "fewer cases than recorded in {}: {} < {}",
        score_path.display(),
        total.cases,
        recorded.cases
    );
    assert!(
        total.category_right >= recorded.category_right
            && total.action_right >= recorded.action_right,
        "the score dropped below {}: category {} (recorded {}), action {} (recorded {}){table}",
        score_path.display(),
        total.category_right,
        recorded.category_right,
        total.action_right,
        recorded.action_right
    );
}
