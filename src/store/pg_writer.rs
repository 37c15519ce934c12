//! The PostgreSQL group-commit writer: async tasks on sqlx. Requests hand
//! their events to a queue; a writer task takes everything waiting (up to
//! [`MAX_GROUP`]), writes the group's new events, their awards and their
//! learners' totals in one statement (committed when it returns; see
//! [`write_jobs`]), then answers each request. If the group's write fails,
//! each request is retried on its own, so one bad request never fails its
//! neighbours. Several writers run at once, each on a connection of its own
//! (PostgreSQL takes concurrent writers; instances share the database).

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool, Row};
use tokio::sync::{mpsc, Mutex};

use super::plan::{
    by_job, EventStatus, Fate, Item, Job, LedgerRow, OnceKey, Persisted, Plan, Settled, Totals,
    MAX_GROUP, QUEUE, RETRIES,
};
use super::{StoreError, EXISTING, RESCORE};

pub(super) fn spawn_writers(
    pool: &PgPool,
    writers: usize,
    group_sizes: prometheus::Histogram,
) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    let options = (*pool.connect_options())
        .clone()
        .application_name(WRITER_NAME);
    for _ in 0..writers.max(1) {
        let rx = rx.clone();
        let group_sizes = group_sizes.clone();
        let mut writer = Writer {
            options: options.clone(),
            conn: None,
        };
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
                writer.run_group(jobs).await;
            }
        });
    }
    tx
}

/// How long a writer waits to open its connection (as the pool waits to
/// hand one out): an unreachable server fails the attempt, not hangs it.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The `application_name` of the writers' connections.
pub(crate) const WRITER_NAME: &str = "rocket-rewards writer";

/// A writer task's own connection, outside the pool. A pooled connection
/// costs two more round trips per group: sqlx pings it when it is taken
/// and again when it is given back. After a failed write the connection
/// is dropped and the next attempt opens a new one, so a connection that
/// broke (PostgreSQL restarted, a proxy closed it) fails one attempt, which
/// is retried, and nothing else; only a statement the database refused for
/// a constraint (23xxx) or a conflict with another transaction (40xxx),
/// which leave the connection sound, keep it.
struct Writer {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
}

