//! The SQLite group-commit writer: a writer thread with its own connection,
//! a sync thread, and a checkpoint thread with a connection of its own.
//!
//! SQLite takes one writer at a time, so the writer needs no async runtime:
//! a plain thread blocks on the job queue, takes everything waiting (up to
//! [`MAX_GROUP`] requests), writes it in one `BEGIN IMMEDIATE` transaction
//! through prepared, cached single-row statements (compiled once for the
//! life of the connection, with no thread hand-off per statement) and
//! commits.
//!
//! Durability is pipelined. The writer's connection runs with
//! `synchronous = NORMAL`, so its commit writes the WAL frames but does not
//! wait for the disk. It hands the committed
//! batch to the sync thread, which `fdatasync`s the WAL file (one sync for
//! every batch committed since the last one) and only then answers the
//! requests. Nothing is acknowledged before its commit is on disk, exactly
//! as with `synchronous = FULL`, but the writer prepares the next batch
//! while the disk works.
//!
//! Checkpoints (copying the WAL's pages into the database file) run on a
//! third thread, `rocket-sqlite-ckpt`, with its own connection: a passive
//! checkpoint at most every [`CHECKPOINT_EVERY`] while commits arrive, so
//! the writer does not stop for the copy and its syncs. A passive
//! checkpoint alone never lets a busy writer start the WAL over, though:
//! the writer appends while it copies, so the WAL never ends fully copied
//! and, under steady load, grows to gigabytes. So
//! once the WAL holds [`WAL_LIMIT_FRAMES`] frames, the writer itself
//! checkpoints the few frames the background pass has not yet copied,
//! between two of its transactions; the next transaction then starts the
//! WAL from the beginning.
//!
//! Reads, migrations and the queue workers stay on sqlx; SQLite's busy
//! timeout serialises them with this connection.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::plan::{
    EventStatus, Fate, Item, Job, LedgerRow, Persisted, Plan, Settled, Totals, MAX_GROUP, QUEUE,
    RETRIES,
};
use super::writer_sums::Sums;
use super::{StoreError, WalMetrics, EXISTING, INSERT_LEDGER, ONCE_HELD, RESCORE, UPSERT_TOTAL};

/// The writer's page cache, in KiB. Larger than SQLite's default 2 MiB, so
/// random-key index inserts into a large ledger find their pages cached; but
/// not much larger, because SQLite 3.46 walks the whole page cache at every
/// commit that split a B-tree page (a page renumbered through a temporary
/// number beyond the file makes `pcache1Truncate` scan every hash bucket;
/// figures in docs/performance.md).
const CACHE_KIB: i64 = 8 * 1024;
/// How often, at most, the checkpoint thread copies the WAL into the
/// database while commits arrive. Each checkpoint ends with an fsync of the
/// database, and the WAL syncs that answer requests queue behind it on the
/// disk: rarer, larger checkpoints cost less CPU but lengthen the tail
/// (figures in docs/performance.md).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(20);
/// WAL frames (pages of about 4 KiB) after which the writer finishes a
/// checkpoint itself so the WAL starts over: the WAL stays under ~10 MiB.
const WAL_LIMIT_FRAMES: i64 = 2000;

const INSERT_EVENT: &str = "INSERT INTO events (id, source, dedupe_key, namespace, event_type, \
    vendor_event_type, user_id, course_id, object_id, occurred_at, received_at, processed_at, \
    status, points, error, canonical, raw, request_headers) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) \
    ON CONFLICT (source, dedupe_key) DO NOTHING";

/// The database file as the server opened it: its path, an open handle and
/// its inode. Deleted (no link left) or replaced (the path names another
/// inode), the file would take writes a restart would never find.
#[derive(Debug)]
pub(crate) struct FileIdentity {
    path: PathBuf,
    file: std::fs::File,
    inode: (u64, u64),
}

