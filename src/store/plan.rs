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
        let (Some(user), Ok(awards)) = (self.earner(), &self.prepared.outcome) else {
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
                    user.to_string(),
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
        let occurred_at = ev.occurred_at.timestamp_millis();
        self.earner().into_iter().flat_map(move |user| {
            settled.awards.iter().map(move |&award| LedgerRow {
                event_id: event_id.to_string(),
                namespace: ns,
                user,
                course: &ev.course_id,
                award,
                occurred_at,
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

    /// The answer for this item: written under the fate's id with its
    /// settled `points`, or a duplicate's stored answer.
    pub(super) fn answer(&self, fate: Fate, points: i64, now: i64) -> Persisted {
        match fate {
            Fate::Written(id) => self.stored_as(id, points, now),
            Fate::Duplicate(stored) => stored,
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
        let answers: Vec<Persisted> = items(jobs)
            .zip(fates)
            .map(|((ns, it), (settled, fate))| {
                if let Fate::Written(id) = &fate {
                    plan.add_written(ns, it, &settled, id);
                }
                it.answer(fate, settled.points, now)
            })
            .collect();
        plan.answers = by_job(jobs, answers);
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

/// Every job's items with their namespace, in job order.
pub(super) fn items(jobs: &[Job]) -> impl Iterator<Item = (&str, &Item)> {
    jobs.iter()
        .flat_map(|j| j.items.iter().map(move |it| (j.namespace.as_str(), it)))
}

/// Per-item values, in job order, split into one vector per job.
pub(super) fn by_job<T>(jobs: &[Job], values: impl IntoIterator<Item = T>) -> Vec<Vec<T>> {
    let mut values = values.into_iter();
    jobs.iter()
        .map(|j| values.by_ref().take(j.items.len()).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::mapping::CanonicalEvent;
    use crate::pipeline::rules::RuleError;

    fn award(rule: &str, points: i64, once: Option<&str>) -> Award {
        Award {
            rule: Arc::from(rule),
            points,
            reason: None,
            once: once.map(str::to_string),
        }
    }

    fn prepared(key: &str, user: Option<&str>, outcome: Result<Vec<Award>, RuleError>) -> Prepared {
        Prepared {
            event: CanonicalEvent {
                source: "lms".into(),
                dedupe_key: key.into(),
                event_type: Some("course_completed".into()),
                vendor_event_type: None,
                user_id: user.map(str::to_string),
                course_id: Some("c1".into()),
                object_id: None,
                occurred_at: chrono::Utc::now(),
                attributes: Default::default(),
            },
            raw: bytes::Bytes::from_static(b"{}"),
            outcome,
            headers: None,
        }
    }

    fn job(ns: &str, events: Vec<Prepared>) -> Job {
        Job::new(ns, events, false, oneshot::channel().0)
    }

    /// A once-key the ledger holds, or an earlier item of the group
    /// claimed, drops its award and its points; a failed event or one
    /// without a learner settles to its stored points and writes nothing.
    #[test]
    fn settling_drops_held_and_claimed_once_keys() {
        let ok = |awards| Ok::<_, RuleError>(awards);
        let jobs = [
            job(
                "ns",
                vec![
                    prepared(
                        "a",
                        Some("u1"),
                        ok(vec![award("r", 5, Some("k")), award("s", 1, None)]),
                    ),
                    prepared("b", Some("u1"), ok(vec![award("r", 5, Some("k"))])),
                    prepared("c", Some("u1"), ok(vec![award("r", 5, Some("held"))])),
                ],
            ),
            job("ns", vec![]),
            job(
                "ns",
                vec![
                    prepared("d", None, ok(vec![award("s", 2, None)])),
                    prepared(
                        "e",
                        Some("u2"),
                        Err(RuleError {
                            rule: "r".into(),
                            message: "boom".into(),
                        }),
                    ),
                ],
            ),
        ];
        let held: HashSet<OnceKey> =
            [("ns".into(), "u1".into(), Arc::from("r"), "held".into())].into();
        let mut claimed = HashSet::new();
        let settled: Vec<Settled> = items(&jobs)
            .map(|(ns, it)| it.settle_against(ns, &mut claimed, &held))
            .collect();
        let points: Vec<i64> = settled.iter().map(|s| s.points).collect();
        // "d" has no learner: its rules' points are its own, but it earns
        // nothing (no ledger row, no total).
        assert_eq!(points, [6, 0, 0, 2, 0]);
        let fates = items(&jobs).map(|(_, it)| Fate::Written(it.id.clone()));
        let plan = Plan::new(&jobs, settled.into_iter().zip(fates), 7);
        let rows: Vec<(&str, &str, i64)> = plan
            .ledger
            .iter()
            .map(|r| (r.user, &*r.award.rule, r.award.points))
            .collect();
        assert_eq!(rows, [("u1", "r", 5), ("u1", "s", 1)]);
        let totals: Vec<_> = plan.totals.into_iter().collect();
        // Three processed events of u1 (two of them earning nothing now).
        assert_eq!(totals, [(("ns", "u1"), (6, 3))]);
        let answers: Vec<Vec<i64>> = plan
            .answers
            .iter()
            .map(|a| a.iter().map(|p| p.points).collect())
            .collect();
        assert_eq!(answers, [vec![6, 0, 0], vec![], vec![2, 0]]);
        assert_eq!(plan.answers[2][1].status, EventStatus::Failed);
    }

    /// Per-item values come back one vector per job, in order, empty jobs
    /// included; a duplicate answers what was stored.
    #[test]
    fn answers_split_by_job_and_duplicates_answer_as_stored() {
        let jobs = [
            job(
                "ns",
                vec![prepared("a", Some("u"), Ok(vec![award("r", 3, None)]))],
            ),
            job("ns", vec![]),
            job(
                "ns",
                vec![prepared("b", Some("u"), Ok(vec![award("r", 3, None)]))],
            ),
        ];
        let stored = Persisted {
            event_id: "evt_first".into(),
            status: EventStatus::Processed,
            points: 9,
            duplicate: true,
            processed_at: 1,
            error: None,
        };
        let mut claimed = HashSet::new();
        let settled: Vec<Settled> = items(&jobs)
            .map(|(ns, it)| it.settle_against(ns, &mut claimed, &HashSet::new()))
            .collect();
        let fates = [
            Fate::Written(jobs[0].items[0].id.clone()),
            Fate::Duplicate(stored.clone()),
        ];
        let plan = Plan::new(&jobs, settled.into_iter().zip(fates), 7);
        assert_eq!(plan.answers.len(), 3);
        assert_eq!(plan.answers[0][0].points, 3);
        assert!(!plan.answers[0][0].duplicate);
        assert!(plan.answers[1].is_empty());
        assert_eq!(plan.answers[2], [stored]);
        // The duplicate writes nothing.
        assert_eq!(plan.ledger.len(), 1);
        assert_eq!(by_job(&jobs, [1, 2]), [vec![1], vec![], vec![2]]);
    }
}
