//! The rest of the engine: Immich stacks that are not this test process's (an admin's real
//! one, another checkout's test run, a kept stack), and the cleanup of everything the harness
//! ever made.

use super::compose::{
    KEPT_LIST, KEPT_MARKER, OWNER_LABEL, STACK_DIR_PREFIX, TEST_LABEL, docker, lines, pid_alive,
    remove_tree,
};
use super::{deps, images};

/// Prefix of a daemon's temp dir in [`super::guard::Guard`] (`<tmp>/immich-guard-daemon-<pid>-…`).
pub const GUARD_DIR_PREFIX: &str = "immich-guard-daemon-";

/// A compose project with an Immich server container that this process did not start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignStack {
    pub project: String,
    /// The pid in our owner label: a stack of the harness (another test process, or left over).
    pub owner: Option<String>,
}

impl ForeignStack {
    /// Made by the harness and its test process is gone (a kept stack, or a crashed run).
    pub fn ours_left_over(&self) -> bool {
        self.owner.as_deref().is_some_and(|pid| !pid_alive(pid))
    }

    fn describe(&self) -> String {
        match &self.owner {
            Some(pid) if pid_alive(pid) => {
                format!(
                    "{} (a test stack of running test process {pid})",
                    self.project
                )
            }
            Some(_) => format!("{} (a test stack left over by this harness)", self.project),
            None => format!("{} (not a test stack)", self.project),
        }
    }
}

/// Compose projects whose server discovery would count (an image repository ending in
/// `immich-server`, or the service `immich-server`; any state), minus this process's own.
pub fn foreign_stacks() -> Vec<ForeignStack> {
    let format = format!(
        "{{{{.Label \"com.docker.compose.project\"}}}}\t{{{{.Label \"com.docker.compose.service\"}}}}\t{{{{.Image}}}}\t{{{{.Label \"{OWNER_LABEL}\"}}}}\t{{{{.Label \"{TEST_LABEL}\"}}}}"
    );
    let me = std::process::id().to_string();
    let mut found: Vec<ForeignStack> = lines(&docker(&[
        "ps",
        "-a",
        "--filter",
        "label=com.docker.compose.project",
        "--format",
        &format,
    ]))
    .into_iter()
    .filter_map(|l| {
        let f: Vec<&str> = l.split('\t').collect();
        let (project, service, image) = (*f.first()?, *f.get(1)?, *f.get(2)?);
        let owner = f.get(3).map(|s| s.trim()).filter(|s| !s.is_empty());
        let server = immich_guard::image_ref::ImageRef::parse(image).is_server()
            || service == "immich-server";
        (server && !project.is_empty() && owner != Some(me.as_str())).then(|| ForeignStack {
            project: project.to_string(),
            owner: owner.map(str::to_string),
        })
    })
    .collect();
    found.sort_by(|a, b| a.project.cmp(&b.project));
    found.dedup();
    found
}

/// For tests that need to be the only Immich stack on the engine (zero config): `true` (the
/// test should return) when another one is there, with one clear line. Under `CI=true` a
/// stack the harness left over fails the test instead (CI must start clean); anything else
/// (an admin's stack, a parallel run's) is a skip everywhere.
pub fn foreign_stack_present(test: &str) -> bool {
    // Leftovers of crashed runs go first; what stays of ours is a kept stack.
    super::compose::remove_leftovers();
    let found = foreign_stacks();
    if found.is_empty() {
        return false;
    }
    let list: Vec<String> = found.iter().map(ForeignStack::describe).collect();
    let leftover = found.iter().any(ForeignStack::ours_left_over);
    assert!(
        !(deps::ci() && leftover),
        "{test}: CI=true and a test stack of an earlier run is still on the engine: {}; \
         remove it with `cargo test --test standin -- --ignored --exact cleanup`",
        list.join(", ")
    );
    deps::skip(&format!(
        "another Immich stack is on this engine (zero-config discovery would see it): {}",
        list.join(", ")
    ));
    deps::write_stderr(&format!(
        "immich-guard: {test} skipped: another Immich stack is on this engine: {}\n",
        list.join(", ")
    ));
    true
}

/// What [`cleanup`] removed, and what it left because a live test process owns it.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub removed: Vec<String>,
    pub left: Vec<String>,
}

