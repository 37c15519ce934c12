//! The data lifecycle: erasing a learner, retention, backup and restore.

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

async fn custom(app: &TestApp, id: &str, user: &str) -> Resp {
    let ev = json!({"event_id": id, "event_type": "course.completed", "user_id": user, "course_id": id, "note": "personal"});
    app.bearer("custom", CUSTOM_TOKEN, &ev).await
}

async fn erase(app: &TestApp, namespace: &str, user: &str) -> Resp {
    app.send(
        app.client
            .delete(app.url(&format!("/api/admin/users/{namespace}/{user}")))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await
}

/// A retention pass once the clock has passed the last receipt (the
/// cutoff is a millisecond).
async fn prune_after_the_last_receipt(app: &TestApp) -> rocket_rewards::retention::Pruned {
    let received = chrono::Utc::now().timestamp_millis();
    while chrono::Utc::now().timestamp_millis() <= received {
        std::hint::spin_loop();
    }
    rocket_rewards::retention::prune(&app.server.state)
        .await
        .unwrap()
}

/// A learner is erased in one call: events (raw bodies and headers),
/// ledger entries and total; leaderboards and stats follow; erasing again
/// answers zeros; a redelivery of an erased event is a duplicate that
/// awards and stores nothing; new events are stored as usual.
#[tokio::test]
async fn erasing_a_learner_removes_their_data_and_a_redelivery_does_not_bring_it_back() {
    let app = spawn_app().await;
    for id in ["e1", "e2"] {
        assert_eq!(custom(&app, id, "ada").await.status, 200);
    }
    assert_eq!(custom(&app, "e3", "bob").await.status, 200);
    assert_eq!(app.user_points("custom", "ada").await, 100);
    let r = erase(&app, "custom", "ada").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"status": "success", "namespace": "custom", "events": 2, "ledger_entries": 2, "points": 100})
    );
    assert_eq!(app.user_points("custom", "ada").await, 0);
    let board = app.admin_get("/api/v1/leaderboard").await.body;
    assert_eq!(board["entries"].as_array().unwrap().len(), 1, "{board}");
    assert_eq!(board["entries"][0]["user_id"], "bob");
    // Nothing personal is left in the log or behind an event.
    let log = app.admin_get("/api/v1/events?source=custom").await;
    assert!(!log.text.contains("ada"), "{}", log.text);
    let erased: Vec<&Value> = log.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] == "erased")
        .collect();
    assert_eq!(erased.len(), 2);
    let one = app
        .admin_get(&format!(
            "/api/v1/events/{}",
            erased[0]["event_id"].as_str().unwrap()
        ))
        .await;
    assert!(
        !one.text.contains("ada") && !one.text.contains("personal"),
        "{}",
        one.text
    );
    assert_eq!(one.body["request"].get("headers"), None);
    // Idempotent.
    let again = erase(&app, "custom", "ada").await;
    assert_eq!(again.body["events"], 0);
    assert_eq!(again.body["points"], 0);
    // A redelivery is a duplicate: nothing awarded, nothing stored.
    let r = custom(&app, "e1", "ada").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["duplicate"], true);
    assert_eq!(r.body["points_awarded"], 0);
    assert_eq!(app.user_points("custom", "ada").await, 0);
    let log = app.admin_get("/api/v1/events?source=custom").await;
    assert!(!log.text.contains("ada"), "{}", log.text);
    // A new event is stored as usual.
    assert_eq!(custom(&app, "e4", "ada").await.status, 200);
    assert_eq!(app.user_points("custom", "ada").await, 50);
    let stats = app.admin_get("/api/v1/stats").await.body;
    assert_eq!(
        stats["events"],
        json!([
            {"source": "custom", "event_type": "course.completed", "status": "erased", "count": 2},
            {"source": "custom", "event_type": "course.completed", "status": "processed", "count": 2}
        ])
    );
    let anonymous = app
        .send(app.client.delete(app.url("/api/admin/users/custom/bob")))
        .await;
    assert_eq!(anonymous.status, 401);
}

