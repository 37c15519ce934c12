//! The event log: stored events newest first, filtered, with a cursor that
//! keeps working while new events arrive (an event's id is a ULID of the
//! time it was received, so "newer than the cursor" never shifts a page).
//! Indexes serve the filters: a source's events by `events_source_log`,
//! the failed ones by `events_failed_log`, a learner's by `events_user`,
//! time bounds as bounds on the id; a type or another status narrows them.
//! Also: a learner's erasure, and the backlog the metrics report.

use sqlx::Row;

use super::{with_pool, EventStatus, Store, StoreError};

/// Which events to list. `user_id` is looked up in `namespaces` (a
/// learner's events are indexed by namespace and user).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub source: Option<String>,
    pub status: Option<EventStatus>,
    pub event_type: Option<String>,
    pub user_id: Option<String>,
    pub namespaces: Vec<String>,
    /// Received at or after (ms).
    pub since_ms: Option<i64>,
    /// Received before (ms).
    pub until_ms: Option<i64>,
}

/// One event as the log lists it.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub event_id: String,
    pub source: String,
    pub namespace: String,
    pub vendor_event_type: Option<String>,
    pub event_type: Option<String>,
    pub user_id: Option<String>,
    pub status: EventStatus,
    pub points: i64,
    pub received_at: i64,
    pub error: Option<String>,
}

/// The smallest event id received at `ms` (ids are `evt_` and a ULID).
pub fn first_id_at(ms: i64) -> String {
    // A ULID holds 48 bits of milliseconds (until the year 10889).
    let ms = u64::try_from(ms.max(0)).unwrap_or(0).min((1 << 48) - 1);
    format!("evt_{}", ulid::Ulid::from_parts(ms, 0))
}

/// What erasing a learner removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Erasure {
    pub events: u64,
    pub ledger_entries: u64,
    /// The learner's total before.
    pub points: i64,
}

// An erased event keeps its id, source, dedupe key, types and times (none
// personal), so that a redelivery is recognised; everything that named or
// described the learner goes.
const SCRUB_EVENTS: &str = "UPDATE events SET status = 'erased', user_id = NULL, course_id = NULL, \
    object_id = NULL, points = 0, error = NULL, canonical = '{}', raw = $1, request_headers = NULL, \
    claim = NULL WHERE namespace = $2 AND user_id = $3";
const DELETE_LEDGER: &str = "DELETE FROM ledger WHERE namespace = $1 AND user_id = $2";
const DELETE_TOTAL: &str =
    "DELETE FROM totals WHERE namespace = $1 AND user_id = $2 RETURNING points";

const COLUMNS: &str = "id, source, namespace, vendor_event_type, event_type, user_id, status, \
    points, received_at, error";

/// Appends the filter, the cursor and the order to a `SELECT … FROM events`.
fn push_filter<'a, DB>(
    q: &mut sqlx::QueryBuilder<'a, DB>,
    f: &EventFilter,
    before: Option<&str>,
    limit: i64,
) where
    DB: sqlx::Database,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    q.push(" WHERE 1 = 1");
    if let Some(source) = &f.source {
        q.push(" AND source = ").push_bind(source.clone());
    }
    match f.status {
        // `processing` is a queued event a worker holds.
        Some(EventStatus::Queued) => {
            q.push(" AND status IN ('queued', 'processing')");
        }
        Some(s) => {
            q.push(" AND status = ").push_bind(s.as_str().to_string());
        }
        None => {}
    }
    if let Some(kind) = &f.event_type {
        q.push(" AND event_type = ").push_bind(kind.clone());
    }
    if let Some(user) = &f.user_id {
        q.push(" AND user_id = ").push_bind(user.clone());
        q.push(" AND namespace IN (");
        let mut names = q.separated(", ");
        for ns in &f.namespaces {
            names.push_bind(ns.clone());
        }
        if f.namespaces.is_empty() {
            names.push("NULL");
        }
        q.push(")");
    }
    if let Some(since) = f.since_ms {
        q.push(" AND id >= ").push_bind(first_id_at(since));
    }
    if let Some(until) = f.until_ms {
        q.push(" AND id < ").push_bind(first_id_at(until));
    }
    if let Some(before) = before {
        q.push(" AND id < ").push_bind(before.to_string());
    }
    q.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
}

