//! Secrets out of what is kept for sharing (incident bundles): values of secret-looking keys
//! in `.env` files, compose files and container environments, and any known secret value
//! wherever else it turns up (logs, command lines, URLs). Snapshots are not redacted: a
//! restore needs the real `.env`.

use serde_json::Value;

/// What a removed value is replaced with.
pub const REDACTED: &str = "<redacted>";
/// What a log line holding a known secret becomes.
pub const REDACTED_LINE: &str = "[immich-guard: line redacted, it held a secret]";

/// Values shorter than this are not searched for in free text: they would match everywhere.
/// Key-based redaction still removes them.
const MIN_SECRET_LEN: usize = 6;
/// Immich's documented defaults are also its user and database names: searching logs for them
/// would redact every line naming the user, while hiding nothing anyone does not know.
const WELL_KNOWN: &[&str] = &["postgres", "immich"];

/// `DB_PASSWORD`, `POSTGRES_PASSWORD`, `*_TOKEN`, `*_SECRET` (any case).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.trim().to_ascii_uppercase();
    ["PASSWORD", "TOKEN", "SECRET"]
        .iter()
        .any(|s| key == *s || key.ends_with(&format!("_{s}")))
}

/// A value that only names another variable (`${DB_PASSWORD}`) holds no secret; keeping it
/// shows how the stack is wired.
fn is_reference(value: &str) -> bool {
    let v = value.trim().trim_matches(|c| c == '"' || c == '\'');
    v.starts_with('$') && !v[1..].contains('$') && {
        let name = v.trim_start_matches("${").trim_start_matches('$');
        let name = name.strip_suffix('}').unwrap_or(name);
        name.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .count()
            > 0
    }
}

/// Secret values known for one stack, to be removed from free text.
#[derive(Debug, Default, Clone)]
pub struct Secrets {
    values: Vec<String>,
}

impl Secrets {
    pub fn add(&mut self, value: &str) {
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        if value.len() >= MIN_SECRET_LEN
            && !WELL_KNOWN.contains(&value)
            && !is_reference(value)
            && !self.values.iter().any(|v| v == value)
        {
            self.values.push(value.to_string());
            // Longest first, so a secret containing another is replaced whole.
            self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
    }

    /// The values of secret keys in a `.env` text.
    pub fn add_env(&mut self, text: &str) {
        for line in text.lines() {
            if let Some((key, value)) = env_pair(line)
                && is_secret_key(key)
            {
                self.add(value);
            }
        }
    }

    /// The values of secret keys in a compose file (maps and `KEY=value` lists).
    pub fn add_compose(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(split) = yaml_pair(line)
                && is_secret_key(&line[split.key.clone()])
            {
                self.add(&line[split.value.clone()]);
            }
        }
    }

    fn contained_in(&self, text: &str) -> bool {
        self.values.iter().any(|v| text.contains(v.as_str()))
    }

    /// Every occurrence replaced.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), REDACTED);
            }
        }
        out
    }

    /// Log text: a line holding a secret is replaced whole (a secret rarely stands alone in a
    /// log line; what surrounds it is often part of it, like a connection string).
    pub fn scrub_lines(&self, text: &str) -> String {
        if !self.contained_in(text) {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len());
        for line in text.split_inclusive('\n') {
            if self.contained_in(line) {
                out.push_str(REDACTED_LINE);
                if line.ends_with('\n') {
                    out.push('\n');
                }
            } else {
                out.push_str(line);
            }
        }
        out
    }
}

/// `KEY=value` of a `.env` line (also `export KEY=value`); None for comments and blanks.
fn env_pair(line: &str) -> Option<(&str, &str)> {
    let trimmed = line.trim_start();
    if trimmed.starts_with('#') {
        return None;
    }
    let trimmed = trimmed.strip_prefix("export ").unwrap_or(trimmed);
    let (key, value) = trimmed.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && !key.contains(char::is_whitespace)).then_some((key, value))
}

/// A `.env` text with the value of every secret key replaced; comments and layout kept.
pub fn env_text(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|line| match env_pair(line) {
            Some((key, value)) if is_secret_key(key) && !is_reference(value) => {
                let cut = line.len() - value.len();
                let end = if line.ends_with('\n') { "\n" } else { "" };
                format!("{}{REDACTED}{end}", &line[..cut])
            }
            _ => line.to_string(),
        })
        .collect()
}

/// A `.env` parse error for a log or `status`: dotenvy quotes the line it could not parse,
/// which may be the one holding the password.
pub fn env_error(e: &dotenvy::Error) -> String {
    match e {
        dotenvy::Error::LineParse(line, index) => format!(
            "cannot parse line '{}' (at character {index})",
            env_text(line)
        ),
        other => other.to_string(),
    }
}

