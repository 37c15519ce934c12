//! Secrets as files: a source's token and the admin token rotate through a
//! file with reloads, never a restart; a broken secret file refuses the
//! reload and names the file, not its contents; with watching on, a changed
//! secret file reloads by itself.

use std::path::{Path, PathBuf};

use rocket_rewards::settings::SecretEnv;
use serde_json::json;

use crate::helpers::*;

/// Writes a secret file with mode 600 (what the server asks of them).
fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A copy of the custom source, `filed`, whose token is the file
/// `filed_token` in the secrets directory.
fn filed_source(dir: &Path) {
    let text = std::fs::read_to_string(dir.join("sources.d/custom.yaml")).unwrap();
    let text = text.replace("secret_env: ROCKET_CUSTOM_TOKEN", "secret: filed_token");
    assert!(text.contains("secret: filed_token"));
    std::fs::write(dir.join("sources.d/filed.yaml"), text).unwrap();
}

struct Filed {
    app: TestApp,
    secrets: tempfile::TempDir,
}

impl Filed {
    /// The status `GET /api/admin/sources` answers with `admin` as token.
    async fn sources_status(&self, admin: &str) -> u16 {
        self.app
            .admin_get_as("/api/admin/sources", admin)
            .await
            .status
    }

    fn file(&self, name: &str) -> PathBuf {
        self.secrets.path().join(name)
    }

    async fn post(&self, token: &str, id: &str) -> Resp {
        let ev = json!({"event_id": id, "event_type": "course.completed", "user_id": "f", "course_id": id});
        self.app.bearer("filed", token, &ev).await
    }
}

/// A server whose `filed` source and admin token read files in a secrets
/// directory (the admin token through `ROCKET_ADMIN_TOKEN_FILE`).
async fn spawn_filed(watch: bool) -> Filed {
    let secrets = tempfile::tempdir().unwrap();
    write_secret(&secrets.path().join("filed_token"), "old-token\n");
    write_secret(&secrets.path().join("admin_token"), "admin-old\n");
    let dir = secrets.path().to_path_buf();
    let app = spawn_custom(filed_source, |s| {
        s.watch_config = watch;
        s.secrets = SecretEnv::from_pairs([
            ("ROCKET_CUSTOM_TOKEN", CUSTOM_TOKEN),
            ("ROCKET_TEST_TOKEN", TEST_TOKEN),
            ("ROCKET_SECRETS_DIR", dir.to_str().unwrap()),
            (
                "ROCKET_ADMIN_TOKEN_FILE",
                dir.join("admin_token").to_str().unwrap(),
            ),
        ]);
    })
    .await;
    Filed { app, secrets }
}

