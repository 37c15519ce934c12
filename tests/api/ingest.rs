//! The hook: verification, decoding, mapping, scoring, exactly-once storage.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_bearer_moodle_completion_earns_50_points_with_the_seed_response() {
    let app = spawn_app().await;
    let r = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(12345, 8774))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["status"], "success");
    assert_eq!(r.body["points_awarded"], 50);
    assert!(r.body["event_id"].as_str().unwrap().starts_with("evt_"));
    let at = r.body["processed_at"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{at}");
    assert!(r.body.get("duplicate").is_none(), "{}", r.text);
    assert_eq!(app.user_points("moodle", "8774").await, 50);
}

#[tokio::test]
async fn a_signed_learnworlds_completion_earns_50_points() {
    let app = spawn_app().await;
    let r = app
        .signed(
            "learnworlds",
            LEARNWORLDS_SECRET,
            &learnworlds_completion("U-123"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["points_awarded"], 50);
    assert_eq!(app.user_points("learnworlds", "U-123").await, 50);
}

#[tokio::test]
async fn string_ids_and_relateduserid_map_to_the_learner() {
    let app = spawn_app().await;
    let payload = json!({
        "id": "777", "eventname": "\\core\\event\\course_completed",
        "userid": "2", "relateduserid": "8774", "courseid": "987", "timecreated": "1662013333"
    });
    let r = app.bearer("moodle", MOODLE_TOKEN, &payload).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(app.user_points("moodle", "8774").await, 50);
    assert_eq!(app.user_points("moodle", "2").await, 0);
}

#[tokio::test]
async fn a_form_encoded_moodle_delivery_is_accepted() {
    let app = spawn_app().await;
    let body = "id=9194700&eventname=%5Ccore%5Cevent%5Ccourse_module_completion_updated&userid=8774&relateduserid=&courseid=987&objectid=55&timecreated=1662013400&other_completionstate=1";
    let auth = format!("Bearer {MOODLE_TOKEN}");
    let r = app
        .hook(
            "moodle",
            body,
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["points_awarded"], 10);
}

#[tokio::test]
async fn a_redelivery_is_a_duplicate_with_the_first_id_and_points_and_awards_nothing() {
    let app = spawn_app().await;
    let first = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 8774))
        .await;
    let again = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 8774))
        .await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(again.body["event_id"], first.body["event_id"]);
    assert_eq!(again.body["points_awarded"], 50);
    assert_eq!(again.body["processed_at"], first.body["processed_at"]);
    assert_eq!(app.user_points("moodle", "8774").await, 50);
}

#[tokio::test]
async fn acknowledged_events_survive_a_restart() {
    let app = spawn_app().await;
    let first = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(8, 88))
        .await;
    assert_eq!(first.status, 200);
    let app = app.restart().await;
    let again = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(8, 88))
        .await;
    assert_eq!(again.body["duplicate"], true, "{}", again.text);
    assert_eq!(again.body["event_id"], first.body["event_id"]);
    assert_eq!(app.user_points("moodle", "88").await, 50);
}

#[tokio::test]
async fn a_payload_without_an_id_is_deduplicated_by_its_body_hash() {
    let app = spawn_app().await;
    let body = learnworlds_completion("U-9");
    let a = app.signed("learnworlds", LEARNWORLDS_SECRET, &body).await;
    let b = app.signed("learnworlds", LEARNWORLDS_SECRET, &body).await;
    assert_eq!(b.body["duplicate"], true, "{}", b.text);
    assert_eq!(a.body["event_id"], b.body["event_id"]);
    assert_eq!(app.user_points("learnworlds", "U-9").await, 50);
}