impl Writer {
    async fn write(&mut self, jobs: &[Job]) -> Result<JobResults, StoreError> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let connect = PgConnection::connect_with(&self.options);
                let conn = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                    .await
                    .map_err(|_| StoreError::Db(sqlx::Error::PoolTimedOut))??;
                self.conn.insert(conn)
            }
        };
        let written = write_jobs(conn, jobs).await;
        let failures: Vec<&StoreError> = match &written {
            Ok(results) => results.iter().filter_map(|r| r.as_ref().err()).collect(),
            Err(e) => vec![e],
        };
        if failures.into_iter().any(|e| !keeps_connection(e)) {
            self.conn = None;
        }
        written
    }

    async fn run_group(&mut self, jobs: Vec<Job>) {
        if jobs.len() > 1 {
            match self.write(&jobs).await {
                Ok(results) => {
                    for (job, res) in jobs.into_iter().zip(results) {
                        let _ = job.reply.send(res);
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
                match self.write(std::slice::from_ref(&job)).await {
                    Ok(mut r) => break r.pop().unwrap_or_else(|| Ok(Vec::new())),
                    Err(e) if attempt < RETRIES && is_transient(&e) => continue,
                    Err(e) => break Err(e),
                }
            };
            let _ = job.reply.send(res);
        }
    }
}

/// Whether the connection a write failed on can be used again: the
/// database refused the statement (a constraint, a deadlock or a
/// serialization conflict), and any transaction of it was rolled back.
fn keeps_connection(e: &StoreError) -> bool {
    match e {
        StoreError::Redeliveries(cause) => keeps_connection(cause),
        StoreError::Db(sqlx::Error::Database(db)) => db
            .code()
            .is_some_and(|c| c.starts_with("23") || c.starts_with("40")),
        _ => false,
    }
}

fn is_transient(e: &StoreError) -> bool {
    match e {
        // 23505: another writer (of this instance or another) committed a
        // once-award this statement also wrote (the ledger_learner index); the
        // retry reads it and drops ours.
        // 57P0x: the server ended the connection (an administrator, a
        // restart); 08xxx: the connection failed. The next attempt opens
        // a new one.
        StoreError::Db(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
            matches!(
                &*c,
                "40P01" | "40001" | "23505" | "57P01" | "57P02" | "57P03"
            ) || c.starts_with("08")
        }),
        StoreError::Db(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => true,
        _ => false,
    }
}

/// Which of the keys (four parallel arrays) the ledger holds: one index
/// lookup per key. A subquery with `LIMIT` is never flattened into a join,
/// so the plan stays a nested loop over the keys whatever the statistics
/// say; as a plain join, a young ledger's statistics (or a generic plan
/// made while it was small) chose a hash join over a scan of the whole
/// ledger for every group, which made the writer's cost grow with the
/// ledger.
const HELD_ONCE_KEYS: &str = "SELECT k.ns AS namespace, k.u AS user_id, k.r AS rule, \
    k.o AS once_key FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS k(ns, u, r, o) \
    CROSS JOIN LATERAL (SELECT 1 FROM ledger l WHERE l.namespace = k.ns AND l.user_id = k.u \
    AND l.rule = k.r AND l.once_key = k.o LIMIT 1) AS held";

/// The once-award keys of these items the ledger already holds, read in
/// one statement.
async fn held_once_keys(
    tx: &mut sqlx::PgConnection,
    items: &[(&str, &Item)],
) -> Result<HashSet<OnceKey>, StoreError> {
    let mut cols: [Vec<&str>; 4] = Default::default();
    for (ns, it) in items {
        let (Ok(awards), Some(user)) = (&it.prepared.outcome, &it.prepared.event.user_id) else {
            continue;
        };
        for a in awards {
            if let Some(key) = &a.once {
                cols[0].push(ns);
                cols[1].push(user);
                cols[2].push(&a.rule);
                cols[3].push(key);
            }
        }
    }
    if cols[0].is_empty() {
        return Ok(HashSet::new());
    }
    let [ns, users, rules, keys] = cols;
    let rows = sqlx::query(HELD_ONCE_KEYS)
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

/// Each job's answer, or the error that failed it.
type JobResults = Vec<Result<Vec<Persisted>, StoreError>>;

/// Writes the jobs; answers in job order. The new events, their awards and
/// their learners' totals go in one statement, which PostgreSQL runs
/// atomically and commits on its own: with the once-key read, two round
/// trips per group, where a transaction around separate statements took
/// six. Redeliveries (rows that statement skipped) are rare: they are
/// resolved, and a failed one rescored, in a transaction of their own
/// afterwards.
///
/// `Err`: nothing was written, and the caller may retry. Should only the
/// redeliveries' transaction fail, the new events stand: a job with no
/// redelivery gets its answer, a job with one gets the error (its new
/// events are stored, and its sender's retry finds them, as after any
/// answer lost on the way), and nothing is retried.
///
/// The once-key read is outside any transaction, as it would be at READ
/// COMMITTED anyway: if another instance commits a key after the read, the
/// `ledger_learner` index fails the statement (23505) and the retry reads it.
async fn write_jobs(conn: &mut PgConnection, jobs: &[Job]) -> Result<JobResults, StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    let items: Vec<(&str, &Item)> = super::plan::items(jobs).collect();
    let held = held_once_keys(&mut *conn, &items).await?;
    let mut claimed = HashSet::new();
    let settled: Vec<Settled> = items
        .iter()
        .map(|(ns, it)| it.settle_against(ns, &mut claimed, &held))
        .collect();
    let rows: Vec<WriteRow> = items.iter().copied().zip(&settled).collect();
    let inserted = insert_fresh(&mut *conn, &rows, now).await?;
    let fates = if inserted.len() == items.len() {
        items
            .iter()
            .map(|(_, it)| Fate::Written(it.id.clone()))
            .collect()
    } else {
        match resolve_redeliveries(conn, &rows, &inserted, now).await {
            Ok(fates) => fates,
            Err(e) => return Ok(partly_written(jobs, &rows, &inserted, e, now)),
        }
    };
    let answers = rows
        .iter()
        .zip(fates)
        .map(|(((_, it), settled), fate)| it.answer(fate, settled.points, now));
    Ok(by_job(jobs, answers).into_iter().map(Ok).collect())
}

/// The answers when the new events were written but resolving the
/// redeliveries failed (see [`write_jobs`]): a job that held a redelivery
/// gets the cause, whose class (a lost connection answers 503) it keeps.
fn partly_written(
    jobs: &[Job],
    rows: &[WriteRow<'_>],
    inserted: &HashSet<String>,
    e: StoreError,
    now: i64,
) -> JobResults {
    tracing::warn!(error = %e, "resolving redelivered events failed; the group's new events are written");
    let cause = Arc::new(e);
    let answers = rows.iter().map(|((_, it), settled)| {
        let new = inserted.contains(&it.id);
        new.then(|| it.stored_as(it.id.clone(), settled.points, now))
    });
    by_job(jobs, answers)
        .into_iter()
        .map(|answers| {
            answers
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| StoreError::Redeliveries(cause.clone()))
        })
        .collect()
}

/// The fates of a group some of whose events were stored already: each
/// redelivery is resolved (a failed one rescored, with its awards and
/// totals) in one transaction. The totals are written before the awards,
/// as in [`INSERT_FRESH`]: the ledger's triggers lock the learners'
/// summary sums (migration 0008), and every writer locks a learner's total
/// before those, so two writers never wait on each other in a circle.
async fn resolve_redeliveries(
    conn: &mut PgConnection,
    rows: &[WriteRow<'_>],
    inserted: &HashSet<String>,
    now: i64,
) -> Result<Vec<Fate>, StoreError> {
    let mut tx = conn.begin().await?;
    let mut rescored = Plan::empty();
    let mut fates = Vec::with_capacity(rows.len());
    for &((ns, it), settled) in rows {
        if inserted.contains(&it.id) {
            fates.push(Fate::Written(it.id.clone()));
            continue;
        }
        let fate = redelivered(&mut tx, it, settled, now).await?;
        if let Fate::Written(id) = &fate {
            rescored.add_written(ns, it, settled, id);
        }
        fates.push(fate);
    }
    upsert_totals(&mut tx, rescored.totals, now).await?;
    insert_ledger(&mut tx, &rescored.ledger, now).await?;
    tx.commit().await?;
    Ok(fates)
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Inserts the new events with their awards and their learners' totals
/// ([`INSERT_FRESH`]); the ids of the events inserted (a redelivery's row
/// is skipped, and with it its awards and its part of the totals). Each
/// column is bound as one array and unnested, so the statement's text is
/// the same whatever the group's size: PostgreSQL parses and plans it once
/// per connection.
async fn insert_fresh(
    conn: &mut PgConnection,
    rows: &[WriteRow<'_>],
    now: i64,
) -> Result<HashSet<String>, StoreError> {
    let mut ledger = Vec::new();
    let mut earned: (Vec<&str>, Vec<&str>, Vec<&str>, Vec<i64>) = Default::default();
    for &((ns, it), settled) in rows {
        ledger.extend(it.ledger_rows(ns, settled, &it.id));
        if let Some(user) = it.earner() {
            earned.0.push(&it.id);
            earned.1.push(ns);
            earned.2.push(user);
            earned.3.push(settled.points);
        }
    }
    let query = bind_events(sqlx::query(INSERT_FRESH), rows, now);
    let query = bind_ledger(query, &ledger)
        .bind(now)
        .bind(earned.0)
        .bind(earned.1)
        .bind(earned.2)
        .bind(earned.3);
    let mut inserted = HashSet::with_capacity(rows.len());
    for row in query.fetch_all(&mut *conn).await? {
        inserted.insert(row.try_get("id")?);
    }
    Ok(inserted)
}

/// One column's values, one per row, bound as an array.
fn col<'q, R, T>(rows: &'q [R], f: impl Fn(&'q R) -> T) -> Vec<T> {
    rows.iter().map(f).collect()
}

/// Binds $1..$18: the events' columns, one array each, borrowing the rows'
/// strings.
fn bind_events<'q>(query: PgQuery<'q>, rows: &'q [WriteRow<'_>], now: i64) -> PgQuery<'q> {
    fn ev<'r>(r: &'r WriteRow<'_>) -> &'r crate::pipeline::mapping::CanonicalEvent {
        &r.0 .1.prepared.event
    }
    query
        .bind(col(rows, |r| r.0 .1.id.as_str()))
        .bind(col(rows, |r| ev(r).source.as_str()))
        .bind(col(rows, |r| ev(r).dedupe_key.as_str()))
        .bind(col(rows, |r| r.0 .0))
        .bind(col(rows, |r| ev(r).event_type.as_deref()))
        .bind(col(rows, |r| ev(r).vendor_event_type.as_deref()))
        .bind(col(rows, |r| ev(r).user_id.as_deref()))
        .bind(col(rows, |r| ev(r).course_id.as_deref()))
        .bind(col(rows, |r| ev(r).object_id.as_deref()))
        .bind(col(rows, |r| ev(r).occurred_at.timestamp_millis()))
        .bind(col(rows, |r| r.0 .1.received_at))
        .bind(col(rows, |r| {
            (r.0 .1.status != EventStatus::Queued).then_some(now)
        }))
        .bind(col(rows, |r| r.0 .1.status.as_str()))
        .bind(col(rows, |r| r.1.points))
        .bind(col(rows, |r| r.0 .1.error.as_deref()))
        .bind(col(rows, |r| r.0 .1.canonical.as_str()))
        .bind(col(rows, |r| &r.0 .1.prepared.raw[..]))
        .bind(col(rows, |r| r.0 .1.prepared.headers.as_deref()))
}

/// Binds the awards' columns (event id, namespace, user, course, rule,
/// points, reason, occurred_at, once-key), one array each.
fn bind_ledger<'q>(query: PgQuery<'q>, rows: &'q [LedgerRow<'_>]) -> PgQuery<'q> {
    query
        .bind(col(rows, |r| r.event_id.as_str()))
        .bind(col(rows, |r| r.namespace))
        .bind(col(rows, |r| r.user))
        .bind(col(rows, |r| r.course.as_deref()))
        .bind(col(rows, |r| &*r.award.rule))
        .bind(col(rows, |r| r.award.points))
        .bind(col(rows, |r| r.award.reason.as_deref()))
        .bind(col(rows, |r| r.occurred_at))
        .bind(col(rows, |r| r.award.once.as_deref()))
}

