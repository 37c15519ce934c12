//! The request pipeline, one stage a file: [`verify`] (auth on raw bytes),
//! [`decode`] (JSON, form, xAPI batch), [`mapping`] (JSONPath to the
//! canonical event), [`rules`] (rhai scoring). [`prepare`] runs decode, map
//! and score for a verified body; persisting is the store's.

pub mod decode;
pub mod limits;
pub mod mapping;
pub mod rules;
pub mod verify;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::config::{Config, Source};
use decode::DecodeError;
use mapping::{CanonicalEvent, MappingError};
use rules::{Award, History, RuleError};

/// One event ready to store: canonical form, the raw bytes it came from,
/// and its scoring outcome (awards, or the rule error that failed it).
#[derive(Debug)]
pub struct Prepared {
    pub event: CanonicalEvent,
    pub raw: Bytes,
    pub outcome: Result<Vec<Award>, RuleError>,
}

impl Prepared {
    pub fn points(&self) -> i64 {
        self.outcome
            .as_ref()
            .map(|a| a.iter().map(|a| a.points).sum())
            .unwrap_or(0)
    }
}

/// Why a verified body cannot become events: the sender's fault, a 4xx.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("content type {0:?} is not accepted by this source")]
    UnsupportedMediaType(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("{}", .error.message())]
    Mapping {
        /// Index of the failing statement in a batch.
        index: Option<usize>,
        error: MappingError,
    },
}

/// Decodes, maps and scores a verified body with `source`'s mapping and rules.
pub fn prepare(
    config: &Config,
    source: &Source,
    content_type: Option<&str>,
    body: &Bytes,
    now: DateTime<Utc>,
) -> Result<Vec<Prepared>, PrepareError> {
    let mapped = map_body(source, content_type, body, now)?;
    Ok(mapped
        .into_iter()
        .map(|(event, raw)| {
            let outcome = rules::score(&config.engine, &source.rules, &event, &History::default());
            Prepared {
                event,
                raw,
                outcome,
            }
        })
        .collect())
}

/// Decodes and maps a verified body: each event with the raw bytes it came from.
pub fn map_body(
    source: &Source,
    content_type: Option<&str>,
    body: &Bytes,
    now: DateTime<Utc>,
) -> Result<Vec<(CanonicalEvent, Bytes)>, PrepareError> {
    if !source.accepts(content_type) {
        return Err(PrepareError::UnsupportedMediaType(
            content_type.unwrap_or("").to_string(),
        ));
    }
    let ct = source.content_type_of(content_type);
    let format =
        decode::format_of(ct).ok_or_else(|| PrepareError::UnsupportedMediaType(ct.to_string()))?;
    let docs = decode::decode(format, body, source.batch)?;
    let single = docs.len() == 1;
    let batch_raw = source.batch && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let mut out = Vec::with_capacity(docs.len());
    for (i, doc) in docs.iter().enumerate() {
        // A batch stores each statement on its own, not the whole body N times.
        let raw = if batch_raw {
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
