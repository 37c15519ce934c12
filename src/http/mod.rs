//! The HTTP surface, built with poem-openapi so that every operation and
//! status is in the generated spec: hooks, analytics, admin, operations.

pub mod admin;
pub mod analytics;
pub mod error;
pub mod health;
pub mod hooks;

use std::sync::Arc;

use poem::middleware::CatchPanic;
use poem::{Endpoint, EndpointExt, IntoEndpoint, Route};
use poem_openapi::auth::Bearer;
use poem_openapi::{OpenApiService, SecurityScheme, Tags};

use crate::app::AppState;

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
    analytics::AnalyticsApi,
    admin::AdminApi,
    health::HealthApi,
);

/// The OpenAPI service over every API.
pub fn service() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            hooks::HookApi,
            analytics::AnalyticsApi,
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

/// The generated spec as JSON (what `rocket-rewards openapi` prints and
/// `openapi/openapi.json` holds).
pub fn spec_json() -> String {
    service().spec()
}

/// The full endpoint: API, spec, docs UI, one error body everywhere.
pub fn endpoint(state: Arc<AppState>) -> impl Endpoint {
    let api = service();
    let spec_json = api.spec_endpoint();
    let spec_yaml = api.spec_endpoint_yaml();
    let docs = api.swagger_ui();
    Route::new()
        .nest("/", api)
        .at("/openapi.json", spec_json)
        .at("/openapi.yaml", spec_yaml)
        .nest("/docs", docs)
        .into_endpoint()
        .data(state)
        .with(CatchPanic::new())
        .catch_all_error(error::into_error_body)
}
