//! Parity: one mock upstream, one native proxy and one Worker in front of it; every route and
//! every stream must give the same status, `Content-Type`, `ETag` and bytes on both.
//!
//! Runs with `E2E_TARGET=edge` (as one more scenario) or `E2E_TARGET=parity` (alone). Only
//! what is per replica by nature is masked before comparing: `_meta.cachedAt` (when *this*
//! replica built the snapshot, an RFC 3339 time in `/api/flags`) and OFREP's `lastModified`
//! (the same instant in seconds), and the revision in SSE `id: <revision>-<hash>` and in
//! `/api/health`: it counts the changes *this* replica saw, which depends on timing (a replica
//! whose upstream stream `init` lands before its first fetch sees one more change, reasons
//! arriving second). The content hash, so every ETag, must match. `/api/health` is compared
//! without its per-replica counters and ages, and its key set (recursively) must match in
//! full. `/api/metrics` values are per replica, but the families must match: the same names,
//! `# TYPE`s and `# HELP` lines, and the same label names wherever both targets have samples
//! (a target may have none for a family it cannot measure).

use std::time::Duration;

use rollgate_proxy_tests::mock::MockConfig;
use rollgate_proxy_tests::sse::SseEvent;
use rollgate_proxy_tests::target::{self, ProxyHandle, TargetKind};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![scenario!(native_and_worker_serve_identical_bytes)]
}

/// Replaces the value after each `"name":` (a string or a number) by `*`.
fn mask(body: &[u8], name: &str) -> Vec<u8> {
    let needle = format!("\"{name}\":");
    let text = String::from_utf8_lossy(body);
    let mut out = String::with_capacity(text.len());
    let mut rest: &str = &text;
    while let Some(at) = rest.find(&needle) {
        let (head, tail) = rest.split_at(at + needle.len());
        out.push_str(head);
        let end = if let Some(quoted) = tail.strip_prefix('"') {
            quoted.find('"').map_or(tail.len(), |i| i + 2)
        } else {
            tail.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(tail.len())
        };
        out.push('*');
        rest = &tail[end..];
    }
    out.push_str(rest);
    out.into_bytes()
}

/// `body` with the per-replica values masked, e.g. `"cachedAt":"2026-…Z"` → `"cachedAt":*`.
fn masked(body: &[u8]) -> Vec<u8> {
    mask(&mask(body, "cachedAt"), "lastModified")
}

#[derive(Debug, PartialEq, Eq)]
struct Seen {
    status: u16,
    content_type: Option<String>,
    etag: Option<String>,
    body: String,
}

async fn seen(req: reqwest::RequestBuilder) -> Seen {
    let resp = send(req).await.expect("request answered");
    Seen {
        status: resp.status,
        content_type: resp.header("content-type").map(str::to_owned),
        etag: resp.header("etag").map(str::to_owned),
        body: String::from_utf8_lossy(&masked(&resp.body)).into_owned(),
    }
}

fn event(ev: &SseEvent) -> (String, Option<String>, String, Option<u64>) {
    (
        ev.event.clone(),
        ev.id
            .as_deref()
            .map(|id| id.split_once('-').map_or(id, |(_, hash)| hash).to_owned()),
        String::from_utf8_lossy(&masked(ev.data.as_bytes())).into_owned(),
        ev.retry,
    )
}

