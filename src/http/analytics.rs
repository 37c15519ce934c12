//! Reads of the ledger: a user's standing, leaderboards, stats.
//! All need the admin token.

use std::sync::Arc;

use poem::web::Data;
use poem::Request;

use chrono::{DateTime, TimeZone, Utc};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};

use super::error::ApiError;
use super::{AdminToken, ApiTags};
use crate::state::AppState;
use crate::store::{LeaderboardQuery, LedgerEntry};

/// One ledger entry.
#[derive(Debug, Object)]
pub struct LedgerView {
    pub event_id: String,
    pub rule: String,
    pub points: i64,
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub course_id: Option<String>,
    /// When the event happened (RFC 3339).
    pub occurred_at: String,
}

impl From<LedgerEntry> for LedgerView {
    fn from(e: LedgerEntry) -> Self {
        LedgerView {
            event_id: e.event_id,
            rule: e.rule,
            points: e.points,
            reason: e.reason,
            course_id: e.course_id,
            occurred_at: rfc3339(e.occurred_at),
        }
    }
}

/// A user's standing within a source namespace.
#[derive(Debug, Object)]
pub struct UserView {
    pub source: String,
    pub user_id: String,
    pub total_points: i64,
    /// Level on the configured curve (1 at 0 points).
    pub level: i64,
    /// Points at which the next level starts.
    pub next_level_at: i64,
    /// Processed events that named this user.
    pub event_count: i64,
    /// The most recent ledger entries, newest first.
    pub recent: Vec<LedgerView>,
}

#[derive(Debug, Object)]
pub struct LeaderboardEntry {
    /// Standard competition rank: equal points share a rank (1, 1, 3).
    pub rank: i64,
    pub source: String,
    pub user_id: String,
    pub points: i64,
}

#[derive(Debug, Object)]
pub struct Leaderboard {
    pub entries: Vec<LeaderboardEntry>,
}

#[derive(Debug, Object)]
pub struct TypeCount {
    pub source: String,
    pub event_type: String,
    pub status: String,
    pub count: i64,
}

#[derive(Debug, Object)]
pub struct DayPoints {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub points: i64,
}

#[derive(Debug, Object)]
pub struct StatsView {
    pub events: Vec<TypeCount>,
    pub points_per_day: Vec<DayPoints>,
}

pub struct AnalyticsApi;

pub(super) fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(super) fn parse_time(name: &str, v: &Option<String>) -> Result<Option<i64>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.timestamp_millis()))
            .or_else(|_| s.parse::<i64>().map(|secs| Some(secs.saturating_mul(1000))))
            .map_err(|_| {
                ApiError::bad_request(
                    "INVALID_REQUEST",
                    format!("`{name}` must be an RFC 3339 time or Unix seconds"),
                    Some(serde_json::json!({ "invalid_fields": [name] })),
                )
            }),
    }
}

