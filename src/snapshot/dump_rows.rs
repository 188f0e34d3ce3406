//! Rows of chosen tables read back from a snapshot's dump (`db.sql.zst`, `pg_dumpall`):
//! stream-decompressed and read line by line, the `COPY … FROM stdin;` blocks of one
//! database parsed in PostgreSQL's text COPY format, escapes included. Memory is one line;
//! the dump is only read.

use std::io::BufRead;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DumpReadError {
    #[error("reading the dump {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the dump {path} ends inside the COPY block of {table}: it is truncated")]
    Truncated { path: PathBuf, table: String },
}

/// One row: the table as the dump names it (`public.asset`), its columns, the fields (None:
/// NULL).
pub struct Row<'a> {
    pub table: &'a str,
    pub columns: &'a [String],
    pub fields: Vec<Option<String>>,
}

impl Row<'_> {
    /// The field of `column`, None when NULL or not a column of the table.
    pub fn get(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.fields.get(i)?.as_deref()
    }
}

/// Calls `each` for every row of the tables named in `tables` (`public.asset`, unquoted) of
/// database `database`, until it answers `Break`.
pub fn each_row(
    path: &Path,
    database: &str,
    tables: &[&str],
    mut each: impl FnMut(Row<'_>) -> ControlFlow<()>,
) -> Result<(), DumpReadError> {
    let read = |source| DumpReadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut input =
        std::io::BufReader::with_capacity(1 << 20, zstd::stream::Decoder::new(file).map_err(read)?);
    let mut line = Vec::new();
    let mut in_database = false;
    // The COPY block being read, when it is one of `tables`: its name and columns.
    let mut copying: Option<(String, Vec<String>)> = None;
    let mut skipping = false;
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line).map_err(read)? == 0 {
            return match copying {
                Some((table, _)) => Err(DumpReadError::Truncated {
                    path: path.to_path_buf(),
                    table,
                }),
                None => Ok(()),
            };
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if copying.is_some() || skipping {
            if text == b"\\." {
                copying = None;
                skipping = false;
            } else if let Some((table, columns)) = &copying {
                let fields = text.split(|b| *b == b'\t').map(copy_field).collect();
                let row = Row {
                    table,
                    columns,
                    fields,
                };
                if each(row).is_break() {
                    return Ok(());
                }
            }
            continue;
        }
        let Ok(text) = std::str::from_utf8(text) else {
            continue;
        };
        if let Some(target) = text.strip_prefix("\\connect ") {
            in_database = connect_target(target).as_deref() == Some(database);
        } else if let Some((table, columns)) = copy_header(text) {
            if in_database && tables.contains(&table.as_str()) {
                copying = Some((table, columns));
            } else {
                skipping = true;
            }
        }
    }
}

/// The database a `\connect` line names: `immich`, `"my db"`, or (pg_dumpall of names that
/// need quoting) `-reuse-previous=on "dbname='my db'"`.
fn connect_target(rest: &str) -> Option<String> {
    let rest = rest.trim();
    if let Some(conninfo) = rest.strip_prefix("-reuse-previous=on ") {
        let inner = unquote(conninfo.trim())?;
        let value = inner.strip_prefix("dbname=")?;
        let value = value.strip_prefix('\'')?.strip_suffix('\'')?;
        return Some(value.replace("\\'", "'").replace("\\\\", "\\"));
    }
    unquote(rest).or_else(|| Some(rest.to_string()))
}

/// `"a""b"` → `a"b`; None when not a quoted identifier.
fn unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    Some(inner.replace("\"\"", "\""))
}

/// `COPY public."user" (id, "ownerId") FROM stdin;` → (`public.user`, [`id`, `ownerId`]).
fn copy_header(line: &str) -> Option<(String, Vec<String>)> {
    let rest = line.strip_prefix("COPY ")?.strip_suffix(" FROM stdin;")?;
    let (name, columns) = rest.split_once(" (")?;
    let columns = columns.strip_suffix(')')?;
    let table = identifiers(name, '.').join(".");
    Some((table, identifiers(columns, ',')))
}

/// Identifiers separated by `sep`, each plain or quoted (a quoted one may hold `sep`).
fn identifiers(list: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                current.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            c if c == sep && !quoted => out.push(std::mem::take(&mut current).trim().to_string()),
            c => current.push(c),
        }
    }
    out.push(current.trim().to_string());
    out
}