/// Byte ranges of the key and the value of a YAML `key: value` or `- KEY=value` line.
struct YamlPair {
    key: std::ops::Range<usize>,
    value: std::ops::Range<usize>,
}

fn yaml_pair(line: &str) -> Option<YamlPair> {
    let body = line.trim_end_matches(['\n', '\r']);
    let indent = body.len() - body.trim_start().len();
    let mut start = indent;
    if body[start..].starts_with('#') {
        return None;
    }
    if let Some(rest) = body[start..].strip_prefix('-') {
        start = body.len() - rest.trim_start().len();
    }
    let rest = &body[start..];
    // A list item `KEY=value` (possibly quoted as a whole) or a map entry `KEY: value`.
    let quote = rest
        .chars()
        .next()
        .filter(|c| *c == '"' || *c == '\'')
        .map_or(0, |_| 1);
    let inner = &rest[quote..];
    let (sep, sep_len) = match (inner.find('='), inner.find(':')) {
        (Some(e), Some(c)) if e < c => (e, 1),
        (Some(e), None) => (e, 1),
        (_, Some(c)) => (c, 1),
        (None, None) => return None,
    };
    let key_raw = &inner[..sep];
    let key = key_raw.trim().trim_matches(|c| c == '"' || c == '\'');
    if key.is_empty() || key.contains(char::is_whitespace) {
        return None;
    }
    let key_start = start + quote + key_raw.find(key)?;
    let after = start + quote + sep + sep_len;
    let value_text = &body[after..];
    let value_start = after + (value_text.len() - value_text.trim_start().len());
    // A trailing comment is not part of the value; a closing quote of a quoted item neither.
    let mut value_end = body.len();
    if let Some(hash) = body[value_start..].find(" #") {
        value_end = value_start + hash;
    }
    let mut value = value_start..value_start + body[value_start..value_end].trim_end().len();
    let text = &body[value.clone()];
    let quoted = |q: char| text.len() >= 2 && text.starts_with(q) && text.ends_with(q);
    if quoted('"') || quoted('\'') {
        // `KEY: "value"`: the quotes stay, the value goes.
        value = value.start + 1..value.end - 1;
    } else if quote == 1 && text.ends_with(&rest[..1]) {
        // `- "KEY=value"`: the item's closing quote.
        value.end -= 1;
    }
    (!value.is_empty()).then_some(YamlPair {
        key: key_start..key_start + key.len(),
        value,
    })
}

/// A compose file with the value of every secret key replaced (in `environment:` maps and
/// lists alike); comments and layout kept.
pub fn compose_text(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|line| match yaml_pair(line) {
            Some(p)
                if is_secret_key(&line[p.key.clone()]) && !is_reference(&line[p.value.clone()]) =>
            {
                format!(
                    "{}{REDACTED}{}",
                    &line[..p.value.start],
                    &line[p.value.end..]
                )
            }
            _ => line.to_string(),
        })
        .collect()
}

/// `KEY=value` strings of secret keys redacted (a container's `Config.Env`), the known
/// secrets removed from every other string.
pub fn json(value: &mut Value, secrets: &Secrets) {
    match value {
        Value::String(s) => {
            if let Some((key, v)) = s.split_once('=')
                && is_secret_key(key)
                && !is_reference(v)
            {
                *s = format!("{key}={REDACTED}");
            } else {
                *s = secrets.scrub(s);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| json(v, secrets)),
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if is_secret_key(key) && v.is_string() {
                    *v = Value::String(REDACTED.into());
                } else {
                    json(v, secrets);
                }
            }
        }
        _ => {}
    }
}

