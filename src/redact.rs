//! Secrets out of what is kept for sharing (incident bundles): values of secret-looking keys
//! in `.env` files, compose files and container environments, the password of any URL's
//! userinfo (url.rs), and any known secret value wherever else it turns up (logs, command
//! lines), raw or encoded (encoded.rs). Snapshots are not redacted: a restore needs the real
//! `.env`.

use std::ops::Range;

use serde_json::Value;

mod encoded;
mod url;

use url::is_url_key;

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
    /// `values` as characters, same order: what the matcher of encoded forms walks.
    spelled: Vec<Vec<char>>,
    /// Base64 runs only a secret determines (encoded.rs).
    base64: Vec<String>,
    /// Bytes any form of any secret can start with: every other place is passed over at once.
    starts: Vec<bool>,
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
            self.spelled = self.values.iter().map(|v| v.chars().collect()).collect();
            for core in encoded::base64_cores(value) {
                if !self.base64.contains(&core) {
                    self.base64.push(core);
                }
            }
            self.starts.resize(256, false);
            let firsts = self.base64.iter().map(|c| c.as_bytes()[0]);
            for b in encoded::first_bytes(value).chain(firsts) {
                self.starts[usize::from(b)] = true;
            }
        }
    }

    /// A URL's password, as written and as the client decodes it (`%40` → `@`): a log may
    /// show either.
    fn add_url_password(&mut self, password: &str) {
        self.add(password);
        self.add(&url::percent_decode(password));
    }

    /// The passwords of the URLs in free text.
    pub fn add_urls(&mut self, text: &str) {
        for r in url::passwords(text) {
            self.add_url_password(&text[r]);
        }
    }

    /// The secrets a `KEY=value` setting holds: its value under a secret key, the password
    /// of a URL under any key.
    fn add_setting(&mut self, key: &str, value: &str) {
        if is_secret_key(key) {
            self.add(value);
        } else if let Some(r) = url::value_password(value).filter(|_| is_url_key(key)) {
            self.add_url_password(&value[r]);
        }
        self.add_urls(value);
    }

    /// The values of secret keys and URL passwords in a `.env` text.
    pub fn add_env(&mut self, text: &str) {
        for line in text.lines() {
            match env_pair(line) {
                Some((key, value)) => self.add_setting(key, value),
                None => self.add_urls(line),
            }
        }
    }

    /// The values of secret keys (maps and `KEY=value` lists) and URL passwords in a compose
    /// file.
    pub fn add_compose(&mut self, text: &str) {
        for line in text.lines() {
            match yaml_pair(line) {
                Some(p) => self.add_setting(&line[p.key], &line[p.value]),
                None => self.add_urls(line),
            }
        }
    }

    /// Where the known secrets are in `text`, in any form encoded.rs knows.
    fn occurrences(&self, text: &str) -> Vec<Range<usize>> {
        let bytes = text.as_bytes();
        let mut found = Vec::new();
        if self.values.is_empty() {
            return found;
        }
        let mut i = 0;
        while i < bytes.len() {
            if !self.starts[usize::from(bytes[i])] {
                i += 1;
                continue;
            }
            // Every form starts with an ASCII byte or the secret's own first character, so
            // `i..end` lies on character boundaries.
            let end = self
                .spelled
                .iter()
                .find_map(|s| encoded::match_at(bytes, i, s))
                .or_else(|| {
                    self.base64
                        .iter()
                        .find(|c| bytes[i..].starts_with(c.as_bytes()))
                        .map(|c| i + c.len())
                });
            match end {
                Some(end) if end > i => {
                    found.push(i..end);
                    i = end;
                }
                _ => i += 1,
            }
        }
        found
    }

    /// Every URL password and every occurrence of a known secret replaced.
    pub fn scrub(&self, text: &str) -> String {
        let text = url::redact(text);
        url::replace(&text, &self.occurrences(&text))
    }

    /// Log text: URL passwords replaced, and a line holding a known secret replaced whole (a
    /// secret rarely stands alone in a log line; what surrounds it is often part of it).
    pub fn scrub_lines(&self, text: &str) -> String {
        let text = url::redact(text);
        let found = self.occurrences(&text);
        if found.is_empty() {
            return text;
        }
        let mut out = String::with_capacity(text.len());
        let mut start = 0;
        for line in text.split_inclusive('\n') {
            let end = start + line.len();
            if found.iter().any(|r| r.start < end && r.end > start) {
                out.push_str(REDACTED_LINE);
                if line.ends_with('\n') {
                    out.push('\n');
                }
            } else {
                out.push_str(line);
            }
            start = end;
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

/// A `.env` text with the value of every secret key and every URL password replaced;
/// comments and layout kept.
pub fn env_text(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|line| match env_pair(line) {
            Some((key, value)) if is_secret_key(key) && !is_reference(value) => {
                let cut = line.len() - value.len();
                let end = if line.ends_with('\n') { "\n" } else { "" };
                format!("{}{REDACTED}{end}", &line[..cut])
            }
            Some((key, value)) => {
                let cut = line.len() - value.len();
                format!("{}{}", &line[..cut], url::redact_value(key, value))
            }
            None => url::redact(line),
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

/// A compose file with the value of every secret key (in `environment:` maps and lists
/// alike) and every URL password replaced; comments and layout kept.
pub fn compose_text(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|line| match yaml_pair(line) {
            Some(p) => {
                let (key, value) = (&line[p.key.clone()], &line[p.value.clone()]);
                let value = if is_secret_key(key) && !is_reference(value) {
                    REDACTED.to_string()
                } else {
                    url::redact_value(key, value)
                };
                format!(
                    "{}{value}{}",
                    &line[..p.value.start],
                    url::redact(&line[p.value.end..])
                )
            }
            None => url::redact(line),
        })
        .collect()
}

/// `KEY=value` strings of secret keys redacted (a container's `Config.Env`), and the values of
/// secret keys in objects; URL passwords and the known secrets removed from every string.
pub fn json(value: &mut Value, secrets: &Secrets) {
    match value {
        Value::String(s) => {
            *s = match s.split_once('=') {
                Some((key, v)) if is_secret_key(key) && !is_reference(v) => {
                    format!("{key}={REDACTED}")
                }
                Some((key, v)) => secrets.scrub(&format!("{key}={}", url::redact_value(key, v))),
                None => secrets.scrub(s),
            };
        }
        Value::Array(items) => items.iter_mut().for_each(|v| json(v, secrets)),
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(_) if is_secret_key(key) => *v = Value::String(REDACTED.into()),
                    Value::String(s) => *s = secrets.scrub(&url::redact_value(key, s)),
                    _ => json(v, secrets),
                }
            }
        }
        _ => {}
    }
}

