//! An SSE test client with its own incremental parser (WHATWG event-stream rules), kept apart
//! from the proxy's decoder so black-box tests do not trust the code they test.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` name, `message` when none was given.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last event ID in effect when the event was dispatched.
    pub id: Option<String>,
    /// A `retry:` value seen within this event.
    pub retry: Option<u64>,
}

impl SseEvent {
    /// Parses `data` as JSON.
    pub fn json(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.data)
    }
}

/// What the parser yields: events, and comments (so tests can see keepalives).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SseItem {
    /// A dispatched event.
    Event(SseEvent),
    /// A `:` comment line, without the colon and one leading space.
    Comment(String),
}

/// Incremental parser: push bytes as they arrive, get complete items out.
#[derive(Debug)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`; a leading `\n` belongs to that line break.
    after_cr: bool,
    /// Still at the very start of the stream (where a BOM is skipped).
    at_start: bool,
    /// Nothing but a byte-order mark's prefix seen so far.
    bom: Vec<u8>,
    event: Option<String>,
    data: String,
    has_data: bool,
    retry: Option<u64>,
    last_id: Option<String>,
}

const BOM: &[u8] = "\u{feff}".as_bytes();

impl Default for SseParser {
    fn default() -> Self {
        Self {
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            bom: Vec::new(),
            event: None,
            data: String::new(),
            has_data: false,
            retry: None,
            last_id: None,
        }
    }
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns every item they complete, in order.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<SseItem> {
        let mut out = Vec::new();
        if self.at_start {
            // The BOM may itself arrive split across chunks.
            while let Some((&b, rest)) = bytes.split_first() {
                if self.bom.len() < BOM.len() && BOM.get(self.bom.len()) == Some(&b) {
                    self.bom.push(b);
                    bytes = rest;
                    if self.bom.len() == BOM.len() {
                        self.at_start = false;
                        break;
                    }
                } else {
                    // Not a BOM after all: its partial bytes are ordinary content.
                    self.at_start = false;
                    let partial = std::mem::take(&mut self.bom);
                    self.feed(&partial, &mut out);
                    break;
                }
            }
            if self.at_start {
                return out;
            }
        }
        self.feed(bytes, &mut out);
        out
    }

    /// The bytes of the unfinished line (useful to assert a partial line was kept).
    pub fn pending(&self) -> &[u8] {
        &self.line
    }

    /// The last event ID seen (`id:` persists across events, per the spec).
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseItem>) {
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out);
                }
                _ => self.line.push(b),
            }
        }
    }

    fn end_line(&mut self, out: &mut Vec<SseItem>) {
        let line = std::mem::take(&mut self.line);
        let line = String::from_utf8_lossy(&line);
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            out.push(SseItem::Comment(
                comment.strip_prefix(' ').unwrap_or(comment).to_owned(),
            ));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|c| c.is_ascii_digit()) => {
                self.retry = value.parse().ok();
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseItem>) {
        let event = self.event.take();
        let retry = self.retry.take();
        if !std::mem::take(&mut self.has_data) {
            // Per the spec, an event without data lines is not dispatched.
            self.data.clear();
            return;
        }
        out.push(SseItem::Event(SseEvent {
            event: event
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "message".to_owned()),
            data: std::mem::take(&mut self.data),
            id: self.last_id.clone(),
            retry,
        }));
    }
}

/// What can go wrong reading a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SseError {
    /// The request failed before a response arrived.
    #[error("connect failed: {0}")]
    Connect(#[source] reqwest::Error),
    /// The server answered with something other than 200.
    #[error("unexpected status {status}: {body}")]
    Status {
        /// The status.
        status: u16,
        /// The Content-Type, if any.
        content_type: Option<String>,
        /// The body (read for at most a second).
        body: String,
    },
    /// Nothing arrived in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The body ended properly (clean EOF).
    #[error("stream ended")]
    Ended,
    /// The connection broke mid-body.
    #[error("stream broken: {0}")]
    Broken(#[source] reqwest::Error),
    /// `expect_silence` saw an item.
    #[error("unexpected item {0:?}")]
    Unexpected(SseItem),
}

/// How a stream finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// Terminating chunk received.
    Clean,
    /// Connection broken (reset, truncated chunked body).
    Broken,
}

