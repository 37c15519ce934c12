//! Ingestion: the hook, the dry-run test endpoint and payload validation.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use poem::web::Data;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use poem::Request;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaMediaType, MetaRequest, MetaSchema, MetaSchemaRef};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ApiResponse, ExtractParamOptions, Object, OpenApi,
};
use serde_json::json;

use super::context::{RateHeaders, RateSlot};
use super::error::ApiError;
use super::ApiTags;
use crate::config::{Config, Source};
use crate::ingest;
pub use crate::ingest::deliver::Ingested;
use crate::ingest::deliver::{self, Delivery, Refused};
use crate::pipeline::limits;
use crate::pipeline::verify::AuthError;
use crate::pipeline::{self, PrepareError, Prepared};
use crate::state::AppState;
use crate::store::{EventStatus, Persisted};

/// The raw request body, left unread until the source is known and its
/// limits apply. Any content type is taken here; the source decides.
pub struct HookBody(poem::Body);

impl<'a> ApiExtractor<'a> for HookBody {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn request_meta() -> Option<MetaRequest> {
        let object = || MetaSchemaRef::Inline(Box::new(MetaSchema::new("object")));
        Some(MetaRequest {
            description: Some(
                "The payload exactly as the LMS sends it. It is authenticated on its raw bytes, \
                 then decoded by the source's content type and mapped by its YAML.",
            ),
            content: vec![
                MetaMediaType {
                    content_type: "application/json",
                    schema: object(),
                },
                MetaMediaType {
                    content_type: "application/x-www-form-urlencoded",
                    schema: object(),
                },
            ],
            required: true,
        })
    }

    async fn from_request(
        _request: &'a Request,
        body: &mut poem::RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        Ok(HookBody(body.take()?))
    }
}

/// A processed (or previously processed) event.
#[derive(Debug, Object)]
pub struct HookSuccess {
    /// Always `success`.
    pub status: String,
    /// The stored event's id (`evt_…`); for a batch, the first statement's.
    pub event_id: String,
    /// When the event was processed (RFC 3339, UTC).
    pub processed_at: String,
    /// Points of this delivery's events (for a duplicate, the first delivery's).
    pub points_awarded: i64,
    /// Present and true when every event was stored before: nothing awarded again.
    #[oai(skip_serializing_if_is_none)]
    pub duplicate: Option<bool>,
    /// One result per statement, for batch (xAPI array) deliveries.
    #[oai(skip_serializing_if_is_none)]
    pub results: Option<Vec<StatementResult>>,
}

/// One statement of a batch.
#[derive(Debug, Object)]
pub struct StatementResult {
    pub event_id: String,
    /// The statement's dedupe key (its xAPI `id`).
    pub dedupe_key: String,
    pub points_awarded: i64,
    pub duplicate: bool,
}

/// Every hook answer carries the tightest rate-limit bucket's standing
/// (written by the HTTP layer's middleware, so the variants leave them
/// `None`): the sustained limit per minute, what is left of it, and when
/// the bucket is full again (Unix seconds).
#[derive(ApiResponse)]
pub enum HookResponse {
    /// Processed and committed.
    #[oai(status = 200)]
    Ok(
        Json<HookSuccess>,
        #[oai(header = "X-RateLimit-Limit")] Option<u32>,
        #[oai(header = "X-RateLimit-Remaining")] Option<u32>,
        #[oai(header = "X-RateLimit-Reset")] Option<u64>,
    ),
    /// Stored durably and queued (async sources); its status shows at
    /// `GET /api/v1/events/{event_id}`.
    #[oai(status = 202)]
    Accepted(
        Json<HookAccepted>,
        #[oai(header = "X-RateLimit-Limit")] Option<u32>,
        #[oai(header = "X-RateLimit-Remaining")] Option<u32>,
        #[oai(header = "X-RateLimit-Reset")] Option<u64>,
    ),
}

impl HookResponse {
    pub fn status(&self) -> u16 {
        match self {
            HookResponse::Ok(..) => 200,
            HookResponse::Accepted(..) => 202,
        }
    }
}

