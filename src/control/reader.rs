//! Reads request lines off one connection within bounds: a line of at most
//! [`MAX_REQUEST_BYTES`](super::MAX_REQUEST_BYTES), complete within a deadline (an idle or
//! byte-by-byte client is cut off), through a small buffer; blank lines are not answered one
//! by one.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::time::Instant;

use super::MAX_REQUEST_BYTES;

/// Time from the moment the daemon waits for a request until its newline has arrived.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Blank lines a connection may send in all; the first is answered (it is most likely a
/// person pressing Enter in socat), the others are skipped, and past this the
/// connection is closed.
pub const MAX_BLANK_LINES: u32 = 16;
/// The connection's read buffer; a request line grows past it only while it is being read.
const READ_BUFFER: usize = 1024;

/// What came next on the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A line to parse and answer, without its newline; `last`: the peer closed after it
    /// (no newline), so nothing more will come.
    Request { line: Vec<u8>, last: bool },
    /// Answer this error, then close the connection: reading cannot go on.
    Close(String),
    /// The peer closed, or the connection failed: nothing to answer.
    Gone,
}

pub struct RequestReader<R> {
    reader: BufReader<R>,
    timeout: Duration,
    blank_lines: u32,
}

impl<R: AsyncRead + Unpin> RequestReader<R> {
    pub fn new(read: R) -> Self {
        Self::with_timeout(read, REQUEST_TIMEOUT)
    }

    pub fn with_timeout(read: R, timeout: Duration) -> Self {
        RequestReader {
            reader: BufReader::with_capacity(READ_BUFFER, read),
            timeout,
            blank_lines: 0,
        }
    }

    pub async fn next(&mut self) -> Next {
        // One deadline for the whole request: skipped blank lines do not extend it.
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut line = Vec::new();
            // One byte more than allowed tells "exactly at the limit" from "over it".
            let limit = (MAX_REQUEST_BYTES + 1) as u64;
            let read = tokio::time::timeout_at(
                deadline,
                (&mut self.reader).take(limit).read_until(b'\n', &mut line),
            )
            .await;
            let n = match read {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => return Next::Gone,
                Err(_) => {
                    return Next::Close(format!(
                        "no complete request within {} s; closing",
                        self.timeout.as_secs()
                    ));
                }
            };
            if n == 0 {
                return Next::Gone;
            }
            let complete = line.last() == Some(&b'\n');
            if complete {
                line.pop();
            } else if line.len() > MAX_REQUEST_BYTES {
                // The rest of the line is unread: there is no way to find the next request.
                return Next::Close(format!(
                    "request too large: more than {MAX_REQUEST_BYTES} bytes without a newline"
                ));
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                self.blank_lines += 1;
                if self.blank_lines > MAX_BLANK_LINES {
                    return Next::Close(format!(
                        "more than {MAX_BLANK_LINES} blank lines; closing"
                    ));
                }
                if self.blank_lines > 1 {
                    if !complete {
                        return Next::Gone;
                    }
                    continue;
                }
            }
            return Next::Request {
                line,
                last: !complete,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn request(text: &str, last: bool) -> Next {
        Next::Request {
            line: text.as_bytes().to_vec(),
            last,
        }
    }

    #[tokio::test]
    async fn lines_come_one_by_one_and_a_last_line_without_newline_counts() {
        let (mut client, server) = tokio::io::duplex(4096);
        client
            .write_all(b"{\"verb\":\"status\"}\n{\"verb\":\"list\"}")
            .await
            .unwrap();
        drop(client);
        let mut reader = RequestReader::new(server);
        assert_eq!(reader.next().await, request("{\"verb\":\"status\"}", false));
        assert_eq!(reader.next().await, request("{\"verb\":\"list\"}", true));
        assert_eq!(reader.next().await, Next::Gone);
    }

    #[tokio::test]
    async fn a_flood_of_blank_lines_gets_one_answer_then_the_connection_is_closed() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut reader = RequestReader::new(server);
        // Blank lines between requests are skipped without an answer.
        client
            .write_all(b"\n \r\n\t\n{\"verb\":\"status\"}\n")
            .await
            .unwrap();
        assert_eq!(reader.next().await, request("", false));
        assert_eq!(reader.next().await, request("{\"verb\":\"status\"}", false));
        client.write_all(&[b'\n'; 10_000]).await.unwrap();
        let Next::Close(message) = reader.next().await else {
            panic!("a blank-line flood must close the connection");
        };
        assert!(message.contains("blank lines"), "{message}");
    }

    #[tokio::test]
    async fn an_overlong_line_is_refused_without_reading_on() {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        client
            .write_all(&vec![b'a'; MAX_REQUEST_BYTES + 10])
            .await
            .unwrap();
        let mut reader = RequestReader::new(server);
        let Next::Close(message) = reader.next().await else {
            panic!("an overlong line must close the connection");
        };
        assert!(message.contains("too large"), "{message}");
    }

    #[tokio::test]
    async fn an_idle_or_slow_client_is_cut_off_at_the_deadline() {
        let timeout = Duration::from_millis(300);
        let (_idle, server) = tokio::io::duplex(4096);
        let start = std::time::Instant::now();
        let next = RequestReader::with_timeout(server, timeout).next().await;
        assert!(matches!(next, Next::Close(ref m) if m.contains("no complete request")));
        assert!(start.elapsed() < timeout * 3);

        // Byte by byte: every byte is on time, the line never is.
        let (mut client, server) = tokio::io::duplex(4096);
        let drip = tokio::spawn(async move {
            for _ in 0..100 {
                if client.write_all(b"{").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let start = std::time::Instant::now();
        let next = RequestReader::with_timeout(server, timeout).next().await;
        assert!(matches!(next, Next::Close(_)), "{next:?}");
        assert!(start.elapsed() < timeout * 3, "{:?}", start.elapsed());
        drip.abort();
    }
}
