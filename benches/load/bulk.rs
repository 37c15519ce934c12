//! A large ledger without the HTTP route: `--bulk N` fills the database
//! with SQL before the server starts (the server's own migrations first,
//! then INSERT … SELECT in transactions of [`CHUNK`] events, the summary
//! tables kept by their triggers and the totals recounted at the end), and
//! the analytics reads are then timed over HTTP.
//!
//! The events are lesson completions (10 points each, once per lesson) by
//! [`USERS`] learners over a year: learner `U-u` takes 20 of the 500
//! courses, ten lessons each, so a course has about 2,000 learners and
//! 20,000 ledger rows per million events, and the last seven days hold
//! about 2% of them. The hook's own events (learners `U-0` … `U-9999`)
//! land among them.

use std::path::Path;
use std::time::{Duration, Instant};

use super::Conn;

const USERS: u64 = 50_000;
const CHUNK: u64 = 500_000;
const YEAR_MS: i64 = 365 * 86_400_000;
pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef0123";

/// The bulk events the database holds (0 for a new one; the hook's own
/// events, added by runs with `--db`, are not counted).
fn bulk_events(conn: &rusqlite::Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COUNT(*) FROM events WHERE id >= '00BULK' AND id < '00BULL'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// Reads the database file once so that the SQLite server meets it in the
/// page cache, as a server that has run for a while does: a PostgreSQL
/// fill (an earlier run's, or this run's before SQLite's reads are timed),
/// or any other large file, may have pushed it out.
pub fn read_into_page_cache(db: &Path) -> Result<(), String> {
    let started = Instant::now();
    let mut file = std::fs::File::open(db).map_err(|e| format!("{}: {e}", db.display()))?;
    let bytes = std::io::copy(&mut file, &mut std::io::sink())
        .map_err(|e| format!("reading {}: {e}", db.display()))?;
    println!(
        "bulk: read the {:.1} GiB database into the page cache in {:.1} s",
        bytes as f64 / (1u64 << 30) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Brings the ledger at `db` up to `events` rows (a database kept from an
/// earlier run with `--db` is only topped up).
pub fn fill(db: &Path, events: u64, rt: &tokio::runtime::Runtime) -> Result<(), String> {
    let url = format!("sqlite://{}", db.display());
    rt.block_on(async {
        let store = rocket_rewards::store::Store::connect(&url)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        store.close().await;
        Ok::<_, String>(())
    })?;
    let mut conn = rusqlite::Connection::open(db).map_err(|e| e.to_string())?;
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")
        .map_err(|e| e.to_string())?;
    let have = bulk_events(&conn).map_err(|e| e.to_string())?;
    if have >= events {
        println!("bulk: the database already holds {have} bulk events");
        return Ok(());
    }
    let now = chrono::Utc::now().timestamp_millis();
    let started = Instant::now();
    let mut next = have + 1;
    while next <= events {
        let last = (next + CHUNK - 1).min(events);
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        insert_chunk(&tx, next, last, now).map_err(|e| format!("bulk insert: {e}"))?;
        tx.commit().map_err(|e| e.to_string())?;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "bulk: {last} events ({:.0} a second)",
            (last - have) as f64 / secs
        );
        next = last + 1;
    }
    conn.execute_batch(
        "DELETE FROM totals; \
         INSERT INTO totals (namespace, user_id, points, events, updated_at) \
         SELECT namespace, user_id, SUM(points), COUNT(*), MAX(created_at) FROM ledger \
         GROUP BY namespace, user_id; \
         PRAGMA wal_checkpoint(TRUNCATE);",
    )
    .map_err(|e| format!("bulk totals: {e}"))?;
    let size = std::fs::metadata(db).map(|m| m.len()).unwrap_or(0);
    println!(
        "bulk: {} events in {:.0} s; database {:.1} GiB",
        events - have,
        started.elapsed().as_secs_f64(),
        size as f64 / (1u64 << 30) as f64
    );
    Ok(())
}

/// Events `first..=last` and their ledger rows. Ids sort before the
/// server's own (ULIDs of today), in insertion order.
fn insert_chunk(
    tx: &rusqlite::Transaction,
    first: u64,
    last: u64,
    now: i64,
) -> rusqlite::Result<()> {
    let seq = "WITH RECURSIVE seq(n) AS (SELECT ?1 UNION ALL SELECT n + 1 FROM seq WHERE n < ?2)";
    // Learner, course and time of event n.
    let user = format!("'U-' || (n % {USERS})");
    let course = format!("'C-' || ((n % {USERS} + (n / {USERS}) / 10 * 97) % 500)");
    let at = format!("(?3 - (n * 7919) % {YEAR_MS})");
    tx.execute(
        &format!(
            "{seq} INSERT INTO events (id, source, dedupe_key, namespace, event_type, vendor_event_type, \
             user_id, course_id, object_id, occurred_at, received_at, processed_at, status, points, \
             canonical, raw, request_headers) \
             SELECT printf('00BULK%020d', n), 'learnworlds', 'bulk-' || n, 'learnworlds', \
             'lesson.completed', 'lesson.completed', {user}, {course}, 'L-' || n, {at}, {at} + 40, {at} + 40, \
             'processed', 10, \
             json_object('source', 'learnworlds', 'event_id', 'bulk-' || n, 'event_type', 'lesson.completed', \
               'vendor_event_type', 'lesson.completed', 'user_id', {user}, 'course_id', {course}, \
               'object_id', 'L-' || n, 'occurred_at', {at}, 'attributes', json_object('progress', 100)), \
             CAST(json_object('id', 'bulk-' || n, 'topic', 'lesson.completed', 'data', \
               json_object('user_id', {user}, 'course_id', {course}, 'lesson_id', 'L-' || n)) AS BLOB), \
             '{{\"content-type\":\"application/json\",\"user-agent\":\"LearnWorlds-Webhooks\"}}' \
             FROM seq"
        ),
        rusqlite::params![first as i64, last as i64, now],
    )?;
    tx.execute(
        "INSERT INTO ledger (event_id, namespace, user_id, course_id, rule, points, reason, \
         occurred_at, created_at, once_key) \
         SELECT id, namespace, user_id, course_id, 'lesson_completed', 10, 'lesson completed', \
         occurred_at, received_at, object_id FROM events \
         WHERE id BETWEEN printf('00BULK%020d', ?1) AND printf('00BULK%020d', ?2)",
        rusqlite::params![first as i64, last as i64],
    )?;
    Ok(())
}

/// Waits until the server at `addr` has built its seven-day window (a
/// lag of two minutes at most in `/metrics`), printing how long that took:
/// the first build after a fill adds a week of the ledger in steps that
/// each hold the hook's writers off briefly, so the hook is measured on
/// steady traffic only after it. False after an hour without it.
pub async fn wait_for_window(addr: &str) -> bool {
    let started = Instant::now();
    let mut unreachable = 0;
    loop {
        let Some(text) = super::metrics_text(addr).await else {
            unreachable += 1;
            if unreachable == 20 {
                println!("the server stopped answering /metrics while its window was built");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        unreachable = 0;
        let lag = super::metric_value(&text, "rocket_leaderboard_window_lag_seconds");
        match lag {
            Some(lag) if lag <= 120.0 => {
                println!(
                    "seven-day window built: waited {:.1} s for it",
                    started.elapsed().as_secs_f64()
                );
                return true;
            }
            _ if started.elapsed() > Duration::from_secs(3600) => {
                println!("the seven-day window was not built in an hour (lag {lag:?} s)");
                return false;
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// One analytics read, timed `runs` times over HTTP: (median, max) in ms.
async fn time_get(addr: &str, path: &str, runs: usize) -> Result<(f64, f64), String> {
    let mut conn = Conn::open(addr).await.map_err(|e| e.to_string())?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    );
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 2 {
        let t = Instant::now();
        let r = conn
            .roundtrip(req.as_bytes())
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        if r.status != 200 {
            return Err(format!("{path}: status {}", r.status));
        }
        // The first two warm the caches.
        if i >= 2 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((ms(times[times.len() / 2]), ms(times[times.len() - 1])))
}

/// Times the reads the issue names (and the overall leaderboard, and the
/// two summary-table reads as the ledger's aggregate), printing one line
/// each. False if a read failed.
pub async fn time_reads(addr: &str) -> bool {
    let week_ago = chrono::Utc::now().timestamp() - 7 * 86_400;
    let reads = [
        (
            "per-course leaderboard",
            "/api/v1/leaderboard?course_id=C-7".to_string(),
        ),
        (
            "last-7-days leaderboard",
            format!("/api/v1/leaderboard?since={week_ago}"),
        ),
        (
            "a learner's standing",
            "/api/v1/users/learnworlds/U-123".to_string(),
        ),
        ("overall leaderboard", "/api/v1/leaderboard".to_string()),
        // The same two leaderboards with an `until` far ahead, which the
        // summary tables do not answer: what aggregating the ledger costs.
        (
            "per-course, aggregated",
            "/api/v1/leaderboard?course_id=C-7&until=2100-01-01T00:00:00Z".to_string(),
        ),
        (
            "last-7-days, aggregated",
            format!("/api/v1/leaderboard?since={week_ago}&until=2100-01-01T00:00:00Z"),
        ),
    ];
    let mut ok = true;
    for (name, path) in reads {
        match time_get(addr, &path, 20).await {
            Ok((median, max)) => println!(
                "analytics read: {name:<24} median {median:.2} ms, max {max:.2} ms ({path})"
            ),
            Err(e) => {
                println!("analytics read: {name}: {e}");
                ok = false;
            }
        }
    }
    ok
}

/// Fills a new PostgreSQL database (`--postgres` with `--bulk`) with the
/// same events as [`fill`]: the server's migrations first, then INSERT …
/// SELECT over `generate_series` in transactions of [`CHUNK`] events (the
/// summary tables kept by their triggers), the totals recounted, the
/// tables analysed and a checkpoint taken at the end.
pub async fn fill_postgres(url: &str, events: u64) -> Result<(), String> {
    use sqlx::Connection;
    let store = rocket_rewards::store::Store::connect(url)
        .await
        .map_err(|e| format!("migrating: {e}"))?;
    store.close().await;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let now = chrono::Utc::now().timestamp_millis();
    let started = Instant::now();
    let events_sql = pg_events_sql();
    let mut next = 1;
    while next <= events {
        let last = (next + CHUNK - 1).min(events);
        let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
        let range = |sql| sqlx::query(sql).bind(next as i64).bind(last as i64);
        for q in [range(&events_sql).bind(now), range(PG_LEDGER)] {
            q.execute(&mut *tx)
                .await
                .map_err(|e| format!("bulk insert: {e}"))?;
        }
        tx.commit().await.map_err(|e| e.to_string())?;
        println!(
            "bulk (PostgreSQL): {last} events ({:.0} a second)",
            last as f64 / started.elapsed().as_secs_f64()
        );
        next = last + 1;
    }
    for sql in [
        "INSERT INTO totals (namespace, user_id, points, events, updated_at) \
         SELECT namespace, user_id, SUM(points), COUNT(*), MAX(created_at) FROM ledger \
         GROUP BY namespace, user_id",
        "ANALYZE",
        // The fill's dirty pages written out now, not during the measurement.
        "CHECKPOINT",
    ] {
        sqlx::query(sql)
            .execute(&mut conn)
            .await
            .map_err(|e| format!("bulk totals: {e}"))?;
    }
    println!(
        "bulk (PostgreSQL): {events} events in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Events `$1..=$2` (received at `$3` less their offset), as
/// [`insert_chunk`] writes them on SQLite.
const PG_EVENTS: &str = "INSERT INTO events (id, source, dedupe_key, namespace, event_type, \
    vendor_event_type, user_id, course_id, object_id, occurred_at, received_at, processed_at, \
    status, points, canonical, raw, request_headers) \
    SELECT '00BULK' || lpad(n::text, 20, '0'), 'learnworlds', 'bulk-' || n, 'learnworlds', \
    'lesson.completed', 'lesson.completed', {user}, {course}, 'L-' || n, {at}, {at} + 40, \
    {at} + 40, 'processed', 10, \
    json_build_object('source', 'learnworlds', 'event_id', 'bulk-' || n, 'event_type', \
      'lesson.completed', 'vendor_event_type', 'lesson.completed', 'user_id', {user}, \
      'course_id', {course}, 'object_id', 'L-' || n, 'occurred_at', {at}, 'attributes', \
      json_build_object('progress', 100))::text, \
    convert_to(json_build_object('id', 'bulk-' || n, 'topic', 'lesson.completed', 'data', \
      json_build_object('user_id', {user}, 'course_id', {course}, 'lesson_id', 'L-' || n))::text, \
      'UTF8'), \
    '{\"content-type\":\"application/json\",\"user-agent\":\"LearnWorlds-Webhooks\"}' \
    FROM generate_series($1::bigint, $2::bigint) AS n";
/// The ledger rows of events `$1..=$2`.
const PG_LEDGER: &str = "INSERT INTO ledger (event_id, namespace, user_id, course_id, rule, \
    points, reason, occurred_at, created_at, once_key) \
    SELECT id, namespace, user_id, course_id, 'lesson_completed', 10, 'lesson completed', \
    occurred_at, received_at, object_id FROM events \
    WHERE id BETWEEN '00BULK' || lpad($1::text, 20, '0') AND '00BULK' || lpad($2::text, 20, '0') \
    ORDER BY id";

/// [`PG_EVENTS`] with the learner, course and time of event `n` filled in
/// (the same as on SQLite).
fn pg_events_sql() -> String {
    PG_EVENTS
        .replace("{user}", &format!("('U-' || (n % {USERS}))"))
        .replace(
            "{course}",
            &format!("('C-' || ((n % {USERS} + (n / {USERS}) / 10 * 97) % 500))"),
        )
        .replace("{at}", &format!("($3 - (n * 7919) % {YEAR_MS})"))
}
