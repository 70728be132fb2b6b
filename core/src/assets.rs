//! The demo page and its static files, embedded once so both adapters serve the same bytes.

use bytes::Bytes;

use crate::api::ApiResponse;

/// The demo page (`GET /`).
pub const INDEX_HTML: &str = include_str!("../assets/index.html");
/// Its stylesheet.
pub const DEMO_CSS: &str = include_str!("../assets/demo.css");
/// Its script.
pub const DEMO_JS: &str = include_str!("../assets/demo.js");
/// The browser client it uses (also published as `@rollgate-proxy/client`).
pub const CLIENT_JS: &str = include_str!("../../clients/js/src/index.js");

/// The answer for the asset `name` (`index.html` is the demo page; `Route::Asset` names the
/// rest), `Cache-Control: no-cache` so a deploy is seen at once.
pub fn response(name: &str) -> ApiResponse {
    let (body, content_type) = match name {
        "index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "demo.css" => (DEMO_CSS, "text/css; charset=utf-8"),
        "demo.js" => (DEMO_JS, "text/javascript; charset=utf-8"),
        // Module scripts must be served with a JavaScript type.
        _ => (CLIENT_JS, "text/javascript; charset=utf-8"),
    };
    ApiResponse {
        status: 200,
        content_type: Some(content_type),
        headers: vec![("Cache-Control", crate::api::NO_CACHE.to_owned())],
        body: Bytes::from_static(body.as_bytes()),
    }
}
