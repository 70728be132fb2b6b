//! Fuzz-target bodies, shared by the libFuzzer crate (`fuzz/`) and the stable corpus replay test.
//!
//! Each function takes the raw bytes of one fuzz input, turns them into calls on core's public
//! entry points and panics when an invariant breaks. The `fuzz/` crate (nightly, cargo-fuzz)
//! calls them from its `fuzz_target!`s; `core/tests/fuzz_corpus.rs` replays every committed
//! corpus file and every saved crash through the same functions on stable, so a crash, once
//! fixed, stays fixed under `cargo test --workspace`. Only built with the `fuzzing` feature.
//!
//! Input formats are chosen so seeds can be written by hand (see `FUZZING.md`):
//! - [`sse_decoder`]: `[limits byte][split count n][n chunk lengths][stream bytes...]`;
//! - [`upstream_json`]: the bytes as they are, given to every upstream JSON parser;
//! - [`evaluate`]: `rules JSON` `\0` `context` (the context in `arbitrary`'s encoding);
//! - [`downstream_request`]: `method\0path\0query\0body\0authorization\0x-api-key[\0key]*`;
//! - [`upstream_machine`]: a config byte then operations in `arbitrary`'s encoding.

#![allow(clippy::panic, clippy::missing_panics_doc)]

use std::collections::BTreeMap;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;

use crate::api::{self, ApiError, ClientKeys, Route};
use crate::breaker::{BreakerConfig, BreakerState, Outcome};
use crate::eval::{CompiledRules, rollout_bucket};
use crate::model::{AttributeValue, Context, ErrorKind, EvaluatedFlags, ReasonKind, RulesPayload};
use crate::snapshot::{FlagSource, Revision, Snapshot};
use crate::sse::decode::{DecodeError, Decoder, DecoderLimits, SseEvent};
use crate::sse::encode::Event;
use crate::time::Timestamp;
use crate::upstream::{
    Action, FetchResult, RequestId, StreamEnd, StreamId, Upstream, UpstreamConfig,
};

/// A target's checks: one fuzz input in, a panic when an invariant breaks.
pub type Check = fn(&[u8]);

/// Every target by name, in the order `scripts/fuzz.sh` runs them.
pub const TARGETS: &[(&str, Check)] = &[
    ("sse_decoder", sse_decoder),
    ("upstream_json", upstream_json),
    ("evaluate", evaluate),
    ("downstream_request", downstream_request),
    ("upstream_machine", upstream_machine),
];

// ---------------------------------------------------------------------------------------------
// sse_decoder

/// Everything observable after decoding a stream in some chunking.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    events: Vec<SseEvent>,
    error: Option<DecodeError>,
    last_event_id: String,
    retry: Option<Duration>,
    comments: u64,
}

fn decode_chunks<'a>(limits: DecoderLimits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Decoded {
    let mut decoder = Decoder::new(limits);
    let mut events = Vec::new();
    let mut error = None;
    for chunk in chunks {
        let result = decoder.push(chunk);
        events.extend(std::iter::from_fn(|| decoder.next_event()));
        if let Err(err) = result {
            // A failed decoder refuses everything until reset, with the same error.
            assert_eq!(decoder.push(b"data: more\n\n"), Err(err));
            assert!(decoder.next_event().is_none(), "event after failure");
            error = Some(err);
            break;
        }
    }
    Decoded {
        events,
        error,
        last_event_id: decoder.last_event_id().to_owned(),
        retry: decoder.retry(),
        comments: decoder.comments_seen(),
    }
}

