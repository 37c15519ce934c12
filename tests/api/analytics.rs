//! Reads of the ledger: users, events, leaderboards, stats.

use serde_json::json;

use crate::helpers::*;

async fn custom(app: &TestApp, id: &str, kind: &str, user: &str, course: &str, at: &str) {
    let ev = json!({"event_id": id, "event_type": kind, "user_id": user, "course_id": course, "occurred_at": at});
    let r = app.bearer("custom", CUSTOM_TOKEN, &ev).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn a_user_has_a_total_a_level_and_recent_entries() {
    let app = spawn_app().await;
    for i in 0..3 {
        custom(
            &app,
            &format!("c{i}"),
            "course.completed",
            "ana",
            &format!("course-{i}"),
            "2025-01-01T00:00:00Z",
        )
        .await;
    }
    let r = app.admin_get("/api/v1/users/custom/ana").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["total_points"], 150);
    assert_eq!(r.body["level"], 2);
    assert_eq!(r.body["next_level_at"], 276);
    assert_eq!(r.body["event_count"], 3);
    assert_eq!(r.body["recent"].as_array().unwrap().len(), 3);
    assert_eq!(r.body["recent"][0]["rule"], "course_completed");
    let nobody = app.admin_get("/api/v1/users/custom/nobody").await;
    assert_eq!(nobody.body["total_points"], 0);
    assert_eq!(nobody.body["level"], 1);
}

#[tokio::test]
async fn leaderboards_rank_ties_and_filter_by_source_course_and_time() {
    let app = spawn_app().await;
    custom(
        &app,
        "1",
        "course.completed",
        "ana",
        "c1",
        "2025-01-01T00:00:00Z",
    )
    .await;
    custom(
        &app,
        "2",
        "course.completed",
        "bo",
        "c1",
        "2025-02-01T00:00:00Z",
    )
    .await;
    custom(
        &app,
        "3",
        "lesson.completed",
        "cy",
        "c2",
        "2025-03-01T00:00:00Z",
    )
    .await;
    custom(
        &app,
        "4",
        "lesson.completed",
        "ana",
        "c2",
        "2025-03-02T00:00:00Z",
    )
    .await;
    app.bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 9))
        .await;

    let all = app.admin_get("/api/v1/leaderboard").await;
    assert_eq!(all.status, 200, "{}", all.text);
    let rows: Vec<(i64, String, String, i64)> = all.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["rank"].as_i64().unwrap(),
                e["source"].as_str().unwrap().into(),
                e["user_id"].as_str().unwrap().into(),
                e["points"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (1, "custom".into(), "ana".into(), 60),
            (2, "custom".into(), "bo".into(), 50),
            (2, "moodle".into(), "9".into(), 50),
            (4, "custom".into(), "cy".into(), 10),
        ]
    );
    let by_source = app.admin_get("/api/v1/leaderboard?source=moodle").await;
    assert_eq!(by_source.body["entries"].as_array().unwrap().len(), 1);
    let course = app.admin_get("/api/v1/leaderboard?course_id=c2").await;
    assert_eq!(course.body["entries"][0]["rank"], 1);
    assert_eq!(course.body["entries"][1]["rank"], 1);
    assert_eq!(course.body["entries"][0]["points"], 10);
    let window = app.admin_get("/api/v1/leaderboard?since=2025-01-15T00:00:00Z&until=2025-03-01T12:00:00Z&source=custom").await;
    let users: Vec<&str> = window.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["bo", "cy"]);
    let limited = app.admin_get("/api/v1/leaderboard?limit=1").await;
    assert_eq!(limited.body["entries"].as_array().unwrap().len(), 1);
    let bad = app.admin_get("/api/v1/leaderboard?since=yesterday").await;
    assert_error(&bad, 400, "INVALID_REQUEST");
}

/// A source that sets its own namespace: `source=` takes its name, or the
/// namespace the entries show.
#[tokio::test]
async fn the_leaderboard_takes_a_source_name_for_its_namespace() {
    let app = spawn_with(|dir| append_to_source(dir, "custom", "namespace: campus")).await;
    custom(
        &app,
        "1",
        "course.completed",
        "ana",
        "c1",
        "2025-01-01T00:00:00Z",
    )
    .await;
    for source in ["custom", "campus"] {
        let r = app
            .admin_get(&format!("/api/v1/leaderboard?source={source}"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.body["entries"],
            json!([{"rank": 1, "source": "campus", "user_id": "ana", "points": 50}]),
            "source={source}"
        );
    }
    let none = app.admin_get("/api/v1/leaderboard?source=moodle").await;
    assert_eq!(none.body["entries"], json!([]));
}

#[tokio::test]
async fn an_event_shows_its_status_canonical_form_and_awards() {
    let app = spawn_app().await;
    let r = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(31, 32))
        .await;
    let id = r.body["event_id"].as_str().unwrap();
    let ev = app.admin_get(&format!("/api/v1/events/{id}")).await;
    assert_eq!(ev.status, 200, "{}", ev.text);
    assert_eq!(ev.body["status"], "processed");
    assert_eq!(ev.body["points"], 50);
    assert_eq!(ev.body["dedupe_key"], "31");
    assert_eq!(ev.body["canonical"]["user_id"], "32");
    assert_eq!(
        ev.body["canonical"]["vendor_event_type"],
        "\\core\\event\\course_completed"
    );
    assert_eq!(ev.body["awards"][0]["points"], 50);
    assert_error(
        &app.admin_get("/api/v1/events/evt_nope").await,
        404,
        "UNKNOWN_EVENT",
    );
}