async fn native_and_worker_serve_identical_bytes() {
    if target() != TargetKind::Edge {
        println!(
            "(skipped on this target: needs the Worker too; run with E2E_TARGET=edge or parity)"
        );
        return;
    }
    let mock = mock(MockConfig::basic()).await;
    let config = proxy_config(&mock);
    let start = |kind: TargetKind| {
        let config = config.clone();
        async move {
            target::start(kind, config)
                .await
                .unwrap_or_else(|e| panic!("{kind:?} did not start: {e:#}"))
        }
    };
    let native = start(TargetKind::Native).await;
    let edge = start(TargetKind::Edge).await;
    let both = [&native, &edge];
    for p in both {
        wait_ready(p).await;
    }
    let etag = |p: &ProxyHandle| {
        let url = p.url("/api/flags");
        async move { get(&url).await.ok()?.header("etag").map(str::to_owned) }
    };
    eventually(
        "both serve the same snapshot",
        Duration::from_secs(10),
        || async {
            let (a, b) = (etag(&native).await?, etag(&edge).await?);
            (a == b).then_some(())
        },
    )
    .await;

    let current = etag(&native).await.expect("an etag");
    let user = r#"{"user":{"id":"u-1","email":"a@example.com","attributes":{"plan":"pro"}}}"#;
    let gets = [
        "/api/flags",
        "/api/flags?user_id=u-1",
        "/api/flags/enabled-flag",
        "/api/flags/no-such-flag",
        "/api/flags/bad%20key",
        "/api/v1/sdk/flags",
        "/api/v1/sdk/flags?withReasons=true",
        "/api/v1/sdk/flags?withReasons=true&user_id=u-1",
        "/health",
        "/live",
        "/ready",
        "/",
        "/demo.css",
        "/demo.js",
        "/rollgate-proxy-client.js",
        "/no/such/route",
        "/api/flags?attr.x=",
    ];
    let posts: [(&str, &str); 12] = [
        ("/api/flags", user),
        ("/api/flags", "{not json"),
        (
            "/ofrep/v1/evaluate/flags/enabled-flag",
            r#"{"context":{"targetingKey":"u-1"}}"#,
        ),
        ("/ofrep/v1/evaluate/flags/no-such-flag", "{}"),
        ("/ofrep/v1/evaluate/flags/enabled-flag", "{"),
        ("/ofrep/v1/evaluate/flags", "{}"),
        (
            "/ofrep/v1/evaluate/flags",
            r#"{"context":{"targetingKey":"u-1"}}"#,
        ),
        ("/api/v1/sdk/identify", user),
        (
            "/api/v1/sdk/events",
            r#"{"events":[{"flagKey":"enabled-flag","eventName":"e","userId":"u-1","timestamp":"2026-01-01T00:00:00Z"}]}"#,
        ),
        (
            "/api/v1/sdk/telemetry",
            r#"{"evaluations":{"enabled-flag":{"total":3,"true":1,"false":2}},"period_ms":60000}"#,
        ),
        ("/api/v1/sdk/events", "[]"),
        ("/api/flags/enabled-flag", "{}"),
    ];
    let mut diffs = Vec::new();
    for path in gets {
        let [a, b] = [native.url(path), edge.url(path)].map(|u| http().get(u));
        let (a, b) = (seen(a).await, seen(b).await);
        if a != b {
            diffs.push(format!("GET {path}\n  native {a:?}\n  worker {b:?}"));
        }
    }
    for (path, body) in posts {
        let [a, b] = [native.url(path), edge.url(path)].map(|u| {
            http()
                .post(u)
                .header("content-type", "application/json")
                .body(body)
        });
        let (a, b) = (seen(a).await, seen(b).await);
        if a != b {
            diffs.push(format!(
                "POST {path} {body}\n  native {a:?}\n  worker {b:?}"
            ));
        }
    }
    for path in ["/api/flags", "/api/v1/sdk/flags"] {
        let [a, b] = [native.url(path), edge.url(path)]
            .map(|u| http().get(u).header("if-none-match", current.clone()));
        let (a, b) = (seen(a).await, seen(b).await);
        assert_eq!(a.status, 304, "{path}: {a:?}");
        if a != b {
            diffs.push(format!(
                "GET {path} If-None-Match\n  native {a:?}\n  worker {b:?}"
            ));
        }
    }
    // Health: the same report but for per-replica counters and ages.
    let health = |p: &ProxyHandle| {
        let url = p.url("/api/health");
        async move {
            let mut h = must_get(&url).await.expect_json(200);
            let obj = h.as_object_mut().expect("an object");
            for per_replica in ["cache", "dataAgeMs", "sseClients", "revision"] {
                assert!(obj.remove(per_replica).is_some(), "{per_replica} in {h}");
            }
            h
        }
    };
    let (a, b) = (health(&native).await, health(&edge).await);
    if a != b {
        diffs.push(format!("GET /api/health\n  native {a}\n  worker {b}"));
    }
    let health_keys = |p: &ProxyHandle| {
        let url = p.url("/api/health");
        async move { key_paths(&must_get(&url).await.expect_json(200)) }
    };
    let (a, b) = (health_keys(&native).await, health_keys(&edge).await);
    if a != b {
        diffs.push(format!(
            "GET /api/health keys\n  native only {:?}\n  worker only {:?}",
            a.difference(&b).collect::<Vec<_>>(),
            b.difference(&a).collect::<Vec<_>>()
        ));
    }
    diffs.extend(metric_diffs(&metrics(&native).await, &metrics(&edge).await));

    // Streams: the same first frames, then the same frames for a change.
    let paths = [
        "/api/stream",
        "/api/v1/sdk/stream",
        "/ofrep/v1/sse",
        "/api/stream?user_id=u-1",
        "/api/v1/sdk/stream?user_id=u-1",
    ];
    let mut streams = Vec::new();
    for path in paths {
        let pair = [sse(&native.url(path)).await, sse(&edge.url(path)).await];
        streams.push((path, pair));
    }
    for (path, [a, b]) in &mut streams {
        let (a, b) = (
            event(&next_event(a, Duration::from_secs(5)).await),
            event(&next_event(b, Duration::from_secs(5)).await),
        );
        if a != b {
            diffs.push(format!("SSE {path} first\n  native {a:?}\n  worker {b:?}"));
        }
    }
    mock.set_flag("parity-change", true);
    for (path, [a, b]) in &mut streams {
        let (a, b) = (
            event(&next_event(a, Duration::from_secs(5)).await),
            event(&next_event(b, Duration::from_secs(5)).await),
        );
        if a != b {
            diffs.push(format!("SSE {path} change\n  native {a:?}\n  worker {b:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} difference(s) between the native server and the Worker:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// The differences between two `/api/metrics` in family names, TYPE, HELP and label names.
fn metric_diffs(
    native: &std::collections::BTreeMap<String, Family>,
    worker: &std::collections::BTreeMap<String, Family>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    let only = |a: &std::collections::BTreeMap<String, Family>,
                b: &std::collections::BTreeMap<String, Family>| {
        a.keys()
            .filter(|k| !b.contains_key(*k))
            .cloned()
            .collect::<Vec<_>>()
    };
    let (mut n, mut w) = (only(native, worker), only(worker, native));
    // The one family only the Worker can have: its clients per SSE shard object (the native
    // server has no shards). And the snapshot writes, which the Worker always makes and the
    // native server only with `--snapshot-file` (their TYPE and HELP are compared below when
    // both have them). Everything else must match.
    const ONLY_WHERE_PERSISTED: [&str; 2] = [
        "rollgate_proxy_snapshot_persisted_revision",
        "rollgate_proxy_snapshot_persist_failures_total",
    ];
    w.retain(|name| {
        name != "rollgate_proxy_sse_shard_clients" && !ONLY_WHERE_PERSISTED.contains(&name.as_str())
    });
    n.retain(|name| !ONLY_WHERE_PERSISTED.contains(&name.as_str()));
    if !n.is_empty() || !w.is_empty() {
        diffs.push(format!(
            "/api/metrics families\n  native only {n:?}\n  worker only {w:?}"
        ));
    }
    for (name, a) in native {
        let Some(b) = worker.get(name) else { continue };
        if (&a.kind, &a.help) != (&b.kind, &b.help) {
            diffs.push(format!(
                "/api/metrics {name}: TYPE/HELP native {:?}/{:?} worker {:?}/{:?}",
                a.kind, a.help, b.kind, b.help
            ));
        }
        if !a.samples.is_empty() && !b.samples.is_empty() && a.label_names() != b.label_names() {
            diffs.push(format!(
                "/api/metrics {name}: labels native {:?} worker {:?}",
                a.label_names(),
                b.label_names()
            ));
        }
    }
    diffs
}
