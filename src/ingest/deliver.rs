//! One delivery to a source, free of HTTP: [`admit`] before the body is
//! read (allowlist, the client address's bucket), then [`deliver`]
//! (authenticate, the source's and global buckets, decode, map, score with
//! history, per-type buckets, store). Each outcome is counted and logged
//! here, once; the HTTP layer only reads the body and translates the
//! outcome or the [`Refused`] into an answer.

use std::net::IpAddr;

use bytes::Bytes;
use chrono::Utc;
use poem::http::HeaderMap;

use super::{authenticate, decode_body, map_decoded, RequestParts};
use crate::config::raw::Processing;
use crate::config::{Config, Source};
use crate::pipeline::limits::{self, Scope, Standing};
use crate::pipeline::mapping::CanonicalEvent;
use crate::pipeline::rules::RuleError;
use crate::pipeline::verify::AuthError;
use crate::pipeline::{PrepareError, Prepared};
use crate::scoring;
use crate::state::AppState;
use crate::store::{EventStatus, Persisted, StoreError};

/// What a sender presents besides its body.
pub struct Delivery<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub ip: IpAddr,
    /// Pins the id of a `PUT …/statements` statement.
    pub statement_id: Option<&'a str>,
}

/// Why a delivery was refused.
#[derive(Debug)]
pub enum Refused {
    IpNotAllowed,
    RateLimited(limits::Refusal),
    /// A batch holds more events than a bucket's burst: it could never
    /// pass, however long the sender waits.
    BatchOverBurst {
        scope: Scope,
        events: usize,
        burst: u32,
    },
    Unauthorized(AuthError),
    /// The body does not decode or map (the sender's fault).
    Invalid(PrepareError),
    Store(StoreError),
    /// A rule failed: the event is stored as failed, and scored again when
    /// delivered again.
    RuleFailed {
        event_id: String,
    },
}

/// What one delivery stored: each event's outcome with its dedupe key, in
/// the order of the body's documents, and the tightest rate standing.
pub struct Ingested {
    pub stored: Vec<Persisted>,
    pub keys: Vec<String>,
    /// The source takes batches, or this body held several events.
    pub batch: bool,
    pub standing: Option<Standing>,
}

/// Before the body is read: the source's allowlist, and the client
/// address's bucket (the only one spent before authentication, so that
/// strangers cannot use up what the source's senders need).
pub fn admit(state: &AppState, src: &Source, ip: IpAddr) -> Result<Option<Standing>, Refused> {
    if !limits::allowed(ip, &src.allow_ips) {
        state
            .metrics
            .ip_refusals
            .with_label_values(&[src.name.as_str()])
            .inc();
        tracing::warn!(source = %src.name, client_ip = %ip, reason = "ip_not_allowed", "request refused");
        return Err(Refused::IpNotAllowed);
    }
    if !state.settings.rate_limits {
        return Ok(None);
    }
    let ip_bucket = state.limits.ip_bucket(ip);
    rated(
        state,
        src,
        ip,
        limits::check_all([(Scope::Ip, &*ip_bucket)]),
    )
}

