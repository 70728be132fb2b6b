//! Identify, events and telemetry forwarded upstream by the stateless front itself, not by the
//! relay object: answered at once with core's answer, the POST finished in `ctx.waitUntil` with
//! the routed environment's server key, the upstream timeout and core's per-kind bound in this
//! isolate ([`ForwardGate`]); outcomes reported to the relay in batches (its breaker, metrics
//! and identify gates), and the relay's verdict (breaker, `Retry-After`) taken back.
//!
//! An identify still goes to the relay first, at once: the relay stores its attributes (per-user
//! answers merge them there) and opens a gate that holds that user's next upstream fetch until
//! this forward is reported ended, as before (see the edge README).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use rollgate_proxy_core::api::Route;
use rollgate_proxy_core::downstream::{Admitted, Answer, Downstream};
use rollgate_proxy_core::forwards::{ForwardGate, ForwardResult};
use rollgate_proxy_core::metrics::SideRequest;
use rollgate_proxy_core::time::Timestamp;
use worker::{
    AbortController, Context, Delay, Env, Fetch, Headers, Method, Response, console_error,
};

use crate::config::EdgeConfig;
use crate::http::{self, Incoming, now};
use crate::tally::{KINDS, Tally, Verdict};

/// Header on the relay's answer to an identify: core asked for a forward, behind the relay's
/// identify gate with this token (`0`: no gate). Never reaches the client.
pub(crate) const FORWARD_HEADER: &str = "x-rollgate-forward";
/// The relay's path taking a front's [`Tally`].
pub(crate) const REPORT_PATH: &str = "/__rollgate/forwards";
/// How long a reporter gathers outcomes before it sends them (identifies' go at once).
const REPORT_WINDOW: Duration = Duration::from_secs(1);
/// Most reports one reporter sends in a row (one per window, within a request's `waitUntil`
/// time); what is left goes with the next forward's report.
const MAX_REPORTS_IN_A_ROW: usize = 16;
/// A reporter silent this long is taken for gone (its request's `waitUntil` was cut short).
const REPORTER_STALE: Duration = Duration::from_secs(30);

/// This isolate's forwarding state of one environment.
struct Forwarding {
    gate: ForwardGate,
    tally: Tally,
    /// When the running reporter started its current report, if one runs.
    reporting: Option<Timestamp>,
    /// Core's dispatcher for this environment's events and telemetry (validation, answers).
    downstream: Rc<Downstream>,
}

thread_local! {
    /// Per environment name: isolates share nothing, so the bound is per isolate.
    static STATE: RefCell<HashMap<String, Forwarding>> = RefCell::new(HashMap::new());
}

fn with_state<R>(config: &EdgeConfig, f: impl FnOnce(&mut Forwarding) -> R) -> R {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let forwarding = state
            .entry(config.environment.clone())
            .or_insert_with(|| Forwarding {
                gate: ForwardGate::new(),
                tally: Tally::default(),
                reporting: None,
                downstream: Rc::new(Downstream::new(config.core.clone())),
            });
        f(forwarding)
    })
}

/// Whether the front forwards `route` itself.
pub(crate) fn is_forwarded(route: &Route) -> bool {
    matches!(
        route,
        Route::SdkIdentify | Route::SdkEvents | Route::SdkTelemetry
    )
}

/// Answers an identify, events or telemetry POST and forwards its body upstream.
pub(crate) async fn handle(
    env: &Env,
    ctx: &Context,
    config: &EdgeConfig,
    incoming: &Incoming,
    body: Bytes,
    admitted: Admitted,
) -> worker::Result<Response> {
    if admitted.route == Route::SdkIdentify {
        return identify(env, ctx, config, incoming, body).await;
    }
    let downstream = with_state(config, |s| Rc::clone(&s.downstream));
    let answer = incoming.dispatch_without_snapshot(&downstream, &body, admitted);
    match answer {
        Answer::Respond(response) => http::to_response(response),
        Answer::Forward(forward) => {
            start(env, ctx, config, forward.kind, forward.body, 0);
            http::to_response(forward.response)
        }
        _ => http::internal(),
    }
}

/// The relay stores the attributes and answers (core's answer); then this isolate forwards.
async fn identify(
    env: &Env,
    ctx: &Context,
    config: &EdgeConfig,
    incoming: &Incoming,
    body: Bytes,
) -> worker::Result<Response> {
    let response = crate::entry::to_relay(env, config, incoming, &body, true).await?;
    if response.status_code() == 200 {
        // The stored attributes change this user's answers: this location must ask the relay
        // (which merges them) before it answers that user from its own copy again.
        crate::local::forget(config).await;
    }
    let token = response
        .headers()
        .get(FORWARD_HEADER)?
        .and_then(|t| t.parse::<u64>().ok());
    if let Some(token) = token {
        start(env, ctx, config, SideRequest::Identify, body, token);
    }
    http::with_headers(response, &[], &[FORWARD_HEADER])
}

