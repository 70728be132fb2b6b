//! Compressed polling bodies of a large flag set: the coding `Accept-Encoding` asks for, the same
//! JSON once decoded, `Vary`, per-coding ETags and 304s across codings; SSE stays uncompressed.

use std::io::Read;
use std::time::Duration;

use rollgate_proxy_tests::mock::{FlagSet, MockConfig};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(large_bodies_in_the_asked_coding),
        scenario!(streams_and_small_bodies_stay_identity),
    ]
}

/// 2,000 flags with realistic keys: ~100 KB of JSON, the size the feature is for.
fn large_set() -> MockConfig {
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

/// SSE frames are never compressed, whatever the client accepts; a tiny answer (one flag)
/// stays identity (native; the Worker's runtime may compress it, and it must still decode).
async fn streams_and_small_bodies_stay_identity() {
    let env = Env::with(large_set(), |_| {}).await;
    for path in ["/api/stream", "/api/v1/sdk/stream"] {
        let resp = http()
            .get(env.url(path))
            .header("accept-encoding", "gzip, br")
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        assert!(
            resp.headers().get("content-encoding").is_none(),
            "{path}: a stream is never compressed"
        );
        let mut client = sse_req(
            http()
                .get(env.url(path))
                .header("accept-encoding", "gzip, br"),
        )
        .await;
        let event = next_event(&mut client, Duration::from_secs(10)).await;
        assert!(
            event.data.contains("feature-1999"),
            "{path}: readable frame"
        );
    }
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
