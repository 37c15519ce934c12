//! The PostgreSQL group-commit writer: async tasks on sqlx. Requests hand
//! their events to a queue; a writer task takes everything waiting (up to
//! [`MAX_GROUP`]), executes the group's [`Plan`] in one transaction with a
//! handful of multi-row statements (events, then ledger, then totals),
//! commits, then answers each request. If a grouped transaction fails, each
//! request is retried in a transaction of its own, so one bad request never
//! fails its neighbours. Several writers run at once (PostgreSQL takes
//! concurrent writers; instances share the database).

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, Mutex};

use super::plan::{
    EventStatus, Fate, Item, Job, LedgerRow, OnceKey, Persisted, Plan, Settled, Totals, MAX_GROUP,
    QUEUE, RETRIES,
};
use super::{StoreError, EXISTING, RESCORE};

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

/// Executes the jobs' plan in one transaction; answers in job order.
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
        .map(|(ns, it)| it.settle_against(ns, &mut claimed, &held))
        .collect();
    let rows: Vec<WriteRow> = items.iter().copied().zip(&settled).collect();
    let inserted = insert_events(&mut tx, &rows, now).await?;
    let mut fates = Vec::with_capacity(items.len());
    for (_, it) in &items {
        fates.push(if inserted.contains(&it.id) {
            Fate::Written(it.id.clone())
        } else {
            redelivered(&mut tx, it, &settled[fates.len()], now).await?
        });
    }
    let plan = Plan::new(jobs, settled.into_iter().zip(fates), now);
    insert_ledger(&mut tx, &plan.ledger, now).await?;
    upsert_totals(&mut tx, plan.totals, now).await?;
    tx.commit().await?;
    Ok(plan.answers)
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
             course_id, object_id, occurred_at, received_at, processed_at, status, points, error, canonical, raw, request_headers) ",
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
                .push_bind(it.prepared.raw.as_ref())
                .push_bind(it.prepared.headers.as_deref());
        });
        qb.push(" ON CONFLICT (source, dedupe_key) DO NOTHING RETURNING id");
        for row in qb.build().fetch_all(&mut *tx).await? {
            inserted.insert(row.try_get("id")?);
        }
    }
    Ok(inserted)
}

/// An event already stored under the same `(source, dedupe_key)`: a failed
/// one is re-scored (written now, under its stored id); anything else, or
/// one another instance re-scored first, is a duplicate.
async fn redelivered(
    tx: &mut sqlx::PgConnection,
    it: &Item,
    settled: &Settled<'_>,
    now: i64,
) -> Result<Fate, StoreError> {
    let ev = &it.prepared.event;
    let row = existing(&mut *tx, ev).await?;
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let rescored = status == "failed"
        && sqlx::query(RESCORE)
            .bind(it.status.as_str())
            .bind(settled.points)
            .bind(&it.error)
            .bind(now)
            .bind(&it.canonical)
            .bind(&id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
    if rescored {
        return Ok(Fate::Written(id));
    }
    let row = if status == "failed" {
        existing(&mut *tx, ev).await?
    } else {
        row
    };
    Ok(Fate::Duplicate(Persisted {
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
    totals: Totals<'_>,
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
