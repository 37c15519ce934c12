//! `spawn_app()`: the real server on 127.0.0.1 port 0, a fresh store, the
//! shipped config (or a copy to change), and a client that speaks HTTP to it.
//!
//! The store is a new SQLite file per test, or, when
//! `ROCKET_TEST_POSTGRES_URL` is set (e.g. `postgres://postgres@127.0.0.1:5432`),
//! a new PostgreSQL database per test, named `rr_test_<ulid>`.

use std::path::{Path, PathBuf};

use rocket_rewards::app::{spawn, Running};
use rocket_rewards::pipeline::verify::sign_hex;
use rocket_rewards::settings::{SecretEnv, Settings};
use serde_json::Value;

pub const MOODLE_TOKEN: &str = "moodle-token-0123456789";
pub const OPENLMS_TOKEN: &str = "openlms-token-0123456789";
pub const VALAMIS_TOKEN: &str = "valamis-token-0123456789";
pub const CUSTOM_TOKEN: &str = "custom-token-0123456789";
pub const TEST_TOKEN: &str = "test-token-0123456789";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789";
pub const LEARNWORLDS_SECRET: &str = "learnworlds-secret-0123456789";

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The secrets every test server gets. Thinkific's is left unset on purpose:
/// that source must fail closed.
pub fn secrets() -> SecretEnv {
    SecretEnv::from_pairs([
        ("ROCKET_MOODLE_TOKEN", MOODLE_TOKEN),
        ("ROCKET_OPENLMS_TOKEN", OPENLMS_TOKEN),
        ("ROCKET_VALAMIS_TOKEN", VALAMIS_TOKEN),
        ("ROCKET_CUSTOM_TOKEN", CUSTOM_TOKEN),
        ("ROCKET_TEST_TOKEN", TEST_TOKEN),
        ("ROCKET_ADMIN_TOKEN", ADMIN_TOKEN),
        ("ROCKET_LEARNWORLDS_SECRET", LEARNWORLDS_SECRET),
    ])
}

pub struct TestApp {
    pub server: Running,
    pub client: reqwest::Client,
    pub config_dir: PathBuf,
    pub database_url: String,
    _tmp: tempfile::TempDir,
}

