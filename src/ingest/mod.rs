//! The ingest use case for one source, free of HTTP: authenticate a
//! request's credentials, decode its body (by Content-Type or the source's
//! fallbacks), map each document to a canonical event, and score it.
//! `http::hooks` reads the body and answers; `check` runs a source's test
//! cases through the same functions ([`selftest`]).

pub mod deliver;
pub mod selftest;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::config::{Config, Source};
use crate::pipeline::decode::{self, DecodeError};
use crate::pipeline::mapping::{self, CanonicalEvent};
use crate::pipeline::rules::History;
use crate::pipeline::{verify, PrepareError, Prepared};

/// Decodes (unless [`authenticate`] already did), maps and scores a
/// verified body with `source`'s mapping and rules, with an empty history.
pub fn prepare(
    config: &Config,
    source: &Source,
    decoded: Option<Result<Decoded, PrepareError>>,
    content_type: Option<&str>,
    body: &Bytes,
    now: DateTime<Utc>,
) -> Result<Vec<Prepared>, PrepareError> {
    let mapped = map_verified(source, decoded, content_type, body, now)?;
    Ok(mapped
        .into_iter()
        .map(|(event, raw)| {
            let outcome = crate::scoring::score(config, source, &event, &History::default());
            Prepared {
                event,
                raw,
                outcome,
                headers: None,
            }
        })
        .collect())
}

/// What a request presents besides its body.
#[derive(Clone, Copy)]
pub struct RequestParts<'a> {
    pub headers: &'a poem::http::HeaderMap,
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
}

/// Authenticates a request against the source's schemes (any one that
/// verifies). A source that takes a token in a body field has the token
/// looked for only when no other scheme verifies, by a scan of the body
/// that builds nothing (see [`decode::find_token`]); once authenticated,
/// its body is decoded and the token field taken out whichever scheme
/// verified, and comes back for [`map_verified`], so the token never
/// reaches the mapping or the store.
pub fn authenticate(
    source: &Source,
    parts: RequestParts<'_>,
    body: &[u8],
    now: i64,
) -> Result<Option<Result<Decoded, PrepareError>>, verify::AuthError> {
    let body_scheme = source
        .auth
        .iter()
        .find(|a| matches!(a, verify::AuthScheme::BodyField { .. }));
    let presented = verify::Presented {
        headers: parts.headers,
        query: parts.query,
        body,
        body_token: None,
    };
    let verified = verify::verify_any(&source.auth, &presented, now);
    let Some(scheme @ verify::AuthScheme::BodyField { field, .. }) = body_scheme else {
        return verified.map(|()| None);
    };
    if let Err(first) = verified {
        // Only the body-token scheme can change its answer once the token
        // is found: the others (an HMAC over the body too) ran already.
        let token = candidate_formats(source, parts.content_type)
            .into_iter()
            .find_map(|format| decode::find_token(format, body, field));
        let with_token = verify::Presented {
            body_token: token.as_deref(),
            ..presented
        };
        verify::verify_any(std::slice::from_ref(scheme), &with_token, now)
            .map_err(|e| verify::rank(first, e))?;
    }
    Ok(Some(decode_body(source, parts.content_type, body).map(
        |mut d| {
            d.take_token(field);
            d
        },
    )))
}

/// The formats a body may be in, in the order they are tried.
fn candidate_formats(source: &Source, content_type: Option<&str>) -> Vec<decode::BodyFormat> {
    let declared = content_type.and_then(decode::format_of);
    let untyped = declared.is_none() || declared == Some(decode::BodyFormat::Form);
    if untyped && !source.fallback_formats.is_empty() {
        source.fallback_formats.clone()
    } else {
        let ct = source.content_type_of(content_type);
        decode::format_of(ct).into_iter().collect()
    }
}

/// Maps an authenticated body: decoded by [`authenticate`], or now.
pub fn map_verified(
    source: &Source,
    decoded: Option<Result<Decoded, PrepareError>>,
    content_type: Option<&str>,
    body: &Bytes,
    now: DateTime<Utc>,
) -> Result<Vec<(CanonicalEvent, Bytes)>, PrepareError> {
    let decoded = match decoded {
        Some(d) => d?,
        None => decode_body(source, content_type, body)?,
    };
    map_decoded(source, decoded, body, now)
}

