//! The served OpenAPI document: poem-openapi's spec of the operations,
//! plus what only the loaded config knows. Every loaded source becomes its
//! own operation (`POST /api/public/hook/<name>/event`, tag "Sources") with
//! its description, its auth schemes as security schemes, its content
//! types, and request examples from its `tests:` with the canonical event
//! and points each produces. The test token is declared where it is taken,
//! and the rate-limit headers on every response of the routes that send
//! them. Built from the config in use, so a reload changes what is served.

use std::sync::OnceLock;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::config::{Config, Source};
use crate::pipeline::rules::History;
use crate::pipeline::verify::{AuthScheme, SigEncoding};

/// poem-openapi's document, parsed once.
fn base() -> &'static Value {
    static BASE: OnceLock<Value> = OnceLock::new();
    BASE.get_or_init(|| serde_json::from_str(&super::service().spec()).unwrap_or(Value::Null))
}

/// The document for this config.
pub fn document(config: &Config) -> Value {
    let mut doc = base().clone();
    declare_test_token(&mut doc);
    let generic = doc["paths"]["/api/public/hook/{source}/event"]["post"].clone();
    if let Some(tags) = doc["tags"].as_array_mut() {
        tags.push(json!({
            "name": "Sources",
            "description": "One operation per loaded source (`sources.d/*.yaml`): its credentials, content types and example payloads with what they earn."
        }));
    }
    for name in config.source_names() {
        // A dry-run source is the dry-run operation, documented already.
        let Some(src) = config.source(name).filter(|s| !s.dry_run) else {
            continue;
        };
        let (operation, schemes) = source_operation(config, src, &generic);
        doc["paths"][format!("/api/public/hook/{name}/event")] = json!({ "post": operation });
        for (key, scheme) in schemes {
            doc["components"]["securitySchemes"][key] = scheme;
        }
    }
    add_rate_headers(&mut doc);
    doc
}

/// The document as pretty JSON.
pub fn json(config: &Config) -> String {
    serde_json::to_string_pretty(&document(config)).unwrap_or_default()
}

/// The document as YAML.
pub fn yaml(config: &Config) -> String {
    serde_yaml_ng::to_string(&document(config)).unwrap_or_default()
}

/// The served forms of one config's document.
pub struct Rendered {
    pub json: String,
    pub yaml: String,
    /// The JSON with `<` escaped, to sit inside the docs page's `<script>`
    /// (a `</script>` in a description cannot end it).
    pub in_script: String,
}

/// The rendered document of the config in use, built once per config (the
/// examples are scored, so building is not free; strangers may ask often).
pub fn rendered(config: &std::sync::Arc<Config>) -> std::sync::Arc<Rendered> {
    type Cached = (std::sync::Weak<Config>, std::sync::Arc<Rendered>);
    static CACHE: std::sync::Mutex<Option<Cached>> = std::sync::Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((of, doc)) = cache.as_ref() {
        if of
            .upgrade()
            .is_some_and(|c| std::sync::Arc::ptr_eq(&c, config))
        {
            return doc.clone();
        }
    }
    let doc = document(config);
    let json = serde_json::to_string_pretty(&doc).unwrap_or_default();
    let done = std::sync::Arc::new(Rendered {
        in_script: json.replace('<', "\\u003c"),
        yaml: serde_yaml_ng::to_string(&doc).unwrap_or_default(),
        json,
    });
    *cache = Some((std::sync::Arc::downgrade(config), done.clone()));
    done
}

/// The dry run and validation take the test or the admin token.
fn declare_test_token(doc: &mut Value) {
    doc["components"]["securitySchemes"]["TestToken"] = json!({
        "type": "http",
        "scheme": "bearer",
        "description": "The test token (`ROCKET_TEST_TOKEN`), as `Authorization: Bearer …`: dry runs and validation, nothing stored."
    });
    for path in [
        "/api/public/hook/test/event",
        "/api/public/validate/webhook",
    ] {
        doc["paths"][path]["post"]["security"] = json!([{ "TestToken": [] }, { "AdminToken": [] }]);
    }
}

