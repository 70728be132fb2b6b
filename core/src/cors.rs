//! The one CORS policy: which headers every answer and every preflight carries, for both adapters.
//!
//! Adapters add [`CorsPolicy::response_headers`] to every answer and answer every `OPTIONS`
//! request with [`CorsPolicy::preflight`] (status 204, no client key needed). Header values are
//! `&'static str` or the caller's own origin, so an adapter can turn them into its header type
//! once per request without formatting.

/// Headers a browser may send cross-origin: the browser SDK's, including its tracing headers
/// (protocol doc §1.1), or its preflights would fail.
pub const ALLOW_HEADERS: &str = "authorization,content-type,if-none-match,cache-control,x-api-key,\
last-event-id,x-request-id,x-trace-id,x-span-id,traceparent,x-sdk-name,x-sdk-version";
/// Methods of the API.
pub const ALLOW_METHODS: &str = "GET,HEAD,POST,OPTIONS";
/// Response headers scripts may read (`ETag` so browsers can revalidate).
pub const EXPOSE_HEADERS: &str = "etag,retry-after,x-request-id";
/// How long a browser may cache a preflight answer, in seconds.
pub const MAX_AGE_SECS: &str = "600";
/// Status of a preflight answer.
pub const PREFLIGHT_STATUS: u16 = 204;

/// Which origins may read answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorsPolicy {
    /// Any origin (`Access-Control-Allow-Origin: *`), the default.
    Any,
    /// Only these exact origins; the answer then depends on `Origin`, hence `Vary: origin`.
    List(Vec<String>),
}

/// One CORS header: a fixed value, or the request's own origin echoed back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorsValue<'a> {
    /// A constant.
    Static(&'static str),
    /// The request's `Origin`, allowed by the list.
    Origin(&'a str),
}

impl CorsValue<'_> {
    /// The header value.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Static(value) => value,
            Self::Origin(origin) => origin,
        }
    }
}

impl CorsPolicy {
    /// Parses `*` or a comma-separated list of origins.
    pub fn parse(value: &str) -> Self {
        let value = value.trim();
        if value.is_empty() || value == "*" {
            return Self::Any;
        }
        Self::List(
            value
                .split(',')
                .map(|origin| origin.trim().trim_end_matches('/').to_owned())
                .filter(|origin| !origin.is_empty())
                .collect(),
        )
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, or `None` when the
    /// origin is not allowed (the answer then carries no CORS grant and the browser blocks it).
    pub fn allow_origin<'a>(&self, origin: Option<&'a str>) -> Option<CorsValue<'a>> {
        match self {
            Self::Any => Some(CorsValue::Static("*")),
            Self::List(list) => {
                let origin = origin?;
                list.iter()
                    .any(|allowed| allowed == origin)
                    .then_some(CorsValue::Origin(origin))
            }
        }
    }

    /// Headers of every non-preflight answer.
    pub fn response_headers<'a>(
        &self,
        origin: Option<&'a str>,
    ) -> Vec<(&'static str, CorsValue<'a>)> {
        let mut headers = Vec::with_capacity(3);
        if let Some(allowed) = self.allow_origin(origin) {
            headers.push(("access-control-allow-origin", allowed));
            headers.push((
                "access-control-expose-headers",
                CorsValue::Static(EXPOSE_HEADERS),
            ));
        }
        if matches!(self, Self::List(_)) {
            // The answer depends on the Origin header: shared caches must key on it.
            headers.push(("vary", CorsValue::Static("origin")));
        }
        headers
    }

    /// Headers of the answer to an `OPTIONS` preflight (status [`PREFLIGHT_STATUS`], no body):
    /// the grant and what may be sent only when the origin is allowed.
    pub fn preflight<'a>(&self, origin: Option<&'a str>) -> Vec<(&'static str, CorsValue<'a>)> {
        let mut headers = self.response_headers(origin);
        if self.allow_origin(origin).is_some() {
            headers.push((
                "access-control-allow-methods",
                CorsValue::Static(ALLOW_METHODS),
            ));
            headers.push((
                "access-control-allow-headers",
                CorsValue::Static(ALLOW_HEADERS),
            ));
            headers.push(("access-control-max-age", CorsValue::Static(MAX_AGE_SECS)));
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(headers: &'a [(&'static str, CorsValue<'_>)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn any_origin_gets_a_star_and_no_vary() {
        let any = CorsPolicy::parse("*");
        let h = any.response_headers(Some("https://x.example"));
        assert_eq!(find(&h, "access-control-allow-origin"), Some("*"));
        assert_eq!(
            find(&h, "access-control-expose-headers"),
            Some(EXPOSE_HEADERS)
        );
        assert_eq!(find(&h, "vary"), None);
        let p = any.preflight(None);
        assert_eq!(
            find(&p, "access-control-allow-methods"),
            Some(ALLOW_METHODS)
        );
        assert_eq!(find(&p, "access-control-max-age"), Some("600"));
    }

    #[test]
    fn a_list_echoes_allowed_origins_only() {
        let list = CorsPolicy::parse(" https://app.example/ ,http://localhost:5173");
        assert_eq!(
            list,
            CorsPolicy::List(vec![
                "https://app.example".into(),
                "http://localhost:5173".into()
            ])
        );
        let h = list.response_headers(Some("https://app.example"));
        assert_eq!(
            find(&h, "access-control-allow-origin"),
            Some("https://app.example")
        );
        assert_eq!(find(&h, "vary"), Some("origin"));
        let denied = list.preflight(Some("https://evil.example"));
        assert_eq!(denied, vec![("vary", CorsValue::Static("origin"))]);
        assert_eq!(list.response_headers(None).len(), 1);
    }
}
