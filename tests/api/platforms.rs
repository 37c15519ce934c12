//! Deliveries as the real platforms send them, through the shipped config:
//! Moodle's Event Trigger plugin (no Content-Type), completion states and
//! toggles, LearnWorlds' pre-shared signature, Thinkific's quiz attempts,
//! and Moodle's logstore_xapi posting statements to the LRS-style resource.
//! Where each sample comes from is noted beside it.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::helpers::*;

const THINKIFIC_SECRET: &str = "thinkific-api-key-0123456789";
const LRS_KEY: &str = "moodle-lrs";
const LRS_SECRET: &str = "lrs-secret-0123456789";

/// The shipped config with Thinkific's and the LRS client's secrets set.
async fn spawn_platforms() -> TestApp {
    spawn_custom(
        |_| {},
        |s| {
            s.secrets.set("ROCKET_THINKIFIC_SECRET", THINKIFIC_SECRET);
            s.secrets.set(
                "ROCKET_VALAMIS_LRS_SECRET",
                format!("{LRS_KEY}:{LRS_SECRET}"),
            );
        },
    )
    .await
}

/// A tool_trigger "HTTP request" step's body for a module completion: the
/// admin's template with each value urlencoded, as
/// classes/steps/actions/http_post_action_step.php builds it
/// (catalyst/moodle-tool_trigger), `other` flattened to `other_*` by
/// classes/helper/datafield_manager.php, `{id}` the plugin's event id.
fn tool_trigger_completion(id: u32, cm: u32, state: u8) -> String {
    format!(
        "id={id}&eventname=%5Ccore%5Cevent%5Ccourse_module_completion_updated&userid=23&relateduserid=23\
         &courseid=7&contextinstanceid={cm}&objectid={}&timecreated={}&other_completionstate={state}",
        5000 + id,
        1_717_000_000 + id
    )
}

/// POSTs a body with a bearer token and no Content-Type at all (Guzzle 6,
/// which tool_trigger uses, sends none unless the admin types one).
async fn untyped(app: &TestApp, source: &str, token: &str, body: String) -> Resp {
    let auth = format!("Bearer {token}");
    app.hook(source, body, &[("authorization", &auth)]).await
}