#[tokio::test]
async fn stats_count_events_by_source_and_type() {
    let app = spawn_app().await;
    custom(
        &app,
        "1",
        "course.completed",
        "ana",
        "c1",
        &chrono::Utc::now().to_rfc3339(),
    )
    .await;
    custom(
        &app,
        "2",
        "course.completed",
        "bo",
        "c1",
        &chrono::Utc::now().to_rfc3339(),
    )
    .await;
    app.bearer(
        "moodle",
        MOODLE_TOKEN,
        &json!({"id": 1, "eventname": "x", "userid": 1}),
    )
    .await;
    let s = app.admin_get("/api/v1/stats").await;
    assert_eq!(s.status, 200, "{}", s.text);
    let events = s.body["events"].as_array().unwrap();
    assert!(events.contains(&json!({"source": "custom", "event_type": "course.completed", "status": "processed", "count": 2})), "{}", s.text);
    assert!(events.contains(&json!({"source": "moodle", "event_type": "unmapped", "status": "processed", "count": 1})), "{}", s.text);
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(
        s.body["points_per_day"],
        json!([{"day": today, "points": 100}])
    );
    // Empty query parameters (form-built URLs) count as absent.
    let all = app.admin_get("/api/v1/leaderboard").await;
    let blank = app
        .admin_get("/api/v1/leaderboard?source=&course_id=&since=&until=&limit=")
        .await;
    assert_eq!(blank.status, 200, "{}", blank.text);
    assert_eq!(blank.body, all.body);
    assert_eq!(
        all.body["entries"].as_array().unwrap().len(),
        3,
        "{}",
        all.text
    );
    // A user nobody has seen: 0 points in a known namespace, 404 in an
    // unknown one.
    let nobody = app.admin_get("/api/v1/users/custom/nobody").await;
    assert_eq!(nobody.status, 200, "{}", nobody.text);
    assert_eq!(nobody.body["total_points"], 0);
    assert_error(
        &app.admin_get("/api/v1/users/nosuch/ana").await,
        404,
        "UNKNOWN_SOURCE",
    );
}

#[tokio::test]
async fn analytics_need_the_admin_token() {
    let app = spawn_app().await;
    for path in [
        "/api/v1/users/moodle/1",
        "/api/v1/leaderboard",
        "/api/v1/events/evt_x",
        "/api/v1/stats",
        "/api/admin/sources",
    ] {
        let none = app.send(app.client.get(app.url(path))).await;
        assert_error(&none, 401, "AUTHENTICATION_FAILED");
        let wrong = app
            .send(app.client.get(app.url(path)).bearer_auth(TEST_TOKEN))
            .await;
        assert_error(&wrong, 401, "AUTHENTICATION_FAILED");
    }
}

#[tokio::test]
async fn rules_with_history_give_first_completion_bonuses_cooldowns_and_streaks() {
    let app = spawn_with(|dir| {
        set_custom_rules(
            dir,
            "course_completed, first_course_bonus, lesson_capped, streak_bonus",
        );
    })
    .await;
    let app = &app;
    let post = |id: &str, kind: &str, at: &str, course: &str| {
        let ev = json!({"event_id": id, "event_type": kind, "user_id": "h", "course_id": course, "occurred_at": at});
        async move {
            let r = app.bearer("custom", CUSTOM_TOKEN, &ev).await;
            assert_eq!(r.status, 200, "{}", r.text);
            r.body["points_awarded"].as_i64().unwrap()
        }
    };
    assert_eq!(
        post("c1", "course.completed", "2025-03-01T09:00:00Z", "c1").await,
        75,
        "first completion bonus"
    );
    assert_eq!(
        post("c2", "course.completed", "2025-03-02T09:00:00Z", "c1").await,
        0,
        "nothing the second time: once per learner and course"
    );
    assert_eq!(
        post("c3", "course.completed", "2025-03-02T10:00:00Z", "c2").await,
        75,
        "another course is a first"
    );
    assert_eq!(
        post("l1", "lesson.completed", "2025-03-10T09:00:00Z", "c1").await,
        10
    );
    assert_eq!(
        post("l2", "lesson.completed", "2025-03-10T09:00:30Z", "c1").await,
        0,
        "cooldown"
    );
    assert_eq!(
        post("l3", "lesson.completed", "2025-03-11T09:00:00Z", "c1").await,
        10 + 10,
        "2-day streak"
    );
    assert_eq!(
        post("l4", "lesson.completed", "2025-03-12T09:00:00Z", "c1").await,
        10 + 15,
        "3-day streak"
    );
    assert_eq!(
        post("l5", "lesson.completed", "2025-03-12T11:00:00Z", "c1").await,
        10,
        "streak bonus once a day"
    );
    assert_eq!(
        app.user_points("custom", "h").await,
        75 + 75 + 10 + 20 + 25 + 10
    );
}

