//! SSE frame encoder: builds one event's bytes once, so every subscriber can share them.
//!
//! # Byte layout
//! Both adapters write these bytes verbatim and the golden file
//! `core/tests/data/frames.expected.sse` pins them. In order:
//!
//! 1. `: <line>\n` for each line of the comment, if one was set;
//! 2. `event: <name>\n` unless the name is empty;
//! 3. `id: <id>\n` if an id was set (an empty id is written as `id: \n`: per WHATWG it resets
//!    the client's last event ID, so it is not the same as no id);
//! 4. `retry: <ms>\n` if a retry was set, in whole milliseconds;
//! 5. `data: <line>\n` for each line of the data, if data was set;
//! 6. the blank line `\n` that ends the event.
//!
//! Every colon is followed by one space, which the WHATWG parser strips, so values that start
//! with a space survive.
//!
//! # Data round-trips
//! Data is split on `\r\n`, `\r` and `\n` into one `data:` line per line, and WHATWG decoding
//! joins the lines with `\n` and strips one trailing `\n`. Hence `decode(encode(x)).data == x`
//! for every string in which line breaks are `\n` (CRLF and lone CR come back as `\n`),
//! including:
//! - `""`, written as `data: \n` (one empty line): the event **is** dispatched, with empty data;
//! - `"a\n"`, written as `data: a\ndata: \n`: the final empty line supplies the `\n` that the
//!   decoder strips, so the trailing newline survives.
//!
//! An event without data (no [`Event::data`] call) has no `data:` line at all, and a WHATWG
//! client dispatches nothing for it; that is only useful to send `retry:` or a comment.

use std::time::Duration;

use bytes::Bytes;

/// A keepalive comment frame: SSE clients ignore it, but it resets their read timeouts
/// (Python's httpx times out after 5 s of silence).
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// A field value the SSE framing cannot carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// `event` or `id` contains `\r` or `\n`, which would end the field early and let the rest
    /// be read as another field.
    #[error("sse {field} field contains a line break")]
    NewlineInField {
        /// The offending field: `"event"` or `"id"`.
        field: &'static str,
    },
    /// `id` contains NUL: WHATWG clients silently ignore such an id, so it would never reach
    /// them as `Last-Event-ID`.
    #[error("sse id field contains a nul character")]
    NulInId,
}

/// One SSE event, built field by field and encoded with [`Event::to_bytes`].
///
/// ```
/// use rollgate_proxy_core::sse::encode::Event;
/// let frame = Event::new().event("init")?.id("7")?.data("{\"flags\":{}}").into_bytes();
/// assert_eq!(&frame[..], b"event: init\nid: 7\ndata: {\"flags\":{}}\n\n");
/// # Ok::<(), rollgate_proxy_core::sse::encode::EncodeError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    comment: Option<String>,
    event: String,
    id: Option<String>,
    retry: Option<Duration>,
    data: Option<String>,
}

impl Event {
    /// An empty event: encodes to a lone blank line until fields are set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the event type. An empty name writes no `event:` line (clients then see
    /// `"message"`). A second call replaces the first.
    pub fn event(mut self, name: &str) -> Result<Self, EncodeError> {
        if has_line_break(name) {
            return Err(EncodeError::NewlineInField { field: "event" });
        }
        name.clone_into(&mut self.event);
        Ok(self)
    }

    /// Sets the event id, which clients send back as `Last-Event-ID` when they reconnect.
    /// An empty id is written (as `id: `) and resets the client's last event ID.
    pub fn id(mut self, id: &str) -> Result<Self, EncodeError> {
        if has_line_break(id) {
            return Err(EncodeError::NewlineInField { field: "id" });
        }
        if id.contains('\0') {
            return Err(EncodeError::NulInId);
        }
        self.id = Some(id.to_owned());
        Ok(self)
    }

    /// Sets the client's reconnection delay, written in whole milliseconds (sub-millisecond
    /// parts are truncated).
    pub fn retry(mut self, retry: Duration) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Sets the data, split into one `data:` line per line (`\r\n`, `\r` and `\n` all break
    /// lines). A second call replaces the first. See the module docs for what round-trips.
    pub fn data(mut self, data: &str) -> Self {
        self.data = Some(data.to_owned());
        self
    }

    /// Sets a comment, written before the fields as one `: ` line per line (split like
    /// [`Event::data`]). A second call replaces the first. Clients ignore comments.
    pub fn comment(mut self, text: &str) -> Self {
        self.comment = Some(text.to_owned());
        self
    }

    /// The encoded frame, ending with the blank line that dispatches it.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.write_fields(&mut out);
        out.push(b'\n');
        // Exactly the size reserved: a frame is kept for as long as its snapshot, and `Bytes`
        // keeps a `Vec`'s whole capacity.
        debug_assert_eq!(out.len(), out.capacity());
        Bytes::from(out)
    }