impl FileIdentity {
    pub(crate) fn of(path: &Path) -> Result<FileIdentity, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::File::open(path)
            .map_err(|e| StoreError::Folder(path.display().to_string(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| StoreError::Folder(path.display().to_string(), e))?;
        Ok(FileIdentity {
            path: path.to_path_buf(),
            file,
            inode: (meta.dev(), meta.ino()),
        })
    }

    /// `Err` when the file was deleted or replaced since it was opened.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        use std::os::unix::fs::MetadataExt;
        let linked = self.file.metadata().is_ok_and(|m| m.nlink() > 0);
        let same = std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if linked && same {
            Ok(())
        } else {
            Err(StoreError::FileGone(self.path.display().to_string()))
        }
    }
}

/// A request's answer, held until its batch is on disk.
type Reply = (
    oneshot::Sender<Result<Vec<Persisted>, StoreError>>,
    Result<Vec<Persisted>, StoreError>,
);

/// Opens the writer's and the checkpointer's connections (the file exists
/// and is migrated by now) and starts the writer, sync and checkpoint
/// threads. Returns the queue the requests
/// send to. `failed` is set for good if a sync fails.
pub(super) fn spawn(
    path: &Path,
    group_sizes: prometheus::Histogram,
    metrics: WalMetrics,
    failed: Arc<AtomicBool>,
    identity: Arc<FileIdentity>,
) -> Result<mpsc::Sender<Job>, StoreError> {
    let conn = open(path)?;
    let ckpt_conn = open(path)?;
    let wal = wal_path(path);
    let (tx, rx) = mpsc::channel::<Job>(QUEUE);
    let (done_tx, done_rx) = std_mpsc::channel::<Vec<Reply>>();
    let ckpt = Arc::new(Checkpoints::new(metrics));
    std::thread::Builder::new()
        .name("rocket-sqlite-sync".into())
        .spawn(move || sync_loop(&wal, done_rx, &failed))
        .map_err(StoreError::Thread)?;
    let shared = ckpt.clone();
    let checkpointer = std::thread::Builder::new()
        .name("rocket-sqlite-ckpt".into())
        .spawn(move || checkpoint_loop(&ckpt_conn, &shared))
        .map_err(StoreError::Thread)?
        .thread()
        .clone();
    let writer = Writer {
        conn,
        ckpt,
        checkpointer,
        identity,
    };
    std::thread::Builder::new()
        .name("rocket-sqlite-writer".into())
        .spawn(move || writer.run(rx, done_tx, group_sizes))
        .map_err(StoreError::Thread)?;
    Ok(tx)
}

/// What the writer and the checkpoint thread share.
struct Checkpoints {
    /// Commits happened since the checkpoint thread last looked.
    pending: AtomicBool,
    /// The WAL has reached [`WAL_LIMIT_FRAMES`]: the writer is to finish a
    /// checkpoint before its next transaction.
    full: AtomicBool,
    /// The writer has stopped: the checkpoint thread ends too.
    stopped: AtomicBool,
    /// The last checkpoint failed (logged once, not at every retry).
    failing: AtomicBool,
    metrics: WalMetrics,
}

impl Checkpoints {
    fn new(metrics: WalMetrics) -> Checkpoints {
        Checkpoints {
            pending: AtomicBool::new(false),
            full: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            metrics,
        }
    }

    /// Counts a checkpoint's failure, logs it once, and the recovery after.
    fn outcome<T>(&self, result: rusqlite::Result<T>) -> Option<T> {
        match result {
            Ok(v) => {
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("WAL checkpoints succeed again");
                }
                Some(v)
            }
            Err(e) => {
                self.metrics.checkpoint_failures.inc();
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retrying, and the WAL grows until one succeeds");
                }
                None
            }
        }
    }
}

/// The checkpoint thread: after commits, waits [`CHECKPOINT_EVERY`] for
/// more to gather, then copies the WAL into the database (a passive
/// checkpoint: it never blocks the writer or a reader).
fn checkpoint_loop(conn: &Connection, ckpt: &Checkpoints) {
    loop {
        while !ckpt.pending.load(Ordering::Acquire) {
            if ckpt.stopped.load(Ordering::Acquire) {
                return;
            }
            std::thread::park();
        }
        std::thread::sleep(CHECKPOINT_EVERY);
        ckpt.pending.store(false, Ordering::Release);
        if let Some(Some(frames)) = ckpt.outcome(passive_checkpoint(conn)) {
            ckpt.metrics.frames.set(frames);
            if frames >= WAL_LIMIT_FRAMES {
                ckpt.full.store(true, Ordering::Release);
            }
        }
    }
}