/// Every response of the hook and xAPI routes carries the rate-limit
/// headers (429s also `Retry-After`).
fn add_rate_headers(doc: &mut Value) {
    let header = |description: &str, format: &str| json!({ "description": description, "schema": { "type": "integer", "format": format } });
    let headers = json!({
        "X-RateLimit-Limit": header("Requests a minute the tightest bucket allows.", "uint32"),
        "X-RateLimit-Remaining": header("What is left of it.", "uint32"),
        "X-RateLimit-Reset": header("When it is full again (Unix seconds).", "uint64"),
    });
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        if !(path.starts_with("/api/public/hook/") || path.starts_with("/api/public/xapi/")) {
            continue;
        }
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for op in ops.values_mut() {
            let Some(responses) = op["responses"].as_object_mut() else {
                continue;
            };
            for (status, response) in responses.iter_mut() {
                let Some(r) = response.as_object_mut() else {
                    continue;
                };
                let declared = r.entry("headers").or_insert_with(|| json!({}));
                // poem-openapi writes the names in capitals: one spelling.
                if let Some(h) = declared.as_object_mut() {
                    h.retain(|k, _| !k.to_ascii_lowercase().starts_with("x-ratelimit-"));
                    if let Some(all) = headers.as_object() {
                        h.extend(all.clone());
                    }
                    if status == "429" {
                        h.insert(
                            "Retry-After".into(),
                            header("Seconds until a request may pass.", "uint64"),
                        );
                    }
                }
            }
        }
    }
}

/// A source's operation and the security schemes it names.
fn source_operation(
    config: &Config,
    src: &Source,
    generic: &Value,
) -> (Value, Vec<(String, Value)>) {
    let mut schemes = Vec::new();
    let mut security = Vec::new();
    let mut notes = Vec::new();
    for (i, auth) in src.auth.iter().enumerate() {
        let key = format!("{}_{}", src.name, i + 1);
        let (scheme, note) = security_scheme(auth);
        notes.push(note);
        if let Some(scheme) = scheme {
            security.push(json!({ key.clone(): [] }));
            schemes.push((key, scheme));
        }
    }
    let mut content = Map::new();
    for ct in &src.content_types {
        content.insert(
            ct.clone(),
            json!({ "schema": { "type": "object" }, "examples": examples(config, src, ct) }),
        );
    }
    let processing = match src.processing {
        crate::config::raw::Processing::Sync => "scored before the answer (200)",
        crate::config::raw::Processing::Async => {
            "stored and answered 202, scored by the queue workers"
        }
    };
    let rules: Vec<&str> = src.rules.iter().map(|r| &*r.name).collect();
    let description = format!(
        "Credentials (any one): {}.\n\nEvents count in namespace `{}`, {processing}; rules: {}. At most {} bytes; {} a minute (burst {}).",
        notes.join("; "),
        src.namespace,
        if rules.is_empty() { "none".to_string() } else { rules.join(", ") },
        src.max_body_bytes,
        src.rate.per_minute,
        src.rate.burst,
    );
    let summary = if src.description.is_empty() {
        format!("{} webhook", src.name)
    } else {
        src.description.clone()
    };
    let operation = json!({
        "tags": ["Sources"],
        "operationId": format!("hook_{}", src.name),
        "summary": summary,
        "description": description,
        "security": security,
        "requestBody": { "required": true, "content": content },
        "responses": generic["responses"].clone(),
    });
    (operation, schemes)
}

