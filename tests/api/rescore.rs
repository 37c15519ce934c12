//! `rocket-rewards rescore` after a rule change gives the ledger that fresh
//! ingestion of the same events under the new rule gives.

use std::process::Command;

use serde_json::json;

use crate::helpers::*;

async fn ingest_all(app: &TestApp) {
    for (i, user) in [8774, 8775, 8774].iter().enumerate() {
        let r = app
            .bearer(
                "moodle",
                MOODLE_TOKEN,
                &moodle_completion(100 + i as i64, *user),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    for (id, kind, user) in [
        ("a", "lesson.completed", "u1"),
        ("b", "quiz.passed", "u1"),
        ("c", "lesson.completed", "u2"),
        ("d", "badge.earned", "u2"),
    ] {
        let ev = json!({"event_id": id, "event_type": kind, "user_id": user, "course_id": "c9"});
        assert_eq!(app.bearer("custom", CUSTOM_TOKEN, &ev).await.status, 200);
    }
}

fn change_rules(dir: &std::path::Path) {
    let p = dir.join("rules/course_completed.rhai");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("points: 50", "points: 60")).unwrap();
    std::fs::write(
        dir.join("rules/lesson_completed.rhai"),
        "if event.event_type == \"lesson.completed\" { 12 }",
    )
    .unwrap();
}

async fn standings(app: &TestApp) -> serde_json::Value {
    let board = app.admin_get("/api/v1/leaderboard?limit=100").await.body;
    let mut users = Vec::new();
    for (ns, u) in [
        ("moodle", "8774"),
        ("moodle", "8775"),
        ("custom", "u1"),
        ("custom", "u2"),
    ] {
        let r = app.admin_get(&format!("/api/v1/users/{ns}/{u}")).await.body;
        let mut recent: Vec<(String, i64)> = r["recent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["rule"].as_str().unwrap().to_string(),
                    e["points"].as_i64().unwrap(),
                )
            })
            .collect();
        recent.sort();
        users.push(json!([ns, u, r["total_points"], r["event_count"], recent]));
    }
    // Counts and points per day (kept by triggers on SQLite) agree too.
    let stats = app.admin_get("/api/v1/stats").await.body;
    json!({"board": board, "users": users, "stats": stats})
}

/// Runs `rocket-rewards rescore` on the app's config and store; its output,
/// once it has exited successfully.
async fn rescore_cli(app: &TestApp, dry: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rocket-rewards"));
    cmd.arg("rescore")
        .arg("--config-dir")
        .arg(&app.config_dir)
        .arg("--database-url")
        .arg(&app.database_url);
    if dry {
        cmd.arg("--dry-run");
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test]
async fn rescore_after_a_rule_change_equals_fresh_ingestion() {
    let app = spawn_app().await;
    ingest_all(&app).await;
    let before = standings(&app).await;
    change_rules(&app.config_dir);
    let text = rescore_cli(&app, true).await;
    // 8774's second completion of course 987 earned nothing (once per
    // learner and course) and still earns nothing at 60 points.
    assert!(text.contains("7 events checked, 4 would change"), "{text}");
    assert_eq!(standings(&app).await, before, "a dry run writes nothing");

    // While the server serves.
    let text = rescore_cli(&app, false).await;
    assert!(text.contains("4 changed, 0 skipped, points +24"), "{text}");
    assert!(text.contains("50 -> 60 (course_completed 60)"), "{text}");

    let fresh = spawn_with(change_rules).await;
    ingest_all(&fresh).await;
    assert_eq!(standings(&app).await, standings(&fresh).await);
    // Nothing left to change.
    let text = rescore_cli(&app, false).await;
    assert!(text.contains("0 changed"), "{text}");
}

/// Rescoring is a library function: called on a running server's config
/// and store, a dry run lists the changes and writes nothing, and a scope
/// keeps to one source.
#[tokio::test]
async fn the_rescore_function_scopes_and_dry_runs() {
    use rocket_rewards::cli::rescore::{rescore, Summary};
    use rocket_rewards::store::rescore::Selection;
    let app = spawn_app().await;
    ingest_all(&app).await;
    change_rules(&app.config_dir);
    assert_eq!(app.reload().await.status, 200);
    let before = standings(&app).await;
    let state = &app.server.state;
    let config = state.config.load_full();
    let moodle = Selection {
        source: Some("moodle".into()),
        since_ms: None,
    };
    let mut out = Vec::new();
    let dry = rescore(&config, &state.store, &moodle, true, &mut out)
        .await
        .unwrap();
    assert_eq!(
        dry,
        Summary {
            checked: 3,
            changed: 2,
            skipped: 0,
            delta: 20
        },
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out).lines().count(), 2);
    assert_eq!(standings(&app).await, before, "a dry run writes nothing");
    let mut out = Vec::new();
    let done = rescore(&config, &state.store, &moodle, false, &mut out)
        .await
        .unwrap();
    assert_eq!(done, dry);
    assert_eq!(app.user_points("moodle", "8775").await, 60);
    assert_eq!(
        app.user_points("custom", "u1").await,
        10 + 20,
        "another source is left alone"
    );
}
