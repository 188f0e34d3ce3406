//! Human-readable output of the CLI. `--json` prints the wire types instead; this is for
//! people, so it says what is missing and what to do, not just what is there.

use std::fmt::Write;

use crate::discover::{Service, Stack};
use crate::progress::Progress;
use crate::status::StatusReport;

/// A bar over the steps of a snapshot or a restore, for a person at a terminal (stderr).
pub fn step_bar(steps: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:24}] {pos}/{len} {wide_msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// Shows `p` on a [`step_bar`]: a step moves it and is said above it; a note is only said.
pub fn advance(bar: &indicatif::ProgressBar, p: &Progress) {
    if let (Some(done), Progress::Step { msg, .. }) = (p.done(), p) {
        bar.set_position(done);
        bar.set_message(msg.clone());
    }
    bar.println(p.line());
}

pub fn stack(s: &Stack) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Immich stack: {}", s.project);
    let version = s
        .version
        .as_ref()
        .map(|v| {
            let mut line = v.name();
            if let Some(tag) = &v.tag {
                let _ = write!(line, " (tag {tag})");
            }
            let _ = write!(line, ", image {}", crate::discover::short_id(&v.image_id));
            if let Some(d) = v.repo_digests.first() {
                let _ = write!(line, ", digest {d}");
            }
            line
        })
        .unwrap_or_else(|| "unknown (no server container)".to_string());
    let _ = writeln!(out, "  version:          {version}");
    if let Some(env) = &s.env_version {
        let _ = writeln!(out, "  .env version:     {env}");
    }
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "not found".to_string())
    };
    let _ = writeln!(out, "  compose dir:      {}", path(&s.compose_dir));
    for f in &s.compose_files {
        let _ = writeln!(out, "  compose file:     {}", f.display());
    }
    let _ = writeln!(out, "  .env:             {}", path(&s.env_file));
    let upload = match (&s.upload_location, &s.upload_mount) {
        (Some(p), Some(m)) => format!("{} (mounted at {m})", p.display()),
        (p, _) => path(p),
    };
    let _ = writeln!(out, "  upload location:  {upload}");
    let _ = writeln!(out, "  database data:    {}", path(&s.db_data_location));
    if let Some(db) = &s.db {
        let _ = writeln!(
            out,
            "  database access:  {}@{}:{}/{} (password {})",
            db.user,
            db.host.as_deref().unwrap_or("?"),
            db.port,
            db.database,
            if db.password_known {
                "known"
            } else {
                "UNKNOWN"
            }
        );
    }
    let service = |label: &str, svc: &Option<Service>| match svc {
        Some(c) => format!(
            "  {label:<18}{} [{}] {} (restart {}, restarted {}x)\n",
            c.container_name,
            c.state,
            c.image,
            if c.restart_policy.is_empty() {
                "-"
            } else {
                &c.restart_policy
            },
            c.restart_count
        ),
        None => format!("  {label:<18}not found\n"),
    };
    out.push_str(&service("server:", &s.server));
    out.push_str(&service("machine learning:", &s.machine_learning));
    out.push_str(&service("redis:", &s.redis));
    out.push_str(&service("database:", &s.database));
    if !s.notes.is_empty() {
        let _ = writeln!(out, "Could not find:");
        for n in &s.notes {
            let _ = writeln!(out, "  - {n}");
        }
    }
    out
}

