//! The stateless Worker's copy of the current snapshot, so that rules mode answers polling
//! (per user too) in the isolate instead of in the relay object.
//!
//! The current event id comes from the edge cache's pointer (trusted for
//! `ROLLGATE_PROXY_EDGE_CACHE_TTL`); the snapshot for it from this isolate's memory, then from a
//! Cache API entry keyed by the event id (immutable), and only then from the relay, which
//! answers a cheap revision check (`/__rollgate/snapshot?have=<event id>`: 204 when unchanged).
//! So per location the relay sees about one request per pointer TTL, whatever the traffic.
//!
//! Answers that depend on `/identify` attributes are not made here: those are stored in the
//! relay, so the isolate answers only while the event id's identity epoch is 0 (nobody
//! identified since the relay started), and an `/identify` through this isolate drops its copy
//! and the location's pointer at once, so that user's next request goes to the relay.

use std::cell::RefCell;
use std::sync::Arc;

use rollgate_proxy_core::snapshot::Snapshot;
use worker::{Cache, Context, Env, Headers, Method, Response, console_error};

use crate::cache;
use crate::config::EdgeConfig;
use crate::http::{self, EVENT_ID_HEADER};

/// The relay's internal route for the isolate's revision check.
pub(crate) const SNAPSHOT_PATH: &str = "/__rollgate/snapshot";

/// How long a snapshot entry lives in the Cache API (its key names one immutable snapshot).
const SNAPSHOT_TTL_SECS: u64 = 3600;

thread_local! {
    /// The isolate's current snapshot and the event id (`<revision>-<hash>~<epoch>`) it is for.
    static CURRENT: RefCell<Option<(String, Arc<Snapshot>)>> = const { RefCell::new(None) };
}

/// Whether an event id's identity epoch is 0 (no `/identify` attributes to merge).
pub(crate) fn without_identities(event_id: &str) -> bool {
    event_id
        .rsplit_once('~')
        .is_some_and(|(_, epoch)| epoch == "0")
}

/// Whether to look for a local answer: not while this isolate's copy is an evaluated-mode
/// snapshot that is still current (the relay answers per-user requests then).
pub(crate) fn worth_asking() -> bool {
    CURRENT.with(|c| c.borrow().as_ref().is_none_or(|(_, s)| s.rules().is_some()))
}

/// An answer from the relay named `event_id` as current: a copy for another one is dropped, so
/// the next request looks again (the mode may have changed).
pub(crate) fn seen(event_id: &str) {
    CURRENT.with(|c| {
        let mut current = c.borrow_mut();
        if current.as_ref().is_some_and(|(id, _)| id != event_id) {
            *current = None;
        }
    });
}

/// Forgets the isolate's copy and this location's pointer (an `/identify` went through).
pub(crate) async fn forget(config: &EdgeConfig) {
    CURRENT.with(|c| c.borrow_mut().take());
    let pointer = cache::pointer_key(&config.environment);
    if let Err(error) = Cache::default().delete(pointer.as_str(), true).await {
        console_error!("edge cache delete failed: {error}");
    }
}

/// The current snapshot and its event id, as this location knows it (see the module docs);
/// `None` when the relay has none or could not be asked.
pub(crate) async fn current(
    env: &Env,
    ctx: &Context,
    config: &EdgeConfig,
) -> worker::Result<Option<(String, Arc<Snapshot>)>> {
    let edge = Cache::default();
    let pointer = cache::pointer_key(&config.environment);
    let known = CURRENT.with(|c| c.borrow().clone());
    if let Some(mut hit) = edge.get(pointer.as_str(), true).await? {
        let event_id = hit.text().await?;
        if let Some((id, snapshot)) = &known
            && *id == event_id
        {
            return Ok(Some((event_id, Arc::clone(snapshot))));
        }
        let key = cache::snapshot_key(&config.environment, &event_id);
        if let Some(mut entry) = edge.get(key.as_str(), true).await?
            && let Ok((snapshot, _)) = Snapshot::from_persisted(&entry.bytes().await?)
        {
            return Ok(Some(install(event_id, snapshot)));
        }
    }
    // The pointer expired (or names a snapshot this location lacks): ask the relay.
    let have = known.as_ref().map_or("", |(id, _)| id.as_str());
    let path = format!(
        "{SNAPSHOT_PATH}?have={}",
        String::from(js_sys::encode_uri_component(have))
    );
    let request = http::internal_request(Method::Get, &path, &[], &[])?;
    let mut response = http::fetch_relay(env, config, request).await?;
    let Some(event_id) = response.headers().get(EVENT_ID_HEADER)? else {
        return Ok(None);
    };
    let ttl = config.cache_ttl.as_secs().max(1);
    let current = match response.status_code() {
        204 => match known {
            Some((id, snapshot)) if id == event_id => Some((id, snapshot)),
            _ => None,
        },
        200 => {
            let bytes = response.bytes().await?;
            match Snapshot::from_persisted(&bytes) {
                Ok((snapshot, _)) => {
                    let key = cache::snapshot_key(&config.environment, &event_id);
                    let stored = cached(bytes, SNAPSHOT_TTL_SECS)?;
                    ctx.wait_until(async move {
                        if let Err(error) = Cache::default().put(key.as_str(), stored).await {
                            console_error!("edge cache put failed: {error}");
                        }
                    });
                    Some(install(event_id.clone(), snapshot))
                }
                Err(error) => {
                    console_error!("bad snapshot from the relay: {error}");
                    None
                }
            }
        }
        _ => None,
    };
    if current.is_some() {
        let pointer_copy = cached(event_id.into_bytes(), ttl)?;
        ctx.wait_until(async move {
            if let Err(error) = edge.put(pointer.as_str(), pointer_copy).await {
                console_error!("edge cache put failed: {error}");
            }
        });
    }
    Ok(current)
}

fn install(event_id: String, snapshot: Snapshot) -> (String, Arc<Snapshot>) {
    let snapshot = Arc::new(snapshot);
    CURRENT.with(|c| *c.borrow_mut() = Some((event_id.clone(), Arc::clone(&snapshot))));
    (event_id, snapshot)
}

fn cached(body: Vec<u8>, ttl_secs: u64) -> worker::Result<Response> {
    let headers = Headers::new();
    headers.set("cache-control", &format!("max-age={ttl_secs}"))?;
    Ok(Response::from_bytes(body)?.with_headers(headers))
}
