//! tokio-postgres errors in PostgreSQL's own words. Its `Display` of an error the server sent
//! is only "db error", and of a failed connection only "error connecting to server": the
//! server's message, SQLSTATE, detail and hint, and the cause of a connection failure
//! (connection refused, a timeout), are further in.

use std::error::Error as _;

/// `SEVERITY: message (SQLSTATE code)[; detail: …][; hint: …]` for an error the server sent;
/// for any other, tokio-postgres's words and their chain of causes (`error connecting to
/// server: Connection refused (os error 111)`). The caller says what it was doing.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            out.push_str(&format!("; detail: {detail}"));
        }
        if let Some(hint) = db.hint() {
            out.push_str(&format!("; hint: {hint}"));
        }
        return out;
    }
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // Some causes repeat what wraps them.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
