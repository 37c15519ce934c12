//! Workers for async sources: claim queued events, score them with the
//! source's current rules, and record the outcome (retried with backoff, then
//! `failed`). Several workers, and the workers of several instances on one
//! PostgreSQL, share the queue without double awards (see `store::queue`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::pipeline::mapping::CanonicalEvent;
use crate::scoring;
use crate::state::AppState;
use crate::store::Claimed;

/// Events one worker claims at a time.
const CLAIM: i64 = 16;
/// How often an idle worker looks for due events (retries, other instances).
const POLL: Duration = Duration::from_millis(500);

/// The longest wait between claims while they keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs until the server stops or drains. While claims keep failing (a
/// store that cannot be written), waits twice as long each time, up to
/// [`MAX_BACKOFF`], and logs the failure once and the recovery once.
pub async fn run(state: Weak<AppState>) {
    let mut failures = 0u32;
    loop {
        let Some(s) = state.upgrade() else { return };
        if s.draining.load(Ordering::Relaxed) {
            return;
        }
        let claimed = match s.store.claim(CLAIM).await {
            Ok(c) => {
                if failures > 0 {
                    tracing::info!(failures, "queue claims succeed again");
                    failures = 0;
                }
                c
            }
            Err(e) => {
                s.metrics.store_errors.inc();
                if failures == 0 {
                    tracing::error!(error = %e, "queue claim failed; backing off until claims succeed");
                }
                failures = failures.saturating_add(1);
                drop(s);
                let wait = POLL.saturating_mul(1 << failures.min(6)).min(MAX_BACKOFF);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        if !claimed.is_empty() {
            for c in claimed {
                process(&s, c).await;
            }
            continue;
        }
        let wake = Arc::clone(&s);
        drop(s);
        tokio::select! {
            _ = wake.queue_ready.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn process(state: &AppState, c: Claimed) {
    let config = state.config.load_full();
    let outcome = match (
        config.source(&c.source),
        serde_json::from_str::<CanonicalEvent>(&c.canonical),
    ) {
        (None, _) => Err(format!("source {:?} is no longer configured", c.source)),
        (_, Err(e)) => Err(format!("the stored canonical event cannot be read: {e}")),
        (Some(src), Ok(ev)) => {
            let history = match scoring::history(&state.store, src, &ev).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(event_id = %c.id, error = %e, "history read failed; retrying later");
                    state.metrics.store_errors.inc();
                    return; // the claim expires and the event is taken again
                }
            };
            let scored = scoring::score(&config, src, &ev, &history);
            if let Err(e) = &scored {
                scoring::rule_failed(&state.metrics, &src.name, Some(&c.id), e);
            }
            scored
                .map_err(|e| e.to_string())
                .map(|awards| (awards, ev, src.clone()))
        }
    };
    let (result, label) = match outcome {
        Ok((awards, ev, src)) => {
            let label = crate::ingest::deliver::type_label(&src, &ev).to_string();
            (Ok(awards), Some((label, src)))
        }
        Err(e) => (Err(e), None),
    };
    let points: i64 = result
        .as_ref()
        .map(|a| a.iter().map(|a| a.points).sum())
        .unwrap_or(0);
    match state.store.complete(&c, result).await {
        Ok(true) => {
            if let Some((label, src)) = label {
                state
                    .metrics
                    .events
                    .with_label_values(&[src.name.as_str(), &label])
                    .inc();
                if points > 0 {
                    state
                        .metrics
                        .points
                        .with_label_values(&[src.name.as_str()])
                        .inc_by(points as u64);
                }
                tracing::info!(source = %src.name, event_id = %c.id, points, "queued event processed");
            }
        }
        Ok(false) => tracing::warn!(event_id = %c.id, "claim lost; another worker took the event"),
        Err(e) => {
            state.metrics.store_errors.inc();
            tracing::error!(event_id = %c.id, error = %e, "recording a queued event failed; it will be retried");
        }
    }
}
