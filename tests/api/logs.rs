//! The real binary's logs: one JSON line per hook request, audit lines for
//! refusals, never a secret, a signature or a body; SIGHUP reloads, SIGTERM
//! exits 0.

use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

/// Sends `signal` (`-TERM`, `-HUP`) to the process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// SIGTERM, a clean exit, and the rest of the log.
fn stop_logged(child: &mut Child, rx: &mpsc::Receiver<String>, lines: &mut Vec<String>) {
    signal(child.id(), "-TERM");
    let exit = child.wait().unwrap();
    assert!(exit.success(), "SIGTERM exits 0: {exit:?}");
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        lines.push(line);
    }
}

#[tokio::test]
async fn a_run_logs_each_request_and_refusal_and_never_a_secret() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    let lw = tmp.path().join("sources.d/learnworlds.yaml");
    let text = std::fs::read_to_string(&lw).unwrap();
    std::fs::write(&lw, format!("{text}\nallow_ips: [10.0.0.0/8]\n")).unwrap();
    let secrets = [
        ("ROCKET_MOODLE_TOKEN", MOODLE_TOKEN),
        ("ROCKET_LEARNWORLDS_SECRET", LEARNWORLDS_SECRET),
        ("ROCKET_ADMIN_TOKEN", ADMIN_TOKEN),
        ("ROCKET_TEST_TOKEN", TEST_TOKEN),
    ];
    let db = format!("sqlite://{}/db/x.db", tmp.path().display());
    let Launched {
        mut child,
        log: rx,
        mut lines,
        addr,
    } = launch_binary(
        tmp.path(),
        &db,
        &[&secrets[..], &[("ROCKET_RATE_LIMIT_IP", "5:2")]].concat(),
    );
    let client = reqwest::Client::new();
    let hook = |source: &str| format!("http://{addr}/api/public/hook/{source}/event");
    let marker = "body-marker-never-logged";
    let payload = serde_json::json!({"id": 1, "eventname": "\\core\\event\\course_completed", "userid": 7, "other": {"note": marker}});
    let send = |auth: &'static str| {
        client
            .post(hook("moodle"))
            .header("authorization", auth)
            .json(&payload)
            .send()
    };
    let ok = send(Box::leak(format!("Bearer {MOODLE_TOKEN}").into_boxed_str()))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let bad = send("Bearer not-the-token").await.unwrap();
    assert_eq!(bad.status(), 401);
    let body = learnworlds_completion("U-1");
    let sig = format!(
        "sha256={}",
        rocket_rewards::pipeline::verify::sign_hex(LEARNWORLDS_SECRET.as_bytes(), &body)
    );
    let refused = client
        .post(hook("learnworlds"))
        .header("x-signature", &sig)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let limited = send("Bearer whatever").await.unwrap();
    assert_eq!(
        limited.status(),
        429,
        "the third request from this address to pass the allowlist is over the burst of 2"
    );

    stop_logged(&mut child, &rx, &mut lines);
    let all = lines.join("\n");

    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let hooks: Vec<&Value> = parsed.iter().filter(|v| v["message"] == "hook").collect();
    let statuses: Vec<i64> = hooks
        .iter()
        .map(|v| v["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 401, 403, 429], "{all}");
    for h in &hooks {
        for field in ["source", "status", "latency_ms", "client_ip", "outcome"] {
            assert!(!h[field].is_null(), "{field} in {h}");
        }
        assert_eq!(h["client_ip"], "127.0.0.1");
    }
    assert!(hooks[0]["event_id"].as_str().unwrap().starts_with("evt_"));
    let audit = |reason: &str| {
        parsed.iter().any(|v| {
            v["reason"] == reason
                && v["level"] == "WARN"
                && v["client_ip"] == "127.0.0.1"
                && !v["source"].is_null()
        })
    };
    assert!(audit("mismatch"), "auth failure audited: {all}");
    assert!(audit("ip_not_allowed"), "allowlist refusal audited: {all}");
    assert!(audit("rate_limited"), "rate-limit refusal audited: {all}");
    assert!(parsed.iter().any(|v| v["message"] == "draining"), "{all}");

    for (_, secret) in secrets {
        assert!(!all.contains(secret), "a secret leaked into the logs");
    }
    assert!(!all.contains(&sig[7..]), "a signature leaked into the logs");
    assert!(!all.contains(marker), "a payload leaked into the logs");
    assert!(
        !all.contains("not-the-token"),
        "a presented token leaked into the logs"
    );
}

/// local_webhooks puts its token in the body, and a URL-only webhook form in
/// the query string: neither reaches a log line (at debug level too) nor the
/// stored raw event, which keeps the rest of the body.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_in_the_body_or_the_url_are_never_logged_or_stored() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    let db_file = tmp.path().join("db/x.db");
    let db = format!("sqlite://{}", db_file.display());
    let Launched {
        mut child,
        log: rx,
        mut lines,
        addr,
    } = tokio::task::block_in_place(|| {
        launch_binary(
            tmp.path(),
            &db,
            &[
                ("ROCKET_MOODLE_TOKEN", MOODLE_TOKEN),
                ("ROCKET_LOG", "debug"),
            ],
        )
    });
    let client = reqwest::Client::new();
    let hook = format!("http://{addr}/api/public/hook/moodle/event");
    // local_webhooks' body (lib.php local_webhooks_send_request): the event
    // data, host, token and extra, json_encode'd.
    let body = serde_json::json!({
        "eventname": "\\core\\event\\course_completed", "objectid": 88, "contextinstanceid": 7,
        "userid": 2, "courseid": 7, "relateduserid": 23, "other": {"relateduserid": 23},
        "timecreated": 1717000100, "host": "moodle.example.edu", "token": MOODLE_TOKEN, "extra": null
    });
    let r = client.post(&hook).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = client
        .post(format!("{hook}?token={MOODLE_TOKEN}"))
        .json(&serde_json::json!({"id": 5, "eventname": "\\core\\event\\course_completed", "relateduserid": 24, "courseid": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let wrong = client
        .post(&hook)
        .json(&serde_json::json!({"eventname": "x", "token": "a-wrong-body-token"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    tokio::task::block_in_place(|| stop_logged(&mut child, &rx, &mut lines));
    let all = lines.join("\n");
    assert!(all.contains("\"status\":200"), "{all}");
    assert!(
        all.contains("\"level\":\"DEBUG\""),
        "not at debug level: {all}"
    );
    assert!(
        !all.contains(MOODLE_TOKEN),
        "a token leaked into the logs: {all}"
    );
    assert!(
        !all.contains("a-wrong-body-token"),
        "a presented token leaked into the logs"
    );

    let conn = rusqlite::Connection::open(&db_file).unwrap();
    let raws: Vec<String> = conn
        .prepare("SELECT CAST(raw AS TEXT) FROM events ORDER BY received_at")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(raws.len(), 2);
    for raw in &raws {
        assert!(!raw.contains(MOODLE_TOKEN), "the token was stored: {raw}");
    }
    let stored: Value = serde_json::from_str(&raws[0]).unwrap();
    assert_eq!(
        stored["host"], "moodle.example.edu",
        "the rest of the body is kept"
    );
    assert!(stored.get("token").is_none());
}

/// The next log line `what` accepts (the lines before it are kept too).
fn wait_for(
    rx: &mpsc::Receiver<String>,
    lines: &mut Vec<String>,
    what: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no such line in:\n{}", lines.join("\n")));
        lines.push(line.clone());
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if what(&v) {
                return v;
            }
        }
    }
}

/// SIGHUP reloads the config all or nothing: a broken source file is
/// refused and the running config keeps serving; fixed, the next SIGHUP
/// takes it.
#[tokio::test]
async fn sighup_reloads_the_config_all_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    let db = format!("sqlite://{}/db/x.db", tmp.path().display());
    let Launched {
        mut child,
        log: rx,
        mut lines,
        addr,
    } = launch_binary(tmp.path(), &db, &[("ROCKET_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let pid = child.id();
    let client = reqwest::Client::new();
    let names = || async {
        let r = client
            .get(format!("http://{addr}/api/admin/sources"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        body["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let before = names().await;
    let extra = tmp.path().join("sources.d/extra.yaml");
    let good = "auth: {type: bearer, secret_env: ROCKET_EXTRA_TOKEN}\nevent_type: {paths: $.t}\n";
    std::fs::write(&extra, format!("{good}colour: red\n")).unwrap();
    signal(pid, "-HUP");
    wait_for(&rx, &mut lines, |v| {
        v["kind"] == "sighup" && v["message"] == "config reload refused; keeping the running config"
    });
    assert_eq!(names().await, before, "the running config still serves");
    std::fs::write(&extra, good).unwrap();
    signal(pid, "-HUP");
    let loaded = wait_for(&rx, &mut lines, |v| {
        v["kind"] == "sighup" && v["message"] == "config reloaded"
    });
    assert_eq!(loaded["sources"], before.len() + 1, "{loaded}");
    assert!(names().await.contains(&"extra".to_string()));
    stop_logged(&mut child, &rx, &mut lines);
}
