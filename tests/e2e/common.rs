//! Shared scenario plumbing: a mock + proxy pair, plain HTTP helpers and bounded polling.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rollgate_proxy_tests::mock::{MockConfig, MockUpstream};
use rollgate_proxy_tests::sse::{SseClient, SseError, SseEvent, SseItem, test_http_client};
use rollgate_proxy_tests::target::{self, ProxyConfig, ProxyHandle, TargetKind};
use serde_json::Value;

/// The server API key every scenario uses: distinctive, so a leak is found by a substring search.
pub(crate) const SERVER_KEY: &str = "rg_server_E2E-s3cr3t-7f3a9c1d5b2e";

/// The selected target (panics on a bad `E2E_TARGET`, which fails every scenario loudly).
pub(crate) fn target() -> TargetKind {
    TargetKind::from_env().unwrap_or_else(|e| panic!("{e}"))
}

/// A mock started with `SERVER_KEY` and the `basic` scenario (or the given config).
pub(crate) async fn mock(config: MockConfig) -> MockUpstream {
    MockUpstream::start(config.api_key(SERVER_KEY))
        .await
        .expect("mock starts")
}

/// The proxy config every scenario starts from: upstream mode against `mock`, persistence off,
/// a 2 s refresh interval (the per-user cache TTL too).
pub(crate) fn proxy_config(mock: &MockUpstream) -> ProxyConfig {
    ProxyConfig {
        refresh_interval: Some(Duration::from_secs(2)),
        ..ProxyConfig::upstream(mock.base_url(), SERVER_KEY)
    }
}

/// Starts the proxy (panics with its logs if it cannot).
pub(crate) async fn start_proxy(config: ProxyConfig) -> ProxyHandle {
    match target::start(target(), config).await {
        Ok(p) => p,
        Err(e) => panic!("proxy did not start: {e:#}"),
    }
}

/// A mock and a proxy in front of it, ready (first snapshot served).
pub(crate) struct Env {
    pub(crate) mock: MockUpstream,
    pub(crate) proxy: ProxyHandle,
}

impl Env {
    /// `basic` mock, default proxy config.
    pub(crate) async fn basic() -> Self {
        Self::with(MockConfig::basic(), |_| {}).await
    }

    /// A mock from `mock_config`, the default proxy config changed by `tweak`; waits for `/ready`.
    pub(crate) async fn with(
        mock_config: MockConfig,
        tweak: impl FnOnce(&mut ProxyConfig),
    ) -> Self {
        let mock = mock(mock_config).await;
        let mut config = proxy_config(&mock);
        tweak(&mut config);
        let proxy = start_proxy(config).await;
        wait_ready(&proxy).await;
        Self { mock, proxy }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        self.proxy.url(path)
    }
}

/// Polls `/ready` until 200 (at most 15 s).
pub(crate) async fn wait_ready(proxy: &ProxyHandle) {
    let url = proxy.url("/ready");
    eventually("the proxy to become ready", Duration::from_secs(15), || {
        let url = url.clone();
        async move { (get(&url).await.ok()?.status == 200).then_some(()) }
    })
    .await;
}

/// A fully read response.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    /// Asserts status and `application/json`, returns the body.
    pub(crate) fn expect_json(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "status; body {:?}", self.text());
        let ct = self.header("content-type").unwrap_or_default();
        assert!(ct.starts_with("application/json"), "content-type {ct:?}");
        self.json()
    }

    /// Asserts a documented error: status, JSON `{"error":{"code","message"}}`.
    pub(crate) fn expect_error(&self, status: u16, code: &str) {
        let body = self.expect_json(status);
        assert_eq!(body["error"]["code"], code, "error body {body}");
        assert!(body["error"]["message"].is_string(), "error body {body}");
    }
}

async fn read(resp: reqwest::Response) -> Result<Resp, reqwest::Error> {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await?;
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// Sends a request and reads the whole answer (at most 10 s).
pub(crate) async fn send(req: reqwest::RequestBuilder) -> Result<Resp, reqwest::Error> {
    read(req.timeout(Duration::from_secs(10)).send().await?).await
}

pub(crate) fn http() -> reqwest::Client {
    test_http_client()
}

pub(crate) async fn get(url: &str) -> Result<Resp, reqwest::Error> {
    send(http().get(url)).await
}

/// GET that must succeed at the HTTP level.
pub(crate) async fn must_get(url: &str) -> Resp {
    get(url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// POST with a JSON body that must succeed at the HTTP level.
pub(crate) async fn must_post(url: &str, body: impl Into<reqwest::Body>) -> Resp {
    send(
        http()
            .post(url)
            .header("content-type", "application/json")
            .body(body),
    )
    .await
    .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// `GET /api/flags` `flags` object.
pub(crate) async fn served_flags(proxy: &ProxyHandle, query: &str) -> Value {
    must_get(&proxy.url(&format!("/api/flags{query}")))
        .await
        .expect_json(200)["flags"]
        .clone()
}

/// Polls `f` every 25 ms until it returns `Some`, panicking after `timeout` with `what`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(v)) = tokio::time::timeout(left.max(Duration::from_millis(50)), f()).await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `/api/flags` serves `key` = `value` (anonymous).
pub(crate) async fn wait_served(proxy: &ProxyHandle, key: &str, value: bool, timeout: Duration) {
    let url = proxy.url("/api/flags");
    eventually(&format!("/api/flags {key}={value}"), timeout, || {
        let url = url.clone();
        async move {
            let body = get(&url).await.ok()?;
            (body.status == 200 && body.json()["flags"][key] == value).then_some(())
        }
    })
    .await;
}

/// Opens an SSE stream (panics on failure).
pub(crate) async fn sse(url: &str) -> SseClient {
    SseClient::connect(url, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("SSE {url}: {e}"))
}

/// Opens an SSE stream from a prepared request (panics on failure).
pub(crate) async fn sse_req(req: reqwest::RequestBuilder) -> SseClient {
    SseClient::open(req, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("SSE: {e}"))
}

/// The next event (comments skipped), panicking after `timeout`.
pub(crate) async fn next_event(client: &mut SseClient, timeout: Duration) -> SseEvent {
    client
        .next_event(timeout)
        .await
        .unwrap_or_else(|e| panic!("no SSE event within {timeout:?}: {e}"))
}

/// Reads events until one satisfies `pred`, within `timeout` in total.
pub(crate) async fn event_where(
    client: &mut SseClient,
    timeout: Duration,
    mut pred: impl FnMut(&SseEvent) -> bool,
) -> SseEvent {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left).await {
            Ok(ev) if pred(&ev) => return ev,
            Ok(_) => {}
            Err(e) => panic!("no matching SSE event within {timeout:?}: {e}"),
        }
    }
}

/// Reads items for `window`; returns the events seen (comments dropped) and whether any
/// comment arrived.
pub(crate) async fn collect_for(
    client: &mut SseClient,
    window: Duration,
) -> (Vec<SseEvent>, usize) {
    let deadline = Instant::now() + window;
    let (mut events, mut comments) = (Vec::new(), 0);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match client.next_item(left).await {
            Ok(SseItem::Event(ev)) => events.push(ev),
            Ok(SseItem::Comment(_)) => comments += 1,
            Err(SseError::Timeout(_)) => break,
            Err(e) => panic!("stream failed: {e}"),
        }
    }
    (events, comments)
}

/// A JSON object of booleans from pairs.
pub(crate) fn bools(pairs: &[(&str, bool)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::Bool(*v)))
            .collect(),
    )
}