#[tokio::test]
async fn a_source_token_rotates_through_a_file_with_reloads_and_no_restart() {
    let f = spawn_filed(false).await;
    assert_eq!(f.post("old-token", "1").await.status, 200);
    assert_error(
        &f.post("new-token", "2").await,
        401,
        "AUTHENTICATION_FAILED",
    );

    // Add the new value and reload: both work.
    write_secret(&f.file("filed_token"), "old-token\nnew-token\n");
    let r = f.app.reload_as("admin-old").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(f.post("old-token", "3").await.status, 200);
    assert_eq!(f.post("new-token", "4").await.status, 200);
    let view = f.app.admin_get_as("/api/admin/sources", "admin-old").await;
    let filed = view.body["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "filed")
        .unwrap()
        .clone();
    assert_eq!(filed["secrets"][0]["from"], "secrets_dir", "{filed}");
    assert_eq!(filed["secrets"][0]["values"], 2);
    assert_eq!(filed["secrets"][0]["configured"], true);
    assert!(filed["secrets"][0]["name"]
        .as_str()
        .unwrap()
        .ends_with("filed_token"));
    assert!(!view.text.contains("old-token") && !view.text.contains("new-token"));

    // Remove the old one and reload: only the new one works.
    write_secret(&f.file("filed_token"), "new-token\n");
    assert_eq!(f.app.reload_as("admin-old").await.status, 200);
    assert_error(
        &f.post("old-token", "5").await,
        401,
        "AUTHENTICATION_FAILED",
    );
    assert_eq!(f.post("new-token", "6").await.status, 200);
    let user = f
        .app
        .send(
            f.app
                .client
                .get(f.app.url("/api/v1/users/filed/f"))
                .bearer_auth("admin-old"),
        )
        .await;
    assert_eq!(user.body["total_points"], 4 * 50, "{}", user.text);
}

#[tokio::test]
async fn the_admin_token_rotates_through_its_file() {
    let f = spawn_filed(false).await;
    assert_eq!(f.sources_status("admin-old").await, 200);
    assert_eq!(f.sources_status("admin-new").await, 401);
    write_secret(&f.file("admin_token"), "admin-old\nadmin-new\n");
    assert_eq!(f.app.reload_as("admin-old").await.status, 200);
    assert_eq!(f.sources_status("admin-old").await, 200);
    assert_eq!(f.sources_status("admin-new").await, 200);
    write_secret(&f.file("admin_token"), "admin-new\n");
    assert_eq!(f.app.reload_as("admin-new").await.status, 200);
    assert_eq!(f.sources_status("admin-old").await, 401);
    assert_eq!(f.sources_status("admin-new").await, 200);
}

#[tokio::test]
async fn a_broken_secret_file_refuses_the_reload_and_the_running_config_keeps_serving() {
    let f = spawn_filed(false).await;
    let path = f.file("filed_token");
    let errors = |r: &Resp| -> String {
        assert_error(r, 400, "CONFIG_INVALID");
        r.text.clone()
    };
    // Readable by others: refused, saying so; the value is never quoted.
    write_secret(&path, "old-token\nleaked-value\n");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let text = errors(&f.app.reload_as("admin-old").await);
    assert!(text.contains("readable by others"), "{text}");
    assert!(
        text.contains("filed_token") && text.contains("filed"),
        "{text}"
    );
    assert!(
        !text.contains("leaked-value") && !text.contains("old-token"),
        "{text}"
    );
    // Empty, then missing.
    write_secret(&path, "\n  \n");
    assert!(errors(&f.app.reload_as("admin-old").await).contains("holds no value"));
    std::fs::remove_file(&path).unwrap();
    assert!(errors(&f.app.reload_as("admin-old").await).contains("does not exist"));
    // The running config still takes the token it loaded.
    assert_eq!(f.post("old-token", "1").await.status, 200);
    // A missing admin token file refuses the reload too (all or nothing).
    write_secret(&path, "old-token\n");
    std::fs::remove_file(f.file("admin_token")).unwrap();
    let text = errors(&f.app.reload_as("admin-old").await);
    assert!(text.contains("admin_token"), "{text}");
    assert_eq!(f.sources_status("admin-old").await, 200);
}

#[tokio::test]
async fn a_server_does_not_start_on_a_missing_secret_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_config(tmp.path());
    filed_source(tmp.path());
    let mut s = rocket_rewards::settings::Settings::new(SecretEnv::from_pairs([(
        "ROCKET_SECRETS_DIR",
        tmp.path().join("nowhere").to_str().unwrap(),
    )]));
    s.listen = "127.0.0.1:0".into();
    s.config_dir = tmp.path().to_path_buf();
    s.database_url = format!("sqlite://{}/x.db", tmp.path().display());
    let err = rocket_rewards::app::spawn(s).await.err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("sources.d/filed.yaml"), "{text}");
    assert!(
        text.contains("filed_token") && text.contains("does not exist"),
        "{text}"
    );
}

#[tokio::test]
async fn with_watching_on_a_changed_secret_file_reloads_by_itself() {
    let f = spawn_filed(true).await;
    write_secret(&f.file("filed_token"), "old-token\nwatched-token\n");
    // The watcher polls every second: wait (up to 30 s) for the new token.
    let mut status = 0;
    for i in 0..300 {
        status = f.post("watched-token", &format!("w{i}")).await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "the changed secret file was never loaded");
    let metrics = f.app.send(f.app.client.get(f.app.url("/metrics"))).await;
    assert!(
        metrics
            .text
            .contains("rocket_config_loads_total{kind=\"watch\",outcome=\"success\"}"),
        "{}",
        metrics.text
    );
}
