//! The xAPI statements resource of an xAPI source
//! (`/api/public/xapi/{source}/statements`), so that an LRS client (Moodle's
//! logstore_xapi, an authoring tool) can be pointed at it unchanged: POST of
//! one statement or an array answers 200 with the statement ids in order,
//! PUT with `?statementId=` answers 204, as xAPI 1.0.3 (Communication 2.1)
//! asks. Each statement goes through the hook's pipeline: authentication,
//! limits, mapping, rules and the ledger, once per statement id.

use std::sync::Arc;
use std::time::Instant;

use poem::web::Data;
use poem::Request;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::error::ApiError;
use super::hooks::{ingest_into, unknown_source, HookBody, Ingested};
use super::ApiTags;
use crate::state::AppState;

/// The header every xAPI request and response carries.
pub const VERSION_HEADER: &str = "x-experience-api-version";

/// The 1.0 version this resource answers as.
pub const LATEST_1_0: &str = "1.0.3";

/// The version this resource answers with, for a request's version header:
/// the latest patch of the request's minor version (Communication 3.3).
/// `None`: a version this resource does not take (missing, 0.9, 1.1+ but
/// not 2.0).
pub fn answer_version(requested: Option<&str>) -> Option<&'static str> {
    let v = requested?.trim();
    if v == "1.0" || v.starts_with("1.0.") {
        Some(LATEST_1_0)
    } else if v == "2.0" || v.starts_with("2.0.") {
        Some("2.0.0")
    } else {
        None
    }
}

#[derive(ApiResponse)]
pub enum StatementsPosted {
    /// Stored: the statements' ids, in the order they were sent (ids the
    /// sender left out are assigned from each statement's content).
    #[oai(status = 200)]
    Ok(
        Json<Vec<String>>,
        #[oai(header = "X-Experience-API-Version")] String,
    ),
}

#[derive(ApiResponse)]
pub enum StatementPut {
    /// Stored under the given id (or stored before: nothing changes).
    #[oai(status = 204)]
    NoContent(#[oai(header = "X-Experience-API-Version")] String),
}

pub struct XapiApi;

#[OpenApi(tag = "ApiTags::Hooks")]
impl XapiApi {
    /// Store xAPI statements (one, or an array), as an LRS does.
    ///
    /// For sources that declare `xapi: true`. Requires
    /// `X-Experience-API-Version` 1.0.x (or 2.0.x); authenticated as the
    /// source's hook is (HTTP Basic `key:secret` for LRS clients). A
    /// statement already stored under its id is not stored or awarded again.
    #[oai(
        path = "/api/public/xapi/:source/statements",
        method = "post",
        operation_id = "postStatements"
    )]
    async fn post(
        &self,
        state: Data<&Arc<AppState>>,
        source: Path<String>,
        req: &Request,
        body: HookBody,
    ) -> Result<StatementsPosted, ApiError> {
        let (version, ingested) = statements(&state, &source.0, req, body, None, None).await?;
        Ok(StatementsPosted::Ok(Json(ingested.keys), version.into()))
    }

    /// Store one xAPI statement under `statementId`, as an LRS does.
    ///
    /// The statement takes that id, or must already carry it. Answers 204.
    #[oai(
        path = "/api/public/xapi/:source/statements",
        method = "put",
        operation_id = "putStatement"
    )]
    async fn put(
        &self,
        state: Data<&Arc<AppState>>,
        source: Path<String>,
        /// The statement's id.
        #[oai(name = "statementId")]
        statement_id: Query<String>,
        req: &Request,
        body: HookBody,
    ) -> Result<StatementPut, ApiError> {
        // Stored in the hyphenated lower-case form, however it was written.
        let parsed =
            uuid::Uuid::parse_str(statement_id.0.trim()).map(|id| id.hyphenated().to_string());
        let bad_id = parsed
            .is_err()
            .then(|| ApiError::bad_request("INVALID_REQUEST", "statementId must be a UUID", None));
        let id = parsed.unwrap_or_default();
        let (version, _) = statements(&state, &source.0, req, body, Some(&id), bad_id).await?;
        Ok(StatementPut::NoContent(version.into()))
    }
}

/// Ingests through the source, answering an unknown one 404, and a bad
/// version header or `bad_id` 400 once the allowlist and the address's
/// limit have passed the request; observed as the hook is (metrics and
/// the log line).
async fn statements(
    state: &AppState,
    name: &str,
    req: &Request,
    body: HookBody,
    statement_id: Option<&str>,
    bad_id: Option<ApiError>,
) -> Result<(&'static str, Ingested), ApiError> {
    let started = Instant::now();
    let config = state.config.load_full();
    let src = config
        .source(name)
        .filter(|s| s.xapi && !s.dry_run)
        .cloned();
    let label = src.as_ref().map(|s| s.name.as_str()).unwrap_or("unknown");
    let ip = state.client_ip(req, src.as_deref());
    let requested = req
        .headers()
        .get(VERSION_HEADER)
        .and_then(|v| v.to_str().ok());
    let version = answer_version(requested);
    let result = match &src {
        None => Err(match config.source(name) {
            Some(_) => ApiError::not_found(
                "UNKNOWN_SOURCE",
                format!("source {name:?} does not take xAPI statements"),
            ),
            None => unknown_source(name),
        }),
        Some(s) => {
            let bad_version = version.is_none().then(|| {
                ApiError::bad_request(
                    "INVALID_REQUEST",
                    "X-Experience-API-Version must be 1.0.x or 2.0.x",
                    None,
                )
            });
            let refused = bad_version.or(bad_id);
            ingest_into(state, &config, s, req, ip, body, statement_id, refused)
                .await
                .map(|ingested| (version.unwrap_or(LATEST_1_0), ingested))
        }
    };
    match &result {
        Ok((_, ingested)) => {
            let status = if statement_id.is_some() { 204 } else { 200 };
            let first = ingested.stored.first().map(|p| p.event_id.as_str());
            state.observe(label, ip, started, status, "processed", first);
        }
        Err(e) => state.observe(label, ip, started, e.status().as_u16(), e.code(), None),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_answer_their_latest_patch_or_are_refused() {
        let cases = [
            (Some("1.0.3"), Some("1.0.3")),
            (Some("1.0.0"), Some("1.0.3")),
            (Some("1.0"), Some("1.0.3")),
            (Some(" 1.0.1 "), Some("1.0.3")),
            (Some("2.0.0"), Some("2.0.0")),
            (Some("1.1.0"), None),
            (Some("0.95"), None),
            (Some("1.0x"), None),
            (None, None),
        ];
        for (requested, want) in cases {
            assert_eq!(answer_version(requested), want, "{requested:?}");
        }
    }
}