#[tokio::test]
async fn forty_concurrent_copies_of_one_event_award_exactly_once() {
    let app = spawn_app().await;
    let payload = moodle_completion(4040, 40);
    let sends = (0..40).map(|_| app.bearer("moodle", MOODLE_TOKEN, &payload));
    let results = futures_util::future::join_all(sends).await;
    let ids: std::collections::HashSet<_> = results
        .iter()
        .map(|r| r.body["event_id"].to_string())
        .collect();
    assert!(results
        .iter()
        .all(|r| r.status == 200 && r.body["points_awarded"] == 50));
    assert_eq!(ids.len(), 1, "all copies name the first event");
    let fresh = results
        .iter()
        .filter(|r| r.body.get("duplicate").is_none())
        .count();
    assert_eq!(fresh, 1, "exactly one copy is not a duplicate");
    assert_eq!(app.user_points("moodle", "40").await, 50);
    let user = app.admin_get("/api/v1/users/moodle/40").await;
    assert_eq!(user.body["recent"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_tampered_body_is_refused_without_echoing_the_signature() {
    let app = spawn_app().await;
    let body = learnworlds_completion("U-1");
    let sig = rocket_rewards::pipeline::verify::sign_hex(LEARNWORLDS_SECRET.as_bytes(), &body);
    let mut tampered = body.clone();
    let pos = tampered.iter().position(|b| *b == b'1').unwrap();
    tampered[pos] = b'2';
    let r = app
        .hook(
            "learnworlds",
            tampered,
            &[
                ("x-signature", &format!("sha256={sig}")),
                ("content-type", "application/json"),
            ],
        )
        .await;
    assert_error(&r, 401, "AUTHENTICATION_FAILED");
    assert!(!r.text.contains(&sig[..16]));
    assert!(!r.text.contains(LEARNWORLDS_SECRET));
    assert_eq!(app.user_points("learnworlds", "U-1").await, 0);
}

#[tokio::test]
async fn every_bad_credential_is_a_401_never_a_500() {
    let app = spawn_app().await;
    let body = learnworlds_completion("U-1");
    let good = rocket_rewards::pipeline::verify::sign_hex(LEARNWORLDS_SECRET.as_bytes(), &body);
    let other = rocket_rewards::pipeline::verify::sign_hex(b"another-source-secret", &body);
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("missing header", vec![]),
        ("empty", vec![("x-signature", String::new())]),
        ("no prefix", vec![("x-signature", good.clone())]),
        ("bad hex", vec![("x-signature", "sha256=xyz".into())]),
        (
            "short",
            vec![("x-signature", format!("sha256={}", &good[..40]))],
        ),
        (
            "long",
            vec![("x-signature", format!("sha256={good}{good}"))],
        ),
        (
            "another source's secret",
            vec![("x-signature", format!("sha256={other}"))],
        ),
        (
            "bearer instead",
            vec![("authorization", format!("Bearer {MOODLE_TOKEN}"))],
        ),
    ];
    for (name, headers) in cases {
        let mut hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        hs.push(("content-type", "application/json"));
        let r = app.hook("learnworlds", body.clone(), &hs).await;
        assert_error(&r, 401, "AUTHENTICATION_FAILED");
        assert!(!r.text.contains(&good[..16]), "{name}");
    }
    for auth in ["Bearer wrong", "Basic abc", "Bearer", "bearer  "] {
        let r = app
            .hook(
                "moodle",
                serde_json::to_vec(&moodle_completion(1, 1)).unwrap(),
                &[
                    ("authorization", auth),
                    ("content-type", "application/json"),
                ],
            )
            .await;
        assert_error(&r, 401, "AUTHENTICATION_FAILED");
    }
    // The token of another bearer source is not this source's.
    let r = app
        .bearer("moodle", OPENLMS_TOKEN, &moodle_completion(1, 1))
        .await;
    assert_error(&r, 401, "AUTHENTICATION_FAILED");
}

#[tokio::test]
async fn a_source_whose_secret_is_unset_fails_closed() {
    let app = spawn_app().await; // ROCKET_THINKIFIC_SECRET is not set
    let body =
        br#"{"id":"t-1","topic":"lesson.completed","payload":{"user":{"id":1},"course_id":2}}"#;
    for secret in ["", "anything"] {
        let r = app.signed("thinkific", secret, body).await;
        assert_error(&r, 401, "AUTHENTICATION_FAILED");
    }
}

#[tokio::test]
async fn an_unknown_source_is_a_404() {
    let app = spawn_app().await;
    let r = app.bearer("blackboard", MOODLE_TOKEN, &json!({})).await;
    assert_error(&r, 404, "UNKNOWN_SOURCE");
}

#[tokio::test]
async fn malformed_payloads_are_400s_in_the_one_error_body() {
    let app = spawn_app().await;
    let auth = format!("Bearer {MOODLE_TOKEN}");
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    for body in [
        &b""[..],
        b"{",
        b"[1,2]",
        b"\"text\"",
        b"\xff\xfe",
        b"null",
        b"1e999",
    ] {
        let r = app.hook("moodle", body.to_vec(), &h).await;
        assert_error(&r, 400, "INVALID_PAYLOAD");
    }
    let deep = "[".repeat(100_000);
    let r = app.hook("moodle", deep, &h).await;
    assert_error(&r, 400, "INVALID_PAYLOAD");
}

#[tokio::test]
async fn a_payload_missing_required_fields_lists_them() {
    let app = spawn_app().await;
    let r = app
        .bearer("moodle", MOODLE_TOKEN, &json!({"id": 1, "courseid": 2}))
        .await;
    assert_error(&r, 400, "VALIDATION_ERROR");
    let mut missing: Vec<String> =
        serde_json::from_value(r.body["details"]["missing_fields"].clone()).unwrap();
    missing.sort();
    assert_eq!(missing, ["event_type", "user_id"]);
    let r = app
        .bearer(
            "moodle",
            MOODLE_TOKEN,
            &json!({"id": 1, "eventname": "x", "userid": {"a": 1}, "timecreated": "soon"}),
        )
        .await;
    assert_error(&r, 400, "VALIDATION_ERROR");
    let mut invalid: Vec<String> =
        serde_json::from_value(r.body["details"]["invalid_fields"].clone()).unwrap();
    invalid.sort();
    assert_eq!(invalid, ["occurred_at", "user_id"]);
}

#[tokio::test]
async fn an_unaccepted_content_type_is_a_415() {
    let app = spawn_app().await;
    let auth = format!("Bearer {MOODLE_TOKEN}");
    let r = app
        .hook(
            "moodle",
            serde_json::to_vec(&moodle_completion(1, 1)).unwrap(),
            &[("authorization", &auth), ("content-type", "text/xml")],
        )
        .await;
    assert_error(&r, 415, "UNSUPPORTED_MEDIA_TYPE");
    // Authentication comes first: a stranger gets 401, whatever the type.
    let r = app
        .hook(
            "moodle",
            serde_json::to_vec(&moodle_completion(1, 1)).unwrap(),
            &[("content-type", "text/xml")],
        )
        .await;
    assert_error(&r, 401, "AUTHENTICATION_FAILED");
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_whether_declared_or_streamed() {
    let app = spawn_with(|dir| {
        let p = dir.join("sources.d/custom.yaml");
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, format!("max_body_bytes: 1024\n{text}")).unwrap();
    })
    .await;
    let auth = format!("Bearer {CUSTOM_TOKEN}");
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
    let r = app
        .hook(
            "custom",
            big.clone(),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
        )
        .await;
    assert_error(&r, 413, "PAYLOAD_TOO_LARGE");
    // Chunked, with no Content-Length to check first.
    let stream = futures_util::stream::iter(
        big.into_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let req = app
        .client
        .post(app.url("/api/public/hook/custom/event"))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream));
    let r = app.send(req).await;
    assert_error(&r, 413, "PAYLOAD_TOO_LARGE");
    // The default limit is 1 MiB.
    let r = app
        .bearer(
            "moodle",
            MOODLE_TOKEN,
            &json!({"pad": "x".repeat(1024 * 1024)}),
        )
        .await;
    assert_error(&r, 413, "PAYLOAD_TOO_LARGE");
}

#[tokio::test]
async fn unmapped_vendor_events_are_stored_with_zero_points() {
    let app = spawn_app().await;
    let r = app
        .bearer(
            "moodle",
            MOODLE_TOKEN,
            &json!({"id": 5, "eventname": "\\mod_forum\\event\\post_created", "userid": 3}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["points_awarded"], 0);
    let ev = app
        .admin_get(&format!(
            "/api/v1/events/{}",
            r.body["event_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(ev.body["status"], "processed");
    assert!(ev.body.get("event_type").is_none() || ev.body["event_type"].is_null());
}

#[tokio::test]
async fn an_xapi_batch_sums_points_and_lists_each_statement() {
    let app = spawn_app().await;
    let st = |id: &str, verb: &str| {
        json!({
            "id": id,
            "actor": {"account": {"homePage": "https://lms.example.com", "name": "learner-1"}},
            "verb": {"id": format!("http://adlnet.gov/expapi/verbs/{verb}")},
            "object": {"id": format!("https://lms.example.com/act/{id}")},
            "timestamp": "2025-08-21T10:15:30Z"
        })
    };
    let batch = json!([
        st("a1", "passed"),
        st("a2", "completed"),
        st("a3", "experienced")
    ]);
    let r = app.bearer("valamis", VALAMIS_TOKEN, &batch).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["points_awarded"], 45);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["dedupe_key"], "a1");
    assert_eq!(results[0]["points_awarded"], 20);
    // Resending one statement of it is a duplicate of that statement.
    let again = app
        .bearer("valamis", VALAMIS_TOKEN, &st("a2", "completed"))
        .await;
    assert_eq!(again.body["duplicate"], true, "{}", again.text);
    assert_eq!(again.body["event_id"], results[1]["event_id"]);
    assert_eq!(app.user_points("valamis", "learner-1").await, 45);
    // A batch mixing a redelivered statement with a new one: only the new
    // one's points are awarded, and the answer says so.
    let mixed = json!([st("a1", "passed"), st("a4", "completed")]);
    let r = app.bearer("valamis", VALAMIS_TOKEN, &mixed).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["points_awarded"], 25, "{}", r.text);
    assert_eq!(r.body["results"][0]["duplicate"], true);
    assert_eq!(app.user_points("valamis", "learner-1").await, 70);
    // A bad statement refuses the whole batch, naming its index.
    let bad = json!([st("b1", "passed"), {"id": "b2", "verb": {"id": "http://adlnet.gov/expapi/verbs/passed"}}]);
    let r = app.bearer("valamis", VALAMIS_TOKEN, &bad).await;
    assert_error(&r, 400, "VALIDATION_ERROR");
    assert_eq!(r.body["details"]["statement"], 1);
    assert_eq!(app.user_points("valamis", "learner-1").await, 70);
}

/// A batch repeating a failing statement: the second copy re-scores the
/// first inside one transaction, on a store that has never counted a
/// failure. Stats must count one failed event, then one processed.
#[tokio::test]
async fn stats_count_a_failed_statement_repeated_in_its_batch_once() {
    let app = spawn_with(|dir| {
        std::fs::write(dir.join("rules/boom.rhai"), "throw \"boom\"").unwrap();
        let p = dir.join("sources.d/valamis.yaml");
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replace("rules: [xapi_verbs]", "rules: [boom]")).unwrap();
    })
    .await;
    let st = json!({
        "id": "s1",
        "actor": {"account": {"homePage": "https://lms.example.com", "name": "learner-9"}},
        "verb": {"id": "http://adlnet.gov/expapi/verbs/passed"},
        "object": {"id": "https://lms.example.com/act/s1"}
    });
    let r = app
        .bearer("valamis", VALAMIS_TOKEN, &json!([st.clone(), st.clone()]))
        .await;
    assert_error(&r, 500, "INTERNAL_ERROR");
    let counted = |status: &str| json!([{"source": "valamis", "event_type": "xapi.passed", "status": status, "count": 1}]);
    let stats = app.admin_get("/api/v1/stats").await.body;
    assert_eq!(stats["events"], counted("failed"));
    std::fs::write(app.config_dir.join("rules/boom.rhai"), "5").unwrap();
    let reload = app.reload().await;
    assert_eq!(reload.status, 200, "{}", reload.text);
    let r = app.bearer("valamis", VALAMIS_TOKEN, &st).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let stats = app.admin_get("/api/v1/stats").await.body;
    assert_eq!(stats["events"], counted("processed"));
}

#[tokio::test]
async fn a_failing_rule_stores_the_event_as_failed_and_rescores_it_on_redelivery() {
    let app = spawn_with(|dir| {
        with_flaky_rule(dir);
    })
    .await;
    let ev = json!({"event_id": "b-1", "event_type": "badge.earned", "user_id": "u1"});
    let r = app.bearer("custom", CUSTOM_TOKEN, &ev).await;
    assert_error(&r, 500, "INTERNAL_ERROR");
    assert!(!r.text.contains("not today"), "500s are opaque: {}", r.text);
    let id = r.body["details"]["event_id"].as_str().unwrap().to_string();
    let stored = app.admin_get(&format!("/api/v1/events/{id}")).await;
    assert_eq!(stored.body["status"], "failed");
    assert!(stored.body["error"].as_str().unwrap().contains("not today"));
    // Still failing: still 500, nothing awarded.
    let r = app.bearer("custom", CUSTOM_TOKEN, &ev).await;
    assert_error(&r, 500, "INTERNAL_ERROR");
    let counted = |status: &str| json!([{"source": "custom", "event_type": "badge.earned", "status": status, "count": 1}]);
    let stats = app.admin_get("/api/v1/stats").await.body;
    assert_eq!(stats["events"], counted("failed"));
    assert_eq!(stats["points_per_day"], json!([]));
    // The admin fixes the rule and reloads; the redelivery is scored.
    fix_flaky_rule(&app.config_dir);
    let reload = app.reload().await;
    assert_eq!(reload.status, 200, "{}", reload.text);
    let r = app.bearer("custom", CUSTOM_TOKEN, &ev).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["event_id"], id.as_str());
    assert_eq!(r.body["points_awarded"], 7);
    assert!(r.body.get("duplicate").is_none());
    let stored = app.admin_get(&format!("/api/v1/events/{id}")).await;
    assert_eq!(stored.body["status"], "processed");
    // Stats follow the event from failed to processed.
    let stats = app.admin_get("/api/v1/stats").await.body;
    assert_eq!(stats["events"], counted("processed"));
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(
        stats["points_per_day"],
        json!([{"day": today, "points": 7}])
    );
    assert_eq!(stored.body["attempts"], 3);
    assert_eq!(app.user_points("custom", "u1").await, 7);
    let again = app.bearer("custom", CUSTOM_TOKEN, &ev).await;
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(app.user_points("custom", "u1").await, 7);
    // The rule breaks again: a redelivery of the processed event is still
    // the first delivery's answer, and its failed scoring is no rule error.
    break_flaky_rule(&app.config_dir);
    assert_eq!(app.reload().await.status, 200);
    let again = app.bearer("custom", CUSTOM_TOKEN, &ev).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["duplicate"], true);
    let metrics = app.send(app.client.get(app.url("/metrics"))).await.text;
    assert!(
        metrics.contains("\nrocket_rule_errors_total{rule=\"flaky\"} 2\n"),
        "the two failed deliveries only: {metrics}"
    );
}

