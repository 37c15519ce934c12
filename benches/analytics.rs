//! Analytics reads on a large ledger, on SQLite and (with
//! ROCKET_BENCH_POSTGRES_URL) PostgreSQL.
//!
//! `cargo bench --bench analytics -- [ROWS]` (default 1,000,000 ledger rows
//! over 50,000 users and 50 courses) fills a fresh store with SQL, then
//! times each read the API makes: a user's standing, leaderboards (overall,
//! per namespace, per course, per time window), stats, and a rule's history.

use std::time::{Duration, Instant};

use rocket_rewards::pipeline::mapping::CanonicalEvent;
use rocket_rewards::store::{LeaderboardQuery, Store};

const USERS: i64 = 50_000;
const COURSES: i64 = 50;
const DAY_MS: i64 = 86_400_000;

fn fill_sql(postgres: bool, rows: i64, now: i64) -> Vec<String> {
    // Events and their ledger entries spread over 365 days; totals derived.
    let series = if postgres {
        format!("SELECT n FROM generate_series(1::bigint, {rows}::bigint) AS n")
    } else {
        format!("WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < {rows}) SELECT n FROM seq")
    };
    let text = |e: &str| {
        if postgres {
            format!("({e})::text")
        } else {
            format!("CAST({e} AS TEXT)")
        }
    };
    let blob = if postgres {
        "'\\x7b7d'::bytea"
    } else {
        "X'7B7D'"
    };
    let uid = text(&format!("n % {USERS}"));
    let cid = text(&format!("n % {COURSES}"));
    let at = format!("({now} - (n % 365) * {DAY_MS} - n)");
    let ns = "CASE WHEN n % 2 = 0 THEN 'moodle' ELSE 'custom' END";
    let kind = "CASE WHEN n % 5 = 0 THEN 'course.completed' ELSE 'lesson.completed' END";
    let pts = "CASE WHEN n % 5 = 0 THEN 50 ELSE 10 END";
    vec![
        format!(
            "INSERT INTO events (id, source, dedupe_key, namespace, event_type, vendor_event_type, user_id, course_id, \
             object_id, occurred_at, received_at, processed_at, status, points, error, canonical, raw) \
             SELECT 'evt_' || {n}, {ns}, {n}, {ns}, {kind}, {kind}, {uid}, {cid}, NULL, {at}, {at}, {at}, 'processed', {pts}, NULL, '{{}}', {blob} \
             FROM ({series}) AS s",
            n = text("n"),
        ),
        format!(
            "INSERT INTO ledger (event_id, namespace, user_id, course_id, rule, points, reason, occurred_at, created_at) \
             SELECT 'evt_' || {n}, {ns}, {uid}, {cid}, CASE WHEN n % 5 = 0 THEN 'course_completed' ELSE 'lesson_completed' END, \
             {pts}, NULL, {at}, {at} FROM ({series}) AS s",
            n = text("n"),
        ),
        "INSERT INTO totals (namespace, user_id, points, events, updated_at) \
         SELECT namespace, user_id, SUM(points), COUNT(*), MAX(created_at) FROM ledger GROUP BY namespace, user_id"
            .to_string(),
    ]
}

async fn fill(url: &str, rows: i64, now: i64) -> Duration {
    let started = Instant::now();
    let postgres = url.starts_with("postgres");
    if postgres {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect(url)
            .await
            .expect("connect");
        for sql in fill_sql(true, rows, now) {
            sqlx::query(&sql).execute(&pool).await.expect("fill");
        }
        sqlx::query("ANALYZE")
            .execute(&pool)
            .await
            .expect("analyze");
    } else {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .expect("connect");
        for sql in fill_sql(false, rows, now) {
            sqlx::query(&sql).execute(&pool).await.expect("fill");
        }
        sqlx::query("ANALYZE")
            .execute(&pool)
            .await
            .expect("analyze");
    }
    started.elapsed()
}

