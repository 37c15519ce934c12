//! The one error body. Every error the server answers, including poem's own
//! parse errors, 404s and 405s, has the shape
//! `{"status":"error","error":CODE,"error_code":CODE,"message":…,"details":…}`.
//! 500s are opaque to the client; their cause is logged.

use poem::http::StatusCode;
use poem::Response;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};
use serde_json::Value;

/// The error body.
#[derive(Debug, Clone, Object, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// Always `error`.
    pub status: String,
    /// Machine-readable code, e.g. `AUTHENTICATION_FAILED`.
    pub error: String,
    /// The same code, for clients that read `error_code`.
    pub error_code: String,
    /// A human-readable explanation; never a secret, a signature or a body.
    pub message: String,
    /// Structured detail, e.g. `missing_fields` and `invalid_fields`; an
    /// empty object when there is none.
    pub details: Value,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>, details: Option<Value>) -> Self {
        Self {
            status: "error".into(),
            error: code.into(),
            error_code: code.into(),
            message: message.into(),
            details: details.unwrap_or_else(|| Value::Object(Default::default())),
        }
    }
}

/// Every error status an operation can answer, each with the error body.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The payload is malformed or fails validation.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// Authentication failed.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The client's address is not allowed.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// Unknown source or event.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The body did not arrive in time.
    #[oai(status = 408)]
    RequestTimeout(Json<ErrorBody>),
    /// The body is larger than the source allows.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The content type is not accepted by the source.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// Rate limited; `Retry-After` says when to come back (seconds).
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// Internal error; the cause is logged, not returned.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// Not ready (starting, draining, or the store is unreachable).
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

impl ApiError {
    fn body(code: &str, message: impl Into<String>, details: Option<Value>) -> Json<ErrorBody> {
        Json(ErrorBody::new(code, message, details))
    }
    pub fn bad_request(code: &str, message: impl Into<String>, details: Option<Value>) -> Self {
        ApiError::BadRequest(Self::body(code, message, details))
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::Unauthorized(Self::body("AUTHENTICATION_FAILED", message, None))
    }
    pub fn not_found(code: &str, message: impl Into<String>) -> Self {
        ApiError::NotFound(Self::body(code, message, None))
    }
    pub fn ip_not_allowed() -> Self {
        ApiError::Forbidden(Self::body(
            "IP_NOT_ALLOWED",
            "this client address is not allowed to post to this source",
            None,
        ))
    }
    pub fn rate_limited(scope: &str, retry_after: u64) -> Self {
        ApiError::TooManyRequests(
            Self::body(
                "RATE_LIMITED",
                format!("rate limit exceeded ({scope}); retry after {retry_after} s"),
                Some(serde_json::json!({ "scope": scope, "retry_after": retry_after })),
            ),
            retry_after,
        )
    }
    pub fn body_timeout() -> Self {
        ApiError::RequestTimeout(Self::body(
            "REQUEST_TIMEOUT",
            "the request body did not arrive in time",
            None,
        ))
    }
    pub fn too_large(limit: usize) -> Self {
        ApiError::PayloadTooLarge(Self::body(
            "PAYLOAD_TOO_LARGE",
            format!("the body exceeds this source's limit of {limit} bytes"),
            Some(serde_json::json!({ "max_body_bytes": limit })),
        ))
    }
    pub fn batch_over_burst(scope: &str, events: usize, burst: u32) -> Self {
        ApiError::PayloadTooLarge(Self::body(
            "PAYLOAD_TOO_LARGE",
            format!(
                "the batch holds {events} events but the {scope} rate limit lets at most {burst} through at once; send smaller batches"
            ),
            Some(serde_json::json!({ "scope": scope, "events": events, "burst": burst })),
        ))
    }
    pub fn unsupported_media_type(message: impl Into<String>, accepted: &[String]) -> Self {
        ApiError::UnsupportedMediaType(Self::body(
            "UNSUPPORTED_MEDIA_TYPE",
            message,
            Some(serde_json::json!({ "accepted": accepted })),
        ))
    }
    /// An opaque 500; log the cause before calling.
    pub fn internal(details: Option<Value>) -> Self {
        ApiError::Internal(Self::body(
            "INTERNAL_ERROR",
            "an internal error occurred; it has been logged",
            details,
        ))
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::Unavailable(Self::body("NOT_READY", message, None))
    }
    /// The store cannot take writes now: nothing was stored, retry later.
    pub fn store_unavailable(reason: &str) -> Self {
        ApiError::Unavailable(Self::body(
            "STORE_UNAVAILABLE",
            format!("nothing was stored: {reason}"),
            None,
        ))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &str {
        match self {
            ApiError::BadRequest(b)
            | ApiError::Unauthorized(b)
            | ApiError::Forbidden(b)
            | ApiError::NotFound(b)
            | ApiError::RequestTimeout(b)
            | ApiError::PayloadTooLarge(b)
            | ApiError::UnsupportedMediaType(b)
            | ApiError::TooManyRequests(b, _)
            | ApiError::Internal(b)
            | ApiError::Unavailable(b) => &b.0.error,
        }
    }
}

/// The code for an error poem raised itself (routing, parameter parsing).
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "INVALID_REQUEST",
        StatusCode::UNAUTHORIZED => "AUTHENTICATION_FAILED",
        StatusCode::FORBIDDEN => "FORBIDDEN",
        StatusCode::NOT_FOUND => "NOT_FOUND",
        StatusCode::REQUEST_TIMEOUT => "REQUEST_TIMEOUT",
        StatusCode::METHOD_NOT_ALLOWED => "METHOD_NOT_ALLOWED",
        StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "UNSUPPORTED_MEDIA_TYPE",
        StatusCode::TOO_MANY_REQUESTS => "RATE_LIMITED",
        StatusCode::SERVICE_UNAVAILABLE => "NOT_READY",
        s if s.is_client_error() => "INVALID_REQUEST",
        _ => "INTERNAL_ERROR",
    }
}

/// Turns any error that reached the top into the one error body. Responses
/// that already carry it (JSON) pass through; poem's plain-text errors are
/// rewrapped, with 5xx messages replaced by an opaque one.
pub async fn into_error_body(err: poem::Error) -> Response {
    let resp = err.into_response();
    let is_json = resp
        .headers()
        .get(poem::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let status = resp.status();
    let message = if status.is_server_error() {
        tracing::error!(status = status.as_u16(), "internal error");
        "an internal error occurred; it has been logged".to_string()
    } else {
        let text = resp.into_body().into_string().await.unwrap_or_default();
        if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_string()
        } else {
            text
        }
    };
    json_error(status, code_for(status), &message)
}

/// A response carrying the error body.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = ErrorBody::new(code, message, None);
    Response::builder()
        .status(status)
        .content_type("application/json; charset=utf-8")
        .body(serde_json::to_vec(&body).unwrap_or_default())
}