/// A body decoded for a source: its documents, and how to tell the bytes
/// each is stored as.
#[derive(Debug)]
pub struct Decoded {
    pub format: decode::BodyFormat,
    pub docs: Vec<serde_json::Value>,
    /// The body was a JSON array: each statement is stored on its own.
    array: bool,
    /// A field was taken out (a body token): documents are stored
    /// re-encoded, without it.
    redacted: bool,
}

impl Decoded {
    /// For `PUT …/statements?statementId=`: the body must be one statement,
    /// which takes that id, or already carries it (xAPI 1.0.3, Communication
    /// 2.1.1: "the id property of the Statement MUST match the statementId").
    pub fn pin_statement_id(&mut self, id: &str) -> Result<(), PrepareError> {
        let ([statement], false) = (self.docs.as_mut_slice(), self.array) else {
            return Err(PrepareError::Statement(
                "PUT takes one statement, not an array".into(),
            ));
        };
        let Some(map) = statement.as_object_mut() else {
            return Err(PrepareError::Statement(
                "a statement is a JSON object".into(),
            ));
        };
        match map.get("id") {
            None => {
                map.insert("id".into(), serde_json::Value::String(id.to_string()));
                Ok(())
            }
            Some(serde_json::Value::String(own)) if own.eq_ignore_ascii_case(id) => Ok(()),
            Some(_) => Err(PrepareError::Statement(
                "the statement's id differs from statementId".into(),
            )),
        }
    }

    /// Takes a body token out of the (first) document; see
    /// [`verify::take_body_token`].
    pub fn take_token(&mut self, field: &[String]) -> Option<String> {
        let token = verify::take_body_token(self.docs.first_mut()?, field);
        self.redacted |= token.is_some();
        token
    }
}

