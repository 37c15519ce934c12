//! The data lifecycle: erasing a learner, retention, backup and restore.

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