/// Runs a passive checkpoint; returns the frames in the WAL, or `None` if
/// another connection was checkpointing.
fn passive_checkpoint(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let busy: i64 = r.get(0)?;
        let frames: i64 = r.get(1)?;
        Ok((busy == 0).then_some(frames))
    })
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    ckpt: Arc<Checkpoints>,
    checkpointer: std::thread::Thread,
    identity: Arc<FileIdentity>,
}

impl Writer {
    fn run(
        mut self,
        mut rx: mpsc::Receiver<Job>,
        done: std_mpsc::Sender<Vec<Reply>>,
        group_sizes: prometheus::Histogram,
    ) {
        while let Some(first) = rx.blocking_recv() {
            let mut jobs = vec![first];
            drain(&mut rx, &mut jobs);
            group_sizes.observe(jobs.len() as f64);
            if self.ckpt.full.load(Ordering::Acquire) {
                self.finish_checkpoint();
            }
            // One stat per group: a file deleted or replaced under the server
            // takes no more writes (they would be lost at the next start).
            let replies = match self.identity.check() {
                Ok(()) => run_group(&mut self.conn, jobs),
                Err(_) => jobs
                    .into_iter()
                    .map(|j| {
                        let path = self.identity.path.display().to_string();
                        (j.reply, Err(StoreError::FileGone(path)))
                    })
                    .collect(),
            };
            if !self.ckpt.pending.swap(true, Ordering::AcqRel) {
                self.checkpointer.unpark();
            }
            if done.send(replies).is_err() {
                break;
            }
        }
        self.ckpt.stopped.store(true, Ordering::Release);
        self.checkpointer.unpark();
    }

    /// Copies what the checkpoint thread has not, so that the next
    /// transaction starts the WAL over. Busy (the checkpoint thread is
    /// copying right now): the next group tries again. Failed: the
    /// checkpoint thread asks again after its next pass.
    fn finish_checkpoint(&mut self) {
        if self.ckpt.outcome(passive_checkpoint(&self.conn)) != Some(None) {
            self.ckpt.full.store(false, Ordering::Release);
        }
    }
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // WAL is a property of the file (set when sqlx created it).
    conn.pragma_update(None, "journal_mode", "wal")?;
    // Commits do not sync; the sync thread does, before any answer. (A
    // checkpoint still syncs the WAL, then the database.)
    conn.pragma_update(None, "synchronous", "normal")?;
    // No checkpoint inside a commit: the checkpoint thread copies the WAL.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // As on the pool (see `connect_sqlite`): the writer inserts each award
    // with its event, and an insert then needs no lookup of the parent.
    conn.pragma_update(None, "foreign_keys", "off")?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    // Statement journals (rare without triggers) stay in memory.
    conn.pragma_update(None, "temp_store", "memory")?;
    // The writer keeps the summary tables itself, once per transaction
    // (see `writer_sums`); its statements fire no trigger.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_os_string();
    name.push("-wal");
    PathBuf::from(name)
}

fn drain(rx: &mut mpsc::Receiver<Job>, jobs: &mut Vec<Job>) {
    while jobs.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(j) => jobs.push(j),
            Err(_) => break,
        }
    }
}

