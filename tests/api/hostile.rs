//! Rate limits, allowlists, replay protection, TLS and hostile input.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use rocket_rewards::pipeline::limits::RateSpec;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn with_seed_defaults_one_ip_is_limited_after_about_200_quick_requests() {
    let app = spawn_app().await;
    let payload = moodle_completion(1, 1);
    let mut statuses = Vec::new();
    let mut first_429 = None;
    for i in 0..260 {
        let r = app.bearer("moodle", MOODLE_TOKEN, &payload).await;
        assert!(
            r.headers.contains_key("x-ratelimit-limit"),
            "every hook response has the headers"
        );
        assert!(r.headers.contains_key("x-ratelimit-reset"));
        let header = |name: &str| -> u64 { r.headers[name].to_str().unwrap().parse().unwrap() };
        let (limit, remaining) = (header("x-ratelimit-limit"), header("x-ratelimit-remaining"));
        // The per-IP sustained limit, counted down from the first request
        // (the seed's 1000 / 999); the burst above it is not advertised.
        assert_eq!(limit, 100);
        assert!(remaining <= limit);
        if i == 0 {
            assert_eq!(remaining, 99);
        }
        if r.status == 429 && first_429.is_none() {
            first_429 = Some((i, r));
        } else {
            statuses.push(r.status);
        }
    }
    // Answers given before the rate check carry the address's standing too.
    for r in [
        app.bearer("nope", MOODLE_TOKEN, &payload).await,
        app.send(app.client.get(app.url("/api/public/hook/moodle/event")))
            .await,
    ] {
        assert!(r.status == 404 || r.status == 405, "{}", r.text);
        assert_eq!(r.headers["x-ratelimit-limit"], "100", "{}", r.text);
        assert_eq!(r.headers["x-ratelimit-remaining"], "0", "{}", r.text);
    }
    let passed = statuses.iter().filter(|s| **s == 200).count();
    assert!((200..=210).contains(&passed), "{passed} passed");
    let (at, r) = first_429.expect("some requests were limited");
    assert!((200..=210).contains(&at), "first 429 at {at}");
    assert_error(&r, 429, "RATE_LIMITED");
    assert_eq!(r.body["details"]["scope"], "ip");
    assert_eq!(r.headers["x-ratelimit-limit"], "100");
    assert_eq!(r.headers["x-ratelimit-remaining"], "0");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let reset: u64 = r.headers["x-ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(reset > chrono::Utc::now().timestamp() as u64);
}

#[tokio::test]
async fn the_tightest_scope_is_reported_and_each_scope_limits() {
    let app = spawn_custom(
        |dir| {
            append_to_source(dir, "custom", "rate_limit: { per_minute: 1, burst: 3 }");
            append_to_source(
                dir,
                "moodle",
                "event_type_rate_limits:\n  course.completed: { per_minute: 1, burst: 1 }",
            );
        },
        |s| s.rate_global = RateSpec::new(1, 6),
    )
    .await;
    let ev = |i: i32| json!({"event_id": format!("e{i}"), "event_type": "lesson.completed", "user_id": "u"});
    for i in 0..3 {
        let r = app.bearer("custom", CUSTOM_TOKEN, &ev(i)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.headers["x-ratelimit-limit"], "1",
            "the source bucket is the tightest"
        );
        assert_eq!(
            r.headers["x-ratelimit-remaining"], "0",
            "the burst above the sustained limit is not advertised"
        );
    }
    let r = app.bearer("custom", CUSTOM_TOKEN, &ev(3)).await;
    assert_error(&r, 429, "RATE_LIMITED");
    assert_eq!(r.body["details"]["scope"], "source");
    // Per event type: a second course completion is limited, a lesson is not.
    assert_eq!(
        app.bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 1))
            .await
            .status,
        200
    );
    let r = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(2, 1))
        .await;
    assert_error(&r, 429, "RATE_LIMITED");
    assert_eq!(r.body["details"]["scope"], "event_type");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(
        app.user_points("moodle", "1").await,
        50,
        "the limited event was not stored"
    );
    let lesson = json!({"id": 3, "eventname": "\\core\\event\\course_module_completion_updated", "userid": 1});
    assert_eq!(
        app.bearer("moodle", MOODLE_TOKEN, &lesson).await.status,
        200
    );
    // All hooks together: six requests have taken a cell of the global bucket
    // (3 custom, 2 moodle completions, 1 lesson); the source-refused one did not.
    let r = app
        .bearer("openlms", OPENLMS_TOKEN, &moodle_completion(9, 9))
        .await;
    assert_error(&r, 429, "RATE_LIMITED");
    assert_eq!(r.body["details"]["scope"], "global");
    let m = app.send(app.client.get(app.url("/metrics"))).await;
    for scope in ["source", "event_type", "global"] {
        assert!(
            m.text
                .contains(&format!("rocket_rate_limited_total{{scope=\"{scope}\"}} 1")),
            "{scope}: {}",
            m.text
        );
    }
}

