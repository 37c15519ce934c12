//! The group-commit writer. Requests hand their events to a queue; a writer
//! task takes everything waiting (up to a bound), writes it in one
//! transaction, commits, then answers each request. One fsync serves many
//! requests, and nothing is answered before its commit.
//!
//! If a grouped transaction fails, each request is retried in a transaction
//! of its own, so one bad request never fails its neighbours.
//!
//! This module holds the jobs and results both stores share, and the
//! PostgreSQL writer (async tasks on sqlx, multi-row statements). SQLite has
//! a writer thread of its own: see `sqlite_writer`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot, Mutex};

use sqlx::PgPool;

use super::StoreError;
use crate::pipeline::rules::Award;
use crate::pipeline::Prepared;

/// Most requests grouped into one transaction.
pub(super) const MAX_GROUP: usize = 256;
/// Queue depth before senders wait (back-pressure).
pub(super) const QUEUE: usize = 4096;
/// Retries of a single request's transaction on a transient error
/// (PostgreSQL deadlock or serialization failure between instances; SQLite
/// busy).
pub(super) const RETRIES: usize = 3;

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
    pub(super) namespace: String,
    pub(super) items: Vec<Item>,
    pub(super) reply: oneshot::Sender<Result<Vec<Persisted>, StoreError>>,
}

/// One event, flattened to what the SQL binds.
pub(super) struct Item {
    pub(super) id: String,
    pub(super) prepared: Prepared,
    pub(super) canonical: String,
    pub(super) status: EventStatus,
    pub(super) points: i64,
    pub(super) error: Option<String>,
    pub(super) received_at: i64,
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

/// A once-award's identity: namespace, user, rule, key.
pub(super) type OnceKey = (String, String, Arc<str>, String);

/// What an item awards once its once-awards are settled.
pub(super) struct Settled<'a> {
    pub(super) awards: Vec<&'a Award>,
    pub(super) points: i64,
}

impl Item {
    /// The awards this item writes: a once-award whose key the ledger holds
    /// (`held`), or an earlier item of the same transaction claimed
    /// (`claimed`), is dropped, and its points with it. Items that award
    /// nothing (queued, failed, no user) settle to their stored points.
    pub(super) fn settle<'a, E>(
        &'a self,
        namespace: &str,
        claimed: &mut HashSet<OnceKey>,
        mut held: impl FnMut(&OnceKey) -> Result<bool, E>,
    ) -> Result<Settled<'a>, E> {
        let (Ok(awards), Some(user), EventStatus::Processed) = (
            &self.prepared.outcome,
            &self.prepared.event.user_id,
            self.status,
        ) else {
            return Ok(Settled {
                awards: Vec::new(),
                points: self.points,
            });
        };
        let mut kept = Vec::with_capacity(awards.len());
        for award in awards {
            if let Some(key) = &award.once {
                let once = (
                    namespace.to_string(),
                    user.clone(),
                    award.rule.clone(),
                    key.clone(),
                );
                if claimed.contains(&once) || held(&once)? {
                    continue;
                }
                claimed.insert(once);
            }
            kept.push(award);
        }
        let points = kept.iter().map(|a| a.points).sum();
        Ok(Settled {
            awards: kept,
            points,
        })
    }

    /// The answer for this item, written now under `event_id` with `points`.
    pub(super) fn stored_as(&self, event_id: String, points: i64, now: i64) -> Persisted {
        Persisted {
            event_id,
            status: self.status,
            points,
            duplicate: false,
            processed_at: now,
            error: self.error.clone(),
        }
    }
}

impl EventStatus {
    /// A stored status as the API reports it (an event a worker has
    /// claimed, `processing`, is still queued); any other text is an error,
    /// never a default.
    pub fn from_stored(s: &str) -> Result<EventStatus, StoreError> {
        match s {
            "processed" => Ok(EventStatus::Processed),
            "failed" => Ok(EventStatus::Failed),
            "queued" | "processing" => Ok(EventStatus::Queued),
            other => Err(StoreError::UnknownStatus(other.chars().take(32).collect())),
        }
    }
}

