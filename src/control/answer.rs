//! Answering one request on the control socket: the connection loop (reading, limits,
//! permissions) is `server.rs`; what each verb does and sends back is here.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;

use super::server::Control;
use super::{Request, Response};
use crate::snapshot::queue::Event;
use crate::snapshot::store::Store;
use crate::status::StatusReport;

const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends the answer to `request` (several lines for a snapshot's progress). `Err` when the
/// client is gone or too slow to read.
pub(super) async fn answer(
    request: Request,
    control: &Control,
    write: &mut OwnedWriteHalf,
) -> Result<(), ()> {
    match request {
        Request::Status {} => {
            // Copy out under the borrow; never hold it across an await.
            let report = StatusReport::from_state(&control.state.borrow());
            send(write, &Response::Status(Box::new(report))).await
        }
        Request::List {} => {
            let dir = control.snapshot_dir.clone();
            let listed = tokio::task::spawn_blocking(move || Store::open(&dir)?.list())
                .await
                .expect("list thread");
            let response = match listed {
                Ok(snapshots) => Response::List { snapshots },
                Err(e) => Response::error(e.to_string()),
            };
            send(write, &response).await
        }
        Request::Incidents { id } => {
            let response = match crate::incident::find(&control.incident_dir, id.as_deref()) {
                Ok(incidents) => Response::Incidents { incidents },
                Err(message) => Response::error(message),
            };
            send(write, &response).await
        }
        Request::Release { force, service } => {
            let response = match control.guard.release(force, service).await {
                Ok(message) => Response::Released { message },
                Err(message) => Response::error(message),
            };
            send(write, &response).await
        }
        Request::Ack {} => {
            let response = match control.guard.ack().await {
                Ok(message) => Response::Acknowledged { message },
                Err(message) => Response::error(message),
            };
            send(write, &response).await
        }
        Request::Restore {
            snapshot,
            no_preserve,
            force,
        } => {
            let options = crate::restore::Options { no_preserve, force };
            super::restore::answer(control, snapshot, options, write).await
        }
        Request::AbandonRestore {} => {
            let running = control.state.borrow().restoring.clone();
            let response = match running {
                Some(r) => Response::error(format!(
                    "a restore is running ({r}); it cannot be abandoned while it runs: wait for it to end (`immich-guard status`)"
                )),
                None => match crate::restore::abandon::abandon(&control.config.daemon.data_dir) {
                    Ok(j) => {
                        control
                            .guard
                            .end_restore(crate::protect::RestoreEnd::Abandoned);
                        tracing::warn!(snapshot = %j.snapshot, "unfinished restore abandoned");
                        Response::Abandoned {
                            message: format!(
                                "the unfinished restore of {} is abandoned (kept in the restore history); protection is on",
                                j.snapshot
                            ),
                        }
                    }
                    Err(e) => Response::error(e.to_string()),
                },
            };
            send(write, &response).await
        }
        Request::Drill { id } => {
            let id = match id {
                Some(id) => id,
                None => {
                    let dir = control.snapshot_dir.clone();
                    match tokio::task::spawn_blocking(move || crate::drill::newest(&dir))
                        .await
                        .expect("list thread")
                    {
                        Ok(id) => id,
                        Err(e) => return send(write, &Response::error(e.to_string())).await,
                    }
                }
            };
            let (notes, mut lines) = tokio::sync::mpsc::unbounded_channel();
            let drill = control.drills.drill(&id, None, Some(notes));
            tokio::pin!(drill);
            // A client that went away does not stop the drill; it just stops hearing of it.
            let mut listening = true;
            let result = loop {
                tokio::select! {
                    result = &mut drill => break result,
                    Some(line) = lines.recv() => {
                        if listening {
                            listening = send(write, &Response::Progress { message: line }).await.is_ok();
                        }
                    }
                }
            };
            let response = match result {
                Ok(result) => Response::Drilled {
                    id: id.clone(),
                    result: Box::new(result),
                },
                Err(message) => Response::error(message),
            };
            send(write, &response).await
        }
        Request::Snapshot { label } => {
            // A snapshot of a half-restored stack is never wanted.
            let restoring = control.state.borrow().restoring.clone();
            if let Some(restoring) = restoring {
                let message =
                    format!("a restore is running ({restoring}); snapshot once it has finished");
                return send(write, &Response::error(message)).await;
            }
            let (stack, version) = {
                let state = control.state.borrow();
                (state.stack.clone(), state.protection.data_version())
            };
            let request = crate::snapshot::Request {
                stack,
                trigger: "manual".to_string(),
                label,
                version,
            };
            let mut events = control.queue.request(request).await;
            let mut result = Ok(());
            while let Some(event) = events.recv().await {
                let (response, last) = match event {
                    Event::Progress(p) => (Response::Progress { message: p.line() }, false),
                    Event::Sealed(meta) => (Response::Snapshot(meta), true),
                    Event::Failed(failure) => (Response::error(failure.message), true),
                };
                // A client that went away does not stop the snapshot; it just stops
                // hearing about it.
                result = send(write, &response).await;
                if last || result.is_err() {
                    break;
                }
            }
            result
        }
    }
}

/// One answer line.
pub(super) fn encode(response: &Response) -> Vec<u8> {
    let mut out = serde_json::to_vec(response).unwrap_or_else(|e| {
        format!("{{\"type\":\"error\",\"message\":\"cannot encode response: {e}\"}}").into_bytes()
    });
    out.push(b'\n');
    out
}

pub(super) async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> Result<(), ()> {
    let out = encode(response);
    match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&out)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}
