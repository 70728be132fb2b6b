//! Response bodies and SSE frames rendered from flag data: the only place either adapter gets them.
//!
//! Both adapters serve bytes produced here (most of them once per snapshot, see
//! [`crate::snapshot`]), so the native server and the Worker are byte-identical by construction
//! and one set of golden files covers both.

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::eval::Evaluation;
use crate::model::EvaluatedFlags;
use crate::sse::encode::{self, Event};
use crate::time::Timestamp;

/// SSE event name of the frontend stream (`GET /api/stream`), as in the original pattern.
pub const FLAGS_EVENT: &str = "flags";
/// SSE event name of the Rollgate SDK stream (`GET /api/v1/sdk/stream`): every official SDK
/// replaces its whole state on `init`, so it is safe to send on connect and on every change.
pub const INIT_EVENT: &str = "init";
/// SSE event name of OFREP's event stream (ADR-0008): always `message`.
pub const OFREP_EVENT: &str = "message";

/// `{"flags":{..},"_meta":{"cachedAt":".."}}`: the body of `GET /api/flags`.
pub fn flags_body(flags: &EvaluatedFlags, cached_at: Timestamp) -> Bytes {
    flags_body_of(&flags.flags, cached_at)
}

/// [`flags_body`] of a local evaluation, rendered without building the owned maps and
/// without a serializer for the flags: one pre-sized buffer of the keys' JSON fragments
/// (rendered once per snapshot, see [`Evaluation::write_values`]) and the values. Byte for
/// byte what serialising [`Evaluation::values`] gives ([`reference_evaluation_flags_body`]).
pub fn evaluation_flags_body(evaluation: &Evaluation<'_>, cached_at: Timestamp) -> Bytes {
    let cached_at = cached_at.to_rfc3339();
    let mut out = Vec::with_capacity(evaluation.values_len_bound() + cached_at.len() + 40);
    out.extend_from_slice(b"{\"flags\":");
    evaluation.write_values(&mut out);
    out.extend_from_slice(b",\"_meta\":{\"cachedAt\":");
    // Serializing a string into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut out, &cached_at);
    out.extend_from_slice(b"}}");
    Bytes::from(out)
}

/// [`evaluation_flags_body`] through the serializer: the reference the fast path is tested
/// against.
pub fn reference_evaluation_flags_body(evaluation: &Evaluation<'_>, cached_at: Timestamp) -> Bytes {
    flags_body_of(evaluation.values(), cached_at)
}

fn flags_body_of(flags: impl Serialize, cached_at: Timestamp) -> Bytes {
    #[derive(Serialize)]
    struct Meta {
        #[serde(rename = "cachedAt")]
        cached_at: String,
    }
    #[derive(Serialize)]
    struct Body<F> {
        flags: F,
        #[serde(rename = "_meta")]
        meta: Meta,
    }
    json_bytes(&Body {
        flags,
        meta: Meta {
            cached_at: cached_at.to_rfc3339(),
        },
    })
}

/// `{"key":..,"enabled":..}`: the body of `GET /api/flags/:key`.
pub fn flag_body(key: &str, enabled: bool) -> Bytes {
    #[derive(Serialize)]
    struct Body<'a> {
        key: &'a str,
        enabled: bool,
    }
    json_bytes(&Body { key, enabled })
}

/// `{"flags":{..}}` or `{"flags":{..},"reasons":{..}}`: the body of `GET /api/v1/sdk/flags`.
///
/// Reasons are included only when asked for (`withReasons=true`), as Rollgate does.
pub fn sdk_flags_body(flags: &EvaluatedFlags, with_reasons: bool) -> Bytes {
    sdk_flags_body_of(&flags.flags, with_reasons.then_some(&flags.reasons))
}

/// [`sdk_flags_body`] of a local evaluation, rendered as [`evaluation_flags_body`] is: byte
/// for byte [`reference_evaluation_sdk_flags_body`].
pub fn evaluation_sdk_flags_body(evaluation: &Evaluation<'_>, with_reasons: bool) -> Bytes {
    /// Room per flag for a reason (`{"kind":"RULE_MATCH","ruleId":..,"ruleIndex":..,..}`).
    const REASON: usize = 80;
    let reasons = if with_reasons {
        evaluation.values_len_bound() + evaluation.len() * REASON + 12
    } else {
        0
    };
    let mut out = Vec::with_capacity(evaluation.values_len_bound() + reasons + 12);
    out.extend_from_slice(b"{\"flags\":");
    evaluation.write_values(&mut out);
    if with_reasons {
        out.extend_from_slice(b",\"reasons\":");
        evaluation.write_reasons(&mut out);
    }
    out.push(b'}');
    Bytes::from(out)
}