/// Decodes a body for `source`: by its `Content-Type`; or, when the request
/// has none or says form data (which some plugins put on JSON), by the
/// source's fallback formats in order; else as its first content type. xAPI
/// sources get their statements normalised (see
/// [`decode::normalise_statement`]).
pub fn decode_body(
    source: &Source,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Decoded, PrepareError> {
    if !source.accepts(content_type) {
        return Err(PrepareError::UnsupportedMediaType(
            content_type.unwrap_or("").to_string(),
        ));
    }
    let formats = candidate_formats(source, content_type);
    if formats.is_empty() {
        let ct = source.content_type_of(content_type);
        return Err(PrepareError::UnsupportedMediaType(ct.to_string()));
    }
    let mut failure = DecodeError::Empty;
    let mut found = None;
    for &format in &formats {
        match decode::decode(format, body, source.batch) {
            Ok(docs) => {
                found = Some((format, docs));
                break;
            }
            Err(e) => failure = e,
        }
    }
    let (format, mut docs) = match found {
        Some(found) => found,
        // One format says why; several, that the body is none of them.
        None if formats.len() == 1 || failure == DecodeError::Empty => return Err(failure.into()),
        None => return Err(DecodeError::Untyped(decode::names(&formats)).into()),
    };
    if source.xapi {
        docs.iter_mut().for_each(decode::normalise_statement);
    }
    let array = source.batch && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    Ok(Decoded {
        format,
        docs,
        array,
        redacted: false,
    })
}

/// Maps decoded documents: each event with the bytes it is stored as (the
/// body as received; a batch's statements each on their own; a redacted
/// document re-encoded).
pub fn map_decoded(
    source: &Source,
    decoded: Decoded,
    body: &Bytes,
    now: DateTime<Utc>,
) -> Result<Vec<(CanonicalEvent, Bytes)>, PrepareError> {
    let mut decoded = decoded;
    if source.xapi {
        for doc in &mut decoded.docs {
            decode::assign_statement_id(doc);
        }
    }
    let single = decoded.docs.len() == 1;
    let mut out = Vec::with_capacity(decoded.docs.len());
    for (i, doc) in decoded.docs.iter().enumerate() {
        let raw = if decoded.redacted {
            Bytes::from(decode::encode(decoded.format, doc))
        } else if decoded.array {
            Bytes::from(serde_json::to_vec(doc).unwrap_or_default())
        } else {
            body.clone()
        };
        let event =
            mapping::map_event(&source.name, &source.mapping, doc, &raw, now).map_err(|error| {
                PrepareError::Mapping {
                    index: (!single).then_some(i),
                    error,
                }
            })?;
        out.push((event, raw));
    }
    Ok(out)
}

/// Decodes and maps a verified body: each event with the raw bytes it came from.
pub fn map_body(
    source: &Source,
    content_type: Option<&str>,
    body: &Bytes,
    now: DateTime<Utc>,
) -> Result<Vec<(CanonicalEvent, Bytes)>, PrepareError> {
    map_decoded(source, decode_body(source, content_type, body)?, body, now)
}

/// Headers kept with each stored event, and how much of each.
const MAX_RECORDED_HEADERS: usize = 64;
const MAX_RECORDED_VALUE: usize = 1024;
/// Always redacted, whatever the source's schemes.
const ALWAYS_REDACTED: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// The request's headers as stored with its events (a JSON object, names
/// in lower case, repeated headers joined with `, `): the values of the
/// headers that carry a credential (the source's schemes', `Authorization`
/// and `Cookie` always, and any that holds the source's query-token
/// parameter) replaced by `[redacted]`, values cut at 1 KiB, at most 64
/// headers.
pub fn recorded_headers(source: &Source, headers: &poem::http::HeaderMap) -> std::sync::Arc<str> {
    // A proxy may copy the URL, query token and all, into a header
    // (`X-Original-URI`, `X-Forwarded-Uri`, `Referer`).
    let redacted = |name: &str, value: &[u8]| {
        ALWAYS_REDACTED.contains(&name)
            || source.auth.iter().any(|a| {
                a.credential_header()
                    .is_some_and(|h| h.eq_ignore_ascii_case(name))
                    || a.query_param().is_some_and(|p| names_query_param(value, p))
            })
    };
    let mut out = serde_json::Map::new();
    for (name, value) in headers {
        let name = name.as_str();
        let value = if redacted(name, value.as_bytes()) {
            "[redacted]".to_string()
        } else {
            let text = String::from_utf8_lossy(value.as_bytes());
            let mut end = text.len().min(MAX_RECORDED_VALUE);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text[..end].to_string()
        };
        let full = out.len() >= MAX_RECORDED_HEADERS;
        match out.get_mut(name) {
            Some(serde_json::Value::String(v)) => {
                v.push_str(", ");
                v.push_str(&value);
            }
            _ if full => {}
            _ => {
                out.insert(name.to_string(), serde_json::Value::String(value));
            }
        }
    }
    serde_json::Value::Object(out).to_string().into()
}

/// Whether a header value holds a URL query naming `param`, as the
/// authentication reads a query (percent-decoded keys), also when the
/// value itself is percent-encoded (`…%3Ftoken%3D…`).
fn names_query_param(value: &[u8], param: &str) -> bool {
    // Most headers hold neither: no parsing for them.
    if !value.iter().any(|b| matches!(b, b'=' | b'%')) {
        return false;
    }
    let names = |text: &[u8]| {
        let query = match text.iter().position(|b| *b == b'?') {
            Some(i) => &text[i + 1..],
            None => text,
        };
        form_urlencoded::parse(query).any(|(k, _)| k == param)
    };
    names(value) || names(&percent_decoded(value))
}

fn percent_decoded(value: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        match (
            value[i],
            value.get(i + 1).copied().and_then(hex),
            value.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_token_is_found_however_the_url_is_written() {
        let p = "token";
        assert!(names_query_param(b"/hook?token=s", p));
        assert!(names_query_param(b"/hook?a=1&%74oken=s", p));
        assert!(names_query_param(b"/hook%3Fa%3D1%26token%3Ds", p));
        assert!(!names_query_param(b"/hook?tokens=s", p));
        assert!(!names_query_param(b"text/html", p));
    }
}