/// Makes every batch committed so far durable (one `fdatasync` of the WAL
/// for all of them), then answers their requests.
///
/// A failed sync is final: the kernel may have dropped the pages it could
/// not write and report the next sync as a success, while SQLite's recovery
/// stops at the first missing frame, taking later commits with it. So after
/// one failure nothing is acknowledged again (every write answers 500, and
/// readiness turns 503) until the server restarts and SQLite recovers the
/// WAL from what is really on disk.
fn sync_loop(wal: &Path, done: std_mpsc::Receiver<Vec<Reply>>, failed: &AtomicBool) {
    while let Ok(first) = done.recv() {
        let mut batches = vec![first];
        batches.extend(done.try_iter());
        let synced = if failed.load(Ordering::Relaxed) {
            Err("an earlier WAL sync failed; restart the server".to_string())
        } else {
            sync_file(wal).map_err(|e| {
                failed.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, wal = %wal.display(), "syncing the WAL failed: nothing is acknowledged from now on; restart the server");
                e.to_string()
            })
        };
        for (reply, result) in batches.into_iter().flatten() {
            let result = match (&synced, result) {
                (Ok(()), r) => r,
                // The commit may or may not be on disk: not acknowledged, so
                // the sender retries and the dedupe key makes that safe.
                (Err(e), Ok(_)) => Err(StoreError::Sync(e.clone())),
                (Err(_), Err(e)) => Err(e),
            };
            let _ = reply.send(result);
        }
    }
}

