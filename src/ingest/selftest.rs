//! The embedded test cases of source files, run by `rocket-rewards check`:
//! each sample delivery is authenticated with a test secret, decoded, mapped
//! and scored exactly as the hook would, and compared with its expectation.

use bytes::Bytes;
use chrono::Utc;
use poem::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::config::raw::{RuleCase, TestCase};
use crate::config::{Config, Source};
use crate::ingest;
use crate::pipeline::mapping::CanonicalEvent;
use crate::pipeline::rules::{History, Rule};
use crate::pipeline::{self, PrepareError};

/// The secret every env var resolves to while `check` runs test cases (it
/// is valid base64, so Standard Webhooks sources take it too).
pub const CHECK_SECRET: &str = "cm9ja2V0LWNoZWNrLXNlY3JldA==";

/// One test case's result.
#[derive(Debug, Clone)]
pub struct CaseOutcome {
    pub source: String,
    pub name: String,
    /// Empty when the case passed.
    pub failures: Vec<String>,
}

/// Runs every source's cases (sources in name order). `config` must have
/// been loaded with [`crate::settings::SecretEnv::everything`]`(CHECK_SECRET)`.
pub fn run(config: &Config) -> Vec<CaseOutcome> {
    let mut out = Vec::new();
    for name in config.source_names() {
        let Some(source) = config.source(name) else {
            continue;
        };
        for case in &source.tests {
            out.push(CaseOutcome {
                source: name.to_string(),
                name: case.name.clone(),
                failures: run_case(config, source, case),
            });
        }
    }
    out
}

/// Runs every rule's test cases: the rule alone, on the stated event and history.
pub fn run_rules(config: &Config) -> Vec<CaseOutcome> {
    let mut out = Vec::new();
    for (rule, cases) in &config.rule_tests {
        for case in cases {
            out.push(CaseOutcome {
                source: format!("rule {}", rule.name),
                name: case.name.clone(),
                failures: run_rule_case(config, rule, case),
            });
        }
    }
    out
}

fn run_rule_case(config: &Config, rule: &std::sync::Arc<Rule>, case: &RuleCase) -> Vec<String> {
    let text = |k: &str| {
        case.event
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let at = match case.event.get("occurred_at").and_then(Value::as_str) {
        Some(s) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => t.with_timezone(&Utc),
            Err(_) => return vec![format!("occurred_at {s:?} is not RFC 3339")],
        },
        None => Utc::now(),
    };
    let event = CanonicalEvent {
        source: "rule-test".into(),
        dedupe_key: "rule-test".into(),
        event_type: text("event_type"),
        vendor_event_type: text("event_type"),
        user_id: text("user_id"),
        course_id: text("course_id"),
        object_id: text("object_id"),
        occurred_at: at,
        attributes: case
            .event
            .get("attributes")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
    };
    let at_ms = at.timestamp_millis();
    let mut recent: Vec<(String, i64)> = case
        .history
        .recent
        .iter()
        .map(|p| (p.event_type.clone(), at_ms - p.seconds_ago * 1000))
        .collect();
    if let Some(r) = &case.history.recent_repeat {
        for i in 0..r.count.min(10_000) {
            recent.push((
                r.event_type.clone(),
                at_ms - (r.first_seconds_ago + i as i64 * r.every_seconds) * 1000,
            ));
        }
    }
    recent.sort_by_key(|r| std::cmp::Reverse(r.1));
    let history = History {
        total: case.history.total,
        first: case.history.first,
        recent,
        at: at_ms,
    };
    match pipeline::rules::score(&config.engine, std::slice::from_ref(rule), &event, &history) {
        Err(e) => vec![format!("the rule failed: {}", e.message)],
        Ok(awards) => {
            let got: i64 = awards.iter().map(|a| a.points).sum();
            if got == case.points {
                Vec::new()
            } else {
                vec![format!("expected {} points, got {got}", case.points)]
            }
        }
    }
}