/// The `erase` subcommand does what the endpoint does.
#[tokio::test]
async fn the_erase_subcommand_erases_on_a_running_servers_store() {
    let app = spawn_app().await;
    assert_eq!(custom(&app, "e1", "cy").await.status, 200);
    let url = app.database_url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
            .args(["erase", "--namespace", "custom", "--user", "cy"])
            .env("ROCKET_DATABASE_URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("1 events, 1 ledger entries, 50 points"),
        "{text}"
    );
    assert_eq!(app.user_points("custom", "cy").await, 0);
}

/// PostgreSQL: when the server ends the writers' connections (an
/// administrator, a restart), the next deliveries are still written: the
/// attempt on a dead connection fails and is retried on a new one. (The
/// writers take turns: four deliveries open every writer's connection, and
/// the next four meet the dead ones.)
#[tokio::test]
async fn deliveries_after_the_writers_connections_were_ended_are_written() {
    let app = spawn_app().await;
    if !app.database_url.starts_with("postgres") {
        return;
    }
    let post = |i: usize| {
        let ev = json!({"event_id": format!("k{i}"), "event_type": "course.completed", "user_id": "kim", "course_id": format!("c{i}")});
        let app = &app;
        async move { app.bearer("custom", CUSTOM_TOKEN, &ev).await }
    };
    let mut awarded = 0;
    for i in 0..4 {
        let r = post(i).await;
        assert_eq!(r.status, 200, "{}", r.text);
        awarded += r.body["points_awarded"].as_i64().unwrap();
    }
    use sqlx::Connection;
    let mut db = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let ended: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
        WHERE application_name = 'rocket-rewards writer' AND datname = current_database()",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert!(!ended.is_empty() && ended.iter().all(|e| e.0), "{ended:?}");
    for i in 4..8 {
        let r = post(i).await;
        assert_eq!(r.status, 200, "{}", r.text);
        awarded += r.body["points_awarded"].as_i64().unwrap();
    }
    assert!(awarded >= 8 * 50, "{awarded}");
    assert_eq!(app.user_points("custom", "kim").await, awarded);
}

/// PostgreSQL: when rescoring a redelivered failed event fails (here a
/// trigger refuses the update), that delivery is answered 500 and nothing
/// of it is written; its redelivery once the database accepts it again is
/// scored, and the server's writers work on.
#[tokio::test]
async fn a_rescore_the_database_refuses_fails_only_its_delivery() {
    let app = spawn_with(with_flaky_rule).await;
    if !app.database_url.starts_with("postgres") {
        return;
    }
    let post = |id: &str, kind: &str| {
        let ev = json!({"event_id": id, "event_type": kind, "user_id": "lou", "course_id": id});
        let app = &app;
        async move { app.bearer("custom", CUSTOM_TOKEN, &ev).await }
    };
    assert_eq!(post("b1", "badge.earned").await.status, 500);
    fix_flaky_rule(&app.config_dir);
    assert_eq!(app.reload().await.status, 200);
    use sqlx::Connection;
    let mut db = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    for sql in [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
        "CREATE TRIGGER refuse BEFORE UPDATE ON events FOR EACH ROW \
         WHEN (OLD.status = 'failed') EXECUTE FUNCTION refuse()",
    ] {
        sqlx::query(sql).execute(&mut db).await.unwrap();
    }
    assert_eq!(post("b1", "badge.earned").await.status, 500);
    let fresh = post("c1", "course.completed").await;
    assert_eq!(fresh.status, 200, "{}", fresh.text);
    assert_eq!(
        app.user_points("custom", "lou").await,
        fresh.body["points_awarded"].as_i64().unwrap()
    );
    sqlx::query("DROP TRIGGER refuse ON events")
        .execute(&mut db)
        .await
        .unwrap();
    let rescored = post("b1", "badge.earned").await;
    assert_eq!(rescored.status, 200, "{}", rescored.text);
    assert_eq!(rescored.body["points_awarded"], 7);
    assert_eq!(
        app.user_points("custom", "lou").await,
        fresh.body["points_awarded"].as_i64().unwrap() + 7
    );
}

