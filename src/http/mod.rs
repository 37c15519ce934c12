//! The HTTP surface, built with poem-openapi so that every operation and
//! status is in the generated spec: hooks, analytics, admin, operations.

pub mod admin;
pub mod analytics;
pub mod console;
pub mod context;
pub mod error;
pub mod events;
pub mod health;
pub mod hooks;
pub mod spec;
pub mod xapi;

use std::sync::Arc;

use poem::http::HeaderValue;
use poem::middleware::CatchPanic;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route};
use poem_openapi::auth::Bearer;
use poem_openapi::{OpenApiService, SecurityScheme, Tags};

use crate::state::AppState;
use context::RateSlot;

#[derive(Tags)]
pub enum ApiTags {
    /// Webhook ingestion, dry runs and validation.
    Hooks,
    /// Points, levels, leaderboards and stats.
    Analytics,
    /// Operator endpoints.
    Admin,
    /// Health and metrics.
    Operations,
}

/// The admin token (`ROCKET_ADMIN_TOKEN`), as `Authorization: Bearer …`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "opaque")]
pub struct AdminToken(pub Bearer);

pub type Apis = (
    hooks::HookApi,
    xapi::XapiApi,
    analytics::AnalyticsApi,
    events::EventsApi,
    admin::AdminApi,
    health::HealthApi,
);

/// The OpenAPI service over every API.
pub fn service() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            hooks::HookApi,
            xapi::XapiApi,
            analytics::AnalyticsApi,
            events::EventsApi,
            admin::AdminApi,
            health::HealthApi,
        ),
        "Rocket Learning Rewards",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Turns LMS webhooks into learning rewards: verifies each delivery, maps it with the \
         source's YAML, scores it with rhai rules and records it once in the points ledger.",
    )
}

/// The Swagger UI page around a spec: poem-openapi's page, split where it
/// embeds its (static) spec, so that the config's spec goes in its place.
fn docs_page() -> (String, String) {
    let api = service();
    let (page, spec) = (api.swagger_ui_html(), api.spec());
    match page.split_once(&spec) {
        Some((head, tail)) => (head.to_string(), tail.to_string()),
        None => (page, String::new()),
    }
}

/// One form of the spec of the loaded config (rendered once per config).
fn rendered_spec(req: &Request, form: fn(&spec::Rendered) -> &String) -> String {
    req.data::<Arc<AppState>>()
        .map(|s| form(&spec::rendered(&s.config.load_full())).clone())
        .unwrap_or_default()
}

/// The full endpoint: API, spec, docs UI, one error body everywhere.
pub fn endpoint(state: Arc<AppState>) -> impl Endpoint {
    let api = service();
    let (head, tail) = docs_page();
    let spec_json = poem::endpoint::make_sync(|req| {
        Response::builder()
            .content_type("application/json; charset=utf-8")
            .body(rendered_spec(&req, |r| &r.json))
    });
    let spec_yaml = poem::endpoint::make_sync(|req| {
        Response::builder()
            .content_type("application/x-yaml; charset=utf-8")
            .body(rendered_spec(&req, |r| &r.yaml))
    });
    let docs = poem::endpoint::make_sync(move |req| {
        let spec = rendered_spec(&req, |r| &r.in_script);
        poem::web::Html(format!("{head}{spec}{tail}"))
    });
    Route::new()
        .nest("/", api)
        .at("/openapi.json", poem::get(spec_json))
        .at("/openapi.yaml", poem::get(spec_yaml))
        .at("/docs", poem::get(docs))
        .at("/console", poem::get(console::page))
        .at("/console/app.js", poem::get(console::script))
        .at("/console/app.css", poem::get(console::style))
        .catch_all_error(error::into_error_body)
        .around(response_headers)
        .with(CatchPanic::new().with_handler(|_| {
            tracing::error!("a request handler panicked");
            error::json_error(
                poem::http::StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "an internal error occurred; it has been logged",
            )
        }))
        .data(state)
}

/// `?source=&limit=` means no source filter and the default limit, as if
/// the parameters were absent: form-built URLs send empty fields, and an
/// empty value is no valid filter or number.
fn drop_empty_query_params(req: &mut Request) {
    let Some(query) = req.uri().query() else {
        return;
    };
    let empty = |kv: &&str| match kv.split_once('=') {
        Some((_, value)) => value.is_empty(),
        None => kv.is_empty(),
    };
    if !query.split('&').any(|kv| empty(&kv)) {
        return;
    }
    let kept: Vec<&str> = query.split('&').filter(|kv| !empty(kv)).collect();
    let path = req.uri().path();
    let rebuilt = if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = rebuilt.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = poem::http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

/// Adds the rate-limit headers a hook handler recorded (or, if it answered
/// before its rate check, the client address's), the xAPI version on every
/// answer of the statements resource (errors too), and HSTS on HTTPS.
async fn response_headers<E: Endpoint>(ep: Arc<E>, mut req: Request) -> poem::Result<Response> {
    drop_empty_query_params(&mut req);
    let https = *req.scheme() == poem::http::uri::Scheme::HTTPS;
    let path = req.uri().path();
    let is_xapi = path.starts_with("/api/public/xapi/");
    let xapi_version = is_xapi.then(|| {
        let requested = req.headers().get(xapi::VERSION_HEADER);
        xapi::answer_version(requested.and_then(|v| v.to_str().ok())).unwrap_or(xapi::LATEST_1_0)
    });
    let slot = if path.starts_with("/api/public/hook/") || is_xapi {
        let slot = Arc::new(RateSlot::default());
        req.extensions_mut().insert(slot.clone());
        Some(slot)
    } else {
        None
    };
    // With rate limits off there is nothing to report (and nothing done
    // here on the hot path).
    let fallback = slot.as_ref().and_then(|_| {
        let state = req.data::<Arc<AppState>>()?;
        state
            .settings
            .rate_limits
            .then(|| (state.client_ip(&req, None), state.clone()))
    });
    let mut resp = ep.call(req).await?.into_response();
    let recorded = slot.and_then(|s| s.get()).or_else(|| {
        let (ip, state) = fallback?;
        Some(state.address_rate_headers(ip))
    });
    let h = resp.headers_mut();
    if let Some(version) = xapi_version {
        h.insert(xapi::VERSION_HEADER, HeaderValue::from_static(version));
    }
    if let Some(r) = recorded {
        h.insert("x-ratelimit-limit", HeaderValue::from(r.limit));
        h.insert("x-ratelimit-remaining", HeaderValue::from(r.remaining));
        h.insert("x-ratelimit-reset", HeaderValue::from(r.reset));
        if let Some(after) = r.retry_after {
            h.insert(poem::http::header::RETRY_AFTER, HeaderValue::from(after));
        }
    }
    if https {
        h.insert(
            poem::http::header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        );
    }
    Ok(resp)
}
