//! The runtime-agnostic heart of rollgate-proxy.
//!
//! This crate **is** the flag model, the evaluator, the snapshot cache, SSE encoding and
//! decoding, the circuit breaker, the retry and reconnect schedules, and the upstream protocol
//! state machine. It **is not** a network client, a server, a timer or a thread: it performs no
//! I/O and never reads a clock or a random source, so it builds for `wasm32-unknown-unknown` and
//! a test can drive hours of upstream outages in microseconds.
//!
//! # Layout
//! - [`api`]: the downstream API as plain data: routes, parsing, auth, every body.
//! - [`time`]: `Timestamp` (unix milliseconds), the only notion of time core has.
//! - [`model`]: evaluated snapshots, the rules model, contexts, reasons; typed parse errors.
//! - [`eval`]: rules compiled once per snapshot, evaluated per context; never fails.
//! - [`render`]: response bodies and SSE frames, rendered once for both adapters.
//! - [`encoding`]: gzip/br variants of the shared bodies and `Accept-Encoding` negotiation.
//! - [`rendered`]: per-context answers of rules mode, rendered once per revision and cached.
//! - [`snapshot`]: one immutable revision; each body and SSE frame serialized once, on first use.
//! - [`sse`]: an SSE event encoder and an incremental, size-limited WHATWG decoder.
//! - [`breaker`]: the circuit breaker with Rollgate's defaults.
//! - [`backoff`]: request retry and stream reconnect schedules; jitter is an input.
//! - [`upstream`]: the protocol machine that keeps one replica in sync with Rollgate.
//! - [`environments`]: several environments per deployment, the client-key router, reloads.
//!
//! # Driving the upstream machine
//! Adapters own sockets, timers and storage; core owns every decision. In the style of
//! `quinn-proto`, inputs are `handle_*(now, ..)` calls and outputs are drained with `poll_*`:
//!
//! ```text
//!            ┌──────────────── adapter (tokio / Durable Object) ────────────────┐
//!   bytes,   │  handle_response(now, ..)        poll_action() -> Fetch / Open /  │
//!   status,  │  handle_stream_bytes(now, ..) ─▶ Close / Publish / Persist ──────▶│ I/O, fan-out
//!   timers ─▶│  handle_stream_closed(now, ..)   poll_timeout() -> Timestamp ────▶│ sleep / alarm
//!            │  handle_timeout(now)                                              │
//!            └───────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Call order after any input: drain `poll_action()` until it returns `None`, then read
//! `poll_timeout()` and arrange to call `handle_timeout` at (or after) that time.
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod api;
pub mod assets;
pub mod backoff;
pub mod breaker;
pub mod cors;
pub mod downstream;
pub mod encoding;
pub mod environments;
pub mod eval;
pub mod forwards;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod model;
pub mod outbox;
pub mod refresh;
pub mod render;
pub mod rendered;
pub mod reports;
pub mod secret;
pub mod settings;
pub mod snapshot;
pub mod sse;
pub mod stream;
pub mod time;
pub mod upstream;
pub mod users;
