//! Notifications about protection: a generic JSON webhook and ntfy. Sending never blocks
//! protection: events go through a bounded queue to a background task, and a failure is
//! logged (after one retry), never raised.

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
    Frozen,
    Held,
    Released,
    CrashLoop,
}

impl EventKind {
    /// ntfy priority: 4 (high) for what needs the admin, 3 (default) otherwise.
    fn priority(self) -> u8 {
        match self {
            EventKind::Held | EventKind::CrashLoop | EventKind::SnapshotFailed => 4,
            _ => 3,
        }
    }

    fn tags(self) -> &'static str {
        match self {
            EventKind::SnapshotSealed => "floppy_disk",
            EventKind::Frozen => "ice_cube",
            EventKind::Released => "unlock",
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

struct Targets {
    client: reqwest::Client,
    webhook: Option<String>,
    ntfy: Option<(String, Option<String>)>,
}

/// Cheap to clone; a disabled notifier (nothing configured) drops everything.
#[derive(Clone)]
pub struct Notifier {
    targets: Arc<Targets>,
    queue: Option<mpsc::Sender<Event>>,
}

impl Notifier {
    /// Must be called inside a tokio runtime when anything is configured.
    pub fn new(config: &NotifyConfig) -> Notifier {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs))
            .user_agent(concat!("immich-guard/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        let ntfy = match (&config.ntfy_url, &config.ntfy_topic) {
            (Some(url), Some(topic)) => Some((
                format!("{}/{topic}", url.trim_end_matches('/')),
                config.ntfy_token.clone(),
            )),
            _ => None,
        };
        let targets = Arc::new(Targets {
            client,
            webhook: config.webhook_url.clone(),
            ntfy,
        });
        let mut notifier = Notifier {
            targets,
            queue: None,
        };
        if notifier.is_enabled() {
            let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
            let worker = notifier.clone();
            tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    worker.deliver(&event).await;
                }
            });
            notifier.queue = Some(tx);
        }
        notifier
    }

    pub fn is_enabled(&self) -> bool {
        self.targets.webhook.is_some() || self.targets.ntfy.is_some()
    }

    /// Queues the event and returns at once; a full queue drops it (logged).
    pub fn send(&self, event: Event) {
        if let Some(queue) = &self.queue
            && let Err(e) = queue.try_send(event)
        {
            tracing::warn!(error = %e, "notification queue full; dropped a notification");
        }
    }

    /// Sends to every target (one retry each); returns one result per target.
    pub async fn deliver(&self, event: &Event) -> Vec<Result<(), NotifyError>> {
        let mut results = Vec::new();
        if let Some(url) = &self.targets.webhook {
            let result = self
                .with_retry(url, || self.targets.client.post(url).json(event))
                .await;
            results.push(result);
        }
        if let Some((url, token)) = &self.targets.ntfy {
            let result = self
                .with_retry(url, || {
                    let mut request = self
                        .targets
                        .client
                        .post(url)
                        .header("Title", &event.title)
                        .header("Priority", event.kind.priority().to_string())
                        .header("Tags", event.kind.tags())
                        .body(event.message.clone());
                    if let Some(token) = token {
                        request = request.bearer_auth(token);
                    }
                    request
                })
                .await;
            results.push(result);
        }
        for r in &results {
            if let Err(e) = r {
                tracing::warn!(error = %e, "notification not delivered");
            }
        }
        results
    }

    async fn with_retry(
        &self,
        url: &str,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<(), NotifyError> {
        let attempt = || async {
            match request().send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(e.to_string()),
            }
        };
        let first = attempt().await;
        let result = match first {
            Ok(()) => Ok(()),
            Err(_) => {
                tokio::time::sleep(RETRY_AFTER).await;
                attempt().await
            }
        };
        result.map_err(|detail| NotifyError::Failed {
            url: url.to_string(),
            detail,
        })
    }
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
            title: "Immich v1.120.0 held".into(),
            message: "the snapshot failed".into(),
            snapshot: None,
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

    #[tokio::test]
    async fn webhook_gets_json_and_ntfy_gets_title_priority_and_token() {
        let (url, mut requests) = server(200).await;
        let notifier = Notifier::new(&NotifyConfig {
            webhook_url: Some(format!("{url}/hook")),
            ntfy_url: Some(url.clone()),
            ntfy_topic: Some("immich-alerts".into()),
            ntfy_token: Some("tk_secret".into()),
            ..NotifyConfig::default()
        });
        let results = notifier.deliver(&held()).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let (head, body) = requests.recv().await.unwrap();
        assert!(head.starts_with("POST /hook "), "{head}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["kind"], "held");
        assert_eq!(json["to_version"], "v1.120.0");
        let (head, body) = requests.recv().await.unwrap();
        assert!(head.starts_with("POST /immich-alerts "), "{head}");
        assert_eq!(body, "the snapshot failed");
        assert_eq!(header(&head, "title"), Some("Immich v1.120.0 held"));
        assert_eq!(header(&head, "priority"), Some("4"));
        assert_eq!(header(&head, "authorization"), Some("Bearer tk_secret"));
    }

    #[tokio::test]
    async fn a_failing_target_is_retried_once_and_named() {
        let (url, mut requests) = server(500).await;
        let notifier = Notifier::new(&NotifyConfig {
            webhook_url: Some(format!("{url}/hook")),
            ..NotifyConfig::default()
        });
        let results = notifier.deliver(&held()).await;
        let e = results[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("/hook") && e.contains("500"), "{e}");
        assert!(requests.recv().await.is_some());
        assert!(requests.recv().await.is_some(), "one retry");
    }

    #[tokio::test]
    async fn send_never_waits_for_a_target() {
        // Accepts connections and never answers.
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
    }
}
