//! Leaderboards read from summary tables instead of aggregating the ledger
//! (on both stores: see `migrations/sqlite/0009_leaderboards.sql` and
//! `migrations/postgres/0008_leaderboards.sql`, whose triggers keep them
//! exact, and `writer_sums`, where SQLite's hook writer, which runs without
//! triggers, does the same):
//!
//! - a course's leaderboard (no time bounds) is the top of `course_points`;
//! - a leaderboard `since` a time at or shortly after the trailing window's
//!   start (the "last seven days" a dashboard asks for) is the top of
//!   `recent_points`, less what the ledger holds between the window's start
//!   and `since` (a minute or two of rows, summed per learner).
//!
//! Any other query returns `None` and the caller aggregates the ledger.
//! The window is moved forward by [`Store::move_recent_window`], which the
//! server calls about once a minute.

use std::collections::HashSet;

use sqlx::Row;

use super::{with_pool, LeaderRow, LeaderboardQuery, Pool, Store, StoreError};

/// How far the trailing window reaches back.
pub const RECENT_WINDOW_MS: i64 = 7 * 86_400_000;
/// The most of the ledger a `since` query sums to correct the window:
/// further from the window's start (a window the server has not moved for
/// an hour, or a shorter period), the ledger is aggregated instead.
const MAX_SLICE_MS: i64 = 3_600_000;

pub(super) const COURSE_TOP: &str = "SELECT namespace, user_id, points FROM course_points \
    WHERE course_id = $1 ORDER BY points DESC, namespace, user_id LIMIT $2";
pub(super) const COURSE_TOP_NS: &str = "SELECT namespace, user_id, points FROM course_points \
    WHERE course_id = $1 AND namespace = $2 ORDER BY points DESC, namespace, user_id LIMIT $3";
pub(super) const WINDOW_START: &str = "SELECT start_ms FROM recent_window WHERE id = 1";
/// The namespaces with recent points: a loose scan of
/// `recent_points_ns_rank`, one probe per namespace. (The unfiltered top is
/// each namespace's top, merged: one rank index to move per write, not two.)
pub(super) const RECENT_NAMESPACES: &str = "WITH RECURSIVE ns(name) AS ( \
    SELECT MIN(namespace) FROM recent_points \
    UNION ALL SELECT (SELECT MIN(namespace) FROM recent_points WHERE namespace > ns.name) FROM ns \
    WHERE ns.name IS NOT NULL) \
    SELECT name FROM ns WHERE name IS NOT NULL";
pub(super) const RECENT_TOP_NS: &str = "SELECT namespace, user_id, points FROM recent_points \
    WHERE namespace = $1 ORDER BY points DESC, user_id LIMIT $2";
/// The learners with ledger rows in `[$1, $2)` (through `ledger_time`),
/// with their window points and rows less those. (PostgreSQL's `SUM` of a
/// `BIGINT` is a `NUMERIC`: cast back.)
pub(super) const CORRECTED: &str = "SELECT r.namespace, r.user_id, \
    r.points - s.points AS points, r.entries - s.entries AS entries \
    FROM (SELECT namespace, user_id, CAST(SUM(points) AS BIGINT) AS points, COUNT(*) AS entries \
    FROM ledger WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY namespace, user_id) AS s \
    JOIN recent_points r ON r.namespace = s.namespace AND r.user_id = s.user_id";

// Moving the window. The first statement writes, so SQLite takes the write
// lock at once (waiting its busy timeout) rather than failing to upgrade.
// On PostgreSQL the move first takes the advisory lock that ledger writers
// hold shared while they read the window's start (its migration 0008).
const EXCLUDE_WRITERS_PG: &str = "SELECT pg_advisory_xact_lock(hashtext('recent_window'))";
const LOCK_WINDOW: &str =
    "UPDATE recent_window SET start_ms = start_ms WHERE id = 1 RETURNING start_ms";
// The `occurred_at` that many rows from either end of a stretch of the
// ledger (through `ledger_time`).
const STEP_BACK: &str =
    "SELECT occurred_at FROM ledger WHERE occurred_at >= $1 AND occurred_at < $2 \
    ORDER BY occurred_at DESC LIMIT 1 OFFSET $3";
