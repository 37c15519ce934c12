//! Rocket Learning Rewards: LMS webhooks in, learning rewards out.
//!
//! A request's path through the crate:
//! - [`http`]: poem-openapi operations; the hook reads the raw body within
//!   the source's limit and answers with one success or error body.
//! - [`config`]: `sources.d/*.yaml` and `rules/*.rhai`, compiled once.
//! - [`pipeline`]: `verify` (bearer/HMAC on raw bytes), `decode`,
//!   `mapping` (JSONPath to the canonical event), `rules` (rhai scoring).
//! - [`store`]: the idempotent ledger on SQLite or PostgreSQL, written by a
//!   group-commit writer.
//! - [`metrics`], [`levels`], [`settings`]; [`app`] wires it all and runs it.
#![forbid(unsafe_code)]
// `ApiError` is the poem-openapi response enum (every status with its body,
// so the spec lists them); boxing it would hide it from the derive. It is
// built only on error paths.
#![allow(clippy::result_large_err)]

pub mod app;
pub mod cli;
pub mod config;
pub mod http;
pub mod levels;
pub mod metrics;
pub mod net;
pub mod pipeline;
pub mod scoring;
pub mod secrets;
pub mod settings;
pub mod store;
pub mod worker;