/// `rocket-rewards backup` on the store of a server under load, then a new
/// server on the copy: every event acknowledged before the backup began is
/// there. (PostgreSQL: the subcommand points to pg_dump.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_event_acknowledged_before_it_began() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let app = spawn_custom(|_| {}, |s| s.rate_limits = false).await;
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("backup.db");
    let backup = |url: String, copy: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
                .arg("backup")
                .arg(&copy)
                .env("ROCKET_DATABASE_URL", url)
                .output()
                .unwrap()
        })
    };
    if app.database_url.starts_with("postgres") {
        let out = backup(app.database_url.clone(), copy).await.unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("pg_dump"));
        return;
    }
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let app = Arc::new(app);
    let mut senders = Vec::new();
    for t in 0..4 {
        let (app, acked, stop) = (app.clone(), acked.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let ev = json!({"event_id": format!("t{t}-{i}"), "event_type": "course.completed", "user_id": format!("u{t}"), "course_id": format!("c{i}")});
                let r = app.bearer("custom", CUSTOM_TOKEN, &ev).await;
                assert_eq!(r.status, 200, "{}", r.text);
                acked.lock().unwrap().push(r.body["event_id"].as_str().unwrap().to_string());
            }
        }));
    }
    while acked.lock().unwrap().len() < 200 {
        tokio::task::yield_now().await;
    }
    let before: Vec<String> = acked.lock().unwrap().clone();
    let out = backup(app.database_url.clone(), copy.clone())
        .await
        .unwrap();
    let during = acked.lock().unwrap().len() - before.len();
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("backed up to"));
    // Never over an existing file.
    let again = backup(app.database_url.clone(), copy.clone())
        .await
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));
    // A mistyped database path is refused, not created empty and backed up.
    let missing = format!(
        "sqlite://{}",
        tmp.path().join("nowhere/rocket.db").display()
    );
    let wrong = backup(missing, tmp.path().join("other.db")).await.unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("no database at"));
    assert!(!tmp.path().join("nowhere").exists());

    let restored_url = format!("sqlite://{}", copy.display());
    let restored = spawn_custom(|_| {}, |s| s.database_url = restored_url).await;
    for id in &before {
        let r = restored.admin_get(&format!("/api/v1/events/{id}")).await;
        assert_eq!(
            r.status, 200,
            "{id} was acknowledged before the backup began"
        );
    }
    let totals: i64 = (0..4)
        .map(|t| format!("u{t}"))
        .collect::<Vec<_>>()
        .iter()
        .map(|u| {
            let restored = &restored;
            let u = u.clone();
            async move { restored.user_points("custom", &u).await }
        })
        .collect::<futures_util::stream::FuturesOrdered<_>>()
        .collect::<Vec<i64>>()
        .await
        .into_iter()
        .sum();
    assert!(
        totals >= 50 * before.len() as i64,
        "{totals} for {} events",
        before.len()
    );
    eprintln!(
        "{} events acknowledged before the backup, {during} while it ran",
        before.len()
    );
}

/// Retention (a source's `retention`, 0 days here: everything received
/// before the pass) drops raw bodies and request headers, deletes
/// zero-point events, and never touches ledger entries or totals; a second
/// pass starts where the first stopped and finds nothing; a source without
/// retention is untouched.
#[tokio::test]
async fn retention_prunes_raw_bodies_and_zero_point_events_but_never_the_ledger() {
    let app = spawn_with(|dir| {
        append_to_source(
            dir,
            "custom",
            "retention: { raw_days: 0, zero_point_events_days: 0 }",
        )
    })
    .await;
    let scored = custom(&app, "r1", "ada").await;
    let zero = app
        .bearer(
            "custom",
            CUSTOM_TOKEN,
            &json!({"event_id": "r2", "event_type": "quiz.failed", "user_id": "ada"}),
        )
        .await;
    assert_eq!(zero.body["points_awarded"], 0, "{}", zero.text);
    let moodle = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 5))
        .await;
    let id = |r: &Resp| r.body["event_id"].as_str().unwrap().to_string();
    let (scored, zero, moodle) = (id(&scored), id(&zero), id(&moodle));
    let pruned = prune_after_the_last_receipt(&app).await;
    assert_eq!(
        pruned,
        rocket_rewards::retention::Pruned { raw: 2, events: 1 }
    );
    let kept = app.admin_get(&format!("/api/v1/events/{scored}")).await;
    assert_eq!(kept.status, 200);
    assert_eq!(kept.body["request"]["body"], "");
    assert_eq!(kept.body["request"].get("headers"), None);
    assert_eq!(kept.body["points"], 50);
    assert_eq!(kept.body["awards"].as_array().unwrap().len(), 1);
    assert_eq!(
        app.admin_get(&format!("/api/v1/events/{zero}"))
            .await
            .status,
        404
    );
    assert_eq!(app.user_points("custom", "ada").await, 50);
    let untouched = app.admin_get(&format!("/api/v1/events/{moodle}")).await;
    assert_ne!(untouched.body["request"]["body"], "");
    let again = rocket_rewards::retention::prune(&app.server.state)
        .await
        .unwrap();
    assert_eq!(again, rocket_rewards::retention::Pruned::default());
    let metrics = app.send(app.client.get(app.url("/metrics"))).await.text;
    assert!(
        metrics.contains("rocket_retention_pruned_total{what=\"raw\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("rocket_retention_pruned_total{what=\"events\"} 1"));
}

