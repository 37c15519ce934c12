//! Liveness, readiness and the Prometheus scrape endpoint.

use std::sync::Arc;

use poem::web::Data;
use std::sync::atomic::Ordering;

use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::error::ApiError;
use super::ApiTags;
use crate::state::AppState;

#[derive(Debug, Object)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

pub struct HealthApi;

#[OpenApi(tag = "ApiTags::Operations")]
impl HealthApi {
    /// Liveness: the process answers.
    #[oai(path = "/health/live", method = "get", operation_id = "live")]
    async fn live(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }

    /// Readiness: config loaded, the store answers and its last write did
    /// not fail for want of a writable store (503 with the reason until one
    /// succeeds), not draining.
    #[oai(path = "/health/ready", method = "get", operation_id = "ready")]
    async fn ready(&self, state: Data<&Arc<AppState>>) -> Result<Json<Health>, ApiError> {
        if state.draining.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        if let Err(e) = state.store.ping().await {
            tracing::warn!(error = %e, "readiness: the store cannot take writes");
            return Err(ApiError::unavailable(e.reason()));
        }
        Ok(Json(Health {
            status: "ok".into(),
        }))
    }

    /// Prometheus metrics (text exposition format).
    #[oai(path = "/metrics", method = "get", operation_id = "metrics")]
    async fn metrics(&self, state: Data<&Arc<AppState>>) -> MetricsText {
        match state.store.backlog().await {
            Ok((failed, oldest)) => {
                let m = &state.metrics;
                m.events_failed.set(failed);
                let now = chrono::Utc::now().timestamp_millis();
                let age = oldest.map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0);
                m.queue_oldest_age.set(age);
            }
            // The gauges keep their last values; the failure is counted.
            Err(e) => {
                state.metrics.store_errors.inc();
                tracing::warn!(error = %e, "reading the backlog for /metrics failed");
            }
        }
        match state.store.recent_window_start().await {
            Ok(start) => {
                let now = chrono::Utc::now().timestamp_millis();
                let lag = crate::window::lag_seconds(start, now);
                state.metrics.window_lag.set(lag);
            }
            Err(e) => {
                state.metrics.store_errors.inc();
                state.metrics.window_lag.set(f64::INFINITY);
                tracing::warn!(error = %e, "reading the leaderboard window for /metrics failed");
            }
        }
        MetricsText::Ok(PlainText(state.metrics.render()))
    }
}

/// The exposition format's own content type (what Prometheus asks for).
#[derive(ApiResponse)]
enum MetricsText {
    /// The metrics.
    #[oai(
        status = 200,
        content_type = "text/plain; version=0.0.4; charset=utf-8"
    )]
    Ok(PlainText<String>),
}
