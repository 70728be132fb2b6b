//! Incremental WHATWG event-stream decoder: bytes in, events out, memory bounded by limits.
//!
//! This is the "event stream interpretation" of the WHATWG HTML standard (§9.2.6), fed in
//! arbitrary chunks:
//! - one UTF-8 BOM is stripped at the start of the stream, even when split across chunks;
//! - lines end with CRLF, LF or CR; a CR ending one chunk and an LF starting the next is one
//!   line ending, not two;
//! - invalid UTF-8 is decoded lossily (U+FFFD), line by line, which gives the same text as
//!   decoding the whole stream because line endings are ASCII;
//! - an event still incomplete when the stream ends is discarded, so there is no `finish`:
//!   call [`Decoder::reset`] before decoding the next connection's stream.
//!
//! # Cost
//! Every byte is scanned once: a partial line is kept in a buffer and only the new chunk is
//! searched for a line ending, so feeding a large line one byte at a time stays linear. Lines
//! completed inside a chunk are parsed in place; only a line spanning chunks is copied (once).
//! A long such line that is an event's first `data` field becomes its data in place, and a
//! caller that hands the event back ([`Decoder::recycle`]) lets the next one reuse the buffer.
//!
//! # Limits
//! A hostile or broken upstream cannot make the decoder hold more than about
//! [`DecoderLimits::max_line_bytes`] + [`DecoderLimits::max_event_bytes`] bytes (plus the
//! queued events the caller has not drained). Exceeding either limit makes [`Decoder::push`]
//! fail; the caller is expected to drop the connection.

use std::collections::VecDeque;
use std::mem;
use std::time::Duration;

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// A buffered line at least this long that is its event's first `data` field becomes the
/// event's data without a copy ([`Decoder::recycle`] gives the buffer back).
const ADOPT_LINE_BYTES: usize = 64 * 1024;

/// Bounds on what one stream may make the decoder buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderLimits {
    /// The longest line accepted, in bytes, field name included and line ending excluded.
    /// Rollgate sends each snapshot as one `data:` line, so this must exceed the largest
    /// serialized flag set.
    pub max_line_bytes: usize,
    /// The largest event data accepted, in bytes of UTF-8 as it would be dispatched (its
    /// `data` lines joined with `\n`).
    pub max_event_bytes: usize,
}

impl DecoderLimits {
    /// Default line limit: 4 MiB, room for a large flag snapshot on one line.
    pub const DEFAULT_MAX_LINE_BYTES: usize = 4 << 20;
    /// Default event limit: 8 MiB.
    pub const DEFAULT_MAX_EVENT_BYTES: usize = 8 << 20;
}