#[tokio::test]
async fn the_level_curve_is_configurable() {
    let app = spawn_custom(
        |_| {},
        |s| {
            s.level_base = 10.0;
            s.level_coefficient = 2.0;
        },
    )
    .await;
    app.bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 3))
        .await;
    let r = app.admin_get("/api/v1/users/moodle/3").await;
    // Steps 10, 20, 40: thresholds 0, 10, 30, 70.
    assert_eq!(
        (r.body["level"].as_i64(), r.body["next_level_at"].as_i64()),
        (Some(3), Some(70)),
        "{}",
        r.text
    );
}

/// The entries of a leaderboard query, as (source, user, points, rank).
async fn board(app: &TestApp, query: &str) -> Vec<(String, String, i64, i64)> {
    let r = app
        .admin_get(&format!("/api/v1/leaderboard?limit=100&{query}"))
        .await;
    assert_eq!(r.status, 200, "{query}: {}", r.text);
    r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().into(),
                e["user_id"].as_str().unwrap().into(),
                e["points"].as_i64().unwrap(),
                e["rank"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// A course's leaderboard and the last seven days' are read from summary
/// tables on both stores (the window's start moved by the server); they must
/// answer exactly what aggregating the ledger does. The same query with an
/// `until` far ahead always aggregates the ledger, so the two must agree,
/// wherever the window is.
#[tokio::test]
async fn course_and_recent_leaderboards_agree_with_the_ledger() {
    let app = spawn_app().await;
    let now = chrono::Utc::now().timestamp_millis();
    let rfc = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    const H: i64 = 3_600_000;
    const WEEK: i64 = 7 * 24 * H;
    // (user, course, kind, hours before now): some long ago, some just
    // outside the week, some just inside, some today; a few learners tie.
    let plan = [
        ("ana", "c1", "course.completed", 1),
        ("ana", "c2", "lesson.completed", 30),
        ("bo", "c1", "course.completed", 100),
        ("bo", "c2", "quiz.passed", 167),
        ("cy", "c2", "course.completed", 169),
        ("cy", "c1", "lesson.completed", 2),
        ("dee", "c1", "course.completed", 700),
        ("dee", "c2", "lesson.completed", 5),
        ("eve", "c2", "lesson.completed", 168),
        ("eve", "c1", "quiz.passed", 3),
    ];
    for (i, (user, course, kind, hours)) in plan.iter().enumerate() {
        let ev = json!({"event_id": format!("e{i}"), "event_type": kind, "user_id": user,
            "course_id": course, "object_id": format!("o{i}"), "occurred_at": rfc(now - hours * H)});
        let r = app.bearer("custom", CUSTOM_TOKEN, &ev).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // A learner whose one row falls between a window's start and `since`:
    // in the window, but not since.
    let ev = json!({"event_id": "f", "event_type": "quiz.passed", "user_id": "fay",
        "course_id": "c2", "occurred_at": rfc(now - WEEK - H / 4)});
    assert_eq!(app.bearer("custom", CUSTOM_TOKEN, &ev).await.status, 200);
    app.bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 9))
        .await;
    let far = "until=2100-01-01T00:00:00Z";
    let agree = |query: String| {
        let app = &app;
        async move {
            let summary = board(app, &query).await;
            let ledger = board(app, &format!("{query}&{far}")).await;
            assert_eq!(summary, ledger, "{query}");
            summary
        }
    };
    let c1 = agree("course_id=c1".into()).await;
    assert_eq!(c1.len(), 5, "{c1:?}");
    agree("course_id=c2&source=custom".into()).await;
    agree("course_id=nope".into()).await;
    // The window where the server put it (seven days before its start,
    // to the minute), then moved back and forth: `since` a little after
    // its start subtracts the rows between the two.
    let window = || app.server.state.store.recent_window_start();
    // Where the server put it: `since` a week ago reads the window.
    let start = window().await.unwrap().unwrap();
    assert!(start <= now - WEEK && now - WEEK - start < H, "{start}");
    let week = agree(format!("since={}", rfc(now - WEEK))).await;
    assert_eq!(week.len(), 5, "{week:?}");
    for start in [
        now - WEEK - H / 2,
        now - 6 * 24 * H,
        now - WEEK - 2 * H,
        now - WEEK,
    ] {
        rocket_rewards::window::move_to(&app.server.state, start)
            .await
            .unwrap();
        assert_eq!(window().await.unwrap(), Some(start));
        for since in [start, start + H / 4, start + H / 2, start + H] {
            agree(format!("since={}", rfc(since))).await;
            agree(format!("since={}&source=custom", rfc(since))).await;
            agree(format!("since={}&limit=2", rfc(since))).await;
        }
        recount_leaderboard_tables(&app.database_url).await;
    }
    // A row that occurred exactly at the window's start is in the window
    // (the writer's or the trigger's test is `>=`, as the recount's), and
    // one a millisecond before is not.
    let start = window().await.unwrap().unwrap();
    for (id, user, at) in [("edge", "gus", start), ("before", "hal", start - 1)] {
        let ev = json!({"event_id": id, "event_type": "quiz.passed", "user_id": user,
            "course_id": "c3", "occurred_at": rfc(at)});
        assert_eq!(app.bearer("custom", CUSTOM_TOKEN, &ev).await.status, 200);
    }
    let week = agree(format!("since={}", rfc(start))).await;
    assert!(week.iter().any(|r| r.1 == "gus"), "{week:?}");
    assert!(!week.iter().any(|r| r.1 == "hal"), "{week:?}");
    recount_leaderboard_tables(&app.database_url).await;
}

/// Deliveries that occurred around the window's start, written while the
/// window moves back and forth over them: each row is counted under the
/// start it was written under, never under one being moved (on
/// PostgreSQL, writers and the move exclude each other by an advisory
/// lock; on SQLite, by its one writer), and the sums match a recount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_moves_while_deliveries_land_on_its_edge() {
    let app = spawn_custom(|_| {}, |s| s.rate_limits = false).await;
    let start = app
        .server
        .state
        .store
        .recent_window_start()
        .await
        .unwrap()
        .unwrap();
    let rfc = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    const MIN: i64 = 60_000;
    let post = |i: i64| {
        let app = &app;
        let ev = json!({"event_id": format!("w{i}"), "event_type": "course.completed",
            "user_id": format!("u{}", i % 6), "course_id": format!("c{i}"),
            "occurred_at": rfc(start - 2 * MIN + i * 1_000)});
        async move { app.bearer("custom", CUSTOM_TOKEN, &ev).await.status }
    };
    let moves = async {
        for round in 0..40 {
            let to = start + (round % 5 - 2) * MIN;
            rocket_rewards::window::move_to(&app.server.state, to)
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
    };
    let posts = futures_util::future::join_all((0..240).map(post));
    let (statuses, ()) = tokio::join!(posts, moves);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    recount_leaderboard_tables(&app.database_url).await;
}

/// Rows of a query on either store (a connection of its own).
pub async fn query_rows<T>(database_url: &str, sql: &str) -> Vec<T>
where
    T: Send + Unpin,
    T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    use sqlx::Connection;
    if database_url.starts_with("postgres") {
        let mut db = sqlx::PgConnection::connect(database_url).await.unwrap();
        sqlx::query_as(sql).fetch_all(&mut db).await.unwrap()
    } else {
        let mut db = sqlx::SqliteConnection::connect(database_url).await.unwrap();
        sqlx::query_as(sql).fetch_all(&mut db).await.unwrap()
    }
}

/// The leaderboards' summary tables against a recount of the ledger (either
/// store; PostgreSQL's `SUM` of a `BIGINT` is cast back from `NUMERIC`).
pub async fn recount_leaderboard_tables(database_url: &str) {
    type Sum = (String, String, String, i64, i64);
    let rows = |sql| query_rows::<Sum>(database_url, sql);
    assert_eq!(
        rows("SELECT course_id, namespace, user_id, points, entries FROM course_points ORDER BY 1, 2, 3").await,
        rows("SELECT course_id, namespace, user_id, CAST(SUM(points) AS BIGINT), COUNT(*) FROM ledger \
            WHERE course_id IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3").await
    );
    assert_eq!(
        rows("SELECT '', namespace, user_id, points, entries FROM recent_points ORDER BY 2, 3")
            .await,
        rows(
            "SELECT '', namespace, user_id, CAST(SUM(points) AS BIGINT), COUNT(*) FROM ledger \
            WHERE occurred_at >= (SELECT start_ms FROM recent_window) GROUP BY 2, 3 ORDER BY 2, 3"
        )
        .await
    );
}
