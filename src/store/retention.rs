//! Retention's writes: one small batch at a time. A batch reads the next
//! events of a source in id order (up to a cutoff id: the first id of the
//! cutoff day) from where the last batch stopped (`retention_marks`),
//! outside any write transaction; then, in one short transaction, prunes
//! those that qualified (each guarded again by its status and points) and
//! moves the mark, so the hook's writer never waits behind the reading.
//! Each event is examined once, when it reaches the age: a failed or
//! queued one then is kept. Ledger entries and totals are never touched.

use sqlx::Row;

use super::{with_pool, Store, StoreError};

/// What retention prunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prune {
    /// Raw bodies and request headers.
    Raw,
    /// Whole processed (or erased) events of zero points without a ledger
    /// entry.
    ZeroPointEvents,
}

impl Prune {
    pub fn label(self) -> &'static str {
        match self {
            Prune::Raw => "raw",
            Prune::ZeroPointEvents => "events",
        }
    }
}

// A write first: SQLite takes the write lock at once (waiting its busy
// timeout, never failing to upgrade a read), and on PostgreSQL the mark's
// row lock keeps two instances off the same batch.
const READ_MARK: &str = "SELECT upto FROM retention_marks WHERE source = $1 AND kind = $2";
const MARK: &str = "INSERT INTO retention_marks (source, kind, upto) VALUES ($1, $2, '') \
    ON CONFLICT (source, kind) DO UPDATE SET upto = retention_marks.upto RETURNING upto";
const SET_MARK: &str = "INSERT INTO retention_marks (source, kind, upto) VALUES ($1, $2, $3) \
    ON CONFLICT (source, kind) DO UPDATE SET upto = excluded.upto";
// Through `events_source_log`. Whether each qualifies is read with it.
const NEXT_RAW: &str = "SELECT id, (length(raw) > 0 OR request_headers IS NOT NULL) AS prunable \
    FROM events WHERE source = $1 AND id > $2 AND id < $3 ORDER BY id LIMIT $4";
const NEXT_EVENTS: &str = "SELECT id, (points = 0 AND status IN ('processed', 'erased') \
    AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.namespace = events.namespace \
    AND l.user_id = events.user_id AND l.event_id = events.id)) AS prunable \
    FROM events WHERE source = $1 AND id > $2 AND id < $3 ORDER BY id LIMIT $4";
const DROP_RAW: &str = "UPDATE events SET raw = $1, request_headers = NULL WHERE id = $2";
// On PostgreSQL the event's row is locked first, and the delete that
// follows, a statement of its own, reads the ledger in a snapshot taken
// after the lock: a rescore that held the row and awarded it is then seen.
// (In one statement, the wait for the row lock re-checks the row but not
// the ledger, and the event would go with its awards left behind.)
const LOCK_EVENT_PG: &str = "SELECT 1 FROM events WHERE id = $1 FOR UPDATE";
// Guarded: an event scored or awarded since it was read is kept.
const DELETE_EVENT: &str = "DELETE FROM events WHERE id = $1 AND points = 0 \
    AND status IN ('processed', 'erased') AND NOT EXISTS (SELECT 1 FROM ledger l \
    WHERE l.namespace = events.namespace AND l.user_id = events.user_id AND l.event_id = events.id)";

/// One batch: how many events were examined and how many pruned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Batch {
    pub examined: u64,
    pub pruned: u64,
}

impl Store {
    /// Prunes the next batch of up to `limit` of `source`'s events received
    /// before `cutoff_id`.
    pub async fn prune_batch(
        &self,
        source: &str,
        what: Prune,
        cutoff_id: &str,
        limit: i64,
    ) -> Result<Batch, StoreError> {
        let next = match what {
            Prune::Raw => NEXT_RAW,
            Prune::ZeroPointEvents => NEXT_EVENTS,
        };
        let postgres = matches!(self.pool, super::Pool::Postgres(_));
        with_pool!(&self.pool, p => {
            // Read without the write lock.
            let mark: String = sqlx::query(READ_MARK)
                .bind(source)
                .bind(what.label())
                .fetch_optional(p)
                .await?
                .map(|r| r.try_get("upto"))
                .transpose()?
                .unwrap_or_default();
            let rows = sqlx::query(next)
                .bind(source)
                .bind(&mark)
                .bind(cutoff_id)
                .bind(limit)
                .fetch_all(p)
                .await?;
            let mut prunable = Vec::new();
            for r in &rows {
                if r.try_get::<bool, _>("prunable")? {
                    prunable.push(r.try_get::<String, _>("id")?);
                }
            }
            let Some(last) = rows.last().map(|r| r.try_get::<String, _>("id")).transpose()? else {
                return Ok(Batch::default());
            };
            let mut tx = p.begin().await?;
            // The mark as this batch read it, locked: a pass elsewhere that
            // moved it first wins, and this batch writes nothing.
            let locked: String = sqlx::query(MARK)
                .bind(source)
                .bind(what.label())
                .fetch_one(&mut *tx)
                .await?
                .try_get("upto")?;
            if locked != mark {
                return Ok(Batch::default());
            }
            let mut pruned = 0;
            for id in &prunable {
                let done = match what {
                    Prune::Raw => sqlx::query(DROP_RAW).bind(Vec::<u8>::new()).bind(id).execute(&mut *tx).await?,
                    Prune::ZeroPointEvents => {
                        if postgres {
                            sqlx::query(LOCK_EVENT_PG).bind(id).execute(&mut *tx).await?;
                        }
                        sqlx::query(DELETE_EVENT).bind(id).execute(&mut *tx).await?
                    }
                };
                pruned += done.rows_affected();
            }
            sqlx::query(SET_MARK).bind(source).bind(what.label()).bind(&last).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(Batch { examined: rows.len() as u64, pruned })
        })
    }
}