/// `fdatasync` of the WAL. Opened each time: SQLite may delete and recreate
/// the file when the last connection closes, and an open of a cached inode
/// costs microseconds next to the sync.
fn sync_file(wal: &Path) -> std::io::Result<()> {
    match std::fs::File::open(wal) {
        Ok(f) => f.sync_data(),
        // No WAL file: nothing was written since the last checkpoint reset.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes a group in one transaction; if that fails, each request alone, so
/// one bad request never fails its neighbours. Returns the answers, to be
/// sent once the commit is on disk.
fn run_group(conn: &mut Connection, jobs: Vec<Job>) -> Vec<Reply> {
    if jobs.len() > 1 {
        match write_jobs(conn, &jobs) {
            Ok(results) => {
                return jobs
                    .into_iter()
                    .zip(results)
                    .map(|(job, res)| (job.reply, Ok(res)))
                    .collect();
            }
            Err(e) => tracing::warn!(
                error = %e,
                jobs = jobs.len(),
                "group commit failed; retrying each request alone"
            ),
        }
    }
    let mut replies = Vec::with_capacity(jobs.len());
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
        replies.push((job.reply, res));
    }
    replies
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Executes the jobs' plan in one transaction; answers in job order.
/// Redeliveries (rows the insert skipped) are resolved one by one: they are
/// rare, and a failed event among them is re-scored. The stats counters
/// and leaderboard sums are added once for the group ([`Sums`]).
fn write_jobs(conn: &mut Connection, jobs: &[Job]) -> rusqlite::Result<Vec<Vec<Persisted>>> {
    let now = chrono::Utc::now().timestamp_millis();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let answers = {
        let mut insert = tx.prepare_cached(INSERT_EVENT)?;
        let mut once_held = tx.prepare_cached(ONCE_HELD)?;
        let mut claimed = std::collections::HashSet::new();
        let mut fates = Vec::new();
        let mut sums = Sums::default();
        for job in jobs {
            let ns = job.namespace.as_str();
            for it in &job.items {
                let settled = it.settle(ns, &mut claimed, |(ns, user, rule, key)| {
                    once_held.exists(params![ns, user, rule.as_ref(), key])
                })?;
                let fate = if insert_event(&mut insert, ns, it, settled.points, now)? {
                    let ev = &it.prepared.event;
                    sums.event(&ev.source, ev.event_type.as_deref(), it.status);
                    Fate::Written(it.id.clone())
                } else {
                    let fate = redelivered(&tx, it, &settled, now)?;
                    if let Fate::Written(id) = &fate {
                        sums.rescored(id, it.status);
                    }
                    fate
                };
                fates.push((settled, fate));
            }
        }
        let plan = Plan::new(jobs, fates, now);
        insert_ledger(&tx, &plan.ledger, now, &mut sums)?;
        upsert_totals(&tx, plan.totals, now)?;
        sums.write(&tx, now)?;
        plan.answers
    };
    tx.commit()?;
    Ok(answers)
}

/// Inserts the awards; each row inserted is added to `sums` (a once-key
/// already held skips its row).
fn insert_ledger<'a>(
    tx: &rusqlite::Transaction<'_>,
    rows: &[LedgerRow<'a>],
    now: i64,
    sums: &mut Sums<'a>,
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(INSERT_LEDGER)?;
    for r in rows {
        let inserted = insert.execute(params![
            r.event_id,
            r.namespace,
            r.user,
            r.course,
            r.award.rule.as_ref(),
            r.award.points,
            r.award.reason,
            r.occurred_at,
            now,
            r.award.once,
        ])?;
        if inserted == 1 {
            sums.ledger_row(r);
        }
    }
    Ok(())
}

fn upsert_totals(
    tx: &rusqlite::Transaction<'_>,
    totals: Totals<'_>,
    now: i64,
) -> rusqlite::Result<()> {
    let mut upsert = tx.prepare_cached(UPSERT_TOTAL)?;
    for ((ns, user), (points, events)) in totals {
        upsert.execute(params![ns, user, points, events, now])?;
    }
    Ok(())
}

/// Inserts an event's row; false when its `(source, dedupe_key)` is stored
/// already (a redelivery).
fn insert_event(
    insert: &mut rusqlite::CachedStatement<'_>,
    ns: &str,
    it: &Item,
    points: i64,
    now: i64,
) -> rusqlite::Result<bool> {
    let ev = &it.prepared.event;
    Ok(insert.execute(params![
        it.id,
        ev.source,
        ev.dedupe_key,
        ns,
        ev.event_type,
        ev.vendor_event_type,
        ev.user_id,
        ev.course_id,
        ev.object_id,
        ev.occurred_at.timestamp_millis(),
        it.received_at,
        (it.status != EventStatus::Queued).then_some(now),
        it.status.as_str(),
        points,
        it.error,
        it.canonical,
        it.prepared.raw.as_ref(),
        it.prepared.headers.as_deref(),
    ])? == 1)
}

/// An event already stored under the same `(source, dedupe_key)`: a failed
/// one is re-scored (written now, under its stored id); anything else is a
/// duplicate.
fn redelivered(
    tx: &rusqlite::Transaction<'_>,
    it: &Item,
    settled: &Settled<'_>,
    now: i64,
) -> rusqlite::Result<Fate> {
    let ev = &it.prepared.event;
    let read = |tx: &rusqlite::Transaction<'_>| {
        tx.prepare_cached(EXISTING)?
            .query_row(params![ev.source, ev.dedupe_key], |r| {
                Ok(Persisted {
                    event_id: r.get(0)?,
                    status: EventStatus::from_stored(&r.get::<_, String>(1)?).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            1,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?,
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
            settled.points,
            it.error,
            now,
            it.canonical,
            stored.event_id,
        ])? == 1;
        if rescored {
            return Ok(Fate::Written(stored.event_id));
        }
        return Ok(Fate::Duplicate(read(tx)?.unwrap_or(stored)));
    }
    Ok(Fate::Duplicate(stored))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a failed sync nothing is acknowledged again, not even batches
    /// whose own sync might now appear to succeed.
    #[test]
    fn a_failed_sync_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        // Opening "<file>/db-wal" fails with ENOTDIR: a sync error.
        let wal = file.join("db-wal");
        let failed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std_mpsc::channel::<Vec<Reply>>();
        let flag = failed.clone();
        let syncer = std::thread::spawn(move || sync_loop(&wal, rx, &flag));
        let send = |tx: &std_mpsc::Sender<Vec<Reply>>| {
            let (reply, answer) = oneshot::channel();
            tx.send(vec![(reply, Ok(Vec::new()))]).unwrap();
            answer.blocking_recv().unwrap()
        };
        assert!(matches!(send(&tx), Err(StoreError::Sync(_))));
        assert!(failed.load(Ordering::Relaxed));
        assert!(matches!(send(&tx), Err(StoreError::Sync(_))));
        drop(tx);
        syncer.join().unwrap();
    }
}
