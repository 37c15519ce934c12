//! The event log: stored events listed and searched, one event with the
//! request as received, and replaying events through the current rules.
//! All need the admin token.

use std::sync::Arc;

use poem::web::Data;
use poem::Request;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};

use super::analytics::{parse_time, rfc3339, LedgerView};
use super::error::ApiError;
use super::{AdminToken, ApiTags};
use crate::replay::Replayed;
use crate::state::AppState;
use crate::store::events::{EventFilter, LoggedEvent};
use crate::store::EventStatus;

/// One stored event.
#[derive(Debug, Object)]
pub struct EventView {
    pub event_id: String,
    pub source: String,
    /// `processed`, `queued` or `failed`.
    pub status: String,
    #[oai(skip_serializing_if_is_none)]
    pub event_type: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub user_id: Option<String>,
    pub points: i64,
    /// The dedupe key (the payload's id or `sha256:` of its bytes).
    pub dedupe_key: String,
    /// Why processing failed, for a failed event.
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
    pub attempts: i64,
    pub received_at: String,
    #[oai(skip_serializing_if_is_none)]
    pub processed_at: Option<String>,
    /// The canonical event.
    pub canonical: serde_json::Value,
    pub awards: Vec<LedgerView>,
    /// The request as received.
    pub request: RequestView,
}

/// A stored event's request.
#[derive(Debug, Object)]
pub struct RequestView {
    /// Its headers, names in lower case; those carrying a credential read
    /// `[redacted]`. Absent for events stored before headers were kept.
    #[oai(skip_serializing_if_is_none)]
    pub headers: Option<serde_json::Value>,
    /// The body as stored (a body token removed), when it is UTF-8 text.
    #[oai(skip_serializing_if_is_none)]
    pub body: Option<String>,
    /// The body in base64, when it is not UTF-8 text.
    #[oai(skip_serializing_if_is_none)]
    pub body_base64: Option<String>,
}

impl RequestView {
    fn new(headers: Option<serde_json::Value>, raw: Vec<u8>) -> Self {
        use base64::Engine as _;
        match String::from_utf8(raw) {
            Ok(body) => RequestView {
                headers,
                body: Some(body),
                body_base64: None,
            },
            Err(e) => RequestView {
                headers,
                body: None,
                body_base64: Some(base64::engine::general_purpose::STANDARD.encode(e.as_bytes())),
            },
        }
    }
}

/// One event in the log.
#[derive(Debug, Object)]
pub struct LoggedEventView {
    pub event_id: String,
    pub source: String,
    /// The namespace its points count in.
    pub namespace: String,
    /// The vendor's name for the event.
    #[oai(skip_serializing_if_is_none)]
    pub vendor_event_type: Option<String>,
    /// The canonical type (none: stored, not scored).
    #[oai(skip_serializing_if_is_none)]
    pub event_type: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub user_id: Option<String>,
    /// `processed`, `queued`, `failed` or `erased`.
    pub status: String,
    pub points: i64,
    pub received_at: String,
    /// Why it failed, for a failed event.
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
}

impl From<LoggedEvent> for LoggedEventView {
    fn from(e: LoggedEvent) -> Self {
        LoggedEventView {
            event_id: e.event_id,
            source: e.source,
            namespace: e.namespace,
            vendor_event_type: e.vendor_event_type,
            event_type: e.event_type,
            user_id: e.user_id,
            status: e.status.as_str().to_string(),
            points: e.points,
            received_at: rfc3339(e.received_at),
            error: e.error,
        }
    }
}