/// The summary tables (events by source, type and status and points per
/// day on SQLite; the leaderboards' sums on both stores), kept by trigger
/// and, for SQLite's hook, by the writer itself, and the totals agree with
/// a full recount after every kind of write: ingest, a failed event
/// replayed or redelivered, a rescore, an erasure and retention.
#[tokio::test]
async fn summary_tables_match_a_recount_after_every_kind_of_write() {
    let app = spawn_with(|dir| {
        with_flaky_rule(dir);
        append_to_source(
            dir,
            "custom",
            "retention: { raw_days: 0, zero_point_events_days: 0 }",
        );
    })
    .await;
    let post = |id: &str, kind: &str, user: &str| {
        let ev = json!({"event_id": id, "event_type": kind, "user_id": user, "course_id": id});
        let app = &app;
        async move { app.bearer("custom", CUSTOM_TOKEN, &ev).await.status }
    };
    assert_eq!(post("c1", "course.completed", "ada").await, 200);
    assert_eq!(post("c2", "course.completed", "bob").await, 200);
    assert_eq!(post("z1", "quiz.failed", "bob").await, 200);
    assert_eq!(post("b1", "badge.earned", "ada").await, 500);
    assert_eq!(post("b2", "badge.earned", "cy").await, 500);
    assert_eq!(post("b3", "badge.earned", "dee").await, 500);
    fix_flaky_rule(&app.config_dir);
    std::fs::write(
        app.config_dir.join("rules/course_completed.rhai"),
        "if event.event_type == \"course.completed\" { 60 }",
    )
    .unwrap();
    assert_eq!(app.reload().await.status, 200);
    // Redelivered by its LMS, a failed event is scored again by the writer.
    assert_eq!(post("b3", "badge.earned", "dee").await, 200);
    assert_eq!(
        app.replay(&json!({"source": "custom"})).await.body["processed"],
        2
    );
    let rescored = app
        .replay(&json!({"source": "custom", "status": "processed", "rescore": true}))
        .await;
    assert_eq!(rescored.body["rescored"], 2, "{}", rescored.text);
    assert_eq!(erase(&app, "custom", "cy").await.status, 200);
    let pruned = prune_after_the_last_receipt(&app).await;
    assert!(pruned.events >= 1, "{pruned:?}");

    // The totals, through the API on either store.
    assert_eq!(app.user_points("custom", "ada").await, 67);
    assert_eq!(app.user_points("custom", "bob").await, 60);
    assert_eq!(app.user_points("custom", "cy").await, 0);
    assert_eq!(app.user_points("custom", "dee").await, 7);
    recount_summary_tables(&app.database_url).await;
}

