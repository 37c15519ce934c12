//! Async sources: stored first, answered 202, processed by workers.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

fn make_async(dir: &std::path::Path, rules: &str) {
    let text = std::fs::read_to_string(dir.join("sources.d/custom.yaml")).unwrap();
    let text = text.replace(
        "rules: [course_completed, lesson_completed, quiz_passed]",
        rules,
    );
    std::fs::write(
        dir.join("sources.d/queued.yaml"),
        format!("processing: async\n{text}"),
    )
    .unwrap();
}

/// Polls an event until its status is not `queued` (bounded).
async fn settled(app: &TestApp, id: &str) -> serde_json::Value {
    for _ in 0..200 {
        let r = app.admin_get(&format!("/api/v1/events/{id}")).await;
        if r.body["status"] != "queued" {
            return r.body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("event {id} stayed queued");
}

#[tokio::test]
async fn an_async_event_is_accepted_then_processed_once() {
    let app = spawn_with(|d| make_async(d, "rules: [course_completed]")).await;
    let ev = json!({"event_id": "q1", "event_type": "course.completed", "user_id": "qa"});
    let r = app.bearer("queued", CUSTOM_TOKEN, &ev).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body["status"], "success");
    assert_eq!(r.body["queued"], true);
    assert_eq!(r.body["points_awarded"], 0);
    let id = r.body["event_id"].as_str().unwrap().to_string();
    let done = settled(&app, &id).await;
    assert_eq!(done["status"], "processed");
    assert_eq!(done["points"], 50);
    assert_eq!(app.user_points("queued", "qa").await, 50);
    // Stats follow the event from queued to processed.
    let stats = app.admin_get("/api/v1/stats").await.body;
    assert_eq!(
        stats["events"],
        json!([{"source": "queued", "event_type": "course.completed", "status": "processed", "count": 1}])
    );
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(
        stats["points_per_day"],
        json!([{"day": today, "points": 50}])
    );
    let again = app.bearer("queued", CUSTOM_TOKEN, &ev).await;
    assert_eq!(
        again.status, 200,
        "a redelivery of a processed event is a duplicate: {}",
        again.text
    );
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(again.body["event_id"], id.as_str());
    let bad = app
        .bearer("queued", CUSTOM_TOKEN, &json!({"event_id": "q2"}))
        .await;
    assert_error(&bad, 400, "VALIDATION_ERROR");
}

#[tokio::test]
async fn a_failing_async_event_is_retried_then_failed_and_an_admin_can_retry_it() {
    let app = spawn_with(|d| {
        std::fs::write(
            d.join("rules/boom.rhai"),
            "if event.event_type == \"badge.earned\" { throw \"boom\" }",
        )
        .unwrap();
        make_async(d, "rules: [boom]");
    })
    .await;
    let ev = json!({"event_id": "f1", "event_type": "badge.earned", "user_id": "qf"});
    let r = app.bearer("queued", CUSTOM_TOKEN, &ev).await;
    assert_eq!(r.status, 202);
    let id = r.body["event_id"].as_str().unwrap().to_string();
    // Tries back off 1, 2, 4 s before the event rests as failed.
    let mut failed = None;
    for _ in 0..400 {
        let e = app.admin_get(&format!("/api/v1/events/{id}")).await;
        if e.body["status"] == "failed" {
            failed = Some(e.body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed = failed.expect("the event failed after its attempts");
    assert!(failed["error"].as_str().unwrap().contains("boom"));
    assert_eq!(
        failed["attempts"], 5,
        "the delivery and four worker tries: five attempts in all"
    );
    // The admin fixes the rule, reloads, and retries the event.
    std::fs::write(
        app.config_dir.join("rules/boom.rhai"),
        "if event.event_type == \"badge.earned\" { 3 }",
    )
    .unwrap();
    assert_eq!(app.reload().await.status, 200);
    let retry = app
        .send(
            app.client
                .post(app.url(&format!("/api/admin/events/{id}/retry")))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(retry.status, 200, "{}", retry.text);
    let done = settled(&app, &id).await;
    assert_eq!(done["status"], "processed");
    assert_eq!(app.user_points("queued", "qf").await, 3);
    let nothing = app
        .send(
            app.client
                .post(app.url(&format!("/api/admin/events/{id}/retry")))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    assert_error(&nothing, 404, "UNKNOWN_EVENT");
}

#[tokio::test]
// The children are killed and waited for at the end; a panic before that ends the test anyway.
#[allow(clippy::zombie_processes)]
async fn a_queued_event_survives_a_kill_9_before_processing() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    make_async(tmp.path(), "rules: [course_completed]");
    let db = fresh_database(tmp.path()).await;
    let dir = tmp.path().to_path_buf();
    let launch = move |workers: &'static str| {
        let (dir, db) = (dir.clone(), db.clone());
        tokio::task::spawn_blocking(move || {
            start_binary(
                &dir,
                &db,
                &[
                    ("ROCKET_CUSTOM_TOKEN", CUSTOM_TOKEN),
                    ("ROCKET_ADMIN_TOKEN", ADMIN_TOKEN),
                    ("ROCKET_WORKERS", workers),
                ],
            )
        })
    };
    // No workers on the first instance: the event stays queued.
    let (addr, mut first) = launch("0").await.unwrap();
    let client = reqwest::Client::new();
    let r = client
        .post(format!("http://{addr}/api/public/hook/queued/event"))
        .bearer_auth(CUSTOM_TOKEN)
        .json(&json!({"event_id": "k1", "event_type": "course.completed", "user_id": "k9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();

    let (addr, mut second) = launch("2").await.unwrap();
    let mut status = String::new();
    for _ in 0..200 {
        let e: serde_json::Value = client
            .get(format!("http://{addr}/api/v1/events/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        status = e["status"].as_str().unwrap_or("").to_string();
        if status == "processed" {
            assert_eq!(e["points"], 50);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();
    assert_eq!(
        status, "processed",
        "the restarted instance picked the queued event up"
    );
}

/// Workers keep to once-awards as the writer does: a completion re-sent
/// under new ids to an async source earns once, and the event that lost
/// shows 0 points (its stored points match its ledger rows).
#[tokio::test]
async fn an_async_source_awards_a_once_award_once() {
    let app = spawn_with(|d| make_async(d, "rules: [course_completed]")).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let ev = json!({"event_id": format!("o{i}"), "event_type": "course.completed", "user_id": "qo", "course_id": "c1"});
        let r = app.bearer("queued", CUSTOM_TOKEN, &ev).await;
        assert_eq!(r.status, 202, "{}", r.text);
        ids.push(r.body["event_id"].as_str().unwrap().to_string());
    }
    let mut points = Vec::new();
    for id in &ids {
        let done = settled(&app, id).await;
        assert_eq!(done["status"], "processed");
        let awarded: i64 = done["awards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["points"].as_i64().unwrap())
            .sum();
        assert_eq!(done["points"], awarded, "{done}");
        points.push(awarded);
    }
    points.sort();
    assert_eq!(points, [0, 0, 50]);
    assert_eq!(app.user_points("queued", "qo").await, 50);
}

/// The value of an unlabelled series in `/metrics`.
async fn gauge(app: &TestApp, name: &str) -> f64 {
    let text = app.send(app.client.get(app.url("/metrics"))).await.text;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap()
}

/// The backlog gauges read the store at each scrape: failed events, and
/// the age of the oldest queued one (with no worker here to drain it).
#[tokio::test]
async fn the_backlog_gauges_count_failed_and_queued_events() {
    let app = spawn_custom(
        |d| {
            make_async(d, "rules: [course_completed]");
            std::fs::write(d.join("rules/boom.rhai"), "throw \"boom\"").unwrap();
            set_custom_rules(d, "boom");
        },
        |s| s.workers = 0,
    )
    .await;
    assert_eq!(gauge(&app, "rocket_events_failed").await, 0.0);
    assert_eq!(gauge(&app, "rocket_queue_oldest_age_seconds").await, 0.0);
    for id in ["f1", "f2"] {
        let ev = json!({"event_id": id, "event_type": "course.completed", "user_id": "u"});
        assert_eq!(app.bearer("custom", CUSTOM_TOKEN, &ev).await.status, 500);
    }
    let ev = json!({"event_id": "q1", "event_type": "course.completed", "user_id": "u"});
    assert_eq!(app.bearer("queued", CUSTOM_TOKEN, &ev).await.status, 202);
    assert_eq!(gauge(&app, "rocket_events_failed").await, 2.0);
    let first = gauge(&app, "rocket_queue_oldest_age_seconds").await;
    assert!(first >= 0.0);
    // Ageing: a later scrape reads an older queue (ms resolution).
    let mut scrapes = 0;
    while gauge(&app, "rocket_queue_oldest_age_seconds").await <= first {
        scrapes += 1;
        assert!(scrapes < 100_000, "the queued event never aged");
    }
}
