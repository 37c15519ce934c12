//! The ledger's persistence: SQLite (the embedded default) and PostgreSQL
//! behind one [`Store`]. SQL is written once with `$n` placeholders, which
//! both drivers take; [`with_pool!`] instantiates it for each backend.
//!
//! Writes go through a group-commit writer: concurrent requests' events are
//! batched into one transaction, and each request is answered only after the
//! batch holding its events has committed. Exactly-once comes from the
//! unique `(source, dedupe_key)` index, so it holds across processes too.

pub mod backup;
pub mod events;
pub mod leaderboards;
mod pg_writer;
mod plan;
mod queue;
pub mod rescore;
pub mod retention;
mod sqlite_writer;
mod writer_sums;

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

pub use plan::{new_event_id, EventStatus, Persisted};
pub use queue::{Claimed, MAX_ATTEMPTS};

use crate::pipeline::mapping::CanonicalEvent;
use crate::pipeline::rules::{History, HISTORY_DAYS, HISTORY_EVENTS};
use crate::pipeline::Prepared;

/// Store failures; all are the server's, answered as opaque 500s.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: use sqlite://PATH, a file path, or postgres://…")]
    BadUrl(String),
    #[error("an in-memory SQLite database cannot be used (the ledger must survive a restart): use sqlite://PATH")]
    InMemory,
    #[error("cannot create the database folder {0}: {1}")]
    Folder(String, std::io::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("syncing the write-ahead log failed: {0}")]
    Sync(String),
    #[error("cannot start the store writer: {0}")]
    Thread(std::io::Error),
    #[error("the store writer has stopped")]
    WriterGone,
    /// The SQLite file the server opened was deleted or replaced: what it
    /// would write now, a restart would not find.
    #[error("the database file {0} was deleted or replaced; restart the server")]
    FileGone(String),
    /// A status column holds a value no version of this server writes.
    #[error("unknown event status {0:?} in the store")]
    UnknownStatus(String),
    /// An operation on the store refused (a backup, a subcommand on a
    /// missing database); the message says why.
    #[error("{0}")]
    Refused(String),
    /// Writes failed for want of a writable store (see [`StoreError::reason`]).
    #[error("{0}")]
    Unwritable(&'static str),
    /// A PostgreSQL group's new events were written but resolving its
    /// redelivered ones failed: the cause, shared by every request that
    /// held a redelivery, and classed as it is (a lost connection is still
    /// a 503).
    #[error("resolving redelivered events: {0}")]
    Redeliveries(std::sync::Arc<StoreError>),
}

