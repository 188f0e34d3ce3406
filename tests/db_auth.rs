//! Authentication as deployed (issue 11 item 5): a database whose `pg_hba.conf` asks for a
//! password on its local socket too (initdb `--auth-local=scram-sha-256`, as a hardened
//! install does). The daemon's snapshot must dump it with the discovered password, passed in
//! the exec's environment: never on a command line (where every process in the container and
//! `docker top` can read it), in a log or in the status. When the database says no, the
//! error names what was being done and says what PostgreSQL said (issue 18), never the
//! password.

mod harness;

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use harness::compose::ScratchPostgres;
use harness::guard::Guard;
use harness::{Stack, docker_available};
use immich_guard::discover::DbAccess;
use immich_guard::snapshot::db::{DbError, facts};
use immich_guard::snapshot::store::Meta;

/// Rows of filler: enough that pg_dumpall runs long enough to be seen in the process list.
const FILLER_ROWS: u32 = 150_000;

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker")
}

/// psql in the database container over the local socket; with `password`, given as
/// `PGPASSWORD` through the docker CLI's own environment (`-e NAME` without a value).
fn local_psql(stack: &Stack, password: Option<&str>, sql: &str) -> Output {
    let db = stack.container_name("database");
    let mut c = Command::new("docker");
    c.arg("exec");
    if let Some(p) = password {
        c.env("PGPASSWORD", p).args(["-e", "PGPASSWORD"]);
    }
    c.args([&db, "psql", "-X", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
        .args(["-d", "immich", "-tAc", sql])
        .stdin(Stdio::null())
        .output()
        .expect("run docker exec psql")
}

#[test]
fn snapshot_of_a_database_that_wants_a_password_on_its_socket() {
    if !docker_available() {
        return;
    }
    let stack = Stack::up_hardened("v1.119.0");
    let password = stack.db_password.clone();
    let db = stack.container_name("database");

    // The hardening is real: no password, no entry, exactly what pg_dumpall met before.
    let out = local_psql(&stack, None, "SELECT 1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no password supplied"),
        "{out:?}"
    );
    let out = local_psql(
        &stack,
        Some(&password),
        &format!(
            "CREATE TABLE filler AS SELECT i, repeat(md5(i::text), 8) AS pad FROM generate_series(1, {FILLER_ROWS}) i"
        ),
    );
    assert!(out.status.success(), "{out:?}");

    let snapshots = tempfile::tempdir().unwrap();
    let guard = Guard::watching(&stack, snapshots.path(), "");
    guard.wait_status("a baseline", Duration::from_secs(60), |s| {
        s.state.protection.baseline.is_some()
    });

    // Every process's command line in the database container, sampled in a loop inside it
    // for as long as the snapshot runs, and `docker top` from outside.
    let sampler = "while [ ! -e /tmp/stop-sampling ]; do for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < \"$f\"; echo; done; done > /tmp/cmdlines 2>/dev/null";
    assert!(
        docker(&["exec", "-d", &db, "sh", "-c", sampler])
            .status
            .success()
    );
    let done = AtomicBool::new(false);
    let (out, tops) = std::thread::scope(|s| {
        let top = s.spawn(|| {
            let mut seen = String::new();
            while !done.load(Ordering::Relaxed) {
                let o = docker(&["top", &db, "-eo", "pid,args"]);
                seen.push_str(&String::from_utf8_lossy(&o.stdout));
            }
            seen
        });
        let out = guard.cli(&["snapshot", "--json"]);
        done.store(true, Ordering::Relaxed);
        (out, top.join().unwrap())
    });
    assert!(
        docker(&["exec", &db, "touch", "/tmp/stop-sampling"])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    let cmdlines = String::from_utf8_lossy(&docker(&["exec", &db, "cat", "/tmp/cmdlines"]).stdout)
        .into_owned();

    assert!(
        out.status.success(),
        "snapshot failed: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        guard.log()
    );
    let meta: Meta = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(meta.version, "v1.119.0");
    assert!(
        meta.db
            .migrations
            .iter()
            .any(|m| m == "1729000000000-AddAssetJobStatus"),
        "{:?}",
        meta.db.migrations
    );
    assert!(meta.db.assets.unwrap() > 0, "{:?}", meta.db.assets);
    let dump = zstd::decode_all(
        std::fs::File::open(snapshots.path().join(&meta.id).join("db.sql.zst")).unwrap(),
    )
    .unwrap();
    let sql = String::from_utf8_lossy(&dump);
    assert!(
        sql.contains("CREATE TABLE public.filler"),
        "the dump is whole"
    );
    assert!(
        sql.contains(&format!("{FILLER_ROWS}\t")),
        "the filler rows are in the dump"
    );

    // The password is on no command line while pg_dumpall ran, which the samples saw.
    let unique: std::collections::BTreeSet<&str> = cmdlines.lines().collect();
    assert!(
        unique.iter().any(|l| l.contains("pg_dumpall")),
        "the sampler never saw pg_dumpall run; samples:\n{unique:#?}"
    );
    for (what, text) in [
        ("/proc/*/cmdline", cmdlines.as_str()),
        ("docker top", &tops),
    ] {
        assert!(!text.contains(&password), "the password is in {what}");
    }
    eprintln!(
        "sampled {} distinct command lines, {} docker top bytes; pg_dumpall seen in docker top: {}",
        unique.len(),
        tops.len(),
        tops.contains("pg_dumpall")
    );

    // Nor in the daemon's log or the status, as text or JSON.
    assert!(
        !guard.log().contains(&password),
        "the password is in the log"
    );
    for args in [&["status"][..], &["status", "--json"], &["list", "--json"]] {
        let out = guard.cli(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains(&password), "the password is in {args:?}");
    }
    let meta_json =
        std::fs::read_to_string(snapshots.path().join(&meta.id).join("meta.json")).unwrap();
    assert!(
        !meta_json.contains(&password),
        "the password is in meta.json"
    );
}

/// `facts` against a real PostgreSQL, as `user` with `password` on `database`.
fn facts_error(db: &ScratchPostgres, user: &str, password: &str, database: &str) -> DbError {
    let access = DbAccess {
        user: user.into(),
        password: password.into(),
        password_known: true,
        database: database.into(),
        host: Some(db.ip()),
        port: 5432,
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(facts(&access))
        .expect_err("PostgreSQL refuses")
}

#[test]
fn database_errors_name_the_operation_and_postgresqls_own_words() {
    if !docker_available() {
        return;
    }
    let db = ScratchPostgres::start();
    // A role that may log in but not read the asset table.
    db.psql(
        "postgres",
        "CREATE TABLE asset (id int); CREATE ROLE reader LOGIN PASSWORD 'R3ader!pass@x'",
    );
    let wrong = "Wr0ng!pass@word";
    let cases = [
        (
            facts_error(&db, "postgres", wrong, "postgres"),
            "connecting to the database at",
            r#"FATAL: password authentication failed for user "postgres" (SQLSTATE 28P01)"#,
        ),
        (
            facts_error(&db, "postgres", "scratch", "nosuchdb"),
            "connecting to the database at",
            r#"FATAL: database "nosuchdb" does not exist (SQLSTATE 3D000)"#,
        ),
        (
            facts_error(&db, "reader", "R3ader!pass@x", "postgres"),
            "counting assets: ",
            "ERROR: permission denied for table asset (SQLSTATE 42501)",
        ),
    ];
    for (e, operation, words) in &cases {
        let message = e.to_string();
        eprintln!("{message}");
        assert!(message.contains(operation), "{message}");
        assert!(message.contains(words), "{message}");
        assert!(!message.contains("db error"), "{message}");
        assert!(!e.is_transient(), "{message}");
        for password in [wrong, "R3ader!pass@x", "scratch"] {
            assert!(!message.contains(password), "{message}");
        }
    }
}
