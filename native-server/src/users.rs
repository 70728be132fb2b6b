//! A user's flags in evaluated mode: the I/O half of core's per-user cache (the fetch, and the
//! wait for another request's fetch). Core decides fresh / fetch / wait / stale.

use std::sync::Arc;

use rollgate_proxy_core::breaker::Outcome;
use rollgate_proxy_core::metrics::{SideOutcome, SideRequest};
use rollgate_proxy_core::model::EvaluatedFlags;
use rollgate_proxy_core::snapshot::Revision;
use rollgate_proxy_core::users::{Lookup, UserFlags};

use crate::runtime::now;
use crate::state::App;

/// `user_id`'s flags at `revision`: cached, fetched (one upstream request per user and
/// revision however many ask at once), or, when upstream fails, the stale answer or none.
///
/// The fetch runs in its own task, so a client that hangs up never leaves the other waiters
/// (or core's in-flight entry) without an answer.
pub async fn user_flags(app: &Arc<App>, user_id: &str, revision: Revision) -> UserFlags {
    let downstream = &app.downstream;
    // Registered before the lookup, so a fetch completing in between still wakes us.
    let notified = app.user_fetches.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    match downstream.user_lookup(now(), user_id, revision) {
        Lookup::Fresh(flags) => UserFlags::Fresh(flags),
        Lookup::Fetch { ticket, .. } => {
            let task_app = Arc::clone(app);
            let user = user_id.to_owned();
            let fetch = tokio::spawn(async move {
                // The user's identify reaches Rollgate before this fetch does.
                let bound = task_app.settings.core.upstream_timeout;
                task_app.identifies.wait(&user, bound).await;
                let result = fetch_user(&task_app, &user).await;
                let fetched = result.is_some();
                let flags = task_app
                    .downstream
                    .user_fetched(now(), &user, ticket, result);
                task_app.user_fetches.notify_waiters();
                if fetched {
                    // The user's streams re-read the cache (a change may have been waiting).
                    task_app.user_streams.bump(&user);
                }
                flags
            });
            fetch.await.unwrap_or(UserFlags::Unavailable)
        }
        Lookup::Wait { .. } => {
            let bound = app.settings.core.upstream_timeout + std::time::Duration::from_secs(1);
            // Woken by any completed fetch; re-check, as core's deadline bounds the wait.
            let _ = tokio::time::timeout(bound, notified).await;
            downstream.user_waited(now(), user_id, revision)
        }
    }
}

/// `GET {base}/api/v1/sdk/flags?withReasons=true&user_id=…`, admitted by the breaker.
pub(crate) async fn fetch_user(app: &App, user_id: &str) -> Option<EvaluatedFlags> {
    let upstream = app.upstream()?;
    let metrics = &app.downstream.metrics;
    let Some(_slot) = upstream.side_slot(SideRequest::UserFlags) else {
        metrics.side_request(SideRequest::UserFlags, SideOutcome::Busy);
        return None;
    };
    if !upstream.with(|machine| machine.admit_side_request(now())) {
        metrics.side_request(SideRequest::UserFlags, SideOutcome::Rejected);
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
    let (outcome, side) = if flags.is_some() {
        (Outcome::Success, SideOutcome::Ok)
    } else {
        (Outcome::Failure, SideOutcome::Error)
    };
    upstream.with(|machine| machine.record_side_request(now(), outcome));
    metrics.side_request(SideRequest::UserFlags, side);
    flags
}