/// A new event id: `evt_` and a ULID (sortable by time).
pub fn new_event_id() -> String {
    format!("evt_{}", ulid::Ulid::new())
}

pub(super) fn spawn_writers(
    pool: PgPool,
    writers: usize,
    group_sizes: prometheus::Histogram,
) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..writers.max(1) {
        let pool = pool.clone();
        let rx = rx.clone();
        let group_sizes = group_sizes.clone();
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
                group_sizes.observe(jobs.len() as f64);
                run_group(&pool, jobs).await;
            }
        });
    }
    tx
}

async fn run_group(pool: &PgPool, jobs: Vec<Job>) {
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
        // 23505: another instance committed a once-award this transaction
        // also wrote (the ledger_once index); the retry reads it and drops ours.
        StoreError::Db(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40P01" | "40001" | "23505"))
        }
        StoreError::Db(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => true,
        _ => false,
    }
}

/// Rows per multi-row statement: well under the 65535 bound parameters a
/// PostgreSQL statement takes.
const EVENT_ROWS: usize = 500;
const LEDGER_ROWS: usize = 1000;

pub(super) const EXISTING: &str = "SELECT id, status, points, processed_at, error FROM events WHERE source = $1 AND dedupe_key = $2";
pub(super) const RESCORE: &str =
    "UPDATE events SET status = $1, points = $2, error = $3, processed_at = $4, canonical = $5, \
    attempts = attempts + 1, next_attempt_at = 0 WHERE id = $6 AND status = 'failed'";

/// An award to write, with the event it belongs to.
struct LedgerRow<'a> {
    event_id: String,
    namespace: &'a str,
    user: &'a str,
    course: &'a Option<String>,
    award: &'a crate::pipeline::rules::Award,
    occurred_at: i64,
}

/// The once-award keys of these items the ledger already holds, read in
/// one statement.
async fn held_once_keys(
    tx: &mut sqlx::PgConnection,
    items: &[(&str, &Item)],
) -> Result<HashSet<OnceKey>, StoreError> {
    let mut cols: [Vec<String>; 4] = Default::default();
    for (ns, it) in items {
        let (Ok(awards), Some(user)) = (&it.prepared.outcome, &it.prepared.event.user_id) else {
            continue;
        };
        for a in awards {
            if let Some(key) = &a.once {
                cols[0].push(ns.to_string());
                cols[1].push(user.clone());
                cols[2].push(a.rule.to_string());
                cols[3].push(key.clone());
            }
        }
    }
    if cols[0].is_empty() {
        return Ok(HashSet::new());
    }
    let [ns, users, rules, keys] = cols;
    let rows = sqlx::query(
        "SELECT l.namespace, l.user_id, l.rule, l.once_key FROM ledger l \
         JOIN UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS k(ns, u, r, o) \
         ON l.namespace = k.ns AND l.user_id = k.u AND l.rule = k.r AND l.once_key = k.o",
    )
    .bind(ns)
    .bind(users)
    .bind(rules)
    .bind(keys)
    .fetch_all(&mut *tx)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("namespace")?,
                r.try_get("user_id")?,
                Arc::from(r.try_get::<String, _>("rule")?),
                r.try_get("once_key")?,
            ))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// One item with its namespace and settled awards.
type WriteRow<'a> = ((&'a str, &'a Item), &'a Settled<'a>);

