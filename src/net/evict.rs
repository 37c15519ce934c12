//! Which open connections are idle, and since when, so that at the global
//! connection cap the one idle longest is closed to make room for a new
//! client instead of the new client waiting in the backlog.
//!
//! A connection is idle from its accept until its first request starts,
//! and from each response until the next request starts; HTTP/2
//! connections are busy once their preface arrives (their streams are not
//! visible here).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::Instant;

/// Every open connection's mark.
pub(super) struct Idleness {
    conns: Mutex<HashMap<u64, Arc<Mark>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

/// One connection's idleness, shared with the acceptor.
#[derive(Default)]
struct Mark {
    /// Nanoseconds since the epoch plus one at which it went idle; 0 when busy.
    idle_since: AtomicU64,
    /// Set by the acceptor: close at the next read while still idle.
    evict: AtomicBool,
    /// The connection's task, woken to notice `evict`.
    waker: Mutex<Option<Waker>>,
}

impl Idleness {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            conns: Mutex::default(),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Registers a new connection, idle from now.
    pub(super) fn track(self: &Arc<Self>) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mark = Arc::new(Mark::default());
        let tracked = Tracked {
            id,
            mark: mark.clone(),
            all: self.clone(),
        };
        tracked.idle();
        lock(&self.conns).insert(id, mark);
        tracked
    }

    /// Asks the connection idle longest (not already asked) to close;
    /// `false` when none is idle.
    pub(super) fn evict_oldest(&self) -> bool {
        let oldest = lock(&self.conns)
            .values()
            .filter(|m| !m.evict.load(Ordering::Acquire))
            .filter_map(|m| {
                let since = m.idle_since.load(Ordering::Acquire);
                (since != 0).then(|| (since, m.clone()))
            })
            .min_by_key(|(since, _)| *since);
        let Some((_, mark)) = oldest else {
            return false;
        };
        mark.evict.store(true, Ordering::Release);
        if let Some(w) = lock(&mark.waker).take() {
            w.wake();
        }
        true
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's registration, removed when the connection closes.
pub(super) struct Tracked {
    id: u64,
    mark: Arc<Mark>,
    all: Arc<Idleness>,
}

impl Tracked {
    /// The connection waits for a request.
    pub(super) fn idle(&self) {
        if self.mark.idle_since.load(Ordering::Relaxed) == 0 {
            self.mark
                .idle_since
                .store(self.all.now(), Ordering::Release);
        }
    }

    /// A request has started: not a candidate, and any pending ask is void.
    pub(super) fn busy(&self) {
        self.mark.idle_since.store(0, Ordering::Release);
        self.mark.evict.store(false, Ordering::Release);
    }

    /// Whether the acceptor asked this idle connection to close; otherwise
    /// remembers the task so that an ask wakes it.
    pub(super) fn evicted(&self, cx: &Context<'_>) -> bool {
        if self.mark.evict.load(Ordering::Acquire) {
            return true;
        }
        let mut w = lock(&self.mark.waker);
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
        drop(w);
        // An ask between the load and the store would have found no waker.
        self.mark.evict.load(Ordering::Acquire)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.all.conns).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_idle_longest_is_asked_first_and_a_busy_one_never() {
        let all = Idleness::new();
        let first = all.track();
        let second = all.track();
        let third = all.track();
        first.busy();
        let cx = Context::from_waker(Waker::noop());
        assert!(all.evict_oldest());
        assert!(!first.evicted(&cx));
        assert!(second.evicted(&cx));
        assert!(!third.evicted(&cx));
        assert!(all.evict_oldest());
        assert!(third.evicted(&cx));
        assert!(!all.evict_oldest(), "only the busy one is left");
        drop(second);
        assert_eq!(lock(&all.conns).len(), 2);
    }
}