/// A reqwest client suited to loopback tests: no system proxy, short connect timeout.
pub fn test_http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// An open SSE response being read item by item.
#[derive(Debug)]
pub struct SseClient {
    response: reqwest::Response,
    status: u16,
    headers: http::HeaderMap,
    parser: SseParser,
    queue: VecDeque<SseItem>,
    raw: Vec<u8>,
    end: Option<StreamEnd>,
}

impl SseClient {
    /// GETs `url` with `Accept: text/event-stream` and no credentials.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, SseError> {
        Self::open(test_http_client().get(url), timeout).await
    }

    /// Sends `request` (add headers, query, auth to it first). Non-200 answers are
    /// [`SseError::Status`] so fault tests can match on them.
    pub async fn open(
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Self, SseError> {
        let request = request.header(http::header::ACCEPT, "text/event-stream");
        let response = tokio::time::timeout(timeout, request.send())
            .await
            .map_err(|_| SseError::Timeout(timeout))?
            .map_err(SseError::Connect)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        if status != 200 {
            let content_type = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = tokio::time::timeout(Duration::from_secs(1), response.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(SseError::Status {
                status,
                content_type,
                body,
            });
        }
        Ok(Self {
            response,
            status,
            headers,
            parser: SseParser::new(),
            queue: VecDeque::new(),
            raw: Vec::new(),
            end: None,
        })
    }

    /// The response status (always 200 for a connected client).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The response headers.
    pub fn headers(&self) -> &http::HeaderMap {
        &self.headers
    }

    /// A response header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every body byte received so far, for byte-exact assertions.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The parser (for `pending()` / `last_event_id()`).
    pub fn parser(&self) -> &SseParser {
        &self.parser
    }

    /// Reads one more chunk into the queue; `Ok(false)` once the body has ended.
    async fn fill(&mut self) -> Result<bool, SseError> {
        if self.end.is_some() {
            return Ok(false);
        }
        match self.response.chunk().await {
            Ok(Some(chunk)) => {
                self.take_chunk(&chunk);
                Ok(true)
            }
            Ok(None) => {
                self.end = Some(StreamEnd::Clean);
                Ok(false)
            }
            Err(e) => {
                self.end = Some(StreamEnd::Broken);
                Err(SseError::Broken(e))
            }
        }
    }

    fn take_chunk(&mut self, chunk: &Bytes) {
        self.raw.extend_from_slice(chunk);
        self.queue.extend(self.parser.push(chunk));
    }

    /// The next event or comment, waiting at most `timeout`.
    pub async fn next_item(&mut self, timeout: Duration) -> Result<SseItem, SseError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Ok(item);
            }
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Err(_) => return Err(SseError::Timeout(timeout)),
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return Err(SseError::Ended),
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// The next event, skipping comments, waiting at most `timeout` in total.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<SseEvent, SseError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_item(left).await {
                Ok(SseItem::Event(ev)) => return Ok(ev),
                Ok(SseItem::Comment(_)) => {}
                Err(SseError::Timeout(_)) => return Err(SseError::Timeout(timeout)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Asserts that nothing at all (not even a comment) arrives for `duration`.
    pub async fn expect_silence(&mut self, duration: Duration) -> Result<(), SseError> {
        match self.next_item(duration).await {
            Err(SseError::Timeout(_)) => Ok(()),
            Ok(item) => Err(SseError::Unexpected(item)),
            Err(e) => Err(e),
        }
    }

    /// Reads (and queues) until `want` body bytes have arrived in total, or `timeout`.
    pub async fn read_until_bytes(
        &mut self,
        want: usize,
        timeout: Duration,
    ) -> Result<(), SseError> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.raw.len() < want {
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Err(_) => return Err(SseError::Timeout(timeout)),
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return Err(SseError::Ended),
                Ok(Err(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads until the body ends and says how; queued items stay readable.
    pub async fn wait_end(&mut self, timeout: Duration) -> Result<StreamEnd, SseError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.end {
                return Ok(end);
            }
            if tokio::time::timeout_at(deadline, self.fill())
                .await
                .is_err()
            {
                return Err(SseError::Timeout(timeout));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str) -> SseItem {
        SseItem::Event(SseEvent {
            event: event.to_owned(),
            data: data.to_owned(),
            id: None,
            retry: None,
        })
    }

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseItem> {
        let mut p = SseParser::new();
        chunks.iter().flat_map(|c| p.push(c)).collect()
    }

    #[test]
    fn parses_table() {
        let cases: &[(&[&[u8]], Vec<SseItem>)] = &[
            (&[b"event: init\ndata: {}\n\n"], vec![ev("init", "{}")]),
            (&[b"data: a\ndata: b\n\n"], vec![ev("message", "a\nb")]),
            (&[b"data:x\r\n\r\n"], vec![ev("message", "x")]),
            (&[b"data: x\r\r"], vec![ev("message", "x")]),
            (&[b"data: x\r", b"\n\r", b"\n"], vec![ev("message", "x")]),
            (
                &[b"even", b"t: a\nda", b"ta: 1\n", b"\n"],
                vec![ev("a", "1")],
            ),
            (
                &[b": keepalive\n\n"],
                vec![SseItem::Comment("keepalive".into())],
            ),
            (&[b"event: lonely\n\n"], vec![]),
            (&[b"data\n\n"], vec![ev("message", "")]),
            (
                &[b"data:  two spaces\n\n"],
                vec![ev("message", " two spaces")],
            ),
            (&[b"unknown: x\ndata: y\n\n"], vec![ev("message", "y")]),
            (
                &["\u{feff}data: bom\n\n".as_bytes()],
                vec![ev("message", "bom")],
            ),
            (
                &[&[0xef, 0xbb], &[0xbf], b"data: split bom\n\n"],
                vec![ev("message", "split bom")],
            ),
            (&[b"data: no end"], vec![]),
            (&[b"event: a\n\nevent: b\ndata: 2\n\n"], vec![ev("b", "2")]),
        ];
        for (chunks, want) in cases {
            assert_eq!(&parse_all(chunks), want, "chunks {chunks:?}");
        }
    }

    #[test]
    fn id_and_retry() {
        let items =
            parse_all(&[b"id: 7\nretry: 3000\ndata: a\n\ndata: b\n\nretry: x\ndata: c\n\n"]);
        let events: Vec<(Option<String>, Option<u64>)> = items
            .into_iter()
            .filter_map(|i| match i {
                SseItem::Event(e) => Some((e.id, e.retry)),
                SseItem::Comment(_) => None,
            })
            .collect();
        assert_eq!(
            events,
            vec![
                (Some("7".into()), Some(3000)),
                (Some("7".into()), None),
                (Some("7".into()), None),
            ]
        );
    }

    #[test]
    fn keeps_partial_lines() {
        let mut p = SseParser::new();
        assert!(p.push(b"event: x\ndata: {\"a\"").is_empty());
        assert_eq!(p.pending(), b"data: {\"a\"");
        assert_eq!(p.push(b":1}\n\n"), vec![ev("x", "{\"a\":1}")]);
        assert!(p.pending().is_empty());
    }

    #[test]
    fn byte_at_a_time_equals_whole() {
        let input: &[u8] =
            b"event: init\r\ndata: {\"flags\":{}}\r\n\r\n: c\n\ndata: 1\rdata: 2\r\r";
        let whole = parse_all(&[input]);
        let mut p = SseParser::new();
        let bytewise: Vec<SseItem> = input.iter().flat_map(|b| p.push(&[*b])).collect();
        assert_eq!(whole, bytewise);
        assert_eq!(whole.len(), 3);
    }
}
