//! Notifications about protection: a generic JSON webhook and ntfy. Sending never blocks
//! protection: events go through a bounded queue to a background task, and a failure is
//! logged (after one retry), never raised. The ntfy token never goes into a URL or a log line.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::NotifyConfig;

const QUEUE: usize = 64;
const RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    SnapshotSealed,
    SnapshotFailed,
    /// A snapshot sealed, and the retention after it could not delete what it meant to (or
    /// deleted nothing): the snapshot counts; the disk may fill (docs/operations.md
    /// "Retention").
    RetentionFailed,
    Frozen,
    Held,
    Released,
    /// What Immich's upgrade-path table says about a pending change (holds to come,
    /// warnings), once per change of what it says.
    UpgradePath,
    CrashLoop,
    /// The verify after an upgrade failed (docs/operations.md "DEGRADED").
    Degraded,
    /// A later verify passed: DEGRADED is over.
    Recovered,
    /// A snapshot's restore drill failed (src/drill/): it may not restore.
    DrillFailed,
}

impl EventKind {
    /// ntfy priority: 4 (high) for what needs the admin, 3 (default) otherwise.
    fn priority(self) -> u8 {
        match self {
            EventKind::Held
            | EventKind::UpgradePath
            | EventKind::CrashLoop
            | EventKind::SnapshotFailed
            | EventKind::DrillFailed
            | EventKind::Degraded => 4,
            _ => 3,
        }
    }

    fn tags(self) -> &'static str {
        match self {
            EventKind::SnapshotSealed => "floppy_disk",
            EventKind::Frozen => "ice_cube",
            EventKind::Released => "unlock",
            EventKind::Recovered => "white_check_mark",
            _ => "warning",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub kind: EventKind,
    pub project: String,
    pub title: String,
    pub message: String,
    pub snapshot: Option<String>,
    pub from_version: Option<String>,
    pub to_version: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notification to {url} failed: {detail}")]
    Failed { url: String, detail: String },
}

/// What is configured, with the client that reaches it.
struct Targets {
    client: reqwest::Client,
    timeout: Duration,
    webhook: Option<String>,
    /// `<ntfy_url>/<topic>` and the token, which never goes into a URL or a log line.
    ntfy: Option<(String, Option<String>)>,
}

/// Cheap to clone; a disabled notifier (nothing configured) drops everything.
#[derive(Clone)]
pub struct Notifier {
    targets: Option<Arc<Targets>>,
    queue: Option<mpsc::Sender<Event>>,
}

impl Notifier {
    /// Must be called inside a tokio runtime when anything is configured.
    pub fn new(config: &NotifyConfig) -> Notifier {
        let disabled = Notifier {
            targets: None,
            queue: None,
        };
        let ntfy = match (&config.ntfy_url, &config.ntfy_topic) {
            (Some(url), Some(topic)) => Some((
                format!("{}/{topic}", url.trim_end_matches('/')),
                config.ntfy_token.clone(),
            )),
            _ => None,
        };
        if config.webhook_url.is_none() && ntfy.is_none() {
            return disabled;
        }
        let timeout = Duration::from_secs(config.timeout_secs);
        let client = match reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("immich-guard/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(client) => client,
            // Only a broken TLS setup gets here; protection goes on without notifications.
            Err(e) => {
                tracing::error!(error = %e, "cannot set up an HTTP client; notifications are off");
                return disabled;
            }
        };
        let worker = Notifier {
            targets: Some(Arc::new(Targets {
                client,
                timeout,
                webhook: config.webhook_url.clone(),
                ntfy,
            })),
            queue: None,
        };
        // The worker holds no sender, so it ends when the last clone of the notifier is gone.
        let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
        let notifier = Notifier {
            queue: Some(tx),
            ..worker.clone()
        };
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                worker.deliver(&event).await;
            }
        });
        notifier
    }

    pub fn is_enabled(&self) -> bool {
        self.targets.is_some()
    }

    /// Queues the event and returns at once; a full queue drops it (logged).
    pub fn send(&self, event: Event) {
        if let Some(queue) = &self.queue
            && let Err(e) = queue.try_send(event)
        {
            tracing::warn!(error = %e, "notification queue full; dropped a notification");
        }
    }

    /// Sends to every target at once (one retry each); returns one result per target,
    /// the webhook's first.
    pub async fn deliver(&self, event: &Event) -> Vec<Result<(), NotifyError>> {
        let Some(targets) = &self.targets else {
            return Vec::new();
        };
        let webhook = async {
            let url = targets.webhook.as_ref()?;
            Some(
                targets
                    .with_retry(url, || targets.client.post(url).json(event))
                    .await,
            )
        };
        let ntfy = async {
            let (url, token) = targets.ntfy.as_ref()?;
            Some(
                targets
                    .with_retry(url, || {
                        let mut request = targets
                            .client
                            .post(url)
                            .header("Title", header_text(&event.title))
                            .header("Priority", event.kind.priority().to_string())
                            .header("Tags", event.kind.tags())
                            .body(event.message.clone());
                        if let Some(token) = token {
                            request = request.bearer_auth(token);
                        }
                        request
                    })
                    .await,
            )
        };
        let (webhook, ntfy) = tokio::join!(webhook, ntfy);
        let results: Vec<_> = webhook.into_iter().chain(ntfy).collect();
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            tracing::warn!(error = %e, kind = ?event.kind, "notification not delivered");
        }
        results
    }
}