/// Secret values from `KEY=value` strings anywhere in a JSON value (a container's
/// `Config.Env`).
pub fn add_json(secrets: &mut Secrets, value: &Value) {
    match value {
        Value::String(s) => {
            if let Some((key, v)) = s.split_once('=')
                && is_secret_key(key)
            {
                secrets.add(v);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| add_json(secrets, v)),
        Value::Object(map) => map.values().for_each(|v| add_json(secrets, v)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_keys_by_suffix_in_any_case() {
        for key in [
            "DB_PASSWORD",
            "POSTGRES_PASSWORD",
            "db_password",
            "PASSWORD",
            "GITHUB_TOKEN",
            "jwt_secret",
            " REDIS_PASSWORD ",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in [
            "DB_USERNAME",
            "IMMICH_VERSION",
            "PASSWORD_FILE",
            "TOKENS",
            "SECRETARY",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn env_values_of_secret_keys_are_replaced_and_the_rest_kept() {
        let text = "# You should change it to a random password\n\
                    DB_PASSWORD=s3cretpass\n\
                    DB_USERNAME=postgres\n\
                    export API_TOKEN = abcdef123\n\
                    POSTGRES_PASSWORD=${DB_PASSWORD}\n\
                    IMMICH_VERSION=v1.119.0\n\
                    MY_SECRET=\"x y z\"";
        let out = env_text(text);
        assert_eq!(
            out,
            "# You should change it to a random password\n\
             DB_PASSWORD=<redacted>\n\
             DB_USERNAME=postgres\n\
             export API_TOKEN =<redacted>\n\
             POSTGRES_PASSWORD=${DB_PASSWORD}\n\
             IMMICH_VERSION=v1.119.0\n\
             MY_SECRET=<redacted>"
        );
        let mut s = Secrets::default();
        s.add_env(text);
        assert_eq!(s.values, ["s3cretpass", "abcdef123"]);
    }

    #[test]
    fn a_line_dotenvy_cannot_parse_is_quoted_without_its_secret() {
        let text = "IMMICH_VERSION=v1.119.0\nDB_PASSWORD=\"abc'def123\n";
        let e = dotenvy::from_read_iter(text.as_bytes())
            .find_map(Result::err)
            .expect("an unbalanced quote is an error");
        assert!(
            e.to_string().contains("abc'def123"),
            "dotenvy quotes the line: {e}"
        );
        let message = env_error(&e);
        assert!(!message.contains("abc'def123"), "{message}");
        assert!(message.contains("DB_PASSWORD=<redacted>"), "{message}");
    }

    #[test]
    fn compose_maps_and_lists_are_redacted() {
        let yaml = "services:\n  database:\n    environment:\n      POSTGRES_PASSWORD: hunter2hunter # set me\n      POSTGRES_USER: postgres\n      POSTGRES_DB: ${DB_DATABASE_NAME}\n  server:\n    environment:\n      - DB_PASSWORD=listpass99\n      - \"REDIS_PASSWORD=quoted123\"\n      - IMMICH_VERSION=v1\n      'JWT_SECRET': 'single1234'\n      DB_PASSWORD_REF: ${DB_PASSWORD}\n";
        let out = compose_text(yaml);
        assert_eq!(
            out,
            "services:\n  database:\n    environment:\n      POSTGRES_PASSWORD: <redacted> # set me\n      POSTGRES_USER: postgres\n      POSTGRES_DB: ${DB_DATABASE_NAME}\n  server:\n    environment:\n      - DB_PASSWORD=<redacted>\n      - \"REDIS_PASSWORD=<redacted>\"\n      - IMMICH_VERSION=v1\n      'JWT_SECRET': '<redacted>'\n      DB_PASSWORD_REF: ${DB_PASSWORD}\n"
        );
        let mut s = Secrets::default();
        s.add_compose(yaml);
        for v in ["hunter2hunter", "listpass99", "quoted123", "single1234"] {
            assert!(s.values.contains(&v.to_string()), "{v} in {:?}", s.values);
        }
        assert!(!out.contains("hunter2") && !out.contains("listpass"));
    }

    #[test]
    fn container_env_and_known_values_in_json() {
        let mut v = serde_json::json!({
            "Config": {
                "Env": ["DB_PASSWORD=abc123xyz", "POSTGRES_PASSWORD=abc123xyz", "TZ=UTC", "DB_URL=postgres://u:abc123xyz@db/immich"],
                "Cmd": ["psql", "--password=abc123xyz"]
            },
            "Name": "/immich_server"
        });
        let mut s = Secrets::default();
        add_json(&mut s, &v);
        json(&mut v, &s);
        let text = v.to_string();
        assert!(!text.contains("abc123xyz"), "{text}");
        assert!(text.contains("\"DB_PASSWORD=<redacted>\""), "{text}");
        assert!(text.contains("\"TZ=UTC\""), "{text}");
        assert!(text.contains("postgres://u:<redacted>@db/immich"), "{text}");
    }

    #[test]
    fn log_lines_holding_a_secret_are_replaced_whole() {
        let mut s = Secrets::default();
        s.add("p4ssw0rd-long");
        // Too short or well known: never searched for in free text.
        s.add("abc");
        s.add("postgres");
        let log =
            "2026 starting\n2026 connect postgres://postgres:p4ssw0rd-long@db:5432\n2026 abc done";
        assert_eq!(
            s.scrub_lines(log),
            format!("2026 starting\n{REDACTED_LINE}\n2026 abc done")
        );
        assert_eq!(s.scrub_lines("nothing here\n"), "nothing here\n");
    }
}
