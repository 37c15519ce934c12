//! Metrics read back after a known sequence, and the drain on shutdown.

use serde_json::json;

use crate::helpers::*;

/// The value of one sample line of the text format, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_exactly_what_happened() {
    let app = spawn_with(|dir| {
        let p = dir.join("sources.d/custom.yaml");
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(
            &p,
            format!("{text}\nrate_limit: {{ per_minute: 1, burst: 4 }}\n"),
        )
        .unwrap();
    })
    .await;
    let first = app.send(app.client.get(app.url("/metrics"))).await;
    assert_eq!(
        first.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let before = first.text;
    assert_eq!(
        sample(
            &before,
            "rocket_config_loads_total{kind=\"startup\",outcome=\"success\"}"
        ),
        1.0
    );
    assert_eq!(sample(&before, "rocket_sources_loaded"), 7.0);
    // Known series exist at zero before their first event, so rate() sees the first one.
    assert!(
        before.contains("rocket_http_requests_total{source=\"moodle\",status=\"500\"} 0"),
        "{before}"
    );

    app.bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 1))
        .await; // 200, 50 points
    app.bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 1))
        .await; // 200, duplicate
    app.bearer("moodle", "wrong", &moodle_completion(2, 1))
        .await; // 401 mismatch
    app.bearer("moodle", MOODLE_TOKEN, &json!({"id": 3})).await; // 400 validation
    app.bearer(
        "moodle",
        MOODLE_TOKEN,
        &json!({"id": 4, "eventname": "\\vendor\\secret_name_xyz", "userid": 1}),
    )
    .await; // 200 unmapped
    app.bearer("nowhere", MOODLE_TOKEN, &json!({})).await; // 404
    for i in 0..5 {
        // a passthrough type from the payload, then the source's burst of 4 runs out
        app.bearer(
            "custom",
            CUSTOM_TOKEN,
            &json!({"event_id": format!("c{i}"), "event_type": "payload_type_abc", "user_id": "u"}),
        )
        .await;
    }
    let after = app.send(app.client.get(app.url("/metrics"))).await.text;
    let expect = [
        (
            "rocket_http_requests_total{source=\"moodle\",status=\"200\"}",
            3.0,
        ),
        (
            "rocket_http_requests_total{source=\"moodle\",status=\"401\"}",
            1.0,
        ),
        (
            "rocket_http_requests_total{source=\"moodle\",status=\"400\"}",
            1.0,
        ),
        (
            "rocket_http_requests_total{source=\"unknown\",status=\"404\"}",
            1.0,
        ),
        (
            "rocket_http_requests_total{source=\"custom\",status=\"200\"}",
            4.0,
        ),
        (
            "rocket_http_requests_total{source=\"custom\",status=\"429\"}",
            1.0,
        ),
        (
            "rocket_http_request_duration_seconds_count{source=\"moodle\"}",
            5.0,
        ),
        (
            "rocket_events_processed_total{event_type=\"course.completed\",source=\"moodle\"}",
            1.0,
        ),
        (
            "rocket_events_processed_total{event_type=\"unmapped\",source=\"moodle\"}",
            1.0,
        ),
        (
            "rocket_events_processed_total{event_type=\"other\",source=\"custom\"}",
            4.0,
        ),
        ("rocket_points_awarded_total{source=\"moodle\"}", 50.0),
        ("rocket_duplicates_total{source=\"moodle\"}", 1.0),
        (
            "rocket_auth_failures_total{reason=\"mismatch\",source=\"moodle\"}",
            1.0,
        ),
        ("rocket_rate_limited_total{scope=\"source\"}", 1.0),
        ("rocket_rate_limit_utilization{scope=\"source\"}", 1.0),
        ("rocket_rule_errors_total{rule=\"course_completed\"}", 0.0),
        ("rocket_store_errors_total", 0.0),
        // Every request answered 200 went through the group-commit writer.
        ("rocket_store_group_commit_requests_sum", 7.0),
    ];
    // (The text format sorts labels by name.)
    for (series, want) in expect {
        assert_eq!(sample(&after, series), want, "{series}\n{after}");
    }
    assert!(
        !after.contains("secret_name_xyz") && !after.contains("payload_type_abc"),
        "payload values never become labels"
    );
    assert!(!after.contains("evt_"), "no event id is a label");
    assert!(after.contains("rocket_process_resident_memory_bytes"));
    assert!(after.contains("rocket_process_open_fds"));

    let reload = app.reload().await;
    assert_eq!(reload.status, 200);
    let reloaded = app.send(app.client.get(app.url("/metrics"))).await.text;
    assert_eq!(
        sample(
            &reloaded,
            "rocket_config_loads_total{kind=\"api\",outcome=\"success\"}"
        ),
        1.0
    );
}