async fn time<F, Fut, T>(name: &str, runs: usize, mut f: F)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        let t = Instant::now();
        std::hint::black_box(f(i).await);
        samples.push(t.elapsed());
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "  {name:<34} median {:>8.3} ms   p95 {:>8.3} ms",
        ms(samples[runs / 2]),
        ms(samples[(runs * 95 / 100).min(runs - 1)])
    );
}

async fn bench(label: &str, url: &str, rows: i64) {
    let store = Store::connect(url).await.expect("store");
    let now = chrono::Utc::now().timestamp_millis();
    let took = fill(url, rows, now).await;
    println!(
        "{label}: {rows} ledger rows, {USERS} users, filled in {:.1} s",
        took.as_secs_f64()
    );
    let q = |ns: Option<&str>, course: Option<&str>, since: Option<i64>| LeaderboardQuery {
        namespace: ns.map(String::from),
        course_id: course.map(String::from),
        since_ms: since,
        until_ms: None,
        limit: 10,
    };
    time("user standing (total + 20 recent)", 200, |i| {
        let s = store.clone();
        async move {
            s.user(
                "moodle",
                &((i as i64 * 7919) % USERS / 2 * 2).to_string(),
                20,
            )
            .await
            .unwrap()
        }
    })
    .await;
    time("leaderboard overall (top 10)", 50, |_| {
        let (s, q) = (store.clone(), q(None, None, None));
        async move { s.leaderboard(&q).await.unwrap() }
    })
    .await;
    time("leaderboard per namespace", 50, |_| {
        let (s, q) = (store.clone(), q(Some("moodle"), None, None));
        async move { s.leaderboard(&q).await.unwrap() }
    })
    .await;
    time("leaderboard per course", 20, |i| {
        let (s, q) = (
            store.clone(),
            q(None, Some(&(i as i64 % COURSES).to_string()), None),
        );
        async move { s.leaderboard(&q).await.unwrap() }
    })
    .await;
    time("leaderboard last 7 days", 20, |_| {
        let (s, q) = (store.clone(), q(None, None, Some(now - 7 * DAY_MS)));
        async move { s.leaderboard(&q).await.unwrap() }
    })
    .await;
    time("stats (30 days)", 10, |_| {
        let s = store.clone();
        async move { s.stats(now - 30 * DAY_MS).await.unwrap() }
    })
    .await;
    time("rule history of one user", 200, |i| {
        let s = store.clone();
        let ev = CanonicalEvent {
            source: "moodle".into(),
            dedupe_key: "x".into(),
            event_type: Some("lesson.completed".into()),
            vendor_event_type: None,
            user_id: Some(((i as i64 * 7919) % USERS / 2 * 2).to_string()),
            course_id: Some("3".into()),
            object_id: None,
            occurred_at: chrono::Utc::now(),
            attributes: Default::default(),
        };
        async move { s.history("moodle", &ev, None).await.unwrap() }
    })
    .await;
    store.close().await;
}

#[tokio::main]
async fn main() {
    let rows: i64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/analytics.db", dir.path().display());
    // ROCKET_BENCH_ONLY=postgres skips SQLite.
    if std::env::var("ROCKET_BENCH_ONLY").as_deref() != Ok("postgres") {
        bench("SQLite", &url, rows).await;
    }
    if let Ok(base) = std::env::var("ROCKET_BENCH_POSTGRES_URL") {
        use sqlx::Connection;
        let name = format!("rr_bench_{}", std::process::id());
        let mut admin = sqlx::PgConnection::connect(&base).await.expect("connect");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create");
        let (prefix, _) = base.rsplit_once('/').expect("a database URL");
        bench("PostgreSQL", &format!("{prefix}/{name}"), rows).await;
        let _ = sqlx::query(&format!("DROP DATABASE {name}"))
            .execute(&mut admin)
            .await;
    }
}