/// An event stored for processing by a worker.
#[derive(Debug, Object)]
pub struct HookAccepted {
    /// Always `success`: the event is durably stored.
    pub status: String,
    pub event_id: String,
    /// When the event was accepted (it is scored later).
    pub processed_at: String,
    /// Always 0: points are awarded when a worker processes the event
    /// (`GET /api/v1/events/{event_id}` shows them).
    pub points_awarded: i64,
    /// Always true: the event waits for a worker.
    pub queued: bool,
    /// Present and true when the event was queued before.
    #[oai(skip_serializing_if_is_none)]
    pub duplicate: Option<bool>,
}

/// One event of a dry run.
#[derive(Debug, Object)]
pub struct DryRunEvent {
    /// The canonical event the mapping produced.
    pub event: serde_json::Value,
    pub points_awarded: i64,
    /// Each rule's award.
    pub awards: Vec<AwardView>,
    /// The rule error, if a rule failed (nothing would be awarded).
    #[oai(skip_serializing_if_is_none)]
    pub rule_error: Option<String>,
}

#[derive(Debug, Object)]
pub struct AwardView {
    pub rule: String,
    pub points: i64,
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
}

/// A dry run's outcome; nothing was stored.
#[derive(Debug, Object)]
pub struct DryRunResult {
    /// Always `success`.
    pub status: String,
    /// An id in the stored events' format; nothing is stored under it.
    pub event_id: String,
    /// When the dry run ran.
    pub processed_at: String,
    /// Always true: nothing was stored.
    pub dry_run: bool,
    /// The source whose mapping and rules were used.
    pub source: String,
    pub points_awarded: i64,
    pub events: Vec<DryRunEvent>,
}

/// A validation's outcome.
#[derive(Debug, Object)]
pub struct ValidationResult {
    /// Always `success`.
    pub status: String,
    pub valid: bool,
    pub source: String,
    /// The canonical events the payload maps to.
    pub events: Vec<serde_json::Value>,
}

pub struct HookApi;

#[OpenApi(tag = "ApiTags::Hooks")]
impl HookApi {
    /// Ingest one webhook (or an xAPI batch).
    ///
    /// Authenticated per source (bearer token or HMAC over the raw body),
    /// mapped by the source's YAML, scored by its rules and committed to the
    /// ledger before the answer. A redelivery answers 200 with
    /// `"duplicate": true` and the first delivery's id and points.
    #[oai(
        path = "/api/public/hook/:source/event",
        method = "post",
        operation_id = "ingest"
    )]
    async fn ingest(
        &self,
        state: Data<&Arc<AppState>>,
        source: Path<String>,
        req: &Request,
        body: HookBody,
    ) -> Result<HookResponse, ApiError> {
        let started = Instant::now();
        let config = state.config.load_full();
        let src = config.source(&source.0).cloned();
        let label = src.as_ref().map(|s| s.name.as_str()).unwrap_or("unknown");
        let ip = state.client_ip(req, src.as_deref());
        let result = match &src {
            None => Err(unknown_source(&source.0)),
            Some(s) if s.dry_run => Err(ApiError::not_found(
                "UNKNOWN_SOURCE",
                format!(
                    "source {:?} only serves dry runs at /api/public/hook/test/event",
                    s.name
                ),
            )),
            Some(s) => ingest_into(&state, &config, s, req, ip, body, None, None)
                .await
                .map(hook_response),
        };
        match &result {
            Ok((resp, id)) => state.observe(
                label,
                ip,
                started,
                resp.status(),
                "processed",
                id.as_deref(),
            ),
            Err(e) => state.observe(label, ip, started, e.status().as_u16(), e.code(), None),
        }
        result.map(|(resp, _)| resp)
    }

    /// Dry run: the full pipeline with nothing stored.
    ///
    /// Authenticated with the test token (`ROCKET_TEST_TOKEN`) or the admin
    /// token (the console's playground). `?as=SOURCE` chooses the mapping and rules; without it, any payload is tried
    /// against the canonical event format (the `test` source), then against
    /// each source's mapping by name, and the first that accepts it is used
    /// (`source` in the answer says which). The source's own signature is
    /// not required.
    #[oai(
        path = "/api/public/hook/test/event",
        method = "post",
        operation_id = "dryRun"
    )]
    async fn test_event(
        &self,
        state: Data<&Arc<AppState>>,
        #[oai(name = "as")] as_source: Query<Option<String>>,
        req: &Request,
        body: HookBody,
    ) -> Result<Json<DryRunResult>, ApiError> {
        let config = state.config.load_full();
        state.require_test_or_admin(req, true)?;
        let (src, bytes) = chosen_or_detected(&state, &config, as_source.0, req, body).await?;
        let mapped = ingest::map_body(&src, req.content_type(), &bytes, Utc::now());
        let prepared = prepare(&state, &config, &src, mapped, true).await?;
        Ok(Json(dry_run_result(&src, &prepared)))
    }

    /// Check a payload against a source's mapping and schema.
    ///
    /// Answers 200 with the canonical events when the payload maps, and 400
    /// `VALIDATION_ERROR` listing `missing_fields` and `invalid_fields` when
    /// it does not. Test or admin token. Nothing is stored or scored.
    #[oai(
        path = "/api/public/validate/webhook",
        method = "post",
        operation_id = "validateWebhook"
    )]
    async fn validate(
        &self,
        state: Data<&Arc<AppState>>,
        /// The source whose mapping to check; without it, the first whose
        /// mapping accepts the payload (the canonical format first).
        source: Query<Option<String>>,
        req: &Request,
        body: HookBody,
    ) -> Result<Json<ValidationResult>, ApiError> {
        let config = state.config.load_full();
        state.require_test_or_admin(req, true)?;
        let (src, bytes) = chosen_or_detected(&state, &config, source.0, req, body).await?;
        let mapped = ingest::map_body(&src, req.content_type(), &bytes, Utc::now());
        let prepared = prepare(&state, &config, &src, mapped, true).await?;
        Ok(Json(ValidationResult {
            status: "success".into(),
            valid: true,
            source: src.name.clone(),
            events: prepared
                .iter()
                .map(|p| serde_json::to_value(&p.event).unwrap_or_default())
                .collect(),
        }))
    }
}

