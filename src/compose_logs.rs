//! Logs collected without the daemon, for `immich-guard diagnose`: `docker compose logs`
//! output split back into one log per service (compose v2's `immich_server  | line` and
//! `immich-server-1  | line`, v1's `immich_server_1  | line`), compose's own
//! `<name> exited with code N` lines read as exit codes, colours removed. README.md,
//! "Diagnosing logs without the daemon".

use crate::diagnose::{Evidence, Exit, ServiceLog};

/// Split `text`; a text that is not compose output (most lines without a `name | ` prefix) is
/// one service's log, `service`.
pub fn split(text: &str, service: &str) -> (Vec<ServiceLog>, Vec<Exit>) {
    let lines: Vec<String> = text.lines().map(strip_ansi).collect();
    let non_empty = lines.iter().filter(|l| !l.trim().is_empty()).count();
    let prefixed = lines.iter().filter(|l| prefix(l).is_some()).count();
    let compose = prefixed > 0 && prefixed * 2 >= non_empty;
    let mut logs: Vec<ServiceLog> = Vec::new();
    let mut exits = Vec::new();
    let mut current = service.to_string();
    for line in &lines {
        let (name, text) = match prefix(line) {
            // A log viewer's `stderr | <time> | line` names the stream, not a service.
            Some((name, text)) if compose && (name == "stdout" || name == "stderr") => {
                (service.to_string(), text)
            }
            Some((name, text)) if compose => (name, text),
            _ => {
                if let Some((name, code)) = exited(line) {
                    exits.push(Exit {
                        service: name.clone(),
                        exit_code: Some(code),
                        oom_killed: false,
                    });
                    push(&mut logs, &name, line);
                    continue;
                }
                // A continuation of the last prefixed line (or a plain log).
                (current.clone(), line.as_str())
            }
        };
        current = name.clone();
        push(&mut logs, &name, text);
    }
    (logs, exits)
}

fn push(logs: &mut Vec<ServiceLog>, service: &str, line: &str) {
    let log = match logs.iter_mut().position(|l| l.service == service) {
        Some(i) => &mut logs[i],
        None => {
            logs.push(ServiceLog {
                service: service.to_string(),
                text: String::new(),
            });
            logs.last_mut().expect("just pushed")
        }
    };
    log.text.push_str(line);
    log.text.push('\n');
}

/// `name<spaces>| text` → (name without its replica number, text).
fn prefix(line: &str) -> Option<(String, &str)> {
    let bar = line.find('|')?;
    let head = &line[..bar];
    let name = head.trim_end();
    if name.is_empty()
        || name.len() == head.len()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return None;
    }
    let text = &line[bar + 1..];
    Some((
        without_replica(name).to_string(),
        text.strip_prefix(' ').unwrap_or(text),
    ))
}

/// `immich-server-1` / `immich_server_1` → `immich-server` / `immich_server`.
fn without_replica(name: &str) -> &str {
    match name.rfind(['-', '_']) {
        Some(i)
            if i > 0 && i + 1 < name.len() && name[i + 1..].chars().all(|c| c.is_ascii_digit()) =>
        {
            &name[..i]
        }
        _ => name,
    }
}

/// compose's `immich_machine_learning exited with code 132`.
fn exited(line: &str) -> Option<(String, i64)> {
    let (name, code) = line.trim().split_once(" exited with code ")?;
    let name = name.rsplit(' ').next()?;
    Some((without_replica(name).to_string(), code.trim().parse().ok()?))
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters up to the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The evidence of several inputs, each (text, the service it belongs to when not compose
/// output): logs of one service merged in input order.
pub fn evidence(inputs: &[(String, String)]) -> Evidence {
    let mut evidence = Evidence::default();
    for (text, service) in inputs {
        let (logs, exits) = split(text, service);
        for log in logs {
            match evidence.logs.iter_mut().find(|l| l.service == log.service) {
                Some(l) => l.text.push_str(&log.text),
                None => evidence.logs.push(log),
            }
        }
        evidence.exits.extend(exits);
    }
    evidence
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_v2_and_v1_prefixes_are_split_per_service() {
        let text = "\
immich_server            | Error: getaddrinfo ENOTFOUND database
immich_server            |     at GetAddrInfoReqWrap.onlookupall
\u{1b}[36mimmich_postgres          |\u{1b}[0m chown: changing ownership of '/var/lib/postgresql/data': Operation not permitted
docker-immich_microservices-1  | Illegal instruction (core dumped)
docker-immich_microservices-1 exited with code 132
immich_redis_1  | 1:M * Ready to accept connections
";
        let (logs, exits) = split(text, "unused");
        let names: Vec<&str> = logs.iter().map(|l| l.service.as_str()).collect();
        assert_eq!(
            names,
            [
                "immich_server",
                "immich_postgres",
                "docker-immich_microservices",
                "immich_redis"
            ]
        );
        assert_eq!(
            logs[0].text,
            "Error: getaddrinfo ENOTFOUND database\n    at GetAddrInfoReqWrap.onlookupall\n"
        );
        assert!(logs[1].text.starts_with("chown: changing"), "{:?}", logs[1]);
        assert_eq!(
            exits,
            [Exit {
                service: "docker-immich_microservices".into(),
                exit_code: Some(132),
                oom_killed: false
            }]
        );
    }

    #[test]
    fn a_log_viewers_stream_column_is_not_a_service() {
        let (logs, _) = split(
            "stderr | 2025-03-02 22:44:10 | microservices worker error: boom\n",
            "immich_server",
        );
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].service, "immich_server");
        assert_eq!(
            logs[0].text,
            "2025-03-02 22:44:10 | microservices worker error: boom\n"
        );
    }

    #[test]
    fn a_plain_log_is_the_named_service() {
        let text = "Initializing Immich v1.120.0\nfoo | bar is not a prefix here\nmore\n";
        let (logs, exits) = split(text, "immich-server");
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].service, "immich-server");
        assert_eq!(logs[0].text, text);
        assert!(exits.is_empty());
    }

    #[test]
    fn inputs_merge_by_service() {
        let e = evidence(&[
            ("server | a\n".into(), "x".into()),
            ("b\n".into(), "server".into()),
        ]);
        assert_eq!(e.logs.len(), 1);
        assert_eq!(e.logs[0].text, "a\nb\n");
    }
}
