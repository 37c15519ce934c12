//! The real binary's logs: one JSON line per hook request, audit lines for
//! refusals, never a secret, a signature or a body; SIGTERM exits 0.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
        .arg("serve")
        .envs(secrets)
        .env("ROCKET_LISTEN", "127.0.0.1:0")
        .env("ROCKET_CONFIG_DIR", tmp.path())
        .env(
            "ROCKET_DATABASE_URL",
            format!("sqlite://{}/db/x.db", tmp.path().display()),
        )
        .env("ROCKET_RATE_LIMIT_IP", "5:2")
        .env_remove("ROCKET_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server logs that it listens");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        lines.push(line);
        if v["message"] == "listening" {
            break v["addr"].as_str().unwrap().to_string();
        }
    };
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

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "SIGTERM exits 0: {exit:?}");
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        lines.push(line);
    }
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