fn protection(
    out: &mut String,
    p: &crate::protect::Protection,
    uploads: Option<&crate::uploads::RecentUploads>,
) {
    let state = serde_json::to_value(p.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let baseline = p
        .baseline
        .as_ref()
        .map(|b| format!("{} ({})", b.version, crate::discover::short_id(&b.image_id)))
        .unwrap_or_else(|| "not known yet".into());
    let _ = writeln!(
        out,
        "protection: {state}{}; database runs with {baseline}",
        if p.fail_open { " (fail-open)" } else { "" }
    );
    if let Some(c) = &p.pending {
        let _ = writeln!(
            out,
            "pending change: {} (from {}, seen {}){}",
            c.arrow(),
            c.source,
            c.detected_at.format("%Y-%m-%d %H:%M:%S UTC"),
            c.snapshot
                .as_ref()
                .map(|id| format!(", covered by {id}"))
                .unwrap_or_else(|| ", no snapshot sealed for it yet".into())
        );
        // What Immich's upgrade-path table says about it (`immich-guard paths`).
        for n in &c.notes {
            let _ = writeln!(out, "  upgrade path: {}", n.line());
        }
        if let Some(u) = uploads.filter(|u| u.busy()) {
            let _ = writeln!(out, "  before it goes: {}", u.line());
        }
    }
    if let Some(s) = &p.settling {
        let _ = writeln!(
            out,
            "update settling: {} started {}; a crash loop now is diagnosed against it",
            s.change.arrow(),
            s.since.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    if let Some(f) = &p.frozen {
        let _ = writeln!(
            out,
            "FROZEN: {} ({}) paused {:.1} ms after its start, until {}",
            f.container_name,
            f.version,
            f.delay_ms,
            if p.release_wait.is_some() {
                "what WAITING says"
            } else {
                "its snapshot is sealed"
            }
        );
    }
    if let Some(w) = &p.release_wait {
        let _ = writeln!(
            out,
            "WAITING: snapshot {} sealed {}; the server stays frozen until {} (protect.wait_for_quiet_uploads; it goes at the latest at {}; `immich-guard release` lets it go now)",
            w.snapshot,
            w.since.format("%Y-%m-%d %H:%M:%S UTC"),
            w.waiting_for,
            w.until.format("%Y-%m-%d %H:%M:%S UTC"),
        );
    }
    if let Some(x) = &p.paused_server {
        let _ = writeln!(
            out,
            "PAUSED: {} ({}) found paused at {}, with no freeze of immich-guard recorded (paused by hand, or by a run that stopped before recording it); left paused: `immich-guard release` snapshots if its version needs one and unpauses it, `docker unpause {}` if you paused it",
            x.container_name,
            x.version,
            x.seen_at.format("%Y-%m-%d %H:%M:%S UTC"),
            x.container_name
        );
    }
    if let Some(r) = &p.snapshot_run {
        let _ = writeln!(
            out,
            "snapshot ({}) {}, started {}",
            r.trigger,
            r.waiting(chrono::Utc::now()),
            r.since.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    if let Some(h) = &p.hold {
        let _ = writeln!(
            out,
            "HELD: {} ({}, {}): {}",
            h.container_name,
            h.version,
            if h.paused { "paused" } else { "stopped" },
            h.reason
        );
        let _ = writeln!(out, "  what to do: {}", h.hint);
    }
    if let Some(d) = &p.verifies.degraded {
        let _ = writeln!(
            out,
            "DEGRADED: verify after {} → {} failed at {}:",
            d.from,
            d.to,
            d.since.format("%Y-%m-%d %H:%M:%S UTC")
        );
        for c in &d.failed {
            let _ = writeln!(out, "  FAIL {:<10} {}", c.name, c.detail);
        }
        if let Some(id) = &d.snapshot {
            let _ = writeln!(
                out,
                "  snapshot to restore: {id} (`immich-guard restore {id}`)"
            );
        }
        let _ = writeln!(out, "  what to do: {}", d.hint);
    }
    if let Some(due) = &p.verifies.due {
        let _ = writeln!(
            out,
            "verify due: {} → {} ({}), from {}",
            due.from,
            due.to,
            due.reason,
            due.not_before.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    if let Some(v) = &p.verifies.last {
        let _ = writeln!(
            out,
            "last verify: {} {} → {} {} against {}: {}",
            v.at.format("%Y-%m-%d %H:%M:%S UTC"),
            v.from,
            v.to,
            if v.passed { "passed" } else { "FAILED" },
            v.against.as_deref().unwrap_or("no snapshot"),
            v.summary()
        );
    }
    for h in &p.halted {
        let _ = writeln!(
            out,
            "HALTED: {} ({}) crash-looped; restart policy was {} (`immich-guard release {}` puts it back)",
            h.service, h.container, h.restart_policy, h.service
        );
    }
    if let Some(i) = &p.incident {
        let _ = writeln!(
            out,
            "last incident: {} ({} died {} times within {} s), bundle {}",
            i.id,
            i.container,
            i.deaths,
            i.window_secs,
            i.dir.join(&i.id).display()
        );
        for f in &i.findings {
            let _ = writeln!(
                out,
                "  {} ({} lines): {}",
                f.category,
                f.count,
                f.lines.first().map(String::as_str).unwrap_or("")
            );
        }
        let _ = writeln!(out, "  recommended: {}", i.decision.summary());
    }
    for (version, id) in &p.last_snapshot_per_version {
        let _ = writeln!(out, "newest snapshot of {version}: {id}");
    }
    if let Some((p50, p99)) = p.delay_percentiles() {
        let _ = writeln!(
            out,
            "freeze delays: {} seen, p50 {p50:.1} ms, p99 {p99:.1} ms",
            p.freeze_delays_ms.len()
        );
    }
    if let Some(r) = p.releases.last() {
        let _ = writeln!(
            out,
            "last release: {} {}{}: {}",
            r.at.format("%Y-%m-%d %H:%M:%S UTC"),
            r.container_name,
            if r.forced { " (forced)" } else { "" },
            r.what
        );
    }
}

pub fn status(r: &StatusReport) -> String {
    let mut out = String::new();
    let s = &r.state;
    let _ = writeln!(
        out,
        "immich-guard {} (pid {}), up {}",
        r.daemon_version,
        r.pid,
        duration(r.uptime_secs)
    );
    let _ = writeln!(out, "status: {}", r.status_line);
    let docker = if s.docker.reachable {
        format!(
            "reachable at {} (API {})",
            s.docker.host,
            s.docker.api_version.as_deref().unwrap_or("?")
        )
    } else {
        format!(
            "UNREACHABLE at {}: {}",
            s.docker.host,
            s.docker.error.as_deref().unwrap_or("connecting")
        )
    };
    let _ = writeln!(out, "docker: {docker}");
    match &s.last_event {
        Some(e) => {
            let _ = writeln!(
                out,
                "last event: {} {} {} at {}",
                e.kind,
                e.action,
                e.subject,
                e.at.format("%Y-%m-%d %H:%M:%S UTC")
            );
        }
        None => {
            let _ = writeln!(out, "last event: none yet");
        }
    }
    if let Some(snap) = &s.last_snapshot {
        let _ = writeln!(
            out,
            "last snapshot: {} ({}), sealed {}",
            snap.id,
            snap.version,
            snap.sealed_at.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    if let Some(e) = &s.last_snapshot_error {
        let _ = writeln!(out, "LAST SNAPSHOT FAILED: {e}");
    }
    if let Some(d) = &s.drill {
        let _ = writeln!(out, "restore drill: {}", drill_seen(d));
    }
    if let Some(w) = &s.retention_warning {
        let _ = writeln!(out, "RETENTION WARNING: {w}");
    }
    for left in &s.partials_left {
        let _ = writeln!(
            out,
            "PARTIAL SNAPSHOT NOT REMOVED: {}: {} (retried every few minutes and when a snapshot begins)",
            left.path.display(),
            left.error
        );
    }
    // Without a stack the status line has said so; no state of another project is shown.
    if let Some(stack_) = &s.stack {
        match s.current_protection() {
            Some(p) => protection(&mut out, p, s.uploads.as_ref()),
            None => {
                let _ = writeln!(out, "protection: reading the state of {}", stack_.project);
            }
        }
        if let Some(u) = &s.uploads {
            let _ = writeln!(
                out,
                "uploads: {} (read {}, every {} s)",
                u.line(),
                u.read_at.format("%H:%M:%S UTC"),
                crate::uploads::REFRESH.as_secs()
            );
        }
        out.push_str(&stack(stack_));
    }
    out
}

fn drill_seen(d: &crate::status::DrillSeen) -> String {
    match (&d.result, &d.error) {
        _ if d.running => format!("{}: running", d.snapshot),
        (Some(r), _) => format!("{}: {}", d.snapshot, crate::drill::summary(r)),
        (None, Some(e)) => format!("{}: not run: {e}", d.snapshot),
        (None, None) => format!("{}: not drilled yet", d.snapshot),
    }
}

/// The `list` table: id, version, trigger, size, DB size, files, method, hashed, drill, the
/// writers' pause (snapshot/pause.rs: its length, `none`, or `-` when not recorded), age,
/// sealed.
pub fn snapshots(all: &[crate::snapshot::store::Meta]) -> String {
    if all.is_empty() {
        return "no sealed snapshots yet (take one with `immich-guard snapshot`)\n".to_string();
    }
    let mut out = format!(
        "{:<40} {:<10} {:<11} {:>9} {:>9} {:>8} {:<8} {:<7} {:<7} {:>6} {:>7} {}\n",
        "ID",
        "VERSION",
        "TRIGGER",
        "SIZE",
        "DB",
        "FILES",
        "METHOD",
        "HASHED",
        "DRILL",
        "PAUSE",
        "AGE",
        "SEALED"
    );
    let now = chrono::Utc::now();
    for m in all {
        let method = serde_json::to_value(m.storage.method)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<40} {:<10} {:<11} {:>9} {:>9} {:>8} {:<8} {:<7} {:<7} {:>6} {:>7} {}",
            m.id,
            m.version,
            m.trigger,
            bytes(m.size_bytes),
            bytes(m.dump.bytes),
            m.storage.files,
            method,
            hashed(m),
            drilled(m),
            m.pause.as_ref().map_or("-".to_string(), |p| p.short()),
            duration((now - m.sealed_at).num_seconds().max(0) as u64),
            m.sealed_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    out
}

/// The content-hash pass of a snapshot (snapshot/hashes.rs): `ok`, `FAILED` (its check
/// names the problem: `list --json`), or `pending`.
fn hashed(m: &crate::snapshot::store::Meta) -> &'static str {
    match (&m.hashes, &m.check) {
        (Some(_), Some(c)) if c.passed => "ok",
        (Some(_), _) => "FAILED",
        (None, _) => "pending",
    }
}

/// The restore drill of a snapshot (src/drill/): `passed`, `FAILED` (`list --json` or
/// `drill` says why), or `-` when none ran.
fn drilled(m: &crate::snapshot::store::Meta) -> &'static str {
    match &m.drill {
        Some(d) if d.passed => "passed",
        Some(_) => "FAILED",
        None => "-",
    }
}

/// One restore drill for `immich-guard drill`.
pub fn drill(id: &str, r: &crate::snapshot::store::DrillResult) -> String {
    let mut out = format!("drill of {id}: {}\n", crate::drill::summary(r));
    let _ = writeln!(out, "  database image: {}", r.image);
    let _ = writeln!(out, "  scratch database: {}", r.scratch);
    out
}

fn bytes(n: u64) -> String {
    match n {
        n if n < 1 << 10 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1 << 30 => format!("{:.1} MiB", n as f64 / 1048576.0),
        n => format!("{:.1} GiB", n as f64 / 1073741824.0),
    }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// One incident for `immich-guard incident`.
pub fn incident(i: &crate::incident::Incident) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "incident {}: {} ({}) died {} times within {} s, {}",
        i.id,
        i.service,
        i.container,
        i.deaths,
        i.window_secs,
        i.at.format("%Y-%m-%d %H:%M:%S UTC")
    );
    if i.missed_deaths > 0 {
        let _ = writeln!(
            out,
            "{} of these deaths came from Docker's restart count (their events were missed while Docker was unreachable)",
            i.missed_deaths
        );
    }
    let _ = writeln!(out, "bundle: {}", i.dir.join(&i.id).display());
    if let Some(p) = &i.pending {
        let _ = writeln!(out, "update in progress: {p}");
    }
    for h in &i.halted {
        let _ = writeln!(
            out,
            "halted: {} (restart policy was {}; `immich-guard release {}`)",
            h.service, h.restart_policy, h.service
        );
    }
    if i.halted.len() > 1 {
        let _ = writeln!(
            out,
            "release in this order, once the cause is fixed: the database before the server"
        );
    }
    out.push_str(&diagnosis_text(i.cause, &i.findings, &i.notes, &i.decision));
    out
}

/// `immich-guard diagnose` and the diagnosis part of `immich-guard incident`: the cause, every
/// finding with its quoted lines, the notes, and the recommendation with its command.
pub fn diagnosis(d: &crate::diagnose::Diagnosis) -> String {
    diagnosis_text(d.cause, &d.findings, &d.notes, &d.decision)
}

fn diagnosis_text(
    cause: crate::diagnose::Category,
    findings: &[crate::diagnose::Finding],
    notes: &[String],
    decision: &crate::diagnose::Decision,
) -> String {
    use crate::diagnose::Decision;
    let mut out = String::new();
    let _ = writeln!(out, "cause: {cause}");
    if findings.is_empty() {
        let _ = writeln!(out, "diagnosis: no known failure in the logs or the facts");
    }
    for (n, f) in findings.iter().enumerate() {
        let role = if n == 0 { "" } else { " (also seen)" };
        let _ = writeln!(out, "diagnosis: {}{role} ({} lines)", f.category, f.count);
        for line in &f.lines {
            let _ = writeln!(out, "  > {line}");
        }
    }
    for note in notes {
        let _ = writeln!(out, "note: {note}");
    }
    let _ = match decision {
        Decision::Restore {
            why, command, cost, ..
        } => writeln!(
            out,
            "recommended: restore\n  {why}\n  run: {command}\n  cost: {cost}"
        ),
        Decision::Rollback { why, command, .. } => {
            writeln!(out, "recommended: roll back\n  {why}\n  run: {command}")
        }
        Decision::FixForward { hint, why, command } => writeln!(
            out,
            "recommended: fix forward\n  {why}\n  {hint}\n  then: {command}"
        ),
        Decision::Unknown { why, options } => {
            let _ = writeln!(
                out,
                "recommended: nothing yet (not enough is known to choose; restore is never the default)\n  {why}"
            );
            for o in options {
                let _ = writeln!(out, "  option {}: {} ({})", o.action, o.command, o.cost);
            }
            Ok(())
        }
    };
    out
}

/// The `verify` checklist: one line per check with its outcome and numbers, then the verdict.
pub fn verify(r: &crate::verify::Report) -> String {
    use crate::verify::Outcome;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "verify {}: {}{}",
        r.project,
        r.baseline_note,
        r.server_url
            .as_ref()
            .map(|u| format!("; server at {u}"))
            .unwrap_or_default()
    );
    for c in &r.checks {
        let mark = match c.outcome {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skipped => "SKIP",
        };
        let _ = writeln!(out, "  [{mark}] {:<11} {}", c.name, c.detail);
    }
    let failed = r.failures().count();
    let _ = if failed == 0 {
        writeln!(out, "PASSED: {} checks, none failed", r.checks.len())
    } else {
        writeln!(out, "FAILED: {failed} of {} checks failed", r.checks.len())
    };
    if let Some(n) = &r.not_restored {
        not_restored(&mut out, n);
    }
    out
}

/// After a restore: what only the pre-restore snapshot holds.
fn not_restored(out: &mut String, n: &crate::verify::not_restored::NotRestored) {
    const SHOWN: usize = 20;
    let count = match (n.count, &n.error) {
        (Some(count), _) => count,
        (None, e) => {
            let _ = writeln!(
                out,
                "uploaded after the restored snapshot: cannot tell ({}), compared with pre-restore snapshot {}",
                e.as_deref().unwrap_or("unknown"),
                n.pre_restore
            );
            return;
        }
    };
    if count == 0 {
        let _ = writeln!(
            out,
            "uploaded after the restored snapshot: none (every asset of pre-restore snapshot {} is in the database)",
            n.pre_restore
        );
        return;
    }
    let _ = writeln!(
        out,
        "UPLOADED AFTER THE RESTORED SNAPSHOT: {count} asset(s) only in pre-restore snapshot {}; phones that still have them upload them again (its storage/ holds the files):",
        n.pre_restore
    );
    for a in n.assets.iter().take(SHOWN) {
        let _ = writeln!(out, "  {}  {}  {}", a.id, a.owner, a.original_path);
    }
    if count > SHOWN {
        let _ = writeln!(
            out,
            "  … and {} more (`verify --json` lists up to {})",
            count - SHOWN,
            crate::verify::not_restored::LISTED
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: crate::status::DaemonState) -> StatusReport {
        StatusReport::from_state(&state)
    }

    #[test]
    fn without_a_stack_status_says_so_once_and_shows_no_other_projects_state() {
        let mut s = crate::status::DaemonState::new("unix:///var/run/docker.sock".into());
        s.docker.reachable = true;
        s.docker.api_version = Some("1.41".into());
        s.discovery_error = Some("no Immich stack found".into());
        s.protection = crate::protect::Protection {
            baseline: Some(crate::protect::Baseline {
                version: "v1.119.0".into(),
                image_id: "sha256:gone".into(),
            }),
            ..crate::protect::Protection::fresh("vanished")
        };
        let text = status(&report(s));
        assert_eq!(text.matches("no stack").count(), 1, "{text}");
        assert!(
            text.contains("status: no stack to protect: no Immich stack found"),
            "{text}"
        );
        for absent in [
            "v1.119.0",
            "baseline",
            "database runs with",
            "protection",
            "vanished",
        ] {
            assert!(!text.contains(absent), "{absent} in:\n{text}");
        }
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(65), "1m5s");
        assert_eq!(duration(7200 + 60), "2h1m");
        assert_eq!(duration(90000), "1d1h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }

    #[test]
    fn verify_checklist_has_one_line_per_check_and_a_verdict() {
        use crate::verify::{Check, Outcome, Report};
        let check = |name: &str, outcome, detail: &str| Check {
            name: name.into(),
            outcome,
            detail: detail.into(),
        };
        let report = Report {
            project: "immich".into(),
            against: Some("snap".into()),
            baseline_note: "snapshot snap (--against)".into(),
            expected_version: Some("v1.119.0".into()),
            server_url: Some("http://172.18.0.5:2283".into()),
            at: chrono::Utc::now(),
            passed: false,
            checks: vec![
                check("ping", Outcome::Pass, "/api/server/ping answered pong"),
                check("assets", Outcome::Fail, "0 now, 40000 in the snapshot"),
                check("schema", Outcome::Skipped, "skipped: not in this image"),
            ],
            not_restored: None,
        };
        assert_eq!(
            verify(&report),
            "verify immich: snapshot snap (--against); server at http://172.18.0.5:2283\n\
             \x20 [PASS] ping        /api/server/ping answered pong\n\
             \x20 [FAIL] assets      0 now, 40000 in the snapshot\n\
             \x20 [SKIP] schema      skipped: not in this image\n\
             FAILED: 1 of 3 checks failed\n"
        );
        // After a restore: the assets only the pre-restore snapshot holds, the first 20.
        use crate::verify::not_restored::{LostAsset, NotRestored};
        let mut report = report;
        let lost = |i: usize| LostAsset {
            id: format!("id-{i}"),
            owner: "phone@example.com".into(),
            original_path: format!("/data/upload/u/{i}.jpg"),
            uploaded_at: None,
        };
        report.not_restored = Some(NotRestored {
            pre_restore: "pre".into(),
            count: Some(22),
            assets: (0..22).map(lost).collect(),
            error: None,
        });
        let text = verify(&report);
        assert!(text.contains("UPLOADED AFTER THE RESTORED SNAPSHOT: 22 asset(s) only in pre-restore snapshot pre;"), "{text}");
        assert!(text.contains("\n  id-19  phone@example.com  /data/upload/u/19.jpg\n  … and 2 more (`verify --json` lists up to 1000)\n"), "{text}");
        assert!(!text.contains("id-20"), "{text}");
    }

    #[test]
    fn the_list_says_whether_each_snapshot_is_hashed_and_its_check_passed() {
        use crate::snapshot::hashes::ContentHashes;
        use crate::snapshot::store::{SnapshotCheck, tests::meta};
        let at = chrono::Utc::now();
        let hashed = |passed| {
            let mut m = meta(if passed { "good" } else { "bad" }, at);
            m.hashes = Some(ContentHashes {
                sha256: String::new(),
                files: 1,
                bytes: 1,
                problems: u64::from(!passed),
                at,
                duration_ms: 1,
            });
            m.check = Some(SnapshotCheck {
                kind: "content-hashes".into(),
                at,
                passed,
                summary: String::new(),
            });
            m
        };
        let text = snapshots(&[hashed(true), hashed(false), meta("new", at)]);
        let column = |id: &str| {
            let line = text.lines().find(|l| l.starts_with(id)).unwrap();
            line.split_whitespace().nth(9).unwrap().to_string()
        };
        assert!(text.lines().next().unwrap().contains("HASHED"), "{text}");
        assert_eq!(column("good"), "ok", "{text}");
        assert_eq!(column("bad"), "FAILED", "{text}");
        assert_eq!(column("new"), "pending", "{text}");
        // The drill column beside it.
        let mut drilled = meta("drilled", at);
        drilled.drill = Some(crate::snapshot::store::tests::drill(true, at));
        let mut failed = meta("failed", at);
        failed.drill = Some(crate::snapshot::store::tests::drill(false, at));
        let text = snapshots(&[drilled, failed, meta("new", at)]);
        let drill = |id: &str| {
            let line = text.lines().find(|l| l.starts_with(id)).unwrap();
            line.split_whitespace().nth(10).unwrap().to_string()
        };
        assert!(text.lines().next().unwrap().contains("DRILL"), "{text}");
        assert_eq!(drill("drilled"), "passed", "{text}");
        assert_eq!(drill("failed"), "FAILED", "{text}");
        assert_eq!(drill("new"), "-", "{text}");
    }

    #[test]
    fn the_list_shows_how_long_the_writers_were_paused() {
        use crate::snapshot::pause::{Pause, PauseMethod};
        use crate::snapshot::store::tests::meta;
        let at = chrono::Utc::now();
        let paused = |id, method, duration_ms| {
            let mut m = meta(id, at);
            m.pause = Some(Pause {
                method,
                containers: vec!["immich_server".into()],
                duration_ms,
                notes: Vec::new(),
            });
            m
        };
        let text = snapshots(&[
            paused("paused", PauseMethod::DockerPause, 1840),
            paused("frozen", PauseMethod::None, 0),
            meta("older", at),
        ]);
        let column = |id: &str| {
            let line = text.lines().find(|l| l.starts_with(id)).unwrap();
            line.split_whitespace().nth(11).unwrap().to_string()
        };
        assert!(text.lines().next().unwrap().contains("PAUSE"), "{text}");
        assert_eq!(column("paused"), "1.8s", "{text}");
        assert_eq!(column("frozen"), "none", "{text}");
        // A snapshot of an older version recorded no pause.
        assert_eq!(column("older"), "-", "{text}");
    }
}