    /// Like [`Event::to_bytes`], consuming the builder.
    pub fn into_bytes(self) -> Bytes {
        self.to_bytes()
    }

    /// Every field line, without the blank line that ends the event.
    fn write_fields(&self, out: &mut Vec<u8>) {
        if let Some(comment) = &self.comment {
            write_lines(out, b":", comment);
        }
        if !self.event.is_empty() {
            write_field(out, b"event", &self.event);
        }
        if let Some(id) = &self.id {
            write_field(out, b"id", id);
        }
        if let Some(retry) = self.retry {
            write_field(out, b"retry", &retry.as_millis().to_string());
        }
        if let Some(data) = &self.data {
            write_lines(out, b"data", data);
        }
    }

    /// The frame's exact size, so `to_bytes` allocates once and keeps nothing spare.
    fn encoded_len(&self) -> usize {
        let mut len = 1;
        if let Some(comment) = &self.comment {
            len += lines_len(b":", comment);
        }
        if !self.event.is_empty() {
            len += field_len(b"event", self.event.len());
        }
        if let Some(id) = &self.id {
            len += field_len(b"id", id.len());
        }
        if let Some(retry) = self.retry {
            let millis = retry.as_millis();
            let digits = millis.checked_ilog10().map_or(1, |log| log as usize + 1);
            len += field_len(b"retry", digits);
        }
        if let Some(data) = &self.data {
            len += lines_len(b"data", data);
        }
        len
    }
}

/// An event of type `event` (none when empty) with `id` (none when `None`) whose data is
/// **one line** that `write_data` appends to the frame: a snapshot's JSON, written straight
/// into the frame instead of into a string that is then copied line by line. `data_len` is
/// what `write_data` will append, so the frame is allocated once at its exact size: snapshot
/// frames are hundreds of KB and live as long as their snapshot, and on the Worker every
/// transient copy raises the wasm memory's level for good. Compact JSON never holds a line
/// break; should the data hold one anyway, it is split into `data:` lines as
/// [`Event::data`] does (correct, with one copy more).
///
/// # Errors
/// [`EncodeError`] when `event` or `id` cannot be a field (as [`Event::event`], [`Event::id`]).
pub fn one_line_data_frame(
    event: &str,
    id: Option<&str>,
    data_len: usize,
    write_data: impl FnOnce(&mut Vec<u8>),
) -> Result<Bytes, EncodeError> {
    let mut head = Event::new().event(event)?;
    if let Some(id) = id {
        head = head.id(id)?;
    }
    // The head's size counts the blank line that ends the frame.
    let mut out = Vec::with_capacity(head.encoded_len() + field_len(b"data", data_len));
    head.write_fields(&mut out);
    out.extend_from_slice(b"data: ");
    let start = out.len();
    write_data(&mut out);
    if memchr::memchr2(b'\n', b'\r', &out[start..]).is_some() {
        let data = String::from_utf8_lossy(&out[start..]).into_owned();
        return Ok(head.data(&data).into_bytes());
    }
    out.extend_from_slice(b"\n\n");
    debug_assert_eq!(
        out.len(),
        out.capacity(),
        "`write_data` wrote other than `data_len`"
    );
    Ok(Bytes::from(out))
}

/// A standalone comment frame, `: <line>\n` per line of `text`, then the blank line.
pub fn comment(text: &str) -> Bytes {
    Event::new().comment(text).into_bytes()
}

fn has_line_break(value: &str) -> bool {
    value.bytes().any(|b| b == b'\r' || b == b'\n')
}

/// Writes `name: value\n`; `name` is `:` for comments, which gives `: value\n`.
fn write_field(out: &mut Vec<u8>, name: &[u8], value: &str) {
    out.extend_from_slice(name);
    if name != b":" {
        out.push(b':');
    }
    out.push(b' ');
    out.extend_from_slice(value.as_bytes());
    out.push(b'\n');
}