/// The SSE decoder: the same stream in one chunk, in the input's chunks and byte by byte gives
/// the same events, error, last id, retry and comment count; events respect the limits and
/// survive an encode/decode round trip.
///
/// Input: `[limits][n][n chunk lengths][stream]`. A limits byte below 0x80 means the default
/// limits; otherwise its low nibble sets the line limit (×4 bytes) and bits 4–6 the event limit
/// (×8 bytes), so tiny limits (zero included) are exercised too.
pub fn sse_decoder(data: &[u8]) {
    let [limits_byte, splits, rest @ ..] = data else {
        return;
    };
    let limits = if limits_byte & 0x80 == 0 {
        DecoderLimits::default()
    } else {
        DecoderLimits {
            max_line_bytes: usize::from(limits_byte & 0x0F) * 4,
            max_event_bytes: usize::from((limits_byte >> 4) & 0x07) * 8,
        }
    };
    let n = usize::from(splits % 17).min(rest.len());
    let (lengths, stream) = rest.split_at(n);

    let whole = decode_chunks(limits, [stream]);
    let mut chunks = Vec::with_capacity(n + 1);
    let mut remaining = stream;
    for &len in lengths {
        let (head, tail) = remaining.split_at(usize::from(len).min(remaining.len()));
        chunks.push(head);
        remaining = tail;
    }
    chunks.push(remaining);
    let split = decode_chunks(limits, chunks);
    assert_eq!(whole, split, "chunking changed the outcome");
    let bytewise = decode_chunks(limits, stream.chunks(1));
    assert_eq!(whole, bytewise, "byte-by-byte decoding changed the outcome");

    // Lossy UTF-8 turns one invalid byte into U+FFFD (3 bytes): a field value taken from one
    // line is at most three times the line limit.
    let max_field = limits.max_line_bytes.saturating_mul(3);
    for event in &whole.events {
        assert!(
            event.data.len() <= limits.max_event_bytes,
            "event over the limit"
        );
        assert!(event.event.len() <= max_field && event.id.len() <= max_field);
        assert!(!event.event.is_empty(), "events always have a type");
        assert!(!event.event.contains(['\r', '\n']) && !event.id.contains(['\r', '\n', '\0']));
        assert!(
            !event.data.contains('\r'),
            "CR is a line ending, never data"
        );
        // What we decoded, our encoder must be able to send again unchanged.
        let encoded = Event::new()
            .event(&event.event)
            .and_then(|e| e.id(&event.id))
            .map(|e| e.data(&event.data).into_bytes())
            .unwrap_or_else(|err| panic!("decoded event cannot be encoded: {err}"));
        let again = decode_chunks(DecoderLimits::default(), [&encoded[..]]);
        // The re-encoded text is valid UTF-8 (U+FFFD where bytes were invalid), so only the
        // `lossy` mark may differ.
        let expected = SseEvent {
            lossy: false,
            ..event.clone()
        };
        assert_eq!(
            again.events,
            std::slice::from_ref(&expected),
            "encode/decode round trip"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// upstream_json

/// The upstream JSON parsers: `EvaluatedFlags::from_json`, `RulesPayload::from_json`,
/// `CompiledRules::from_json` and `Snapshot::from_persisted` never panic, the two rules parsers
/// agree, and what they accept survives a round trip through what core writes (the flags body,
/// the rules payload, the persisted snapshot).
pub fn upstream_json(data: &[u8]) {
    if let Ok(flags) = EvaluatedFlags::from_json(data) {
        let json = serde_json::to_vec(&flags).unwrap_or_else(|e| panic!("serialize: {e}"));
        let again = EvaluatedFlags::from_json(&json).unwrap_or_else(|e| panic!("reparse: {e}"));
        assert_eq!(flags, again, "evaluated flags round trip");
        assert!(flags.reasons.keys().all(|k| flags.flags.contains_key(k)));
        check_persist_round_trip(&Snapshot::build(
            Revision::new(1),
            Timestamp::ZERO,
            FlagSource::Evaluated(flags),
        ));
    }
    // The one-pass parse and compile takes and refuses exactly what the typed parse does, and
    // keeps the JSON the typed payload serializes to.
    let one_pass = CompiledRules::from_json(data);
    match (RulesPayload::from_json(data), &one_pass) {
        (Ok(rules), Ok(compiled)) => {
            let json = serde_json::to_vec(&rules).unwrap_or_else(|e| panic!("serialize: {e}"));
            assert_eq!(compiled.payload_json().as_bytes(), json, "one-pass JSON");
            let again = RulesPayload::from_json(&json).unwrap_or_else(|e| panic!("reparse: {e}"));
            assert_eq!(rules, again, "rules payload round trip");
            let snapshot = Snapshot::build(
                Revision::new(2),
                Timestamp::from_millis(1),
                FlagSource::rules(&rules),
            );
            let one_pass = Snapshot::build(
                Revision::new(2),
                Timestamp::from_millis(1),
                FlagSource::Rules(compiled.clone()),
            );
            assert_same_snapshot(&snapshot, &one_pass);
            check_persist_round_trip(&snapshot);
        }
        (Err(typed), Err(one_pass)) => assert_eq!(
            std::mem::discriminant(&typed),
            std::mem::discriminant(one_pass),
            "refused differently: {typed} / {one_pass}"
        ),
        (typed, one_pass) => panic!(
            "the parses disagree: typed {:?}, one pass {:?}",
            typed.map(|_| ()),
            one_pass.as_ref().map(|_| ())
        ),
    }
    if let Ok((snapshot, etag)) = Snapshot::from_persisted(data) {
        let persisted = snapshot.to_persisted(etag.as_deref());
        let (again, etag_again) = Snapshot::from_persisted(&persisted)
            .unwrap_or_else(|e| panic!("persisted snapshot does not restore: {e}"));
        assert_eq!(etag, etag_again);
        assert_same_snapshot(&snapshot, &again);
        assert_eq!(
            again.to_persisted(etag_again.as_deref()),
            persisted,
            "not a fixpoint"
        );
    }
}

fn check_persist_round_trip(snapshot: &Snapshot) {
    let persisted = snapshot.to_persisted(Some("\"etag\""));
    let (again, etag) = Snapshot::from_persisted(&persisted)
        .unwrap_or_else(|e| panic!("persisted snapshot does not restore: {e}"));
    assert_eq!(etag.as_deref(), Some("\"etag\""));
    assert_same_snapshot(snapshot, &again);
}

fn assert_same_snapshot(a: &Snapshot, b: &Snapshot) {
    assert_eq!(a.revision(), b.revision());
    assert_eq!(a.cached_at(), b.cached_at());
    assert_eq!(
        a.content_hash(),
        b.content_hash(),
        "content changed in a round trip"
    );
    assert_eq!(a.flags_body(), b.flags_body());
    assert_eq!(a.defaults(), b.defaults());
}

// ---------------------------------------------------------------------------------------------
// evaluate

/// A string for a context field: literal, or one taken from the rules (ids in `targetUsers`,
/// condition attributes and values), which random bytes would rarely hit.
#[derive(Arbitrary, Debug)]
enum FuzzStr {
    Literal(String),
    FromRules(u16),
    /// A string from the rules with a suffix: near misses for prefix and `in` operators.
    Suffixed(u16, String),
}

#[derive(Arbitrary, Debug)]
enum FuzzValue {
    Str(FuzzStr),
    Number(f64),
    Bool(bool),
}

#[derive(Arbitrary, Debug)]
struct FuzzContext {
    id: Option<FuzzStr>,
    email: Option<FuzzStr>,
    attributes: Vec<(FuzzStr, FuzzValue)>,
}

impl FuzzStr {
    fn resolve(self, pool: &[&str]) -> String {
        let pick = |i: u16| {
            if pool.is_empty() {
                String::new()
            } else {
                pool[usize::from(i) % pool.len()].to_owned()
            }
        };
        match self {
            Self::Literal(s) => s,
            Self::FromRules(i) => pick(i),
            Self::Suffixed(i, suffix) => pick(i) + &suffix,
        }
    }
}

/// Evaluation: a rules payload (`rules\0context`, rules as JSON) and an arbitrary context.
/// Evaluation never panics, is deterministic (`evaluate_all` with its attribute cache agrees
/// with `evaluate` per flag), and every reason is consistent with the flag's rules.
pub fn evaluate(data: &[u8]) {
    let (rules, context_bytes) = match memchr::memrchr(0, data) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let Ok(payload) = RulesPayload::from_json(rules) else {
        return;
    };
    let mut pool: Vec<&str> = Vec::new();
    for flag in payload.flags.values() {
        pool.extend(flag.target_users.iter().map(String::as_str));
        for condition in flag.rules.iter().flat_map(|rule| &rule.conditions) {
            pool.push(&condition.attribute);
            pool.push(&condition.value);
            pool.extend(condition.value.split(',').map(str::trim));
        }
    }
    let Ok(fuzz) = FuzzContext::arbitrary_take_rest(Unstructured::new(context_bytes)) else {
        return;
    };
    let mut context = Context {
        id: fuzz.id.map(|s| s.resolve(&pool)),
        email: fuzz.email.map(|s| s.resolve(&pool)),
        attributes: BTreeMap::new(),
    };
    for (name, value) in fuzz.attributes {
        let value = match value {
            FuzzValue::Str(s) => AttributeValue::String(s.resolve(&pool)),
            // Contexts come from JSON or query strings: numbers are always finite.
            FuzzValue::Number(n) if n.is_finite() => AttributeValue::Number(n),
            FuzzValue::Number(_) => continue,
            FuzzValue::Bool(b) => AttributeValue::Bool(b),
        };
        context.attributes.insert(name.resolve(&pool), value);
    }

    let compiled = CompiledRules::compile(&payload);
    // `evaluate_all` (attribute cache) and `evaluate` (no cache) must agree flag by flag: two
    // different computations, so a non-deterministic or cache-dependent result shows up here.
    let all = compiled.evaluate_all(&context).to_flags();
    assert_eq!(all.flags.len(), payload.flags.len());
    let user_id = context.id.as_deref().filter(|id| !id.is_empty());
    for (key, flag) in &payload.flags {
        let detail = compiled.evaluate(key, &context);
        assert_eq!(
            all.flags.get(key),
            Some(&detail.value),
            "evaluate_all disagrees on {key}"
        );
        assert_eq!(all.reasons.get(key), Some(&detail.reason));
        let reason = &detail.reason;
        if !flag.enabled {
            assert_eq!((detail.value, reason.kind), (false, ReasonKind::Off));
        }
        match reason.kind {
            ReasonKind::TargetMatch => {
                assert!(detail.value);
                assert!(user_id.is_some_and(|id| flag.target_users.iter().any(|u| u == id)));
            }
            ReasonKind::RuleMatch => {
                assert!(
                    !context.is_anonymous(),
                    "rules matched the anonymous context"
                );
                assert_eq!(reason.in_rollout, Some(detail.value));
                let index = reason.rule_index.map(|i| i as usize);
                let rule = index.and_then(|i| flag.rules.get(i));
                let rule = rule.unwrap_or_else(|| panic!("rule index {index:?} out of range"));
                assert!(rule.enabled && !rule.conditions.is_empty());
                assert_eq!(reason.rule_id.as_deref(), Some(rule.id.as_str()));
                check_rollout(rule.rollout, detail.value);
            }
            ReasonKind::Fallthrough => {
                assert_eq!(reason.in_rollout, Some(detail.value));
                check_rollout(flag.rollout, detail.value);
            }
            ReasonKind::Error => {
                assert!(!detail.value);
                assert_eq!(reason.error_kind, Some(ErrorKind::MalformedFlag));
            }
            ReasonKind::Off => assert!(!flag.enabled),
            ReasonKind::Unknown => panic!("evaluation produced an UNKNOWN reason"),
        }
        if let Some(id) = &context.id {
            assert!(rollout_bucket(key, id) < 100);
        }
    }
    let missing = "\u{0}not-a-flag";
    if !payload.flags.contains_key(missing) {
        let detail = compiled.evaluate(missing, &context);
        assert!(!detail.value);
        assert_eq!(detail.reason.error_kind, Some(ErrorKind::FlagNotFound));
    }
}

fn check_rollout(rollout: i64, value: bool) {
    if rollout >= 100 {
        assert!(value, "a 100% rollout left a user out");
    }
    if rollout <= 0 {
        assert!(!value, "a 0% rollout let a user in");
    }
}

// ---------------------------------------------------------------------------------------------
// downstream_request

/// A rejected request's error is well-formed: a 4xx status and a JSON body
/// `{"error":{"code","message"}}` that says the same.
fn check_api_error(error: &ApiError) {
    assert!((400..500).contains(&error.status()), "not a 4xx: {error:?}");
    let body: serde_json::Value = serde_json::from_slice(&error.body())
        .unwrap_or_else(|e| panic!("error body is not JSON: {e}"));
    assert_eq!(body["error"]["code"], error.code.as_str());
    assert_eq!(body["error"]["message"], error.message.as_str());
    let response = api::ApiResponse::error(error);
    assert_eq!(
        (response.status, &response.body),
        (error.status(), &error.body())
    );
}

/// An accepted context respects [`api::limits`] and has no empty id or email.
fn check_context(context: &Context) {
    assert!(context.attributes.len() <= api::limits::MAX_ATTRIBUTES);
    for (name, value) in &context.attributes {
        assert!(!name.is_empty() && name.len() <= api::limits::MAX_ATTRIBUTE_NAME);
        if let AttributeValue::String(s) = value {
            assert!(s.len() <= api::limits::MAX_VALUE);
        }
        if let AttributeValue::Number(n) = value {
            assert!(n.is_finite());
        }
    }
    for value in [&context.id, &context.email].into_iter().flatten() {
        assert!(!value.is_empty() && value.len() <= api::limits::MAX_VALUE);
    }
}

/// The downstream request parsers: route matching, the context of a query, of a JSON body and
/// of an OFREP body, event and telemetry bodies, and client-key authorization. Input:
/// `method\0path\0query\0body\0authorization\0x-api-key[\0configured key]*`. Every rejection is
/// a well-formed 4xx; every accepted context respects the limits; authorization accepts exactly
/// when a presented key equals a configured one.
pub fn downstream_request(data: &[u8]) {
    let parts: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let text = |i: usize| {
        parts
            .get(i)
            .map(|p| String::from_utf8_lossy(p).into_owned())
    };
    let method = text(0).unwrap_or_default();
    let path = text(1).unwrap_or_default();
    let query = text(2).unwrap_or_default();
    let body = parts.get(3).copied().unwrap_or_default();
    let authorization = text(4);
    let api_key = text(5);
    let mut keys: Vec<String> = (6..parts.len()).filter_map(text).collect();
    if keys.is_empty() {
        keys = vec!["key-one".to_owned(), "key-two".to_owned()];
    }

    match Route::parse(&method, &path) {
        Ok(Route::Flag(key) | Route::OfrepFlag(key)) => {
            // The key is validated later: that must not panic on anything a path decodes to.
            let _ = crate::model::FlagKey::parse(&key);
        }
        Ok(route) => {
            let _ = (route.needs_client_key(), route.label());
        }
        Err(error) => check_api_error(&error),
    }
    match api::context_from_query(&query) {
        Ok(context) => check_context(&context),
        Err(error) => check_api_error(&error),
    }
    match api::context_from_body(body) {
        Ok(context) => check_context(&context),
        Err(error) => check_api_error(&error),
    }
    match api::ofrep::context(body) {
        Ok(context) => check_context(&context),
        Err(error) => {
            assert!((400..500).contains(&error.status));
            let response = error.response(Some(&path));
            assert_eq!(response.status, error.status);
            let json: serde_json::Value = serde_json::from_slice(&response.body)
                .unwrap_or_else(|e| panic!("OFREP error body is not JSON: {e}"));
            assert_eq!(json["errorCode"], error.code);
            assert_eq!(json["key"], path.as_str());
        }
    }
    if let Err(error) = api::count_events(body) {
        check_api_error(&error);
    }
    if let Err(error) = api::count_telemetry(body) {
        check_api_error(&error);
    }

    // Authorization against a plain (not constant-time) reference.
    let bearer = authorization.as_deref().and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let token = form_urlencoded::parse(query.trim_start_matches('?').as_bytes())
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.into_owned());
    let offered = [bearer, api_key.as_deref().map(str::trim), token.as_deref()];
    let configured = ClientKeys::new(keys.iter().cloned());
    let expected = !configured.is_enabled()
        || offered
            .iter()
            .flatten()
            .any(|given| configured_has(&keys, given));
    let result = configured.authorize(authorization.as_deref(), api_key.as_deref(), &query);
    assert_eq!(
        result.is_ok(),
        expected,
        "authorize disagrees with the reference"
    );
    if let Err(error) = result {
        assert_eq!(error.status(), 401);
        check_api_error(&error);
    }
    if let Ok(Some(key)) =
        configured.matching_key(authorization.as_deref(), api_key.as_deref(), &query)
    {
        assert!(
            configured_has(&keys, key),
            "matched a key that is not configured"
        );
    }
    assert!(
        ClientKeys::default()
            .authorize(authorization.as_deref(), api_key.as_deref(), &query)
            .is_ok()
    );
}

fn configured_has(keys: &[String], given: &str) -> bool {
    keys.iter().any(|key| !key.is_empty() && key == given)
}

// ---------------------------------------------------------------------------------------------
// upstream_machine

/// Flag bodies an upstream might answer with (index into with [`Payload::Canned`]).
const CANNED_BODIES: &[&str] = &[
    r#"{"flags":{"a":true,"b":false}}"#,
    r#"{"flags":{"a":false,"b":false},"reasons":{"a":{"kind":"OFF"},"b":{"kind":"OFF"}}}"#,
    r#"{"flags":{"a":true},"reasons":{"a":{"kind":"RULE_MATCH","ruleId":"r","ruleIndex":0}}}"#,
    r#"{"flags":{}}"#,
    r#"{"flags":{"a":"yes"}}"#,
    r#"{"nope":1}"#,
    "",
];

/// Stream bytes an upstream might send (index into with [`Payload::Canned`]).
const CANNED_STREAM: &[&str] = &[
    "event: init\ndata: {\"flags\":{\"a\":true,\"b\":false}}\n\n",
    "event: flags\ndata: {\"flags\":{\"a\":false,\"b\":true}}\n\n",
    "event: flag-changed\ndata: {\"key\":\"a\"}\n\n",
    "event: flag-update\ndata: {\"key\":\"b\",\"enabled\":false}\n\n",
    "event: rules-full\ndata: {\"version\":\"1\",\"flags\":{\"a\":{\"enabled\":true,\"rollout\":50,\
     \"rules\":[{\"id\":\"r\",\"enabled\":true,\"rollout\":100,\"conditions\":[{\"attribute\":\
     \"plan\",\"operator\":\"equals\",\"value\":\"pro\"}]}]}}}\n\n",
    "event: rules-full\ndata: {\"version\":\"2\",\"flags\":{\"b\":{\"enabled\":true}}}\n\n",
    "event: heartbeat\ndata: {}\n\n",
    ": keepalive\n\n",
    "event: init\ndata: {\"flags\":{\"a\":1}}\n\n",
    "event: rules-full\ndata: [1,2]\n\n",
    "event: flag-update\ndata: {\"key\":1}\n\n",
    "retry: 10\nid: 7\n\n",
    "event: init\ndata: {\"fla",
    "gs\":{\"a\":true}}\n\n",
];

#[derive(Arbitrary, Debug)]
enum Payload {
    Canned(u8),
    Raw(Vec<u8>),
}

impl Payload {
    fn bytes(&self, canned: &[&str]) -> Bytes {
        match self {
            Self::Canned(i) => {
                Bytes::copy_from_slice(canned[usize::from(*i) % canned.len()].as_bytes())
            }
            Self::Raw(bytes) => Bytes::copy_from_slice(bytes),
        }
    }
}

/// One input to the machine. `pick` selects an id the machine handed out (the current one
/// mostly, a stale one sometimes).
#[derive(Arbitrary, Debug)]
enum Op {
    Fetch {
        pick: u8,
        status: u8,
        etag: Option<u8>,
        body: Payload,
    },
    FetchTransport {
        pick: u8,
    },
    StreamOpened {
        pick: u8,
        status: u8,
        is_event_stream: bool,
    },
    StreamBytes {
        pick: u8,
        bytes: Payload,
    },
    StreamClosed {
        pick: u8,
        eof: bool,
    },
    /// `handle_timeout` at `now + millis`.
    Advance {
        millis: u32,
    },
    /// `handle_timeout` at the machine's own deadline.
    Deadline,
    SideRequest {
        success: bool,
    },
    /// `restore` with the last persisted bytes (`None`) or arbitrary bytes.
    Restore(Option<Vec<u8>>),
}

const STATUSES: &[u16] = &[200, 200, 304, 500, 503, 429, 404, 401, 0, 999];

/// The adapter's view of the machine, and the invariants checked on every action.
struct Harness {
    upstream: Upstream,
    now: Timestamp,
    open_timeout: Duration,
    streaming: bool,
    fetch_ids: Vec<RequestId>,
    fetch_in_flight: Option<RequestId>,
    stream_ids: Vec<StreamId>,
    /// Streams the adapter holds a connection for (opened and neither closed by the machine
    /// nor reported closed).
    live_streams: Vec<StreamId>,
    last_revision: Option<Revision>,
    last_persisted: Option<Bytes>,
}

fn pick<T: Copy + PartialEq>(pick: u8, current: Option<T>, all: &[T]) -> Option<T> {
    match (pick % 4, current) {
        (0..=2, Some(current)) => Some(current),
        _ if all.is_empty() => None,
        _ => Some(all[usize::from(pick) % all.len()]),
    }
}

impl Harness {
    /// Whether the breaker is Open and stays Open through an input at `at`: while Open its
    /// deadline is the last failure plus the open timeout (a failure only ever extends it), and
    /// nothing but a `check` at or after that deadline leaves Open.
    fn breaker_blocks(&self, at: Timestamp) -> bool {
        let stats = self.upstream.status(self.now).breaker;
        stats.state == BreakerState::Open
            && stats
                .last_failure
                .is_some_and(|failure| failure.saturating_add(self.open_timeout) > at)
    }

    /// Runs one input at `at` (≥ now), drains its actions and checks the timer invariant.
    fn input(&mut self, at: Timestamp, f: impl FnOnce(&mut Upstream, Timestamp)) {
        assert!(at >= self.now);
        let blocked = self.breaker_blocks(at);
        self.now = at;
        f(&mut self.upstream, at);
        self.drain(blocked);
        // A deadline at or before now is handled at once by the adapter; handling it must move
        // every deadline past now, or the adapter's timer would spin.
        let deadline = self.upstream.poll_timeout();
        assert!(
            deadline.is_some(),
            "no deadline: nothing would ever poll again"
        );
        if deadline.is_some_and(|t| t <= at) {
            let blocked = self.breaker_blocks(at);
            self.upstream.handle_timeout(at);
            self.drain(blocked);
            let after = self.upstream.poll_timeout();
            assert!(
                after.is_some_and(|t| t > at),
                "timer would spin: {after:?} at {at:?}"
            );
        }
        let _ = self.upstream.status(at);
        let _ = self.upstream.stream_state();
    }

    fn drain(&mut self, blocked: bool) {
        while let Some(action) = self.upstream.poll_action() {
            match action {
                Action::Fetch { id, if_none_match } => {
                    assert!(!blocked, "fetch while the breaker is open");
                    assert!(self.fetch_in_flight.is_none(), "two fetches in flight");
                    assert!(if_none_match.is_none() || self.upstream.snapshot().is_some());
                    self.fetch_in_flight = Some(id);
                    self.fetch_ids.push(id);
                }
                Action::OpenStream(id) => {
                    assert!(!blocked, "stream opened while the breaker is open");
                    assert!(self.streaming, "stream opened with streaming off");
                    assert!(self.live_streams.is_empty(), "a second stream opened");
                    self.live_streams.push(id);
                    self.stream_ids.push(id);
                }
                Action::CloseStream(id) => {
                    let live = self.live_streams.iter().position(|s| *s == id);
                    let live = live.unwrap_or_else(|| panic!("closed {id}, which is not open"));
                    self.live_streams.remove(live);
                }
                Action::Publish(snapshot) => {
                    assert!(
                        self.last_revision.is_none_or(|r| snapshot.revision() > r),
                        "revision went from {:?} to {}",
                        self.last_revision,
                        snapshot.revision()
                    );
                    self.last_revision = Some(snapshot.revision());
                }
                Action::Persist { revision, bytes } => {
                    let (restored, _) = Snapshot::from_persisted(&bytes)
                        .unwrap_or_else(|e| panic!("persisted bytes do not restore: {e}"));
                    let current = self.upstream.snapshot();
                    let current = current.unwrap_or_else(|| panic!("persisted without data"));
                    assert_eq!(restored.content_hash(), current.content_hash());
                    assert_eq!(restored.revision(), revision);
                    assert_eq!(revision, current.revision());
                    self.last_persisted = Some(bytes);
                }
            }
        }
    }

    fn step(&mut self, op: Op) {
        let now = self.now;
        match op {
            Op::Fetch {
                pick: p,
                status,
                etag,
                body,
            } => {
                let Some(id) = pick(p, self.fetch_in_flight, &self.fetch_ids) else {
                    return;
                };
                self.answer_fetch(id);
                let status = STATUSES[usize::from(status) % STATUSES.len()];
                let result = FetchResult::Response {
                    status,
                    etag: etag.map(|e| format!("\"e{}\"", e % 4)),
                    body: body.bytes(CANNED_BODIES),
                    // Exercise the Retry-After path on the statuses that carry it.
                    retry_after: matches!(status, 429 | 503).then(|| "2".to_owned()),
                };
                self.input(now, |u, at| u.handle_fetch(at, id, result));
            }
            Op::FetchTransport { pick: p } => {
                let Some(id) = pick(p, self.fetch_in_flight, &self.fetch_ids) else {
                    return;
                };
                self.answer_fetch(id);
                let result = FetchResult::Transport("reset".to_owned());
                self.input(now, |u, at| u.handle_fetch(at, id, result));
            }
            Op::StreamOpened {
                pick: p,
                status,
                is_event_stream,
            } => {
                let Some(id) = pick(p, self.live_streams.last().copied(), &self.stream_ids) else {
                    return;
                };
                let status = STATUSES[usize::from(status) % STATUSES.len()];
                self.input(now, |u, at| {
                    let retry_after = matches!(status, 429 | 503).then_some("2");
                    u.handle_stream_opened(at, id, status, is_event_stream, retry_after);
                });
            }
            Op::StreamBytes { pick: p, bytes } => {
                let Some(id) = pick(p, self.live_streams.last().copied(), &self.stream_ids) else {
                    return;
                };
                let bytes = bytes.bytes(CANNED_STREAM);
                self.input(now, |u, at| u.handle_stream_bytes(at, id, &bytes));
            }
            Op::StreamClosed { pick: p, eof } => {
                let Some(id) = pick(p, self.live_streams.last().copied(), &self.stream_ids) else {
                    return;
                };
                // The adapter's connection is gone either way.
                self.live_streams.retain(|s| *s != id);
                let end = if eof {
                    StreamEnd::Eof
                } else {
                    StreamEnd::Error("reset".to_owned())
                };
                self.input(now, |u, at| u.handle_stream_closed(at, id, end));
            }
            Op::Advance { millis } => {
                let at = now.saturating_add(Duration::from_millis(u64::from(millis)));
                self.input(at, Upstream::handle_timeout);
            }
            Op::Deadline => {
                let at = self.upstream.poll_timeout().map_or(now, |t| t.max(now));
                self.input(at, Upstream::handle_timeout);
            }
            Op::SideRequest { success } => {
                let blocked = self.breaker_blocks(now);
                let admitted = self.upstream.admit_side_request(now);
                assert!(!(blocked && admitted), "side request admitted while open");
                if admitted {
                    let outcome = if success {
                        Outcome::Success
                    } else {
                        Outcome::Failure
                    };
                    self.input(now, |u, at| u.record_side_request(at, outcome));
                }
            }
            Op::Restore(bytes) => {
                let Some(bytes) = bytes
                    .map(Bytes::from)
                    .or_else(|| self.last_persisted.clone())
                else {
                    return;
                };
                self.input(now, |u, _| {
                    let _ = u.restore(&bytes);
                });
            }
        }
    }

    fn answer_fetch(&mut self, id: RequestId) {
        if self.fetch_in_flight == Some(id) {
            self.fetch_in_flight = None;
        }
    }
}

/// The upstream machine driven by an arbitrary sequence of inputs (fetch answers, stream
/// heads, bytes and ends, timeouts with a non-decreasing clock, side requests, restores),
/// draining `poll_action` after each. Invariants: no panic; published revisions only grow; at
/// most one fetch in flight and one stream open; `CloseStream` only names an open stream;
/// persisted bytes restore to the published content; while the breaker is open no `Fetch` or
/// `OpenStream` is emitted; there is always a deadline, and handling a due deadline moves every
/// deadline past now (no spinning timer).
pub fn upstream_machine(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(config_byte) = u.arbitrary::<u8>() else {
        return;
    };
    let Ok(jitter_seed) = u.arbitrary::<u64>() else {
        return;
    };
    let breaker = BreakerConfig {
        failure_threshold: u32::from(config_byte & 0x03) + 1,
        ..BreakerConfig::default()
    };
    let config = UpstreamConfig {
        streaming: config_byte & 0x80 == 0,
        breaker,
        decoder_limits: if config_byte & 0x40 == 0 {
            DecoderLimits::default()
        } else {
            DecoderLimits {
                max_line_bytes: 1024,
                max_event_bytes: 2048,
            }
        },
        jitter_seed,
        ..UpstreamConfig::default()
    };
    if config.validate().is_err() {
        return;
    }
    let start = Timestamp::from_millis(1_764_000_000_000);
    let mut harness = Harness {
        open_timeout: config.breaker.open_timeout,
        streaming: config.streaming,
        upstream: Upstream::new(config, start),
        now: start,
        fetch_ids: Vec::new(),
        fetch_in_flight: None,
        stream_ids: Vec::new(),
        live_streams: Vec::new(),
        last_revision: None,
        last_persisted: None,
    };
    harness.drain(false);
    for _ in 0..MAX_OPS {
        let Ok(op) = u.arbitrary::<Op>() else {
            break;
        };
        harness.step(op);
        if u.is_empty() {
            break;
        }
    }
}

/// Inputs per run: enough for outages, recoveries and reconnect storms, few enough to stay fast.
const MAX_OPS: usize = 64;