/// The seven-day window's lag is read at each scrape: within the minute the
/// task keeps it to once the server has moved it, and the whole span when a
/// move left it three hours behind.
#[tokio::test]
async fn the_leaderboard_window_lag_is_exported() {
    const SERIES: &str = "rocket_leaderboard_window_lag_seconds";
    let app = spawn_app().await;
    let scrape = || async { app.send(app.client.get(app.url("/metrics"))).await.text };
    let text = scrape().await;
    assert!(
        text.contains(&format!("\n# TYPE {SERIES} gauge\n")),
        "{text}"
    );
    let lag = sample(&text, SERIES);
    assert!((0.0..=60.0).contains(&lag), "{lag}");

    let now = chrono::Utc::now().timestamp_millis();
    let behind = rocket_rewards::window::start_for(now) - 3 * 3_600_000;
    rocket_rewards::window::move_to(&app.server.state, behind)
        .await
        .unwrap();
    let lag = sample(&scrape().await, SERIES);
    assert!((10_800.0..=10_860.0).contains(&lag), "{lag}");
}

/// On SQLite the checkpoint thread reports the WAL it copied (frames at its
/// last pass) and counts failed checkpoints; PostgreSQL has neither series.
#[tokio::test]
async fn the_sqlite_wal_is_reported_by_the_checkpoint_thread() {
    let app = spawn_app().await;
    let sqlite = app.database_url.starts_with("sqlite:");
    app.bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 1))
        .await;
    // The checkpoint runs on its own thread shortly after the commit: wait
    // for it (bounded), then check what it reported.
    let mut text = String::new();
    for _ in 0..200 {
        text = app.send(app.client.get(app.url("/metrics"))).await.text;
        if !sqlite || sample(&text, "rocket_store_wal_frames") > 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if sqlite {
        assert!(
            sample(&text, "rocket_store_wal_frames") > 0.0,
            "no checkpoint reported the WAL\n{text}"
        );
        assert!(
            text.contains("rocket_store_checkpoint_failures_total 0"),
            "{text}"
        );
    } else {
        assert!(!text.contains("rocket_store_wal_frames"), "{text}");
        assert!(
            !text.contains("rocket_store_checkpoint_failures_total"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight() {
    let app = spawn_app().await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Vec<u8>, std::io::Error>>();
    let rx = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let body = serde_json::to_vec(&moodle_completion(77, 7)).unwrap();
    let (head, tail) = body.split_at(10);
    tx.send(Ok(head.to_vec())).unwrap();
    let request = app
        .client
        .post(app.url("/api/public/hook/moodle/event"))
        .bearer_auth(MOODLE_TOKEN)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(rx))
        .send();
    let in_flight = tokio::spawn(request);
    // Let the request reach the handler, then start draining.
    tokio::task::yield_now().await;
    let ready_before = app
        .send(app.client.get(app.url("/health/ready")))
        .await
        .status;
    assert_eq!(ready_before, 200);
    let state = app.server.state.clone();
    let stopping = tokio::spawn(app.server.stop());
    while !state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::task::yield_now().await;
    }
    tx.send(Ok(tail.to_vec())).unwrap();
    drop(tx);
    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["points_awarded"], 50);
    stopping.await.unwrap();
}