impl Store {
    /// Up to `limit` events matching `filter`, newest first, older than the
    /// event id `before` when given.
    pub async fn list_events(
        &self,
        filter: &EventFilter,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        with_pool!(&self.pool, p => {
            let mut q = sqlx::QueryBuilder::new(format!("SELECT {COLUMNS} FROM events"));
            push_filter(&mut q, filter, before, limit);
            let rows = q.build().fetch_all(p).await?;
            rows.iter()
                .map(|r| {
                    Ok(LoggedEvent {
                        event_id: r.try_get("id")?,
                        source: r.try_get("source")?,
                        namespace: r.try_get("namespace")?,
                        vendor_event_type: r.try_get("vendor_event_type")?,
                        event_type: r.try_get("event_type")?,
                        user_id: r.try_get("user_id")?,
                        status: EventStatus::from_stored(&r.try_get::<String, _>("status")?)?,
                        points: r.try_get("points")?,
                        received_at: r.try_get("received_at")?,
                        error: r.try_get("error")?,
                    })
                })
                .collect()
        })
    }

    /// How many events are failed, and when the oldest queued one was
    /// received (ms); both read through partial indexes of those statuses.
    pub async fn backlog(&self) -> Result<(i64, Option<i64>), StoreError> {
        const FAILED: &str = "SELECT COUNT(*) FROM events WHERE status = 'failed'";
        const OLDEST: &str =
            "SELECT MIN(received_at) FROM events WHERE status IN ('queued', 'processing')";
        with_pool!(&self.pool, p => {
            let failed: i64 = sqlx::query_scalar(FAILED).fetch_one(p).await?;
            let oldest: Option<i64> = sqlx::query_scalar(OLDEST).fetch_one(p).await?;
            Ok((failed, oldest))
        })
    }

    /// Erases a learner in one transaction: their events become tombstones
    /// without personal data (raw bodies and headers gone), their ledger
    /// entries and total are deleted. Erasing again removes nothing more.
    pub async fn erase_user(&self, namespace: &str, user: &str) -> Result<Erasure, StoreError> {
        with_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            let events = sqlx::query(SCRUB_EVENTS)
                .bind(Vec::<u8>::new())
                .bind(namespace)
                .bind(user)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            // The total before the ledger: every writer locks a learner's
            // total before the summary sums the ledger's triggers lock.
            let points = sqlx::query(DELETE_TOTAL)
                .bind(namespace)
                .bind(user)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get::<i64, _>("points"))
                .transpose()?
                .unwrap_or(0);
            let ledger_entries = sqlx::query(DELETE_LEDGER)
                .bind(namespace)
                .bind(user)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok(Erasure { events, ledger_entries, points })
        })
    }

    /// The plan the database picks for [`Store::list_events`] (for the
    /// tests that hold each filter to an index). On PostgreSQL sequential
    /// scans are disfavoured for the question, as a table of any size would.
    #[doc(hidden)]
    pub async fn explain_list_events(&self, filter: &EventFilter) -> Result<String, StoreError> {
        match &self.pool {
            super::Pool::Sqlite(p) => {
                let mut q = sqlx::QueryBuilder::new(format!(
                    "EXPLAIN QUERY PLAN SELECT {COLUMNS} FROM events"
                ));
                push_filter(&mut q, filter, Some("evt_7ZZZZZZZZZZZZZZZZZZZZZZZZZ"), 50);
                let rows = q.build().fetch_all(p).await?;
                let lines: Result<Vec<String>, sqlx::Error> =
                    rows.iter().map(|r| r.try_get("detail")).collect();
                Ok(lines?.join("\n"))
            }
            super::Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SET LOCAL enable_seqscan = off")
                    .execute(&mut *tx)
                    .await?;
                let mut q =
                    sqlx::QueryBuilder::new(format!("EXPLAIN SELECT {COLUMNS} FROM events"));
                push_filter(&mut q, filter, Some("evt_7ZZZZZZZZZZZZZZZZZZZZZZZZZ"), 50);
                let rows = q.build().fetch_all(&mut *tx).await?;
                let lines: Result<Vec<String>, sqlx::Error> =
                    rows.iter().map(|r| r.try_get(0)).collect();
                Ok(lines?.join("\n"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_bounds_order_like_the_ids_received_then() {
        let at = 1_764_500_000_000;
        let id = format!("evt_{}", ulid::Ulid::from_parts(at as u64, 12345));
        assert!(first_id_at(at) <= id);
        assert!(first_id_at(at + 1) > id);
        assert!(first_id_at(at - 1) < id);
    }
}
