//! The SQLite group-commit writer: one OS thread that owns one connection.
//!
//! SQLite takes one writer at a time, so the writer needs no async runtime:
//! a plain thread blocks on the job queue, takes everything waiting (up to
//! [`MAX_GROUP`] requests), writes it in one `BEGIN IMMEDIATE` transaction
//! through prepared, cached single-row statements, commits (one fsync with
//! `synchronous = FULL`), then answers each request. Compared with going
//! through sqlx's pool this saves a thread hand-off per statement and the
//! compilation of a differently sized multi-row statement per batch: the
//! statements are compiled once for the life of the connection.
//!
//! Reads, migrations and the queue workers stay on sqlx; SQLite's busy
//! timeout serialises them with this connection.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::mpsc;

use super::write::{status_of, EventStatus, Item, Job, Persisted, MAX_GROUP, QUEUE, RETRIES};
use super::StoreError;

/// The writer's page cache, in KiB (negative: a size, not pages). Random-key
/// index inserts into a large ledger otherwise read their pages back from the
/// OS on every batch (with SQLite's default 2 MiB, a 1M-event ledger ran 824
/// hook requests/s against ~7,000 on an empty one).
const CACHE_KIB: i64 = 32 * 1024;

const INSERT_EVENT: &str = "INSERT INTO events (id, source, dedupe_key, namespace, event_type, \
    vendor_event_type, user_id, course_id, object_id, occurred_at, received_at, processed_at, \
    status, points, error, canonical, raw) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
    ON CONFLICT (source, dedupe_key) DO NOTHING";
const EXISTING: &str = "SELECT id, status, points, processed_at, error FROM events \
    WHERE source = ?1 AND dedupe_key = ?2";
const RESCORE: &str = "UPDATE events SET status = ?1, points = ?2, error = ?3, processed_at = ?4, \
    canonical = ?5, attempts = attempts + 1, next_attempt_at = 0 WHERE id = ?6 AND status = 'failed'";
const INSERT_LEDGER: &str = "INSERT INTO ledger (event_id, namespace, user_id, course_id, rule, \
    points, reason, occurred_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
const UPSERT_TOTAL: &str = "INSERT INTO totals (namespace, user_id, points, events, updated_at) \
    VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (namespace, user_id) DO UPDATE SET \
    points = totals.points + excluded.points, events = totals.events + excluded.events, \
    updated_at = excluded.updated_at";

/// Opens the writer's connection (the file exists and is migrated by now)
/// and starts its thread. Returns the queue the requests send to.
pub(super) fn spawn(path: &Path) -> Result<mpsc::Sender<Job>, StoreError> {
    let conn = open(path)?;
    let (tx, rx) = mpsc::channel::<Job>(QUEUE);
    std::thread::Builder::new()
        .name("rocket-sqlite-writer".into())
        .spawn(move || run(conn, rx))
        .map_err(StoreError::Thread)?;
    Ok(tx)
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // WAL is a property of the file (set when sqlx created it); FULL: a
    // commit is on disk before anyone is answered, so a power cut loses
    // nothing acknowledged. Group commit pays for the fsync.
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.pragma_update(None, "synchronous", "full")?;
    conn.pragma_update(None, "foreign_keys", "on")?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

fn run(mut conn: Connection, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        run_group(&mut conn, jobs);
    }
}

