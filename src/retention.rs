//! Retention: the server drops raw bodies and request headers, and deletes
//! zero-point events, once they are older than their source's `retention`
//! (or the server's `ROCKET_RETAIN_*` settings) says. A pass runs shortly
//! after startup and then every [`EVERY`], a small batch at a time with a
//! pause between batches, so the hook's writer is never held up for long.
//! Ledger entries and totals are never pruned. Counted in
//! `rocket_retention_pruned_total{what}`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::state::AppState;
use crate::store::events::first_id_at;
use crate::store::retention::Prune;
use crate::store::StoreError;

/// Time between passes.
pub const EVERY: Duration = Duration::from_secs(600);
/// Events examined per batch (one short transaction).
const BATCH: i64 = 200;
/// Pause between batches: the writer gets the lock in between.
const PAUSE: Duration = Duration::from_millis(20);
const DAY_MS: i64 = 86_400_000;

/// What one pass pruned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub raw: u64,
    pub events: u64,
}

/// Runs passes until the server stops or drains.
pub async fn run(state: Weak<AppState>) {
    tokio::time::sleep(Duration::from_secs(60)).await;
    loop {
        let Some(s) = state.upgrade() else { return };
        if s.draining.load(Ordering::Relaxed) {
            return;
        }
        match prune(&s).await {
            Ok(p) if p.raw + p.events > 0 => {
                tracing::info!(raw = p.raw, events = p.events, "retention pass pruned")
            }
            Ok(_) => {}
            Err(e) => {
                s.metrics.store_errors.inc();
                tracing::warn!(error = %e, "retention pass failed; trying again next pass");
            }
        }
        drop(s);
        tokio::time::sleep(EVERY).await;
    }
}

/// One pass over every loaded source whose retention is set.
pub async fn prune(state: &Arc<AppState>) -> Result<Pruned, StoreError> {
    let config = state.config.load_full();
    let now = chrono::Utc::now().timestamp_millis();
    let mut pruned = Pruned::default();
    for src in config.sources.values() {
        let keep = src.retention.or(state.settings.retention);
        let kinds = [
            (Prune::Raw, keep.raw_days),
            (Prune::ZeroPointEvents, keep.zero_point_events_days),
        ];
        for (what, days) in kinds {
            let Some(days) = days else { continue };
            let cutoff = first_id_at(now - i64::from(days) * DAY_MS);
            let n = prune_source(state, &src.name, what, &cutoff).await?;
            match what {
                Prune::Raw => pruned.raw += n,
                Prune::ZeroPointEvents => pruned.events += n,
            }
        }
    }
    Ok(pruned)
}

async fn prune_source(
    state: &AppState,
    source: &str,
    what: Prune,
    cutoff: &str,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        if state.draining.load(Ordering::Relaxed) {
            return Ok(total);
        }
        let batch = state.store.prune_batch(source, what, cutoff, BATCH).await?;
        total += batch.pruned;
        state
            .metrics
            .retention_pruned
            .with_label_values(&[what.label()])
            .inc_by(batch.pruned);
        if batch.examined < BATCH as u64 {
            return Ok(total);
        }
        tokio::time::sleep(PAUSE).await;
    }
}
