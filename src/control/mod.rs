//! The control socket: one JSON object per line each way. One request → one response, except
//! `snapshot` and `restore`, which send `progress` lines before their final answer.
//! The types here are the protocol; the daemon serializes them and the CLI deserializes the
//! very same types, so there is no second description of the wire format.

mod answer;
pub mod client;
pub mod limits;
pub mod reader;
mod restore;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::snapshot::store::Meta;
use crate::status::StatusReport;

/// Longest request line the daemon reads; anything longer is refused without parsing. A real
/// request is well under 1 KiB; the limit is what one connection can make the daemon buffer,
/// times the connection caps (limits.rs), so it is kept small.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

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
    /// Acknowledge a DEGRADED (a failed verify after an upgrade): status stops showing it.
    Ack {},
    /// Restore the stack to a sealed snapshot (docs/recovery.md): the plan and every step
    /// come as `progress` lines, then `restored` or an error.
    Restore {
        snapshot: String,
        #[serde(default)]
        no_preserve: bool,
        /// Skip (and list) stored files found damaged instead of refusing.
        #[serde(default)]
        force: bool,
    },
    /// Drill a sealed snapshot (the newest without `id`): its dump replayed into a scratch
    /// database and its storage checked; `progress` lines, then `drilled` or an error.
    Drill {
        #[serde(default)]
        id: Option<String>,
    },
    /// End an unfinished restore without finishing it (`restore --abandon`): its journal goes
    /// to the history and protection is back on. Refused while a restore runs.
    AbandonRestore {},
}

impl Request {
    /// Verbs that change something: only root (or the daemon's own user) may send them.
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            Request::Snapshot { .. }
                | Request::Release { .. }
                | Request::Ack {}
                | Request::Restore { .. }
                | Request::Drill { .. }
                | Request::AbandonRestore {}
        )
    }
}

/// Every verb the daemon knows, for "unknown verb" answers.
pub const VERBS: &[&str] = &[
    "status",
    "snapshot",
    "list",
    "release",
    "incidents",
    "ack",
    "restore",
    "abandon_restore",
    "drill",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusReport>),
    /// A step or a note of a running snapshot or restore, as `crate::progress::Progress::line`
    /// writes it; more lines follow.
    Progress {
        message: String,
    },
    Snapshot(Box<Meta>),
    /// A drill ran (passed or failed: see `result.passed`).
    Drilled {
        id: String,
        result: Box<crate::snapshot::store::DrillResult>,
    },
    List {
        snapshots: Vec<Meta>,
    },
    Released {
        message: String,
    },
    Incidents {
        incidents: Vec<crate::incident::Incident>,
    },
    Acknowledged {
        message: String,
    },
    /// An unfinished restore was ended; `message` says what it had done.
    Abandoned {
        message: String,
    },
    /// A restore finished: the verify against the snapshot, and what was done.
    Restored {
        verify: Box<crate::verify::Report>,
        summary: String,
        journal: std::path::PathBuf,
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
    reject_duplicate_keys(text)?;
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

/// Refuses an object (at any depth) that names a key twice. serde_json keeps the last value
/// and the tagged enum sees only that one, so `{"verb":"status","verb":"release"}` would be
/// a release to the daemon while a reader of the first key saw a status.
fn reject_duplicate_keys(text: &str) -> Result<(), String> {
    use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

    struct Unique;
    impl<'de> Deserialize<'de> for Unique {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Unique, D::Error> {
            d.deserialize_any(Unique)
        }
    }
    impl<'de> Visitor<'de> for Unique {
        type Value = Unique;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<Unique>()?;
                if !seen.insert(key.clone()) {
                    return Err(de::Error::custom(format_args!(
                        "duplicate key {key:?} in the request (each key may appear once)"
                    )));
                }
            }
            Ok(Unique)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
            while seq.next_element::<Unique>()?.is_some() {}
            Ok(Unique)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_unit<E>(self) -> Result<Unique, E> {
            Ok(Unique)
        }
    }
    serde_json::from_str::<Unique>(text)
        .map(|_| ())
        .map_err(|e| e.to_string())
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
    fn duplicate_keys_are_refused_not_resolved_to_the_last() {
        // What serde alone does: the Value keeps the last "verb", and the request would be
        // a release.
        let value: serde_json::Value =
            serde_json::from_str(r#"{"verb":"status","verb":"release"}"#).unwrap();
        assert_eq!(value["verb"], "release");

        let e = parse_request(br#"{"verb":"status","verb":"release"}"#).unwrap_err();
        assert!(e.contains("duplicate key \"verb\""), "{e}");
        let e = parse_request(br#"{"verb":"snapshot","label":"a","label":"b"}"#).unwrap_err();
        assert!(e.contains("duplicate key \"label\""), "{e}");
        let e = parse_request(br#"{"verb":"release","service":{"x":1,"x":2}}"#).unwrap_err();
        assert!(e.contains("duplicate key \"x\""), "{e}");
        // The same key in two objects is not a duplicate.
        assert_eq!(
            parse_request(br#"{"verb":"snapshot","label":"x"}"#),
            Ok(Request::Snapshot {
                label: Some("x".into())
            })
        );
        let e = parse_request(br#"{"verb":"release","service":[{"x":1},{"x":2}]}"#).unwrap_err();
        assert!(e.contains("bad release request"), "{e}");
    }

    #[test]
    fn ack_is_a_verb_only_root_may_send() {
        let ack = parse_request(br#"{"verb":"ack"}"#).unwrap();
        assert_eq!(ack, Request::Ack {});
        assert!(ack.is_mutating());
        assert!(!Request::Status {}.is_mutating());
    }

    #[test]
    fn restore_is_a_verb_only_root_may_send() {
        let r = parse_request(br#"{"verb":"restore","snapshot":"s1"}"#).unwrap();
        assert_eq!(
            r,
            Request::Restore {
                snapshot: "s1".into(),
                no_preserve: false,
                force: false
            }
        );
        assert!(r.is_mutating());
        let e = parse_request(br#"{"verb":"restore"}"#).unwrap_err();
        assert!(
            e.contains("bad restore request") && e.contains("snapshot"),
            "{e}"
        );
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