impl Targets {
    async fn with_retry(
        &self,
        url: &str,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<(), NotifyError> {
        let attempt = || async {
            match request().send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(self.describe(e)),
            }
        };
        let result = match attempt().await {
            Ok(()) => Ok(()),
            Err(detail) => {
                tracing::warn!(%url, %detail, "notification failed; retrying in 2 s");
                tokio::time::sleep(RETRY_AFTER).await;
                attempt().await
            }
        };
        result.map_err(|detail| NotifyError::Failed {
            url: url.to_string(),
            detail,
        })
    }

    /// What went wrong, without the URL (the error names it once) and with the cause that
    /// reqwest keeps in its source chain ("Connection refused").
    fn describe(&self, e: reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("no answer within {} s", self.timeout.as_secs());
        }
        let e = e.without_url();
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail = format!("{detail}: {s}");
            source = s.source();
        }
        detail
    }
}

/// A header value ntfy shows as written: plain when it is printable ASCII, otherwise an
/// RFC 2047 encoded word, which ntfy decodes (a raw `é` or newline would make the request fail).
fn header_text(text: &str) -> String {
    if text.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return text.to_string();
    }
    let mut encoded = String::from("=?utf-8?q?");
    for b in text.bytes() {
        match b {
            b' ' => encoded.push('_'),
            b if b.is_ascii_alphanumeric() => encoded.push(char::from(b)),
            b => encoded.push_str(&format!("={b:02X}")),
        }
    }
    encoded.push_str("?=");
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A real HTTP server: answers every request with `status`, hands each request
    /// (head and body) to the test.
    async fn server(status: u16) -> (String, mpsc::UnboundedReceiver<(String, String)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head, body_start) = loop {
                        let n = conn.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break (String::from_utf8_lossy(&buf[..i]).into_owned(), i + 4);
                        }
                    };
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < body_start + length {
                        let n = conn.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = String::from_utf8_lossy(&buf[body_start..]).into_owned();
                    let _ = tx.send((head, body));
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        (format!("http://{addr}"), rx)
    }

    fn held() -> Event {
        Event {
            kind: EventKind::Held,
            project: "immich".into(),
            title: "Immich v1.120.0 held: snapshot failed".into(),
            message: "the snapshot failed".into(),
            snapshot: Some("20240101-120000-v1.119.0".into()),
            from_version: Some("v1.119.0".into()),
            to_version: Some("v1.120.0".into()),
            at: Utc::now(),
        }
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn webhook_and_ntfy(url: &str) -> NotifyConfig {
        NotifyConfig {
            webhook_url: Some(format!("{url}/hook")),
            ntfy_url: Some(format!("{url}/")),
            ntfy_topic: Some("immich-alerts".into()),
            ntfy_token: Some("tk_secret".into()),
            ..NotifyConfig::default()
        }
    }

    /// The next `n` requests, in path order (the targets are sent to at once).
    async fn next(
        requests: &mut mpsc::UnboundedReceiver<(String, String)>,
        n: usize,
    ) -> Vec<(String, String)> {
        let mut got = Vec::new();
        for _ in 0..n {
            got.push(requests.recv().await.unwrap());
        }
        got.sort();
        got
    }

    #[tokio::test]
    async fn held_reaches_the_webhook_as_json_and_ntfy_as_a_high_priority_push() {
        let (url, mut requests) = server(200).await;
        let notifier = Notifier::new(&webhook_and_ntfy(&url));
        assert!(notifier.is_enabled());
        let event = held();
        let results = notifier.deliver(&event).await;
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let got = next(&mut requests, 2).await;

        let (head, body) = &got[0];
        assert!(head.starts_with("POST /hook "), "{head}");
        assert_eq!(header(head, "content-type"), Some("application/json"));
        let agent = concat!("immich-guard/", env!("CARGO_PKG_VERSION"));
        assert_eq!(header(head, "user-agent"), Some(agent));
        assert_eq!(header(head, "authorization"), None, "the token is ntfy's");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["kind"], "held");
        assert_eq!(json["project"], "immich");
        assert_eq!(json["title"], event.title);
        assert_eq!(json["message"], "the snapshot failed");
        assert_eq!(json["snapshot"], "20240101-120000-v1.119.0");
        assert_eq!(json["from_version"], "v1.119.0");
        assert_eq!(json["to_version"], "v1.120.0");
        let at: DateTime<Utc> = json["at"].as_str().unwrap().parse().unwrap();
        assert_eq!(at, event.at);

        let (head, body) = &got[1];
        assert!(head.starts_with("POST /immich-alerts "), "{head}");
        assert_eq!(body, "the snapshot failed");
        assert_eq!(header(head, "title"), Some(event.title.as_str()));
        assert_eq!(header(head, "priority"), Some("4"));
        assert_eq!(header(head, "tags"), Some("warning"));
        assert_eq!(header(head, "authorization"), Some("Bearer tk_secret"));
    }

    #[test]
    fn only_what_needs_the_admin_is_high_priority() {
        for kind in [
            EventKind::Held,
            EventKind::CrashLoop,
            EventKind::SnapshotFailed,
            EventKind::DrillFailed,
            EventKind::Degraded,
        ] {
            assert_eq!(kind.priority(), 4, "{kind:?}");
        }
        for kind in [
            EventKind::SnapshotSealed,
            EventKind::RetentionFailed,
            EventKind::Frozen,
            EventKind::Released,
            EventKind::Recovered,
        ] {
            assert_eq!(kind.priority(), 3, "{kind:?}");
        }
        assert_eq!(EventKind::SnapshotSealed.tags(), "floppy_disk");
        assert_eq!(EventKind::Frozen.tags(), "ice_cube");
        assert_eq!(
            serde_json::to_string(&EventKind::CrashLoop).unwrap(),
            "\"crash-loop\""
        );
        assert_eq!(
            serde_json::to_string(&EventKind::RetentionFailed).unwrap(),
            "\"retention-failed\""
        );
        assert_eq!(EventKind::RetentionFailed.tags(), "warning");
    }

    #[tokio::test]
    async fn a_title_outside_ascii_reaches_ntfy_as_an_encoded_word() {
        let (url, mut requests) = server(200).await;
        let notifier = Notifier::new(&NotifyConfig {
            ntfy_url: Some(url),
            ntfy_topic: Some("immich".into()),
            ..NotifyConfig::default()
        });
        let event = Event {
            title: "Immich held → café".into(),
            ..held()
        };
        let results = notifier.deliver(&event).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let (head, _) = requests.recv().await.unwrap();
        assert_eq!(
            header(&head, "title"),
            Some("=?utf-8?q?Immich_held_=E2=86=92_caf=C3=A9?=")
        );
    }

    #[tokio::test]
    async fn a_500_is_retried_once_and_named_without_the_token() {
        let (url, mut requests) = server(500).await;
        let notifier = Notifier::new(&webhook_and_ntfy(&url));
        let results = notifier.deliver(&held()).await;
        let errors: Vec<String> = results
            .iter()
            .map(|r| r.as_ref().unwrap_err().to_string())
            .collect();
        assert_eq!(errors.len(), 2);
        assert!(errors[0].contains(&format!("{url}/hook")), "{}", errors[0]);
        assert!(
            errors[1].contains(&format!("{url}/immich-alerts")),
            "{}",
            errors[1]
        );
        for e in &errors {
            assert!(e.contains("500"), "{e}");
            assert!(!e.contains("tk_secret"), "{e}");
        }
        let got = next(&mut requests, 4).await;
        let paths: Vec<&str> = got
            .iter()
            .map(|(head, _)| head.split(' ').nth(1).unwrap())
            .collect();
        assert_eq!(
            paths,
            ["/hook", "/hook", "/immich-alerts", "/immich-alerts"],
            "one retry each"
        );
        assert!(requests.try_recv().is_err(), "no second retry");
    }

    #[tokio::test]
    async fn a_closed_port_fails_at_once_not_after_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        drop(listener);
        let notifier = Notifier::new(&NotifyConfig {
            webhook_url: Some(url.clone()),
            timeout_secs: 30,
            ..NotifyConfig::default()
        });
        let started = std::time::Instant::now();
        let results = notifier.deliver(&held()).await;
        let e = results[0].as_ref().unwrap_err().to_string();
        assert!(e.contains(&url), "{e}");
        assert!(e.to_lowercase().contains("refused"), "{e}");
        // Two refused connects and the 2 s pause between them; nowhere near 30 s.
        assert!(started.elapsed() < Duration::from_secs(10), "{e}");
    }

    #[tokio::test]
    async fn a_silent_target_times_out_and_says_so() {
        // Connections land in the backlog and are never answered.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let notifier = Notifier::new(&NotifyConfig {
            webhook_url: Some(url.clone()),
            timeout_secs: 1,
            ..NotifyConfig::default()
        });
        let results = notifier.deliver(&held()).await;
        let e = results[0].as_ref().unwrap_err().to_string();
        assert!(
            e.contains(&url) && e.contains("no answer within 1 s"),
            "{e}"
        );
        drop(listener);
    }

    #[tokio::test]
    async fn send_never_waits_for_a_target() {
        // Accepts connections and never answers; 200 events overflow the queue of 64.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let notifier = Notifier::new(&NotifyConfig {
            webhook_url: Some(url),
            ..NotifyConfig::default()
        });
        let started = std::time::Instant::now();
        for _ in 0..200 {
            notifier.send(held());
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(listener);
    }

    #[tokio::test]
    async fn nothing_configured_sends_nothing() {
        let notifier = Notifier::new(&NotifyConfig::default());
        assert!(!notifier.is_enabled());
        assert!(notifier.deliver(&held()).await.is_empty());
        notifier.send(held());
    }
}