/// The rest of a delivery, once its body is read.
pub async fn deliver(
    state: &AppState,
    config: &Config,
    src: &Source,
    d: &Delivery<'_>,
    body: &Bytes,
    address: Option<Standing>,
) -> Result<Ingested, Refused> {
    let parts = RequestParts {
        headers: d.headers,
        query: d.query,
        content_type: d.content_type,
    };
    let decoded = authenticate(src, parts, body, Utc::now().timestamp()).map_err(|e| {
        state
            .metrics
            .auth_failures
            .with_label_values(&[src.name.as_str(), e.reason()])
            .inc();
        tracing::warn!(source = %src.name, client_ip = %d.ip, reason = e.reason(), "authentication failed");
        Refused::Unauthorized(e)
    })?;
    let mut standing = address;
    standing = limits::tighter(standing, charge(state, src, d.ip, 1)?);
    // The content type is checked by decoding, after authentication (the
    // pipeline's order): a stranger learns nothing about the source.
    let decoded = decoded.unwrap_or_else(|| decode_body(src, d.content_type, body));
    let decoded = match d.statement_id {
        None => decoded,
        Some(id) => decoded.and_then(|mut x| x.pin_statement_id(id).map(|()| x)),
    };
    let mapped = decoded
        .and_then(|x| map_decoded(src, x, body, Utc::now()))
        .map_err(Refused::Invalid)?;
    // A batch costs one unit per statement (the request paid for one), and
    // one per event in its type's bucket: charged before scoring reads the
    // store, so a refused batch costs no history reads.
    fits_bursts(state, src, &mapped)?;
    let extra = u32::try_from(mapped.len().saturating_sub(1)).unwrap_or(u32::MAX);
    if extra > 0 {
        standing = limits::tighter(standing, charge(state, src, d.ip, extra)?);
    }
    let types = mapped.iter().map(|(event, _)| event.event_type.as_deref());
    standing = limits::tighter(standing, charge_types(state, src, d.ip, types)?);
    let queued = src.processing == Processing::Async;
    let mut prepared = score_all(state, config, src, mapped, !queued)
        .await
        .map_err(|e| store_refusal(state, e, "history read"))?;
    // Kept once per request: on a batch's first event.
    if let Some(first) = prepared.first_mut() {
        first.headers = Some(super::recorded_headers(src, d.headers));
    }
    store(state, src, prepared, queued, standing).await
}

/// Scores mapped events (when `score`) with the source's rules and the
/// learner's history; the dry run and validation use it too.
pub async fn score_all(
    state: &AppState,
    config: &Config,
    src: &Source,
    mapped: Vec<(CanonicalEvent, Bytes)>,
    score: bool,
) -> Result<Vec<Prepared>, StoreError> {
    let mut out = Vec::with_capacity(mapped.len());
    for (event, raw) in mapped {
        let outcome = if score {
            let history = scoring::history(&state.store, src, &event).await?;
            scoring::score(config, src, &event, &history)
        } else {
            Ok(Vec::new())
        };
        out.push(Prepared {
            event,
            raw,
            outcome,
            headers: None,
        });
    }
    Ok(out)
}

/// Writes the events, counts what was stored, and refuses with the failed
/// event's id when a rule failed (the sender retries; the redelivery
/// re-scores it).
async fn store(
    state: &AppState,
    src: &Source,
    prepared: Vec<Prepared>,
    queued: bool,
    standing: Option<Standing>,
) -> Result<Ingested, Refused> {
    // Each event's metric label and rule error, counted once the store has
    // answered: a redelivery of a processed event was scored too, but its
    // outcome is dropped in favour of the stored one.
    let counted: Vec<(String, Option<RuleError>)> = prepared
        .iter()
        .map(|p| {
            let label = type_label(src, &p.event).to_string();
            (label, p.outcome.as_ref().err().cloned())
        })
        .collect();
    let batch = prepared.len() > 1 || src.batch;
    let keys: Vec<String> = prepared
        .iter()
        .map(|p| p.event.dedupe_key.clone())
        .collect();
    let stored = state
        .store
        .ingest(&src.namespace, prepared, queued)
        .await
        .map_err(|e| store_refusal(state, e, "store write"))?;
    for (p, (label, rule_error)) in stored.iter().zip(&counted) {
        let name = src.name.as_str();
        if let (Some(e), EventStatus::Failed) = (rule_error, p.status) {
            scoring::rule_failed(&state.metrics, name, Some(&p.event_id), e);
        }
        if p.duplicate {
            state.metrics.duplicates.with_label_values(&[name]).inc();
        } else if p.status == EventStatus::Processed {
            state.metrics.events.with_label_values(&[name, label]).inc();
            if p.points > 0 {
                state
                    .metrics
                    .points
                    .with_label_values(&[name])
                    .inc_by(p.points as u64);
            }
        }
    }
    if let Some(failed) = stored.iter().find(|p| p.status == EventStatus::Failed) {
        tracing::error!(source = %src.name, event_id = %failed.event_id, "event stored as failed; answered 500 so the sender retries");
        return Err(Refused::RuleFailed {
            event_id: failed.event_id.clone(),
        });
    }
    if stored.iter().any(|p| p.status == EventStatus::Queued) {
        state.queue_ready.notify_waiters();
    }
    Ok(Ingested {
        stored,
        keys,
        batch,
        standing,
    })
}