/// One field of PostgreSQL's text COPY format: `\N` is NULL; backslash escapes are `\b \f
/// \n \r \t \v \\`, up to three octal digits, `\x` and one or two hex digits; any other
/// escaped character stands for itself.
fn copy_field(raw: &[u8]) -> Option<String> {
    if raw == b"\\N" {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        i += 1;
        if b != b'\\' || i == raw.len() {
            out.push(b);
            continue;
        }
        let e = raw[i];
        i += 1;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' if raw.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_fields_decode_every_escape_of_the_text_format() {
        assert_eq!(copy_field(b"\\N"), None);
        assert_eq!(copy_field(b"").as_deref(), Some(""));
        assert_eq!(
            copy_field(b"/data/a\\tb\\nc\\\\d").as_deref(),
            Some("/data/a\tb\nc\\d")
        );
        assert_eq!(
            copy_field(b"\\b\\f\\r\\v").as_deref(),
            Some("\u{8}\u{c}\r\u{b}")
        );
        // Octal and hex bytes, UTF-8 put back together.
        assert_eq!(copy_field(b"caf\\303\\251").as_deref(), Some("café"));
        assert_eq!(copy_field(b"\\x41\\x4a2").as_deref(), Some("AJ2"));
        assert_eq!(copy_field(b"\\101\\0619").as_deref(), Some("A19"));
        // Any other escaped character is itself; `\N` inside a value is not NULL.
        assert_eq!(copy_field(b"\\q\\.x").as_deref(), Some("q.x"));
        assert_eq!(copy_field(b"a\\Nb").as_deref(), Some("aNb"));
    }

    #[test]
    fn copy_headers_and_connect_lines_name_tables_columns_and_databases() {
        assert_eq!(
            copy_header(r#"COPY public."user" (id, email, "name", "we""ird, col") FROM stdin;"#),
            Some((
                "public.user".to_string(),
                vec![
                    "id".into(),
                    "email".into(),
                    "name".into(),
                    "we\"ird, col".into()
                ]
            ))
        );
        assert_eq!(copy_header("COPY public.assets (id) TO stdout;"), None);
        assert_eq!(connect_target("immich").as_deref(), Some("immich"));
        assert_eq!(
            connect_target("\"Immich DB\"").as_deref(),
            Some("Immich DB")
        );
        assert_eq!(
            connect_target("-reuse-previous=on \"dbname='my db'\"").as_deref(),
            Some("my db")
        );
    }

    fn write_dump(dir: &Path, sql: &str) -> PathBuf {
        let path = dir.join("db.sql.zst");
        std::fs::write(&path, zstd::encode_all(sql.as_bytes(), 3).unwrap()).unwrap();
        path
    }

    #[test]
    fn rows_come_only_from_the_named_tables_of_the_named_database() {
        let dir = tempfile::tempdir().unwrap();
        let sql = "\\connect template1\n\
            COPY public.asset (id, \"originalPath\") FROM stdin;\n\
            other\t/elsewhere\n\
            \\.\n\
            \\connect immich\n\
            COPY public.tags (id, value) FROM stdin;\n\
            t1\tCOPY public.asset (x) FROM stdin;\n\
            \\.\n\
            COPY public.asset (id, \"ownerId\", \"originalPath\") FROM stdin;\n\
            a1\tu1\t/data/upload/u1/a\\tb.jpg\n\
            a2\t\\N\t/data/upload/u1/c.jpg\n\
            \\.\n";
        let path = write_dump(dir.path(), sql);
        let mut seen = Vec::new();
        each_row(&path, "immich", &["public.asset"], |row| {
            seen.push((
                row.get("id").map(str::to_string),
                row.get("ownerId").map(str::to_string),
                row.get("originalPath").map(str::to_string),
            ));
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (
                    Some("a1".into()),
                    Some("u1".into()),
                    Some("/data/upload/u1/a\tb.jpg".into())
                ),
                (
                    Some("a2".into()),
                    None,
                    Some("/data/upload/u1/c.jpg".into())
                ),
            ]
        );
        // Cut inside a COPY block: an error, not a short list.
        let cut = write_dump(dir.path(), &sql[..sql.len() - 4]);
        let e = each_row(&cut, "immich", &["public.asset"], |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
