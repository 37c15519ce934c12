//! Keeps the leaderboards' trailing window (see [`crate::store::leaderboards`])
//! at seven days before now: moved at startup, then every [`EVERY`]. A
//! window that falls behind (a store that refused the move) is never wrong,
//! only not used: the leaderboard aggregates the ledger instead.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use crate::state::AppState;
use crate::store::leaderboards::RECENT_WINDOW_MS;
use crate::store::StoreError;

/// Time between moves.
pub const EVERY: Duration = Duration::from_secs(60);

/// The window's start for a time: seven days before it, to the minute.
pub fn start_for(now_ms: i64) -> i64 {
    (now_ms - RECENT_WINDOW_MS).div_euclid(60_000) * 60_000
}

/// How far a window starting at `start` is from [`start_for`] `now_ms`, in
/// seconds: the `rocket_leaderboard_window_lag_seconds` gauge. A window
/// never built (its start in the far future) is infinitely far.
pub fn lag_seconds(start: Option<i64>, now_ms: i64) -> f64 {
    match start {
        Some(start) if start < i64::MAX => start.abs_diff(start_for(now_ms)) as f64 / 1000.0,
        _ => f64::INFINITY,
    }
}

/// The most ledger rows one move adds or subtracts.
const STEP_ROWS: i64 = 20_000;

/// Moves the window's start to `to_ms` (the task's step; tests call it to
/// put the window where they need it). A long way (a new window, which
/// starts in the far future, or one a stopped server left behind) is gone
/// [`STEP_ROWS`] ledger rows at a time, each step a transaction of its
/// own, so the hook's writers can write between steps; a small ledger takes
/// one step. Each step holds them off while it sums its rows: on a large
/// PostgreSQL ledger whose pages are not cached, about as long as reading
/// those rows (docs/performance.md, 2026-12-01, later).
pub async fn move_to(state: &AppState, to_ms: i64) -> Result<(), StoreError> {
    let began = std::time::Instant::now();
    let mut steps = 0u32;
    let mut first = None;
    while let Some(start) = state.store.recent_window_start().await? {
        first.get_or_insert(start);
        if start == to_ms {
            break;
        }
        let next = state
            .store
            .recent_window_step(start, to_ms, STEP_ROWS)
            .await?;
        state.store.move_recent_window(next).await?;
        steps += 1;
    }
    // A long way is worth a line: a first build after an upgrade or a bulk
    // load, or a server back after a long stop (not a minute's move that
    // took two steps because that minute of the ledger was busy).
    let far = first.is_some_and(|f| f.abs_diff(to_ms) > 2 * EVERY.as_millis() as u64);
    if far {
        tracing::info!(
            steps,
            ms = began.elapsed().as_millis() as u64,
            "moved the leaderboards' seven-day window"
        );
    }
    Ok(())
}

/// Moves the window until the server stops or drains.
pub async fn run(state: Weak<AppState>) {
    loop {
        let Some(s) = state.upgrade() else { return };
        if s.draining.load(Ordering::Relaxed) {
            return;
        }
        let to = start_for(chrono::Utc::now().timestamp_millis());
        if let Err(e) = move_to(&s, to).await {
            tracing::warn!(error = %e, "could not move the leaderboards' seven-day window");
        }
        drop(s);
        tokio::time::sleep(EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_is_the_distance_either_way_and_infinite_before_a_build() {
        let now = 1_000 * 86_400_000 + 30_000;
        let target = start_for(now);
        assert_eq!(target % 60_000, 0);
        assert_eq!(lag_seconds(Some(target), now), 0.0);
        assert_eq!(lag_seconds(Some(target - 90_000), now), 90.0);
        assert_eq!(lag_seconds(Some(target + 90_000), now), 90.0);
        assert_eq!(lag_seconds(Some(i64::MAX), now), f64::INFINITY);
        assert_eq!(lag_seconds(None, now), f64::INFINITY);
    }
}
