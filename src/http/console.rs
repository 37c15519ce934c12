//! The admin console: one page and its script and style, embedded in the
//! binary (no build step, no external requests: a Content-Security-Policy
//! allows this server only). The page holds no data; everything it shows
//! comes from the API with the admin token the operator logs in with.

use poem::http::header;
use poem::{handler, Response};

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/app.css");

fn asset(content_type: &str, body: &'static str) -> Response {
    Response::builder()
        .content_type(content_type)
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        )
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
}

#[handler]
pub fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

#[handler]
pub fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

#[handler]
pub fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
