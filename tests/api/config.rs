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
        stderr.contains(&format!("custom.yaml:{custom_line}: fields.user_id")),
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

#[tokio::test]
async fn a_broken_reload_is_refused_and_the_running_config_keeps_serving() {
    let app = spawn_app().await;
    let p = app.config_dir.join("sources.d/moodle.yaml");
    let good = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, format!("{good}\nnonsense_key: 1\n")).unwrap();
    let r = app
        .send(
            app.client
                .post(app.url("/api/admin/reload"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
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
    let r = app
        .send(
            app.client
                .post(app.url("/api/admin/reload"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
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