/// A database URL for a fresh store: a new SQLite file, or a new PostgreSQL
/// database when `ROCKET_TEST_POSTGRES_URL` is set.
pub async fn fresh_database(tmp: &Path) -> String {
    match std::env::var("ROCKET_TEST_POSTGRES_URL") {
        Ok(base) if !base.is_empty() => {
            use sqlx::Connection;
            let name = format!("rr_test_{}", ulid::Ulid::new().to_string().to_lowercase());
            let mut conn = sqlx::PgConnection::connect(&base)
                .await
                .expect("connect to PostgreSQL");
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .expect("create test database");
            let (prefix, _) = base
                .rsplit_once('/')
                .filter(|(p, _)| p.contains("//"))
                .unwrap_or((&base, ""));
            format!("{prefix}/{name}")
        }
        _ => format!("sqlite://{}", tmp.join("data").join("rocket.db").display()),
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

/// Starts a server on a copy of the shipped config, after `change` has
/// edited the copy (add a rule, break a file, …).
pub async fn spawn_with(change: impl FnOnce(&Path)) -> TestApp {
    spawn_custom(change, |_| {}).await
}

pub async fn spawn_custom(
    change: impl FnOnce(&Path),
    settings: impl FnOnce(&mut Settings),
) -> TestApp {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config_dir = tmp.path().join("config");
    copy_config(&config_dir);
    change(&config_dir);
    let database_url = fresh_database(tmp.path()).await;
    let mut s = Settings::new(secrets());
    s.listen = "127.0.0.1:0".into();
    s.database_url = database_url.clone();
    s.config_dir = config_dir.clone();
    settings(&mut s);
    let server = spawn(s).await.expect("server starts");
    window_moved(&server).await;
    TestApp {
        server,
        client: reqwest::Client::new(),
        config_dir,
        database_url,
        _tmp: tmp,
    }
}

/// Waits for the server's first move of the leaderboards' seven-day window
/// (a task it starts with), so that tests meet the window where
/// the server puts it and no later move of the task's (a minute on) races
/// theirs.
async fn window_moved(server: &Running) {
    for _ in 0..2000 {
        // Taken again each time: the task moves the start to seven days
        // before its own now, to the minute, never later than seven days
        // before a now taken after the move; a bound taken once, before the
        // move, falls short of it when a minute begins in between.
        let week_ago = chrono::Utc::now().timestamp_millis() - 7 * 86_400_000;
        match server.state.store.recent_window_start().await.unwrap() {
            Some(start) if start > week_ago => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await
            }
            _ => return,
        }
    }
    panic!("the seven-day window did not move in 10 s");
}

/// Copies `sources.d/` and `rules/` of the repo into `to`.
pub fn copy_config(to: &Path) {
    for sub in ["sources.d", "rules"] {
        let dst = to.join(sub);
        std::fs::create_dir_all(&dst).unwrap();
        for entry in std::fs::read_dir(repo_dir().join(sub)).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// A response read whole.
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl TestApp {
    /// Stops the server gracefully and starts a new one on the same store
    /// and config directory.
    pub async fn restart(self) -> TestApp {
        let TestApp {
            server,
            client,
            config_dir,
            database_url,
            _tmp,
        } = self;
        server.stop().await;
        let mut s = Settings::new(secrets());
        s.listen = "127.0.0.1:0".into();
        s.database_url = database_url.clone();
        s.config_dir = config_dir.clone();
        let server = spawn(s).await.expect("server restarts");
        TestApp {
            server,
            client,
            config_dir,
            database_url,
            _tmp,
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// A second server on the same store and config directory (another
    /// instance behind the same load balancer).
    pub async fn sibling(&self) -> Running {
        let mut s = Settings::new(secrets());
        s.listen = "127.0.0.1:0".into();
        s.database_url = self.database_url.clone();
        s.config_dir = self.config_dir.clone();
        spawn(s).await.expect("second instance starts")
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let r = req.send().await.expect("request sent");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body read");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    /// POSTs raw bytes to a source's hook with the given headers.
    pub async fn hook(
        &self,
        source: &str,
        body: impl Into<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = self
            .client
            .post(self.url(&format!("/api/public/hook/{source}/event")))
            .body(body.into());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }

    /// A JSON payload with a bearer token.
    pub async fn bearer(&self, source: &str, token: &str, payload: &Value) -> Resp {
        let auth = format!("Bearer {token}");
        self.hook(
            source,
            serde_json::to_vec(payload).unwrap(),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
        )
        .await
    }

    /// A JSON payload signed like LearnWorlds/Thinkific in the seed.
    pub async fn signed(&self, source: &str, secret: &str, body: &[u8]) -> Resp {
        let sig = format!("sha256={}", sign_hex(secret.as_bytes(), body));
        self.hook(
            source,
            body.to_vec(),
            &[("x-signature", &sig), ("content-type", "application/json")],
        )
        .await
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        self.admin_get_as(path, ADMIN_TOKEN).await
    }

    /// A GET with `admin` as the bearer token.
    pub async fn admin_get_as(&self, path: &str, admin: &str) -> Resp {
        self.send(self.client.get(self.url(path)).bearer_auth(admin))
            .await
    }

    /// `POST /api/admin/reload` with the admin token.
    pub async fn reload(&self) -> Resp {
        self.reload_as(ADMIN_TOKEN).await
    }

    /// `POST /api/admin/reload` with `admin` as the bearer token.
    pub async fn reload_as(&self, admin: &str) -> Resp {
        self.send(
            self.client
                .post(self.url("/api/admin/reload"))
                .bearer_auth(admin),
        )
        .await
    }

    /// `POST /api/admin/events/replay` with the admin token.
    pub async fn replay(&self, body: &Value) -> Resp {
        self.send(
            self.client
                .post(self.url("/api/admin/events/replay"))
                .bearer_auth(ADMIN_TOKEN)
                .json(body),
        )
        .await
    }

    pub async fn user_points(&self, namespace: &str, user: &str) -> i64 {
        let r = self
            .admin_get(&format!("/api/v1/users/{namespace}/{user}"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["total_points"].as_i64().unwrap()
    }
}

pub fn moodle_completion(id: i64, user: i64) -> Value {
    serde_json::json!({
        "id": id,
        "eventname": "\\core\\event\\course_completed",
        "component": "core",
        "action": "completed",
        "target": "course",
        "objectid": 987,
        "userid": user,
        "courseid": 987,
        "timecreated": 1662013333,
        "other": { "completiontime": 1662013333 }
    })
}

pub fn learnworlds_completion(user: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "topic": "course.completed",
        "occurred_at": "2025-08-21T10:15:30Z",
        "data": { "user_id": user, "course_id": "C-987", "progress": 100, "completion_time": "2025-08-21T10:15:30Z" }
    }))
    .unwrap()
}

/// Asserts the one error body with the given status and code.
pub fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["status"], "error", "{}", r.text);
    assert_eq!(r.body["error"], code, "{}", r.text);
    assert_eq!(r.body["error_code"], code, "{}", r.text);
    assert!(r.body["details"].is_object(), "{}", r.text);
    assert!(
        r.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.text
    );
}

/// The binary serving `dir`'s config (`serve`, on port 0) with the given
/// store and environment (secrets included), and its log: every stderr
/// line arrives on `log`; `lines` holds those up to the "listening" one.
pub struct Launched {
    pub child: std::process::Child,
    pub log: std::sync::mpsc::Receiver<String>,
    pub lines: Vec<String>,
    pub addr: String,
}

/// Starts the binary (see [`Launched`]). Blocking: call it from
/// `spawn_blocking` in async tests. The caller kills and waits for the child.
#[allow(clippy::zombie_processes)]
pub fn launch_binary(dir: &Path, db: &str, env: &[(&str, &str)]) -> Launched {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_rocket-rewards"))
        .arg("serve")
        .env_remove("ROCKET_LOG")
        .env("ROCKET_LISTEN", "127.0.0.1:0")
        .env("ROCKET_CONFIG_DIR", dir)
        .env("ROCKET_DATABASE_URL", db)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, log) = std::sync::mpsc::channel::<String>();
    // Reads to the end even when nobody listens, so the pipe never fills.
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
        let line = log
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the server logs that it listens");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        lines.push(line);
        if v["message"] == "listening" {
            break v["addr"].as_str().unwrap().to_string();
        }
    };
    Launched {
        child,
        log,
        lines,
        addr,
    }
}

/// [`launch_binary`] without its log: the address and the child.
pub fn start_binary(dir: &Path, db: &str, env: &[(&str, &str)]) -> (String, std::process::Child) {
    let l = launch_binary(dir, db, env);
    (l.addr, l.child)
}

/// Replaces the custom source's rule list in a config copy.
pub fn set_custom_rules(dir: &Path, rules: &str) {
    let p = dir.join("sources.d/custom.yaml");
    let text = std::fs::read_to_string(&p).unwrap();
    let swapped = text.replace(
        "rules: [course_completed, lesson_completed, quiz_passed]",
        &format!("rules: [{rules}]"),
    );
    assert_ne!(swapped, text, "custom.yaml's rules line changed");
    std::fs::write(&p, swapped).unwrap();
}

/// Gives the custom source a rule that fails `badge.earned` events ("not
/// today") beside `course_completed`.
pub fn with_flaky_rule(dir: &Path) {
    break_flaky_rule(dir);
    set_custom_rules(dir, "course_completed, flaky");
}

/// Makes the rule of [`with_flaky_rule`] fail `badge.earned` events again
/// (reload to apply).
pub fn break_flaky_rule(dir: &Path) {
    std::fs::write(
        dir.join("rules/flaky.rhai"),
        "if event.event_type == \"badge.earned\" { throw \"not today\" }",
    )
    .unwrap();
}

/// Fixes the rule of [`with_flaky_rule`]: `badge.earned` earns 7 (reload
/// to apply).
pub fn fix_flaky_rule(dir: &Path) {
    std::fs::write(
        dir.join("rules/flaky.rhai"),
        "if event.event_type == \"badge.earned\" { 7 }",
    )
    .unwrap();
}

/// Appends `text` to a source's file in a config copy.
pub fn append_to_source(dir: &Path, source: &str, text: &str) {
    let p = dir.join(format!("sources.d/{source}.yaml"));
    let before = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, format!("{before}\n{text}\n")).unwrap();
}