/// The summary tables and the totals against a full recount.
async fn recount_summary_tables(database_url: &str) {
    use sqlx::Connection;
    crate::analytics::recount_leaderboard_tables(database_url).await;
    // Neither store enforces the ledger's reference to its event (see
    // `connect_sqlite` and PostgreSQL's migration 0009): every award still
    // has its event.
    let orphans = crate::analytics::query_rows::<(String, i64)>(
        database_url,
        "SELECT event_id, COUNT(*) FROM ledger l \
         WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = l.event_id) GROUP BY 1",
    )
    .await;
    assert!(orphans.is_empty(), "{orphans:?}");
    if database_url.starts_with("postgres") {
        // PostgreSQL keeps no stats counters (`/api/v1/stats` aggregates).
        let rows = |sql| crate::analytics::query_rows::<(String, String, i64)>(database_url, sql);
        assert_eq!(
            rows("SELECT namespace, user_id, points FROM totals ORDER BY 1, 2").await,
            rows("SELECT namespace, user_id, CAST(SUM(points) AS BIGINT) FROM ledger GROUP BY 1, 2 ORDER BY 1, 2").await
        );
        return;
    }
    let mut db = sqlx::SqliteConnection::connect(database_url).await.unwrap();
    async fn rows(db: &mut sqlx::SqliteConnection, sql: &str) -> Vec<(String, String, i64)> {
        sqlx::query_as(sql).fetch_all(db).await.unwrap()
    }
    assert_eq!(
        rows(&mut db, "SELECT source || '/' || event_type, status, n FROM event_counts WHERE n <> 0 ORDER BY 1, 2").await,
        rows(&mut db, "SELECT source || '/' || COALESCE(event_type, 'unmapped'), status, COUNT(*) FROM events GROUP BY 1, 2 ORDER BY 1, 2").await
    );
    assert_eq!(
        rows(&mut db, "SELECT day, CAST(points AS TEXT), entries FROM ledger_days WHERE entries <> 0 ORDER BY 1").await,
        rows(&mut db, "SELECT strftime('%Y-%m-%d', created_at / 1000, 'unixepoch'), CAST(SUM(points) AS TEXT), COUNT(*) FROM ledger GROUP BY 1 ORDER BY 1").await
    );
    assert_eq!(
        rows(
            &mut db,
            "SELECT namespace, user_id, points FROM totals ORDER BY 1, 2"
        )
        .await,
        rows(
            &mut db,
            "SELECT namespace, user_id, SUM(points) FROM ledger GROUP BY 1, 2 ORDER BY 1, 2"
        )
        .await
    );
    let orphans: Vec<(String, i64, String, i64)> = sqlx::query_as("PRAGMA foreign_key_check")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert!(orphans.is_empty(), "{orphans:?}");
}

/// Concurrent deliveries form groups in the writer: copies of one event,
/// failed events and their redeliveries land side by side, and the summary
/// tables still match a recount (on PostgreSQL, concurrent writers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_tables_match_a_recount_after_concurrent_deliveries() {
    let app = spawn_custom(with_flaky_rule, |s| s.rate_limits = false).await;
    let post = |i: usize, kind: &'static str| {
        let ev = json!({"event_id": format!("e{i}"), "event_type": kind,
            "user_id": format!("u{}", i % 5), "course_id": format!("c{}", i % 3)});
        let app = &app;
        async move { app.bearer("custom", CUSTOM_TOKEN, &ev).await.status }
    };
    let kind = |i: usize| {
        if i % 4 == 0 {
            "badge.earned"
        } else {
            "course.completed"
        }
    };
    let first = (0..40).flat_map(|i| [post(i, kind(i)), post(i, kind(i))]);
    let statuses = futures_util::future::join_all(first).await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 500),
        "{statuses:?}"
    );
    assert!(statuses.contains(&500));
    // A failed event redelivered twice at once, failing again one time and
    // scored the other (the same id as another type): one group may
    // rescore it twice.
    let mixed = (0..40)
        .filter(|i| i % 4 == 0)
        .flat_map(|i| [post(i, "badge.earned"), post(i, "course.completed")]);
    let statuses = futures_util::future::join_all(mixed).await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 500),
        "{statuses:?}"
    );
    fix_flaky_rule(&app.config_dir);
    assert_eq!(app.reload().await.status, 200);
    let again = (0..40)
        .filter(|i| i % 4 == 0)
        .flat_map(|i| [post(i, kind(i)), post(i, kind(i)), post(i + 1, kind(i + 1))]);
    let statuses = futures_util::future::join_all(again).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    recount_summary_tables(&app.database_url).await;
}
