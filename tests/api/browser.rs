//! The console in a real browser: Debian's `chromium`, headless, driven
//! over the Chrome DevTools protocol against the real server. The page's
//! own script does the work; the test types into fields, submits forms and
//! clicks through `Runtime.evaluate`, and reads what the page shows.
//! With `ROCKET_SCREENSHOTS=DIR` each page is also saved as a PNG there.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Browser {
    child: Child,
    ws: Socket,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where Chromium is. `.ci/run` installs it and sets
/// `ROCKET_REQUIRE_BROWSER`, so there the browser tests never skip.
fn chromium() -> Option<String> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if found.is_some() {
            return found;
        }
    }
    assert!(
        std::env::var_os("ROCKET_REQUIRE_BROWSER").is_none(),
        "chromium is missing; .ci/run installs it"
    );
    None
}

impl Browser {
    async fn launch() -> Option<Browser> {
        let bin = chromium()?;
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let url = tokio::task::spawn_blocking(move || {
            let mut lines = std::io::BufReader::new(stderr).lines();
            let url = lines.by_ref().map_while(Result::ok).find_map(|l| {
                l.split_once("DevTools listening on ")
                    .map(|(_, u)| u.trim().to_string())
            });
            std::thread::spawn(move || lines.for_each(drop));
            url
        })
        .await
        .unwrap()
        .expect("chromium prints its DevTools address");
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut b = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            _profile: profile,
        };
        let target = b
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b.call("Page.enable", json!({})).await;
        Some(b)
    }

    /// Sends a command (to the page once attached) and waits for its answer.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let frame = self.ws.next().await.expect("the browser answers").unwrap();
            let Ok(text) = frame.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap_or_default();
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates JavaScript in the page (promises awaited) and returns its value.
    async fn eval(&mut self, js: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(r["exceptionDetails"].is_null(), "{js}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until the expression is truthy (bounded: the test fails after
    /// about 2000 checks).
    async fn wait_for(&mut self, js: &str) {
        for _ in 0..2000 {
            if self.eval(&format!("!!({js})")).await == json!(true) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let text = self.eval("document.body.innerText").await;
        panic!("never true: {js}\npage:\n{text}");
    }

    async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for("document.readyState === 'complete'").await;
    }

    /// Sets a form field and fires `input` and `change`, as typing would.
    async fn fill(&mut self, selector: &str, value: &str) {
        let js = format!(
            "(() => {{ const e = document.querySelector({s}); e.value = {v}; \
             e.dispatchEvent(new Event('input', {{bubbles: true}})); \
             e.dispatchEvent(new Event('change', {{bubbles: true}})); return true; }})()",
            s = json!(selector),
            v = json!(value)
        );
        self.eval(&js).await;
    }

    async fn click(&mut self, selector: &str) {
        self.eval(&format!(
            "document.querySelector({}).click()",
            json!(selector)
        ))
        .await;
    }

    async fn text(&mut self, selector: &str) -> String {
        let v = self
            .eval(&format!(
                "(document.querySelector({}) || {{}}).innerText || ''",
                json!(selector)
            ))
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Saves the page as `<dir>/console-<name>.png` when `ROCKET_SCREENSHOTS` names a folder.
    async fn screenshot(&mut self, name: &str) {
        let Some(dir) = std::env::var_os("ROCKET_SCREENSHOTS") else {
            return;
        };
        use base64::Engine as _;
        self.eval("window.scrollTo(0, 0)").await;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(
            std::path::Path::new(&dir).join(format!("console-{name}.png")),
            png,
        )
        .unwrap();
    }
}

/// An operator's session: log in, see the shipped sources, score a payload
/// in the playground, find an event after a real delivery with its
/// request, replay a failed one, look a learner up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_works_through_the_console_in_a_real_browser() {
    let app = spawn_with(|dir| {
        with_flaky_rule(dir);
    })
    .await;
    let Some(mut b) = Browser::launch().await else {
        eprintln!("skipped: no chromium on this machine (CI installs it)");
        return;
    };

    // Log in: a wrong token is refused, the right one shows the sources.
    b.goto(&app.url("/console")).await;
    b.wait_for("!document.getElementById('login').hidden").await;
    b.fill("#token", "wrong").await;
    b.eval("document.getElementById('login-form').requestSubmit()")
        .await;
    b.wait_for("document.getElementById('status').innerText.includes('token')")
        .await;
    b.fill("#token", ADMIN_TOKEN).await;
    b.eval("document.getElementById('login-form').requestSubmit()")
        .await;
    b.wait_for("document.querySelectorAll('#sources-rows tr').length >= 6")
        .await;
    let sources = b.text("#sources-rows").await;
    for name in ["moodle", "learnworlds", "thinkific", "valamis", "custom"] {
        assert!(sources.contains(name), "{sources}");
    }

    // The playground scores a pasted payload; nothing is stored.
    b.eval("location.hash = '#playground'").await;
    b.wait_for("!document.getElementById('playground').hidden")
        .await;
    b.fill("#playground-source", "moodle").await;
    b.fill("#payload", &moodle_completion(77, 8).to_string())
        .await;
    b.eval("document.getElementById('playground-form').requestSubmit()")
        .await;
    b.wait_for("document.getElementById('playground-outcome')")
        .await;
    let outcome = b.text("#playground-outcome").await;
    assert!(outcome.contains("50 points"), "{outcome}");
    assert!(outcome.contains("course.completed"), "{outcome}");
    assert!(
        outcome.contains("rocket-rewards send --source moodle"),
        "{outcome}"
    );
    b.screenshot("playground").await;
    assert_eq!(
        app.user_points("moodle", "8").await,
        0,
        "a dry run stores nothing"
    );

    // A real delivery shows in the event log, with its request.
    let r = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(78, 9))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let delivered = r.body["event_id"].as_str().unwrap().to_string();
    b.eval("location.hash = '#events'").await;
    b.fill("#events-source", "moodle").await;
    b.eval("document.getElementById('events-form').requestSubmit()")
        .await;
    let row = format!("#events-rows tr[data-event='{delivered}']");
    b.wait_for(&format!("document.querySelector({})", json!(row)))
        .await;
    b.click(&row).await;
    b.wait_for("!document.getElementById('event-detail').hidden")
        .await;
    let detail = b.text("#event-detail").await;
    assert!(
        detail.contains(&delivered) && detail.contains("[redacted]"),
        "{detail}"
    );
    assert!(!detail.contains(MOODLE_TOKEN));
    b.screenshot("events").await;

    // A failed event, its rule fixed, replayed from the console.
    let ev = json!({"event_id": "b-1", "event_type": "badge.earned", "user_id": "u1"});
    assert_eq!(app.bearer("custom", CUSTOM_TOKEN, &ev).await.status, 500);
    fix_flaky_rule(&app.config_dir);
    assert_eq!(app.reload().await.status, 200);
    b.fill("#events-source", "custom").await;
    b.fill("#events-form select[name=status]", "failed").await;
    b.eval("document.getElementById('events-form').requestSubmit()")
        .await;
    b.wait_for(
        "document.querySelectorAll('#events-rows tr').length === 1 && \
         document.querySelector('#events-rows td.failed')",
    )
    .await;
    b.click("#events-rows tr").await;
    b.wait_for(
        "document.getElementById('event-detail').dataset.event === \
         document.querySelector('#events-rows tr').dataset.event",
    )
    .await;
    assert!(b.text("#event-detail").await.contains("not today"));
    b.click("#replay-one").await;
    b.wait_for("document.getElementById('status').innerText.includes('1 processed')")
        .await;
    assert_eq!(app.user_points("custom", "u1").await, 7);

    // The learner, looked up.
    b.eval("location.hash = '#learners'").await;
    b.wait_for("document.getElementById('learner-namespace').options.length > 0")
        .await;
    b.fill("#learner-namespace", "moodle").await;
    b.fill("#learner-form input[name=user_id]", "9").await;
    b.eval("document.getElementById('learner-form').requestSubmit()")
        .await;
    b.wait_for("document.getElementById('learner-result').innerText.includes('50 points')")
        .await;
    b.eval("document.getElementById('board-form').requestSubmit()")
        .await;
    b.wait_for("document.querySelectorAll('#board-rows tr').length >= 2")
        .await;
    b.screenshot("learners").await;
    // A source dropped in and reloaded: listed, and it scores a payload.
    std::fs::copy(
        app.config_dir.join("sources.d/custom.yaml"),
        app.config_dir.join("sources.d/kajabi.yaml"),
    )
    .unwrap();
    assert_eq!(app.reload().await.status, 200);
    b.goto(&app.url("/console#playground")).await;
    b.wait_for("[...document.querySelectorAll('#playground-source option')].some(o => o.value === 'kajabi')")
        .await;
    b.fill("#playground-source", "kajabi").await;
    b.fill(
        "#payload",
        r#"{"event_id": "k-1", "event_type": "course.completed", "user_id": "k", "course_id": "c"}"#,
    )
    .await;
    b.eval("document.getElementById('playground-form').requestSubmit()")
        .await;
    b.wait_for("(document.getElementById('playground-outcome') || {innerText: ''}).innerText.includes('Source kajabi: 50 points')")
        .await;
    // On a phone's width every page fits: nothing wider than the screen
    // but the tables, which scroll in their own box.
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
    )
    .await;
    for page in ["sources", "events", "playground", "learners"] {
        b.eval(&format!("location.hash = '#{page}'")).await;
        b.wait_for(&format!("!document.getElementById('{page}').hidden"))
            .await;
        let fits = b
            .eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await;
        assert_eq!(fits, json!(true), "{page} is wider than a phone");
    }
    b.screenshot("phone").await;
    b.call("Emulation.clearDeviceMetricsOverride", json!({}))
        .await;
    // The sources again, with the day's events counted.
    b.eval("location.hash = '#sources'").await;
    b.wait_for("document.getElementById('sources-rows').innerText.includes('processed')")
        .await;
    b.screenshot("sources").await;
}

/// The console serves everything it needs itself and says so to the
/// browser: no request leaves for another host.
#[tokio::test]
async fn the_console_serves_its_own_assets() {
    let app = spawn_app().await;
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let r = app.send(app.client.get(app.url(path))).await;
        assert_eq!(r.status, 200);
        let ct = r.headers["content-type"].to_str().unwrap();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        let csp = r.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(
            !r.text.contains("http://") && !r.text.contains("https://"),
            "{path} names another host"
        );
    }
}
