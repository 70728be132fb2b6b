//! CORS as the native server does it: an origin allow-list, preflights that never need a client
//! key, and `ETag` exposed so browsers can revalidate.

use crate::config::CorsOrigins;

/// Headers a browser may send on a cross-origin request: the native server's list, including
/// the browser SDK's tracing headers (protocol doc §1.1), or its preflights would fail here.
pub const ALLOW_HEADERS: &str = "authorization,content-type,if-none-match,cache-control,x-api-key,\
last-event-id,x-request-id,x-trace-id,x-span-id,traceparent,x-sdk-name,x-sdk-version";
/// Methods of the API.
pub const ALLOW_METHODS: &str = "GET,HEAD,POST,OPTIONS";
/// Response headers scripts may read.
pub const EXPOSE_HEADERS: &str = "etag,retry-after,x-request-id";
/// How long a browser may cache a preflight answer, in seconds.
pub const MAX_AGE_SECS: &str = "600";

/// The `Access-Control-Allow-Origin` value for a request from `origin`, or `None` when the
/// origin is not allowed (the response then carries no CORS headers and the browser blocks it).
pub fn allow_origin(cors: &CorsOrigins, origin: Option<&str>) -> Option<String> {
    match cors {
        CorsOrigins::Any => Some("*".to_owned()),
        CorsOrigins::List(list) => {
            let origin = origin?;
            list.iter().any(|o| o == origin).then(|| origin.to_owned())
        }
    }
}

/// Headers added to every (non-preflight) response.
pub fn response_headers(cors: &CorsOrigins, origin: Option<&str>) -> Vec<(&'static str, String)> {
    let mut headers = Vec::new();
    if let Some(allowed) = allow_origin(cors, origin) {
        headers.push(("access-control-allow-origin", allowed));
        headers.push(("access-control-expose-headers", EXPOSE_HEADERS.to_owned()));
    }
    if matches!(cors, CorsOrigins::List(_)) {
        // The answer depends on the Origin header: shared caches must key on it.
        headers.push(("vary", "origin".to_owned()));
    }
    headers
}

/// Headers of a preflight (`OPTIONS`) answer; it is a 200 with an empty body either way.
pub fn preflight_headers(cors: &CorsOrigins, origin: Option<&str>) -> Vec<(&'static str, String)> {
    let mut headers = response_headers(cors, origin);
    if headers
        .iter()
        .any(|(name, _)| *name == "access-control-allow-origin")
    {
        headers.push(("access-control-allow-methods", ALLOW_METHODS.to_owned()));
        headers.push(("access-control-allow-headers", ALLOW_HEADERS.to_owned()));
        headers.push(("access-control-max-age", MAX_AGE_SECS.to_owned()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(headers: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn any_origin_gets_a_star() {
        let h = response_headers(&CorsOrigins::Any, Some("https://x.example"));
        assert_eq!(find(&h, "access-control-allow-origin"), Some("*"));
        assert_eq!(
            find(&h, "access-control-expose-headers"),
            Some("etag,retry-after,x-request-id")
        );
        assert_eq!(find(&h, "vary"), None);
        let p = preflight_headers(&CorsOrigins::Any, None);
        assert_eq!(
            find(&p, "access-control-allow-methods"),
            Some(ALLOW_METHODS)
        );
        assert!(
            find(&p, "access-control-allow-headers")
                .unwrap()
                .contains("authorization")
        );
    }

    #[test]
    fn a_list_echoes_allowed_origins_only() {
        let cors = CorsOrigins::List(vec!["https://app.example".into()]);
        let h = response_headers(&cors, Some("https://app.example"));
        assert_eq!(
            find(&h, "access-control-allow-origin"),
            Some("https://app.example")
        );
        assert_eq!(find(&h, "vary"), Some("origin"));
        let denied = preflight_headers(&cors, Some("https://evil.example"));
        assert_eq!(find(&denied, "access-control-allow-origin"), None);
        assert_eq!(find(&denied, "access-control-allow-methods"), None);
        assert_eq!(find(&denied, "vary"), Some("origin"));
        assert!(response_headers(&cors, None).len() == 1);
    }
}