const STEP_FORWARD: &str =
    "SELECT occurred_at FROM ledger WHERE occurred_at >= $1 AND occurred_at < $2 \
    ORDER BY occurred_at LIMIT 1 OFFSET $3";
const SET_WINDOW: &str = "UPDATE recent_window SET start_ms = $1 WHERE id = 1";
const ADD_SLICE: &str = "INSERT INTO recent_points (namespace, user_id, points, entries) \
    SELECT namespace, user_id, SUM(points), COUNT(*) FROM ledger \
    WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY namespace, user_id \
    ON CONFLICT (namespace, user_id) DO UPDATE SET \
    points = recent_points.points + excluded.points, \
    entries = recent_points.entries + excluded.entries";
// A sum left with no rows is deleted: by the `recent_points_empty` trigger
// on SQLite, by [`DELETE_EMPTIED_PG`] on PostgreSQL.
const SUBTRACT_SLICE: &str = "UPDATE recent_points SET points = recent_points.points - s.points, \
    entries = recent_points.entries - s.entries \
    FROM (SELECT namespace, user_id, SUM(points) AS points, COUNT(*) AS entries FROM ledger \
    WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY namespace, user_id) AS s \
    WHERE recent_points.namespace = s.namespace AND recent_points.user_id = s.user_id";
const DELETE_EMPTIED_PG: &str = "DELETE FROM recent_points WHERE entries = 0 \
    AND (namespace, user_id) IN (SELECT namespace, user_id FROM ledger \
    WHERE occurred_at >= $1 AND occurred_at < $2)";

fn leader_row<R: Row>(r: &R) -> Result<LeaderRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(LeaderRow {
        namespace: r.try_get("namespace")?,
        user_id: r.try_get("user_id")?,
        points: r.try_get("points")?,
    })
}

/// The leaderboard from a summary table, or `None` when `q` is not one
/// they answer.
pub(super) async fn from_summaries(
    pool: &Pool,
    q: &LeaderboardQuery,
) -> Result<Option<Vec<LeaderRow>>, StoreError> {
    match (&q.course_id, q.since_ms, q.until_ms) {
        (Some(course), None, None) => with_pool!(pool, p => {
            let rows = match &q.namespace {
                Some(ns) => {
                    sqlx::query(COURSE_TOP_NS)
                        .bind(course)
                        .bind(ns)
                        .bind(q.limit)
                        .fetch_all(p)
                        .await?
                }
                None => {
                    sqlx::query(COURSE_TOP)
                        .bind(course)
                        .bind(q.limit)
                        .fetch_all(p)
                        .await?
                }
            };
            let rows = rows.iter().map(leader_row).collect::<Result<_, _>>()?;
            Ok(Some(rows))
        }),
        (None, Some(since), None) => recent(pool, q, since).await,
        _ => Ok(None),
    }
}