#[tokio::test]
async fn the_dry_run_scores_with_the_chosen_source_and_stores_nothing() {
    let app = spawn_app().await;
    let payload = serde_json::to_vec(&moodle_completion(99, 501)).unwrap();
    let send = |token: &str, query: &str| {
        app.client
            .post(app.url(&format!("/api/public/hook/test/event{query}")))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(payload.clone())
    };
    let r = app.send(send(TEST_TOKEN, "?as=moodle")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["dry_run"], true);
    assert_eq!(r.body["status"], "success");
    assert!(r.body["event_id"].as_str().unwrap().starts_with("evt_"));
    assert!(r.body["processed_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(r.body["source"], "moodle");
    assert_eq!(r.body["points_awarded"], 50);
    assert_eq!(r.body["events"][0]["event"]["user_id"], "501");
    assert_eq!(r.body["events"][0]["awards"][0]["rule"], "course_completed");
    assert_error(
        &app.send(send("wrong", "?as=moodle")).await,
        401,
        "AUTHENTICATION_FAILED",
    );
    assert_error(
        &app.send(send(MOODLE_TOKEN, "?as=moodle")).await,
        401,
        "AUTHENTICATION_FAILED",
    );
    assert_error(
        &app.send(send(TEST_TOKEN, "?as=nope")).await,
        404,
        "UNKNOWN_SOURCE",
    );
    // The canonical format of the test source itself.
    let canonical = app
        .send(
            app.client
                .post(app.url("/api/public/hook/test/event"))
                .bearer_auth(TEST_TOKEN)
                .json(&json!({"event_type": "lesson.completed", "user_id": "501"})),
        )
        .await;
    assert_eq!(canonical.body["points_awarded"], 10, "{}", canonical.text);
    assert_eq!(canonical.body["source"], "test");
    // Any other payload: the first source whose mapping accepts it.
    let detected = app.send(send(TEST_TOKEN, "")).await;
    assert_eq!(detected.status, 200, "{}", detected.text);
    assert_eq!(detected.body["source"], "moodle");
    assert_eq!(detected.body["points_awarded"], 50);
    // Nothing was stored: the same event ingested for real is new.
    assert_eq!(app.user_points("moodle", "501").await, 0);
    let stats = app.admin_get("/api/v1/stats").await;
    assert_eq!(stats.body["events"], json!([]), "{}", stats.text);
    let real = app
        .bearer("moodle", MOODLE_TOKEN, &moodle_completion(99, 501))
        .await;
    assert!(real.body.get("duplicate").is_none(), "{}", real.text);
}

#[tokio::test]
async fn validate_maps_a_payload_or_lists_what_is_wrong() {
    let app = spawn_app().await;
    let post = |token: &str, source: &str, body: serde_json::Value| {
        app.client
            .post(app.url(&format!("/api/public/validate/webhook?source={source}")))
            .bearer_auth(token)
            .json(&body)
    };
    let ok = app
        .send(post(TEST_TOKEN, "moodle", moodle_completion(5, 6)))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.body["valid"], true);
    assert_eq!(ok.body["events"][0]["event_type"], "course.completed");
    let ok_admin = app
        .send(post(ADMIN_TOKEN, "moodle", moodle_completion(5, 6)))
        .await;
    assert_eq!(ok_admin.status, 200);
    let bad = app.send(post(TEST_TOKEN, "moodle", json!({"id": 1}))).await;
    assert_error(&bad, 400, "VALIDATION_ERROR");
    assert_error(
        &app.send(post("nope", "moodle", json!({}))).await,
        401,
        "AUTHENTICATION_FAILED",
    );
    assert_error(
        &app.send(post(TEST_TOKEN, "nope", json!({}))).await,
        404,
        "UNKNOWN_SOURCE",
    );
    // Without `?source=` (the seed's call): the first mapping that accepts
    // the payload, or the canonical format's errors.
    let detect = |token: &str, body: serde_json::Value| {
        app.client
            .post(app.url("/api/public/validate/webhook"))
            .bearer_auth(token)
            .json(&body)
    };
    let found = app.send(detect(TEST_TOKEN, moodle_completion(5, 6))).await;
    assert_eq!(found.status, 200, "{}", found.text);
    assert_eq!(found.body["source"], "moodle");
    assert_eq!(found.body["events"][0]["user_id"], "6");
    let none = app.send(detect(TEST_TOKEN, json!({"hello": 1}))).await;
    assert_error(&none, 400, "VALIDATION_ERROR");
    assert_error(
        &app.send(detect("nope", json!({}))).await,
        401,
        "AUTHENTICATION_FAILED",
    );
    assert_eq!(app.user_points("moodle", "6").await, 0);
}

#[tokio::test]
async fn native_thinkific_and_learnworlds_deliveries_are_accepted_and_tampered_ones_refused() {
    const THINKIFIC: &str = "thinkific-secret-0123";
    let app = spawn_custom(
        |_| {},
        |s| s.secrets.set("ROCKET_THINKIFIC_SECRET", THINKIFIC),
    )
    .await;
    let thinkific = serde_json::to_vec(&json!({
        "id": "20250821000001", "resource": "lesson", "action": "completed", "created_at": "2025-08-21T10:15:30.000Z",
        "payload": {"user": {"id": 55}, "course": {"id": 9}, "lesson": {"id": 3}}
    }))
    .unwrap();
    let sig = rocket_rewards::pipeline::verify::sign_hex(THINKIFIC.as_bytes(), &thinkific);
    let ok = app
        .hook(
            "thinkific",
            thinkific.clone(),
            &[
                ("x-thinkific-hmac-sha256", &sig),
                ("content-type", "application/json"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.body["points_awarded"], 10);
    let mut tampered = thinkific.clone();
    tampered.extend_from_slice(b" ");
    let bad = app
        .hook(
            "thinkific",
            tampered,
            &[
                ("x-thinkific-hmac-sha256", &sig),
                ("content-type", "application/json"),
            ],
        )
        .await;
    assert_error(&bad, 401, "AUTHENTICATION_FAILED");

    let lw = serde_json::to_vec(&json!({
        "version": 2, "type": "courseCompleted", "trigger": "courseCompleted", "school_id": "s-1",
        "data": {"user": {"id": "lw-user"}, "course": {"id": "lw-course"}}
    }))
    .unwrap();
    let sig = format!(
        "v1={}",
        rocket_rewards::pipeline::verify::sign_hex(LEARNWORLDS_SECRET.as_bytes(), &lw)
    );
    let ok = app
        .hook(
            "learnworlds",
            lw.clone(),
            &[
                ("learnworlds-webhook-signature", &sig),
                ("content-type", "application/json"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(app.user_points("learnworlds", "lw-user").await, 50);
    let wrong_prefix = sig.replace("v1=", "sha256=");
    let bad = app
        .hook(
            "learnworlds",
            lw,
            &[
                ("learnworlds-webhook-signature", &wrong_prefix),
                ("content-type", "application/json"),
            ],
        )
        .await;
    assert_error(&bad, 401, "AUTHENTICATION_FAILED");
}

#[tokio::test]
async fn a_tampered_form_encoded_moodle_delivery_with_a_wrong_token_is_refused() {
    let app = spawn_app().await;
    let body = "id=1&eventname=%5Ccore%5Cevent%5Ccourse_completed&userid=8774";
    let r = app
        .hook(
            "moodle",
            body,
            &[
                ("authorization", "Bearer wrong"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
        )
        .await;
    assert_error(&r, 401, "AUTHENTICATION_FAILED");
}