/// One metric family of a Prometheus text exposition.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Family {
    /// `# TYPE` (`counter`, `gauge`, `histogram`, ...); empty when the family has none.
    pub(crate) kind: String,
    /// The `# HELP` text, if any.
    pub(crate) help: Option<String>,
    /// Every sample: its full name (`_bucket`, `_sum` ... for histograms), labels, value.
    pub(crate) samples: Vec<(String, std::collections::BTreeMap<String, String>, f64)>,
}

impl Family {
    /// The label names used by any sample (`le` and `quantile` excluded).
    pub(crate) fn label_names(&self) -> std::collections::BTreeSet<String> {
        self.samples
            .iter()
            .flat_map(|(_, labels, _)| labels.keys())
            .filter(|k| *k != "le" && *k != "quantile")
            .cloned()
            .collect()
    }

    /// The value of the sample named like the family with exactly `labels`.
    pub(crate) fn value(&self, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.iter().find_map(|(_, l, v)| {
            (l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, w)| l.get(*k).map(String::as_str) == Some(*w)))
            .then_some(*v)
        })
    }
}

/// Parses Prometheus text format into families by name (panics on a malformed line, naming it).
pub(crate) fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, Family> {
    use std::collections::BTreeMap;
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            families.entry(name.to_owned()).or_default().kind = kind.trim().to_owned();
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_owned()).or_default().help = Some(text.trim().to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in sample line {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                (name.to_owned(), parse_labels(body, line))
            }
        };
        // A histogram's or summary's samples belong to the family without the suffix.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                families
                    .get(base)
                    .is_some_and(|f| matches!(f.kind.as_str(), "histogram" | "summary"))
                    .then(|| base.to_owned())
            })
            .unwrap_or_else(|| name.clone());
        families
            .entry(family)
            .or_default()
            .samples
            .push((name, labels, value));
    }
    families
}

fn parse_labels(body: &str, line: &str) -> std::collections::BTreeMap<String, String> {
    let mut labels = std::collections::BTreeMap::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label in {line:?}"));
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.unwrap_or_else(|| panic!("unterminated label value in {line:?}"));
        labels.insert(name.trim().trim_start_matches(',').trim().to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',').trim();
    }
    labels
}

/// `GET /api/metrics`, parsed.
pub(crate) async fn metrics(proxy: &ProxyHandle) -> std::collections::BTreeMap<String, Family> {
    let resp = must_get(&proxy.url("/api/metrics")).await;
    assert_eq!(resp.status, 200, "/api/metrics: {}", resp.text());
    parse_metrics(&resp.text())
}

/// Every key path of a JSON value (`a`, `a.b`, `list[].c`): objects recursively, arrays by
/// their elements' keys.
pub(crate) fn key_paths(value: &Value) -> std::collections::BTreeSet<String> {
    fn walk(value: &Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    out.insert(path.clone());
                    walk(v, &path, out);
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, &format!("{prefix}[]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(value, "", &mut out);
    out
}

/// The sum of a Prometheus metric's samples in `/api/metrics` whose labels contain `labels`
/// (`""` for all), or `None` when the proxy does not answer or has no such metric.
pub(crate) async fn metric_sum(proxy: &ProxyHandle, name: &str, labels: &str) -> Option<f64> {
    let text = get(&proxy.url("/api/metrics")).await.ok()?.text();
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) || !rest.contains(labels) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// Waits until [`metric_sum`] of `name` with `labels` reaches `min`.
pub(crate) async fn wait_metric_at_least(
    proxy: &ProxyHandle,
    name: &str,
    labels: &str,
    min: f64,
    timeout: Duration,
) {
    eventually(&format!("{name}{{{labels}}} >= {min}"), timeout, || async {
        (metric_sum(proxy, name, labels).await? >= min).then_some(())
    })
    .await;
}