fn run_case(config: &Config, source: &Source, case: &TestCase) -> Vec<String> {
    let scheme = match case.auth_scheme.unwrap_or(1).checked_sub(1) {
        Some(i) if case.sign => match source.auth.get(i) {
            Some(s) => Some(s),
            None => return vec![format!("the source has no auth scheme number {}", i + 1)],
        },
        _ => None,
    };
    let now = Utc::now();
    let (headers, body, query) = match case_request(case, scheme, now.timestamp()) {
        Ok(r) => r,
        Err(e) => return vec![e],
    };
    let ct = case.content_type.as_deref();
    let body = Bytes::from(body);
    let parts = ingest::RequestParts {
        headers: &headers,
        query: query.as_deref(),
        content_type: ct,
    };
    let outcome = ingest::authenticate(source, parts, &body, now.timestamp())
        .map_err(|_| "AUTHENTICATION_FAILED".to_string())
        .and_then(|decoded| {
            ingest::prepare(config, source, decoded, ct, &body, now).map_err(|e| match e {
                PrepareError::UnsupportedMediaType(_) => "UNSUPPORTED_MEDIA_TYPE".to_string(),
                PrepareError::Decode(_) | PrepareError::Statement(_) => {
                    "INVALID_PAYLOAD".to_string()
                }
                PrepareError::Mapping { .. } => "VALIDATION_ERROR".to_string(),
            })
        });
    let mut failures = Vec::new();
    match (outcome, &case.expect.error) {
        (Err(code), Some(want)) if &code == want => {}
        (Err(code), Some(want)) => failures.push(format!("expected error {want}, got {code}")),
        (Err(code), None) => failures.push(format!("expected success, got {code}")),
        (Ok(_), Some(want)) => failures.push(format!("expected error {want}, got success")),
        (Ok(prepared), None) => {
            if let Some(err) = prepared.iter().find_map(|p| p.outcome.as_ref().err()) {
                failures.push(format!("a rule failed: {err}"));
            }
            if let Some(want) = case.expect.points {
                let got: i64 = prepared.iter().map(|p| p.points()).sum();
                if got != want {
                    failures.push(format!("expected {want} points, got {got}"));
                }
            }
            if let Some(first) = prepared.first() {
                let event = serde_json::to_value(&first.event).unwrap_or_default();
                for (field, want) in &case.expect.event {
                    let got = event.get(field).unwrap_or(&Value::Null);
                    if !matches(want, got) {
                        failures.push(format!("expected {field} = {want}, got {got}"));
                    }
                }
            }
        }
    }
    failures
}

/// A case's request: its headers (the case's, then the scheme's), its
/// body (with a body token put in) and its query string.
fn case_request(
    case: &TestCase,
    scheme: Option<&crate::pipeline::verify::AuthScheme>,
    now: i64,
) -> Result<(HeaderMap, Vec<u8>, Option<String>), String> {
    let body: Vec<u8> = match (&case.payload, &case.body) {
        (Some(p), None) => serde_json::to_vec(p).unwrap_or_default(),
        (None, Some(b)) => b.clone().into_bytes(),
        _ => return Err("a case has exactly one of `payload` and `body`".into()),
    };
    let mut headers = HeaderMap::new();
    let mut add = |k: &str, v: &str| match (
        HeaderName::from_bytes(k.as_bytes()),
        HeaderValue::from_str(v),
    ) {
        (Ok(k), Ok(v)) => {
            headers.insert(k, v);
            Ok(())
        }
        _ => Err(format!("header {k:?} is not a valid header")),
    };
    for (k, v) in &case.headers {
        add(k, v)?;
    }
    let (body, query) = match scheme {
        None => (body, None),
        Some(scheme) => {
            let signed = scheme.present(CHECK_SECRET, &body, now);
            for (k, v) in &signed.headers {
                add(k, v)?;
            }
            (signed.body, signed.query)
        }
    };
    Ok((headers, body, query))
}

/// Equal, with objects compared as subsets (so `attributes` may list some).
fn matches(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => w
            .iter()
            .all(|(k, v)| g.get(k).is_some_and(|gv| matches(v, gv))),
        _ => want == got,
    }
}
