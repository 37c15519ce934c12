//! Follows docs/adding-a-source.md literally: the files it shows are written
//! into a copy of the config directory, then `check`, reload, `send`, and
//! the user's points, all without a rebuild.

use std::process::Command;

use crate::helpers::*;

/// The shell blocks of the guide preceded by `<!-- run -->`.
fn guide_scripts() -> Vec<String> {
    let text = std::fs::read_to_string(repo_dir().join("docs/adding-a-source.md")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line == "<!-- run -->" {
            assert_eq!(
                lines.next(),
                Some("```bash"),
                "a bash block follows the run marker"
            );
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            out.push(body.join("\n") + "\n");
        }
    }
    out
}

/// The blocks of the guide preceded by `<!-- file: PATH -->`.
fn guide_files() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_dir().join("docs/adding-a-source.md")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(path) = line
            .strip_prefix("<!-- file: ")
            .and_then(|r| r.strip_suffix(" -->"))
        {
            let fence = lines.next().unwrap();
            assert!(
                fence.starts_with("```"),
                "a code block follows the file marker"
            );
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            out.push((path.to_string(), body.join("\n") + "\n"));
        }
    }
    out
}

#[tokio::test]
async fn the_guide_adds_a_source_without_a_rebuild_or_a_restart() {
    const SECRET: &str = "talentlms-guide-secret";
    let secrets_dir = tempfile::tempdir().unwrap();
    let dir = secrets_dir.path().to_str().unwrap().to_string();
    let app = spawn_custom(|_| {}, |s| s.secrets.set("ROCKET_SECRETS_DIR", &dir)).await;
    let files = guide_files();
    assert_eq!(
        files.len(),
        3,
        "the guide shows a payload, a source file and a rule"
    );
    // Before: the source does not exist.
    let r = app.hook("talentlms", "{}", &[]).await;
    assert_error(&r, 404, "UNKNOWN_SOURCE");

    // 1 and 2: the files, as the guide shows them.
    let payload_dir = tempfile::tempdir().unwrap();
    let mut payload = None;
    for (path, body) in &files {
        let target = if path.starts_with("examples/") {
            let p = payload_dir.path().join("talentlms.json");
            payload = Some(p.clone());
            p
        } else {
            app.config_dir.join(path)
        };
        std::fs::write(target, body).unwrap();
    }
    // 3: check.
    let check = Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
        .args(["check", "--config-dir"])
        .arg(&app.config_dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        out.contains("pass  talentlms › a course completion earns the course points"),
        "{out}"
    );
    assert!(out.contains(", 0 failed"), "{out}");
    // 4: the secret in a file, then reload.
    let scripts = guide_scripts();
    assert_eq!(scripts.len(), 1, "the guide writes the secret file");
    let run = Command::new("bash")
        .arg("-ec")
        .arg(&scripts[0])
        .env("ROCKET_SECRETS_DIR", &dir)
        .env("TALENTLMS_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let reload = app.reload().await;
    assert_eq!(reload.status, 200, "{}", reload.text);
    // 5: send, then the points.
    let send = tokio::task::spawn_blocking({
        let (config_dir, url, payload) = (app.config_dir.clone(), app.url(""), payload.unwrap());
        let secrets = dir.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
                .args(["send", "--source", "talentlms", "--file"])
                .arg(payload)
                .arg("--url")
                .arg(url)
                .arg("--config-dir")
                .arg(config_dir)
                .env("ROCKET_SECRETS_DIR", secrets)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&send.stdout);
    assert!(
        send.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&send.stderr)
    );
    assert!(out.starts_with("HTTP 200"), "{out}");
    assert!(out.contains("\"points_awarded\":50"), "{out}");
    assert_eq!(app.user_points("talentlms", "4711").await, 50);
}
