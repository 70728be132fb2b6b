//! Keys of the Workers Cache API entries that answer polling requests at the edge.
//!
//! Two kinds of entry per environment: a tiny *pointer* to the current snapshot's event id
//! (`<revision>-<hash>`), trusted for `ROLLGATE_PROXY_EDGE_CACHE_TTL`, and the *answers* keyed by that event id,
//! route, query and body. A change upstream produces a new event id, so after at most one
//! pointer TTL every edge location asks for (and caches) the new answers; polling never sends
//! every request to the one relay object.

use rollgate_proxy_core::render;

/// Origin of the synthetic cache URLs (never fetched; the Cache API needs an http(s) URL).
pub const CACHE_ORIGIN: &str = "https://rollgate-proxy.cache";

/// The pointer entry of `environment`.
pub fn pointer_key(environment: &str) -> String {
    format!("{CACHE_ORIGIN}/{}/current", encode_segment(environment))
}

/// The entry holding the persisted snapshot of `event_id` (immutable: the id names its content),
/// from which the stateless Worker answers rules mode in the isolate.
pub fn snapshot_key(environment: &str, event_id: &str) -> String {
    format!(
        "{CACHE_ORIGIN}/{}/snapshot/{}",
        encode_segment(environment),
        encode_segment(event_id)
    )
}

/// The answer entry for one request at snapshot `event_id`. The client key (`token`) is left
/// out of the key: it does not change the answer, and keys never reach a cache URL.
pub fn answer_key(
    environment: &str,
    event_id: &str,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
) -> String {
    let query: Vec<String> = query
        .trim_start_matches('?')
        .split('&')
        .filter(|pair| !pair.is_empty() && !pair.starts_with("token=") && *pair != "token")
        .map(str::to_owned)
        .collect();
    let body_hash = if body.is_empty() {
        String::from("-")
    } else {
        render::content_hash(body)
    };
    format!(
        "{CACHE_ORIGIN}/{}/{}/{method}{path}?q={}&b={body_hash}",
        encode_segment(environment),
        encode_segment(event_id),
        encode_segment(&query.join("&")),
    )
}

/// Percent-encodes everything but unreserved characters, so any input gives a valid URL.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_snapshots_routes_queries_and_bodies_but_not_tokens() {
        let a = answer_key(
            "default",
            "3-abc",
            "GET",
            "/api/flags",
            "user_id=u1&token=k",
            b"",
        );
        let b = answer_key("default", "3-abc", "GET", "/api/flags", "user_id=u1", b"");
        assert_eq!(a, b);
        assert!(!a.contains("token"));
        assert_ne!(
            a,
            answer_key("default", "4-def", "GET", "/api/flags", "user_id=u1", b"")
        );
        assert_ne!(
            a,
            answer_key("default", "3-abc", "GET", "/api/flags", "user_id=u2", b"")
        );
        assert_ne!(
            a,
            answer_key("default", "3-abc", "POST", "/api/flags", "user_id=u1", b"")
        );
        assert_ne!(
            answer_key(
                "default",
                "3-abc",
                "POST",
                "/api/flags",
                "",
                b"{\"user\":{\"id\":\"a\"}}"
            ),
            answer_key(
                "default",
                "3-abc",
                "POST",
                "/api/flags",
                "",
                b"{\"user\":{\"id\":\"b\"}}"
            )
        );
        assert_ne!(
            a,
            answer_key("staging", "3-abc", "GET", "/api/flags", "user_id=u1", b"")
        );
        assert!(a.starts_with(
            "https://rollgate-proxy.cache/default/3-abc/GET/api/flags?q=user_id%3Du1&b=-"
        ));
        assert_eq!(
            snapshot_key("a b", "3-abc~0"),
            "https://rollgate-proxy.cache/a%20b/snapshot/3-abc~0"
        );
        assert_ne!(
            snapshot_key("default", "3-abc~0"),
            snapshot_key("default", "3-abc~1")
        );
        assert_eq!(
            pointer_key("a b"),
            "https://rollgate-proxy.cache/a%20b/current"
        );
    }
}
