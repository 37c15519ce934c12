//! A store that already holds awards is upgraded: the once-award migration
//! gives the shipped rules' earlier awards their keys (the first of each
//! key only), on SQLite and on PostgreSQL alike, so an upgraded server does
//! not award them again.

use std::str::FromStr;

use sqlx::Connection;

use crate::helpers::*;

/// A connection to the test's store, SQLite or PostgreSQL.
enum Db {
    Sqlite(sqlx::SqliteConnection),
    Pg(sqlx::PgConnection),
}

impl Db {
    async fn open(url: &str) -> Db {
        if url.starts_with("postgres") {
            return Db::Pg(sqlx::PgConnection::connect(url).await.unwrap());
        }
        let path = url.strip_prefix("sqlite://").unwrap();
        std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .unwrap()
            .create_if_missing(true);
        Db::Sqlite(
            sqlx::SqliteConnection::connect_with(&options)
                .await
                .unwrap(),
        )
    }

    /// Runs a script of statements.
    async fn run(&mut self, sql: &str) {
        match self {
            Db::Sqlite(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            Db::Pg(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{e}: {sql}"));
    }

    /// The migrations before the once-award one, and that one.
    fn migrations(&self) -> (Vec<&'static str>, &'static str) {
        match self {
            Db::Sqlite(_) => (
                vec![
                    include_str!("../../migrations/sqlite/0001_init.sql"),
                    include_str!("../../migrations/sqlite/0002_queue.sql"),
                    include_str!("../../migrations/sqlite/0003_leaner_indexes.sql"),
                    include_str!("../../migrations/sqlite/0004_write_path_indexes.sql"),
                    include_str!("../../migrations/sqlite/0005_stats_counters.sql"),
                ],
                include_str!("../../migrations/sqlite/0006_once_awards.sql"),
            ),
            Db::Pg(_) => (
                vec![
                    include_str!("../../migrations/postgres/0001_init.sql"),
                    include_str!("../../migrations/postgres/0002_queue.sql"),
                    include_str!("../../migrations/postgres/0003_leaner_indexes.sql"),
                ],
                include_str!("../../migrations/postgres/0004_once_awards.sql"),
            ),
        }
    }

    /// A query's first column, as text.
    async fn strings(&mut self, sql: &str) -> Vec<String> {
        match self {
            Db::Sqlite(c) => sqlx::query_scalar(sql).fetch_all(c).await,
            Db::Pg(c) => sqlx::query_scalar(sql).fetch_all(c).await,
        }
        .unwrap()
    }

    /// Runs `sql` with `key` bound to `$1`.
    async fn insert_key(&mut self, sql: &str, key: Option<&str>) -> Result<(), sqlx::Error> {
        match self {
            Db::Sqlite(c) => sqlx::query(sql).bind(key).execute(c).await.map(drop),
            Db::Pg(c) => sqlx::query(sql).bind(key).execute(c).await.map(drop),
        }
    }

    async fn keys(&mut self) -> Vec<(String, String, Option<String>)> {
        let sql = "SELECT event_id, rule, once_key FROM ledger ORDER BY id";
        match self {
            Db::Sqlite(c) => sqlx::query_as(sql).fetch_all(c).await,
            Db::Pg(c) => sqlx::query_as(sql).fetch_all(c).await,
        }
        .unwrap()
    }
}

#[tokio::test]
async fn upgrading_keys_the_awards_already_earned() {
    let tmp = tempfile::tempdir().unwrap();
    let url = fresh_database(tmp.path()).await;
    let mut db = Db::open(&url).await;
    let (before, once) = db.migrations();
    for sql in before {
        db.run(sql).await;
    }
    let mut fixture = String::new();
    for (id, canonical) in [
        (
            "e1",
            r#"{"course_id":"c1","object_id":"cm1","event_type":"lesson.completed"}"#,
        ),
        (
            "e2",
            r#"{"course_id":"c1","object_id":"cm1","event_type":"lesson.completed"}"#,
        ),
        (
            "e3",
            r#"{"course_id":"c1","object_id":"http://x/1","event_type":"xapi.passed"}"#,
        ),
        (
            "e4",
            r#"{"course_id":"c1","object_id":null,"event_type":"badge"}"#,
        ),
    ] {
        fixture += &format!(
            "INSERT INTO events (id, source, dedupe_key, namespace, occurred_at, received_at, status, canonical, raw) \
             VALUES ('{id}', 'm', '{id}', 'm', 0, 0, 'processed', '{canonical}', '');\n"
        );
    }
    for (event, rule) in [
        ("e1", "lesson_completed"),
        ("e2", "lesson_completed"),
        ("e1", "course_completed"),
        ("e3", "xapi_verbs"),
        ("e4", "my_rule"),
        ("e4", "lesson_completed"),
    ] {
        fixture += &format!(
            "INSERT INTO ledger (event_id, namespace, user_id, rule, points, occurred_at, created_at) \
             VALUES ('{event}', 'm', 'u', '{rule}', 10, 0, 0);\n"
        );
    }
    db.run(&fixture).await;
    db.run(once).await;
    let k =
        |e: &str, r: &str, o: Option<&str>| (e.to_string(), r.to_string(), o.map(str::to_string));
    assert_eq!(
        db.keys().await,
        vec![
            k("e1", "lesson_completed", Some("cm1")),
            k("e2", "lesson_completed", None),
            k("e1", "course_completed", Some("c1")),
            k("e3", "xapi_verbs", Some("passed:http://x/1")),
            k("e4", "my_rule", None),
            k("e4", "lesson_completed", None),
        ],
        "on {url}"
    );
}

/// A store from before the ledger's two learner indexes became one
/// (SQLite's migration 0010, which also rebuilds totals without a rowid;
/// PostgreSQL's 0007) is upgraded by the server at startup: totals are
/// kept, a once-award already held is not awarded again, the same rule
/// still awards others, and the new index holds once-keys by itself.
#[tokio::test]
async fn upgrading_to_one_learner_index_keeps_totals_and_held_once_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let url = fresh_database(tmp.path()).await;
    let sqlite = !url.starts_with("postgres");
    let (dir, merged) = if sqlite {
        ("migrations/sqlite", 10)
    } else {
        ("migrations/postgres", 7)
    };
    let mut db = Db::open(&url).await;
    let mut migrator = sqlx::migrate::Migrator::new(repo_dir().join(dir))
        .await
        .unwrap();
    migrator.migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.version < merged)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    match &mut db {
        Db::Sqlite(c) => migrator.run(c).await,
        Db::Pg(c) => migrator.run(c).await,
    }
    .unwrap();
    // U-held earned the course's once-award (key C-987) before the upgrade.
    db.run(
        "INSERT INTO events (id, source, dedupe_key, namespace, user_id, course_id, event_type, \
         occurred_at, received_at, status, points, canonical, raw) VALUES \
         ('evt_old', 'learnworlds', 'old', 'learnworlds', 'U-held', 'C-987', 'course.completed', \
         0, 0, 'processed', 50, '{}', '');
         INSERT INTO ledger (event_id, namespace, user_id, course_id, rule, points, occurred_at, \
         created_at, once_key) VALUES ('evt_old', 'learnworlds', 'U-held', 'C-987', \
         'course_completed', 50, 0, 0, 'C-987');
         INSERT INTO totals (namespace, user_id, points, events, updated_at) \
         VALUES ('learnworlds', 'U-held', 50, 1, 0);",
    )
    .await;
    drop(db);

    let app = spawn_custom(|_| {}, |s| s.database_url = url.clone()).await;
    assert_eq!(app.user_points("learnworlds", "U-held").await, 50);
    for user in ["U-held", "U-new"] {
        let body = learnworlds_completion(user);
        let r = app.signed("learnworlds", LEARNWORLDS_SECRET, &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(app.user_points("learnworlds", "U-held").await, 50);
    assert_eq!(app.user_points("learnworlds", "U-new").await, 50);

    let mut db = Db::open(&url).await;
    let indexes = db
        .strings(if sqlite {
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'ledger' \
             ORDER BY name"
        } else {
            "SELECT indexname FROM pg_indexes WHERE tablename = 'ledger' ORDER BY indexname"
        })
        .await;
    assert!(indexes.iter().any(|i| i == "ledger_learner"), "{indexes:?}");
    assert!(
        !indexes
            .iter()
            .any(|i| i == "ledger_user" || i == "ledger_once"),
        "{indexes:?}"
    );
    // The index itself holds once-keys to one per learner and rule (queue
    // workers and rescoring rely on it alone); rows without a key never
    // conflict.
    let insert = "INSERT INTO ledger (event_id, namespace, user_id, rule, points, occurred_at, \
        created_at, once_key) VALUES ('evt_old', 'learnworlds', 'U-held', 'course_completed', \
        1, 0, 0, $1)";
    let held = db.insert_key(insert, Some("C-987")).await.unwrap_err();
    assert!(
        held.to_string().to_lowercase().contains("unique")
            || held.to_string().contains("duplicate key"),
        "{held}"
    );
    for _ in 0..2 {
        db.insert_key(insert, None).await.unwrap();
    }
    if sqlite {
        let totals = db
            .strings("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'totals'")
            .await;
        assert!(totals[0].ends_with("WITHOUT ROWID"), "{totals:?}");
    }
}
