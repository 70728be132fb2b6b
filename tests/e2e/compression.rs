//! Compressed polling bodies of a large flag set: the coding `Accept-Encoding` asks for, the same
//! JSON once decoded, `Vary`, per-coding ETags and 304s across codings; event streams coded
//! from frames compressed once each.

use std::io::Read;
use std::time::Duration;

use rollgate_proxy_tests::mock::{FlagSet, MockConfig};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(large_bodies_in_the_asked_coding),
        scenario!(large_streams_are_gzip_coded_when_accepted),
    ]
}

/// 2,000 flags with realistic keys: ~100 KB of JSON, the size the feature is for.
pub(crate) fn large_set() -> MockConfig {
    MockConfig::basic().flags(FlagSet::from_bools((0..2000).map(|i| {
        (
            format!("team-{}-feature-{i:04}-rollout", i % 17),
            i % 3 == 0,
        )
    })))
}

async fn get_with(url: &str, headers: &[(&str, &str)]) -> Resp {
    let mut request = http().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    match send(request).await {
        Ok(resp) => resp,
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// The body decoded as its `Content-Encoding` says (identity when absent).
fn decoded(resp: &Resp) -> Vec<u8> {
    let mut out = Vec::new();
    match resp.header("content-encoding") {
        None | Some("identity") => out.extend_from_slice(&resp.body),
        Some("gzip") => {
            flate2::read::GzDecoder::new(&resp.body[..])
                .read_to_end(&mut out)
                .expect("valid gzip");
        }
        Some("br") => {
            brotli::Decompressor::new(&resp.body[..], 4096)
                .read_to_end(&mut out)
                .expect("valid br");
        }
        Some(other) => panic!("unexpected Content-Encoding {other:?}"),
    }
    out
}

fn varies_on_encoding(resp: &Resp) -> bool {
    resp.headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case("accept-encoding"))
}

/// Every shared polling route of a 2,000-flag set, asked identity, gzip and br: the decoded
/// bytes are the identity bytes. Native (which precompresses) answers in the asked coding with
/// `Vary`, a suffixed ETag and ~10× fewer bytes, and any variant's ETag revalidates to 304
/// whatever coding is asked next. The Worker leaves compression to Cloudflare's edge (local
/// workerd may or may not compress): there only correctness of what comes back is checked.
async fn large_bodies_in_the_asked_coding() {
    let env = Env::with(large_set(), |_| {}).await;
    let native = target().is_process();
    for path in [
        "/api/flags",
        "/api/v1/sdk/flags",
        "/api/v1/sdk/flags?withReasons=true",
    ] {
        let url = env.url(path);
        let identity = get_with(&url, &[]).await;
        assert_eq!(identity.status, 200, "{path}");
        assert_eq!(identity.header("content-encoding"), None, "{path}");
        assert!(identity.body.len() > 60_000, "{path}: a large set");
        let etag = identity.header("etag").expect("etag").to_owned();
        if native {
            assert!(varies_on_encoding(&identity), "{path}: Vary on identity");
        }
        for (accept, coding, suffix) in [("gzip", "gzip", "-gz"), ("br", "br", "-br")] {
            let resp = get_with(&url, &[("accept-encoding", accept)]).await;
            assert_eq!(resp.status, 200, "{path} {accept}");
            assert_eq!(
                decoded(&resp),
                identity.body.to_vec(),
                "{path} {accept}: decoded body differs from identity"
            );
            let tag = resp.header("etag").expect("etag").to_owned();
            if native {
                assert_eq!(resp.header("content-encoding"), Some(coding), "{path}");
                assert!(varies_on_encoding(&resp), "{path} {accept}: Vary");
                assert!(
                    resp.body.len() * 5 < identity.body.len(),
                    "{path} {accept}: {} of {} bytes",
                    resp.body.len(),
                    identity.body.len()
                );
                let expected = format!("{}{suffix}\"", etag.trim_end_matches('"'));
                assert_eq!(tag, expected, "{path} {accept}");
            }
            // Revalidating with the tag received gives 304 in every coding.
            let codings: &[&str] = if native {
                &["", "gzip", "br", "gzip, deflate, br"]
            } else {
                &[accept]
            };
            for again in codings {
                let mut headers = vec![("if-none-match", tag.as_str())];
                if !again.is_empty() {
                    headers.push(("accept-encoding", again));
                }
                let revalidated = get_with(&url, &headers).await;
                assert_eq!(revalidated.status, 304, "{path}: {tag} asked {again:?}");
                assert!(revalidated.body.is_empty(), "{path}");
                if native {
                    assert!(varies_on_encoding(&revalidated), "{path}: Vary on 304");
                }
            }
        }
        // Both codings refused: identity, with the identity ETag.
        let refused = get_with(&url, &[("accept-encoding", "br;q=0, gzip;q=0")]).await;
        assert_eq!(refused.status, 200);
        assert_eq!(refused.header("content-encoding"), None, "{path}: refused");
        assert_eq!(refused.body, identity.body, "{path}: refused");
        assert_eq!(refused.header("etag"), Some(etag.as_str()), "{path}");
        // q-values: gzip preferred over br.
        let weighted = get_with(&url, &[("accept-encoding", "br;q=0.5, gzip;q=0.9")]).await;
        assert_eq!(decoded(&weighted), identity.body.to_vec(), "{path}");
        if native {
            assert_eq!(weighted.header("content-encoding"), Some("gzip"), "{path}");
        }
    }
}

/// A gzip-coded event stream as it arrives: the raw bytes, and the frames decoded so far.
struct CodedStream {
    response: reqwest::Response,
    raw: Vec<u8>,
    inflater: flate2::Decompress,
    /// Raw bytes after the gzip header not taken by the inflater yet.
    fed: usize,
    text: String,
    ended: bool,
}

impl CodedStream {
    async fn open(url: &str) -> Self {
        let response = http()
            .get(url)
            .header("accept", "text/event-stream")
            .header("accept-encoding", "gzip, deflate, br")
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(response.status().as_u16(), 200, "{url}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(header("content-encoding").as_deref(), Some("gzip"), "{url}");
        assert_eq!(header("vary").as_deref(), Some("accept-encoding"), "{url}");
        assert_eq!(
            header("content-type").as_deref(),
            Some("text/event-stream"),
            "{url}"
        );
        Self {
            response,
            raw: Vec::new(),
            inflater: flate2::Decompress::new(false),
            fed: 10,
            text: String::new(),
            ended: false,
        }
    }

    /// Reads until the decoded text satisfies `done` (within `timeout`).
    async fn until(&mut self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) {
        let end = tokio::time::Instant::now() + timeout;
        while !done(&self.text) {
            assert!(
                !self.ended,
                "{what}: the stream ended first; got {:?}",
                self.tail()
            );
            let chunk = tokio::time::timeout_at(end, self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("{what}: not within {timeout:?}; got {:?}", self.tail()))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            match chunk {
                Some(chunk) => self.take(&chunk),
                None => self.ended = true,
            }
        }
    }

    /// Decodes what arrived: each segment ends byte-aligned, so a frame decodes in full as
    /// soon as its bytes are here.
    fn take(&mut self, chunk: &[u8]) {
        self.raw.extend_from_slice(chunk);
        if self.raw.len() < 10 {
            return;
        }
        assert_eq!(
            &self.raw[..3],
            &[0x1f, 0x8b, 8],
            "a gzip member header first"
        );
        while self.fed < self.raw.len() {
            let mut out = Vec::with_capacity(256 * 1024);
            let before = self.inflater.total_in();
            let status = self
                .inflater
                .decompress_vec(
                    &self.raw[self.fed..],
                    &mut out,
                    flate2::FlushDecompress::Sync,
                )
                .expect("valid deflate data");
            self.fed += usize::try_from(self.inflater.total_in() - before).expect("fits");
            self.text
                .push_str(std::str::from_utf8(&out).expect("UTF-8 frames"));
            if status == flate2::Status::StreamEnd || out.is_empty() {
                break;
            }
        }
    }

    /// Reads until `done` holds or the body ends (within `timeout`).
    async fn read_until_end_or(&mut self, timeout: Duration, done: impl Fn(&str) -> bool) {
        let end = tokio::time::Instant::now() + timeout;
        while !self.ended && !done(&self.text) {
            let chunk = tokio::time::timeout_at(end, self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("neither the end nor the text within {timeout:?}"))
                .unwrap_or_else(|e| panic!("the coded stream broke: {e}"));
            match chunk {
                Some(chunk) => self.take(&chunk),
                None => self.ended = true,
            }
        }
    }

    fn tail(&self) -> String {
        let start = self.text.len().saturating_sub(200);
        self.text.get(start..).unwrap_or_default().to_owned()
    }

    /// The flag frames decoded so far (what follows the `retry:` preamble, split at blank
    /// lines, comments left out).
    fn frames(&self) -> Vec<&str> {
        self.text
            .split_inclusive("\n\n")
            .filter(|frame| !frame.starts_with("retry:") && !frame.starts_with(':'))
            .collect()
    }
}

/// A large set's event streams are gzip-coded for a client that accepts it: each frame
/// compressed once and shared, so the body decodes as it arrives, frame by frame, to exactly
/// the identity stream's frames; a change arrives the same way; the clean end at max age
/// carries the gzip trailer (the whole body checks against its CRC). OFREP's notifications and
/// a small answer stay identity.
async fn large_streams_are_gzip_coded_when_accepted() {
    let env = Env::with(large_set(), |c| {
        // Long enough that a loaded machine sends every first frame well before it.
        c.sse_max_age = Some(Duration::from_secs(10));
    })
    .await;
    // Served once first, so every target decides the coding knowing the set's size.
    must_get(&env.url("/api/flags")).await;
    let first = |text: &str| text.contains("feature-1999") && text.ends_with("\n\n");
    let mut streams = Vec::new();
    // The third is a per-user stream: its frame is coded for that client alone.
    for (path, marker) in [
        ("/api/stream", "event: flags"),
        ("/api/v1/sdk/stream", "event: init"),
        ("/api/stream?user_id=gzip-user", "event: flags"),
    ] {
        let mut coded = CodedStream::open(&env.url(path)).await;
        coded.until(path, Duration::from_secs(15), first).await;
        let mut plain = sse(&env.url(path)).await;
        assert_eq!(
            plain.header("content-encoding"),
            None,
            "{path}: not asked for, not coded"
        );
        next_event(&mut plain, Duration::from_secs(10)).await;
        let plain_text = String::from_utf8_lossy(plain.raw()).into_owned();
        let plain_frame = plain_text
            .split_inclusive("\n\n")
            .find(|frame| frame.starts_with(marker))
            .expect("the identity stream's first frame")
            .to_owned();
        assert_eq!(
            coded.frames().first().copied(),
            Some(plain_frame.as_str()),
            "{path}"
        );
        assert!(
            coded.raw.len() * 4 < plain_frame.len(),
            "{path}: {} coded bytes for a {} B frame",
            coded.raw.len(),
            plain_frame.len()
        );
        streams.push((path, coded));
    }

    // A change reaches a coded stream as one more segment. A stream that reached its max age
    // meanwhile is reopened, as a client would (it then starts with the changed set).
    env.mock.set_flag("team-1-feature-0001-rollout", true);
    let changed = |text: &str| text.contains("\"team-1-feature-0001-rollout\":true");
    let mut watcher = CodedStream::open(&env.url("/api/stream")).await;
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        watcher
            .read_until_end_or(Duration::from_secs(30), changed)
            .await;
        if changed(&watcher.text) {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "the change within 30 s");
        watcher = CodedStream::open(&env.url("/api/stream")).await;
    }

    // Max age: each body ends cleanly, with the trailer: one whole, CRC-checked gzip member.
    for (path, mut coded) in streams {
        coded
            .read_until_end_or(Duration::from_secs(30), |_| false)
            .await;
        assert!(coded.ended, "{path}: ended by the max age");
        let mut whole = Vec::new();
        flate2::read::GzDecoder::new(&coded.raw[..])
            .read_to_end(&mut whole)
            .unwrap_or_else(|e| panic!("{path}: a complete gzip body: {e}"));
        assert_eq!(String::from_utf8_lossy(&whole), coded.text, "{path}");
    }

    // OFREP's notifications are small whatever the set: identity.
    let ofrep = http()
        .get(env.url("/ofrep/v1/sse"))
        .header("accept-encoding", "gzip, br")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("GET /ofrep/v1/sse");
    assert_eq!(ofrep.status().as_u16(), 200);
    assert!(
        ofrep.headers().get("content-encoding").is_none(),
        "OFREP stream: identity"
    );
    drop(ofrep);

    let one = get_with(
        &env.url("/api/flags/team-0-feature-0000-rollout"),
        &[("accept-encoding", "gzip, br")],
    )
    .await;
    if target().is_process() {
        assert_eq!(one.header("content-encoding"), None);
    }
    // workerd (the Worker's local runtime) may compress any answer itself: check what came back.
    let body: serde_json::Value = serde_json::from_slice(&decoded(&one)).expect("JSON");
    assert_eq!(body["enabled"], true);
}