/// Admits a forward of `kind` in this isolate and finishes it (or counts why not) after the
/// client's answer; `token` names the relay's identify gate to end (`0`: none).
fn start(
    env: &Env,
    ctx: &Context,
    config: &EdgeConfig,
    kind: SideRequest,
    body: Bytes,
    token: u64,
) {
    let Some(key) = config.core.api_key.clone() else {
        return;
    };
    let admitted = with_state(config, |s| s.gate.admit(now(), kind));
    let env = env.clone();
    let config = config.clone();
    ctx.wait_until(async move {
        let outcome = match admitted {
            Err(outcome) => outcome,
            Ok(()) => {
                let url = format!(
                    "{}{}",
                    config.core.base_url,
                    rollgate_proxy_core::downstream::forward_path(kind)
                );
                let (result, retry_after) =
                    post(&url, key.expose(), body, config.core.upstream_timeout).await;
                if let Sent::Answered(status) = result
                    && !(200..300).contains(&status)
                {
                    with_state(&config, |s| {
                        s.tally.refused(kind, status, retry_after.as_deref())
                    });
                }
                let result = match result {
                    Sent::Answered(status) => ForwardResult::Answered {
                        status,
                        retry_after: retry_after.as_deref(),
                    },
                    Sent::TimedOut => ForwardResult::TimedOut,
                    Sent::Failed(error) => {
                        console_error!(
                            "forwarding {} failed: {}",
                            kind.label(),
                            key.redact(&error)
                        );
                        ForwardResult::Failed
                    }
                };
                with_state(&config, |s| s.gate.finish(now(), kind, result))
            }
        };
        with_state(&config, |s| {
            s.tally.count(kind, outcome);
            s.tally.done(token);
        });
        report(&env, &config, token != 0).await;
    });
}

/// How a POST went.
enum Sent {
    Answered(u16),
    TimedOut,
    Failed(String),
}

/// POSTs `body` to `url` with the server key, for at most `timeout`; returns the status (or
/// why none) and upstream's `Retry-After`. A 3xx is not followed (it would take the key along).
async fn post(url: &str, key: &str, body: Bytes, timeout: Duration) -> (Sent, Option<String>) {
    let request = (|| {
        let headers = Headers::new();
        headers.set("authorization", &format!("Bearer {key}"))?;
        headers.set("content-type", "application/json")?;
        http::new_request(
            url,
            &Method::Post,
            &headers,
            http::Redirect::Manual,
            Some(&body[..]),
        )
    })();
    let request = match request {
        Ok(request) => request,
        Err(error) => return (Sent::Failed(error.to_string()), None),
    };
    let controller = AbortController::default();
    let signal = controller.signal();
    let fetch = Fetch::Request(request);
    let send = fetch.send_with_signal(&signal);
    match http::with_timeout(send, controller, timeout).await {
        Some(Ok(response)) => {
            let retry_after = response.headers().get("retry-after").ok().flatten();
            (Sent::Answered(response.status_code()), retry_after)
        }
        Some(Err(error)) => (Sent::Failed(error.to_string()), None),
        None => (Sent::TimedOut, None),
    }
}

/// Sends this isolate's tally to the relay and applies the relay's verdict. An ended identify
/// (`urgent`: a fetch of its user may be waiting on the relay) goes at once; other outcomes are
/// gathered for [`REPORT_WINDOW`] by one reporter per isolate, so the relay gets at most about
/// one report per window from an isolate however many forwards it makes. Every wait is a timer
/// of this request's own: a request never resumes another's I/O (Workers forbids it).
async fn report(env: &Env, config: &EdgeConfig, urgent: bool) {
    if urgent {
        let tally = with_state(config, |s| std::mem::take(&mut s.tally));
        send_and_apply(env, config, tally).await;
        return;
    }
    let at = now();
    let starts = with_state(config, |s| {
        let running = s
            .reporting
            .is_some_and(|since| at.saturating_since(since) < REPORTER_STALE);
        if !running {
            s.reporting = Some(at);
        }
        !running
    });
    if !starts {
        return;
    }
    for _ in 0..MAX_REPORTS_IN_A_ROW {
        Delay::from(REPORT_WINDOW).await;
        // Taken, and the reporter gone when there is nothing, in one step: an outcome counted
        // after it starts its own reporter.
        let tally = with_state(config, |s| {
            let tally = std::mem::take(&mut s.tally);
            s.reporting = (!tally.is_empty()).then(now);
            tally
        });
        if tally.is_empty() {
            return;
        }
        if !send_and_apply(env, config, tally).await {
            break;
        }
    }
    with_state(config, |s| s.reporting = None);
}

/// Sends `tally` (nothing when empty); on failure it is put back for the next report.
async fn send_and_apply(env: &Env, config: &EdgeConfig, tally: Tally) -> bool {
    if tally.is_empty() {
        return true;
    }
    match send_report(env, config, &tally).await {
        Ok(verdict) => {
            with_state(config, |s| {
                for (kind, until) in KINDS.iter().zip(verdict.until) {
                    s.gate.verdict(*kind, until.map(Timestamp::from_millis));
                }
            });
            true
        }
        Err(error) => {
            console_error!("reporting forwards to the relay failed: {error}");
            with_state(config, |s| s.tally.merge(tally));
            false
        }
    }
}

async fn send_report(env: &Env, config: &EdgeConfig, tally: &Tally) -> worker::Result<Verdict> {
    let mut headers = vec![(
        "content-type",
        "application/x-www-form-urlencoded".to_owned(),
    )];
    if config.environments.is_some() {
        headers.push((http::ENVIRONMENT_HEADER, config.environment.clone()));
    }
    let request = http::internal_request(
        Method::Post,
        REPORT_PATH,
        &headers,
        tally.encode().as_bytes(),
    )?;
    let mut response = http::fetch_relay(env, config, request).await?;
    if response.status_code() != 200 {
        return Err(worker::Error::RustError(format!(
            "the relay answered {}",
            response.status_code()
        )));
    }
    Ok(Verdict::decode(&response.text().await?))
}