#[tokio::test]
async fn rate_limits_can_be_turned_off() {
    let app = spawn_custom(
        |dir| append_to_source(dir, "custom", "rate_limit: { per_minute: 1, burst: 1 }"),
        |s| s.rate_limits = false,
    )
    .await;
    for i in 0..5 {
        let r = app
            .bearer(
                "custom",
                CUSTOM_TOKEN,
                &json!({"event_id": format!("{i}"), "event_type": "x", "user_id": "u"}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(!r.headers.contains_key("x-ratelimit-limit"));
    }
}

#[tokio::test]
async fn an_allowlisted_source_refuses_others_and_trusts_only_configured_proxies() {
    let allow = |dir: &std::path::Path| {
        append_to_source(dir, "moodle", "allow_ips: [10.0.0.0/8, \"2001:db8::/32\"]")
    };
    let direct = spawn_with(allow).await;
    let r = direct
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 1))
        .await;
    assert_error(&r, 403, "IP_NOT_ALLOWED");
    // Without trusted proxies, a forwarded header is ignored.
    let auth = format!("Bearer {MOODLE_TOKEN}");
    let body = serde_json::to_vec(&moodle_completion(1, 1)).unwrap();
    let spoofed = direct
        .hook(
            "moodle",
            body.clone(),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("x-forwarded-for", "10.1.2.3"),
            ],
        )
        .await;
    assert_error(&spoofed, 403, "IP_NOT_ALLOWED");

    let proxied = spawn_custom(allow, |s| {
        s.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        s.rate_ip = RateSpec::new(1, 2);
    })
    .await;
    let via = |xff: &'static str| {
        let (auth, body) = (auth.clone(), body.clone());
        let proxied = &proxied;
        async move {
            proxied
                .hook(
                    "moodle",
                    body,
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                        ("x-forwarded-for", xff),
                    ],
                )
                .await
        }
    };
    assert_eq!(via("10.1.2.3").await.status, 200);
    let v6 = proxied
        .hook(
            "moodle",
            body.clone(),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("forwarded", "for=\"[2001:db8::5]:443\""),
            ],
        )
        .await;
    assert_eq!(v6.status, 200, "{}", v6.text);
    assert_error(&via("192.0.2.1").await, 403, "IP_NOT_ALLOWED");
    // Per-IP limits use the same client address: 10.1.2.3 has one request left, 10.9.9.9 has its own.
    assert_eq!(via("10.1.2.3").await.status, 200);
    assert_error(&via("10.1.2.3").await, 429, "RATE_LIMITED");
    assert_eq!(via("10.9.9.9").await.status, 200);
}