/// [`evaluation_sdk_flags_body`] through the serializer: the reference the fast path is tested
/// against.
pub fn reference_evaluation_sdk_flags_body(
    evaluation: &Evaluation<'_>,
    with_reasons: bool,
) -> Bytes {
    sdk_flags_body_of(
        evaluation.values(),
        with_reasons.then(|| evaluation.reasons()),
    )
}

fn sdk_flags_body_of<F: Serialize, R: Serialize>(flags: F, reasons: Option<R>) -> Bytes {
    #[derive(Serialize)]
    struct Body<F, R> {
        flags: F,
        #[serde(skip_serializing_if = "Option::is_none")]
        reasons: Option<R>,
    }
    json_bytes(&Body { flags, reasons })
}

/// `event: flags` with the bare flag map as data: one frame of `GET /api/stream`.
pub fn flags_frame(flags: &EvaluatedFlags, event_id: &str) -> Bytes {
    flags_frame_of(&flags.flags, event_id)
}

/// [`flags_frame`] of any form of a key → value map that serialises as
/// [`EvaluatedFlags::flags`] does (the snapshot's borrowed evaluation in rules mode).
pub(crate) fn flags_frame_of(values: &impl Serialize, event_id: &str) -> Bytes {
    json_frame(FLAGS_EVENT, Some(event_id), values)
}

/// `event: init` with `{"flags":{..}}` as data: one frame of `GET /api/v1/sdk/stream`.
///
/// The data always has a `flags` key: the Python SDK treats any data event as a snapshot and
/// would wipe its flags on anything else (protocol doc §2.2).
pub fn init_frame(flags: &EvaluatedFlags, event_id: &str) -> Bytes {
    init_frame_of(&flags.flags, event_id)
}

/// [`init_frame`] of any form of a key → value map, as [`flags_frame_of`].
pub(crate) fn init_frame_of(values: &impl Serialize, event_id: &str) -> Bytes {
    #[derive(Serialize)]
    struct Data<'a, F> {
        flags: &'a F,
    }
    json_frame(INIT_EVENT, Some(event_id), &Data { flags: values })
}

/// An OFREP ADR-0008 notification: `{"type":"refetchEvaluation","etag":..,"lastModified":..}`.
pub fn ofrep_refetch_frame(event_id: &str, etag: &str, last_modified: Timestamp) -> Bytes {
    #[derive(Serialize)]
    struct Data<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        etag: &'a str,
        #[serde(rename = "lastModified")]
        last_modified: u64,
    }
    json_frame(
        OFREP_EVENT,
        Some(event_id),
        &Data {
            kind: "refetchEvaluation",
            etag,
            last_modified: last_modified.as_millis() / 1000,
        },
    )
}

/// `retry: <ms>\n\n`: sent first on every stream so clients reconnect at the pace we choose.
pub fn retry_frame(retry: std::time::Duration) -> Bytes {
    Event::new().retry(retry).into_bytes()
}

/// A quoted strong entity tag for `content`: `"` + 16 hex digits of its SHA-256 + `"`.
///
/// Quoted because the .NET SDK parses `ETag` into an `EntityTagHeaderValue` and drops unquoted
/// values (protocol doc §1.1).
pub fn etag_for(content: &[u8]) -> String {
    format!("\"{}\"", content_hash(content))
}

/// 16 lowercase hex digits of the SHA-256 of `content` (64 bits: collisions are not a concern
/// for telling two versions of one flag set apart).
pub fn content_hash(content: &[u8]) -> String {
    content_hash_of(&[content])
}

/// [`content_hash`] of `parts` one after the other, without joining them first.
pub fn content_hash_of(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hex_prefix(&hasher.finalize())
}

/// 16 lowercase hex digits of a digest's first 8 bytes.
pub(crate) fn hex_prefix(digest: &[u8]) -> String {
    let mut hex = String::with_capacity(16);
    for byte in &digest[..8] {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    hex
}

/// Whether an `If-None-Match` header value matches `etag` (a list of tags, `*`, or weak tags,
/// compared weakly as RFC 9110 §13.1.2 asks for `If-None-Match`).
pub fn if_none_match_matches(header: &str, etag: &str) -> bool {
    let strip_weak = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    let wanted = strip_weak(etag);
    header
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || strip_weak(tag) == wanted)
}

/// An SSE event whose data is `value` as JSON, serialized straight into the frame, which is
/// allocated once at its size (see [`encode::one_line_data_frame`]).
pub(crate) fn json_frame<T: Serialize + ?Sized>(event: &str, id: Option<&str>, value: &T) -> Bytes {
    let len = json_len(value);
    let write = |out: &mut Vec<u8>| write_json(out, value);
    // Event names here are constants and ids are produced by this crate (digits, '-', hex), so
    // neither can hold a line break; should one ever be rejected, the frame stays valid without
    // that field rather than failing the publish.
    encode::one_line_data_frame(event, id, len, write)
        .or_else(|_| encode::one_line_data_frame(event, None, len, write))
        .or_else(|_| encode::one_line_data_frame("", None, len, write))
        .unwrap_or_default()
}

