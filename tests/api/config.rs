//! Config: startup refusal, reload, the sources listing.

use std::process::Command;

use crate::helpers::*;

#[test]
fn serve_refuses_a_broken_config_listing_every_error_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    let moodle = tmp.path().join("sources.d/moodle.yaml");
    let text = std::fs::read_to_string(&moodle).unwrap();
    std::fs::write(
        &moodle,
        text.replace(
            "  course_id: $.courseid",
            "  course_id: $.courseid\n  colour: $.x",
        ),
    )
    .unwrap();
    let custom = tmp.path().join("sources.d/custom.yaml");
    let text = std::fs::read_to_string(&custom).unwrap();
    std::fs::write(
        &custom,
        text.replace("user_id: $.user_id", "user_id: \"$.user[\""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "text"])
        .arg("--config-dir")
        .arg(tmp.path())
        .arg("--database-url")
        .arg(format!("sqlite://{}/x.db", tmp.path().display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("refusing to start"), "{stderr}");
    let moodle_line = std::fs::read_to_string(&moodle)
        .unwrap()
        .lines()
        .position(|l| l.contains("colour"))
        .unwrap()
        + 1;
    assert!(
        stderr.contains(&format!("moodle.yaml:{moodle_line}:")),
        "{stderr}"
    );
    assert!(stderr.contains("colour"), "{stderr}");
    let custom_line = std::fs::read_to_string(&custom)
        .unwrap()
        .lines()
        .position(|l| l.contains("$.user["))
        .unwrap()
        + 1;
    assert!(
        stderr.contains(&format!("custom.yaml:{custom_line}:3: fields.user_id")),
        "{stderr}"
    );
    assert!(!tmp.path().join("x.db").exists(), "nothing was created");
}

#[test]
fn check_passes_on_the_shipped_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
        .arg("check")
        .arg("--config-dir")
        .arg(repo_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("7 sources"), "{stdout}");
}

/// `check` runs away from the secrets: an operator token's missing file is a
/// warning naming the variable, as a source's is, not silently dropped.
#[test]
fn check_warns_of_an_operator_token_file_it_cannot_read() {
    let out = Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
        .arg("check")
        .arg("--config-dir")
        .arg(repo_dir())
        .env("ROCKET_ADMIN_TOKEN_FILE", "/nonexistent/admin-token")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("ROCKET_ADMIN_TOKEN: secret file /nonexistent/admin-token does not exist"),
        "{said}"
    );
}

#[tokio::test]
async fn a_broken_reload_is_refused_and_the_running_config_keeps_serving() {
    let app = spawn_app().await;
    let p = app.config_dir.join("sources.d/moodle.yaml");
    let good = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, format!("{good}\nnonsense_key: 1\n")).unwrap();
    let r = app.reload().await;
    assert_error(&r, 400, "CONFIG_INVALID");
    assert!(
        r.body["details"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("moodle.yaml:"),
        "{}",
        r.text
    );
    let ok = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 1))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    std::fs::write(&p, good).unwrap();
    let r = app.reload().await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn sources_are_listed_without_secrets() {
    let app = spawn_app().await;
    let r = app.admin_get("/api/admin/sources").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let names: Vec<&str> = r.body["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "custom",
            "learnworlds",
            "moodle",
            "openlms",
            "test",
            "thinkific",
            "valamis"
        ]
    );
    let thinkific = r.body["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "thinkific")
        .unwrap();
    assert_eq!(thinkific["configured"], false);
    for secret in [MOODLE_TOKEN, LEARNWORLDS_SECRET, ADMIN_TOKEN, TEST_TOKEN] {
        assert!(!r.text.contains(secret));
    }
}

#[test]
fn check_fails_with_file_and_line_on_a_broken_copy_and_on_a_failing_case() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    let p = tmp.path().join("sources.d/thinkific.yaml");
    let good = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        good.replace(
            "  user_id: [$.payload.user.id, $.payload.user_id]",
            "  user_id: [$.payload.user.id, \"$$bad\"]",
        ),
    )
    .unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
            .args(["check", "--config-dir"])
            .arg(tmp.path())
            .output()
            .unwrap()
    };
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = good
        .lines()
        .position(|l| l.contains("  user_id: [$.payload.user.id"))
        .unwrap()
        + 1;
    assert!(
        stderr.contains(&format!("thinkific.yaml:{line}")),
        "{stderr}"
    );
    assert!(stderr.contains("fields.user_id"), "{stderr}");
    // A case whose expectation is wrong fails the check too.
    std::fs::write(&p, good.replacen("      points: 10", "      points: 11", 1)).unwrap();
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("FAIL  thinkific › the reference lesson completion, signed in X-Signature: expected 11 points, got 10"), "{stdout}");
    assert!(stdout.contains(", 1 failed"), "{stdout}");
}

