//! The control socket: one JSON object per line each way. One request → one response, except
//! `snapshot`, which sends `progress` lines before its final answer.
//! The types here are the protocol; the daemon serializes them and the CLI deserializes the
//! very same types, so there is no second description of the wire format.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::snapshot::store::Meta;
use crate::status::StatusReport;

/// Longest request line the daemon reads; anything longer is refused without parsing.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Struct variants (not unit ones) so that unknown fields are refused, not ignored.
    Status {},
    /// Take a snapshot now (or join the one running); answers when it is sealed.
    Snapshot {
        #[serde(default)]
        label: Option<String>,
    },
    List {},
    /// Incidents (crash loops): the one named, or all, newest last.
    Incidents {
        #[serde(default)]
        id: Option<String>,
    },
    /// Let a frozen or held server go: retries the snapshot first, unless forced.
    Release {
        #[serde(default)]
        force: bool,
        /// A service halted for crash-looping: its restart policy back, then started.
        #[serde(default)]
        service: Option<String>,
    },
}

impl Request {
    /// Verbs that change something: only root (or the daemon's own user) may send them.
    pub fn is_mutating(&self) -> bool {
        matches!(self, Request::Snapshot { .. } | Request::Release { .. })
    }
}

/// Every verb the daemon knows, for "unknown verb" answers.
pub const VERBS: &[&str] = &["status", "snapshot", "list", "release", "incidents"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusReport>),
    /// A step of a running snapshot; more lines follow.
    Progress {
        message: String,
    },
    Snapshot(Box<Meta>),
    List {
        snapshots: Vec<Meta>,
    },
    Released {
        message: String,
    },
    Incidents {
        incidents: Vec<crate::incident::Incident>,
    },
    Error {
        message: String,
    },
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Response::Error {
            message: message.into(),
        }
    }
}

/// Parses one request line (without its newline) into a request or the error to send back.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line)
        .map_err(|e| format!("request is not valid UTF-8 ({e})"))?
        .trim();
    if text.is_empty() {
        return Err(
            "empty request: send one JSON object per line, e.g. {\"verb\":\"status\"}".into(),
        );
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
    let verb = value
        .get("verb")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| "request must be a JSON object with a string field \"verb\"".to_string())?;
    if !VERBS.contains(&verb.as_str()) {
        return Err(format!(
            "unknown verb {verb:?}; known verbs: {}",
            VERBS.join(", ")
        ));
    }
    serde_json::from_value(value).map_err(|e| format!("bad {verb} request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_request_parses() {
        assert_eq!(
            parse_request(br#"{"verb":"status"}"#),
            Ok(Request::Status {})
        );
        assert_eq!(
            parse_request(b" {\"verb\":\"status\"}\r"),
            Ok(Request::Status {})
        );
    }

    #[test]
    fn bad_requests_get_messages_that_say_what_is_wrong() {
        let e = parse_request(b"{\"verb\":\"explode\"}").unwrap_err();
        assert!(
            e.contains("unknown verb \"explode\"") && e.contains("status"),
            "{e}"
        );
        let e = parse_request(b"{verb: status").unwrap_err();
        assert!(e.starts_with("malformed JSON"), "{e}");
        let e = parse_request(b"[1,2]").unwrap_err();
        assert!(e.contains("\"verb\""), "{e}");
        let e = parse_request(&[0x7b, 0xff, 0xfe, 0x7d]).unwrap_err();
        assert!(e.contains("UTF-8"), "{e}");
        let e = parse_request(b"{\"verb\":\"status\",\"extra\":1}").unwrap_err();
        assert!(
            e.contains("bad status request") && e.contains("extra"),
            "{e}"
        );
        assert!(parse_request(b"   ").unwrap_err().contains("empty"));
    }

    #[test]
    fn request_wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Status {}).unwrap(),
            r#"{"verb":"status"}"#
        );
        let e = Response::error("x");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"error","message":"x"}"#
        );
    }
}
