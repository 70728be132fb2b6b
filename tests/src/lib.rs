//! Black-box test support for rollgate-proxy: a Rollgate-compatible mock upstream and an SSE
//! test client, both independent of `rollgate-proxy-core`.
//!
//! * [`mock`]: [`mock::MockUpstream`] serves `/api/v1/sdk/{flags,stream,identify,events,telemetry}`
//!   and `/health` like Rollgate production, and is driven in process through
//!   [`mock::MockControl`] or over HTTP under `/control/*` (binary `mock-upstream`).
//! * [`sse`]: [`sse::SseClient`] and its incremental [`sse::SseParser`].

pub mod mock;
pub mod sse;