#[tokio::test]
async fn a_tool_trigger_form_post_without_a_content_type_earns_the_lesson_points() {
    let app = spawn_app().await;
    let r = untyped(
        &app,
        "moodle",
        MOODLE_TOKEN,
        tool_trigger_completion(1, 45, 1),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["points_awarded"], 10);
    let ev = app
        .admin_get(&format!(
            "/api/v1/events/{}",
            r.body["event_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(ev.body["canonical"]["object_id"], "45", "{}", ev.text);
    // The same with "JSON encode" on: every value a string, `/` escaped.
    let json_body = r#"{"id":"2","eventname":"\\core\\event\\course_module_completion_updated","relateduserid":"23","courseid":"7","contextinstanceid":"46","timecreated":"1717000002","other_completionstate":"1","site":"https:\/\/moodle.example.edu"}"#;
    let r = untyped(&app, "moodle", MOODLE_TOKEN, json_body.into()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["points_awarded"], 10);
    // Neither JSON nor a form: a clear 400, not a guess.
    let r = untyped(&app, "moodle", MOODLE_TOKEN, "just some text".into()).await;
    assert_error(&r, 400, "INVALID_PAYLOAD");
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("neither JSON nor form data"),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn a_completion_toggled_ten_times_earns_once() {
    let app = spawn_app().await;
    // Ticked (1) and unticked (0) in turn, ten times each, every event with
    // a new id, as Moodle fires course_module_completion_updated.
    for i in 0..20u32 {
        let state = if i % 2 == 0 { 1 } else { 0 };
        let r = untyped(
            &app,
            "moodle",
            MOODLE_TOKEN,
            tool_trigger_completion(100 + i, 45, state),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let want = if i == 0 { 10 } else { 0 };
        assert_eq!(r.body["points_awarded"], want, "toggle {i}: {}", r.text);
    }
    assert_eq!(app.user_points("moodle", "23").await, 10);
    let user = app.admin_get("/api/v1/users/moodle/23").await;
    assert_eq!(
        user.body["event_count"], 20,
        "every toggle is stored: {}",
        user.text
    );
    // Another activity still earns.
    let r = untyped(
        &app,
        "moodle",
        MOODLE_TOKEN,
        tool_trigger_completion(200, 46, 1),
    )
    .await;
    assert_eq!(r.body["points_awarded"], 10);
    assert_eq!(app.user_points("moodle", "23").await, 20);
}

#[tokio::test]
async fn completion_states_earn_by_their_meaning() {
    let app = spawn_app().await;
    // 0 incomplete, 3 and 4 complete with a fail grade: nothing.
    for (id, state) in [(1, 0), (2, 3), (3, 4)] {
        let r = untyped(
            &app,
            "moodle",
            MOODLE_TOKEN,
            tool_trigger_completion(id, 50 + id, state),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["points_awarded"], 0, "state {state}");
    }
    // 2, complete with a pass grade: the lesson points and the quiz pass.
    let r = untyped(
        &app,
        "moodle",
        MOODLE_TOKEN,
        tool_trigger_completion(4, 60, 2),
    )
    .await;
    assert_eq!(r.body["points_awarded"], 30, "{}", r.text);
    // Graded again later (1 then 2 again): nothing more for that activity.
    for (id, state) in [(5, 1), (6, 2)] {
        let r = untyped(
            &app,
            "moodle",
            MOODLE_TOKEN,
            tool_trigger_completion(id, 60, state),
        )
        .await;
        assert_eq!(r.body["points_awarded"], 0, "state {state} again");
    }
    assert_eq!(app.user_points("moodle", "23").await, 30);
}

#[tokio::test]
async fn a_learnworlds_delivery_with_its_pre_shared_signature_earns_the_course_points() {
    let app = spawn_app().await;
    // LearnWorlds developer docs, Webhooks, "When a course is completed"
    // (trimmed of profile fields); the header as documented there.
    let body = json!({
        "version": 2, "type": "courseCompleted", "trigger": "course_completed",
        "school_id": "60004a6de11ac0798538ccc2",
        "data": {
            "completed_at": 1637232384.736462, "ip_address": null, "manually_completed": false,
            "course": {"id": "sample-course", "title": "sample course"},
            "user": {"id": "618a740f8d07051ab200e5f4", "email": "john@doe.com", "username": "johndoe"}
        }
    });
    let send = |sig: String| {
        app.send(
            app.client
                .post(app.url("/api/public/hook/learnworlds/event"))
                .header("Learnworlds-Webhook-Signature", sig)
                .json(&body),
        )
    };
    let r = send(format!("v1={LEARNWORLDS_SECRET}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["points_awarded"], 50);
    // LearnWorlds sends no delivery id: a redelivery has the same body.
    let again = send(format!("v1={LEARNWORLDS_SECRET}")).await;
    assert_eq!(again.body["duplicate"], true, "{}", again.text);
    let wrong = send("v1=another-value".into()).await;
    assert_error(&wrong, 401, "AUTHENTICATION_FAILED");
    assert!(!wrong.text.contains(LEARNWORLDS_SECRET));
    assert_eq!(
        app.user_points("learnworlds", "618a740f8d07051ab200e5f4")
            .await,
        50
    );
}

/// A Thinkific delivery, signed as Thinkific signs: hex HMAC-SHA256 of the
/// body in `X-Thinkific-Hmac-Sha256`.
async fn thinkific(app: &TestApp, body: &Value) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap();
    let sig = rocket_rewards::pipeline::verify::sign_hex(THINKIFIC_SECRET.as_bytes(), &bytes);
    app.hook(
        "thinkific",
        bytes,
        &[
            ("x-thinkific-hmac-sha256", &sig),
            ("content-type", "application/json"),
        ],
    )
    .await
}

#[tokio::test]
async fn a_thinkific_quiz_attempt_earns_only_when_it_reaches_the_passing_grade() {
    let app = spawn_platforms().await;
    // Thinkific's Webhooks Documentation, "Quiz Attempted" (grade, no pass
    // flag, no passing grade); the others add the passing grade.
    let attempt = |id: &str, grade: i64, passing: Option<i64>| {
        let mut payload = json!({"attempts": 2, "correct_count": 1, "grade": grade, "incorrect_count": 4,
            "result_id": 12511, "user": {"id": 124567, "first_name": "Sam", "last_name": "Davis", "email": "sammy@thinkific.com"},
            "quiz": {"id": 43811, "name": "Webhook Quiz"}});
        if let Some(p) = passing {
            payload["passing_grade"] = json!(p);
        }
        json!({"id": id, "resource": "quiz", "action": "attempted", "tenant_id": "12345",
            "created_at": "2019-08-27T21:02:50.000Z", "timestamp": 1598562170, "payload": payload})
    };
    let cases = [
        ("20191029145629636106318", 20, None, 0),
        ("20191029145629636106319", 60, Some(80), 0),
        ("20191029145629636106320", 85, Some(80), 20),
        // A second passing attempt at the same quiz earns nothing more.
        ("20191029145629636106321", 100, Some(80), 0),
    ];
    for (id, grade, passing, points) in cases {
        let r = thinkific(&app, &attempt(id, grade, passing)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.body["points_awarded"], points,
            "grade {grade} of {passing:?}"
        );
    }
    assert_eq!(app.user_points("thinkific", "124567").await, 20);
}

/// The xAPI statements resource, as logstore_xapi calls it
/// (src/loader/moodle_curl_lrs.php: POST <endpoint>/statements, Basic
/// key:secret, X-Experience-API-Version 1.0.3, a JSON array).
fn lrs_post(app: &TestApp, statements: &Value) -> reqwest::RequestBuilder {
    lrs_post_as(app, statements, "1.0.3", &format!("{LRS_KEY}:{LRS_SECRET}"))
}

fn lrs_post_as(
    app: &TestApp,
    statements: &Value,
    version: &str,
    credentials: &str,
) -> reqwest::RequestBuilder {
    let basic = base64::engine::general_purpose::STANDARD.encode(credentials);
    app.client
        .post(app.url("/api/public/xapi/valamis/statements"))
        .header("authorization", format!("Basic {basic}"))
        .header("x-experience-api-version", version)
        .json(statements)
}

/// logstore_xapi's fixtures (tests/core/course_completed/…, tests/core/
/// course_module_completion_update/…, HEAD): no statement ids, a cmi5
/// course type, the course among the parents.
fn logstore_batch() -> Value {
    let actor = json!({"account": {"homePage": "http://www.example.org", "name": "1"}, "name": "test_fullname"});
    let category = json!([{"id": "http://www.example.org", "definition": {"name": {"en": "test_site_fullname"}, "type": "http://id.tincanapi.com/activitytype/lms"}, "objectType": "Activity"}]);
    let course = json!({"id": "http://www.example.org/course/view.php?id=2", "definition": {"name": {"en": "test_name"}, "type": "https://w3id.org/xapi/cmi5/activitytype/course"}, "objectType": "Activity"});
    json!([
        {"actor": actor, "verb": {"id": "http://adlnet.gov/expapi/verbs/completed", "display": {"en": "Completed"}},
         "object": {"id": "http://www.example.org/mod/book/view.php?id=1", "definition": {"name": {"en": "test_book_name"}, "type": "http://id.tincanapi.com/activitytype/book"}, "objectType": "Activity"},
         "context": {"contextActivities": {"category": category, "parent": [
             {"id": "http://www.example.org/course/section.php?id=1", "definition": {"name": {"en": "test_name Section 0"}, "type": "http://id.tincanapi.com/activitytype/section"}, "objectType": "Activity"},
             course]}, "language": "en", "platform": "Moodle", "registration": "58028332-2277-5b51-a632-7836992917ea"},
         "result": {"completion": true, "success": true}, "timestamp": "2015-06-10T14:31:41.000Z"},
        {"actor": actor, "verb": {"id": "http://adlnet.gov/expapi/verbs/completed", "display": {"en": "Completed"}},
         "object": course,
         "context": {"contextActivities": {"category": category}, "language": "en", "platform": "Moodle", "registration": "58028332-2277-5b51-a632-7836992917ea"},
         "timestamp": "2015-06-10T14:31:42.000Z"}
    ])
}

#[tokio::test]
async fn a_logstore_xapi_batch_with_basic_auth_and_no_ids_earns_once_and_gets_stable_ids() {
    let app = spawn_platforms().await;
    let r = app.send(lrs_post(&app, &logstore_batch())).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["x-experience-api-version"], "1.0.3");
    let ids: Vec<String> = serde_json::from_value(r.body.clone()).unwrap();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id} is a UUID");
    }
    assert_ne!(ids[0], ids[1]);
    // The module (25) and the course (50), in the course's namespace.
    assert_eq!(app.user_points("valamis", "1").await, 75);
    // logstore_xapi re-sends a failed batch as it was: the same ids,
    // nothing awarded again.
    let again = app.send(lrs_post(&app, &logstore_batch())).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body, r.body);
    assert_eq!(app.user_points("valamis", "1").await, 75);
    // The same statement with its keys in another order is the same statement.
    let st = &logstore_batch()[1];
    let reordered = format!(
        r#"{{"verb":{},"timestamp":{},"object":{},"context":{},"actor":{}}}"#,
        st["verb"], st["timestamp"], st["object"], st["context"], st["actor"]
    );
    let one = app.send(lrs_post(&app, &json!(null)).body(reordered)).await;
    assert_eq!(one.body, json!([ids[1]]), "{}", one.text);
    // Both are stored with the course: among the parents, or the object itself.
    let user = app.admin_get("/api/v1/users/valamis/1").await;
    for entry in user.body["recent"].as_array().unwrap() {
        let ev = app
            .admin_get(&format!(
                "/api/v1/events/{}",
                entry["event_id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(
            ev.body["canonical"]["course_id"], "http://www.example.org/course/view.php?id=2",
            "{}",
            ev.text
        );
    }
}

/// The pipeline's order holds on the statements resource too: a blocked
/// address is refused (403) before its request is read for a version.
#[tokio::test]
async fn the_statements_resource_checks_the_allowlist_before_the_version() {
    let app = spawn_custom(
        |dir| append_to_source(dir, "valamis", "allow_ips: [192.0.2.0/24]"),
        |s| {
            s.secrets.set(
                "ROCKET_VALAMIS_LRS_SECRET",
                format!("{LRS_KEY}:{LRS_SECRET}"),
            )
        },
    )
    .await;
    let statement = json!({"actor": {"mbox": "mailto:ada@example.com"},
        "verb": {"id": "http://adlnet.gov/expapi/verbs/passed"},
        "object": {"id": "http://example.com/quiz/1"}});
    let credentials = format!("{LRS_KEY}:{LRS_SECRET}");
    for version in ["", "1.0.3"] {
        let r = app
            .send(lrs_post_as(&app, &statement, version, &credentials))
            .await;
        assert_error(&r, 403, "IP_NOT_ALLOWED");
        assert_eq!(r.headers["x-experience-api-version"], "1.0.3");
    }
    // PUT with a statementId that is no UUID: 403 first too.
    let basic = base64::engine::general_purpose::STANDARD.encode(&credentials);
    let r = app
        .send(
            app.client
                .put(app.url("/api/public/xapi/valamis/statements?statementId=nope"))
                .header("authorization", format!("Basic {basic}"))
                .header("x-experience-api-version", "1.0.3")
                .json(&statement),
        )
        .await;
    assert_error(&r, 403, "IP_NOT_ALLOWED");
}

#[tokio::test]
async fn the_statements_resource_answers_as_an_lrs_does() {
    let app = spawn_platforms().await;
    let statement = json!({"actor": {"mbox": "mailto:ada@example.com"},
        "verb": {"id": "http://adlnet.gov/expapi/verbs/passed"},
        "object": {"id": "http://example.com/quiz/1"}});
    let credentials = format!("{LRS_KEY}:{LRS_SECRET}");
    // A version this resource does not take, or none: 400, and the answer
    // still says which version this is.
    for version in ["1.1.0", ""] {
        let r = app
            .send(lrs_post_as(&app, &statement, version, &credentials))
            .await;
        assert_error(&r, 400, "INVALID_REQUEST");
        assert_eq!(r.headers["x-experience-api-version"], "1.0.3");
    }
    // 2.0 is answered as 2.0.0.
    let r = app
        .send(lrs_post_as(&app, &statement, "2.0.0", &credentials))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["x-experience-api-version"], "2.0.0");
    // Wrong credentials: 401.
    let r = app
        .send(lrs_post_as(
            &app,
            &statement,
            "1.0.3",
            &format!("{LRS_KEY}:nope"),
        ))
        .await;
    assert_error(&r, 401, "AUTHENTICATION_FAILED");
    // PUT with statementId: 204, stored under that id; again: 204, once.
    let id = "c70c2b85-c294-464f-baca-cebd4fb9b348";
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{LRS_KEY}:{LRS_SECRET}"));
    let put = |body: &Value, id: &str| {
        app.client
            .put(app.url(&format!(
                "/api/public/xapi/valamis/statements?statementId={id}"
            )))
            .header("authorization", format!("Basic {basic}"))
            .header("x-experience-api-version", "1.0.3")
            .json(body)
    };
    for _ in 0..2 {
        let r = app.send(put(&statement, id)).await;
        assert_eq!(r.status, 204, "{}", r.text);
        assert_eq!(r.headers["x-experience-api-version"], "1.0.3");
    }
    assert_eq!(
        app.user_points("valamis", "mailto:ada@example.com").await,
        20
    );
    // POSTing it with that id is the same statement.
    let mut with_id = statement.clone();
    with_id["id"] = json!(id);
    let r = app.send(lrs_post(&app, &with_id)).await;
    assert_eq!(r.body, json!([id]), "{}", r.text);
    // A statement whose own id differs from statementId is refused.
    let r = app
        .send(put(&with_id, "1a6a5e3e-9a8b-4c1e-9d3e-2f0c7b9e8a11"))
        .await;
    assert_error(&r, 400, "INVALID_PAYLOAD");
    // A source that is not xAPI has no statements resource.
    let r = app
        .send(
            app.client
                .post(app.url("/api/public/xapi/moodle/statements"))
                .header("x-experience-api-version", "1.0.3")
                .json(&statement),
        )
        .await;
    assert_error(&r, 404, "UNKNOWN_SOURCE");
}

/// cmi5 sends `completed` and then `passed` for one activity: two awards,
/// each once (the rule keys them apart).
#[tokio::test]
async fn an_xapi_completion_and_pass_of_one_activity_both_earn_once() {
    let app = spawn_platforms().await;
    let st = |verb: &str, at: &str| {
        json!({"actor": {"account": {"homePage": "https://lms.example.com", "name": "ada"}},
            "verb": {"id": format!("http://adlnet.gov/expapi/verbs/{verb}")},
            "object": {"id": "https://lms.example.com/au/1", "definition": {"type": "http://adlnet.gov/expapi/activities/lesson"}},
            "timestamp": at})
    };
    let batch = json!([
        st("completed", "2025-01-01T10:00:00Z"),
        st("passed", "2025-01-01T10:00:01Z"),
        st("completed", "2025-01-02T10:00:00Z"),
        st("passed", "2025-01-02T10:00:01Z")
    ]);
    let r = app.send(lrs_post(&app, &batch)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(app.user_points("valamis", "ada").await, 25 + 20);
}
