//! Per-user state: the evaluated-mode answer cache (bounded LRU, TTL, coalesced fetches through
//! the breaker) and the attributes stored by `/identify`.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use lru::LruCache;
use rollgate_proxy_core::api::{ApiError, limits};
use rollgate_proxy_core::breaker::Outcome;
use rollgate_proxy_core::model::{Context, EvaluatedFlags};
use rollgate_proxy_core::snapshot::Revision;

use crate::metrics as m;
use crate::state::{App, lock, now};

type Pending = Shared<BoxFuture<'static, Option<Arc<EvaluatedFlags>>>>;

#[derive(Debug, Clone)]
struct Cached {
    flags: Arc<EvaluatedFlags>,
    fetched: Instant,
    /// The snapshot revision current when this was fetched: a change upstream makes every
    /// cached answer out of date, whatever its age.
    revision: Revision,
}

/// Flags per user id, fetched from upstream in evaluated mode.
pub struct UserCache {
    entries: Mutex<LruCache<String, Cached>>,
    inflight: Mutex<HashMap<(String, Revision), Pending>>,
    ttl: Duration,
}

impl std::fmt::Debug for UserCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCache")
            .field("len", &lock(&self.entries).len())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl UserCache {
    /// A cache of at most `capacity` users whose entries live `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
            inflight: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Cached users.
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Whether no user is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, user_id: String, flags: Arc<EvaluatedFlags>, revision: Revision) {
        lock(&self.entries).put(
            user_id,
            Cached {
                flags,
                fetched: Instant::now(),
                revision,
            },
        );
    }
}

/// Flags for `user_id` in evaluated mode: from the cache while fresh (younger than the TTL and
/// fetched for the current `revision`), else from upstream, one request per user however many
/// ask at once. When upstream fails, an expired entry is served (stale); without one, 502.
///
/// # Errors
/// [`ApiError::upstream_unavailable`] when upstream failed and nothing is cached.
pub async fn user_flags(
    app: &Arc<App>,
    user_id: &str,
    revision: Revision,
) -> Result<Arc<EvaluatedFlags>, ApiError> {
    let cache = &app.users;
    let stale = {
        let mut entries = lock(&cache.entries);
        match entries.get(user_id) {
            Some(entry) if entry.revision == revision && entry.fetched.elapsed() < cache.ttl => {
                m::user_cache("hit");
                return Ok(Arc::clone(&entry.flags));
            }
            Some(entry) => Some(Arc::clone(&entry.flags)),
            None => None,
        }
    };
    let pending = {
        let key = (user_id.to_owned(), revision);
        let mut inflight = lock(&cache.inflight);
        inflight
            .entry(key.clone())
            .or_insert_with(|| {
                let app = Arc::clone(app);
                async move {
                    let result = fetch_user(&app, &key.0).await;
                    if let Some(flags) = &result {
                        app.users.insert(key.0.clone(), Arc::clone(flags), key.1);
                    }
                    lock(&app.users.inflight).remove(&key);
                    result
                }
                .boxed()
                .shared()
            })
            .clone()
    };
    match pending.await {
        Some(flags) => {
            m::user_cache("miss");
            Ok(flags)
        }
        None => match stale {
            Some(flags) => {
                m::user_cache("stale");
                Ok(flags)
            }
            None => {
                m::user_cache("error");
                Err(ApiError::upstream_unavailable())
            }
        },
    }
}