/// The source a test or validation request names (`?as=` / `?source=`;
/// empty counts as absent), with the body read under its limits. Without
/// one, the body is read under the `test` source's limits and the source is
/// the first whose mapping accepts it: the canonical format (`test`) first,
/// then the others by name; `test` itself when none does, so the answer is
/// the canonical format's validation error.
async fn chosen_or_detected(
    state: &AppState,
    config: &Config,
    named: Option<String>,
    req: &Request,
    body: HookBody,
) -> Result<(Arc<Source>, Bytes), ApiError> {
    let named = named.filter(|n| !n.is_empty());
    let name = named.as_deref().unwrap_or("test");
    let src = config
        .source(name)
        .cloned()
        .ok_or_else(|| unknown_source(name))?;
    let bytes = read_body(body, &src, req, state.settings.body_timeout).await?;
    if named.is_some() {
        return Ok((src, bytes));
    }
    let now = Utc::now();
    let detected = std::iter::once(&src)
        .chain(
            config
                .source_names()
                .into_iter()
                .filter(|n| *n != "test")
                .filter_map(|n| config.source(n)),
        )
        .find(|s| ingest::map_body(s, req.content_type(), &bytes, now).is_ok())
        .cloned();
    Ok((detected.unwrap_or(src), bytes))
}