#[tokio::test]
async fn standard_webhooks_signatures_are_accepted_and_replays_refused() {
    use base64::Engine as _;
    let key = b"standard-webhooks-test-key-32byt";
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    let app = spawn_custom(
        |dir| {
            let text = std::fs::read_to_string(dir.join("sources.d/custom.yaml")).unwrap();
            let text = text.replace(
                "auth:\n  - type: bearer\n    secret_env: ROCKET_CUSTOM_TOKEN\n",
                "auth:\n  - type: standard_webhooks\n    secret_env: ROCKET_SW_SECRET\n    tolerance_seconds: 300\n",
            );
            std::fs::write(dir.join("sources.d/sw.yaml"), text).unwrap();
        },
        |s| s.secrets.set("ROCKET_SW_SECRET", secret.clone()),
    )
    .await;
    let body = br#"{"event_id":"sw-1","event_type":"course.completed","user_id":"u-sw"}"#;
    let post = |id: &str, ts: i64| {
        let content = [id.as_bytes(), b".", ts.to_string().as_bytes(), b".", body].concat();
        let sig = hex::decode(rocket_rewards::pipeline::verify::sign_hex(key, &content)).unwrap();
        let sig = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(sig)
        );
        app.send(
            app.client
                .post(app.url("/api/public/hook/sw/event"))
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sig)
                .header("content-type", "application/json")
                .body(body.to_vec()),
        )
    };
    let now = chrono::Utc::now().timestamp();
    let r = post("msg_1", now).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["points_awarded"], 50);
    let replay = post("msg_1", now - 3600).await;
    assert_error(&replay, 401, "AUTHENTICATION_FAILED");
    let future = post("msg_1", now + 3600).await;
    assert_error(&future, 401, "AUTHENTICATION_FAILED");
}

#[tokio::test]
async fn tls_serves_https_with_hsts() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let app = spawn_custom(
        |_| {},
        |s| {
            s.tls = Some(rocket_rewards::settings::TlsFiles {
                cert: cert_path.clone(),
                key: key_path.clone(),
            })
        },
    )
    .await;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", app.server.addr)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/health/live", app.server.addr.port());
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    // Plain HTTP to the TLS port gets no HTTP answer.
    assert!(app
        .client
        .get(app.url("/health/live"))
        .send()
        .await
        .is_err());
}

/// Writes raw bytes to the server and reads what it answers until it closes.
fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn hostile_bodies_get_a_4xx_in_the_error_body() {
    let app = spawn_custom(|_| {}, |s| s.body_timeout = Duration::from_secs(1)).await;
    let auth = format!("Bearer {MOODLE_TOKEN}");
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "duplicate keys",
            br#"{"id":1,"eventname":"x","userid":1,"userid":2}"#.to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "raw NUL byte",
            b"{\"id\":1,\"eventname\":\"x\0\",\"userid\":1}".to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "escaped NUL in an id",
            br#"{"id":1,"eventname":"x","userid":"a\u0000b"}"#.to_vec(),
            "VALIDATION_ERROR",
        ),
        (
            "huge number",
            b"{\"id\":1e400,\"eventname\":\"x\",\"userid\":1}".to_vec(),
            "INVALID_PAYLOAD",
        ),
        (
            "huge integer id",
            b"{\"id\":123456789012345678901234567890,\"eventname\":\"x\",\"userid\":1}".to_vec(),
            "VALIDATION_ERROR",
        ),
        (
            "deep nesting",
            format!("{{\"a\":{}}}", "[".repeat(100_000)).into_bytes(),
            "INVALID_PAYLOAD",
        ),
        ("zero bytes", Vec::new(), "INVALID_PAYLOAD"),
        (
            "invalid UTF-8",
            b"{\"id\":\"\xff\xfe\"}".to_vec(),
            "INVALID_PAYLOAD",
        ),
    ];
    for (name, body, code) in cases {
        let r = app.hook("moodle", body, &h).await;
        assert_eq!(r.body["error"], code, "{name}: {}", r.text);
        assert_error(&r, 400, code);
    }
    // A body shorter than its declared length: the read times out with a 408.
    let addr = app.server.addr;
    let lying = tokio::task::spawn_blocking(move || {
        raw_exchange(
            addr,
            format!(
                "POST /api/public/hook/moodle/event HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {MOODLE_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"id\":1}}"
            )
            .as_bytes(),
        )
    })
    .await
    .unwrap();
    assert!(lying.starts_with("HTTP/1.1 408"), "{lying}");
    assert!(lying.contains("REQUEST_TIMEOUT"), "{lying}");
}