/// A page of the event log.
#[derive(Debug, Object)]
pub struct EventPage {
    /// Newest first.
    pub items: Vec<LoggedEventView>,
    /// Pass as `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Events to replay: a list of ids, or filters (with a cursor).
#[derive(Debug, Object, Default)]
pub struct ReplayRequest {
    /// These events (at most 500); the filters are then not used.
    pub event_ids: Option<Vec<String>>,
    /// Only this source's events.
    pub source: Option<String>,
    /// `failed` (the default), `processed` (with `rescore`), `queued` or
    /// `erased` (both reported skipped).
    pub status: Option<String>,
    pub event_type: Option<String>,
    pub user_id: Option<String>,
    /// Received at or after this time (RFC 3339 or Unix seconds).
    pub since: Option<String>,
    /// Received before this time (RFC 3339 or Unix seconds).
    pub until: Option<String>,
    /// Events per call (1–500, default 100).
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous call.
    pub cursor: Option<String>,
    /// Also score processed events again, rewriting their awards where the
    /// rules now give others (never awarding twice). Without it a processed
    /// event is reported as skipped.
    #[oai(default)]
    pub rescore: bool,
}

/// What a replay did to one event.
#[derive(Debug, Object)]
pub struct ReplayItem {
    pub event_id: String,
    /// `processed` (a failed event, scored now), `rescored` (awards
    /// changed), `unchanged`, `failed` (its rules failed again) or `skipped`.
    pub outcome: String,
    /// Its points now, for processed, rescored and unchanged events.
    #[oai(skip_serializing_if_is_none)]
    pub points: Option<i64>,
    /// Why it failed or was skipped.
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
}

/// What a replay call did.
#[derive(Debug, Object)]
pub struct ReplayResult {
    pub status: String,
    pub processed: u64,
    pub rescored: u64,
    pub unchanged: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Points added to learners' totals (negative: taken away).
    pub points_delta: i64,
    /// Oldest first.
    pub items: Vec<ReplayItem>,
    /// With filters: pass as `cursor` to replay the next (older) events;
    /// null when none are left.
    pub next_cursor: Option<String>,
}

/// Most events one list page or replay call takes.
const MAX_PAGE: i64 = 500;

pub struct EventsApi;

#[OpenApi]
impl EventsApi {
    /// The event log, newest first, filtered, a page at a time.
    ///
    /// The source, failed status, learner and time bounds are served by
    /// indexes; the type and other statuses narrow those. `since`/`until`
    /// bound the time an event was received; `user_id` looks in the namespaces of the
    /// loaded sources (or of `source`). The cursor keeps working while new
    /// events arrive: a page never shifts.
    #[oai(
        path = "/api/v1/events",
        method = "get",
        operation_id = "listEvents",
        tag = "ApiTags::Analytics"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminToken,
        req: &Request,
        /// Only this source's events.
        source: Query<Option<String>>,
        /// `processed`, `queued`, `failed` or `erased`.
        status: Query<Option<String>>,
        /// Only events of this canonical type.
        event_type: Query<Option<String>>,
        /// Only this learner's events.
        user_id: Query<Option<String>>,
        /// Received at or after this time (RFC 3339 or Unix seconds).
        since: Query<Option<String>>,
        /// Received before this time (RFC 3339 or Unix seconds).
        until: Query<Option<String>>,
        /// Events per page (1–500, default 50).
        limit: Query<Option<i64>>,
        /// The `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Json<EventPage>, ApiError> {
        state.require_admin(req, &auth)?;
        let filter = ReplayRequest {
            source: source.0,
            status: status.0,
            event_type: event_type.0,
            user_id: user_id.0,
            since: since.0,
            until: until.0,
            ..ReplayRequest::default()
        };
        let filter = event_filter(&state, filter, None)?;
        let limit = limit.0.unwrap_or(50).clamp(1, MAX_PAGE);
        let cursor = checked_cursor(cursor.0)?;
        let mut items = state
            .store
            .list_events(&filter, cursor.as_deref(), limit + 1)
            .await
            .map_err(|e| state.store_failed(&e, "store read"))?;
        let next_cursor = next_cursor(&mut items, limit, |e| &e.event_id);
        Ok(Json(EventPage {
            items: items.into_iter().map(Into::into).collect(),
            next_cursor,
        }))
    }