/// The new events ($1..$18), the awards of those inserted ($19..$27, in
/// their order; created at $28) and those events' points and count added to
/// their learners' totals ($29..$32: event id, namespace, user, points; in
/// key order, as every instance locks totals rows alike). One statement:
/// atomic, and committed when it returns.
const INSERT_FRESH: &str = "WITH ev AS (\
    INSERT INTO events (id, source, dedupe_key, namespace, event_type, vendor_event_type, \
    user_id, course_id, object_id, occurred_at, received_at, processed_at, status, points, \
    error, canonical, raw, request_headers) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
    $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[], \
    $12::bigint[], $13::text[], $14::bigint[], $15::text[], $16::text[], $17::bytea[], \
    $18::text[]) \
    ON CONFLICT (source, dedupe_key) DO NOTHING RETURNING id), \
  awards AS (\
    INSERT INTO ledger (event_id, namespace, user_id, course_id, rule, points, reason, \
    occurred_at, created_at, once_key) \
    SELECT a.e, a.ns, a.u, a.c, a.r, a.p, a.why, a.at, $28, a.once \
    FROM UNNEST($19::text[], $20::text[], $21::text[], $22::text[], $23::text[], \
    $24::bigint[], $25::text[], $26::bigint[], $27::text[]) \
    WITH ORDINALITY AS a(e, ns, u, c, r, p, why, at, once, n) \
    WHERE a.e IN (SELECT id FROM ev) ORDER BY a.n), \
  sums AS (\
    INSERT INTO totals (namespace, user_id, points, events, updated_at) \
    SELECT t.ns, t.u, SUM(t.p), COUNT(*), $28 \
    FROM UNNEST($29::text[], $30::text[], $31::text[], $32::bigint[]) AS t(e, ns, u, p) \
    WHERE t.e IN (SELECT id FROM ev) GROUP BY t.ns, t.u ORDER BY t.ns, t.u \
    ON CONFLICT (namespace, user_id) DO UPDATE SET points = totals.points + excluded.points, \
    events = totals.events + excluded.events, updated_at = excluded.updated_at) \
  SELECT id FROM ev";

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
    if !ledger.is_empty() {
        bind_ledger(sqlx::query(INSERT_LEDGER_ROWS), ledger)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// The awards of rescored events, unnested from one array per column (see
/// [`bind_ledger`]); created at $10.
const INSERT_LEDGER_ROWS: &str = "INSERT INTO ledger (event_id, namespace, user_id, course_id, \
    rule, points, reason, occurred_at, created_at, once_key) \
    SELECT a.e, a.ns, a.u, a.c, a.r, a.p, a.why, a.at, $10, a.once \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], \
    $7::text[], $8::bigint[], $9::text[]) WITH ORDINALITY AS a(e, ns, u, c, r, p, why, at, once, n) \
    ORDER BY a.n";

/// Adds each user's points and events, in key order: instances on
/// PostgreSQL lock totals rows alike.
async fn upsert_totals(
    tx: &mut sqlx::PgConnection,
    totals: Totals<'_>,
    now: i64,
) -> Result<(), StoreError> {
    if totals.is_empty() {
        return Ok(());
    }
    let totals: Vec<_> = totals.into_iter().collect();
    sqlx::query(UPSERT_TOTALS)
        .bind(totals.iter().map(|((ns, _), _)| *ns).collect::<Vec<&str>>())
        .bind(totals.iter().map(|((_, u), _)| *u).collect::<Vec<&str>>())
        .bind(totals.iter().map(|(_, (p, _))| *p).collect::<Vec<i64>>())
        .bind(totals.iter().map(|(_, (_, e))| *e).collect::<Vec<i64>>())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Each user's points and events added, unnested in key order (see
/// [`insert_fresh`]).
const UPSERT_TOTALS: &str = "INSERT INTO totals (namespace, user_id, points, events, updated_at) \
    SELECT ns, u, p, e, $5 FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
    AS t(ns, u, p, e) ON CONFLICT (namespace, user_id) DO UPDATE SET \
    points = totals.points + excluded.points, events = totals.events + excluded.events, \
    updated_at = excluded.updated_at";
