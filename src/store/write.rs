//! The group-commit writer. Requests hand their events to a queue; a writer
//! task takes everything waiting (up to a bound), writes it in one
//! transaction, commits, then answers each request. One fsync serves many
//! requests, and nothing is answered before its commit.
//!
//! If a grouped transaction fails, each request is retried in a transaction
//! of its own, so one bad request never fails its neighbours.

use std::sync::Arc;

use serde::Serialize;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::{with_pool, Pool, StoreError};
use crate::pipeline::Prepared;

/// Most requests grouped into one transaction.
const MAX_GROUP: usize = 256;
/// Queue depth before senders wait (back-pressure).
const QUEUE: usize = 4096;
/// Retries of a single request's transaction on a transient error
/// (PostgreSQL deadlock or serialization failure between instances).
const RETRIES: usize = 3;

/// A stored event's processing status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Stored, waiting for a worker (async sources).
    Queued,
    Processed,
    Failed,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Queued => "queued",
            EventStatus::Processed => "processed",
            EventStatus::Failed => "failed",
        }
    }
}

/// What the store did with one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Persisted {
    /// The stored event's id (the first delivery's, for a duplicate).
    pub event_id: String,
    pub status: EventStatus,
    /// Points of this event (the first delivery's, for a duplicate).
    pub points: i64,
    /// The event was stored before; nothing was awarded now.
    pub duplicate: bool,
    /// When the stored event was processed (ms).
    pub processed_at: i64,
    /// The rule error, for a failed event.
    pub error: Option<String>,
}

/// One request's events, waiting for the writer.
pub struct Job {
    namespace: String,
    items: Vec<Item>,
    reply: oneshot::Sender<Result<Vec<Persisted>, StoreError>>,
}

/// One event, flattened to what the SQL binds.
struct Item {
    id: String,
    prepared: Prepared,
    canonical: String,
    status: EventStatus,
    points: i64,
    error: Option<String>,
    received_at: i64,
}

impl Job {
    pub fn new(
        namespace: &str,
        events: Vec<Prepared>,
        queued: bool,
        reply: oneshot::Sender<Result<Vec<Persisted>, StoreError>>,
    ) -> Job {
        let now = chrono::Utc::now().timestamp_millis();
        let items = events
            .into_iter()
            .map(|prepared| {
                let (status, error) = match &prepared.outcome {
                    _ if queued => (EventStatus::Queued, None),
                    Ok(_) => (EventStatus::Processed, None),
                    Err(e) => (EventStatus::Failed, Some(e.to_string())),
                };
                Item {
                    id: new_event_id(),
                    canonical: serde_json::to_string(&prepared.event)
                        .unwrap_or_else(|_| "{}".into()),
                    points: prepared.points(),
                    status,
                    error,
                    received_at: now,
                    prepared,
                }
            })
            .collect();
        Job {
            namespace: namespace.to_string(),
            items,
            reply,
        }
    }
}

/// A stored status as the API reports it (a claimed event is still queued).
pub fn status_of(s: &str) -> EventStatus {
    match s {
        "processed" => EventStatus::Processed,
        "failed" => EventStatus::Failed,
        _ => EventStatus::Queued,
    }
}

/// A new event id: `evt_` and a ULID (sortable by time).
pub fn new_event_id() -> String {
    format!("evt_{}", ulid::Ulid::new())
}

pub(super) fn spawn_writers(pool: Pool, writers: usize) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..writers.max(1) {
        let pool = pool.clone();
        let rx = rx.clone();
        tokio::spawn(async move {
            loop {
                let jobs = {
                    let mut rx = rx.lock().await;
                    let Some(first) = rx.recv().await else { return };
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    jobs
                };
                run_group(&pool, jobs).await;
            }
        });
    }
    tx
}

async fn run_group(pool: &Pool, jobs: Vec<Job>) {
    if jobs.len() > 1 {
        match write_jobs(pool, &jobs).await {
            Ok(results) => {
                for (job, res) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(Ok(res));
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = jobs.len(), "group commit failed; retrying each request alone")
            }
        }
    }
    for job in jobs {
        let mut attempt = 0;
        let res = loop {
            attempt += 1;
            match write_jobs(pool, std::slice::from_ref(&job)).await {
                Ok(mut r) => break Ok(r.pop().unwrap_or_default()),
                Err(e) if attempt < RETRIES && is_transient(&e) => continue,
                Err(e) => break Err(e),
            }
        };
        let _ = job.reply.send(res);
    }
}

