//! The database half of a restore (docs/recovery.md §5): everything runs inside the database
//! container through the Docker exec API, with the password in the exec's environment only.
//! The dump is decompressed on a thread and streamed into `psql` on stdin, never held whole;
//! on the way the documented `search_path` fix is applied, and the connecting role's own
//! `DROP ROLE`/`CREATE ROLE` lines are left out (a role cannot drop itself, nor be created
//! twice; `ALTER ROLE` still gives it the snapshot's attributes and password).
//! `ON_ERROR_STOP` makes psql stop at the first SQL error, which is shown as it said it.

use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::RestoreError;
use crate::discover::DbAccess;
use crate::snapshot::db::exec_env;

/// pg_dumpall sets an empty search_path, which breaks Immich's functions that name tables
/// unqualified; Immich's restore documentation replaces the line with this one.
const SEARCH_PATH_DUMPED: &[u8] = b"SELECT pg_catalog.set_config('search_path', '', false);";
const SEARCH_PATH_FIXED: &[u8] =
    b"SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);";
/// Bytes per chunk handed to the exec's stdin.
const CHUNK: usize = 1 << 20;
const STDERR_KEPT: usize = 8192;
/// `application_name` of the replay's sessions, so a replay cut off by a kill (whose psql
/// goes on with what it had received) can be found and ended before the next one.
const REPLAY_APP: &str = "immich-guard-restore";

/// What the replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub sql_bytes: u64,
    pub duration_ms: u64,
}

/// `name` as PostgreSQL's `quote_ident` writes it: bare when it is a plain lower-case
/// identifier, else double-quoted with quotes doubled.
pub fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain
        && !matches!(
            name,
            "user" | "all" | "select" | "table" | "order" | "group"
        )
    {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Rewrites one line of the dump (with its line ending) for the replay.
fn rewrite_line<'a>(line: &'a [u8], own_role: &[Vec<u8>]) -> std::borrow::Cow<'a, [u8]> {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    if body == SEARCH_PATH_DUMPED {
        let mut fixed = SEARCH_PATH_FIXED.to_vec();
        fixed.push(b'\n');
        return fixed.into();
    }
    if own_role.iter().any(|r| body == r.as_slice()) {
        let mut skipped = b"-- immich-guard: kept the connecting role: ".to_vec();
        skipped.extend_from_slice(body);
        skipped.push(b'\n');
        return skipped.into();
    }
    line.into()
}

fn own_role_lines(user: &str) -> Vec<Vec<u8>> {
    let mut forms = vec![quote_ident(user)];
    let quoted = format!("\"{}\"", user.replace('"', "\"\""));
    if !forms.contains(&quoted) {
        forms.push(quoted);
    }
    forms
        .iter()
        .flat_map(|r| {
            [
                format!("DROP ROLE IF EXISTS {r};").into_bytes(),
                format!("DROP ROLE {r};").into_bytes(),
                format!("CREATE ROLE {r};").into_bytes(),
            ]
        })
        .collect()
}

/// Output of a finished exec: (exit code, stdout, stderr tail).
async fn collect(
    docker: &Docker,
    host: &str,
    id: &str,
    mut output: crate::docker::ExecOutput,
) -> Result<(i64, String, String), String> {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    while let Some(item) = output.next().await {
        match item {
            Ok(bollard::container::LogOutput::StdOut { message }) => {
                if stdout.len() < 1 << 20 {
                    stdout.extend_from_slice(&message);
                }
            }
            Ok(bollard::container::LogOutput::StdErr { message }) => {
                stderr.extend_from_slice(&message);
                if stderr.len() > 2 * STDERR_KEPT {
                    stderr.drain(..stderr.len() - STDERR_KEPT);
                }
            }
            Ok(_) => {}
            Err(e) => return Err(crate::docker::classify(host, e).to_string()),
        }
    }
    let code = exit_code(docker, host, id).await?;
    Ok((
        code,
        String::from_utf8_lossy(&stdout).trim().to_string(),
        String::from_utf8_lossy(&stderr).trim().to_string(),
    ))
}