/// One delivery for the hook or the statements resource: the use case
/// (`ingest::deliver`) with the body read here within the source's limit,
/// its rate standing written into the response headers, and a refusal
/// turned into the one error body. `refused`: the resource's own objection
/// to the request (the statements resource's version header or statement
/// id), answered
/// once the allowlist and the address's limit have passed it, as the
/// pipeline orders them.
#[allow(clippy::too_many_arguments)]
pub(super) async fn ingest_into(
    state: &AppState,
    config: &Config,
    src: &Arc<Source>,
    req: &Request,
    ip: IpAddr,
    body: HookBody,
    statement_id: Option<&str>,
    refused: Option<ApiError>,
) -> Result<Ingested, ApiError> {
    let slot = req.extensions().get::<Arc<RateSlot>>().cloned();
    let answer = |r: Refused| refusal(src, slot.as_deref(), r);
    let address = deliver::admit(state, src, ip).map_err(answer)?;
    note_standing(slot.as_deref(), address);
    if let Some(e) = refused {
        return Err(e);
    }
    let bytes = read_body(body, src, req, state.settings.body_timeout).await?;
    let delivery = Delivery {
        headers: req.headers(),
        query: req.uri().query(),
        content_type: req.content_type(),
        ip,
        statement_id,
    };
    let ingested = deliver::deliver(state, config, src, &delivery, &bytes, address)
        .await
        .map_err(answer)?;
    note_standing(slot.as_deref(), ingested.standing);
    Ok(ingested)
}

/// Records a rate standing for the response's headers.
fn note_standing(slot: Option<&RateSlot>, standing: Option<limits::Standing>) {
    if let (Some(slot), Some(s)) = (slot, standing) {
        slot.record(s.into());
    }
}

/// A refused delivery as the sender sees it (already counted and logged).
fn refusal(src: &Source, slot: Option<&RateSlot>, r: Refused) -> ApiError {
    match r {
        Refused::IpNotAllowed => ApiError::ip_not_allowed(),
        Refused::RateLimited(r) => {
            if let Some(slot) = slot {
                slot.record(RateHeaders {
                    limit: r.limit,
                    remaining: 0,
                    reset: r.reset,
                    retry_after: Some(r.retry_after),
                });
            }
            ApiError::rate_limited(r.scope.label(), r.retry_after)
        }
        Refused::BatchOverBurst {
            scope,
            events,
            burst,
        } => ApiError::batch_over_burst(scope.label(), events, burst),
        Refused::Unauthorized(AuthError::NotConfigured) => {
            ApiError::unauthorized("this source has no credentials configured")
        }
        Refused::Unauthorized(e) => {
            ApiError::unauthorized(format!("invalid or missing credentials: {e}"))
        }
        Refused::Invalid(e) => invalid(src, e),
        Refused::Store(e) if e.is_unavailable() => ApiError::store_unavailable(e.reason()),
        Refused::Store(_) => ApiError::internal(None),
        Refused::RuleFailed { event_id } => {
            ApiError::internal(Some(json!({ "event_id": event_id })))
        }
    }
}

/// The hook's answer for what a delivery stored: 202 when queued, else 200
/// (with one result per statement for a batch); and the first event's id.
fn hook_response(ingested: Ingested) -> (HookResponse, Option<String>) {
    let Ingested {
        stored,
        keys,
        batch,
        ..
    } = ingested;
    let first_id = stored.first().map(|p| p.event_id.clone());
    if stored.iter().any(|p| p.status == EventStatus::Queued) {
        return (
            HookResponse::Accepted(
                Json(HookAccepted {
                    status: "success".into(),
                    event_id: first_id.clone().unwrap_or_default(),
                    processed_at: rfc3339_ms(stored.iter().map(|p| p.processed_at).max()),
                    points_awarded: 0,
                    queued: true,
                    duplicate: stored.iter().all(|p| p.duplicate).then_some(true),
                }),
                None,
                None,
                None,
            ),
            first_id,
        );
    }
    (
        HookResponse::Ok(Json(success_body(&stored, &keys, batch)), None, None, None),
        first_id,
    )
}

fn success_body(stored: &[Persisted], keys: &[String], batch: bool) -> HookSuccess {
    let first = &stored[0];
    let all_dup = stored.iter().all(|p| p.duplicate);
    HookSuccess {
        status: "success".into(),
        event_id: first.event_id.clone(),
        processed_at: rfc3339_ms(stored.iter().map(|p| p.processed_at).max()),
        // A redelivery answers its first points; in a batch that mixes new
        // statements with redelivered ones, only the new ones are awarded now.
        points_awarded: stored
            .iter()
            .filter(|p| all_dup || !p.duplicate)
            .map(|p| p.points)
            .sum(),
        duplicate: all_dup.then_some(true),
        results: batch.then(|| {
            stored
                .iter()
                .zip(keys)
                .map(|(p, k)| StatementResult {
                    event_id: p.event_id.clone(),
                    dedupe_key: k.clone(),
                    points_awarded: p.points,
                    duplicate: p.duplicate,
                })
                .collect()
        }),
    }
}