// The leaderboard takes one documented query parameter each.
#[allow(clippy::too_many_arguments)]
#[OpenApi(tag = "ApiTags::Analytics")]
impl AnalyticsApi {
    /// A user's total, level, event count and recent ledger entries.
    ///
    /// `source` is the user's namespace (a source's name unless its YAML sets
    /// another). An unknown user has 0 points; a namespace that no loaded
    /// source has and that holds nothing for the user is a 404.
    #[oai(
        path = "/api/v1/users/:source/:user_id",
        method = "get",
        operation_id = "getUser"
    )]
    async fn user(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminToken,
        req: &Request,
        /// The user's namespace (a source's name unless its YAML sets another).
        #[oai(name = "source")]
        namespace: Path<String>,
        user_id: Path<String>,
        /// How many recent ledger entries to return (1–200, default 20).
        limit: Query<Option<i64>>,
    ) -> Result<Json<UserView>, ApiError> {
        state.require_admin(req, &auth)?;
        let limit = limit.0.unwrap_or(20).clamp(1, 200);
        let rec = state
            .store
            .user(&namespace.0, &user_id.0, limit)
            .await
            .map_err(|e| state.store_failed(&e, "store read"))?;
        // An unknown user of a known namespace has 0 points; a namespace no
        // loaded source has, and that holds nothing for the user, is a typo.
        // (A removed source's users stay readable.)
        let known = state
            .config
            .load()
            .sources
            .values()
            .any(|s| s.namespace == namespace.0);
        if !known && rec.events == 0 && rec.total_points == 0 && rec.recent.is_empty() {
            let shown: String = namespace.0.chars().take(64).collect();
            return Err(ApiError::not_found(
                "UNKNOWN_SOURCE",
                format!("no loaded source has the namespace {shown:?}"),
            ));
        }
        let curve = &state.levels;
        Ok(Json(UserView {
            source: namespace.0,
            user_id: user_id.0,
            total_points: rec.total_points,
            level: curve.level(rec.total_points),
            next_level_at: curve.next_threshold(rec.total_points),
            event_count: rec.events,
            recent: rec.recent.into_iter().map(Into::into).collect(),
        }))
    }

    /// Leaderboard: overall, per source namespace, per course, per time window.
    #[oai(
        path = "/api/v1/leaderboard",
        method = "get",
        operation_id = "getLeaderboard"
    )]
    async fn leaderboard(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminToken,
        req: &Request,
        /// Only users of this source's namespace (a source's name, or a
        /// namespace as the entries show it).
        #[oai(name = "source")]
        namespace: Query<Option<String>>,
        /// Only points earned in this course.
        course_id: Query<Option<String>>,
        /// Only points for events at or after this time (RFC 3339 or Unix seconds).
        since: Query<Option<String>>,
        /// Only points for events before this time (RFC 3339 or Unix seconds).
        until: Query<Option<String>>,
        /// How many entries (1–1000, default 10).
        limit: Query<Option<i64>>,
    ) -> Result<Json<Leaderboard>, ApiError> {
        state.require_admin(req, &auth)?;
        // As the event log reads `source`: a source's name stands for its
        // namespace; anything else is taken as a namespace.
        let namespace = namespace.0.map(|name| {
            state
                .config
                .load()
                .source(&name)
                .map_or(name, |s| s.namespace.clone())
        });
        let q = LeaderboardQuery {
            namespace,
            course_id: course_id.0,
            since_ms: parse_time("since", &since.0)?,
            until_ms: parse_time("until", &until.0)?,
            limit: limit.0.unwrap_or(10).clamp(1, 1000),
        };
        let rows = state
            .store
            .leaderboard(&q)
            .await
            .map_err(|e| state.store_failed(&e, "store read"))?;
        let mut entries = Vec::with_capacity(rows.len());
        let mut rank = 0;
        let mut prev = None;
        for (i, r) in rows.into_iter().enumerate() {
            if prev != Some(r.points) {
                rank = i as i64 + 1;
                prev = Some(r.points);
            }
            entries.push(LeaderboardEntry {
                rank,
                source: r.namespace,
                user_id: r.user_id,
                points: r.points,
            });
        }
        Ok(Json(Leaderboard { entries }))
    }

    /// Event counts per source, type and status; points per day.
    #[oai(path = "/api/v1/stats", method = "get", operation_id = "getStats")]
    async fn stats(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AdminToken,
        req: &Request,
        /// Days of points history (1–366, default 30): points awarded per
        /// UTC day, from the day `days` days ago through today.
        days: Query<Option<i64>>,
    ) -> Result<Json<StatsView>, ApiError> {
        state.require_admin(req, &auth)?;
        let days = days.0.unwrap_or(30).clamp(1, 366);
        let since = Utc::now().timestamp_millis() - days * 86_400_000;
        let s = state
            .store
            .stats(since)
            .await
            .map_err(|e| state.store_failed(&e, "store read"))?;
        // Statuses as the API reports them: an event a worker has claimed
        // is still `queued`.
        let mut events: std::collections::BTreeMap<(String, String, &str), i64> =
            std::collections::BTreeMap::new();
        for (source, event_type, status, count) in s.events {
            let status = crate::store::EventStatus::from_stored(&status)
                .map_err(|e| state.store_failed(&e, "store read"))?
                .as_str();
            *events.entry((source, event_type, status)).or_insert(0) += count;
        }
        Ok(Json(StatsView {
            events: events
                .into_iter()
                .map(|((source, event_type, status), count)| TypeCount {
                    source,
                    event_type,
                    status: status.to_string(),
                    count,
                })
                .collect(),
            points_per_day: s
                .points_per_day
                .into_iter()
                .map(|(day, points)| DayPoints { day, points })
                .collect(),
        }))
    }
}
