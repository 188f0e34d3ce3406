//! A known secret as a bundle may hold it, not only raw: each character raw, percent-encoded
//! (either hex case, and any mix, so URL userinfo, form and full encodings all match),
//! `+` for a space (forms), JSON-escaped (`\"`, `\\`, `\/`, `\uXXXX` in either case), or
//! compose's `$$` for a `$`; and inside base64 (a basic-auth header, a credentials blob),
//! wherever it starts in the encoded bytes.
//!
//! Not covered: an encoding nested in another (a JSON string escaped twice, a percent-encoded
//! JSON escape), shell quoting (`'a'\''b'`), HTML entities, hex or UTF-16 dumps, base64 of a
//! percent-encoded secret, and any hash or ciphertext of a secret.

/// Shorter base64 runs would match unrelated base64 text too often.
const MIN_BASE64_CORE: usize = 6;

/// End of the text at `at` that spells `secret`, or None.
pub fn match_at(text: &[u8], at: usize, secret: &[char]) -> Option<usize> {
    let Some((&c, rest)) = secret.split_first() else {
        return Some(at);
    };
    // Several forms can match at one place (`$` and `$$`): each is tried.
    forms(text, at, c)
        .into_iter()
        .flatten()
        .find_map(|end| match_at(text, end, rest))
}

/// The bytes a form of `secret` can start with.
pub fn first_bytes(secret: &str) -> impl Iterator<Item = u8> {
    let first = secret.chars().next();
    let raw = first.map(|c| {
        let mut buf = [0u8; 4];
        c.encode_utf8(&mut buf);
        buf[0]
    });
    let other = match first {
        Some(' ') => Some(b'+'),
        _ => None,
    };
    [Some(b'%'), Some(b'\\'), raw, other].into_iter().flatten()
}

/// The number that hex `digits` (either case) spell; None for anything else (even `+`).
fn hex(digits: &[u8]) -> Option<u32> {
    digits
        .iter()
        .try_fold(0, |n, d| Some(n * 16 + (*d as char).to_digit(16)?))
}

/// Ends of the forms of `c` that `text` holds at `at`: raw, percent, `+`, JSON escape, `$$`.
fn forms(text: &[u8], at: usize, c: char) -> [Option<usize>; 4] {
    let rest = &text[at.min(text.len())..];
    let mut buf = [0u8; 4];
    let raw = c.encode_utf8(&mut buf).as_bytes();
    let spelled = |s: &[u8]| rest.starts_with(s).then_some(at + s.len());
    let percent = || {
        let mut end = at;
        for b in raw {
            let t = text.get(end..end + 3)?;
            (t[0] == b'%' && hex(&t[1..])? == u32::from(*b)).then_some(())?;
            end += 3;
        }
        Some(end)
    };
    let json = || {
        let short: Option<&[u8; 2]> = match c {
            '"' => Some(b"\\\""),
            '\\' => Some(b"\\\\"),
            '/' => Some(b"\\/"),
            '\n' => Some(b"\\n"),
            '\r' => Some(b"\\r"),
            '\t' => Some(b"\\t"),
            '\u{8}' => Some(b"\\b"),
            '\u{c}' => Some(b"\\f"),
            _ => None,
        };
        if let Some(end) = short.and_then(|s| spelled(s)) {
            return Some(end);
        }
        let mut units = [0u16; 2];
        let mut end = at;
        for unit in c.encode_utf16(&mut units) {
            let t = text.get(end..end + 6)?;
            (t.starts_with(b"\\u") && hex(&t[2..])? == u32::from(*unit)).then_some(())?;
            end += 6;
        }
        Some(end)
    };
    let other = match c {
        ' ' => spelled(b"+"),
        '$' => spelled(b"$$"),
        _ => None,
    };
    // Most places start no form: only a `%` or a `\` can start an encoded one.
    let first = rest.first().copied();
    // `$$` before `$`: a compose file's `$$` is one `$` of the secret.
    [
        other,
        spelled(raw),
        (first == Some(b'%')).then(percent).flatten(),
        (first == Some(b'\\')).then(json).flatten(),
    ]
}

/// Runs of base64 that only `secret`'s bytes determine, for each of the three places its
/// first byte can take in a 3-byte group, in the standard and the URL-safe alphabet.
pub fn base64_cores(secret: &str) -> Vec<String> {
    let mut cores = Vec::new();
    for offset in 0..3 {
        let mut bytes = vec![0u8; offset];
        bytes.extend_from_slice(secret.as_bytes());
        let encoded = base64(&bytes);
        // Character i holds bits 6i..6i+6; the secret holds bits 8*offset..8*(offset+len).
        let first = (8 * offset).div_ceil(6);
        let end = 8 * (offset + secret.len()) / 6;
        if end >= first + MIN_BASE64_CORE {
            let core = &encoded[first..end];
            for c in [core.to_string(), core.replace('+', "-").replace('/', "_")] {
                if !cores.contains(&c) {
                    cores.push(c);
                }
            }
        }
    }
    cores
}

/// Standard base64, padded.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spells(text: &str, secret: &str) -> bool {
        let secret: Vec<char> = secret.chars().collect();
        (0..=text.len()).any(|i| match_at(text.as_bytes(), i, &secret).is_some())
    }

    #[test]
    fn every_form_of_the_issues_password() {
        let secret = "Pr0be!S3cret@9f";
        for text in [
            "Pr0be!S3cret@9f",
            // URL userinfo with `!` encoded too (the issue), and as WHATWG leaves it.
            "postgresql://postgres:Pr0be%21S3cret%409f@database",
            "Pr0be!S3cret%409f",
            // Lowercase hex, mixed case, and every byte encoded.
            "Pr0be%21S3cret%40%39%66",
            "%50%72%30%62%65%21%53%33%63%72%65%74%40%39%66",
            // JSON escapes.
            "\"Pr0be\\u0021S3cret\\u0040\\u0039f\"",
        ] {
            assert!(spells(text, secret), "{text}");
        }
        for text in [
            "Pr0be!S3cret@9",
            "Pr0be%2S3cret@9f",
            "Pr0be!!S3cret@9f",
            "Pr0be%+21S3cret@9f",
            "Pr0be\\u+021S3cret@9f",
        ] {
            assert!(!spells(text, secret), "{text}");
        }
    }

    #[test]
    fn escapes_that_only_some_characters_have() {
        assert!(spells(r#"{"p":"a\"b\\c\/d"}"#, "a\"b\\c/d"));
        assert!(spells("pass+word+here", "pass word here"));
        assert!(spells("PASS: a$$b$$c", "a$b$c"));
        // `$$` raw in the secret itself: `$$` is tried first, then `$`.
        assert!(spells("x=a$$b", "a$$b"));
        assert!(spells("caf%C3%A9-sécret \\u00e9", "café-sécret é"));
        assert!(spells("\\ud83d\\ude00!", "😀!"));
    }

    #[test]
    fn base64_wherever_the_secret_starts() {
        let secret = "Pr0be!S3cret@9f";
        let cores = base64_cores(secret);
        for user in ["postgres", "u", "ab", ""] {
            let header = base64(format!("{user}:{secret}").as_bytes());
            assert!(
                cores.iter().any(|c| header.contains(c.as_str())),
                "{user}: {header} {cores:?}"
            );
        }
        assert_eq!(
            base64(b"postgres:Pr0be!S3cret@9f"),
            "cG9zdGdyZXM6UHIwYmUhUzNjcmV0QDlm"
        );
        assert!(base64_cores("abcd").is_empty(), "too short to search");
    }
}