/// Writes the jobs in one transaction with a handful of multi-row
/// statements (events, then ledger, then totals); results in job order.
/// Redeliveries (rows the insert skipped) are resolved one by one: they are
/// rare, and a failed event among them is re-scored.
async fn write_jobs(pool: &PgPool, jobs: &[Job]) -> Result<Vec<Vec<Persisted>>, StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    let items: Vec<(&str, &Item)> = jobs
        .iter()
        .flat_map(|j| j.items.iter().map(move |it| (j.namespace.as_str(), it)))
        .collect();
    let mut tx = pool.begin().await?;
    let held = held_once_keys(&mut tx, &items).await?;
    let mut claimed = HashSet::new();
    let settled: Vec<Settled> = items
        .iter()
        .map(|(ns, it)| {
            it.settle(ns, &mut claimed, |k| {
                Ok::<_, std::convert::Infallible>(held.contains(k))
            })
        })
        .collect::<Result<_, _>>()
        .unwrap_or_else(|never| match never {});
    let rows: Vec<WriteRow> = items.iter().copied().zip(&settled).collect();
    let inserted = insert_events(&mut tx, &rows, now).await?;

    let mut ledger: Vec<LedgerRow> = Vec::new();
    let mut totals: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
    let mut results = Vec::with_capacity(jobs.len());
    let mut next = rows.iter();
    for job in jobs {
        let mut out = Vec::with_capacity(job.items.len());
        for _ in &job.items {
            let Some(((ns, it), settled)) = next.next() else {
                break;
            };
            let ev = &it.prepared.event;
            let event_id = if inserted.contains(&it.id) {
                it.id.clone()
            } else {
                match redelivered(&mut tx, it, settled.points, now).await? {
                    Ok(id) => id,
                    Err(duplicate) => {
                        out.push(duplicate);
                        continue;
                    }
                }
            };
            if let (Some(user), EventStatus::Processed) = (&ev.user_id, it.status) {
                for award in &settled.awards {
                    ledger.push(LedgerRow {
                        event_id: event_id.clone(),
                        namespace: ns,
                        user,
                        course: &ev.course_id,
                        award,
                        occurred_at: ev.occurred_at.timestamp_millis(),
                    });
                }
                let t = totals.entry((*ns, user.as_str())).or_insert((0, 0));
                t.0 += settled.points;
                t.1 += 1;
            }
            out.push(it.stored_as(event_id, settled.points, now));
        }
        results.push(out);
    }
    insert_ledger(&mut tx, &ledger, now).await?;
    upsert_totals(&mut tx, totals, now).await?;
    tx.commit().await?;
    Ok(results)
}

