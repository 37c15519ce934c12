//! The HTTP surface: health, spec, docs, and the one error body for
//! errors poem raises itself.

use crate::helpers::*;

#[tokio::test]
async fn health_endpoints_answer() {
    let app = spawn_app().await;
    let live = app.send(app.client.get(app.url("/health/live"))).await;
    assert_eq!(
        (live.status, live.body["status"].as_str()),
        (200, Some("ok"))
    );
    let ready = app.send(app.client.get(app.url("/health/ready"))).await;
    assert_eq!(ready.status, 200, "{}", ready.text);
}

#[tokio::test]
async fn unknown_paths_and_methods_get_the_error_body() {
    let app = spawn_app().await;
    assert_error(
        &app.send(app.client.get(app.url("/nope"))).await,
        404,
        "NOT_FOUND",
    );
    assert_error(
        &app.send(app.client.get(app.url("/api/public/hook/moodle/event")))
            .await,
        405,
        "METHOD_NOT_ALLOWED",
    );
    let bad_param = app.admin_get("/api/v1/leaderboard?limit=many").await;
    assert_error(&bad_param, 400, "INVALID_REQUEST");
}

#[tokio::test]
async fn the_spec_and_docs_are_served_and_the_committed_spec_is_current() {
    let app = spawn_app().await;
    let spec = app.send(app.client.get(app.url("/openapi.json"))).await;
    assert_eq!(spec.status, 200);
    assert!(
        spec.body["paths"]["/api/public/hook/{source}/event"]["post"].is_object(),
        "{}",
        spec.text
    );
    let yaml = app.send(app.client.get(app.url("/openapi.yaml"))).await;
    assert_eq!(yaml.status, 200);
    assert!(yaml.text.contains("/api/v1/leaderboard"));
    let docs = app.send(app.client.get(app.url("/docs"))).await;
    assert_eq!(docs.status, 200);
    assert!(
        docs.text.contains("swagger"),
        "the UI is served from the binary"
    );
    assert!(!docs.text.contains("cdn."), "no CDN");
    for path in ["/openapi.json", "/openapi.yaml", "/docs"] {
        let post = app.send(app.client.post(app.url(path))).await;
        assert_error(&post, 405, "METHOD_NOT_ALLOWED");
    }

    let committed =
        std::fs::read_to_string(repo_dir().join("openapi/openapi.json")).unwrap_or_default();
    let shipped = rocket_rewards::cli::openapi_config(&repo_dir()).unwrap();
    let generated = rocket_rewards::http::spec::json(&shipped);
    assert!(
        committed.trim() == generated.trim(),
        "openapi/openapi.json is stale: run `cargo run -q -- openapi > openapi/openapi.json`"
    );
}

/// The name of an operation's first security scheme.
fn first_scheme(op: &serde_json::Value) -> String {
    op["security"][0]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone()
}

/// Each loaded source is an operation of its own in the served document:
/// its credentials as security schemes, its content types, its test
/// payloads as examples with what they earn; a reload adds a new source's.
#[tokio::test]
async fn the_served_spec_documents_each_source_and_follows_a_reload() {
    let app = spawn_app().await;
    let spec = app
        .send(app.client.get(app.url("/openapi.json")))
        .await
        .body;
    let moodle = &spec["paths"]["/api/public/hook/moodle/event"]["post"];
    assert_eq!(moodle["tags"], serde_json::json!(["Sources"]));
    assert_eq!(moodle["operationId"], "hook_moodle");
    let schemes = &spec["components"]["securitySchemes"];
    let first = first_scheme(moodle);
    assert_eq!(schemes[&first]["scheme"], "bearer", "{}", schemes);
    let examples = &moodle["requestBody"]["content"]["application/json"]["examples"];
    let example = examples
        .as_object()
        .unwrap()
        .values()
        .next()
        .expect("an example from tests:");
    assert!(example["value"].is_object());
    assert!(
        example["description"]
            .as_str()
            .unwrap()
            .contains("course.completed"),
        "{example}"
    );
    assert!(
        example["description"].as_str().unwrap().contains("50"),
        "{example}"
    );
    let lw = &spec["paths"]["/api/public/hook/learnworlds/event"]["post"];
    let lw_scheme = first_scheme(lw);
    assert_eq!(schemes[&lw_scheme]["type"], "apiKey");
    assert_eq!(schemes[&lw_scheme]["in"], "header");
    // The test token where it is taken; rate-limit headers on hook answers.
    assert_eq!(
        spec["paths"]["/api/public/hook/test/event"]["post"]["security"][0]["TestToken"],
        serde_json::json!([])
    );
    let limited = &moodle["responses"]["429"]["headers"];
    assert!(
        limited["X-RateLimit-Remaining"].is_object() && limited["Retry-After"].is_object(),
        "{limited}"
    );
    assert!(spec["paths"]["/api/public/hook/kajabi/event"].is_null());

    std::fs::copy(
        app.config_dir.join("sources.d/custom.yaml"),
        app.config_dir.join("sources.d/kajabi.yaml"),
    )
    .unwrap();
    assert_eq!(app.reload().await.status, 200);
    let spec = app
        .send(app.client.get(app.url("/openapi.json")))
        .await
        .body;
    assert_eq!(
        spec["paths"]["/api/public/hook/kajabi/event"]["post"]["operationId"],
        "hook_kajabi"
    );
    let docs = app.send(app.client.get(app.url("/docs"))).await.text;
    // Inside the page's script, where the static spec was: not appended.
    let kajabi = docs.find("hook_kajabi").expect("the new source in /docs");
    assert!(
        kajabi < docs.find("</script>\n\n</body>").unwrap_or(0),
        "the spec sits in the page's script"
    );
    assert!(docs.trim_end().ends_with("</html>"));
    let yaml = app
        .send(app.client.get(app.url("/openapi.yaml")))
        .await
        .text;
    assert!(yaml.contains("hook_kajabi"));
}

#[tokio::test]
async fn metrics_are_served_in_the_text_format() {
    let app = spawn_app().await;
    app.bearer("moodle", MOODLE_TOKEN, &moodle_completion(1, 1))
        .await;
    let m = app.send(app.client.get(app.url("/metrics"))).await;
    assert_eq!(m.status, 200);
    assert!(m.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert!(
        m.text
            .contains("rocket_http_requests_total{source=\"moodle\",status=\"200\"} 1"),
        "{}",
        m.text
    );
    assert!(m
        .text
        .contains("rocket_points_awarded_total{source=\"moodle\"} 50"));
}