/// Removes everything the harness made on this engine and in the temp dir: containers,
/// networks and volumes with our labels (kept stacks too), images with our labels, stack and
/// daemon temp dirs, the kept-stacks list and the image lock. Things owned by a test process
/// that still runs are left (and listed). With `IMMICH_GUARD_TEST_IMAGE_PREFIX` set, only the
/// images under that prefix go, so one checkout does not remove another's.
pub fn cleanup() -> Cleaned {
    let mut done = Cleaned::default();
    let ours = format!("label={TEST_LABEL}=1");
    let owner = format!("label={OWNER_LABEL}");
    for (kind, filter) in [("container", &ours), ("container", &owner)] {
        let format = format!("{{{{.ID}}}}\t{{{{.Names}}}}\t{{{{.Label \"{OWNER_LABEL}\"}}}}");
        for l in lines(&docker(&[
            "ps", "-a", "--filter", filter, "--format", &format,
        ])) {
            let f: Vec<&str> = l.split('\t').collect();
            let (id, name, pid) = (f[0], f.get(1).unwrap_or(&""), f.get(2).unwrap_or(&""));
            if !pid.is_empty() && pid_alive(pid) {
                done.left
                    .push(format!("{kind} {name} (test process {pid} runs)"));
            } else if docker(&["rm", "-f", "-v", id]).status.success() {
                done.removed.push(format!("{kind} {name}"));
            }
        }
    }
    for kind in ["network", "volume"] {
        let format = format!("{{{{.Name}}}}\t{{{{.Label \"{OWNER_LABEL}\"}}}}");
        for filter in [&ours, &owner] {
            for l in lines(&docker(&[
                kind, "ls", "--filter", filter, "--format", &format,
            ])) {
                let (name, pid) = l.split_once('\t').unwrap_or((l.as_str(), ""));
                if !pid.is_empty() && pid_alive(pid) {
                    done.left
                        .push(format!("{kind} {name} (test process {pid} runs)"));
                } else if docker(&[kind, "rm", name]).status.success() {
                    done.removed.push(format!("{kind} {name}"));
                }
            }
        }
    }
    done.left.sort();
    done.left.dedup();
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(STACK_DIR_PREFIX)
            .or_else(|| name.strip_prefix(GUARD_DIR_PREFIX))
        else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if pid_alive(pid) {
            done.left.push(format!(
                "dir {} (test process {pid} runs)",
                entry.path().display()
            ));
            continue;
        }
        let kept = if entry.path().join(KEPT_MARKER).exists() {
            " (a kept stack)"
        } else {
            ""
        };
        remove_tree(&entry.path());
        done.removed
            .push(format!("dir {}{kept}", entry.path().display()));
    }
    // Images are shared by every test process: while one runs, they stay. Last, because
    // removing a root-owned tree without root needs the base image.
    if done.left.is_empty() {
        cleanup_images(&mut done);
        for file in [KEPT_LIST, images::LOCK_PATH] {
            if std::fs::remove_file(file).is_ok() {
                done.removed.push(format!("file {file}"));
            }
        }
    } else {
        done.left
            .push("images, the image lock (a test process runs; they are shared)".to_string());
    }
    done
}

/// Images with our labels: tagged ones by tag (only under the prefix when one is set), then
/// the untagged ones.
fn cleanup_images(done: &mut Cleaned) {
    let scoped = std::env::var("IMMICH_GUARD_TEST_IMAGE_PREFIX").is_ok_and(|p| !p.is_empty());
    let prefix = images::prefix();
    let mut listed = Vec::new();
    for label in [format!("{TEST_LABEL}=1"), images::CONTENT_LABEL.to_string()] {
        let filter = format!("label={label}");
        listed.extend(lines(&docker(&[
            "images",
            "--filter",
            &filter,
            "--format",
            "{{.Repository}}:{{.Tag}}\t{{.ID}}",
        ])));
    }
    listed.sort();
    listed.dedup();
    for l in listed {
        let (tag, id) = l.split_once('\t').unwrap_or((l.as_str(), ""));
        let what = if tag.contains("<none>") { id } else { tag };
        if scoped && !tag.starts_with(&prefix) {
            continue;
        }
        let out = docker(&["rmi", what]);
        if out.status.success() {
            done.removed.push(format!("image {what}"));
        } else if !String::from_utf8_lossy(&out.stderr).contains("No such image") {
            done.left.push(format!(
                "image {what} ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
}

/// `cleanup` and a report on stderr.
pub fn cleanup_and_report() {
    let done = cleanup();
    let mut text = format!(
        "immich-guard cleanup: removed {} thing(s) the test harness made\n",
        done.removed.len()
    );
    for r in &done.removed {
        text.push_str(&format!("  removed {r}\n"));
    }
    for l in &done.left {
        text.push_str(&format!("  left    {l}\n"));
    }
    deps::write_stderr(&text);
}