/// A Unix-milliseconds time as RFC 3339 (UTC, milliseconds); now if absent.
fn rfc3339_ms(ms: Option<i64>) -> String {
    ms.and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .unwrap_or_else(Utc::now)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(super) fn unknown_source(name: &str) -> ApiError {
    let shown: String = name.chars().take(64).collect();
    ApiError::not_found(
        "UNKNOWN_SOURCE",
        format!("no source named {shown:?} is configured"),
    )
}

fn unsupported(src: &Source, ct: &str) -> ApiError {
    let shown: String = ct.chars().take(100).collect();
    ApiError::unsupported_media_type(
        format!(
            "content type {shown:?} is not accepted by source {:?}",
            src.name
        ),
        &src.content_types,
    )
}

/// Reads the body within the source's limit: a declared length over the
/// limit is refused before reading; a body that grows past it while read is
/// cut off with the same 413.
pub async fn read_body(
    body: HookBody,
    src: &Source,
    req: &Request,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let limit = src.max_body_bytes;
    if let Some(len) = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    match tokio::time::timeout(timeout, body.0.into_bytes_limit(limit)).await {
        Err(_) => Err(ApiError::body_timeout()),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(poem::error::ReadBodyError::PayloadTooLarge)) => Err(ApiError::too_large(limit)),
        Ok(Err(other)) => Err(ApiError::bad_request(
            "INVALID_PAYLOAD",
            format!("the request body could not be read: {other}"),
            None,
        )),
    }
}

/// Scores mapped events (when `score`) for a dry run or a validation, with
/// the pipeline's errors as API errors.
async fn prepare(
    state: &AppState,
    config: &Config,
    src: &Source,
    mapped: Result<Vec<(pipeline::mapping::CanonicalEvent, Bytes)>, PrepareError>,
    score: bool,
) -> Result<Vec<Prepared>, ApiError> {
    let mapped = mapped.map_err(|e| invalid(src, e))?;
    deliver::score_all(state, config, src, mapped, score)
        .await
        .map_err(|e| state.store_failed(&e, "history read"))
}

/// A body that does not decode or map, as a 4xx in the one error body.
fn invalid(src: &Source, e: PrepareError) -> ApiError {
    match e {
        PrepareError::UnsupportedMediaType(ct) => unsupported(src, &ct),
        PrepareError::Decode(d) => ApiError::bad_request("INVALID_PAYLOAD", d.to_string(), None),
        PrepareError::Statement(m) => ApiError::bad_request("INVALID_PAYLOAD", m, None),
        PrepareError::Mapping { index, error } => {
            let mut details = json!({
                "missing_fields": error.missing_fields,
                "invalid_fields": error.invalid_fields,
            });
            if let Some(i) = index {
                details["statement"] = json!(i);
            }
            ApiError::bad_request("VALIDATION_ERROR", error.message(), Some(details))
        }
    }
}

fn dry_run_result(src: &Source, prepared: &[Prepared]) -> DryRunResult {
    let events: Vec<DryRunEvent> = prepared
        .iter()
        .map(|p| DryRunEvent {
            event: serde_json::to_value(&p.event).unwrap_or_default(),
            points_awarded: p.points(),
            awards: p
                .outcome
                .as_ref()
                .map(|a| {
                    a.iter()
                        .map(|a| AwardView {
                            rule: a.rule.to_string(),
                            points: a.points,
                            reason: a.reason.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            rule_error: p.outcome.as_ref().err().map(|e| e.to_string()),
        })
        .collect();
    DryRunResult {
        status: "success".into(),
        event_id: crate::store::new_event_id(),
        processed_at: rfc3339_ms(None),
        dry_run: true,
        source: src.name.clone(),
        points_awarded: events.iter().map(|e| e.points_awarded).sum(),
        events,
    }
}