    /// One stored event: status, canonical form, points, ledger entries and
    /// the request as received (credentials redacted).
    #[oai(
        path = "/api/v1/events/:event_id",
        method = "get",
        operation_id = "getEvent",
        tag = "ApiTags::Analytics"
    )]
    async fn event(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminToken,
        req: &Request,
        event_id: Path<String>,
    ) -> Result<Json<EventView>, ApiError> {
        state.require_admin(req, &auth)?;
        let rec = state
            .store
            .event(&event_id.0)
            .await
            .map_err(|e| state.store_failed(&e, "store read"))?
            .ok_or_else(|| {
                ApiError::not_found("UNKNOWN_EVENT", "no event with this id is stored")
            })?;
        Ok(Json(EventView {
            event_id: rec.event_id,
            source: rec.source,
            status: crate::store::EventStatus::from_stored(&rec.status)
                .map_err(|e| state.store_failed(&e, "store read"))?
                .as_str()
                .to_string(),
            event_type: rec.event_type,
            user_id: rec.user_id,
            points: rec.points,
            dedupe_key: rec.dedupe_key,
            error: rec.error,
            attempts: rec.attempts,
            received_at: rfc3339(rec.received_at),
            processed_at: rec.processed_at.map(rfc3339),
            canonical: rec.canonical,
            awards: rec.awards.into_iter().map(Into::into).collect(),
            request: RequestView::new(rec.request_headers, rec.raw),
        }))
    }

    /// Score events again with the current rules, never awarding twice.
    ///
    /// By ids, or by filters (default: the failed events) a bounded number
    /// at a time with a cursor. A failed event becomes processed when its
    /// rules pass now; a processed one is rescored only with `rescore`;
    /// queued ones are left to the workers. Safe while the server serves
    /// and across instances: of two replays of one event, one scores it and
    /// the other reports it skipped.
    #[oai(
        path = "/api/admin/events/replay",
        method = "post",
        operation_id = "replayEvents",
        tag = "ApiTags::Admin"
    )]
    async fn replay(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminToken,
        req: &Request,
        body: Json<ReplayRequest>,
    ) -> Result<Json<ReplayResult>, ApiError> {
        state.require_admin(req, &auth)?;
        let body = body.0;
        let rescore = body.rescore;
        let (ids, next_cursor) = selected(&state, body).await?;
        let events = state
            .store
            .stored_events(&ids)
            .await
            .map_err(|e| state.store_failed(&e, "store read"))?;
        let mut missing: Vec<String> = ids
            .into_iter()
            .filter(|id| !events.iter().any(|e| &e.id == id))
            .collect();
        missing.dedup();
        let config = state.config.load_full();
        let done = crate::replay::replay(&config, &state.store, events, rescore)
            .await
            .map_err(|e| state.store_failed(&e, "replay"))?;
        let mut result = ReplayResult {
            status: "success".into(),
            processed: 0,
            rescored: 0,
            unchanged: 0,
            failed: 0,
            skipped: 0,
            points_delta: 0,
            items: Vec::with_capacity(done.len() + missing.len()),
            next_cursor,
        };
        for (event_id, outcome) in done {
            let item = tally(&mut result, event_id, outcome);
            result.items.push(item);
        }
        for event_id in missing {
            let skipped = Replayed::Skipped {
                reason: "no event with this id is stored".into(),
            };
            let item = tally(&mut result, event_id, skipped);
            result.items.push(item);
        }
        tracing::info!(
            processed = result.processed,
            rescored = result.rescored,
            unchanged = result.unchanged,
            failed = result.failed,
            skipped = result.skipped,
            points_delta = result.points_delta,
            rescore,
            "events replayed"
        );
        if result.processed + result.rescored > 0 {
            state.queue_ready.notify_waiters();
        }
        Ok(Json(result))
    }
}

