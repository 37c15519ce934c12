//! Crash safety: the real binary under load from several clients, killed
//! with SIGKILL mid-load and restarted, has every acknowledged event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::helpers::*;

fn start(dir: &std::path::Path, db: &str) -> (String, std::process::Child) {
    start_binary(
        dir,
        db,
        &[
            ("ROCKET_MOODLE_TOKEN", MOODLE_TOKEN),
            ("ROCKET_ADMIN_TOKEN", ADMIN_TOKEN),
            ("ROCKET_RATE_LIMITS", "off"),
            ("ROCKET_LOG", "warn,rocket_rewards::app=info"),
        ],
    )
}

#[tokio::test]
// The server is killed and waited for in the test's normal course.
#[allow(clippy::zombie_processes)]
async fn every_acknowledged_event_survives_a_sigkill_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    let db = fresh_database(tmp.path()).await;
    let (dir, db2) = (tmp.path().to_path_buf(), db.clone());
    let (addr, mut server) = tokio::task::spawn_blocking(move || start(&dir, &db2))
        .await
        .unwrap();

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (acked, stop, addr) = (acked.clone(), stop.clone(), addr.clone());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let payload = moodle_completion(c * 1_000_000 + n, n % 97);
                match client
                    .post(format!("http://{addr}/api/public/hook/moodle/event"))
                    .bearer_auth(MOODLE_TOKEN)
                    .json(&payload)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        if let Ok(body) = r.json::<serde_json::Value>().await {
                            if let Some(id) = body["event_id"].as_str() {
                                acked.lock().unwrap().push(id.to_string());
                            }
                        }
                    }
                    // Refused or cut off by the kill: not acknowledged.
                    _ => break,
                }
            }
        }));
    }
    // Kill once a good number of events were acknowledged, mid-load.
    while acked.lock().unwrap().len() < 400 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 400);

    let dir = tmp.path().to_path_buf();
    let (addr, mut server) = tokio::task::spawn_blocking(move || start(&dir, &db))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let mut missing = Vec::new();
    for id in &acked {
        let r = client
            .get(format!("http://{addr}/api/v1/events/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            missing.push(id.clone());
        }
    }
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events lost: {missing:?}",
        missing.len(),
        acked.len()
    );
}

/// The SQLite files deleted under a running server: nothing more is
/// acknowledged (a restart would not find it), hooks answer 503 and
/// readiness says why, instead of 200s that a restart loses.
#[tokio::test]
async fn a_deleted_database_file_stops_acknowledgements() {
    let app = spawn_app().await;
    let Some(db) = app
        .database_url
        .strip_prefix("sqlite://")
        .map(str::to_string)
    else {
        return; // PostgreSQL's files are the server's own business.
    };
    let r = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 1))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db}{suffix}"));
    }
    let r = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(2, 2))
        .await;
    assert_error(&r, 503, "STORE_UNAVAILABLE");
    assert!(r.text.contains("deleted or replaced"), "{}", r.text);
    assert!(!r.text.contains(&db), "no path in the answer: {}", r.text);
    let ready = app.send(app.client.get(app.url("/health/ready"))).await;
    assert_error(&ready, 503, "NOT_READY");
    assert!(ready.text.contains("deleted or replaced"), "{}", ready.text);
}
