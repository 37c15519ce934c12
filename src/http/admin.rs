//! Operator endpoints: the loaded sources (no secrets), config reload,
//! queueing a failed event again, erasing a learner.

use std::sync::Arc;

use poem::web::Data;
use poem::Request;

use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};

use super::error::ApiError;
use super::{AdminToken, ApiTags};
use crate::state::AppState;

/// A loaded source, without secrets.
#[derive(Debug, Object)]
pub struct SourceView {
    pub name: String,
    pub description: String,
    pub namespace: String,
    /// `sync` or `async`.
    pub processing: String,
    /// Auth schemes, e.g. `bearer` or `hmac`.
    pub auth: Vec<String>,
    /// Whether some auth scheme has its secret set.
    pub configured: bool,
    /// Where each scheme's secret comes from, in the order of `auth`.
    pub secrets: Vec<SecretView>,
    pub content_types: Vec<String>,
    pub max_body_bytes: i64,
    pub rules: Vec<String>,
    pub dry_run: bool,
    pub file: String,
}

/// Where a secret comes from and how many values it holds: never a value
/// or a length.
#[derive(Debug, Object)]
pub struct SecretView {
    /// `env`, `file` or `secrets_dir`.
    pub from: String,
    /// The environment variable, or the file's path.
    pub name: String,
    /// The secret holds at least one value.
    pub configured: bool,
    /// How many values are active (more than one while it rotates).
    pub values: i64,
}

#[derive(Debug, Object)]
pub struct SourceList {
    pub sources: Vec<SourceView>,
}

#[derive(Debug, Object)]
pub struct ReloadResult {
    /// Always `success`.
    pub status: String,
    pub sources: Vec<String>,
    pub rules: Vec<String>,
    pub warnings: Vec<String>,
}

/// A failed event queued again.
#[derive(Debug, Object)]
pub struct RetryResult {
    /// Always `queued`.
    pub status: String,
    pub event_id: String,
}

/// What erasing a learner removed.
#[derive(Debug, Object)]
pub struct ErasureResult {
    /// Always `success`.
    pub status: String,
    pub namespace: String,
    /// Events whose personal data was removed (kept as tombstones, so a
    /// redelivery awards and stores nothing).
    pub events: u64,
    pub ledger_entries: u64,
    /// The learner's total before.
    pub points: i64,
}

pub struct AdminApi;

#[OpenApi(tag = "ApiTags::Admin")]
impl AdminApi {
    /// The loaded sources, without secrets.
    #[oai(
        path = "/api/admin/sources",
        method = "get",
        operation_id = "listSources"
    )]
    async fn sources(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminToken,
        req: &Request,
    ) -> Result<Json<SourceList>, ApiError> {
        state.require_admin(req, &auth)?;
        let config = state.config.load_full();
        let sources = config
            .source_names()
            .into_iter()
            .filter_map(|n| config.source(n))
            .map(|s| SourceView {
                name: s.name.clone(),
                description: s.description.clone(),
                namespace: s.namespace.clone(),
                processing: format!("{:?}", s.processing).to_lowercase(),
                auth: s.auth.iter().map(|a| a.kind().to_string()).collect(),
                configured: s.auth.iter().any(|a| a.is_configured()),
                secrets: s
                    .auth
                    .iter()
                    .map(|a| {
                        let origin = &a.secret().origin;
                        SecretView {
                            from: origin.kind().into(),
                            name: origin.name(),
                            configured: a.is_configured(),
                            values: a.values() as i64,
                        }
                    })
                    .collect(),
                content_types: s.content_types.clone(),
                max_body_bytes: s.max_body_bytes as i64,
                rules: s.rules.iter().map(|r| r.name.to_string()).collect(),
                dry_run: s.dry_run,
                file: s.file.display().to_string(),
            })
            .collect();
        Ok(Json(SourceList { sources }))
    }

    /// Queue a failed event again, for a worker to score with the current rules.
    ///
    /// For when an admin has fixed what made it fail (a rule, a removed source).
    /// 404 `UNKNOWN_EVENT` when no failed event has this id.
    #[oai(
        path = "/api/admin/events/:event_id/retry",
        method = "post",
        operation_id = "retryEvent"
    )]
    async fn retry(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminToken,
        req: &Request,
        event_id: Path<String>,
    ) -> Result<Json<RetryResult>, ApiError> {
        state.require_admin(req, &auth)?;
        match state.store.retry(&event_id.0).await {
            Ok(true) => {
                state.queue_ready.notify_waiters();
                Ok(Json(RetryResult {
                    status: "queued".into(),
                    event_id: event_id.0,
                }))
            }
            Ok(false) => Err(ApiError::not_found(
                "UNKNOWN_EVENT",
                "no failed event with this id is stored",
            )),
            Err(e) => Err(state.store_failed(&e, "retry")),
        }
    }

    /// Reload the config directory, all or nothing.
    ///
    /// A config with any error is refused (400 `CONFIG_INVALID`, every error
    /// listed in `details.errors`) and the running config keeps serving.
    /// Requests in flight finish on the config they started with.
    #[oai(
        path = "/api/admin/reload",
        method = "post",
        operation_id = "reloadConfig"
    )]
    async fn reload(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminToken,
        req: &Request,
    ) -> Result<Json<ReloadResult>, ApiError> {
        state.require_admin(req, &auth)?;
        match state.reload("api") {
            Ok(config) => Ok(Json(ReloadResult {
                status: "success".into(),
                sources: config
                    .source_names()
                    .into_iter()
                    .map(String::from)
                    .collect(),
                rules: config.rules.keys().cloned().collect(),
                warnings: config.warnings.clone(),
            })),
            Err(errors) => Err(ApiError::bad_request(
                "CONFIG_INVALID",
                format!(
                    "the new config has {} error(s); the running config is kept",
                    errors.0.len()
                ),
                Some(
                    serde_json::json!({ "errors": errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>() }),
                ),
            )),
        }
    }

    /// Erase a learner: their events, raw bodies and request headers, ledger
    /// entries and total, in one transaction.
    ///
    /// Idempotent: erasing again answers zeros.
    /// The erased events stay as tombstones without personal data (id,
    /// source, dedupe key, types, times), so a redelivery of one is
    /// answered as a duplicate with 0 points and stores nothing; events
    /// that arrive later with new ids are stored as usual. The log keeps
    /// one audit line with the namespace and the counts, not the user.
    #[oai(
        path = "/api/admin/users/:namespace/:user_id",
        method = "delete",
        operation_id = "eraseUser"
    )]
    async fn erase(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminToken,
        req: &Request,
        namespace: Path<String>,
        user_id: Path<String>,
    ) -> Result<Json<ErasureResult>, ApiError> {
        state.require_admin(req, &auth)?;
        let erased = state
            .store
            .erase_user(&namespace.0, &user_id.0)
            .await
            .map_err(|e| state.store_failed(&e, "erasure"))?;
        tracing::info!(
            namespace = %namespace.0,
            events = erased.events,
            ledger_entries = erased.ledger_entries,
            "learner erased"
        );
        Ok(Json(ErasureResult {
            status: "success".into(),
            namespace: namespace.0,
            events: erased.events,
            ledger_entries: erased.ledger_entries,
            points: erased.points,
        }))
    }
}
