//! What a batch of scored events writes, computed once for both stores.
//! Each event's awards are settled against the once-awards already held
//! ([`Item::settle`]); once the backend has inserted the events and told
//! each one's fate (written now, or a redelivery of a stored event), a
//! [`Plan`] lists the ledger rows, the per-user totals and every request's
//! answers. The SQLite writer (`sqlite_writer`) and the PostgreSQL writer
//! (`pg_writer`) only execute it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::oneshot;

use super::StoreError;
use crate::pipeline::rules::Award;
use crate::pipeline::Prepared;

/// Most requests grouped into one transaction.
pub(super) const MAX_GROUP: usize = 256;
/// Queue depth before senders wait (back-pressure).
pub(super) const QUEUE: usize = 4096;
/// Retries of a single request's transaction on a transient error
/// (PostgreSQL deadlock or serialization failure between instances; SQLite
/// busy).
pub(super) const RETRIES: usize = 3;

/// A stored event's processing status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Stored, waiting for a worker (async sources).
    Queued,
    Processed,
    Failed,
    /// Its learner was erased: a tombstone without personal data, so that
    /// a redelivery is a duplicate, awarded and stored nothing.
    Erased,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Queued => "queued",
            EventStatus::Processed => "processed",
            EventStatus::Failed => "failed",
            EventStatus::Erased => "erased",
        }
    }
}

/// What the store did with one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Persisted {
    /// The stored event's id (the first delivery's, for a duplicate).
    pub event_id: String,
    pub status: EventStatus,
    /// Points of this event (the first delivery's, for a duplicate).
    pub points: i64,
    /// The event was stored before; nothing was awarded now.
    pub duplicate: bool,
    /// When the stored event was processed (ms).
    pub processed_at: i64,
    /// The rule error, for a failed event.
    pub error: Option<String>,
}

/// One request's events, waiting for the writer.
pub struct Job {
    pub(super) namespace: String,
    pub(super) items: Vec<Item>,
    pub(super) reply: oneshot::Sender<Result<Vec<Persisted>, StoreError>>,
}

/// One event, flattened to what the SQL binds.
pub(super) struct Item {
    pub(super) id: String,
    pub(super) prepared: Prepared,
    pub(super) canonical: String,
    pub(super) status: EventStatus,
    pub(super) points: i64,
    pub(super) error: Option<String>,
    pub(super) received_at: i64,
}

impl Job {
    pub fn new(
        namespace: &str,
        events: Vec<Prepared>,
        queued: bool,
        reply: oneshot::Sender<Result<Vec<Persisted>, StoreError>>,
    ) -> Job {
        let now = chrono::Utc::now().timestamp_millis();
        let items = events
            .into_iter()
            .map(|prepared| {
                let (status, error) = match &prepared.outcome {
                    _ if queued => (EventStatus::Queued, None),
                    Ok(_) => (EventStatus::Processed, None),
                    Err(e) => (EventStatus::Failed, Some(e.to_string())),
                };
                Item {
                    id: new_event_id(),
                    canonical: serde_json::to_string(&prepared.event)
                        .unwrap_or_else(|_| "{}".into()),
                    points: prepared.points(),
                    status,
                    error,
                    received_at: now,
                    prepared,
                }
            })
            .collect();
        Job {
            namespace: namespace.to_string(),
            items,
            reply,
        }
    }
}

/// A once-award's identity: namespace, user, rule, key.
pub(super) type OnceKey = (String, String, Arc<str>, String);

/// What an item awards once its once-awards are settled.
#[derive(Clone)]
pub(super) struct Settled<'a> {
    pub(super) awards: Vec<&'a Award>,
    pub(super) points: i64,
}