impl Default for DecoderLimits {
    fn default() -> Self {
        Self {
            max_line_bytes: Self::DEFAULT_MAX_LINE_BYTES,
            max_event_bytes: Self::DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

/// A dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The event type: the last `event` field, or `"message"` when there was none (or it was
    /// empty).
    pub event: String,
    /// The `data` lines joined with `\n`.
    pub data: String,
    /// The stream's last event ID when this event was dispatched: ids are sticky, so an event
    /// without an `id` field carries the previous one (empty if none was ever set).
    pub id: String,
    /// Whether the event's type or data had bytes that are not UTF-8 (decoded lossily, as
    /// WHATWG says, into U+FFFD). A consumer that rejects invalid UTF-8 elsewhere (a JSON
    /// fetch body) must reject such an event too, not act on the replaced text.
    pub lossy: bool,
}

/// The stream broke a [`DecoderLimits`] bound. The decoder refuses further input until
/// [`Decoder::reset`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A line grew past [`DecoderLimits::max_line_bytes`].
    #[error("sse line longer than {limit} bytes")]
    LineTooLong {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// An event's data grew past [`DecoderLimits::max_event_bytes`].
    #[error("sse event data larger than {limit} bytes")]
    EventTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
}

/// An incremental event-stream parser.
///
/// Feed bytes with [`push`](Self::push) and drain [`next_event`](Self::next_event) after each
/// push (the queue is only bounded by what one chunk can dispatch):
///
/// ```
/// use rollgate_proxy_core::sse::decode::{Decoder, DecoderLimits};
/// let mut decoder = Decoder::new(DecoderLimits::default());
/// decoder.push(b"event: init\ndata: {\"fl")?;
/// assert!(decoder.next_event().is_none());
/// decoder.push(b"ags\":{}}\n\n")?;
/// let event = decoder.next_event().unwrap();
/// assert_eq!((event.event.as_str(), event.data.as_str()), ("init", "{\"flags\":{}}"));
/// # Ok::<(), rollgate_proxy_core::sse::decode::DecodeError>(())
/// ```
///
/// After `push` returns an error the decoder is failed: it has dropped its partial line and
/// event, and every later `push` returns the same error without reading its input, until
/// [`reset`](Self::reset). Events dispatched before the error stay queued.
#[derive(Debug)]
pub struct Decoder {
    limits: DecoderLimits,
    /// How many bytes of a leading BOM have been seen and held back; `None` once the stream
    /// is past its first three bytes (or they were not a BOM).
    bom_seen: Option<usize>,
    /// The current line so far: bytes after the last line ending, with no CR or LF in them.
    line: Vec<u8>,
    /// The previous chunk ended with CR, so an LF starting the next chunk ends no line.
    after_cr: bool,
    event_type: String,
    /// Every `data` value seen in this event, each followed by `\n` (WHATWG's data buffer).
    data: String,
    /// The current event's type or data had invalid UTF-8.
    lossy: bool,
    /// The id set by the current event's fields, committed at its blank line.
    id_buffer: String,
    /// The stream's committed last event ID (what a reconnect sends as `Last-Event-ID`).
    last_event_id: String,
    retry: Option<Duration>,
    comments: u64,
    queue: VecDeque<SseEvent>,
    failed: Option<DecodeError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(DecoderLimits::default())
    }
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new(limits: DecoderLimits) -> Self {
        Self {
            limits,
            bom_seen: Some(0),
            line: Vec::new(),
            after_cr: false,
            event_type: String::new(),
            data: String::new(),
            lossy: false,
            id_buffer: String::new(),
            last_event_id: String::new(),
            retry: None,
            comments: 0,
            queue: VecDeque::new(),
            failed: None,
        }
    }

    /// Parses every line `chunk` completes and queues the events they dispatch; keeps the
    /// trailing partial line for the next call.
    ///
    /// # Errors
    /// [`DecodeError::LineTooLong`] or [`DecodeError::EventTooLarge`] when the stream breaks a
    /// limit, or the earlier error again if the decoder already failed. The decoder then needs
    /// [`reset`](Self::reset).
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), DecodeError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        let result = self.push_unchecked(chunk);
        if let Err(err) = result {
            self.failed = Some(err);
            // Free what the hostile input made us buffer; the caller is dropping the stream.
            self.line = Vec::new();
            self.data = String::new();
            self.event_type = String::new();
        }
        result
    }

    /// The next dispatched event, oldest first.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        self.queue.pop_front()
    }

    /// Prepares for a new stream (a reconnect): drops the partial line and the incomplete event
    /// (including an `id` it set), expects a BOM again and clears a failure. Keeps the last
    /// event ID, the retry delay, the comment count and events already queued.
    pub fn reset(&mut self) {
        self.bom_seen = Some(0);
        self.line = Vec::new();
        self.after_cr = false;
        self.event_type.clear();
        self.data = String::new();
        self.lossy = false;
        self.id_buffer.clone_from(&self.last_event_id);
        self.failed = None;
    }

    /// The last event ID committed by a blank line: what to send as `Last-Event-ID` on
    /// reconnect. Empty when the stream never set one (or reset it with an empty `id`).
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// The latest valid `retry` field: the reconnection delay the server asked for.
    pub fn retry(&self) -> Option<Duration> {
        self.retry
    }

    /// How many comment lines (starting with `:`) the decoder has read; keepalives are comments.
    pub fn comments_seen(&self) -> u64 {
        self.comments
    }

    fn push_unchecked(&mut self, mut chunk: &[u8]) -> Result<(), DecodeError> {
        if let Some(seen) = self.bom_seen {
            let missing = &BOM[seen..];
            let n = missing.len().min(chunk.len());
            if chunk[..n] == missing[..n] {
                if n < missing.len() {
                    // Still could be a BOM: hold the bytes back until we know.
                    self.bom_seen = Some(seen + n);
                    return Ok(());
                }
                chunk = &chunk[n..];
                self.bom_seen = None;
            } else {
                // Not a BOM after all: the bytes held back are ordinary content.
                self.bom_seen = None;
                self.feed(&BOM[..seen])?;
            }
        }
        self.feed(chunk)
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), DecodeError> {
        let mut start = 0;
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                start = 1;
            }
        }
        while let Some(offset) = memchr::memchr2(b'\n', b'\r', &chunk[start..]) {
            let end = start + offset;
            self.complete_line(&chunk[start..end])?;
            start = end + 1;
            if chunk[end] == b'\r' {
                match chunk.get(start) {
                    Some(b'\n') => start += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        let rest = &chunk[start..];
        self.check_line_len(rest.len())?;
        self.line.extend_from_slice(rest);
        Ok(())
    }

    fn check_line_len(&self, more: usize) -> Result<(), DecodeError> {
        if self.line.len().saturating_add(more) > self.limits.max_line_bytes {
            return Err(DecodeError::LineTooLong {
                limit: self.limits.max_line_bytes,
            });
        }
        Ok(())
    }

    /// Handles the line made of the buffered partial line plus `tail`.
    fn complete_line(&mut self, tail: &[u8]) -> Result<(), DecodeError> {
        self.check_line_len(tail.len())?;
        if self.line.is_empty() {
            return self.process_line(tail);
        }
        let mut line = mem::take(&mut self.line);
        line.extend_from_slice(tail);
        if let Some(line) = self.adopt_data_line(&mut line) {
            // The buffer is the event's data now; `recycle` gives it back once read.
            self.line = line;
            return Ok(());
        }
        let result = self.process_line(&line);
        // Keep the allocation (bounded by the line limit) for the next long line. Releasing a
        // snapshot-sized one (1 MiB for 2,000 flags) was measured worse on the Worker: every
        // change grew a new one by doubling, and its holes raised the wasm memory's level.
        line.clear();
        self.line = line;
        result
    }

    /// Takes a long buffered `line` that is its event's first `data` field as that data, in
    /// place: a snapshot arrives as one `data:` line of hundreds of KB over many chunks, and
    /// copying it out of the line buffer held it twice at every change's peak. Returns the
    /// line buffer to use from now on (empty), or `None` (the line is left as it was) for
    /// any other line, which is parsed as usual.
    fn adopt_data_line(&mut self, line: &mut Vec<u8>) -> Option<Vec<u8>> {
        if line.len() < ADOPT_LINE_BYTES || !self.data.is_empty() || !line.starts_with(b"data:") {
            return None;
        }
        let start = if line.get(5) == Some(&b' ') { 6 } else { 5 };
        let value = &line[start..];
        // Over the limit, or not UTF-8 (decoded lossily): the usual path reports or replaces.
        if value.len() > self.limits.max_event_bytes || std::str::from_utf8(value).is_err() {
            return None;
        }
        let mut data = mem::take(line);
        data.drain(..start);
        // Within the capacity the prefix freed: no reallocation.
        data.push(b'\n');
        self.data = match String::from_utf8(data) {
            Ok(data) => data,
            // Checked above; kept total all the same.
            Err(error) => {
                self.lossy = true;
                String::from_utf8_lossy(error.as_bytes()).into_owned()
            }
        };
        Some(Vec::new())
    }

    /// Gives back a dispatched event once it has been read: its data's allocation becomes
    /// the line buffer again when it is larger than the current one, so the next long line
    /// fills it instead of growing a new buffer by doubling (measured on the Worker: the
    /// holes a growing buffer leaves raise the wasm memory's level for good). Optional: an
    /// event that is not given back is simply freed.
    pub fn recycle(&mut self, event: SseEvent) {
        let mut buffer = event.data.into_bytes();
        let bound = self.limits.max_line_bytes.saturating_mul(2);
        if buffer.capacity() <= self.line.capacity() || buffer.capacity() > bound {
            return;
        }
        buffer.clear();
        buffer.extend_from_slice(&self.line);
        self.line = buffer;
    }

    fn process_line(&mut self, line: &[u8]) -> Result<(), DecodeError> {
        if line.is_empty() {
            self.dispatch();
            return Ok(());
        }
        if line[0] == b':' {
            self.comments += 1;
            return Ok(());
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match name {
            b"event" => {
                self.lossy |= std::str::from_utf8(value).is_err();
                self.event_type.clear();
                self.event_type.push_str(&String::from_utf8_lossy(value));
            }
            b"data" => {
                self.lossy |= std::str::from_utf8(value).is_err();
                let value = String::from_utf8_lossy(value);
                // The buffer minus its final "\n" is what would be dispatched.
                if self.data.len() + value.len() > self.limits.max_event_bytes {
                    return Err(DecodeError::EventTooLarge {
                        limit: self.limits.max_event_bytes,
                    });
                }
                // Reserve for the "\n" too, so a one-line event is allocated exactly once.
                self.data.reserve(value.len() + 1);
                self.data.push_str(&value);
                self.data.push('\n');
            }
            // Lossy decoding never produces NUL from other bytes, so checking bytes suffices.
            b"id" if !value.contains(&0) => {
                self.id_buffer.clear();
                self.id_buffer.push_str(&String::from_utf8_lossy(value));
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                let millis = value.iter().fold(0u64, |acc, digit| {
                    acc.saturating_mul(10)
                        .saturating_add(u64::from(digit - b'0'))
                });
                self.retry = Some(Duration::from_millis(millis));
            }
            // Unknown fields, an id with NUL and a retry with non-digits are ignored.
            _ => {}
        }
        Ok(())
    }

    /// A blank line: commit the id, then dispatch unless no data line was seen.
    fn dispatch(&mut self) {
        self.last_event_id.clone_from(&self.id_buffer);
        let lossy = mem::take(&mut self.lossy);
        if self.data.is_empty() {
            self.event_type.clear();
            return;
        }
        let mut data = mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        let event = if self.event_type.is_empty() {
            "message".to_owned()
        } else {
            mem::take(&mut self.event_type)
        };
        self.queue.push_back(SseEvent {
            event,
            data,
            id: self.last_event_id.clone(),
            lossy,
        });
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::sse::encode::Event;

    /// Everything observable after feeding a stream.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        events: Vec<SseEvent>,
        last_event_id: String,
        retry: Option<Duration>,
        comments: u64,
    }

    /// Expected `(event, data)` pairs, all with an empty id.
    type Events = &'static [(&'static str, &'static str)];
    /// Expected `(event, data, id)` triples.
    type EventsWithId = &'static [(&'static str, &'static str, &'static str)];

    fn ev(event: &str, data: &str, id: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
            id: id.into(),
            lossy: false,
        }
    }

    /// The events, with `lossy` cleared: the reference parser and the fixtures know only
    /// event, data and id (`lossy` has its own test).
    fn drain(decoder: &mut Decoder) -> Vec<SseEvent> {
        std::iter::from_fn(|| decoder.next_event())
            .map(|e| SseEvent { lossy: false, ..e })
            .collect()
    }

    #[test]
    fn invalid_utf8_marks_the_event_lossy() {
        let mut decoder = Decoder::default();
        decoder
            .push(b"event: init\ndata: {\"flags\":{\"\xff\xfe-bad\":true}}\n\ndata: ok\n\nevent: e\xffv\ndata: x\n\n")
            .unwrap();
        let events: Vec<SseEvent> = std::iter::from_fn(|| decoder.next_event()).collect();
        assert_eq!(events.len(), 3);
        assert!(events[0].lossy, "{:?}", events[0]);
        assert!(events[0].data.contains('\u{fffd}'));
        assert!(!events[1].lossy, "the next event starts clean");
        assert!(events[2].lossy, "an invalid event type counts too");
    }

    fn outcome(decoder: &mut Decoder, events: Vec<SseEvent>) -> Outcome {
        Outcome {
            events,
            last_event_id: decoder.last_event_id().to_owned(),
            retry: decoder.retry(),
            comments: decoder.comments_seen(),
        }
    }

    fn decode_chunks(chunks: &[&[u8]]) -> Outcome {
        let mut decoder = Decoder::default();
        let mut events = Vec::new();
        for chunk in chunks {
            decoder.push(chunk).unwrap();
            events.extend(drain(&mut decoder));
        }
        outcome(&mut decoder, events)
    }

    /// Pushes `stream` in pieces of the given sizes (cycled; 0 pushes an empty chunk), then
    /// the rest.
    fn decode_split(stream: &[u8], sizes: &[usize]) -> Outcome {
        let mut chunks = Vec::new();
        let mut rest = stream;
        for &size in sizes {
            let (head, tail) = rest.split_at(size.min(rest.len()));
            chunks.push(head);
            rest = tail;
        }
        chunks.push(rest);
        decode_chunks(&chunks)
    }

    fn decode_bytewise(stream: &[u8]) -> Outcome {
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        decode_chunks(&chunks)
    }

    /// A deliberately naive WHATWG parser: decode everything, then split lines. It shares no
    /// code with `Decoder`, so agreement checks the chunked machinery.
    fn reference(stream: &[u8]) -> Outcome {
        let text = String::from_utf8_lossy(stream);
        let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
        let mut lines = Vec::new();
        let mut current = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\r' => {
                    if chars.peek() == Some(&'\n') {
                        chars.next();
                    }
                    lines.push(mem::take(&mut current));
                }
                '\n' => lines.push(mem::take(&mut current)),
                c => current.push(c),
            }
        }
        let (mut events, mut data, mut event_type) = (Vec::new(), String::new(), String::new());
        let (mut id_buffer, mut last_id, mut retry, mut comments) =
            (String::new(), String::new(), None, 0);
        for line in lines {
            if line.is_empty() {
                last_id = id_buffer.clone();
                if data.is_empty() {
                    event_type.clear();
                    continue;
                }
                data.pop();
                let name = if event_type.is_empty() {
                    "message".into()
                } else {
                    event_type
                };
                events.push(ev(&name, &data, &last_id));
                (data, event_type) = (String::new(), String::new());
            } else if line.starts_with(':') {
                comments += 1;
            } else {
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line.as_str(), ""),
                };
                match field {
                    "event" => event_type = value.into(),
                    "data" => {
                        data.push_str(value);
                        data.push('\n');
                    }
                    "id" if !value.contains('\0') => id_buffer = value.into(),
                    "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                        retry = Some(Duration::from_millis(value.parse().unwrap_or(u64::MAX)));
                    }
                    _ => {}
                }
            }
        }
        Outcome {
            events,
            last_event_id: last_id,
            retry,
            comments,
        }
    }

    fn events(stream: &[u8]) -> Vec<SseEvent> {
        let whole = decode_chunks(&[stream]);
        assert_eq!(decode_bytewise(stream), whole, "bytewise {stream:?}");
        assert_eq!(reference(stream), whole, "reference {stream:?}");
        whole.events
    }

    #[test]
    fn line_endings() {
        let cases: &[(&[u8], Events)] = &[
            (b"data: a\n\n", &[("message", "a")]),
            (b"data: a\r\n\r\n", &[("message", "a")]),
            (b"data: a\r\r", &[("message", "a")]),
            (
                b"data: a\ndata: b\r\ndata: c\rdata: d\n\r\n",
                &[("message", "a\nb\nc\nd")],
            ),
            (
                b"data: a\n\rdata: b\r\n\ndata: c\r\n\r",
                &[("message", "a"), ("message", "b"), ("message", "c")],
            ),
            // CR LF is one ending, but LF CR is two: the CR is a blank line.
            (b"data: a\n\r", &[("message", "a")]),
            (b"data: a\r\n", &[]),
            // An unterminated last line and an undispatched event are dropped at EOF.
            (b"data: a\n\ndata: b\n", &[("message", "a")]),
            (b"data: a\n\ndata: b", &[("message", "a")]),
        ];
        for (stream, want) in cases {
            let want: Vec<_> = want.iter().map(|(e, d)| ev(e, d, "")).collect();
            assert_eq!(
                events(stream),
                want,
                "{:?}",
                String::from_utf8_lossy(stream)
            );
        }
    }

    #[test]
    fn cr_lf_split_across_chunks_is_one_line_ending() {
        // If the LF were a second ending it would be a blank line dispatching "a" early.
        let out = decode_chunks(&[b"data: a\r", b"\ndata: b\r", b"", b"\n\r", b"\n"]);
        assert_eq!(out.events, [ev("message", "a\nb", "")]);
        // A CR at a chunk end still ends its line at once.
        let mut decoder = Decoder::default();
        decoder.push(b"data: x\r\r").unwrap();
        assert_eq!(decoder.next_event(), Some(ev("message", "x", "")));
        decoder.push(b"\ndata: y\n\n").unwrap();
        assert_eq!(decoder.next_event(), Some(ev("message", "y", "")));
        assert_eq!(decoder.next_event(), None);
    }

    #[test]
    fn bom_is_stripped_once_at_stream_start() {
        let cases: &[(&[&[u8]], Events)] = &[
            (&[b"\xEF\xBB\xBFdata: a\n\n"], &[("message", "a")]),
            (
                &[b"\xEF", b"\xBB", b"\xBF", b"data: a\n\n"],
                &[("message", "a")],
            ),
            (&[b"\xEF\xBB", b"", b"\xBFdata: a\n\n"], &[("message", "a")]),
            (&[b"data: a\n\n"], &[("message", "a")]),
            // A second BOM is content: here it makes the field name "\u{FEFF}data".
            (&[b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\n"], &[]),
            (
                &[b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"],
                &[("message", "a")],
            ),
            (&[b"data: \xEF\xBB\xBFa\n\n"], &[("message", "\u{FEFF}a")]),
            // A BOM prefix that turns out not to be one is kept (and lossily decoded).
            (&[b"\xEF\xBB", b"data: a\n\n"], &[]),
            (&[b"\xEF", b"\n", b"data: a\n\n"], &[("message", "a")]),
            (&[b"\xEF\xBB\n", b"data: a\n\n"], &[("message", "a")]),
        ];
        for (chunks, want) in cases {
            let want: Vec<_> = want.iter().map(|(e, d)| ev(e, d, "")).collect();
            assert_eq!(decode_chunks(chunks).events, want, "{chunks:?}");
            assert_eq!(reference(&chunks.concat()).events, want, "{chunks:?}");
        }
        // The held-back prefix is real content: "\xEF\xBB" + ":" is no comment, "\xEF" +
        // "data" no data field.
        let out = decode_chunks(&[b"\xEF\xBB", b": c\n\xEFdata: x\n\n"]);
        assert_eq!((out.comments, out.events.len()), (0, 0));
    }

    #[test]
    fn fields() {
        let cases: &[(&[u8], EventsWithId)] = &[
            (b":comment\ndata: a\n\n", &[("message", "a", "")]),
            (b"data:a\n\n", &[("message", "a", "")]),
            (b"data:  a\n\n", &[("message", " a", "")]),
            (b"data: a:b: c\n\n", &[("message", "a:b: c", "")]),
            (
                b"data: a\ndata: b\ndata\ndata:\n\n",
                &[("message", "a\nb\n\n", "")],
            ),
            // A line without a colon is a field with an empty value.
            (b"data\n\n", &[("message", "", "")]),
            (b"event: x\nevent\ndata: a\n\n", &[("message", "a", "")]),
            (
                b"event: x\ndata: a\n\ndata: b\n\n",
                &[("x", "a", ""), ("message", "b", "")],
            ),
            // Blank line with no data: no event, and the event type is reset.
            (b"event: x\n\ndata: a\n\n", &[("message", "a", "")]),
            (b"event: x\nid: 1\n\n", &[]),
            (b"Data: a\nDATA: b\nfoo: c\n data: d\n\n", &[]),
            (
                b"data: a\n: inside\ndata: b\n\n",
                &[("message", "a\nb", "")],
            ),
            // Ids are sticky, NUL makes an id ignored, an empty id resets.
            (
                b"id: 1\ndata: a\n\ndata: b\n\n",
                &[("message", "a", "1"), ("message", "b", "1")],
            ),
            (
                b"id: 1\ndata: a\n\nid: 2\0\ndata: b\n\n",
                &[("message", "a", "1"), ("message", "b", "1")],
            ),
            (
                b"id: 1\ndata: a\n\nid\ndata: b\n\n",
                &[("message", "a", "1"), ("message", "b", "")],
            ),
            (
                b"id: 1\ndata: a\n\nid:\ndata: b\n\n",
                &[("message", "a", "1"), ("message", "b", "")],
            ),
            (b"id: 1\nid: 2\ndata: a\n\n", &[("message", "a", "2")]),
            (b"data: a\nid: 3\n\n", &[("message", "a", "3")]),
            // Invalid UTF-8 becomes U+FFFD.
            (
                b"data: \xFF\xE2\x82 \xC3\xA9\n\n",
                &[("message", "\u{FFFD}\u{FFFD} \u{e9}", "")],
            ),
            (b"data: \0\n\n", &[("message", "\0", "")]),
        ];
        for (stream, want) in cases {
            let want: Vec<_> = want.iter().map(|(e, d, i)| ev(e, d, i)).collect();
            assert_eq!(
                events(stream),
                want,
                "{:?}",
                String::from_utf8_lossy(stream)
            );
        }
    }

    #[test]
    fn last_event_id_is_committed_by_the_blank_line() {
        let mut decoder = Decoder::default();
        decoder.push(b"id: 1\n").unwrap();
        assert_eq!(decoder.last_event_id(), "");
        decoder.push(b"\n").unwrap();
        // Committed even though no event was dispatched.
        assert_eq!(decoder.next_event(), None);
        assert_eq!(decoder.last_event_id(), "1");
        decoder.push(b"id: 2\ndata: lost").unwrap();
        decoder.reset();
        assert_eq!(decoder.last_event_id(), "1");
        decoder.push(b"data: after reconnect\n\n").unwrap();
        assert_eq!(
            decoder.next_event(),
            Some(ev("message", "after reconnect", "1"))
        );
    }

    #[test]
    fn retry_accepts_only_digits() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (b"retry: 1500\n", Some(1500)),
            (b"retry:0\n", Some(0)),
            (b"retry: 0042\n", Some(42)),
            (
                b"retry: 1500\nretry: 12x\nretry: -1\nretry:\nretry\nretry:  7\nretry: 1.5\n",
                Some(1500),
            ),
            (b"retry: 99999999999999999999999\n", Some(u64::MAX)),
            (b"retry: \xD9\xA3\n", None), // ARABIC-INDIC DIGIT THREE is not an ASCII digit
            (b"retry: 5", None),          // line never completed
        ];
        for (stream, want) in cases {
            let out = decode_chunks(&[stream]);
            assert_eq!(out.retry, want.map(Duration::from_millis), "{stream:?}");
            assert_eq!(reference(stream).retry, out.retry, "{stream:?}");
        }
    }

    #[test]
    fn comments_are_counted() {
        let out = decode_chunks(&[b": keepalive\n\n:\n:x\r\n: a", b"\n data\n"]);
        assert_eq!((out.comments, out.events.len()), (4, 0));
    }

    #[test]
    fn line_limit() {
        let limits = DecoderLimits {
            max_line_bytes: 8,
            max_event_bytes: 100,
        };
        // Exactly at the limit: fine, whether whole or split.
        let mut decoder = Decoder::new(limits);
        decoder.push(b"data: ab\n\n").unwrap();
        decoder.push(b"data:").unwrap();
        decoder.push(b" cd").unwrap();
        decoder.push(b"\r").unwrap();
        decoder.push(b"\n\n").unwrap();
        assert_eq!(
            drain(&mut decoder),
            [ev("message", "ab", ""), ev("message", "cd", "")]
        );

        let too_long: &[&[&[u8]]] = &[
            &[b"data: abc\n"],
            &[b"data", b": abc\n"],
            // Fails while buffering, before any line ending arrives.
            &[b"data: abc"],
            &[b"data: ab", b"c"],
            &[b"\xEF\xBB", b"data: a\n"],
        ];
        for chunks in too_long {
            let mut decoder = Decoder::new(limits);
            let mut result = Ok(());
            for chunk in *chunks {
                result = result.and_then(|()| decoder.push(chunk));
            }
            assert_eq!(
                result,
                Err(DecodeError::LineTooLong { limit: 8 }),
                "{chunks:?}"
            );
        }
    }

    #[test]
    fn event_limit() {
        let limits = DecoderLimits {
            max_line_bytes: 100,
            max_event_bytes: 5,
        };
        let mut decoder = Decoder::new(limits);
        // "ab\ncd" is 5 bytes as dispatched.
        decoder
            .push(b"data: ab\ndata: cd\n\ndata: abcde\n\n")
            .unwrap();
        assert_eq!(
            drain(&mut decoder),
            [ev("message", "ab\ncd", ""), ev("message", "abcde", "")]
        );
        let err = DecodeError::EventTooLarge { limit: 5 };
        assert_eq!(decoder.push(b"data: ab\ndata: cde\n"), Err(err));
        let mut decoder = Decoder::new(limits);
        assert_eq!(decoder.push(b"data: abcdef\n"), Err(err));
        // Lossy decoding counts: one invalid byte becomes three bytes of U+FFFD.
        let mut decoder = Decoder::new(limits);
        assert_eq!(decoder.push(b"data: \xFF\xFF\n"), Err(err));
        assert_eq!(err.to_string(), "sse event data larger than 5 bytes");
    }

    #[test]
    fn failed_decoder_refuses_input_until_reset() {
        let limits = DecoderLimits {
            max_line_bytes: 16,
            max_event_bytes: 16,
        };
        let mut decoder = Decoder::new(limits);
        let err = DecodeError::LineTooLong { limit: 16 };
        let result = decoder.push(b"id: 7\ndata: ok\n\nid: 8\ndata: this line is far too long\n");
        assert_eq!(result, Err(err));
        // Later input is refused, even if harmless.
        assert_eq!(decoder.push(b"data: x\n\n"), Err(err));
        // Events dispatched before the error are still there.
        assert_eq!(drain(&mut decoder), [ev("message", "ok", "7")]);
        decoder.reset();
        assert_eq!(decoder.last_event_id(), "7");
        decoder.push(b"\xEF\xBB\xBFdata: y\n\n").unwrap();
        assert_eq!(drain(&mut decoder), [ev("message", "y", "7")]);
    }

    #[test]
    fn reset_starts_a_new_stream() {
        let mut decoder = Decoder::default();
        decoder
            .push(b"retry: 10\n: c\nevent: x\ndata: partial\r")
            .unwrap();
        decoder.reset();
        // The pending CR is forgotten (this LF is a blank line) and so is the event.
        decoder.push(b"\ndata: a\n\n").unwrap();
        assert_eq!(drain(&mut decoder), [ev("message", "a", "")]);
        assert_eq!(
            (decoder.retry(), decoder.comments_seen()),
            (Some(Duration::from_millis(10)), 1)
        );
    }

    /// Long `data` lines (over the adopt threshold) decode as the reference does, whatever
    /// the chunking, with more data lines after them, without the space, and with events
    /// around them; a recycled event's buffer carries the next long line.
    #[test]
    fn long_data_lines_are_taken_in_place() {
        let long = "x".repeat(ADOPT_LINE_BYTES + 10);
        let other = "y".repeat(ADOPT_LINE_BYTES * 2);
        let streams = [
            format!("event: rules-full\ndata: {long}\n\n"),
            format!("data:{long}\n\nevent: b\ndata: {other}\r\n\r\n"),
            format!("data: {long}\ndata: second\n\ndata: short\n\n"),
            format!("data: short\ndata: {long}\n\n: keepalive\n\n"),
            format!("id: 7\ndata: {long}\nid: 8\n\ndata: {other}\n\n"),
        ];
        for stream in &streams {
            let want = reference(stream.as_bytes());
            for size in [1_000, 4_096, ADOPT_LINE_BYTES, stream.len()] {
                let chunks: Vec<&[u8]> = stream.as_bytes().chunks(size).collect();
                assert_eq!(decode_chunks(&chunks), want, "chunks of {size}");
            }
        }
        // Handed back, the data's buffer is the line buffer again: the next long event is
        // read into it without growing another one.
        let mut decoder = Decoder::default();
        let stream = format!("data: {other}\n\n");
        for round in 0..3 {
            for chunk in stream.as_bytes().chunks(16 * 1024) {
                decoder.push(chunk).unwrap();
            }
            let event = decoder.next_event().unwrap();
            assert_eq!(event.data, other);
            let capacity = event.data.capacity();
            decoder.recycle(event);
            assert_eq!(decoder.line.capacity(), capacity, "round {round}");
            assert!(decoder.line.is_empty());
        }
    }

    /// A long line that is not UTF-8 takes the usual (lossy) path.
    #[test]
    fn long_invalid_utf8_data_is_lossy() {
        let mut stream = b"data: ".to_vec();
        stream.extend(std::iter::repeat_n(b'a', ADOPT_LINE_BYTES));
        stream.extend_from_slice(b"\xff\n\n");
        let mut decoder = Decoder::default();
        for chunk in stream.chunks(8 * 1024) {
            decoder.push(chunk).unwrap();
        }
        let event = decoder.next_event().unwrap();
        assert!(event.lossy);
        assert!(event.data.ends_with('\u{FFFD}'));
        assert_eq!(event.data.len(), ADOPT_LINE_BYTES + 3);
    }

    /// Each fixture `<name>.sse` has `<name>.expected.json`:
    /// `{"events":[{"event","data","id"}..],"last_event_id","retry_ms","comments"}`.
    #[test]
    fn golden_fixtures() {
        macro_rules! fixture {
            ($name:literal) => {
                (
                    $name,
                    &include_bytes!(concat!("../../tests/data/", $name, ".sse"))[..],
                    include_str!(concat!("../../tests/data/", $name, ".expected.json")),
                )
            };
        }
        let fixtures: &[(&str, &[u8], &str)] = &[
            fixture!("lf"),
            fixture!("crlf"),
            fixture!("cr"),
            fixture!("mixed"),
            fixture!("bom"),
            fixture!("fields"),
            fixture!("invalid-utf8"),
            fixture!("rollgate"),
            // The encoder's golden frames must decode to what they were built from.
            (
                "frames",
                include_bytes!("../../tests/data/frames.expected.sse"),
                include_str!("../../tests/data/frames.expected.json"),
            ),
        ];
        for (name, stream, expected) in fixtures {
            let json: serde_json::Value = serde_json::from_str(expected).unwrap();
            let text = |v: &serde_json::Value| v.as_str().unwrap().to_owned();
            let want = Outcome {
                events: json["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| SseEvent {
                        event: text(&e["event"]),
                        data: text(&e["data"]),
                        id: text(&e["id"]),
                        lossy: false,
                    })
                    .collect(),
                last_event_id: text(&json["last_event_id"]),
                retry: json["retry_ms"].as_u64().map(Duration::from_millis),
                comments: json["comments"].as_u64().unwrap(),
            };
            assert!(!want.events.is_empty(), "{name}");
            assert_eq!(decode_chunks(&[stream]), want, "{name}");
            assert_eq!(decode_bytewise(stream), want, "{name} bytewise");
            assert_eq!(
                decode_split(stream, &[3; 1000]),
                want,
                "{name} in 3-byte chunks"
            );
            assert_eq!(reference(stream), want, "{name} reference");
        }
    }

    /// Bytes that exercise the parser's decisions, so random streams hit them often.
    fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
        let token = prop_oneof![
            Just(&b"data"[..]),
            Just(&b"event"[..]),
            Just(&b"id"[..]),
            Just(&b"retry"[..]),
            Just(&b":"[..]),
            Just(&b" "[..]),
            Just(&b"\r"[..]),
            Just(&b"\n"[..]),
            Just(&b"\r\n"[..]),
            Just(&b"\n\n"[..]),
            Just(&b"\xEF\xBB\xBF"[..]),
            Just(&b"\xEF\xBB"[..]),
            Just(&b"\0"[..]),
            Just(&b"42"[..]),
            Just(&b"x"[..]),
            Just(&b"\xC3\xA9"[..]),
            Just(&b"\xFF"[..]),
        ]
        .prop_map(<[u8]>::to_vec);
        let any_byte = any::<u8>().prop_map(|b| vec![b]);
        prop::collection::vec(prop_oneof![4 => token, 1 => any_byte], 0..80)
            .prop_map(|t| t.concat())
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_outcome(
            stream in sse_bytes(),
            sizes in prop::collection::vec(0usize..12, 0..40),
        ) {
            let whole = decode_chunks(&[&stream]);
            prop_assert_eq!(&decode_split(&stream, &sizes), &whole);
            prop_assert_eq!(&decode_bytewise(&stream), &whole);
            prop_assert_eq!(&reference(&stream), &whole);
        }

        #[test]
        fn encode_then_decode_round_trips(
            frames in prop::collection::vec(
                (
                    "[^\r\n]{0,12}",
                    proptest::option::of("[^\r\n\0]{0,12}"),
                    proptest::option::of(prop_oneof!["[a \r\n]{0,16}", any::<String>()]),
                    proptest::option::of(0u64..10_000_000),
                    proptest::option::of("[c \r\n]{0,8}"),
                ),
                1..6,
            ),
            sizes in prop::collection::vec(0usize..64, 0..20),
        ) {
            let mut stream = Vec::new();
            let mut want = Vec::new();
            let mut last_id = String::new();
            let mut retry = None;
            let mut comments = 0;
            for (name, id, data, retry_ms, comment) in &frames {
                let mut event = Event::new().event(name).unwrap();
                if let Some(id) = id {
                    event = event.id(id).unwrap();
                    last_id.clone_from(id);
                }
                if let Some(ms) = retry_ms {
                    event = event.retry(Duration::from_millis(*ms));
                    retry = Some(Duration::from_millis(*ms));
                }
                if let Some(comment) = comment {
                    event = event.comment(comment);
                    comments += comment.replace("\r\n", "\n").split(['\r', '\n']).count() as u64;
                }
                if let Some(data) = data {
                    event = event.data(data);
                    let data = data.replace("\r\n", "\n").replace('\r', "\n");
                    let name = if name.is_empty() { "message" } else { name.as_str() };
                    want.push(ev(name, &data, &last_id));
                }
                stream.extend_from_slice(&event.to_bytes());
            }
            let want = Outcome { events: want, last_event_id: last_id, retry, comments };
            prop_assert_eq!(&decode_split(&stream, &sizes), &want);
        }
    }
}
