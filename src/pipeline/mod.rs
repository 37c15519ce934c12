//! The pipeline's stages, one a file, each free of the config and the
//! store: [`verify`] (credentials on raw bytes), [`decode`] (JSON, form,
//! xAPI), [`mapping`] (JSONPath to the canonical event), [`rules`] (rhai
//! scoring), [`limits`] (rate buckets, client addresses). `crate::ingest`
//! runs them for a source.

pub mod decode;
pub mod limits;
pub mod mapping;
pub mod rules;
pub mod verify;

use bytes::Bytes;

use decode::DecodeError;
use mapping::{CanonicalEvent, MappingError};
use rules::{Award, RuleError};

/// One event ready to store: canonical form, the raw bytes it came from,
/// and its scoring outcome (awards, or the rule error that failed it).
#[derive(Debug)]
pub struct Prepared {
    pub event: CanonicalEvent,
    pub raw: Bytes,
    pub outcome: Result<Vec<Award>, RuleError>,
    /// The request's headers as stored with the event (JSON, credentials
    /// redacted); `None` where there was no request to keep.
    pub headers: Option<std::sync::Arc<str>>,
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
    /// The request does not fit the statements resource (xAPI).
    #[error("{0}")]
    Statement(String),
    #[error("{}", .error.message())]
    Mapping {
        /// Index of the failing statement in a batch.
        index: Option<usize>,
        error: MappingError,
    },
}
