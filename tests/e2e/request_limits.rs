//! What the README promises for over-long URIs and slow request heads (native: the HTTP layer
//! is ours; on the Worker, Cloudflare's front end owns request-head limits and timeouts).

use std::time::Duration;

use rollgate_proxy_tests::mock::MockConfig;
use rollgate_proxy_tests::target::TargetKind;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![scenario!(long_uris_and_slow_heads_get_what_the_readme_says)]
}

async fn long_uris_and_slow_heads_get_what_the_readme_says() {
    if target() == TargetKind::Edge {
        println!(
            "skipped on the Worker: Cloudflare's front end, not the Worker, limits request heads"
        );
        return;
    }
    let env = Env::with(MockConfig::basic(), |c| {
        c.extra_args = vec!["--request-timeout".into(), "1s".into()];
    })
    .await;
    // Over --max-uri-length (8192) but inside the head buffer: 414 with the JSON error.
    let long = format!("/api/flags?pad={}", "x".repeat(9_000));
    must_get(&env.url(&long))
        .await
        .expect_error(414, "URI_TOO_LONG");
    // Past the head buffer (max-header-bytes + max-uri-length + 4096): 431, empty body.
    let (status_line, rest) = raw(
        env.proxy.port(),
        format!(
            "GET /api/flags?pad={} HTTP/1.1\r\nHost: x\r\n\r\n",
            "x".repeat(100_000)
        )
        .as_bytes(),
    )
    .await;
    assert!(
        status_line.starts_with("HTTP/1.1 431"),
        "{status_line:?} {rest:?}"
    );
    assert!(
        rest.to_ascii_lowercase().contains("content-length: 0"),
        "{rest:?}"
    );
    // A head that never completes: the connection is closed without a response.
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", env.proxy.port()))
        .await
        .expect("connect");
    socket
        .write_all(b"GET /api/flags HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut got))
        .await
        .expect("the proxy closes a connection whose head does not complete");
    assert!(read.is_ok() || got.is_empty(), "{read:?}");
    assert!(
        got.is_empty(),
        "no response to an incomplete head: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Sends `request` on a new connection and reads until the peer closes (at most 20 s):
/// the status line and the rest.
async fn raw(port: u16, request: &[u8]) -> (String, String) {
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    // The peer may answer and close before it has read everything: a failed write is fine.
    let _ = socket.write_all(request).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    match text.split_once("\r\n") {
        Some((line, rest)) => (line.to_owned(), rest.chars().take(500).collect()),
        None => (text, String::new()),
    }
}
