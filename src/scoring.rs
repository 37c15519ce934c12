//! Scoring an event: its source's rules, with the learner's history when a
//! rule reads it. The hook, the queue workers, rescoring and `check` all
//! score through [`score`], so `check` scores exactly as the server does
//! (with an empty history: its cases state theirs).

use crate::config::{Config, Source};
use crate::metrics::Metrics;
use crate::pipeline::mapping::CanonicalEvent;
use crate::pipeline::rules::{self, Award, History, RuleError};
use crate::store::{Store, StoreError};

/// The learner's history, read from the store only when one of the
/// source's rules reads `history` and the event has a canonical type.
pub async fn history(
    store: &Store,
    source: &Source,
    event: &CanonicalEvent,
) -> Result<History, StoreError> {
    history_of(store, source, event, None).await
}

/// [`history`] for an event scored again (`stored`): as it was before this
/// event, without the event itself.
pub async fn history_of(
    store: &Store,
    source: &Source,
    event: &CanonicalEvent,
    stored: Option<crate::store::StoredSelf<'_>>,
) -> Result<History, StoreError> {
    if event.event_type.is_some() && source.rules.iter().any(|r| r.uses_history) {
        store.history(&source.namespace, event, stored).await
    } else {
        Ok(History::default())
    }
}

/// Runs the source's rules on the event: every award, or the rule that
/// failed (then nothing is awarded). Rules that have lately been slow run
/// with their worker thread handed over to the runtime's other tasks
/// (`block_in_place`, on a multi-threaded runtime), so a slow rule (bounded
/// by `rules::limits::MAX_TIME`) delays only its own event; quick ones run
/// in place, which costs nothing.
pub fn score(
    config: &Config,
    source: &Source,
    event: &CanonicalEvent,
    history: &History,
) -> Result<Vec<Award>, RuleError> {
    let run = || rules::score(&config.engine, &source.rules, event, history);
    let slow = event.event_type.is_some() && source.rules.iter().any(|r| r.is_slow());
    off_the_runtime_if(slow, run)
}

/// Runs `f`, first handing this worker thread's other tasks to another
/// thread when `slow` and on a multi-threaded runtime.
fn off_the_runtime_if<R>(slow: bool, f: impl FnOnce() -> R) -> R {
    if !slow {
        return f();
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Counts and logs a rule's failure (the event is stored as failed).
pub fn rule_failed(metrics: &Metrics, source: &str, event_id: Option<&str>, e: &RuleError) {
    metrics.rule_errors.with_label_values(&[&*e.rule]).inc();
    tracing::error!(source, event_id, rule = %e.rule, error = %e.message, "rule failed; event stored as failed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// While a slow run blocks, the runtime's single worker still runs
    /// other tasks: one spawned from inside the run completes before the
    /// run ends. Run in place, that task could not start until it ended.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_slow_run_leaves_the_worker_to_other_tasks() {
        let outcome = tokio::spawn(async {
            off_the_runtime_if(true, || {
                let flag = Arc::new(AtomicBool::new(false));
                let set = flag.clone();
                tokio::spawn(async move { set.store(true, Ordering::SeqCst) });
                // Bounded, so that the failing case ends.
                for _ in 0..2000 {
                    if flag.load(Ordering::SeqCst) {
                        return true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                false
            })
        })
        .await
        .unwrap();
        assert!(
            outcome,
            "the other task did not run while the slow run blocked"
        );
    }
}