/// Writes a group in one transaction; if that fails, each request alone, so
/// one bad request never fails its neighbours.
fn run_group(conn: &mut Connection, jobs: Vec<Job>) {
    if jobs.len() > 1 {
        match write_jobs(conn, &jobs) {
            Ok(results) => {
                for (job, res) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(Ok(res));
                }
                return;
            }
            Err(e) => tracing::warn!(
                error = %e,
                jobs = jobs.len(),
                "group commit failed; retrying each request alone"
            ),
        }
    }
    for job in jobs {
        let mut attempt = 0;
        let res = loop {
            attempt += 1;
            match write_jobs(conn, std::slice::from_ref(&job)) {
                Ok(mut r) => break Ok(r.pop().unwrap_or_default()),
                Err(e) if attempt < RETRIES && is_busy(&e) => continue,
                Err(e) => break Err(StoreError::Sqlite(e)),
            }
        };
        let _ = job.reply.send(res);
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Writes the jobs in one transaction; results in job order. Redeliveries
/// (rows the insert skipped) are resolved one by one: they are rare, and a
/// failed event among them is re-scored.
fn write_jobs(conn: &mut Connection, jobs: &[Job]) -> rusqlite::Result<Vec<Vec<Persisted>>> {
    let now = chrono::Utc::now().timestamp_millis();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(jobs.len());
    {
        let mut insert = tx.prepare_cached(INSERT_EVENT)?;
        let mut ledger = tx.prepare_cached(INSERT_LEDGER)?;
        // Summed per user and written in key order at the end: one upsert
        // per user per batch.
        let mut totals: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
        for job in jobs {
            let ns = job.namespace.as_str();
            let mut out = Vec::with_capacity(job.items.len());
            for it in &job.items {
                let ev = &it.prepared.event;
                let occurred = ev.occurred_at.timestamp_millis();
                let fresh = insert.execute(params![
                    it.id,
                    ev.source,
                    ev.event_id,
                    ns,
                    ev.event_type,
                    ev.vendor_event_type,
                    ev.user_id,
                    ev.course_id,
                    ev.object_id,
                    occurred,
                    it.received_at,
                    (it.status != EventStatus::Queued).then_some(now),
                    it.status.as_str(),
                    it.points,
                    it.error,
                    it.canonical,
                    it.prepared.raw.as_ref(),
                ])? == 1;
                let event_id = if fresh {
                    it.id.clone()
                } else {
                    match redelivered(&tx, it, now)? {
                        Ok(id) => id,
                        Err(duplicate) => {
                            out.push(duplicate);
                            continue;
                        }
                    }
                };
                if let (Ok(awards), Some(user), EventStatus::Processed) =
                    (&it.prepared.outcome, &ev.user_id, it.status)
                {
                    for award in awards {
                        ledger.execute(params![
                            event_id,
                            ns,
                            user,
                            ev.course_id,
                            award.rule.as_ref(),
                            award.points,
                            award.reason,
                            occurred,
                            now,
                        ])?;
                    }
                    let t = totals.entry((ns, user.as_str())).or_insert((0, 0));
                    t.0 += it.points;
                    t.1 += 1;
                }
                out.push(Persisted {
                    event_id,
                    status: it.status,
                    points: it.points,
                    duplicate: false,
                    processed_at: now,
                    error: it.error.clone(),
                });
            }
            results.push(out);
        }
        let mut upsert = tx.prepare_cached(UPSERT_TOTAL)?;
        for ((ns, user), (points, events)) in totals {
            upsert.execute(params![ns, user, points, events, now])?;
        }
    }
    tx.commit()?;
    Ok(results)
}

/// An event already stored under the same `(source, dedupe_key)`: a failed
/// one is re-scored (`Ok` with its id: award it now); anything else, or one
/// another instance re-scored first, is a duplicate (`Err` with the stored
/// answer).
fn redelivered(
    tx: &rusqlite::Transaction<'_>,
    it: &Item,
    now: i64,
) -> rusqlite::Result<Result<String, Persisted>> {
    let ev = &it.prepared.event;
    let read = |tx: &rusqlite::Transaction<'_>| {
        tx.prepare_cached(EXISTING)?
            .query_row(params![ev.source, ev.event_id], |r| {
                Ok(Persisted {
                    event_id: r.get(0)?,
                    status: status_of(&r.get::<_, String>(1)?),
                    points: r.get(2)?,
                    duplicate: true,
                    processed_at: r.get::<_, Option<i64>>(3)?.unwrap_or(now),
                    error: r.get(4)?,
                })
            })
            .optional()
    };
    let Some(stored) = read(tx)? else {
        // Deleted between the insert and this read: cannot happen inside
        // one write transaction.
        return Err(rusqlite::Error::QueryReturnedNoRows);
    };
    if stored.status == EventStatus::Failed {
        let rescored = tx.prepare_cached(RESCORE)?.execute(params![
            it.status.as_str(),
            it.points,
            it.error,
            now,
            it.canonical,
            stored.event_id,
        ])? == 1;
        if rescored {
            return Ok(Ok(stored.event_id));
        }
        return Ok(Err(read(tx)?.unwrap_or(stored)));
    }
    Ok(Err(stored))
}