/// `value` as JSON, allocated once at its size: bodies and frames live as long as their
/// snapshot, and `Bytes` keeps a growing `Vec`'s spare capacity (up to as much again).
pub(crate) fn json_bytes<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(json_len(value));
    write_json(&mut out, value);
    Bytes::from(out)
}

/// `value` as JSON in one pass, for a per-request body that is dropped once sent: its spare
/// capacity goes with it, so the second pass [`json_bytes`] makes to size a kept body exactly
/// would be wasted work on the request path.
pub(crate) fn json_body<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut out = Vec::new();
    write_json(&mut out, value);
    Bytes::from(out)
}

/// Appends `value` as JSON to `out`. Serializing the plain structs and string-keyed maps
/// rendered here cannot fail; should it, what it wrote is taken back (empty JSON, as a failed
/// `to_vec` gave before).
fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let start = out.len();
    if serde_json::to_writer(&mut JsonSink::Buffer(out), value).is_err() {
        out.truncate(start);
    }
}

/// The size of `value` as JSON, without writing it anywhere (0 if it cannot be serialized).
pub(crate) fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut sink = JsonSink::Count(0);
    match (serde_json::to_writer(&mut sink, value), sink) {
        (Ok(()), JsonSink::Count(len)) => len,
        _ => 0,
    }
}

/// [`content_hash_of`] `prefix` and then `value` as JSON, serialized into the hash without a
/// buffer.
pub(crate) fn json_content_hash<T: Serialize + ?Sized>(prefix: &[u8], value: &T) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prefix);
    // As in `write_json`: these values always serialize; a failure hashes what was written.
    let _ = serde_json::to_writer(&mut JsonSink::Hash(&mut hasher), value);
    hex_prefix(&hasher.finalize())
}

/// Where the JSON helpers above serialize to: one writer type, so each value type's
/// serializer is compiled once for all three (the Worker's wasm pays for every copy).
enum JsonSink<'a> {
    /// Only counts the bytes.
    Count(usize),
    /// Appends them.
    Buffer(&'a mut Vec<u8>),
    /// Feeds them to a hash.
    Hash(&'a mut Sha256),
}

impl std::io::Write for JsonSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Count(len) => *len += buf.len(),
            Self::Buffer(out) => out.extend_from_slice(buf),
            Self::Hash(hasher) => hasher.update(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(n: usize) -> EvaluatedFlags {
        let json = format!(
            "{{\"flags\":{{{}}}}}",
            (0..n)
                .map(|i| format!("\"flag-{i}\":{}", i % 3 == 0))
                .collect::<Vec<_>>()
                .join(",")
        );
        EvaluatedFlags::from_json(json.as_bytes()).unwrap()
    }

    /// The exact-size helpers write what `serde_json` writes, and hash what it would hash.
    #[test]
    fn json_helpers_agree_with_serde_json() {
        for n in [0, 1, 7, 2_000] {
            let flags = flags(n);
            let want = serde_json::to_vec(&flags.flags).unwrap();
            assert_eq!(json_len(&flags.flags), want.len());
            assert_eq!(json_bytes(&flags.flags), want);
            assert_eq!(json_body(&flags.flags), want);
            assert_eq!(
                json_content_hash(b"evaluated:", &flags.flags),
                content_hash_of(&[b"evaluated:", &want])
            );
        }
    }

    /// Stream frames written in place are the builder's frames of the serialized JSON.
    #[test]
    fn json_frames_are_the_builders() {
        for n in [0, 1, 2_000] {
            let flags = flags(n);
            let data = serde_json::to_string(&flags.flags).unwrap();
            let want = Event::new()
                .event(FLAGS_EVENT)
                .unwrap()
                .id("7-abc")
                .unwrap()
                .data(&data)
                .into_bytes();
            assert_eq!(flags_frame(&flags, "7-abc"), want);
            let init = format!("{{\"flags\":{data}}}");
            let want = Event::new()
                .event(INIT_EVENT)
                .unwrap()
                .id("7-abc")
                .unwrap()
                .data(&init)
                .into_bytes();
            assert_eq!(init_frame(&flags, "7-abc"), want);
        }
        // An id that cannot be a field leaves it out rather than failing the frame.
        assert_eq!(
            json_frame(FLAGS_EVENT, Some("bad\nid"), &1),
            Bytes::from_static(b"event: flags\ndata: 1\n\n")
        );
    }
}