/// Takes `n` cells from the source's bucket and the all-hooks bucket.
fn charge(state: &AppState, src: &Source, ip: IpAddr, n: u32) -> Result<Option<Standing>, Refused> {
    if !state.settings.rate_limits {
        return Ok(None);
    }
    let source_bucket = state.limits.source_bucket(&src.name, "", src.rate);
    let checked = limits::check_all_n(
        [
            (Scope::Source, &*source_bucket),
            (Scope::Global, &state.limits.global),
        ],
        n,
    );
    rated(state, src, ip, checked)
}

/// Refuses a batch with more events than the source's, the all-hooks or
/// an event type's burst: no wait would let it through.
fn fits_bursts<T>(
    state: &AppState,
    src: &Source,
    mapped: &[(CanonicalEvent, T)],
) -> Result<(), Refused> {
    if !state.settings.rate_limits || mapped.len() < 2 {
        return Ok(());
    }
    let over = |scope, events: usize, burst: u32| {
        (events > burst as usize).then_some(Refused::BatchOverBurst {
            scope,
            events,
            burst,
        })
    };
    let n = mapped.len();
    let refusal = over(Scope::Source, n, src.rate.burst)
        .or_else(|| over(Scope::Global, n, state.limits.global.spec().burst));
    if let Some(r) = refusal {
        return Err(r);
    }
    let mut per_type: std::collections::HashMap<&str, usize> = Default::default();
    for (event, _) in mapped {
        let rated = event
            .event_type
            .as_deref()
            .and_then(|t| src.event_type_rates.get_key_value(t));
        if let Some((kind, spec)) = rated {
            let count = per_type.entry(kind).or_default();
            *count += 1;
            if let Some(r) = over(Scope::EventType, *count, spec.burst) {
                return Err(r);
            }
        }
    }
    Ok(())
}

/// Takes a cell per event from its canonical type's bucket, if it has one.
fn charge_types<'a>(
    state: &AppState,
    src: &Source,
    ip: IpAddr,
    types: impl Iterator<Item = Option<&'a str>>,
) -> Result<Option<Standing>, Refused> {
    let mut standing = None;
    if !state.settings.rate_limits || src.event_type_rates.is_empty() {
        return Ok(standing);
    }
    for kind in types {
        let Some((kind, spec)) = kind.and_then(|t| src.event_type_rates.get_key_value(t)) else {
            continue;
        };
        let bucket = state.limits.source_bucket(&src.name, kind, *spec);
        let checked = bucket.check(Scope::EventType).map(Some);
        standing = limits::tighter(standing, rated(state, src, ip, checked)?);
    }
    Ok(standing)
}

/// Counts a rate check's outcome; a refusal is logged and refused.
fn rated(
    state: &AppState,
    src: &Source,
    ip: IpAddr,
    checked: Result<Option<Standing>, limits::Refusal>,
) -> Result<Option<Standing>, Refused> {
    match checked {
        Ok(standing) => {
            if let Some(s) = standing {
                state
                    .metrics
                    .rate_utilization
                    .with_label_values(&[s.scope.label()])
                    .set(s.utilization());
            }
            Ok(standing)
        }
        Err(r) => {
            let scope = r.scope.label();
            state.metrics.rate_limited.with_label_values(&[scope]).inc();
            state
                .metrics
                .rate_utilization
                .with_label_values(&[scope])
                .set(1.0);
            tracing::warn!(source = %src.name, client_ip = %ip, reason = "rate_limited", scope, "request refused");
            Err(Refused::RateLimited(r))
        }
    }
}

/// Counts and logs a store failure.
fn store_refusal(state: &AppState, e: StoreError, what: &str) -> Refused {
    state.metrics.store_errors.inc();
    tracing::error!(error = %e, "{what} failed");
    Refused::Store(e)
}

/// The metric label for an event's type: a canonical type from the source's
/// table, `other` for a passthrough name, `unmapped` for none.
pub fn type_label<'a>(src: &'a Source, event: &'a CanonicalEvent) -> &'a str {
    match &event.event_type {
        None => "unmapped",
        Some(t) => src.mapping.event_type.label(t),
    }
}