/// The ids a replay takes, and the cursor past them (with filters).
async fn selected(
    state: &AppState,
    body: ReplayRequest,
) -> Result<(Vec<String>, Option<String>), ApiError> {
    match body.event_ids.clone() {
        Some(ids) if ids.len() as i64 > MAX_PAGE => Err(invalid(
            "event_ids",
            format!("at most {MAX_PAGE} ids per call"),
        )),
        Some(ids) => Ok((ids, None)),
        None => {
            let limit = body.limit.unwrap_or(100).clamp(1, MAX_PAGE);
            let cursor = checked_cursor(body.cursor.clone())?;
            let filter = event_filter(state, body, Some(EventStatus::Failed))?;
            let mut found = state
                .store
                .list_events(&filter, cursor.as_deref(), limit + 1)
                .await
                .map_err(|e| state.store_failed(&e, "store read"))?;
            let next = next_cursor(&mut found, limit, |e| &e.event_id);
            Ok((found.into_iter().map(|e| e.event_id).collect(), next))
        }
    }
}

/// Counts one replayed event in the result and returns its line.
fn tally(result: &mut ReplayResult, event_id: String, outcome: Replayed) -> ReplayItem {
    let (name, points, reason) = match outcome {
        Replayed::Processed { points } => {
            result.processed += 1;
            result.points_delta += points;
            ("processed", Some(points), None)
        }
        Replayed::Rescored { points, delta } => {
            result.rescored += 1;
            result.points_delta += delta;
            ("rescored", Some(points), None)
        }
        Replayed::Unchanged { points } => {
            result.unchanged += 1;
            ("unchanged", Some(points), None)
        }
        Replayed::Failed { reason } => {
            result.failed += 1;
            ("failed", None, Some(reason))
        }
        Replayed::Skipped { reason } => {
            result.skipped += 1;
            ("skipped", None, Some(reason))
        }
    };
    ReplayItem {
        event_id,
        outcome: name.into(),
        points,
        reason,
    }
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::bad_request(
        "INVALID_REQUEST",
        message,
        Some(serde_json::json!({ "invalid_fields": [field] })),
    )
}

/// The store's filter for the request's; `status` defaults to `default`.
fn event_filter(
    state: &AppState,
    r: ReplayRequest,
    default: Option<EventStatus>,
) -> Result<EventFilter, ApiError> {
    let status = match r.status.as_deref() {
        None => default,
        Some("processed") => Some(EventStatus::Processed),
        Some("queued") => Some(EventStatus::Queued),
        Some("failed") => Some(EventStatus::Failed),
        Some("erased") => Some(EventStatus::Erased),
        Some(_) => {
            return Err(invalid(
                "status",
                "`status` is processed, queued, failed or erased".into(),
            ))
        }
    };
    let config = state.config.load();
    let namespaces: Vec<String> = match &r.source {
        Some(name) => vec![config
            .source(name)
            .map_or_else(|| name.clone(), |s| s.namespace.clone())],
        None => {
            let mut all: Vec<String> = config
                .sources
                .values()
                .map(|s| s.namespace.clone())
                .collect();
            all.sort();
            all.dedup();
            all
        }
    };
    Ok(EventFilter {
        source: r.source,
        status,
        event_type: r.event_type,
        user_id: r.user_id,
        namespaces,
        since_ms: parse_time("since", &r.since)?,
        until_ms: parse_time("until", &r.until)?,
    })
}

/// A cursor is an event id: `evt_` and 26 letters and digits.
fn checked_cursor(cursor: Option<String>) -> Result<Option<String>, ApiError> {
    match cursor {
        Some(c)
            if !(c.len() == 30
                && c.starts_with("evt_")
                && c[4..].bytes().all(|b| b.is_ascii_alphanumeric())) =>
        {
            Err(invalid(
                "cursor",
                "`cursor` is the `next_cursor` of a previous page".into(),
            ))
        }
        other => Ok(other),
    }
}

/// Keeps the first `limit` of `limit + 1` rows read; the cursor past them
/// when there were more.
fn next_cursor<T>(items: &mut Vec<T>, limit: i64, id: impl Fn(&T) -> &String) -> Option<String> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if items.len() <= limit {
        return None;
    }
    items.truncate(limit);
    items.last().map(|e| id(e).clone())
}
