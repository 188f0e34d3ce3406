//! Passwords in URL userinfo (`scheme://user:password@host`), wherever a URL turns up: a
//! `DB_URL` in `.env`, a compose `command:`, a container's `Env`, a log line. Only the
//! password goes; scheme, user, host and path stay, so the bundle still shows what connects
//! where. A user-only userinfo (`https://token@host`) is kept: the user part of
//! `ssh://git@host` names no secret, and telling the two apart would be a guess.

use std::ops::Range;

/// Keys whose value is one whole URL (`DB_URL`, `DATABASE_URL`, `REDIS_URL`, `*_URI`, `*_DSN`).
pub fn is_url_key(key: &str) -> bool {
    let key = key.trim().to_ascii_uppercase();
    ["URL", "URI", "DSN"]
        .iter()
        .any(|s| key == *s || key.ends_with(&format!("_{s}")))
}

/// Bytes that end a URL's authority in free text: the URL's own delimiters, and what
/// surrounds a URL in a log line, a JSON string or a quoted value.
fn ends_authority(b: u8) -> bool {
    matches!(
        b,
        b'/' | b'?' | b'#' | b'"' | b'\'' | b'<' | b'>' | b'`' | b'\\'
    ) || b.is_ascii_whitespace()
        || b.is_ascii_control()
}

/// Where each URL's authority starts (just after `scheme://`).
fn authorities(text: &str) -> impl Iterator<Item = usize> + '_ {
    let bytes = text.as_bytes();
    text.match_indices("://").filter_map(move |(i, _)| {
        let scheme = bytes[..i]
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
            .count();
        (scheme > 0).then_some(i + 3)
    })
}

/// The password of the userinfo `text[start..at]` (`at` is the `@` before the host).
fn password_in(text: &str, start: usize, at: usize) -> Option<Range<usize>> {
    let colon = start + text[start..at].find(':')?;
    let password = colon + 1..at;
    let value = &text[password.clone()];
    (!value.is_empty() && value != super::REDACTED && !super::is_reference(value))
        .then_some(password)
}

/// The password ranges of every URL in free text. The userinfo ends at the authority's last
/// `@`, as WHATWG URL parsers read it, so a raw `@` in a password is still part of it.
pub fn passwords(text: &str) -> Vec<Range<usize>> {
    let bytes = text.as_bytes();
    authorities(text)
        .filter_map(|start| {
            let end = bytes[start..]
                .iter()
                .position(|b| ends_authority(*b))
                .map_or(text.len(), |n| start + n);
            let at = start + text[start..end].rfind('@')?;
            password_in(text, start, at)
        })
        .collect()
}

/// The password range of a value that is one whole URL (the value of a [`is_url_key`] key).
/// Its userinfo ends at the value's last `@`: a raw `/`, `?` or `#` in a password (which a
/// lenient client accepts) does not end it early. May take more than the password when the
/// path or query holds an `@` too: more is redacted, never less.
pub fn value_password(value: &str) -> Option<Range<usize>> {
    let mut starts = authorities(value);
    let start = starts.next()?;
    if starts.next().is_some() {
        // A list of URLs: each read on its own.
        return None;
    }
    let at = value.rfind('@').filter(|at| *at >= start)?;
    password_in(value, start, at)
}

/// `text` with `ranges` (sorted, disjoint) replaced by [`super::REDACTED`].
pub fn replace(text: &str, ranges: &[Range<usize>]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for r in ranges {
        out.push_str(&text[last..r.start]);
        out.push_str(super::REDACTED);
        last = r.end;
    }
    out.push_str(&text[last..]);
    out
}

/// Free text with every URL password replaced.
pub fn redact(text: &str) -> String {
    replace(text, &passwords(text))
}

/// A value with its URL password replaced: read as one whole URL under a URL key, as free
/// text under any other.
pub fn redact_value(key: &str, value: &str) -> String {
    match value_password(value).filter(|_| is_url_key(key)) {
        Some(r) => replace(value, &[r]),
        None => redact(value),
    }
}

/// Percent-decoded (`%40` → `@`), as the client reading the URL sees the password.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).copied().and_then(|c| (c as char).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_in_free_text() {
        let cases = [
            // The example, percent-encoded and raw (the last `@` ends the userinfo).
            (
                "DB_URL=postgresql://postgres:Pr0be%21S3cret%409f@database:5432/immich",
                "DB_URL=postgresql://postgres:<redacted>@database:5432/immich",
            ),
            (
                "connecting to postgresql://postgres:Pr0be!S3cret@9f@database:5432/immich now",
                "connecting to postgresql://postgres:<redacted>@database:5432/immich now",
            ),
            (
                "\"redis://:hunter2@redis:6379\", \"https://u:p%2fq@x.example/a@b\"",
                "\"redis://:<redacted>@redis:6379\", \"https://u:<redacted>@x.example/a@b\"",
            ),
            // No password: kept.
            (
                "ssh://git@github.com/x and https://immich.app/docs",
                "ssh://git@github.com/x and https://immich.app/docs",
            ),
            (
                "postgres://u:${DB_PASSWORD}@db/immich",
                "postgres://u:${DB_PASSWORD}@db/immich",
            ),
            ("://nothing@here", "://nothing@here"),
        ];
        for (text, want) in cases {
            assert_eq!(redact(text), want, "{text}");
        }
    }

    #[test]
    fn a_url_value_ends_its_userinfo_at_its_last_at() {
        // A raw `/` in the password would end the authority in free text.
        let v = "postgres://postgres:pa/ss@db:5432/immich";
        assert_eq!(redact(v), v, "free text cannot tell");
        assert_eq!(
            redact_value("DATABASE_URL", v),
            "postgres://postgres:<redacted>@db:5432/immich"
        );
        assert_eq!(redact_value("NOTE", v), v);
        assert!(is_url_key("db_url") && is_url_key("REDIS_URI") && is_url_key("SENTRY_DSN"));
        assert!(!is_url_key("URLS") && !is_url_key("CURL"));
    }

    #[test]
    fn percent_decoding_either_case() {
        assert_eq!(percent_decode("Pr0be%21S3cret%409f"), "Pr0be!S3cret@9f");
        assert_eq!(percent_decode("Pr0be%21S3cret%4a9f%"), "Pr0be!S3cretJ9f%");
        assert_eq!(percent_decode("caf%C3%a9"), "café");
    }
}