/// A scheme as OpenAPI says it (none for a token in the body), and a note.
fn security_scheme(auth: &AuthScheme) -> (Option<Value>, String) {
    let encoding = |e: &SigEncoding| match e {
        SigEncoding::Hex => "hex",
        SigEncoding::Base64 => "base64",
    };
    match auth {
        AuthScheme::Bearer { .. } => (
            Some(json!({ "type": "http", "scheme": "bearer" })),
            "`Authorization: Bearer <token>`".into(),
        ),
        AuthScheme::Basic { .. } => (
            Some(json!({ "type": "http", "scheme": "basic" })),
            "HTTP Basic".into(),
        ),
        AuthScheme::Header { header, prefix, .. } => (
            Some(
                json!({ "type": "apiKey", "in": "header", "name": header.as_str(),
                "description": format!("The shared value, after `{prefix}`.") }),
            ),
            format!("`{}: {prefix}<value>`", header.as_str()),
        ),
        AuthScheme::Hmac {
            header,
            prefix,
            encoding: enc,
            timestamp,
            ..
        } => {
            let signed = match timestamp {
                Some((ts, tolerance)) => format!(
                    "`<{}>.<raw body>` (the timestamp header, Unix seconds, within {tolerance} s)",
                    ts.as_str()
                ),
                None => "the raw body".into(),
            };
            let note = format!(
                "`{}: {prefix}<HMAC-SHA256 of {signed}, {}>`",
                header.as_str(),
                encoding(enc)
            );
            (
                Some(
                    json!({ "type": "apiKey", "in": "header", "name": header.as_str(), "description": note }),
                ),
                note,
            )
        }
        AuthScheme::StandardWebhooks { tolerance, .. } => {
            let note = format!("Standard Webhooks: `webhook-id`, `webhook-timestamp` (within {tolerance} s), `webhook-signature: v1,<base64 HMAC-SHA256 of <id>.<timestamp>.<body>>`");
            (
                Some(
                    json!({ "type": "apiKey", "in": "header", "name": "webhook-signature", "description": note }),
                ),
                note,
            )
        }
        AuthScheme::Query { param, .. } => (
            Some(json!({ "type": "apiKey", "in": "query", "name": param })),
            format!("`?{param}=<token>`"),
        ),
        AuthScheme::BodyField { field, .. } => (
            None,
            format!(
                "a token in the body at `$.{}` (removed before storing)",
                field.join(".")
            ),
        ),
    }
}

/// The source's test payloads for a content type (those its tests expect to
/// pass), each with the canonical event and points it produces (mapped and
/// scored as the hook would, with an empty history).
fn examples(config: &Config, src: &Source, content_type: &str) -> Value {
    let mut out = Map::new();
    let first = src.content_types.first().map(String::as_str);
    for case in &src.tests {
        let ct = case
            .content_type
            .as_deref()
            .or(first)
            .unwrap_or("application/json");
        if !ct.eq_ignore_ascii_case(content_type) || case.expect.error.is_some() {
            continue;
        }
        let (value, body) = match (&case.payload, &case.body) {
            (Some(p), _) => (
                p.clone(),
                Bytes::from(serde_json::to_vec(p).unwrap_or_default()),
            ),
            (None, Some(b)) => {
                let object = crate::pipeline::decode::decode_form(b.as_bytes()).unwrap_or_default();
                (Value::Object(object), Bytes::from(b.clone()))
            }
            (None, None) => continue,
        };
        out.insert(
            case.name.clone(),
            json!({ "summary": case.name, "description": outcome(config, src, ct, &body), "value": value }),
        );
    }
    Value::Object(out)
}

fn outcome(config: &Config, src: &Source, content_type: &str, body: &Bytes) -> String {
    let mapped = match crate::ingest::map_body(src, Some(content_type), body, chrono::Utc::now()) {
        Ok(m) => m,
        Err(e) => return format!("Refused: {e}."),
    };
    let mut lines = Vec::new();
    for (event, _) in mapped {
        let points = match crate::scoring::score(config, src, &event, &History::default()) {
            Ok(awards) if awards.is_empty() => "no points".to_string(),
            Ok(awards) => awards
                .iter()
                .map(|a| format!("{} {}", a.rule, a.points))
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("a rule fails: {e}"),
        };
        let canonical = json!({
            "event_type": event.event_type, "user_id": event.user_id,
            "course_id": event.course_id, "object_id": event.object_id,
        });
        lines.push(format!(
            "Canonical event `{canonical}`: {points} (for a learner with no history)."
        ));
    }
    lines.join("\n\n")
}
