//! Rocket Learning Rewards: LMS webhooks in, learning rewards out.
//!
//! A hook request's path through the crate, from the socket to the commit:
//! - `net`: the listener's connection limits; [`http`]: poem-openapi
//!   operations. `http::hooks` finds the source and hands the delivery to
//!   `ingest::deliver`: `admit` (allowlist, the address's bucket), then,
//!   with the body read within the source's limit, `deliver`.
//! - `ingest`: the use case, free of HTTP: authenticate, the source's
//!   buckets, decode, map, with the [`pipeline`]'s stages (`verify`,
//!   `decode`, `mapping`, `rules`, `limits`) as [`config`] compiled them;
//!   `scoring` (the rules with the learner's history); the [`store`]:
//!   the idempotent ledger on SQLite or PostgreSQL, written by a
//!   group-commit writer that answers after the commit is on disk;
//!   `metrics` count the outcome.
//! - Then `http::hooks` answers, or turns a refusal into the error body.
//!
//! Around it: `state` (what requests share), [`app`] (startup, reload,
//! shutdown), `worker` (async sources), [`cli`] (the binary's
//! subcommands), [`settings`] and [`secrets`], `levels`; `meter`
//! (the allocator, which meters rule runs' memory).
// Unsafe code only in `meter` (the allocator, delegating to `System`).
#![deny(unsafe_code)]
// `ApiError` is the poem-openapi response enum (every status with its body,
// so the spec lists them); boxing it would hide it from the derive. It is
// built only on error paths.
#![allow(clippy::result_large_err)]

pub mod app;
pub mod cli;
pub mod config;
pub mod http;
mod ingest;
mod levels;
mod meter;
mod metrics;
mod net;
pub mod pipeline;
pub mod replay;
pub mod retention;
mod scoring;
pub mod secrets;
pub mod settings;
mod state;
pub mod store;
pub mod window;
mod worker;

#[global_allocator]
static ALLOCATOR: meter::Metered = meter::Metered;
