//! Several instances on one store behave as one.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn copies_of_one_event_raced_to_two_instances_award_once() {
    let app = spawn_app().await;
    let other = app.sibling().await;
    let payload = serde_json::to_vec(&moodle_completion(9001, 90)).unwrap();
    let post = |url: String| {
        app.client
            .post(url)
            .bearer_auth(MOODLE_TOKEN)
            .header("content-type", "application/json")
            .body(payload.clone())
            .send()
    };
    let mut sends = Vec::new();
    for i in 0..30 {
        let base = if i % 2 == 0 {
            app.url("")
        } else {
            other.url("")
        };
        sends.push(post(format!("{base}/api/public/hook/moodle/event")));
    }
    let mut ids = std::collections::HashSet::new();
    let mut fresh = 0;
    for r in futures_util::future::join_all(sends).await {
        let r = r.unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["points_awarded"], 50);
        ids.insert(body["event_id"].as_str().unwrap().to_string());
        if body.get("duplicate").is_none() {
            fresh += 1;
        }
    }
    assert_eq!(ids.len(), 1, "every copy names one event");
    assert_eq!(
        fresh, 1,
        "one instance stored it, the other saw a duplicate"
    );
    assert_eq!(app.user_points("moodle", "90").await, 50);
    // Both instances read the same totals and leaderboard.
    let other_view = app
        .send(
            app.client
                .get(other.url("/api/v1/users/moodle/90"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(other_view.body["total_points"], 50);
    let ev = json!({"event_id": "x1", "event_type": "lesson.completed", "user_id": "90"});
    let r = app
        .send(
            app.client
                .post(other.url("/api/public/hook/custom/event"))
                .bearer_auth(CUSTOM_TOKEN)
                .json(&ev),
        )
        .await;
    assert_eq!(r.status, 200);
    let board = app.admin_get("/api/v1/leaderboard").await;
    let board_other = app
        .send(
            app.client
                .get(other.url("/api/v1/leaderboard"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(board.body, board_other.body);
    other.stop().await;
}

/// Sustained writes keep the SQLite WAL bounded: checkpoints copy it into
/// the database and the writer finishes them once it is full, so the WAL
/// starts over instead of growing with the ledger. 1,500 events in small
/// transactions write well over 20 MB of WAL frames; the file stays near the
/// writer's 2,000-frame limit.
#[tokio::test]
async fn the_sqlite_wal_stays_bounded_under_sustained_writes() {
    let app = spawn_custom(|_| {}, |s| s.rate_limits = false).await;
    let Some(db) = app.database_url.strip_prefix("sqlite://") else {
        return; // PostgreSQL has no WAL file of ours to watch.
    };
    let wal = std::path::PathBuf::from(format!("{db}-wal"));
    let payloads: Vec<Vec<u8>> = (0..1500)
        .map(|i| serde_json::to_vec(&moodle_completion(50_000 + i, i % 97)).unwrap())
        .collect();
    for chunk in payloads.chunks(8) {
        let sends = chunk.iter().map(|p| {
            app.client
                .post(app.url("/api/public/hook/moodle/event"))
                .bearer_auth(MOODLE_TOKEN)
                .header("content-type", "application/json")
                .body(p.clone())
                .send()
        });
        for r in futures_util::future::join_all(sends).await {
            assert_eq!(r.unwrap().status(), 200);
        }
    }
    let size = tokio::task::spawn_blocking(move || std::fs::metadata(&wal).map(|m| m.len()))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(
        size < 16 * 1024 * 1024,
        "the WAL grew to {size} bytes: checkpoints do not keep up"
    );
}

/// A completion re-sent under 40 fresh ids at once, half to each instance:
/// one of them earns the lesson points, whichever commits first (the
/// ledger's once-key settles it inside the write, on either store).
#[tokio::test]
async fn a_completion_raced_under_fresh_ids_to_two_instances_earns_once() {
    let app = spawn_app().await;
    let other = app.sibling().await;
    let mut sends = Vec::new();
    for i in 0..40 {
        let base = if i % 2 == 0 {
            app.url("")
        } else {
            other.url("")
        };
        let body = json!({"id": 7000 + i, "eventname": "\\core\\event\\course_module_completion_updated",
            "relateduserid": 91, "courseid": 7, "contextinstanceid": 45, "other": {"completionstate": 1}});
        sends.push(
            app.client
                .post(format!("{base}/api/public/hook/moodle/event"))
                .bearer_auth(MOODLE_TOKEN)
                .json(&body)
                .send(),
        );
    }
    let mut earned = 0;
    for r in futures_util::future::join_all(sends).await {
        let r = r.unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        earned += body["points_awarded"].as_i64().unwrap();
    }
    assert_eq!(earned, 10, "the answers add up to one award");
    assert_eq!(app.user_points("moodle", "91").await, 10);
    let user = app.admin_get("/api/v1/users/moodle/91").await;
    assert_eq!(user.body["event_count"], 40);
}