#[tokio::test]
async fn send_signs_posts_and_honours_retry_after() {
    let app = spawn_with(|dir| {
        append_to_source(
            dir,
            "learnworlds",
            "rate_limit: { per_minute: 60, burst: 1 }",
        )
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let run = |file: std::path::PathBuf| {
        let (dir, url) = (app.config_dir.clone(), app.url(""));
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
                .args([
                    "send",
                    "--source",
                    "learnworlds",
                    "--max-retries",
                    "3",
                    "--file",
                ])
                .arg(file)
                .arg("--url")
                .arg(url)
                .arg("--config-dir")
                .arg(dir)
                .env("ROCKET_LEARNWORLDS_SECRET", LEARNWORLDS_SECRET)
                .output()
                .unwrap()
        })
    };
    let (a, b) = (tmp.path().join("a.json"), tmp.path().join("b.json"));
    std::fs::write(&a, learnworlds_completion("U-a")).unwrap();
    std::fs::write(&b, learnworlds_completion("U-b")).unwrap();
    let first = run(a).await.unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stdout)
    );
    // The source's burst is spent: the next send is told to wait, waits, and gets through.
    let second = run(b).await.unwrap();
    let out = String::from_utf8_lossy(&second.stdout);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{out}{err}");
    assert!(out.starts_with("HTTP 429"), "{out}");
    assert!(out.contains("HTTP 200"), "{out}");
    assert!(
        err.contains("retrying in 1.0 s"),
        "Retry-After is honoured: {err}"
    );
    assert_eq!(app.user_points("learnworlds", "U-b").await, 50);
}

#[tokio::test]
async fn with_watching_on_a_new_source_file_goes_live_by_itself() {
    let app = spawn_custom(|_| {}, |s| s.watch_config = true).await;
    let custom = std::fs::read_to_string(app.config_dir.join("sources.d/custom.yaml")).unwrap();
    std::fs::write(app.config_dir.join("sources.d/watched.yaml"), custom).unwrap();
    let mut live = false;
    for _ in 0..100 {
        let r = app.bearer("watched", CUSTOM_TOKEN, &serde_json::json!({"event_id": "w1", "event_type": "course.completed", "user_id": "w"})).await;
        if r.status == 200 {
            live = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let m = app.send(app.client.get(app.url("/metrics"))).await.text;
    assert!(live, "the new source was loaded without a reload call: {m}");
    assert!(
        m.contains("rocket_config_loads_total{kind=\"watch\",outcome=\"success\"} 1"),
        "{m}"
    );
}

/// `send` is a library function: it signs as the source's scheme says,
/// reports every answer, and retries a 429 after its Retry-After.
#[tokio::test]
async fn the_deliver_function_signs_reports_and_retries() {
    use rocket_rewards::cli::send::{deliver, Delivery};
    let app = spawn_with(|dir| {
        append_to_source(dir, "moodle", "rate_limit: { per_minute: 60, burst: 1 }")
    })
    .await;
    let config = app.server.state.config.load_full();
    let moodle = config.source("moodle").unwrap();
    let delivery = |scheme: usize, id: i64| Delivery {
        url: app.url("/api/public/hook/moodle/event"),
        scheme: &moodle.auth[scheme],
        secret: rocket_rewards::secrets::Secret::new(MOODLE_TOKEN),
        body: serde_json::to_vec(&moodle_completion(id, id)).unwrap(),
        content_type: "application/json".into(),
        max_retries: 2,
        max_wait: std::time::Duration::from_secs(2),
    };
    let mut seen = Vec::new();
    // The body token scheme puts the token into the JSON body.
    let first = deliver(&delivery(1, 1), &mut |a| seen.push(a.status))
        .await
        .unwrap();
    assert_eq!((first.status, first.attempts), (200, 1), "{}", first.body);
    // The burst is spent: a 429, then, after Retry-After, a 200.
    let second = deliver(&delivery(2, 2), &mut |a| seen.push(a.status))
        .await
        .unwrap();
    assert_eq!(
        (second.status, second.attempts),
        (200, 2),
        "{}",
        second.body
    );
    assert_eq!(seen, [200, 429, 200]);
    assert_eq!(app.user_points("moodle", "2").await, 50);
}

/// A source file that is a symlink out of the config folder is refused
/// without a word of the file it points to; one inside the folder may be
/// a symlink, but its errors quote none of it.
#[tokio::test]
async fn a_symlinked_config_file_never_has_its_contents_quoted() {
    let app = spawn_app().await;
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("secret.txt");
    std::fs::write(&target, "name: outside-secret-value\nauth: nope\n").unwrap();
    let link = app.config_dir.join("sources.d/linked.yaml");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let r = app.reload().await;
    assert_error(&r, 400, "CONFIG_INVALID");
    assert!(
        r.text.contains("linked.yaml") && r.text.contains("outside the config folder"),
        "{}",
        r.text
    );
    assert!(!r.text.contains("outside-secret-value"), "{}", r.text);
    std::fs::remove_file(&link).unwrap();
    // Inside the folder: allowed, and a parse error quotes nothing.
    let inside = app.config_dir.join("inside-secret.txt");
    std::fs::write(&inside, "auth: inside-secret-value\n").unwrap();
    std::os::unix::fs::symlink(&inside, &link).unwrap();
    let r = app.reload().await;
    assert_error(&r, 400, "CONFIG_INVALID");
    assert!(r.text.contains("linked.yaml"), "{}", r.text);
    assert!(!r.text.contains("inside-secret-value"), "{}", r.text);
    std::fs::remove_file(&link).unwrap();
    assert_eq!(app.reload().await.status, 200);
}