/// The leaderboard since `since`, from the window when `since` falls in its
/// first [`MAX_SLICE_MS`]. Learners outside the slice have their window
/// points; those in it are corrected (in one query). Reading `limit` plus the
/// slice's learners from the top of each namespace is enough: any other
/// learner has at least `limit` uncorrected learners above them.
async fn recent(
    pool: &Pool,
    q: &LeaderboardQuery,
    since: i64,
) -> Result<Option<Vec<LeaderRow>>, StoreError> {
    let postgres = matches!(pool, Pool::Postgres(_));
    let mut rows = Vec::new();
    with_pool!(pool, p => {
        // One snapshot: the window, its top and the slice agree. (SQLite's
        // read transaction holds one; PostgreSQL's needs REPEATABLE READ.)
        let mut tx = p.begin().await?;
        if postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let start: i64 = sqlx::query_scalar(WINDOW_START).fetch_one(&mut *tx).await?;
        if since < start || since - start > MAX_SLICE_MS {
            return Ok(None);
        }
        // The slice's learners (every one has window rows: the window holds
        // the slice), corrected; the rest are read from the tops below.
        let mut slice: HashSet<(String, String)> = HashSet::new();
        for r in sqlx::query(CORRECTED)
            .bind(start)
            .bind(since)
            .fetch_all(&mut *tx)
            .await?
        {
            let row = leader_row(&r)?;
            if q.namespace
                .as_ref()
                .is_some_and(|want| *want != row.namespace)
            {
                continue;
            }
            slice.insert((row.namespace.clone(), row.user_id.clone()));
            // A learner all of whose window rows are in the slice has none since.
            if r.try_get::<i64, _>("entries")? > 0 {
                rows.push(row);
            }
        }
        let wanted = q.limit + slice.len() as i64;
        let namespaces: Vec<String> = match &q.namespace {
            Some(ns) => vec![ns.clone()],
            None => {
                sqlx::query_scalar(RECENT_NAMESPACES)
                    .fetch_all(&mut *tx)
                    .await?
            }
        };
        for ns in &namespaces {
            for r in sqlx::query(RECENT_TOP_NS)
                .bind(ns)
                .bind(wanted)
                .fetch_all(&mut *tx)
                .await?
            {
                let row = leader_row(&r)?;
                if !slice.contains(&(row.namespace.clone(), row.user_id.clone())) {
                    rows.push(row);
                }
            }
        }
    });
    rows.sort_by(|a, b| {
        b.points
            .cmp(&a.points)
            .then_with(|| a.namespace.cmp(&b.namespace))
            .then_with(|| a.user_id.cmp(&b.user_id))
    });
    rows.truncate(q.limit.max(0) as usize);
    Ok(Some(rows))
}

impl Store {
    /// Where the trailing window starts (`None` where the store keeps no
    /// window: both stores keep one once migrated).
    pub async fn recent_window_start(&self) -> Result<Option<i64>, StoreError> {
        with_pool!(&self.pool, p => {
            Ok(sqlx::query_scalar(WINDOW_START).fetch_optional(p).await?)
        })
    }

    /// Where a move of the window from `start` towards `to_ms` should stop
    /// so that it adds or subtracts at most about `rows` ledger rows (all
    /// rows of one `occurred_at` go together): `to_ms` when fewer lie
    /// between.
    pub async fn recent_window_step(
        &self,
        start: i64,
        to_ms: i64,
        rows: i64,
    ) -> Result<i64, StoreError> {
        let (sql, lo, hi) = if to_ms < start {
            (STEP_BACK, to_ms, start)
        } else {
            (STEP_FORWARD, start, to_ms)
        };
        let at: Option<i64> = with_pool!(&self.pool, p => {
            sqlx::query_scalar(sql)
                .bind(lo)
                .bind(hi)
                .bind(rows)
                .fetch_optional(p)
                .await?
        });
        Ok(match at {
            None => to_ms,
            // Forward, rows before `at` go: past `start` at least.
            Some(at) if to_ms > start => at.max(start + 1),
            Some(at) => at,
        })
    }

    /// Moves the trailing window's start to `to_ms`, adding or subtracting
    /// the ledger's rows between the old start and the new, in one
    /// transaction that no ledger write overlaps.
    pub async fn move_recent_window(&self, to_ms: i64) -> Result<(), StoreError> {
        let postgres = matches!(self.pool, Pool::Postgres(_));
        with_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            if postgres {
                sqlx::query(EXCLUDE_WRITERS_PG).execute(&mut *tx).await?;
            }
            let from: i64 = sqlx::query_scalar(LOCK_WINDOW).fetch_one(&mut *tx).await?;
            if from == to_ms {
                return Ok(());
            }
            let (sql, lo, hi) = if to_ms < from {
                (ADD_SLICE, to_ms, from)
            } else {
                (SUBTRACT_SLICE, from, to_ms)
            };
            sqlx::query(sql).bind(lo).bind(hi).execute(&mut *tx).await?;
            if postgres && to_ms > from {
                sqlx::query(DELETE_EMPTIED_PG)
                    .bind(lo)
                    .bind(hi)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(SET_WINDOW)
                .bind(to_ms)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