/// `GET {base}/api/v1/sdk/flags?withReasons=true&user_id=…`, admitted by the breaker.
async fn fetch_user(app: &App, user_id: &str) -> Option<Arc<EvaluatedFlags>> {
    let upstream = app.upstream.as_ref()?;
    if !upstream.with(|machine| machine.admit_side_request(now())) {
        m::upstream_request("user_flags", "rejected");
        return None;
    }
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("withReasons", "true")
        .append_pair("user_id", user_id)
        .finish();
    let url = format!("{}/api/v1/sdk/flags?{query}", upstream.base_url);
    let response = upstream
        .http
        .get(url)
        .bearer_auth(upstream.api_key.expose())
        .timeout(upstream.timeout)
        .send()
        .await;
    let flags = match response {
        Ok(response) if response.status() == reqwest::StatusCode::OK => {
            let limit = upstream.peek(|m| m.max_body_bytes());
            match crate::driver::read_capped(response, limit).await {
                Ok(Ok(body)) => EvaluatedFlags::from_json(&body).ok(),
                Ok(Err(_)) | Err(_) => None,
            }
        }
        Ok(response) => {
            let (status, retry_after) = (
                response.status().as_u16(),
                crate::driver::retry_after(&response),
            );
            upstream.with(|m| m.record_side_response(now(), status, retry_after.as_deref()));
            tracing::warn!(
                status = response.status().as_u16(),
                "upstream refused a per-user flags request"
            );
            None
        }
        Err(error) => {
            tracing::warn!(
                error = %upstream.describe(&error),
                "per-user flags request failed"
            );
            None
        }
    };
    let outcome = if flags.is_some() {
        Outcome::Success
    } else {
        Outcome::Failure
    };
    upstream.with(|machine| machine.record_side_request(now(), outcome));
    m::upstream_request("user_flags", if flags.is_some() { "ok" } else { "error" });
    flags.map(Arc::new)
}

/// Attributes per user id from `POST /api/v1/sdk/identify` (bounded LRU).
#[derive(Debug)]
pub struct IdentityStore {
    users: Mutex<LruCache<String, Context>>,
    /// Skips the lock on the hot path until someone has identified.
    used: AtomicBool,
}

impl IdentityStore {
    /// A store of at most `capacity` users.
    pub fn new(capacity: usize) -> Self {
        Self {
            users: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
            used: AtomicBool::new(false),
        }
    }

    /// Stores `context` under its id (an identify with no attributes clears them, as the SDKs'
    /// `reset()` intends). Contexts without an id are ignored.
    pub fn remember(&self, context: &Context) {
        let Some(id) = &context.id else { return };
        lock(&self.users).put(id.clone(), context.clone());
        self.used.store(true, Ordering::Relaxed);
    }

    /// `context` with the stored email and attributes filled in where the request gave none.
    pub fn merge(&self, mut context: Context) -> Context {
        if !self.used.load(Ordering::Relaxed) {
            return context;
        }
        let Some(id) = &context.id else {
            return context;
        };
        let Some(stored) = lock(&self.users).get(id).cloned() else {
            return context;
        };
        if context.email.is_none() {
            context.email = stored.email;
        }
        for (name, value) in stored.attributes {
            if context.attributes.len() >= limits::MAX_ATTRIBUTES {
                break;
            }
            context.attributes.entry(name).or_insert(value);
        }
        context
    }
}

#[cfg(test)]
mod tests {
    use rollgate_proxy_core::model::AttributeValue;

    use super::*;

    #[test]
    fn identify_store_merges_and_is_bounded() {
        let store = IdentityStore::new(2);
        let mut ctx = Context::with_id("u1");
        ctx.email = Some("a@example.com".into());
        ctx.attributes
            .insert("plan".into(), AttributeValue::String("pro".into()));
        store.remember(&ctx);
        let merged = store.merge(Context::with_id("u1"));
        assert_eq!(merged.email.as_deref(), Some("a@example.com"));
        assert_eq!(merged.attribute("plan").as_deref(), Some("pro"));
        // The request's own values win.
        let mut own = Context::with_id("u1");
        own.attributes
            .insert("plan".into(), AttributeValue::String("free".into()));
        assert_eq!(store.merge(own).attribute("plan").as_deref(), Some("free"));
        store.remember(&Context::with_id("u2"));
        store.remember(&Context::with_id("u3"));
        assert_eq!(store.merge(Context::with_id("u1")).email, None);
        assert!(store.merge(Context::anonymous()).is_anonymous());
    }
}