fn is_transient(e: &StoreError) -> bool {
    match e {
        StoreError::Db(sqlx::Error::Database(db)) => {
            matches!(
                db.code().as_deref(),
                Some("40P01" | "40001" | "5" | "6" | "517")
            )
        }
        StoreError::Db(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => true,
        _ => false,
    }
}

const INSERT_EVENT: &str = "INSERT INTO events (id, source, dedupe_key, namespace, event_type, vendor_event_type, \
    user_id, course_id, object_id, occurred_at, received_at, processed_at, status, points, error, canonical, raw) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
    ON CONFLICT (source, dedupe_key) DO NOTHING RETURNING id";
const EXISTING: &str = "SELECT id, status, points, processed_at, error FROM events WHERE source = $1 AND dedupe_key = $2";
const RESCORE: &str =
    "UPDATE events SET status = $1, points = $2, error = $3, processed_at = $4, canonical = $5, \
    attempts = attempts + 1 WHERE id = $6 AND status = 'failed'";
const INSERT_LEDGER: &str =
    "INSERT INTO ledger (event_id, namespace, user_id, course_id, rule, points, reason, \
    occurred_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
const UPSERT_TOTAL: &str = "INSERT INTO totals (namespace, user_id, points, events, updated_at) VALUES ($1, $2, $3, 1, $4) \
    ON CONFLICT (namespace, user_id) DO UPDATE SET points = totals.points + excluded.points, \
    events = totals.events + 1, updated_at = excluded.updated_at";

/// Writes the jobs in one transaction; results in job order.
async fn write_jobs(pool: &Pool, jobs: &[Job]) -> Result<Vec<Vec<Persisted>>, StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    with_pool!(pool, p => {
        let mut tx = p.begin().await?;
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut out = Vec::with_capacity(job.items.len());
            for it in &job.items {
                let ev = &it.prepared.event;
                let inserted = sqlx::query(INSERT_EVENT)
                    .bind(&it.id)
                    .bind(&ev.source)
                    .bind(&ev.event_id)
                    .bind(&job.namespace)
                    .bind(&ev.event_type)
                    .bind(&ev.vendor_event_type)
                    .bind(&ev.user_id)
                    .bind(&ev.course_id)
                    .bind(&ev.object_id)
                    .bind(ev.occurred_at.timestamp_millis())
                    .bind(it.received_at)
                    .bind((it.status != EventStatus::Queued).then_some(now))
                    .bind(it.status.as_str())
                    .bind(it.points)
                    .bind(&it.error)
                    .bind(&it.canonical)
                    .bind(it.prepared.raw.as_ref())
                    .fetch_optional(&mut *tx)
                    .await?;
                let (event_id, fresh) = if inserted.is_some() {
                    (it.id.clone(), true)
                } else {
                    let row = sqlx::query(EXISTING)
                        .bind(&ev.source)
                        .bind(&ev.event_id)
                        .fetch_one(&mut *tx)
                        .await?;
                    let id: String = row.try_get("id")?;
                    let status: String = row.try_get("status")?;
                    if status == "failed" {
                        // A failed event is re-scored when delivered again.
                        let updated = sqlx::query(RESCORE)
                            .bind(it.status.as_str())
                            .bind(it.points)
                            .bind(&it.error)
                            .bind(now)
                            .bind(&it.canonical)
                            .bind(&id)
                            .execute(&mut *tx)
                            .await?;
                        (id, updated.rows_affected() == 1)
                    } else {
                        out.push(Persisted {
                            event_id: id,
                            status: status_of(&status),
                            points: row.try_get("points")?,
                            duplicate: true,
                            processed_at: row.try_get::<Option<i64>, _>("processed_at")?.unwrap_or(now),
                            error: None,
                        });
                        continue;
                    }
                };
                if !fresh {
                    // Another instance re-scored it between our read and update.
                    let row = sqlx::query(EXISTING).bind(&ev.source).bind(&ev.event_id).fetch_one(&mut *tx).await?;
                    out.push(Persisted {
                        event_id,
                        status: status_of(&row.try_get::<String, _>("status")?),
                        points: row.try_get("points")?,
                        duplicate: true,
                        processed_at: row.try_get::<Option<i64>, _>("processed_at")?.unwrap_or(now),
                        error: row.try_get("error")?,
                    });
                    continue;
                }
                if let (Ok(awards), Some(user)) = (&it.prepared.outcome, &ev.user_id) {
                    for a in awards {
                        sqlx::query(INSERT_LEDGER)
                            .bind(&event_id)
                            .bind(&job.namespace)
                            .bind(user)
                            .bind(&ev.course_id)
                            .bind(a.rule.as_ref())
                            .bind(a.points)
                            .bind(&a.reason)
                            .bind(ev.occurred_at.timestamp_millis())
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
                    if it.status == EventStatus::Processed {
                        sqlx::query(UPSERT_TOTAL)
                            .bind(&job.namespace)
                            .bind(user)
                            .bind(it.points)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
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
        tx.commit().await?;
        Ok(results)
    })
}
