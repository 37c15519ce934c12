//! The queue of async sources' events, kept in the events table itself: a
//! `queued` event is claimed by a worker with a random token and a lease;
//! the worker's result is written only if its claim still stands, so an
//! event whose worker died (lease expired, claimed again) is awarded once.
//! On PostgreSQL, `FOR UPDATE SKIP LOCKED` lets the workers of several
//! instances claim without waiting on each other.

use sqlx::Row;

use super::{insert_awards, with_pool, Pool, Store, StoreError, SET_POINTS, UPSERT_TOTAL};
use crate::pipeline::rules::Award;

/// Attempts (the delivery counts as the first) before a failing event rests as `failed`.
pub const MAX_ATTEMPTS: i64 = 5;
/// A claim older than this is presumed dead and the event claimable again.
pub const LEASE_MS: i64 = 60_000;

/// A claimed event.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub source: String,
    pub namespace: String,
    pub canonical: String,
    pub attempts: i64,
    pub claim: String,
}

// `status IN (…)` is redundant but lets SQLite use the partial `events_queue`
// index (its planner does not derive it from the OR); without it every idle
// poll scanned the whole events table.
pub(super) const CLAIM_SQLITE: &str = "UPDATE events SET status = 'processing', claim = $1, claimed_at = $2 \
    WHERE id IN (SELECT id FROM events WHERE status IN ('queued', 'processing') \
    AND ((status = 'queued' AND next_attempt_at <= $2) OR (status = 'processing' AND claimed_at < $3)) \
    ORDER BY received_at LIMIT $4) \
    RETURNING id, source, namespace, canonical, attempts";
const CLAIM_POSTGRES: &str = "UPDATE events SET status = 'processing', claim = $1, claimed_at = $2 \
    WHERE id IN (SELECT id FROM events WHERE status IN ('queued', 'processing') \
    AND ((status = 'queued' AND next_attempt_at <= $2) OR (status = 'processing' AND claimed_at < $3)) \
    ORDER BY received_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
    RETURNING id, source, namespace, canonical, attempts";
const DONE: &str =
    "UPDATE events SET status = 'processed', points = $1, error = NULL, processed_at = $2, \
    claim = NULL WHERE id = $3 AND claim = $4 AND status = 'processing'";
const USER_OF: &str = "SELECT user_id, course_id, occurred_at FROM events WHERE id = $1";
const RETRY_LATER: &str =
    "UPDATE events SET status = $1, error = $2, attempts = attempts + 1, next_attempt_at = $3, \
    claim = NULL WHERE id = $4 AND claim = $5 AND status = 'processing'";
const ADMIN_RETRY: &str = "UPDATE events SET status = 'queued', next_attempt_at = 0, claim = NULL \
    WHERE id = $1 AND status = 'failed'";

impl Store {
    /// Claims up to `limit` events that are due (or whose claim expired).
    pub async fn claim(&self, limit: i64) -> Result<Vec<Claimed>, StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        let token = ulid::Ulid::new().to_string();
        let sql = match self.pool {
            Pool::Sqlite(_) => CLAIM_SQLITE,
            Pool::Postgres(_) => CLAIM_POSTGRES,
        };
        with_pool!(&self.pool, p => {
            let rows = sqlx::query(sql).bind(&token).bind(now).bind(now - LEASE_MS).bind(limit).fetch_all(p).await?;
            rows.iter()
                .map(|r| {
                    Ok(Claimed {
                        id: r.try_get("id")?,
                        source: r.try_get("source")?,
                        namespace: r.try_get("namespace")?,
                        canonical: r.try_get("canonical")?,
                        attempts: r.try_get("attempts")?,
                        claim: token.clone(),
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// Records a claimed event's outcome: its awards (ledger, totals and
    /// status in one transaction), or a failure that is retried with
    /// exponential backoff until [`MAX_ATTEMPTS`], then rests as `failed`.
    /// Returns false when the claim had been lost (nothing written).
    pub async fn complete(
        &self,
        c: &Claimed,
        outcome: Result<Vec<Award>, String>,
    ) -> Result<bool, StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        with_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            let done = match &outcome {
                Ok(awards) => {
                    let points: i64 = awards.iter().map(|a| a.points).sum();
                    let updated = sqlx::query(DONE).bind(points).bind(now).bind(&c.id).bind(&c.claim).execute(&mut *tx).await?;
                    if updated.rows_affected() != 1 {
                        return Ok(false);
                    }
                    let row = sqlx::query(USER_OF).bind(&c.id).fetch_one(&mut *tx).await?;
                    let user: Option<String> = row.try_get("user_id")?;
                    let course: Option<String> = row.try_get("course_id")?;
                    let occurred: i64 = row.try_get("occurred_at")?;
                    if let Some(user) = user {
                        // The event counted in the total first, then the awards,
                        // then their points: every writer locks a learner's
                        // total before the summary sums the ledger's triggers
                        // lock (PostgreSQL's migration 0008).
                        let total = |points: i64, events: i64| {
                            sqlx::query(UPSERT_TOTAL).bind(&c.namespace).bind(&user).bind(points).bind(events).bind(now)
                        };
                        total(0, 1).execute(&mut *tx).await?;
                        let inserted = insert_awards!(tx, awards, event = &c.id, ns = &c.namespace,
                            user = &user, course = &course, occurred = occurred, now = now);
                        if inserted != points {
                            sqlx::query(SET_POINTS).bind(inserted).bind(&c.id).execute(&mut *tx).await?;
                        }
                        if inserted != 0 {
                            total(inserted, 0).execute(&mut *tx).await?;
                        }
                    }
                    true
                }
                Err(message) => {
                    let attempts = c.attempts + 1;
                    let (status, next) = if attempts >= MAX_ATTEMPTS {
                        ("failed", 0)
                    } else {
                        // 1 s, 2 s, 4 s, 8 s …
                        ("queued", now + 1000 * (1i64 << (attempts - 1).clamp(0, 20)))
                    };
                    let updated = sqlx::query(RETRY_LATER)
                        .bind(status)
                        .bind(message)
                        .bind(next)
                        .bind(&c.id)
                        .bind(&c.claim)
                        .execute(&mut *tx)
                        .await?;
                    updated.rows_affected() == 1
                }
            };
            tx.commit().await?;
            Ok(done)
        })
    }

    /// Queues a failed event again (an admin fixed the cause). False when
    /// there is no failed event with this id.
    pub async fn retry(&self, id: &str) -> Result<bool, StoreError> {
        with_pool!(&self.pool, p => {
            let r = sqlx::query(ADMIN_RETRY).bind(id).execute(p).await?;
            Ok(r.rows_affected() == 1)
        })
    }
}