/// The size of what [`write_field`] writes for a value of `value_len` bytes.
fn field_len(name: &[u8], value_len: usize) -> usize {
    name.len() + usize::from(name != b":") + 1 + value_len + 1
}

/// The size of what [`write_lines`] writes for `text`.
fn lines_len(name: &[u8], text: &str) -> usize {
    Lines::new(text)
        .map(|line| field_len(name, line.len()))
        .sum()
}

fn write_lines(out: &mut Vec<u8>, name: &[u8], text: &str) {
    for line in Lines::new(text) {
        write_field(out, name, line);
    }
}

/// Splits on `\r\n`, `\r` and `\n`, yielding a final empty line after a trailing break and a
/// single empty line for an empty string: exactly the lines a WHATWG parser must see to rebuild
/// `text`.
#[derive(Debug)]
struct Lines<'a> {
    rest: Option<&'a str>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        Self { rest: Some(text) }
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest?;
        match rest.find(['\r', '\n']) {
            None => {
                self.rest = None;
                Some(rest)
            }
            Some(end) => {
                let next = if rest[end..].starts_with("\r\n") {
                    end + 2
                } else {
                    end + 1
                };
                self.rest = Some(&rest[next..]);
                Some(&rest[..end])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        Lines::new(text).collect()
    }

    #[test]
    fn splits_lines_like_whatwg() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[""]),
            ("a", &["a"]),
            ("a\n", &["a", ""]),
            ("a\nb", &["a", "b"]),
            ("a\r\nb", &["a", "b"]),
            ("a\rb", &["a", "b"]),
            ("a\n\rb", &["a", "", "b"]),
            ("a\r\rb", &["a", "", "b"]),
            ("a\r\n\nb", &["a", "", "b"]),
            ("\n", &["", ""]),
            ("\r\n", &["", ""]),
            ("\r", &["", ""]),
            ("\n\r\n", &["", "", ""]),
        ];
        for (text, want) in cases {
            assert_eq!(lines(text), *want, "{text:?}");
        }
    }

    #[test]
    fn encodes_byte_exact() {
        let cases: Vec<(Event, &[u8])> = vec![
            (Event::new(), b"\n"),
            (Event::new().data("hello"), b"data: hello\n\n"),
            (Event::new().data(""), b"data: \n\n"),
            (Event::new().data("a\n"), b"data: a\ndata: \n\n"),
            (
                Event::new().data("a\r\nb\rc\nd"),
                b"data: a\ndata: b\ndata: c\ndata: d\n\n",
            ),
            (Event::new().data(" lead"), b"data:  lead\n\n"),
            (
                Event::new().data("first").data("second"),
                b"data: second\n\n",
            ),
            (
                Event::new().event("init").unwrap().data("{}"),
                b"event: init\ndata: {}\n\n",
            ),
            (Event::new().event("").unwrap().data("x"), b"data: x\n\n"),
            (Event::new().id("").unwrap(), b"id: \n\n"),
            (
                Event::new().retry(Duration::from_millis(3000)),
                b"retry: 3000\n\n",
            ),
            (
                Event::new().retry(Duration::from_micros(1999)),
                b"retry: 1\n\n",
            ),
            (Event::new().comment("hi"), b": hi\n\n"),
            (Event::new().comment("a\nb"), b": a\n: b\n\n"),
            (Event::new().comment(""), b": \n\n"),
            (
                // Setters in any order; the layout is fixed.
                Event::new()
                    .data("d1\nd2")
                    .retry(Duration::from_secs(5))
                    .id("42")
                    .unwrap()
                    .comment("note")
                    .event("flag-changed")
                    .unwrap(),
                b": note\nevent: flag-changed\nid: 42\nretry: 5000\ndata: d1\ndata: d2\n\n",
            ),
        ];
        for (event, want) in cases {
            let got = event.to_bytes();
            assert_eq!(got, Bytes::from_static(want), "{event:?}");
            assert_eq!(got.len(), event.encoded_len(), "{event:?}");
            assert_eq!(event.into_bytes(), got);
        }
    }

    proptest::proptest! {
        /// Every frame is allocated at its exact size (`to_bytes` also asserts the capacity
        /// in debug builds): a snapshot frame is kept as long as its snapshot, and an upper
        /// bound of one line per byte once made each frame keep 8 times its size.
        #[test]
        fn frames_are_allocated_at_their_size(
            comment in proptest::option::of("[a-z\r\n ]{0,12}"),
            event in "[a-z-]{0,8}",
            id in proptest::option::of("[0-9a-f-]{0,8}"),
            retry in proptest::option::of(0u64..10_000_000),
            data in proptest::option::of("[a-z{}\":,\r\n ]{0,40}"),
        ) {
            let mut frame = Event::new().event(&event).unwrap();
            if let Some(comment) = &comment {
                frame = frame.comment(comment);
            }
            if let Some(id) = &id {
                frame = frame.id(id).unwrap();
            }
            if let Some(retry) = retry {
                frame = frame.retry(Duration::from_millis(retry));
            }
            if let Some(data) = &data {
                frame = frame.data(data);
            }
            proptest::prop_assert_eq!(frame.to_bytes().len(), frame.encoded_len());
        }

        /// A frame whose one data line is written in place is byte for byte the builder's,
        /// and a line break in that data is split as the builder splits it.
        #[test]
        fn one_line_data_frames_are_the_builders(
            event in "[a-z-]{0,8}",
            id in proptest::option::of("[0-9a-f-]{0,8}"),
            data in "[a-z{}\":,\r\n ]{0,40}",
        ) {
            let mut builder = Event::new().event(&event).unwrap();
            if let Some(id) = &id {
                builder = builder.id(id).unwrap();
            }
            let want = builder.data(&data).into_bytes();
            let got = one_line_data_frame(&event, id.as_deref(), data.len(), |out| {
                out.extend_from_slice(data.as_bytes());
            })
            .unwrap();
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn one_line_data_frames_refuse_what_the_builder_refuses() {
        let write = |out: &mut Vec<u8>| out.extend_from_slice(b"{}");
        assert_eq!(
            one_line_data_frame("a\nb", None, 2, write),
            Err(EncodeError::NewlineInField { field: "event" })
        );
        assert_eq!(
            one_line_data_frame("init", Some("1\r"), 2, write),
            Err(EncodeError::NewlineInField { field: "id" })
        );
        assert_eq!(
            one_line_data_frame("init", Some("1\0"), 2, write),
            Err(EncodeError::NulInId)
        );
    }

    #[test]
    fn standalone_comments_and_keepalive() {
        assert_eq!(comment("ping"), Bytes::from_static(b": ping\n\n"));
        assert_eq!(comment("a\r\nb"), Bytes::from_static(b": a\n: b\n\n"));
        assert_eq!(KEEPALIVE, &comment("keepalive")[..]);
    }

    #[test]
    fn rejects_fields_that_would_break_framing() {
        for bad in ["a\nb", "a\rb", "\n", "x\r\n"] {
            assert_eq!(
                Event::new().event(bad).unwrap_err(),
                EncodeError::NewlineInField { field: "event" }
            );
            assert_eq!(
                Event::new().id(bad).unwrap_err(),
                EncodeError::NewlineInField { field: "id" }
            );
        }
        assert_eq!(Event::new().id("a\0b").unwrap_err(), EncodeError::NulInId);
        // NUL is harmless in an event name: WHATWG only ignores ids with NUL.
        assert!(Event::new().event("a\0b").is_ok());
        assert_eq!(
            EncodeError::NewlineInField { field: "id" }.to_string(),
            "sse id field contains a line break"
        );
    }

    /// The golden file pins the exact bytes both adapters put on the wire.
    #[test]
    fn golden_frames() {
        let golden: &[u8] = include_bytes!("../../tests/data/frames.expected.sse");
        let frames = [
            Event::new()
                .event("init")
                .unwrap()
                .data(r#"{"flags":{"new-checkout":true,"dark-mode":false}}"#),
            Event::new()
                .event("flag-changed")
                .unwrap()
                .id("rev-2")
                .unwrap()
                .data(r#"{"key":"dark-mode","enabled":true}"#),
            Event::new()
                .retry(Duration::from_millis(3000))
                .comment("reconnect slowly"),
            Event::new().data("line one\r\nline two\n"),
            Event::new()
                .event("heartbeat")
                .unwrap()
                .id("")
                .unwrap()
                .data(""),
        ];
        let mut got = Vec::new();
        for frame in &frames {
            got.extend_from_slice(&frame.to_bytes());
        }
        got.extend_from_slice(&comment("multi\nline"));
        got.extend_from_slice(KEEPALIVE);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(golden)
        );
        assert_eq!(got, golden);
    }
}
