//! Replaying stored events through the current rules (an admin changed a
//! rule): each changed event's ledger entries, points and its user's total
//! are rewritten in one transaction of its own, guarded by the values read,
//! so it is safe while the server serves (a concurrent change wins; the
//! event is reported as skipped).

use sqlx::Row;

use super::{insert_awards, with_pool, Store, StoreError, SET_POINTS, UPSERT_TOTAL};
use crate::pipeline::rules::Award;

/// A stored event as rescoring reads it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: String,
    pub source: String,
    pub namespace: String,
    pub user_id: Option<String>,
    pub course_id: Option<String>,
    pub occurred_at: i64,
    pub status: String,
    pub points: i64,
    pub canonical: String,
}

/// Filters for a rescore.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub source: Option<String>,
    pub since_ms: Option<i64>,
}

const PAGE: &str = "SELECT id, source, namespace, user_id, course_id, occurred_at, status, points, canonical \
    FROM events WHERE status IN ('processed', 'failed') AND (occurred_at > $1 OR (occurred_at = $1 AND id > $2)) \
    AND occurred_at >= $3 AND ($4 = '' OR source = $4) ORDER BY occurred_at, id LIMIT $5";
const GUARD: &str = "UPDATE events SET status = 'processed', points = $1, error = NULL WHERE id = $2 AND status = $3 AND points = $4";
const DELETE_LEDGER: &str =
    "DELETE FROM ledger WHERE namespace = $1 AND user_id = $2 AND event_id = $3";
// An event's ledger rows are found through its user's index.
const ONCE_HOLDER: &str = "SELECT event_id FROM ledger WHERE namespace = $1 AND user_id = $2 \
    AND rule = $3 AND once_key = $4";
pub(super) const AWARDS: &str =
    "SELECT rule, points, once_key FROM ledger WHERE namespace = $1 AND user_id = $2 \
    AND event_id = $3 ORDER BY id";

fn stored_of<R: Row>(r: &R) -> Result<Stored, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Stored {
        id: r.try_get("id")?,
        source: r.try_get("source")?,
        namespace: r.try_get("namespace")?,
        user_id: r.try_get("user_id")?,
        course_id: r.try_get("course_id")?,
        occurred_at: r.try_get("occurred_at")?,
        status: r.try_get("status")?,
        points: r.try_get("points")?,
        canonical: r.try_get("canonical")?,
    })
}

impl Store {
    /// The next page of events after `(after_ms, after_id)`, oldest first.
    pub async fn rescore_page(
        &self,
        selection: &Selection,
        after: (i64, &str),
        limit: i64,
    ) -> Result<Vec<Stored>, StoreError> {
        with_pool!(&self.pool, p => {
            let rows = sqlx::query(PAGE)
                .bind(after.0)
                .bind(after.1)
                .bind(selection.since_ms.unwrap_or(i64::MIN))
                .bind(selection.source.as_deref().unwrap_or(""))
                .bind(limit)
                .fetch_all(p)
                .await?;
            rows.iter().map(stored_of).collect::<Result<Vec<_>, sqlx::Error>>().map_err(StoreError::from)
        })
    }

    /// The events with these ids, in no particular order (unknown ids are
    /// left out).
    pub async fn stored_events(&self, ids: &[String]) -> Result<Vec<Stored>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        with_pool!(&self.pool, p => {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT id, source, namespace, user_id, course_id, occurred_at, status, points, canonical \
                 FROM events WHERE id IN (",
            );
            let mut list = q.separated(", ");
            for id in ids {
                list.push_bind(id.clone());
            }
            q.push(")");
            let rows = q.build().fetch_all(p).await?;
            rows.iter().map(stored_of).collect::<Result<Vec<_>, sqlx::Error>>().map_err(StoreError::from)
        })
    }

    /// An event's ledger entries as (rule, points, once key).
    pub async fn awards_of(
        &self,
        ev: &Stored,
    ) -> Result<Vec<(String, i64, Option<String>)>, StoreError> {
        let Some(user) = &ev.user_id else {
            return Ok(Vec::new());
        };
        with_pool!(&self.pool, p => {
            let rows = sqlx::query(AWARDS).bind(&ev.namespace).bind(user).bind(&ev.id).fetch_all(p).await?;
            rows.iter()
                .map(|r| Ok((r.try_get("rule")?, r.try_get("points")?, r.try_get("once_key")?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// The event whose ledger row holds a once-award's key for this user
    /// and rule, if any.
    pub async fn once_holder(
        &self,
        ev: &Stored,
        award: &Award,
    ) -> Result<Option<String>, StoreError> {
        let (Some(user), Some(key)) = (&ev.user_id, &award.once) else {
            return Ok(None);
        };
        with_pool!(&self.pool, p => {
            let row = sqlx::query(ONCE_HOLDER)
                .bind(&ev.namespace)
                .bind(user)
                .bind(award.rule.as_ref())
                .bind(key)
                .fetch_optional(p)
                .await?;
            row.map(|r| r.try_get("event_id"))
                .transpose()
                .map_err(StoreError::from)
        })
    }

    /// Replaces an event's awards. False when the event changed since it was
    /// read (nothing written).
    pub async fn rewrite_awards(&self, ev: &Stored, awards: &[Award]) -> Result<bool, StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        let points: i64 = awards.iter().map(|a| a.points).sum();
        with_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            let guarded = sqlx::query(GUARD).bind(points).bind(&ev.id).bind(&ev.status).bind(ev.points).execute(&mut *tx).await?;
            if guarded.rows_affected() != 1 {
                return Ok(false);
            }
            if let Some(user) = &ev.user_id {
                let total = |points: i64, events: i64| {
                    sqlx::query(UPSERT_TOTAL).bind(&ev.namespace).bind(user).bind(points).bind(events).bind(now)
                };
                // The old points out of the total first (a failed event's were
                // never in it, nor was it counted), then the ledger, then the
                // new points: every writer locks a learner's total before the
                // summary sums the ledger's triggers lock (PostgreSQL's
                // migration 0008).
                let (old, counted): (i64, i64) = if ev.status == "processed" { (ev.points, 0) } else { (0, 1) };
                total(-old, counted).execute(&mut *tx).await?;
                sqlx::query(DELETE_LEDGER).bind(&ev.namespace).bind(user).bind(&ev.id).execute(&mut *tx).await?;
                let inserted = insert_awards!(tx, awards, event = &ev.id, ns = &ev.namespace,
                    user = user, course = &ev.course_id, occurred = ev.occurred_at, now = now);
                if inserted != points {
                    sqlx::query(SET_POINTS).bind(inserted).bind(&ev.id).execute(&mut *tx).await?;
                }
                if inserted != 0 {
                    total(inserted, 0).execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok(true)
        })
    }
}
