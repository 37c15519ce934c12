//! Retention's writes: one small batch at a time, each its own short
//! transaction, so the hook's writer never waits long for the lock. A
//! batch examines the next events of a source in id order (up to a cutoff
//! id: the first id of the cutoff day) from where the last batch stopped
//! (`retention_marks`), prunes those that qualify and moves the mark.
//! Ledger entries and totals are never touched.

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
const DELETE_EVENT: &str = "DELETE FROM events WHERE id = $1";

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
        with_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            let mark: String = sqlx::query(MARK)
                .bind(source)
                .bind(what.label())
                .fetch_one(&mut *tx)
                .await?
                .try_get("upto")?;
            let rows = sqlx::query(next)
                .bind(source)
                .bind(&mark)
                .bind(cutoff_id)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
            let mut batch = Batch::default();
            let mut last = None;
            for r in &rows {
                let id: String = r.try_get("id")?;
                if r.try_get::<bool, _>("prunable")? {
                    match what {
                        Prune::Raw => sqlx::query(DROP_RAW).bind(Vec::<u8>::new()).bind(&id).execute(&mut *tx).await?,
                        Prune::ZeroPointEvents => sqlx::query(DELETE_EVENT).bind(&id).execute(&mut *tx).await?,
                    };
                    batch.pruned += 1;
                }
                batch.examined += 1;
                last = Some(id);
            }
            if let Some(last) = last {
                sqlx::query(SET_MARK).bind(source).bind(what.label()).bind(last).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(batch)
        })
    }
}