#[tokio::test]
async fn slow_or_oversized_headers_close_the_connection() {
    let app = spawn_custom(
        |_| {},
        |s| {
            s.conn.header_timeout = Duration::from_secs(1);
            s.conn.max_header_bytes = 8 * 1024;
        },
    )
    .await;
    let addr = app.server.addr;
    // Headers that never finish: the connection is closed without an answer.
    let slow = tokio::task::spawn_blocking(move || {
        raw_exchange(addr, b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    })
    .await
    .unwrap();
    assert!(!slow.contains("200 OK"), "{slow}");
    // A head over the limit is refused.
    let big = format!(
        "GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let refused = tokio::task::spawn_blocking(move || raw_exchange(addr, big.as_bytes()))
        .await
        .unwrap();
    assert!(!refused.contains("200 OK"), "{refused}");
    // An ordinary request on the same server still works.
    let ok = app.send(app.client.get(app.url("/health/live"))).await;
    assert_eq!(ok.status, 200);
}

/// Opens a keep-alive connection and completes one request on it.
async fn idle_keep_alive(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s
}

/// Reads until the server closes the connection (or 20 s pass): `true`
/// when it closed.
async fn closed_by_server(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// At the connection cap, the connection idle longest is closed to make
/// room: a new client is answered while idle keep-alive connections hold
/// every place.
#[tokio::test]
async fn at_the_connection_cap_the_connection_idle_longest_makes_room() {
    let app = spawn_custom(|_| {}, |s| s.conn.max_connections = 2).await;
    let addr = app.server.addr;
    let mut oldest = idle_keep_alive(addr).await;
    let mut newer = idle_keep_alive(addr).await;
    let r = app.send(app.client.get(app.url("/health/live"))).await;
    assert_eq!(r.status, 200, "a new client is served at the cap");
    assert!(
        closed_by_server(&mut oldest).await,
        "the oldest idle one was closed"
    );
    // The newer one is still open and serves another request.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    newer
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    newer.read_to_end(&mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
}

/// Connections in the middle of a request are never closed to make room:
/// a new client waits until one finishes.
#[tokio::test]
async fn busy_connections_are_not_closed_to_make_room() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_custom(|_| {}, |s| s.conn.max_connections = 2).await;
    let addr = app.server.addr;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        busy.push(s);
    }
    // Both have started a request once the first byte is read; a request
    // that gets through proves the server has read them.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    assert!(
        client.get(app.url("/health/live")).send().await.is_err(),
        "a third connection is not served while both are mid-request"
    );
    for s in &mut busy {
        s.write_all(b"Connection: close\r\n\r\n").await.unwrap();
    }
    for s in &mut busy {
        assert!(closed_by_server(s).await);
    }
    let r = app.send(app.client.get(app.url("/health/live"))).await;
    assert_eq!(r.status, 200);
}

/// An HTTP/2 frame header: length, type, flags, stream.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Over HTTP/2 with prior knowledge, a header block that never ends (a
/// HEADERS frame without END_HEADERS, then silence) is closed at the
/// header deadline, as a slow HTTP/1.1 head is, after a first request
/// that completed normally.
#[tokio::test]
async fn an_http2_header_block_that_never_ends_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_custom(|_| {}, |s| s.conn.header_timeout = Duration::from_secs(1)).await;
    let mut s = tokio::net::TcpStream::connect(app.server.addr)
        .await
        .unwrap();
    // HPACK: :method GET, :scheme http, :path /health/live, :authority x.
    let mut block = vec![0x82, 0x86, 0x44, 12];
    block.extend_from_slice(b"/health/live");
    block.extend_from_slice(&[0x41, 1, b'x']);
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
    hello.extend(h2_frame(0x1, 0x4 | 0x1, 1, &block)); // HEADERS, END_HEADERS|END_STREAM
    s.write_all(&hello).await.unwrap();
    // The answer: a HEADERS frame on stream 1 whose block starts with
    // :status 200 (static index 8).
    let mut got = Vec::new();
    let answered = |got: &[u8]| {
        let mut i = 0;
        while i + 9 <= got.len() {
            let len = (usize::from(got[i]) << 16)
                | (usize::from(got[i + 1]) << 8)
                | usize::from(got[i + 2]);
            if got[i + 3] == 0x1 && got.get(i + 9) == Some(&0x88) {
                return true;
            }
            i += 9 + len;
        }
        false
    };
    while !answered(&got) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("an answer over h2")
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    // A second request whose header block never ends.
    s.write_all(&h2_frame(0x1, 0x1, 3, &block[..4]))
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut s).await,
        "an unfinished header block kept the connection open"
    );
}

