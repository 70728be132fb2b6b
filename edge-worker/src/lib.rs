//! rollgate-proxy on Cloudflare Workers: the same API as the native server, with the upstream
//! connection held by one Durable Object per environment.
//!
//! ```text
//!  client ──▶ Worker (fetch) ── CORS, client keys, body limit, Route::parse
//!              │  polling: Workers Cache API (pointer to the current event id, 1 s) ─ miss ─┐
//!              │  streams: one of SSE_SHARDS shard objects (random)                         │
//!              ▼                                                                            ▼
//!        SseShard[i] ◀── one internal stream of snapshots ── Relay (one per ROLLGATE_ENV) ◀─┘
//!        (fans out flags/init/OFREP frames,                   owns core's `Upstream`: ONE upstream
//!         keepalives prune dead clients)                      SSE + fetches, alarms = poll_timeout,
//!                                                             snapshot persisted in DO storage
//! ```
//!
//! Host builds (`cargo build/test --workspace`) compile only the pure modules below; the
//! Workers runtime modules exist for `wasm32` only and are built with `worker-build`.

pub mod cache;
pub mod config;
pub mod cors;
pub mod serve;

#[cfg(target_arch = "wasm32")]
mod entry;
#[cfg(target_arch = "wasm32")]
mod http;
#[cfg(target_arch = "wasm32")]
mod relay;
#[cfg(target_arch = "wasm32")]
mod shard;

/// The built-in rules served in local mode (no `ROLLGATE_API_KEY`).
pub const LOCAL_FLAGS: &str = include_str!("local-flags.json");