/// Secret values from `KEY=value` strings (a container's `Config.Env`), secret keys of
/// objects and URLs anywhere in a JSON value.
pub fn add_json(secrets: &mut Secrets, value: &Value) {
    match value {
        Value::String(s) => match s.split_once('=') {
            Some((key, v)) => secrets.add_setting(key, v),
            None => secrets.add_urls(s),
        },
        Value::Array(items) => items.iter().for_each(|v| add_json(secrets, v)),
        Value::Object(map) => {
            for (key, v) in map {
                match v {
                    Value::String(s) => secrets.add_setting(key, s),
                    _ => add_json(secrets, v),
                }
            }
        }
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
        let log = "2026 starting\n2026 auth p4ssw0rd-long rejected\n2026 abc done\n\
                   2026 connect postgres://postgres:p4ssw0rd%2Dlong@db:5432 as postgres";
        // A URL's password goes, the line stays: it says what connects where.
        assert_eq!(
            s.scrub_lines(log),
            format!(
                "2026 starting\n{REDACTED_LINE}\n2026 abc done\n\
                 2026 connect postgres://postgres:<redacted>@db:5432 as postgres"
            )
        );
        assert_eq!(s.scrub_lines("nothing here\n"), "nothing here\n");
    }

    /// The password in every form a bundle can hold it, under the keys and in the
    /// places it turned up: `.env`, compose, a container's `Env`, a log line.
    const RAW: &str = "Pr0be!S3cret@9f";
    const FORMS: &[&str] = &[
        "Pr0be!S3cret@9f",
        "Pr0be%21S3cret%409f",
        "Pr0be%21S3cret%40%39%66",
        "Pr0be!S3cret%409f",
        "%50%72%30%62%65%21%53%33%63%72%65%74%40%39%66",
        "Pr0be\\u0021S3cret\\u0040\\u0039f",
    ];

    fn assert_clean(out: &str) {
        for form in FORMS.iter().copied().chain(["%21S3cret", "S3cret"]) {
            assert!(!out.contains(form), "{form} in {out}");
        }
    }

    #[test]
    fn url_passwords_in_env_copies_in_every_encoding() {
        let env = format!(
            "DB_PASSWORD={RAW}\n\
             DB_URL=postgresql://postgres:Pr0be%21S3cret%409f@database:5432/immich\n\
             DATABASE_URL='postgres://postgres:Pr0be%21S3cret%40%39%66@db/immich'\n\
             REDIS_URL=redis://default:Pr0be%21S3cret%409f@redis:6379\n\
             MY_CONN=postgres://postgres:Pr0be%21S3cret%409f@db/immich?sslmode=disable\n\
             RAW_URL=postgres://postgres:{RAW}@db/immich\n\
             # an old one: postgres://postgres:Pr0be%21S3cret%409f@old/immich\n\
             IMMICH_VERSION=v1.119.0\n"
        );
        let out = env_text(&env);
        assert_eq!(
            out,
            "DB_PASSWORD=<redacted>\n\
             DB_URL=postgresql://postgres:<redacted>@database:5432/immich\n\
             DATABASE_URL='postgres://postgres:<redacted>@db/immich'\n\
             REDIS_URL=redis://default:<redacted>@redis:6379\n\
             MY_CONN=postgres://postgres:<redacted>@db/immich?sslmode=disable\n\
             RAW_URL=postgres://postgres:<redacted>@db/immich\n\
             # an old one: postgres://postgres:<redacted>@old/immich\n\
             IMMICH_VERSION=v1.119.0\n"
        );
        let mut secrets = Secrets::default();
        secrets.add_env(&env);
        for known in [RAW, "Pr0be%21S3cret%409f", "Pr0be%21S3cret%40%39%66"] {
            assert!(secrets.values.iter().any(|v| v == known), "{known}");
        }
        // Text that names the password in another form, with no URL around it.
        for form in FORMS {
            let text = format!("password was {form}, retrying");
            let out = secrets.scrub(&text);
            assert_eq!(out, "password was <redacted>, retrying", "{form}");
            assert_eq!(secrets.scrub_lines(&text), REDACTED_LINE, "{form}");
        }
    }

    #[test]
    fn either_hex_case() {
        // The issue's `%21` and `%40` have no hex letter; `:`, `/` and `?` do.
        let mut secrets = Secrets::default();
        secrets.add_env("DB_URL=postgres://postgres:Pa%3Ass%2Fw0rd%3Fx@db/immich");
        for form in [
            "Pa:ss/w0rd?x",
            "Pa%3Ass%2Fw0rd%3Fx",
            "Pa%3ass%2fw0rd%3fx",
            "Pa%3Ass%2fw0rd%3Fx",
            "Pa:ss\\/w0rd\\u003fx",
        ] {
            assert_eq!(
                secrets.scrub(&format!("[{form}]")),
                "[<redacted>]",
                "{form}"
            );
        }
        assert_eq!(
            env_text("DB_URL=postgres://postgres:Pa%3ass%2fw0rd%3fx@db/immich"),
            "DB_URL=postgres://postgres:<redacted>@db/immich"
        );
    }

    #[test]
    fn a_password_learnt_only_from_a_url_is_found_anywhere() {
        // No DB_PASSWORD: only the server's DB_URL knows it, percent-encoded.
        let mut v = serde_json::json!({
            "Config": {
                "Env": ["DB_URL=postgresql://postgres:Pr0be%21S3cret%409f@database:5432/immich", "TZ=UTC"],
                "Cmd": ["node", "--db", "postgresql://postgres:Pr0be%21S3cret%409f@database/immich"],
                "Labels": {"x.backup.url": "postgresql://postgres:Pr0be%21S3cret%40%39%66@database/immich", "note": "pw Pr0be!S3cret@9f"}
            }
        });
        let mut secrets = Secrets::default();
        add_json(&mut secrets, &v);
        assert!(
            secrets.values.iter().any(|s| s == RAW),
            "{:?}",
            secrets.values
        );
        json(&mut v, &secrets);
        let text = serde_json::to_string_pretty(&v).unwrap();
        assert_clean(&text);
        assert!(
            text.contains("\"DB_URL=postgresql://postgres:<redacted>@database:5432/immich\""),
            "{text}"
        );
        assert!(text.contains("\"pw <redacted>\""), "{text}");
        // Logs: the decoded form the server may print, and a basic-auth header.
        let basic = "GET /api Authorization: Basic cG9zdGdyZXM6UHIwYmUhUzNjcmV0QDlm";
        let log = format!("boot\nauth with {RAW}\n{basic}\nready\n");
        assert_eq!(
            secrets.scrub_lines(&log),
            format!("boot\n{REDACTED_LINE}\n{REDACTED_LINE}\nready\n")
        );
    }

    #[test]
    fn compose_copies_lose_url_passwords_and_dollar_escaped_secrets() {
        let yaml = "services:\n  server:\n    environment:\n      DB_URL: \"postgresql://postgres:Pr0be%21S3cret%409f@database:5432/immich\"\n      - REDIS_URL=redis://:Pr0be%21S3cret%409f@redis\n      DB_PASSWORD: \"Pr0be!S3cret@9f\"\n      OTHER: \"x$$Pr0be!S3cret@9f\"\n    command: [\"start\", \"--url=postgres://u:Pr0be!S3cret@9f@db/x\"]\n";
        let mut secrets = Secrets::default();
        secrets.add_compose(yaml);
        let out = secrets.scrub(&compose_text(yaml));
        assert_clean(&out);
        assert!(
            out.contains("DB_URL: \"postgresql://postgres:<redacted>@database:5432/immich\""),
            "{out}"
        );
        assert!(
            out.contains("- REDIS_URL=redis://:<redacted>@redis\n"),
            "{out}"
        );
        assert!(out.contains("--url=postgres://u:<redacted>@db/x"), "{out}");
        // A secret with a `$`, written `$$` in a compose file.
        let mut secrets = Secrets::default();
        secrets.add("dollar$ecret9");
        assert_eq!(
            secrets.scrub("PASS: dollar$$ecret9 # escaped"),
            "PASS: <redacted> # escaped"
        );
    }
}