/// Rate buckets live outside the config: a reload (or a watched file saved
/// again) keeps a source's and an event type's spent cells; only a changed
/// rate starts a bucket afresh.
#[tokio::test]
async fn a_reload_keeps_rate_limit_state_and_a_changed_rate_starts_afresh() {
    let app = spawn_with(|dir| {
        append_to_source(dir, "custom", "rate_limit: { per_minute: 1, burst: 2 }");
        append_to_source(
            dir,
            "moodle",
            "event_type_rate_limits:\n  course.completed: { per_minute: 1, burst: 1 }",
        );
    })
    .await;
    let ev = |i: i32| json!({"event_id": format!("r{i}"), "event_type": "lesson.completed", "user_id": "u"});
    for i in 0..2 {
        assert_eq!(app.bearer("custom", CUSTOM_TOKEN, &ev(i)).await.status, 200);
    }
    assert_eq!(
        app.bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 1))
            .await
            .status,
        200
    );
    assert_eq!(app.reload().await.status, 200);
    let r = app.bearer("custom", CUSTOM_TOKEN, &ev(2)).await;
    assert_error(&r, 429, "RATE_LIMITED");
    assert_eq!(r.body["details"]["scope"], "source");
    let r = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(2, 2))
        .await;
    assert_error(&r, 429, "RATE_LIMITED");
    assert_eq!(r.body["details"]["scope"], "event_type");
    // A new rate for the source: a new bucket.
    let p = app.config_dir.join("sources.d/custom.yaml");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        text.replace("per_minute: 1, burst: 2", "per_minute: 1, burst: 3"),
    )
    .unwrap();
    assert_eq!(app.reload().await.status, 200);
    assert_eq!(app.bearer("custom", CUSTOM_TOKEN, &ev(3)).await.status, 200);
}

/// Behind a trusted proxy, wrong tokens from many forged addresses spend
/// only those addresses' buckets: the source's and the global bucket are
/// spent by requests that passed authentication, so a valid sender still
/// gets through.
#[tokio::test]
async fn strangers_cannot_spend_a_sources_or_the_global_bucket() {
    let app = spawn_custom(
        |dir| append_to_source(dir, "custom", "rate_limit: { per_minute: 1, burst: 3 }"),
        |s| {
            s.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
            s.rate_global = RateSpec::new(1, 3);
        },
    )
    .await;
    let ev = |i: i32| json!({"event_id": format!("s{i}"), "event_type": "lesson.completed", "user_id": "u"});
    for i in 0..40 {
        let r = app
            .send(
                app.client
                    .post(app.url("/api/public/hook/custom/event"))
                    .bearer_auth("a-wrong-token")
                    .header("x-forwarded-for", format!("198.51.100.{}", i % 5))
                    .json(&ev(i)),
            )
            .await;
        assert_error(&r, 401, "AUTHENTICATION_FAILED");
    }
    let r = app.bearer("custom", CUSTOM_TOKEN, &ev(100)).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// Failed admin and test logins are throttled per address: after 20, the
/// address gets 429 (even with the right token) until its bucket refills;
/// another address is not affected.
#[tokio::test]
async fn failed_operator_logins_are_throttled_per_address() {
    let app = spawn_custom(
        |_| {},
        |s| s.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()],
    )
    .await;
    let get = |token: &str, from: &str| {
        app.send(
            app.client
                .get(app.url("/api/admin/sources"))
                .bearer_auth(token)
                .header("x-forwarded-for", from),
        )
    };
    for _ in 0..20 {
        assert_error(
            &get("guess", "203.0.113.7").await,
            401,
            "AUTHENTICATION_FAILED",
        );
    }
    let r = get("guess", "203.0.113.7").await;
    assert_error(&r, 429, "RATE_LIMITED");
    assert_eq!(r.body["details"]["scope"], "login");
    assert!(r.headers.contains_key("retry-after"));
    assert_error(&get(ADMIN_TOKEN, "203.0.113.7").await, 429, "RATE_LIMITED");
    assert_eq!(get(ADMIN_TOKEN, "203.0.113.8").await.status, 200);
    // The dry-run and validation endpoints count failures on the same bucket.
    let dry = app
        .send(
            app.client
                .post(app.url("/api/public/hook/test/event"))
                .bearer_auth("guess")
                .header("x-forwarded-for", "203.0.113.7")
                .json(&json!({"event_type": "lesson.completed", "user_id": "u"})),
        )
        .await;
    assert_error(&dry, 429, "RATE_LIMITED");
}