impl Item {
    /// The awards this item writes: a once-award whose key the ledger holds
    /// (`held`), or an earlier item of the same transaction claimed
    /// (`claimed`), is dropped, and its points with it. Items that award
    /// nothing (queued, failed, no user) settle to their stored points.
    pub(super) fn settle<'a, E>(
        &'a self,
        namespace: &str,
        claimed: &mut HashSet<OnceKey>,
        mut held: impl FnMut(&OnceKey) -> Result<bool, E>,
    ) -> Result<Settled<'a>, E> {
        let (Ok(awards), Some(user), EventStatus::Processed) = (
            &self.prepared.outcome,
            &self.prepared.event.user_id,
            self.status,
        ) else {
            return Ok(Settled {
                awards: Vec::new(),
                points: self.points,
            });
        };
        let mut kept = Vec::with_capacity(awards.len());
        for award in awards {
            if let Some(key) = &award.once {
                let once = (
                    namespace.to_string(),
                    user.clone(),
                    award.rule.clone(),
                    key.clone(),
                );
                if claimed.contains(&once) || held(&once)? {
                    continue;
                }
                claimed.insert(once);
            }
            kept.push(award);
        }
        let points = kept.iter().map(|a| a.points).sum();
        Ok(Settled {
            awards: kept,
            points,
        })
    }

    /// [`Item::settle`] against once-award keys read beforehand.
    pub(super) fn settle_against<'a>(
        &'a self,
        namespace: &str,
        claimed: &mut HashSet<OnceKey>,
        held: &HashSet<OnceKey>,
    ) -> Settled<'a> {
        let found = |k: &OnceKey| Ok::<_, std::convert::Infallible>(held.contains(k));
        match self.settle(namespace, claimed, found) {
            Ok(s) => s,
            Err(never) => match never {},
        }
    }

    /// The learner whose total this item changes: a processed event with a
    /// user (a failed or queued one earns nothing yet).
    pub(super) fn earner(&self) -> Option<&str> {
        match (&self.prepared.event.user_id, self.status) {
            (Some(user), EventStatus::Processed) => Some(user),
            _ => None,
        }
    }

    /// The ledger rows of this item's awards, written under `event_id`
    /// (none when it earns nothing: see [`Item::earner`]).
    pub(super) fn ledger_rows<'a, 's>(
        &'a self,
        ns: &'a str,
        settled: &'s Settled<'a>,
        event_id: &'s str,
    ) -> impl Iterator<Item = LedgerRow<'a>> + 's
    where
        'a: 's,
    {
        let ev = &self.prepared.event;
        let user = self.earner();
        settled.awards.iter().filter_map(move |&award| {
            Some(LedgerRow {
                event_id: event_id.to_string(),
                namespace: ns,
                user: user?,
                course: &ev.course_id,
                award,
                occurred_at: ev.occurred_at.timestamp_millis(),
            })
        })
    }

    /// The answer for this item, written now under `event_id` with `points`.
    pub(super) fn stored_as(&self, event_id: String, points: i64, now: i64) -> Persisted {
        Persisted {
            event_id,
            status: self.status,
            points,
            duplicate: false,
            processed_at: now,
            error: self.error.clone(),
        }
    }
}

impl EventStatus {
    /// A stored status as the API reports it (an event a worker has
    /// claimed, `processing`, is still queued); any other text is an error,
    /// never a default.
    pub fn from_stored(s: &str) -> Result<EventStatus, StoreError> {
        match s {
            "processed" => Ok(EventStatus::Processed),
            "failed" => Ok(EventStatus::Failed),
            "queued" | "processing" => Ok(EventStatus::Queued),
            "erased" => Ok(EventStatus::Erased),
            other => Err(StoreError::UnknownStatus(other.chars().take(32).collect())),
        }
    }
}

/// A new event id: `evt_` and a ULID (sortable by time).
pub fn new_event_id() -> String {
    format!("evt_{}", ulid::Ulid::new())
}

/// An event's fate in the events table.
pub(super) enum Fate {
    /// Inserted now, or a failed event re-scored now: award it under this id.
    Written(String),
    /// Stored before: nothing is written; the stored answer.
    Duplicate(Persisted),
}

/// An award to write, with the event it belongs to.
pub(super) struct LedgerRow<'a> {
    pub(super) event_id: String,
    pub(super) namespace: &'a str,
    pub(super) user: &'a str,
    pub(super) course: &'a Option<String>,
    pub(super) award: &'a Award,
    pub(super) occurred_at: i64,
}

/// Per (namespace, user): points and processed events to add, in key order
/// (instances on PostgreSQL lock totals rows alike).
pub(super) type Totals<'a> = BTreeMap<(&'a str, &'a str), (i64, i64)>;

/// What a transaction writes after the events, and what it answers.
pub(super) struct Plan<'a> {
    pub(super) ledger: Vec<LedgerRow<'a>>,
    pub(super) totals: Totals<'a>,
    /// Per job, per item, in order.
    pub(super) answers: Vec<Vec<Persisted>>,
}

impl<'a> Plan<'a> {
    /// `fates` holds each item's settled awards and fate, in job order.
    pub(super) fn new(
        jobs: &'a [Job],
        fates: impl IntoIterator<Item = (Settled<'a>, Fate)>,
        now: i64,
    ) -> Plan<'a> {
        let mut plan = Plan::empty();
        let mut fates = fates.into_iter();
        for job in jobs {
            let ns = job.namespace.as_str();
            let mut answers = Vec::with_capacity(job.items.len());
            for (it, (settled, fate)) in job.items.iter().zip(fates.by_ref()) {
                let event_id = match fate {
                    Fate::Duplicate(stored) => {
                        answers.push(stored);
                        continue;
                    }
                    Fate::Written(id) => id,
                };
                plan.add_written(ns, it, &settled, &event_id);
                answers.push(it.stored_as(event_id, settled.points, now));
            }
            plan.answers.push(answers);
        }
        plan
    }

    /// A plan that writes nothing yet (see [`Plan::add_written`]).
    pub(super) fn empty() -> Plan<'a> {
        Plan {
            ledger: Vec::new(),
            totals: BTreeMap::new(),
            answers: Vec::new(),
        }
    }

    /// Adds an item written under `event_id`: its awards to the ledger and
    /// its points and one event to its learner's total (when it earns).
    pub(super) fn add_written(
        &mut self,
        ns: &'a str,
        it: &'a Item,
        settled: &Settled<'a>,
        event_id: &str,
    ) {
        let Some(user) = it.earner() else { return };
        self.ledger.extend(it.ledger_rows(ns, settled, event_id));
        let t = self.totals.entry((ns, user)).or_insert((0, 0));
        t.0 += settled.points;
        t.1 += 1;
    }
}