/// The exec's exit code once the engine has it (the output can end a moment before).
async fn exit_code(docker: &Docker, host: &str, id: &str) -> Result<i64, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let inspect = docker
            .inspect_exec(id)
            .await
            .map_err(|e| crate::docker::classify(host, e).to_string())?;
        if inspect.running != Some(true) || Instant::now() > deadline {
            return Ok(inspect.exit_code.unwrap_or(-1));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs one psql command (`-c sql`) in `container` against `dbname`; its output, or its error.
/// `tcp` connects to 127.0.0.1 instead of the socket: the official image's entrypoint runs a
/// socket-only server while it initialises a cluster, so TCP answers only the real one.
pub async fn psql(
    docker: &Docker,
    host: &str,
    container: &str,
    access: &DbAccess,
    dbname: &str,
    sql: &str,
    tcp: bool,
) -> Result<String, String> {
    let mut cmd: Vec<String> = ["psql", "-X", "-tA", "-v", "ON_ERROR_STOP=1", "--username"]
        .map(String::from)
        .to_vec();
    cmd.push(access.user.clone());
    cmd.extend(["--dbname".into(), dbname.into()]);
    if tcp {
        cmd.extend(["--host".into(), "127.0.0.1".into()]);
    }
    cmd.extend(["-c".into(), sql.into()]);
    let (id, output) =
        crate::docker::exec_attached(docker, host, container, cmd, exec_env(access), None)
            .await
            .map_err(|e| e.to_string())?;
    let (code, stdout, stderr) = collect(docker, host, &id, output).await?;
    if code == 0 {
        Ok(stdout)
    } else {
        Err(if stderr.is_empty() {
            format!("psql exited with code {code}")
        } else {
            stderr
        })
    }
}

/// The last `lines` lines of the container's log (stdout and stderr), joined by " | ": what
/// PostgreSQL said when it refused to start.
pub async fn log_tail(docker: &Docker, container: &str, lines: usize) -> String {
    let options = bollard::query_parameters::LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail(&lines.to_string())
        .build();
    let mut stream = docker.logs(container, Some(options));
    let mut text = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
    }
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Waits until the database in `container` answers a query, or says why it does not.
pub async fn wait_ready(
    docker: &Docker,
    host: &str,
    container: &str,
    access: &DbAccess,
    tcp: bool,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match crate::snapshot::db::ensure_running(docker, host, container).await {
            Err(e) => e.to_string(),
            Ok(()) => {
                match psql(docker, host, container, access, "postgres", "SELECT 1", tcp).await {
                    Ok(_) => return Ok(()),
                    Err(e) => e,
                }
            }
        };
        if Instant::now() > deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Ends the sessions of an earlier replay (cut off by a kill, its psql still working through
/// what it had received), waiting until none is left.
pub async fn end_earlier_replays(
    docker: &Docker,
    host: &str,
    container: &str,
    access: &DbAccess,
) -> Result<u64, RestoreError> {
    let sql = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{REPLAY_APP}' AND pid <> pg_backend_pid()"
    );
    let mut ended = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: u64 = psql(docker, host, container, access, "postgres", &sql, false)
            .await
            .map_err(|detail| RestoreError::Sql {
                container: container.to_string(),
                what: "ending an earlier replay's sessions".into(),
                detail,
            })?
            .trim()
            .parse()
            .unwrap_or(0);
        if n == 0 || Instant::now() > deadline {
            return Ok(ended);
        }
        ended += n;
        // psql may reconnect (`\connect`) before it sees the end of its input.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Drops the Immich database (terminating any session still in it), so the dump's own
/// `CREATE DATABASE` starts from nothing.
pub async fn drop_database(
    docker: &Docker,
    host: &str,
    container: &str,
    access: &DbAccess,
) -> Result<(), RestoreError> {
    // The maintenance database itself cannot be dropped; the dump's --clean empties it.
    if access.database == "postgres" {
        return Ok(());
    }
    let sql = format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(&access.database)
    );
    psql(docker, host, container, access, "postgres", &sql, false)
        .await
        .map(|_| ())
        .map_err(|detail| RestoreError::Sql {
            container: container.to_string(),
            what: format!("dropping database {}", access.database),
            detail,
        })
}

/// Streams the dump at `dump` (zstd) into psql in `container`, connected to `postgres`.
/// `on_started` is called once the first chunk is in (the test hook for a kill mid-replay).
pub async fn replay(
    docker: &Docker,
    host: &str,
    container: &str,
    access: &DbAccess,
    dump: &Path,
    on_started: &mut (dyn FnMut() + Send),
) -> Result<Replayed, RestoreError> {
    let started = Instant::now();
    let exec_err = |detail: String| RestoreError::Sql {
        container: container.to_string(),
        what: "starting psql".into(),
        detail,
    };
    let cmd: Vec<String> = [
        "psql",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "--username",
        &access.user,
        "--dbname",
        "postgres",
    ]
    .map(String::from)
    .to_vec();
    let mut env = exec_env(access).unwrap_or_default();
    env.push(format!("PGAPPNAME={REPLAY_APP}"));
    let (id, output, mut input) =
        crate::docker::exec_piped(docker, host, container, cmd, Some(env))
            .await
            .map_err(|e| exec_err(e.to_string()))?;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let reader = {
        let dump = dump.to_path_buf();
        let own = own_role_lines(&access.user);
        tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let file = std::fs::File::open(&dump)?;
            let mut lines =
                std::io::BufReader::with_capacity(1 << 20, zstd::stream::Decoder::new(file)?);
            let mut chunk = Vec::with_capacity(CHUNK + 4096);
            let mut line = Vec::new();
            let mut total = 0u64;
            loop {
                line.clear();
                if lines.read_until(b'\n', &mut line)? == 0 {
                    break;
                }
                total += line.len() as u64;
                chunk.extend_from_slice(&rewrite_line(&line, &own));
                if chunk.len() >= CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK + 4096));
                    if tx.blocking_send(full).is_err() {
                        return Ok(total); // psql went away; its error is reported
                    }
                }
            }
            // psql reads until told to quit: not every engine passes the end of stdin on.
            chunk.extend_from_slice(b"\n\\q\n");
            let _ = tx.blocking_send(chunk);
            Ok(total)
        })
    };
    let writer = async {
        let mut first = true;
        while let Some(chunk) = rx.recv().await {
            if input.write_all(&chunk).await.is_err() {
                break; // psql stopped (at an error): the output says why
            }
            if first {
                first = false;
                on_started();
            }
        }
        drop(rx);
        let _ = input.flush().await;
        let _ = input.shutdown().await;
    };
    let (_, collected) = tokio::join!(writer, collect(docker, host, &id, output));
    let sql_bytes = reader
        .await
        .map_err(|e| exec_err(format!("dump reader thread: {e}")))?
        .map_err(|source| RestoreError::ReadDump {
            path: dump.to_path_buf(),
            source,
        })?;
    let (code, _, stderr) = collected.map_err(exec_err)?;
    if code != 0 {
        return Err(RestoreError::Replay {
            container: container.to_string(),
            code,
            stderr,
        });
    }
    Ok(Replayed {
        sql_bytes,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_path_line_is_fixed_as_documented_and_nothing_else_changes() {
        let own = own_role_lines("postgres");
        let line = b"SELECT pg_catalog.set_config('search_path', '', false);\n";
        assert_eq!(
            &*rewrite_line(line, &own),
            b"SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);\n"
        );
        let other = b"INSERT INTO t VALUES ('SELECT pg_catalog.set_config(''search_path'', '''', false);');\n";
        assert_eq!(&*rewrite_line(other, &own), &other[..]);
        assert_eq!(&*rewrite_line(b"COPY x\n", &own), b"COPY x\n");
    }

    #[test]
    fn the_connecting_role_is_neither_dropped_nor_created_again() {
        let own = own_role_lines("postgres");
        for line in [
            &b"DROP ROLE IF EXISTS postgres;\n"[..],
            b"CREATE ROLE postgres;\n",
        ] {
            assert!(rewrite_line(line, &own).starts_with(b"-- immich-guard:"));
        }
        let alter = b"ALTER ROLE postgres WITH SUPERUSER LOGIN PASSWORD 'x';\n";
        assert_eq!(&*rewrite_line(alter, &own), &alter[..]);
        assert_eq!(
            &*rewrite_line(b"DROP ROLE IF EXISTS reader;\n", &own),
            b"DROP ROLE IF EXISTS reader;\n"
        );
        let quoted = own_role_lines("Immich-Admin");
        assert!(rewrite_line(b"CREATE ROLE \"Immich-Admin\";\n", &quoted).starts_with(b"--"));
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(quote_ident("immich_db"), "immich_db");
    }
}