/// Inserts the events in multi-row statements; the ids of those inserted
/// (a redelivery's row is skipped).
async fn insert_events(
    tx: &mut sqlx::PgConnection,
    rows: &[WriteRow<'_>],
    now: i64,
) -> Result<HashSet<String>, StoreError> {
    let mut inserted: HashSet<String> = HashSet::with_capacity(rows.len());
    for chunk in rows.chunks(EVENT_ROWS) {
        let mut qb = sqlx::QueryBuilder::new(
            "INSERT INTO events (id, source, dedupe_key, namespace, event_type, vendor_event_type, user_id, \
             course_id, object_id, occurred_at, received_at, processed_at, status, points, error, canonical, raw) ",
        );
        qb.push_values(chunk, |mut b, ((ns, it), settled)| {
            let ev = &it.prepared.event;
            b.push_bind(&it.id)
                .push_bind(&ev.source)
                .push_bind(&ev.dedupe_key)
                .push_bind(*ns)
                .push_bind(&ev.event_type)
                .push_bind(&ev.vendor_event_type)
                .push_bind(&ev.user_id)
                .push_bind(&ev.course_id)
                .push_bind(&ev.object_id)
                .push_bind(ev.occurred_at.timestamp_millis())
                .push_bind(it.received_at)
                .push_bind((it.status != EventStatus::Queued).then_some(now))
                .push_bind(it.status.as_str())
                .push_bind(settled.points)
                .push_bind(&it.error)
                .push_bind(&it.canonical)
                .push_bind(it.prepared.raw.as_ref());
        });
        qb.push(" ON CONFLICT (source, dedupe_key) DO NOTHING RETURNING id");
        for row in qb.build().fetch_all(&mut *tx).await? {
            inserted.insert(row.try_get("id")?);
        }
    }
    Ok(inserted)
}

/// An event already stored under the same `(source, dedupe_key)`: a failed
/// one is re-scored (`Ok` with its id: award it now); anything else, or one
/// another instance re-scored first, is a duplicate (`Err` with the stored
/// answer).
async fn redelivered(
    tx: &mut sqlx::PgConnection,
    it: &Item,
    points: i64,
    now: i64,
) -> Result<Result<String, Persisted>, StoreError> {
    let ev = &it.prepared.event;
    let row = existing(&mut *tx, ev).await?;
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let rescored = status == "failed"
        && sqlx::query(RESCORE)
            .bind(it.status.as_str())
            .bind(points)
            .bind(&it.error)
            .bind(now)
            .bind(&it.canonical)
            .bind(&id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
    if rescored {
        return Ok(Ok(id));
    }
    let row = if status == "failed" {
        existing(&mut *tx, ev).await?
    } else {
        row
    };
    Ok(Err(Persisted {
        event_id: id,
        status: EventStatus::from_stored(&row.try_get::<String, _>("status")?)?,
        points: row.try_get("points")?,
        duplicate: true,
        processed_at: row
            .try_get::<Option<i64>, _>("processed_at")?
            .unwrap_or(now),
        error: row.try_get("error")?,
    }))
}

/// The stored event with this event's `(source, dedupe_key)`.
async fn existing(
    tx: &mut sqlx::PgConnection,
    ev: &crate::pipeline::mapping::CanonicalEvent,
) -> Result<sqlx::postgres::PgRow, sqlx::Error> {
    sqlx::query(EXISTING)
        .bind(&ev.source)
        .bind(&ev.dedupe_key)
        .fetch_one(tx)
        .await
}

async fn insert_ledger(
    tx: &mut sqlx::PgConnection,
    ledger: &[LedgerRow<'_>],
    now: i64,
) -> Result<(), StoreError> {
    for chunk in ledger.chunks(LEDGER_ROWS) {
        let mut qb = sqlx::QueryBuilder::new(
            "INSERT INTO ledger (event_id, namespace, user_id, course_id, rule, points, reason, occurred_at, created_at, once_key) ",
        );
        qb.push_values(chunk, |mut b, r| {
            b.push_bind(&r.event_id)
                .push_bind(r.namespace)
                .push_bind(r.user)
                .push_bind(r.course)
                .push_bind(r.award.rule.as_ref())
                .push_bind(r.award.points)
                .push_bind(&r.award.reason)
                .push_bind(r.occurred_at)
                .push_bind(now)
                .push_bind(&r.award.once);
        });
        qb.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// Adds each user's points and events, in key order: instances on
/// PostgreSQL lock totals rows alike.
async fn upsert_totals(
    tx: &mut sqlx::PgConnection,
    totals: BTreeMap<(&str, &str), (i64, i64)>,
    now: i64,
) -> Result<(), StoreError> {
    let totals: Vec<_> = totals.into_iter().collect();
    for chunk in totals.chunks(LEDGER_ROWS) {
        let mut qb = sqlx::QueryBuilder::new(
            "INSERT INTO totals (namespace, user_id, points, events, updated_at) ",
        );
        qb.push_values(chunk, |mut b, ((ns, user), (points, events))| {
            b.push_bind(*ns)
                .push_bind(*user)
                .push_bind(*points)
                .push_bind(*events)
                .push_bind(now);
        });
        qb.push(
            " ON CONFLICT (namespace, user_id) DO UPDATE SET points = totals.points + excluded.points, \
             events = totals.events + excluded.events, updated_at = excluded.updated_at",
        );
        qb.build().execute(&mut *tx).await?;
    }
    Ok(())
}