impl StoreError {
    /// A short reason for readiness and the 503, naming no path or query.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::FileGone(_) => {
                "the database file was deleted or replaced; restart the server"
            }
            StoreError::Sync(_) => "syncing the write-ahead log failed; restart the server",
            StoreError::WriterGone => "the store writer has stopped",
            StoreError::Unwritable(why) => why,
            StoreError::Redeliveries(cause) => cause.reason(),
            StoreError::Db(sqlx::Error::Database(db))
                if db
                    .code()
                    .is_some_and(|c| c.starts_with("57P0") || c.starts_with("08")) =>
            {
                "the connection to the database was lost"
            }
            e if e.is_unavailable() => {
                "the database cannot be written (read-only, full or failing disk)"
            }
            _ => "the store does not answer",
        }
    }

    /// Whether the store cannot take writes for now (its file is gone,
    /// read-only or full, a sync failed, the writer stopped): answered 503
    /// rather than 500, and readiness says so until a write succeeds.
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            StoreError::Sync(_)
            | StoreError::WriterGone
            | StoreError::FileGone(_)
            | StoreError::Unwritable(_) => true,
            StoreError::Redeliveries(cause) => cause.is_unavailable(),
            StoreError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(C::ReadOnly | C::DiskFull | C::SystemIoFailure | C::CannotOpen)
            ),
            StoreError::Db(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => true,
            StoreError::Db(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
                // SQLite's read-only, disk-full and I/O codes; PostgreSQL's
                // disk-full, out-of-memory and read-only transaction, and a
                // connection the server ended (57P0x) or that failed (08xxx),
                // which the PostgreSQL writers retry on a new connection.
                matches!(
                    &*c,
                    "8" | "13" | "10" | "53100" | "53200" | "25006" | "57P01" | "57P02" | "57P03"
                ) || c.starts_with("08")
            }),
            _ => false,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$p` bound to the backend's pool; the SQL inside is
/// shared, the code is instantiated once per backend.
macro_rules! with_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            $crate::store::Pool::Sqlite($p) => $body,
            $crate::store::Pool::Postgres($p) => $body,
        }
    };
}
pub(crate) use with_pool;

/// Writes an event's awards in a transaction (`$tx`, inside [`with_pool!`])
/// and evaluates to the points of the rows inserted: a once-award whose key
/// the ledger already holds inserts nothing. The ledger insert of the queue
/// workers and of rescoring; the group-commit writers settle once-awards
/// before their batched inserts.
macro_rules! insert_awards {
    ($tx:expr, $awards:expr, event = $event:expr, ns = $ns:expr, user = $user:expr,
     course = $course:expr, occurred = $occurred:expr, now = $now:expr) => {{
        let mut inserted: i64 = 0;
        for a in $awards {
            let r = sqlx::query($crate::store::INSERT_LEDGER)
                .bind($event)
                .bind($ns)
                .bind($user)
                .bind($course)
                .bind(a.rule.as_ref())
                .bind(a.points)
                .bind(&a.reason)
                .bind($occurred)
                .bind($now)
                .bind(&a.once)
                .execute(&mut *$tx)
                .await?;
            if r.rows_affected() == 1 {
                inserted += a.points;
            }
        }
        inserted
    }};
}
pub(crate) use insert_awards;

/// Corrects an event's points after once-awards were dropped.
pub(crate) const SET_POINTS: &str = "UPDATE events SET points = $1 WHERE id = $2";

/// The ledger store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    writer: mpsc::Sender<plan::Job>,
    backend: &'static str,
    group_sizes: prometheus::Histogram,
    /// SQLite only: the WAL's size and checkpoint failures (see
    /// `sqlite_writer`).
    wal: Option<WalMetrics>,
    /// Set for good when syncing the SQLite WAL failed (see `sqlite_writer`).
    sync_failed: Arc<AtomicBool>,
    /// SQLite only: the database file the server opened, to notice it
    /// deleted or replaced.
    file: Option<Arc<sqlite_writer::FileIdentity>>,
    /// Why and when the last write failed for want of a writable store;
    /// cleared by the next write that succeeds.
    write_failure: Arc<std::sync::Mutex<Option<(&'static str, std::time::Instant)>>>,
}

/// How long readiness reports a failed write (unless a write succeeds
/// first); after it, readiness lets traffic try the store again.
const UNWRITABLE_HOLD: std::time::Duration = std::time::Duration::from_secs(30);

/// How the SQLite WAL keeps up: frames in it at the last checkpoint, and
/// failed checkpoints. A WAL that keeps growing means checkpoints fail, or a
/// long read holds an old snapshot that the WAL cannot start over without.
#[derive(Clone, Debug)]
pub struct WalMetrics {
    pub frames: prometheus::IntGauge,
    pub checkpoint_failures: prometheus::IntCounter,
}

impl WalMetrics {
    fn new() -> WalMetrics {
        WalMetrics {
            frames: prometheus::IntGauge::new(
                "rocket_store_wal_frames",
                "Frames (pages) in the SQLite WAL at the last checkpoint; it starts over at about 2,000.",
            )
            .unwrap_or_else(|e| panic!("gauge: {e}")),
            checkpoint_failures: prometheus::IntCounter::new(
                "rocket_store_checkpoint_failures_total",
                "Failed SQLite WAL checkpoints (the WAL grows until one succeeds).",
            )
            .unwrap_or_else(|e| panic!("counter: {e}")),
        }
    }
}

/// Requests written per store transaction: how well group commit groups.
fn group_size_histogram() -> prometheus::Histogram {
    prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(
            "rocket_store_group_commit_requests",
            "Requests written per store transaction (group commit).",
        )
        .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
    )
    .unwrap_or_else(|e| panic!("histogram: {e}"))
}

/// An event being scored again: its own row is left out of its history,
/// and its points (counted in the total when processed) taken off.
#[derive(Debug, Clone, Copy)]
pub struct StoredSelf<'a> {
    pub id: &'a str,
    pub points: i64,
}

/// A stored event as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub event_id: String,
    pub source: String,
    pub namespace: String,
    pub dedupe_key: String,
    pub status: String,
    pub event_type: Option<String>,
    pub user_id: Option<String>,
    pub points: i64,
    pub error: Option<String>,
    pub attempts: i64,
    pub received_at: i64,
    pub processed_at: Option<i64>,
    pub canonical: serde_json::Value,
    /// The body as stored (a body token removed).
    pub raw: Vec<u8>,
    /// The request's headers, credentials redacted (none for events stored
    /// before headers were kept).
    pub request_headers: Option<serde_json::Value>,
    pub awards: Vec<LedgerEntry>,
}

/// One ledger row.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerEntry {
    pub event_id: String,
    pub rule: String,
    pub points: i64,
    pub reason: Option<String>,
    pub course_id: Option<String>,
    pub occurred_at: i64,
}

/// A user's standing.
#[derive(Debug, Clone, Serialize)]
pub struct UserRecord {
    pub total_points: i64,
    pub events: i64,
    pub recent: Vec<LedgerEntry>,
}

/// Leaderboard filters.
#[derive(Debug, Clone, Default)]
pub struct LeaderboardQuery {
    pub namespace: Option<String>,
    pub course_id: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LeaderRow {
    pub namespace: String,
    pub user_id: String,
    pub points: i64,
}

/// Counts for `/api/v1/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub events: Vec<(String, String, String, i64)>,
    pub points_per_day: Vec<(String, i64)>,
}

// Statements shared by the writers, the queue workers and rescoring. On
// SQLite, `$N` is a named parameter numbered by first appearance, so the
// placeholders stay in order and bind by position on both stores.

/// A learner's latest ledger rows. The ids come from the learner's range of
/// `ledger_learner` alone (the index holds them), sorted, and only the rows
/// kept are read: the sort grows with the learner's ledger (about 7 ms for
/// 50,000 rows), the price of one index by learner instead of two on every
/// write (docs/storage.md).
const LEARNER_LEDGER: &str = "SELECT event_id, rule, points, reason, course_id, occurred_at \
    FROM ledger WHERE id IN (SELECT id FROM ledger WHERE namespace = $1 AND user_id = $2 \
    ORDER BY id DESC LIMIT $3) ORDER BY id DESC";
