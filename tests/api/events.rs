//! The event log and replay: operators list what arrived (filtered, a page
//! at a time, newest first), see a failed event's error, and score failed
//! events again in bulk, never awarding twice.

use serde_json::{json, Value};

use crate::helpers::*;
use rocket_rewards::pipeline::verify::sign_hex;
use rocket_rewards::store::events::EventFilter;
use rocket_rewards::store::{EventStatus, Store};

/// The custom source with a rule that fails `badge.earned` events.
async fn spawn_flaky() -> TestApp {
    spawn_with(|dir| {
        with_flaky_rule(dir);
    })
    .await
}

async fn custom(app: &TestApp, id: &str, kind: &str, user: &str) -> Resp {
    let ev = json!({"event_id": id, "event_type": kind, "user_id": user, "course_id": id});
    app.bearer("custom", CUSTOM_TOKEN, &ev).await
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect()
}

fn event_id(r: &Resp) -> String {
    let id = r.body["event_id"]
        .as_str()
        .or(r.body["details"]["event_id"].as_str());
    id.unwrap().to_string()
}

#[tokio::test]
async fn the_event_log_lists_newest_first_filters_and_pages_stably() {
    let app = spawn_flaky().await;
    let c1 = event_id(&custom(&app, "c1", "course.completed", "u1").await);
    let c2 = event_id(&custom(&app, "c2", "course.completed", "u2").await);
    let r = custom(&app, "b1", "badge.earned", "u1").await;
    assert_error(&r, 500, "INTERNAL_ERROR");
    let b1 = event_id(&r);
    let r = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 5))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let m1 = event_id(&r);

    let all = app.admin_get("/api/v1/events").await;
    assert_eq!(all.status, 200, "{}", all.text);
    assert_eq!(
        ids(&all.body),
        [m1.clone(), b1.clone(), c2.clone(), c1.clone()]
    );
    assert_eq!(all.body["next_cursor"], Value::Null);
    let moodle = &all.body["items"][0];
    assert_eq!(moodle["source"], "moodle");
    assert_eq!(
        moodle["vendor_event_type"],
        "\\core\\event\\course_completed"
    );
    assert_eq!(moodle["event_type"], "course.completed");
    assert_eq!(moodle["user_id"], "5");
    assert_eq!(moodle["status"], "processed");
    assert_eq!(moodle["points"], 50);
    assert!(moodle["received_at"].as_str().unwrap().ends_with('Z'));
    let failed = &all.body["items"][1];
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"].as_str().unwrap().contains("not today"));

    let get = |q: &'static str| {
        let app = &app;
        async move { app.admin_get(&format!("/api/v1/events?{q}")).await.body }
    };
    assert_eq!(
        ids(&get("source=custom").await),
        [b1.clone(), c2.clone(), c1.clone()]
    );
    assert_eq!(ids(&get("status=failed").await), vec![b1.clone()]);
    assert_eq!(
        ids(&get("status=processed&source=custom").await),
        [c2.clone(), c1.clone()]
    );
    assert_eq!(ids(&get("user_id=u1").await), [b1.clone(), c1.clone()]);
    assert_eq!(
        ids(&get("user_id=u1&source=moodle").await),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&get("event_type=course.completed").await),
        [m1.clone(), c2.clone(), c1.clone()]
    );
    let later = chrono::Utc::now().timestamp() + 60;
    assert!(ids(&app
        .admin_get(&format!("/api/v1/events?since={later}"))
        .await
        .body)
    .is_empty());
    assert_eq!(
        ids(&app
            .admin_get(&format!("/api/v1/events?until={later}"))
            .await
            .body)
        .len(),
        4
    );
    assert!(ids(&get("until=2000-01-01T00:00:00Z").await).is_empty());

    // Pages: a new event between two pages does not shift the second.
    let first = get("limit=2").await;
    assert_eq!(ids(&first), [m1.clone(), b1.clone()]);
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    custom(&app, "c3", "course.completed", "u3").await;
    let second = app
        .admin_get(&format!("/api/v1/events?limit=2&cursor={cursor}"))
        .await
        .body;
    assert_eq!(ids(&second), [c2.clone(), c1.clone()]);
    assert_eq!(second["next_cursor"], Value::Null);

    // One event with its request: the body as received, credentials redacted.
    let one = app.admin_get(&format!("/api/v1/events/{m1}")).await;
    assert_eq!(one.status, 200, "{}", one.text);
    let request = &one.body["request"];
    assert_eq!(request["headers"]["authorization"], "[redacted]");
    assert_eq!(request["headers"]["content-type"], "application/json");
    let body: Value = serde_json::from_str(request["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, moodle_completion(1, 5));
    assert!(!one.text.contains(MOODLE_TOKEN));
    let body = learnworlds_completion("lw-1");
    let r = app.signed("learnworlds", LEARNWORLDS_SECRET, &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let signature = sign_hex(LEARNWORLDS_SECRET.as_bytes(), &body);
    let one = app
        .admin_get(&format!("/api/v1/events/{}", event_id(&r)))
        .await;
    assert!(!one.text.contains(&signature), "{}", one.text);
    assert!(one.text.contains("[redacted]"), "{}", one.text);
    // A query token copied into a header by a proxy is redacted too.
    let r = app
        .send(
            app.client
                .post(app.url(&format!(
                    "/api/public/hook/moodle/event?token={MOODLE_TOKEN}"
                )))
                .header(
                    "x-original-uri",
                    format!("/api/public/hook/moodle/event?token={MOODLE_TOKEN}"),
                )
                .json(&moodle_completion(2, 5)),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let one = app
        .admin_get(&format!("/api/v1/events/{}", event_id(&r)))
        .await;
    assert_eq!(
        one.body["request"]["headers"]["x-original-uri"],
        "[redacted]"
    );
    assert!(!one.text.contains(MOODLE_TOKEN), "{}", one.text);

    assert_error(
        &app.admin_get("/api/v1/events?status=lost").await,
        400,
        "INVALID_REQUEST",
    );
    assert_error(
        &app.admin_get("/api/v1/events?cursor=nope").await,
        400,
        "INVALID_REQUEST",
    );
    assert_error(
        &app.admin_get("/api/v1/events?since=yesterday").await,
        400,
        "INVALID_REQUEST",
    );
    let anonymous = app.send(app.client.get(app.url("/api/v1/events"))).await;
    assert_eq!(anonymous.status, 401);
}

async fn replay(app: &TestApp, body: Value) -> Resp {
    let r = app.replay(&body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r
}

/// The operator's story: failed events of one source, fixed rule, one
/// replay call for all of them (two at once here), none awarded twice.
#[tokio::test]
async fn replay_scores_failed_events_once_and_leaves_processed_ones_alone() {
    let app = spawn_flaky().await;
    for i in 0..3 {
        assert_eq!(
            custom(&app, &format!("b{i}"), "badge.earned", "u1")
                .await
                .status,
            500
        );
    }
    let done = event_id(&custom(&app, "c1", "course.completed", "u1").await);
    assert_eq!(app.user_points("custom", "u1").await, 50);
    // Still failing: the replay reports it and changes nothing.
    let r = replay(&app, json!({"source": "custom"})).await;
    assert_eq!(r.body["failed"], 3, "{}", r.text);
    assert!(r.body["items"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("not today"));
    fix_flaky_rule(&app.config_dir);
    assert_eq!(app.reload().await.status, 200);
    let body = json!({"source": "custom", "since": chrono::Utc::now().timestamp() - 3600});
    let (a, b) = tokio::join!(replay(&app, body.clone()), replay(&app, body.clone()));
    let processed = a.body["processed"].as_u64().unwrap() + b.body["processed"].as_u64().unwrap();
    assert_eq!(processed, 3, "{}\n{}", a.text, b.text);
    assert_eq!(app.user_points("custom", "u1").await, 71);
    let stats = app.admin_get("/api/v1/stats").await.body;
    assert_eq!(
        stats["events"],
        json!([
            {"source": "custom", "event_type": "badge.earned", "status": "processed", "count": 3},
            {"source": "custom", "event_type": "course.completed", "status": "processed", "count": 1}
        ])
    );
    // Nothing failed is left; a processed event is skipped unless rescored.
    let again = replay(&app, json!({"source": "custom"})).await;
    assert_eq!(again.body["items"], json!([]));
    let by_id = replay(
        &app,
        json!({"event_ids": [done, "evt_01JZZZZZZZZZZZZZZZZZZZZZZZ"]}),
    )
    .await;
    assert_eq!(by_id.body["skipped"], 2, "{}", by_id.text);
    assert!(by_id.body["items"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("already processed"));
    assert!(by_id.body["items"][1]["reason"]
        .as_str()
        .unwrap()
        .contains("no event"));
    // Rescoring asked for: the course rule changed, the award follows once.
    std::fs::write(
        app.config_dir.join("rules/course_completed.rhai"),
        "if event.event_type == \"course.completed\" { 150 }",
    )
    .unwrap();
    assert_eq!(app.reload().await.status, 200);
    let body = json!({"event_ids": [done], "rescore": true});
    let r = replay(&app, body.clone()).await;
    assert_eq!(r.body["rescored"], 1, "{}", r.text);
    assert_eq!(r.body["points_delta"], 100);
    let r = replay(&app, body).await;
    assert_eq!(r.body["unchanged"], 1, "{}", r.text);
    assert_eq!(app.user_points("custom", "u1").await, 171);
    // Bounded, with a cursor to go on.
    for i in 10..13 {
        custom(&app, &format!("q{i}"), "quiz.failed", "u2").await;
    }
    let page = replay(&app, json!({"status": "processed", "limit": 2})).await;
    assert_eq!(page.body["skipped"], 2);
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let rest = replay(
        &app,
        json!({"status": "processed", "limit": 10, "cursor": cursor}),
    )
    .await;
    assert_eq!(
        rest.body["items"].as_array().unwrap().len(),
        5,
        "{}",
        rest.text
    );
    assert_eq!(rest.body["next_cursor"], Value::Null);
}

/// Every filter of the event log is served by an index: the plan the
/// database picks never scans the events table.
#[tokio::test]
async fn each_event_log_filter_uses_an_index() {
    let app = spawn_app().await;
    let store = Store::connect(&app.database_url).await.unwrap();
    let postgres = app.database_url.starts_with("postgres");
    let filters: Vec<(&str, EventFilter)> = vec![
        ("sqlite_autoindex_events_1", EventFilter::default()),
        (
            "events_source_log",
            EventFilter {
                source: Some("custom".into()),
                ..Default::default()
            },
        ),
        (
            "events_failed_log",
            EventFilter {
                status: Some(EventStatus::Failed),
                ..Default::default()
            },
        ),
        (
            "events_source_log",
            EventFilter {
                source: Some("custom".into()),
                status: Some(EventStatus::Failed),
                event_type: Some("badge.earned".into()),
                ..Default::default()
            },
        ),
        (
            "events_user",
            EventFilter {
                user_id: Some("u1".into()),
                namespaces: vec!["custom".into(), "moodle".into()],
                ..Default::default()
            },
        ),
        (
            "sqlite_autoindex_events_1",
            EventFilter {
                since_ms: Some(1),
                until_ms: Some(2),
                ..Default::default()
            },
        ),
    ];
    for (index, filter) in filters {
        let plan = store.explain_list_events(&filter).await.unwrap();
        if postgres {
            assert!(!plan.contains("Seq Scan on events"), "{filter:?}:\n{plan}");
            assert!(plan.contains("Index"), "{filter:?}:\n{plan}");
        } else {
            assert!(
                plan.contains(index),
                "{filter:?} should use {index}:\n{plan}"
            );
            assert!(
                !plan
                    .lines()
                    .any(|l| l.starts_with("SCAN events") && !l.contains("INDEX")),
                "{filter:?}:\n{plan}"
            );
        }
    }
    store.close().await;
}

/// Rescoring an event with its rules unchanged changes nothing, also for
/// rules that read the learner's history: the event is scored against its
/// history as it was, without itself.
#[tokio::test]
async fn rescoring_an_unchanged_history_rule_changes_nothing() {
    let app = spawn_with(|dir| {
        set_custom_rules(dir, "course_completed, first_course_bonus, lesson_capped");
    })
    .await;
    let course = custom(&app, "c1", "course.completed", "u1").await;
    assert_eq!(course.body["points_awarded"], 75, "{}", course.text);
    let lesson = app
        .bearer(
            "custom",
            CUSTOM_TOKEN,
            &json!({"event_id": "l1", "event_type": "lesson.completed", "user_id": "u1", "object_id": "lesson-1"}),
        )
        .await;
    assert_eq!(lesson.body["points_awarded"], 10, "{}", lesson.text);
    let ids = json!([event_id(&course), event_id(&lesson)]);
    let r = replay(&app, json!({"event_ids": ids, "rescore": true})).await;
    assert_eq!(r.body["unchanged"], 2, "{}", r.text);
    assert_eq!(r.body["points_delta"], 0);
    assert_eq!(app.user_points("custom", "u1").await, 85);
}