/// Headers over the limit are answered 431 in the one error body before
/// the connection closes, not just cut off.
#[tokio::test]
async fn oversized_headers_get_a_431() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let mut s = tokio::net::TcpStream::connect(app.server.addr)
        .await
        .unwrap();
    let big = "a".repeat(70 * 1024);
    let head = format!("GET /health/live HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    let _ = s.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_end(&mut answer),
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(text.contains("\"error\":\"HEADERS_TOO_LARGE\""), "{text}");
}

/// A batch costs one rate unit per statement: with a source burst of 5, a
/// 4-statement batch leaves one unit, and the next batch of 3 is a 429
/// (its first unit, paid when it authenticated, is spent).
#[tokio::test]
async fn a_batch_costs_one_rate_unit_per_statement() {
    let app = spawn_with(|dir| {
        append_to_source(dir, "valamis", "rate_limit: { per_minute: 1, burst: 5 }")
    })
    .await;
    let st = |id: String| json!({"id": id, "actor": {"mbox": "mailto:b@x.y"}, "verb": {"id": "http://adlnet.gov/expapi/verbs/experienced"}, "object": {"id": "http://x/1"}});
    let batch = |from: usize, n: usize| {
        json!((from..from + n)
            .map(|i| st(format!("b{i}")))
            .collect::<Vec<_>>())
    };
    // A batch over the burst could never pass: 413, not a wait. The
    // request itself spent one unit.
    let r = app.bearer("valamis", VALAMIS_TOKEN, &batch(20, 6)).await;
    assert_error(&r, 413, "PAYLOAD_TOO_LARGE");
    assert_eq!(r.body["details"]["scope"], "source");
    assert_eq!(r.body["details"]["events"], 6);
    assert_eq!(r.body["details"]["burst"], 5);
    let r = app.bearer("valamis", VALAMIS_TOKEN, &batch(0, 4)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = app.bearer("valamis", VALAMIS_TOKEN, &batch(10, 2)).await;
    assert_error(&r, 429, "RATE_LIMITED");
    assert_eq!(r.body["details"]["scope"], "source");
    assert_eq!(app.user_points("valamis", "mailto:b@x.y").await, 0);
    let stats = app.admin_get("/api/v1/stats").await.body;
    assert_eq!(stats["events"][0]["count"], 4, "{stats}");
}

/// An event type's burst bounds how many events of that type one batch may
/// carry.
#[tokio::test]
async fn a_batch_over_an_event_types_burst_is_too_large() {
    let app = spawn_with(|dir| {
        append_to_source(
            dir,
            "valamis",
            "event_type_rate_limits:\n  xapi.experienced: { per_minute: 60, burst: 2 }",
        )
    })
    .await;
    let st = |i: usize| json!({"id": format!("t{i}"), "actor": {"mbox": "mailto:t@x.y"}, "verb": {"id": "http://adlnet.gov/expapi/verbs/experienced"}, "object": {"id": "http://x/1"}});
    let r = app
        .bearer("valamis", VALAMIS_TOKEN, &json!([st(0), st(1), st(2)]))
        .await;
    assert_error(&r, 413, "PAYLOAD_TOO_LARGE");
    assert_eq!(r.body["details"]["scope"], "event_type", "{}", r.text);
    let r = app
        .bearer("valamis", VALAMIS_TOKEN, &json!([st(0), st(1)]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// Silent connections from one address: past its cap they are closed at
/// once, and those kept are closed when no request starts within the
/// header deadline; a well-behaved client from another address gets its
/// answers throughout.
#[tokio::test]
async fn silent_connections_from_one_address_do_not_shut_others_out() {
    use tokio::io::AsyncReadExt;
    let app = spawn_custom(
        |_| {},
        |s| {
            s.conn.max_connections = 40;
            s.conn.max_connections_per_ip = 10;
            s.conn.header_timeout = std::time::Duration::from_secs(1);
        },
    )
    .await;
    let addr = app.server.addr;
    let mut silent = Vec::new();
    for _ in 0..60 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        silent.push(socket.connect(addr).await.unwrap());
    }
    let r = app.send(app.client.get(app.url("/health/live"))).await;
    assert_eq!(r.status, 200, "another address is answered");
    // Every silent connection ends: over the cap at once, the others at
    // their deadline.
    for s in &mut silent {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a silent connection stayed open: {read:?}"
        );
    }
    let r = app.send(app.client.get(app.url("/health/live"))).await;
    assert_eq!(r.status, 200);
}

/// Rules that hold too much memory or run slowly stop at their limits and
/// fail only their own event, on a runtime with a single worker thread;
/// `/health/live` and an ordinary statement are answered afterwards. (That
/// a slow rule leaves the worker to other tasks while it runs is shown by
/// `scoring::tests::a_slow_run_leaves_the_worker_to_other_tasks`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn greedy_and_slow_rules_fail_only_their_own_event() {
    let app = spawn_with(|dir| {
        std::fs::write(
            dir.join("rules/greedy.rhai"),
            r#"if event.object_id == "http://x/greedy" {
                 let big = "0123456789abcdef"; while big.len < 30000 { big += big; }
                 let keys = #{}; for i in 0..5000 { keys[big + i] = i; }
               } 1"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("rules/slow.rhai"),
            r#"if event.object_id == "http://x/slow" {
                 let s = "x"; for i in 0..16 { s += s; } loop { s.replace("y", "z"); }
               } 1"#,
        )
        .unwrap();
        let p = dir.join("sources.d/valamis.yaml");
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(
            &p,
            text.replace("rules: [xapi_verbs]", "rules: [greedy, slow]"),
        )
        .unwrap();
    })
    .await;
    let st = |id: &str, object: &str| json!({"id": id, "actor": {"mbox": "mailto:g@x.y"}, "verb": {"id": "http://adlnet.gov/expapi/verbs/experienced"}, "object": {"id": object}});
    let r = app
        .bearer("valamis", VALAMIS_TOKEN, &st("g1", "http://x/greedy"))
        .await;
    assert_error(&r, 500, "INTERNAL_ERROR");
    let slow = (0..4).map(|i| {
        let body = st(&format!("s{i}"), "http://x/slow");
        let app = &app;
        async move { app.bearer("valamis", VALAMIS_TOKEN, &body).await }
    });
    for r in futures_util::future::join_all(slow).await {
        assert_error(&r, 500, "INTERNAL_ERROR");
    }
    let live = app.send(app.client.get(app.url("/health/live"))).await;
    assert_eq!(live.status, 200);
    let r = app
        .bearer("valamis", VALAMIS_TOKEN, &st("ok", "http://x/ok"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let stats = app.admin_get("/api/v1/stats").await.body;
    assert_eq!(
        stats["events"],
        json!([
            {"source": "valamis", "event_type": "xapi.experienced", "status": "failed", "count": 5},
            {"source": "valamis", "event_type": "xapi.experienced", "status": "processed", "count": 1}
        ]),
        "{stats}"
    );
}