/// The namespaces that have totals: a loose scan of `totals_ns_rank`, one
/// probe per namespace.
const NAMESPACES: &str = "WITH RECURSIVE ns(name) AS ( \
    SELECT MIN(namespace) FROM totals \
    UNION ALL SELECT (SELECT MIN(namespace) FROM totals WHERE namespace > ns.name) FROM ns \
    WHERE ns.name IS NOT NULL) \
    SELECT name FROM ns WHERE name IS NOT NULL";

/// The `i`-th part of the overall leaderboard's union: one namespace's top
/// (binds `$2i+1` the namespace, `$2i+2` the limit).
fn top_of_namespace(i: usize) -> String {
    format!(
        "SELECT * FROM (SELECT namespace, user_id, points FROM totals \
         WHERE namespace = ${} ORDER BY points DESC, user_id LIMIT ${}) AS t{i}",
        2 * i + 1,
        2 * i + 2
    )
}

/// The stored event with a `(source, dedupe_key)`, and a failed one's
/// re-score (both writers).
pub(crate) const EXISTING: &str = "SELECT id, status, points, processed_at, error FROM events WHERE source = $1 AND dedupe_key = $2";
pub(crate) const RESCORE: &str =
    "UPDATE events SET status = $1, points = $2, error = $3, processed_at = $4, canonical = $5, \
    attempts = attempts + 1, next_attempt_at = 0 WHERE id = $6 AND status = 'failed'";
/// One ledger row (the PostgreSQL writer builds its own multi-row form). A
/// `once_key` the ledger already holds for the user and rule inserts nothing
/// (the caller counts the rows it inserted).
pub(crate) const INSERT_LEDGER: &str =
    "INSERT INTO ledger (event_id, namespace, user_id, course_id, rule, points, \
    reason, occurred_at, created_at, once_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
    ON CONFLICT DO NOTHING";
/// Whether the ledger holds a once-award's key for the user and rule.
pub(crate) const ONCE_HELD: &str = "SELECT 1 FROM ledger WHERE namespace = $1 AND user_id = $2 \
    AND rule = $3 AND once_key = $4";
/// Adds points and events to a user's total (creating it).
pub(crate) const UPSERT_TOTAL: &str =
    "INSERT INTO totals (namespace, user_id, points, events, updated_at) \
    VALUES ($1, $2, $3, $4, $5) ON CONFLICT (namespace, user_id) DO UPDATE SET \
    points = totals.points + excluded.points, events = totals.events + excluded.events, \
    updated_at = excluded.updated_at";

/// How many writer tasks drain the queue on PostgreSQL (SQLite has one
/// writer thread: see `sqlite_writer`). Two: one writes while the other's
/// commit waits for the disk. More writers make smaller groups, and
/// PostgreSQL's cost is mostly per statement: with four, 0.58-0.60 of
/// SQLite's throughput at 64 connections against 0.64-0.66 with two, and
/// less at 8 connections too (docs/performance.md).
const POSTGRES_WRITERS: usize = 2;

/// The SQLite pool (migrated), and the writer thread with the WAL's metrics
/// and the file's identity.
async fn connect_sqlite(
    opts: SqliteConnectOptions,
    group_sizes: &prometheus::Histogram,
    sync_failed: &Arc<AtomicBool>,
) -> Result<
    (
        Pool,
        mpsc::Sender<plan::Job>,
        WalMetrics,
        Arc<sqlite_writer::FileIdentity>,
    ),
    StoreError,
> {
    let opts = opts
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL for what commits through this pool (queue workers,
        // rescoring, admin retries): on disk before the answer. The hook
        // writer thread syncs its own commits (`sqlite_writer`).
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        // Not enforced by SQLite: `ledger.event_id` has no index of its own
        // (a write per award it would cost), and without one SQLite checks
        // every event delete with a scan of the whole ledger (74 ms at 1M
        // rows). The writers insert an award with its event in one
        // transaction, retention deletes only events without awards, and
        // the tests run `PRAGMA foreign_key_check` after every kind of write.
        .foreign_keys(false);
    if let Some(parent) = opts.get_filename().parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Folder(parent.display().to_string(), e))?;
        }
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .min_connections(1)
        .connect_with(opts.clone())
        .await?;
    sqlx::migrate!("migrations/sqlite").run(&pool).await?;
    let wal = WalMetrics::new();
    let identity = Arc::new(sqlite_writer::FileIdentity::of(opts.get_filename())?);
    let writer = sqlite_writer::spawn(
        opts.get_filename(),
        group_sizes.clone(),
        wal.clone(),
        sync_failed.clone(),
        identity.clone(),
    )?;
    Ok((Pool::Sqlite(pool), writer, wal, identity))
}

/// The SQLite connection options a URL names (`sqlite:` URLs, and plain
/// paths with no scheme); `None` for another scheme.
fn sqlite_options(url: &str) -> Result<Option<SqliteConnectOptions>, StoreError> {
    let plain_path = !url.is_empty()
        && (!url.contains(':') || (!url.contains("://") && url.starts_with(['/', '.'])));
    if plain_path {
        // Taken as it is, not parsed as a URL (`%`, `?`, `#` are file
        // name characters here).
        Ok(Some(SqliteConnectOptions::new().filename(url)))
    } else if url.starts_with("sqlite:") {
        // The writer thread opens the file again: an in-memory database
        // would be a different, empty one there.
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(StoreError::InMemory);
        }
        Ok(Some(SqliteConnectOptions::from_str(url)?))
    } else {
        Ok(None)
    }
}

