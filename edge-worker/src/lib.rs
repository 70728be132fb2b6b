//! rollgate-proxy on Cloudflare Workers: the same API as the native server, with the upstream
//! connection held by one Durable Object per environment.
//!
//! ```text
//!  client ──▶ Worker (fetch) ── CORS, request id, core's admit (route, client key), body limit
//!              │  stateless routes: answered here by core's dispatcher
//!              │  polling: Workers Cache API (pointer to the current event id) ─ miss ─┐
//!              │  streams: one of ROLLGATE_PROXY_SSE_SHARDS shard objects (random)       │
//!              │  identify, events, telemetry: POSTed upstream from here (forward.rs),   │
//!              │    outcomes reported to the relay in batches                            │
//!              ▼                                                                        ▼
//!        SseShard[i] ◀── one internal stream of snapshots ── Relay (one per environment) ◀┘
//!        core's Subscriber per client; per-user               owns core's `Upstream` (ONE upstream
//!        flags asked of the relay                             SSE + fetches, alarms = poll_timeout,
//!                                                             snapshot in DO storage) and core's
//!                                                             `Downstream` (dispatch, per-user
//!                                                             cache, identities, metrics)
//! ```
//!
//! Every decision is core's; these modules move bytes between the Workers runtime and core.
//! Host builds (`cargo build/test --workspace`) compile only the pure modules; the runtime
//! modules exist for `wasm32` only and are built with `worker-build`.

pub mod cache;
pub mod config;
pub mod tally;

cfg_if::cfg_if! {
    if #[cfg(target_arch = "wasm32")] {
        mod entry;
        mod fanout;
        mod forward;
        mod http;
        mod local;
        mod relay;
        mod shard;
    }
}

/// The rules served in local mode (no `ROLLGATE_API_KEY`): the native server's bundled file.
pub const LOCAL_FLAGS: &str = include_str!("../../examples/flags.json");