impl Store {
    /// Connects to a store that must exist already: for the subcommands
    /// that work on the server's data (`backup`, `erase`), where a mistyped
    /// path must not create an empty database and report success on it.
    pub async fn connect_existing(url: &str) -> Result<Store, StoreError> {
        if let Some(opts) = sqlite_options(url)? {
            let file = opts.get_filename();
            if !file.is_file() {
                return Err(StoreError::Refused(format!(
                    "no database at {} (check ROCKET_DATABASE_URL or --database-url)",
                    file.display()
                )));
            }
        }
        Store::connect(url).await
    }

    /// Connects, creating the SQLite file and folder if needed, and runs the
    /// backend's migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let sqlite = sqlite_options(url)?;
        let group_sizes = group_size_histogram();
        let sync_failed = Arc::new(AtomicBool::new(false));
        let (pool, writer, backend, sqlite_parts) = if let Some(opts) = sqlite {
            if opts.get_filename().as_os_str().is_empty() {
                return Err(StoreError::BadUrl(url.to_string()));
            }
            let (pool, writer, wal, identity) =
                connect_sqlite(opts, &group_sizes, &sync_failed).await?;
            (pool, writer, "sqlite", Some((wal, identity)))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await?;
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
            let writer = pg_writer::spawn_writers(&pool, POSTGRES_WRITERS, group_sizes.clone());
            (Pool::Postgres(pool), writer, "postgres", None)
        } else {
            return Err(StoreError::BadUrl(url.to_string()));
        };
        let (wal, file) = sqlite_parts.unzip();
        Ok(Store {
            pool,
            writer,
            backend,
            group_sizes,
            wal,
            sync_failed,
            file,
            write_failure: Default::default(),
        })
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The store's own metrics, for `/metrics`: requests per write
    /// transaction, and on SQLite the WAL's.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        let mut all: Vec<Box<dyn prometheus::core::Collector>> =
            vec![Box::new(self.group_sizes.clone())];
        if let Some(wal) = &self.wal {
            all.push(Box::new(wal.frames.clone()));
            all.push(Box::new(wal.checkpoint_failures.clone()));
        }
        all
    }

    /// Stores one request's events in one transaction (grouped with other
    /// requests'), returning once it has committed.
    pub async fn ingest(
        &self,
        namespace: &str,
        events: Vec<Prepared>,
        queued: bool,
    ) -> Result<Vec<Persisted>, StoreError> {
        let (reply, rx) = oneshot::channel();
        let job = plan::Job::new(namespace, events, queued, reply);
        let result = match self.writer.send(job).await {
            Err(_) => Err(StoreError::WriterGone),
            Ok(()) => rx.await.unwrap_or(Err(StoreError::WriterGone)),
        };
        self.note_write(&result);
        result
    }

    /// Records whether a write succeeded, for readiness.
    pub(crate) fn note_write<T>(&self, result: &Result<T, StoreError>) {
        let mut failure = self.write_failure.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(_) => *failure = None,
            Err(e) if e.is_unavailable() => {
                *failure = Some((e.reason(), std::time::Instant::now()))
            }
            Err(_) => {}
        }
    }

    /// Whether the store answers (and can still make writes durable).
    pub async fn ping(&self) -> Result<(), StoreError> {
        if self.sync_failed.load(Ordering::Relaxed) {
            return Err(StoreError::Sync(
                "an earlier WAL sync failed; restart the server".into(),
            ));
        }
        if self.writer.is_closed() {
            return Err(StoreError::WriterGone);
        }
        if let Some(file) = &self.file {
            file.check()?;
        }
        // Held for a while, not for ever: a load balancer that takes the
        // instance out on this answer sends no more writes, and only a
        // write can show that the store has recovered.
        let failing = *self.write_failure.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((why, at)) = failing {
            if at.elapsed() < UNWRITABLE_HOLD {
                return Err(StoreError::Unwritable(why));
            }
        }
        with_pool!(&self.pool, p => {
            sqlx::query("SELECT 1").execute(p).await?;
        });
        Ok(())
    }

    pub async fn close(&self) {
        with_pool!(&self.pool, p => p.close().await)
    }

    /// One stored event with its ledger entries.
    pub async fn event(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        const EVENT: &str = "SELECT id, source, namespace, dedupe_key, status, event_type, user_id, points, error, \
            attempts, received_at, processed_at, canonical, raw, request_headers FROM events WHERE id = $1";
        // Through the user's ledger index: only events with a user have awards.
        const AWARDS: &str =
            "SELECT event_id, rule, points, reason, course_id, occurred_at FROM ledger \
            WHERE namespace = $1 AND user_id = $2 AND event_id = $3 ORDER BY id";
        with_pool!(&self.pool, p => {
            let Some(row) = sqlx::query(EVENT).bind(id).fetch_optional(p).await? else {
                return Ok(None);
            };
            let namespace: String = row.try_get("namespace")?;
            let user: Option<String> = row.try_get("user_id")?;
            let awards = match &user {
                Some(user) => sqlx::query(AWARDS).bind(&namespace).bind(user).bind(id).fetch_all(p).await?,
                None => Vec::new(),
            };
            let canonical: String = row.try_get("canonical")?;
            Ok(Some(EventRecord {
                event_id: row.try_get("id")?,
                source: row.try_get("source")?,
                namespace: row.try_get("namespace")?,
                dedupe_key: row.try_get("dedupe_key")?,
                status: row.try_get("status")?,
                event_type: row.try_get("event_type")?,
                user_id: row.try_get("user_id")?,
                points: row.try_get("points")?,
                error: row.try_get("error")?,
                attempts: row.try_get("attempts")?,
                received_at: row.try_get("received_at")?,
                processed_at: row.try_get("processed_at")?,
                canonical: serde_json::from_str(&canonical).unwrap_or(serde_json::Value::Null),
                raw: row.try_get("raw")?,
                request_headers: row
                    .try_get::<Option<String>, _>("request_headers")?
                    .and_then(|h| serde_json::from_str(&h).ok()),
                awards: awards.iter().map(ledger_entry).collect::<Result<_, _>>()?,
            }))
        })
    }

    /// A user's total, event count and most recent ledger entries.
    pub async fn user(
        &self,
        namespace: &str,
        user_id: &str,
        recent: i64,
    ) -> Result<UserRecord, StoreError> {
        const TOTAL: &str =
            "SELECT points, events FROM totals WHERE namespace = $1 AND user_id = $2";
        with_pool!(&self.pool, p => {
            let total = sqlx::query(TOTAL).bind(namespace).bind(user_id).fetch_optional(p).await?;
            let (total_points, events) = match total {
                Some(r) => (r.try_get::<i64, _>("points")?, r.try_get::<i64, _>("events")?),
                None => (0, 0),
            };
            let rows = sqlx::query(LEARNER_LEDGER).bind(namespace).bind(user_id).bind(recent).fetch_all(p).await?;
            Ok(UserRecord {
                total_points,
                events,
                recent: rows.iter().map(ledger_entry).collect::<Result<_, _>>()?,
            })
        })
    }

    /// The top of a leaderboard, best first. Overall standings come from the
    /// totals table; a course's, or the last seven days', from the summary
    /// tables ([`leaderboards`]); other filters aggregate the ledger.
    pub async fn leaderboard(&self, q: &LeaderboardQuery) -> Result<Vec<LeaderRow>, StoreError> {
        if let Some(rows) = leaderboards::from_summaries(&self.pool, q).await? {
            return Ok(rows);
        }
        let mut conds: Vec<String> = Vec::new();
        let mut texts: Vec<&str> = Vec::new();
        let mut ints: Vec<i64> = Vec::new();
        let filtered = q.course_id.is_some() || q.since_ms.is_some() || q.until_ms.is_some();
        // Text binds first, then integer binds: numbering follows that order.
        if let Some(ns) = &q.namespace {
            texts.push(ns);
            conds.push(format!("namespace = ${}", texts.len()));
        }
        if let Some(c) = &q.course_id {
            texts.push(c);
            conds.push(format!("course_id = ${}", texts.len()));
        }
        let base = texts.len();
        if let Some(s) = q.since_ms {
            ints.push(s);
            conds.push(format!("occurred_at >= ${}", base + ints.len()));
        }
        if let Some(u) = q.until_ms {
            ints.push(u);
            conds.push(format!("occurred_at < ${}", base + ints.len()));
        }
        ints.push(q.limit);
        let limit = format!("${}", base + ints.len());
        let where_ = if conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conds.join(" AND "))
        };
        if !filtered && q.namespace.is_none() {
            return self.overall_leaderboard(q.limit).await;
        }
        let sql = if filtered {
            format!(
                "SELECT namespace, user_id, CAST(SUM(points) AS BIGINT) AS points FROM ledger {where_} \
                 GROUP BY namespace, user_id ORDER BY points DESC, namespace, user_id LIMIT {limit}"
            )
        } else {
            format!(
                "SELECT namespace, user_id, points FROM totals {where_} \
                 ORDER BY points DESC, namespace, user_id LIMIT {limit}"
            )
        };
        with_pool!(&self.pool, p => {
            let mut query = sqlx::query(&sql);
            for t in &texts {
                query = query.bind(*t);
            }
            for i in &ints {
                query = query.bind(*i);
            }
            let rows = query.fetch_all(p).await?;
            rows.iter()
                .map(|r| {
                    Ok(LeaderRow {
                        namespace: r.try_get("namespace")?,
                        user_id: r.try_get("user_id")?,
                        points: r.try_get("points")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// The overall top `limit`: each namespace's top `limit` through
    /// `totals_ns_rank`, merged. (One index ordered by points per write is
    /// cheaper than two; namespaces are few.) The namespaces come from a
    /// loose scan of the same index, one probe per namespace.
    async fn overall_leaderboard(&self, limit: i64) -> Result<Vec<LeaderRow>, StoreError> {
        /// Namespaces per statement (two binds each, well under the limits).
        const CHUNK: usize = 200;
        with_pool!(&self.pool, p => {
            let namespaces: Vec<String> = sqlx::query_scalar(NAMESPACES).fetch_all(p).await?;
            let mut rows: Vec<LeaderRow> = Vec::new();
            for chunk in namespaces.chunks(CHUNK) {
                let parts: Vec<String> = (0..chunk.len()).map(top_of_namespace).collect();
                let sql = parts.join(" UNION ALL ");
                let mut query = sqlx::query(&sql);
                for ns in chunk {
                    query = query.bind(ns).bind(limit);
                }
                for r in query.fetch_all(p).await? {
                    rows.push(LeaderRow {
                        namespace: r.try_get("namespace")?,
                        user_id: r.try_get("user_id")?,
                        points: r.try_get("points")?,
                    });
                }
            }
            rows.sort_by(|a, b| {
                b.points
                    .cmp(&a.points)
                    .then_with(|| a.namespace.cmp(&b.namespace))
                    .then_with(|| a.user_id.cmp(&b.user_id))
            });
            rows.truncate(limit.max(0) as usize);
            Ok(rows)
        })
    }

    /// What a rule may know of a user's past before this event: total, whether
    /// this (type, object or course) is new, and recent events (bounded).
    pub async fn history(
        &self,
        namespace: &str,
        ev: &CanonicalEvent,
        stored: Option<StoredSelf<'_>>,
    ) -> Result<History, StoreError> {
        const TOTAL: &str = "SELECT points FROM totals WHERE namespace = $1 AND user_id = $2";
        const RECENT: &str =
            "SELECT event_type, occurred_at FROM events WHERE namespace = $1 AND user_id = $2 \
            AND status = 'processed' AND event_type IS NOT NULL AND occurred_at >= $3 \
            AND id <> $5 ORDER BY occurred_at DESC LIMIT $4";
        const SEEN_OBJECT: &str =
            "SELECT 1 AS seen FROM events WHERE namespace = $1 AND user_id = $2 \
            AND event_type = $3 AND status = 'processed' AND object_id = $4 AND id <> $5 LIMIT 1";
        const SEEN_COURSE: &str =
            "SELECT 1 AS seen FROM events WHERE namespace = $1 AND user_id = $2 \
            AND event_type = $3 AND status = 'processed' AND course_id = $4 AND id <> $5 LIMIT 1";
        const SEEN_TYPE: &str =
            "SELECT 1 AS seen FROM events WHERE namespace = $1 AND user_id = $2 \
            AND event_type = $3 AND status = 'processed' AND id <> $4 LIMIT 1";
        let (Some(user), Some(kind)) = (&ev.user_id, &ev.event_type) else {
            return Ok(History::default());
        };
        let at = ev.occurred_at.timestamp_millis();
        let since = at - HISTORY_DAYS * 86_400_000;
        // Event ids are never empty: "" excludes nothing.
        let (own_id, own_points) = stored.map_or(("", 0), |s| (s.id, s.points));
        with_pool!(&self.pool, p => {
            let total = sqlx::query(TOTAL).bind(namespace).bind(user).fetch_optional(p).await?;
            let total: i64 = match total {
                Some(r) => r.try_get::<i64, _>("points")? - own_points,
                None => 0,
            };
            let seen = match (&ev.object_id, &ev.course_id) {
                (Some(o), _) => sqlx::query(SEEN_OBJECT).bind(namespace).bind(user).bind(kind).bind(o).bind(own_id).fetch_optional(p).await?,
                (None, Some(c)) => sqlx::query(SEEN_COURSE).bind(namespace).bind(user).bind(kind).bind(c).bind(own_id).fetch_optional(p).await?,
                (None, None) => sqlx::query(SEEN_TYPE).bind(namespace).bind(user).bind(kind).bind(own_id).fetch_optional(p).await?,
            };
            let rows = sqlx::query(RECENT).bind(namespace).bind(user).bind(since).bind(HISTORY_EVENTS).bind(own_id).fetch_all(p).await?;
            let recent = rows
                .iter()
                .map(|r| Ok((r.try_get::<String, _>("event_type")?, r.try_get::<i64, _>("occurred_at")?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            Ok(History { total, first: seen.is_none(), recent, at })
        })
    }

    /// Event counts by source, type and status; points awarded per UTC day
    /// (the day of the award, not of the event: a replayed backlog of old
    /// events shows on the day it was scored), whole days from the one
    /// `since_ms` falls in.
    ///
    /// SQLite reads both from counters kept in the same transactions as the
    /// rows they count (by the hook's writer itself, and by migration 0005's
    /// triggers on every other path),
    /// so the answer costs the same at any ledger size; PostgreSQL,
    /// whose parallel writers such counters would serialise, aggregates.
    pub async fn stats(&self, since_ms: i64) -> Result<Stats, StoreError> {
        let first_day_ms = since_ms.div_euclid(DAY_MS) * DAY_MS;
        let (counts_sql, days_sql) = match self.pool {
            Pool::Sqlite(_) => (STATS_COUNTS_SQLITE, STATS_DAYS_SQLITE),
            Pool::Postgres(_) => (STATS_COUNTS_POSTGRES, STATS_DAYS_POSTGRES),
        };
        with_pool!(&self.pool, p => {
            let counts = sqlx::query(counts_sql).fetch_all(p).await?;
            let days = sqlx::query(days_sql).bind(first_day_ms).fetch_all(p).await?;
            Ok(Stats {
                events: counts
                    .iter()
                    .map(|r| Ok((r.try_get("source")?, r.try_get("event_type")?, r.try_get("status")?, r.try_get("n")?)))
                    .collect::<Result<_, sqlx::Error>>()?,
                points_per_day: days
                    .iter()
                    .map(|r| Ok((r.try_get("day")?, r.try_get("points")?)))
                    .collect::<Result<_, sqlx::Error>>()?,
            })
        })
    }
}

const DAY_MS: i64 = 86_400_000;
pub(super) const STATS_COUNTS_SQLITE: &str =
    "SELECT source, event_type, status, n FROM event_counts \
    WHERE n > 0 ORDER BY source, event_type, status";
pub(super) const STATS_DAYS_SQLITE: &str = "SELECT day, points FROM ledger_days \
    WHERE entries > 0 AND day >= strftime('%Y-%m-%d', $1 / 1000, 'unixepoch') ORDER BY day";
const STATS_COUNTS_POSTGRES: &str = "SELECT source, COALESCE(event_type, 'unmapped') AS event_type, status, COUNT(*) AS n \
    FROM events GROUP BY source, COALESCE(event_type, 'unmapped'), status ORDER BY source, event_type, status";
const STATS_DAYS_POSTGRES: &str =
    "SELECT to_char(to_timestamp(created_at / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, \
    CAST(SUM(points) AS BIGINT) AS points FROM ledger WHERE created_at >= $1 GROUP BY 1 ORDER BY 1";

fn ledger_entry<R: Row>(r: &R) -> Result<LedgerEntry, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(LedgerEntry {
        event_id: r.try_get("event_id")?,
        rule: r.try_get("rule")?,
        points: r.try_get("points")?,
        reason: r.try_get("reason")?,
        course_id: r.try_get("course_id")?,
        occurred_at: r.try_get("occurred_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_status_is_read_strictly() {
        for (text, want) in [
            ("processed", EventStatus::Processed),
            ("failed", EventStatus::Failed),
            ("queued", EventStatus::Queued),
            ("processing", EventStatus::Queued),
            ("erased", EventStatus::Erased),
        ] {
            assert_eq!(EventStatus::from_stored(text).unwrap(), want);
        }
        for text in ["", "Processed", "done"] {
            assert!(matches!(
                EventStatus::from_stored(text),
                Err(StoreError::UnknownStatus(_))
            ));
        }
    }

    /// A request failed because its group's redeliveries could not be
    /// resolved answers as its cause would: 503 for a store that is
    /// unreachable, 500 otherwise.
    #[test]
    fn a_failed_redelivery_keeps_its_cause_class() {
        let lost = StoreError::Redeliveries(std::sync::Arc::new(StoreError::Db(
            sqlx::Error::PoolTimedOut,
        )));
        assert!(lost.is_unavailable());
        assert_eq!(
            lost.reason(),
            StoreError::Db(sqlx::Error::PoolTimedOut).reason()
        );
        assert!(lost
            .to_string()
            .starts_with("resolving redelivered events: "));
        let other = StoreError::Redeliveries(std::sync::Arc::new(StoreError::Db(
            sqlx::Error::RowNotFound,
        )));
        assert!(!other.is_unavailable());
    }

    async fn plan(pool: &SqlitePool, sql: &str, binds: usize) -> Vec<String> {
        let sql = format!("EXPLAIN QUERY PLAN {sql}");
        let mut q = sqlx::query_as::<_, (i64, i64, i64, String)>(&sql);
        for _ in 0..binds {
            q = q.bind("x");
        }
        q.fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.3)
            .collect()
    }

    /// A migrated SQLite store in a temp dir (kept alive by the `TempDir`).
    async fn sqlite_store() -> (tempfile::TempDir, Store, SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("plan.db").display());
        let store = Store::connect(&url).await.unwrap();
        let Pool::Sqlite(pool) = store.pool.clone() else {
            unreachable!()
        };
        (dir, store, pool)
    }

    /// The writer runs with triggers off and keeps the summary tables
    /// itself (`writer_sums`): every trigger on a table it writes must be
    /// one it mirrors, so a migration that adds one fails here until the
    /// writer does the same.
    #[tokio::test]
    async fn the_writer_mirrors_every_trigger_on_the_tables_it_writes() {
        let (_dir, _store, pool) = sqlite_store().await;
        let written = [
            "events",
            "ledger",
            "totals",
            "event_counts",
            "ledger_days",
            "course_points",
            "recent_points",
        ];
        let triggers: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        // Each trigger by name and the start of the SHA-256 of its SQL: a
        // migration that redefines a trigger under its old name fails here
        // too, until the writer's mirror is checked and the print updated.
        let on_written: Vec<(&str, String)> = triggers
            .iter()
            .filter(|(_, table, _)| written.contains(&table.as_str()))
            .map(|(name, _, sql)| {
                let digest = <sha2::Sha256 as sha2::Digest>::digest(sql.as_bytes());
                (name.as_str(), hex::encode(&digest[..6]))
            })
            .collect();
        let mirrored: Vec<(&str, String)> = writer_sums::MIRRORED_TRIGGERS
            .iter()
            .map(|(name, print)| (*name, print.to_string()))
            .collect();
        assert_eq!(on_written, mirrored);
    }

    /// `/api/v1/stats` reads the counters, never the events
    /// or the ledger (a full scan took seconds at 1M events).
    #[tokio::test]
    async fn stats_read_counters_not_events() {
        let (_dir, _store, pool) = sqlite_store().await;
        for (sql, binds) in [(STATS_COUNTS_SQLITE, 0), (STATS_DAYS_SQLITE, 1)] {
            let details = plan(&pool, sql, binds).await;
            assert!(
                !details
                    .iter()
                    .any(|d| d.split_whitespace().any(|w| w == "events" || w == "ledger")),
                "{details:?}"
            );
            assert!(!details.is_empty());
        }
    }

    /// A course's and the last seven days' leaderboards read the top of a
    /// summary table's rank index (no sort), and the window's correction
    /// reads the ledger's time index.
    #[tokio::test]
    async fn summary_leaderboards_read_their_rank_indexes() {
        let (_dir, store, pool) = sqlite_store().await;
        let cases = [
            (leaderboards::COURSE_TOP, 2, "course_points_rank"),
            (leaderboards::COURSE_TOP_NS, 3, "course_points_rank"),
            (
                leaderboards::RECENT_NAMESPACES,
                0,
                "COVERING INDEX recent_points_ns_rank",
            ),
            (leaderboards::RECENT_TOP_NS, 2, "recent_points_ns_rank"),
            (leaderboards::CORRECTED, 2, "ledger_time"),
        ];
        for (sql, binds, index) in cases {
            let details = plan(&pool, sql, binds).await;
            assert!(
                details.iter().any(|d| d.contains(index)),
                "{sql}: {details:?}"
            );
            // (A course's top within one namespace sorts only ties on points.)
            if index != "ledger_time" {
                let full_sort = |d: &String| d.contains("TEMP B-TREE FOR ORDER BY");
                assert!(!details.iter().any(full_sort), "{sql}: {details:?}");
            }
        }
        // Answered from the tables, not passed on to the ledger's aggregate.
        let now = chrono::Utc::now().timestamp_millis();
        let start = now - leaderboards::RECENT_WINDOW_MS;
        store.move_recent_window(start).await.unwrap();
        let q = |course: Option<&str>, since: Option<i64>, until: Option<i64>| LeaderboardQuery {
            course_id: course.map(String::from),
            since_ms: since,
            until_ms: until,
            limit: 10,
            ..Default::default()
        };
        for (query, summary) in [
            (q(Some("c"), None, None), true),
            (q(None, Some(start + 60_000), None), true),
            (q(None, Some(start - 1), None), false),
            (q(None, Some(now), None), false),
            (q(Some("c"), Some(start), None), false),
            (q(None, Some(start), Some(now)), false),
        ] {
            let answered = leaderboards::from_summaries(&store.pool, &query)
                .await
                .unwrap();
            assert_eq!(answered.is_some(), summary, "{query:?}");
        }
    }

    /// The window moves a few ledger rows at a time (rows of one time
    /// together), back and forth, and `recent_points` stays the ledger's
    /// recount since its start.
    #[tokio::test]
    async fn the_window_moves_in_steps_of_rows_and_stays_exact() {
        let (_dir, store, pool) = sqlite_store().await;
        for i in 0..40i64 {
            sqlx::query(
                "INSERT INTO ledger (event_id, namespace, user_id, rule, points, occurred_at, created_at) \
                 VALUES ($1, 'ns', $2, 'r', $3, $4, 0)",
            )
            .bind(format!("e{i}"))
            .bind(format!("u{}", i % 7))
            .bind(i)
            .bind(i / 2 * 1000)
            .execute(&pool)
            .await
            .unwrap();
        }
        let recount = "SELECT user_id, SUM(points), COUNT(*) FROM ledger \
            WHERE occurred_at >= (SELECT start_ms FROM recent_window) GROUP BY 1 ORDER BY 1";
        let table = "SELECT user_id, points, entries FROM recent_points ORDER BY 1";
        let mut steps = 0;
        for to in [0, 7_500, 3_000, 19_000, 25_000, 0] {
            while let Some(start) = store.recent_window_start().await.unwrap() {
                if start == to {
                    break;
                }
                let next = store.recent_window_step(start, to, 3).await.unwrap();
                store.move_recent_window(next).await.unwrap();
                steps += 1;
                assert!(steps < 100, "stuck at {start} on the way to {to}");
            }
            let want: Vec<(String, i64, i64)> =
                sqlx::query_as(recount).fetch_all(&pool).await.unwrap();
            let have: Vec<(String, i64, i64)> =
                sqlx::query_as(table).fetch_all(&pool).await.unwrap();
            assert_eq!(have, want, "window at {to}");
        }
        // 20 rows back, then 10, 4, 18, 2 and 40 more: in steps of about 3.
        assert!(steps >= 30, "{steps} steps");
    }

    /// An idle worker polls the claim twice a second: it must walk the
    /// partial queue index, never the whole events table.
    #[tokio::test]
    async fn claim_walks_the_queue_index() {
        let (_dir, _store, pool) = sqlite_store().await;
        let details = plan(&pool, queue::CLAIM_SQLITE, 4).await;
        assert!(
            details
                .iter()
                .any(|d| d.contains("USING INDEX events_queue")),
            "{details:?}"
        );
        assert!(!details.iter().any(|d| d == "SCAN events"), "{details:?}");
    }

    /// The reads that lost an index of their own (to make writes cheaper)
    /// still find their rows through an index, never a scan of the table.
    #[tokio::test]
    async fn reads_without_their_own_index_still_use_one() {
        let (_dir, _store, pool) = sqlite_store().await;
        let pool = &pool;
        let top = top_of_namespace(0);
        // (sql, binds, the index, whether a sort of one learner's rows is allowed)
        let cases = [
            (rescore::AWARDS, 3, "ledger_learner", true),
            (LEARNER_LEDGER, 3, "ledger_learner", true),
            (top.as_str(), 2, "totals_ns_rank", false),
            (NAMESPACES, 0, "COVERING INDEX", false),
        ];
        for (sql, binds, index, sorts) in cases {
            let details = plan(pool, sql, binds).await;
            assert!(
                details.iter().any(|d| d.contains(index)),
                "{sql}: {details:?}"
            );
            // (The namespaces' recursive CTE scans its own rows, `SCAN ns`.)
            let table_scan = |d: &String| {
                ["events", "ledger", "totals"]
                    .iter()
                    .any(|t| d.starts_with(&format!("SCAN {t}")) && !d.contains("INDEX"))
            };
            assert!(!details.iter().any(table_scan), "{sql}: {details:?}");
            assert!(
                sorts || !details.iter().any(|d| d.contains("TEMP B-TREE")),
                "{sql}: {details:?}"
            );
        }
    }
}
