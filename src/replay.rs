//! Scoring stored events again with the current rules, never awarding
//! twice: `rescore` (every event of a selection, oldest first; the
//! `rescore` subcommand) and `replay` (chosen events, the admin API). Each
//! event's ledger entries, points and its user's total are rewritten in a
//! transaction of its own, guarded by the values read, so both are safe
//! while the server serves and across instances: a concurrent change wins
//! and the event is reported as skipped.

use std::collections::HashMap;
use std::io::Write;

use crate::config::Config;
use crate::pipeline::mapping::CanonicalEvent;
use crate::pipeline::rules::Award;
use crate::scoring;
use crate::store::rescore::{Selection, Stored};
use crate::store::{EventStatus, Store, StoreError};

/// What a rescore did (or, dry, would do).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub checked: u64,
    pub changed: u64,
    pub skipped: u64,
    /// Points added to the totals (negative: taken away).
    pub delta: i64,
}

/// A once-award's identity: namespace, user, rule, key.
type OnceClaim = (String, String, String, String);

/// Rescores the events in `selection`, oldest first, writing one line per
/// changed or skipped event to `out`; with `dry_run`, writes nothing to
/// the store.
pub async fn rescore(
    config: &Config,
    store: &Store,
    selection: &Selection,
    dry_run: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Summary> {
    let mut sum = Summary::default();
    // Once-awards claimed earlier in this run (a dry run writes none).
    let mut claimed: HashMap<OnceClaim, String> = HashMap::new();
    let mut after = (i64::MIN, String::new());
    loop {
        let page = store
            .rescore_page(selection, (after.0, &after.1), 500)
            .await?;
        let Some(last) = page.last() else { break };
        after = (last.occurred_at, last.id.clone());
        for ev in page {
            sum.checked += 1;
            let awards = match scored(config, store, &ev, &mut claimed).await? {
                Ok(a) => a,
                Err(why) => {
                    writeln!(out, "{} {}: {why}; left as is", ev.id, ev.source)?;
                    sum.skipped += 1;
                    continue;
                }
            };
            // The once keys count: a ledger written before they existed is
            // rewritten with them.
            let old = store.awards_of(&ev).await?;
            let new: Vec<(String, i64, Option<String>)> = awards
                .iter()
                .map(|a| (a.rule.to_string(), a.points, a.once.clone()))
                .collect();
            if old == new && ev.status == "processed" {
                continue;
            }
            let points: i64 = awards.iter().map(|a| a.points).sum();
            let listed: Vec<String> = new.iter().map(|(r, p, _)| format!("{r} {p}")).collect();
            writeln!(
                out,
                "{} {} {}/{}: {} {} -> {points} ({})",
                ev.id,
                ev.source,
                ev.namespace,
                ev.user_id.as_deref().unwrap_or("-"),
                ev.status,
                ev.points,
                listed.join(", ")
            )?;
            if dry_run || store.rewrite_awards(&ev, &awards).await? {
                sum.changed += 1;
                sum.delta += points
                    - if ev.status == "processed" {
                        ev.points
                    } else {
                        0
                    };
            } else {
                // Nothing was written: its once-award claims go back.
                claimed.retain(|_, holder| *holder != ev.id);
                writeln!(
                    out,
                    "{}: changed while rescoring; left to the server",
                    ev.id
                )?;
                sum.skipped += 1;
            }
        }
    }
    Ok(sum)
}

/// An event's awards under the current rules, as ingestion would give them
/// now: a once-award whose key another event holds (in the ledger, or
/// earlier in this run) is dropped. `Ok(Err(why))`: the event is left as
/// is (its source is gone, its canonical form unreadable, a rule failed).
pub(crate) async fn scored(
    config: &Config,
    store: &Store,
    ev: &Stored,
    claimed: &mut HashMap<OnceClaim, String>,
) -> Result<Result<Vec<Award>, String>, StoreError> {
    let Some(src) = config.source(&ev.source) else {
        return Ok(Err("source no longer configured".into()));
    };
    let canonical: CanonicalEvent = match serde_json::from_str(&ev.canonical) {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("canonical form unreadable ({e})"))),
    };
    // Its history as it was when it first arrived: without itself (and,
    // when it was processed, without its own points in the total).
    let own = crate::store::StoredSelf {
        id: &ev.id,
        points: if ev.status == "processed" {
            ev.points
        } else {
            0
        },
    };
    let history = scoring::history_of(store, src, &canonical, Some(own)).await?;
    let scored = match scoring::score(config, src, &canonical, &history) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let mut awards = Vec::with_capacity(scored.len());
    for a in scored {
        if let (Some(user), Some(key)) = (&ev.user_id, &a.once) {
            let claim = (
                ev.namespace.clone(),
                user.clone(),
                a.rule.to_string(),
                key.clone(),
            );
            let holder = match claimed.get(&claim) {
                Some(id) => Some(id.clone()),
                None => store.once_holder(ev, &a).await?,
            };
            if holder.as_ref().is_some_and(|h| *h != ev.id) {
                continue;
            }
            claimed.insert(claim, ev.id.clone());
        }
        awards.push(a);
    }
    Ok(Ok(awards))
}

/// What replaying did to one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// A failed event, scored now.
    Processed { points: i64 },
    /// A processed event (rescoring asked for) whose awards changed.
    Rescored { points: i64, delta: i64 },
    /// A processed event (rescoring asked for) with the same awards.
    Unchanged { points: i64 },
    /// Its rules failed again, or its source is gone: left as it was.
    Failed { reason: String },
    /// Not scored: already processed (rescoring not asked for), queued for
    /// a worker, or changed by someone else meanwhile.
    Skipped { reason: String },
}

/// Scores the events again with the current rules, oldest first: failed
/// events become processed; processed ones are rescored only when
/// `rescore` says so; queued ones are left to the workers. Each event is
/// written at most once, guarded by its stored status and points: of two
/// replays (or a replay and a redelivery) of one failed event, one awards
/// it and the other reports it skipped.
pub async fn replay(
    config: &Config,
    store: &Store,
    mut events: Vec<Stored>,
    rescore: bool,
) -> Result<Vec<(String, Replayed)>, StoreError> {
    events.sort_by(|a, b| (a.occurred_at, &a.id).cmp(&(b.occurred_at, &b.id)));
    let mut claimed: HashMap<OnceClaim, String> = HashMap::new();
    let mut out = Vec::with_capacity(events.len());
    for ev in events {
        let status = EventStatus::from_stored(&ev.status)?;
        let outcome = match status {
            EventStatus::Queued => Replayed::Skipped {
                reason: "queued: a worker scores it".into(),
            },
            EventStatus::Erased => Replayed::Skipped {
                reason: "its learner was erased".into(),
            },
            EventStatus::Processed if !rescore => Replayed::Skipped {
                reason: "already processed; ask for rescore to score it again".into(),
            },
            _ => replay_one(config, store, &ev, status, &mut claimed).await?,
        };
        out.push((ev.id, outcome));
    }
    Ok(out)
}

async fn replay_one(
    config: &Config,
    store: &Store,
    ev: &Stored,
    status: EventStatus,
    claimed: &mut HashMap<OnceClaim, String>,
) -> Result<Replayed, StoreError> {
    let awards = match scored(config, store, ev, claimed).await? {
        Ok(a) => a,
        Err(reason) => return Ok(Replayed::Failed { reason }),
    };
    let points: i64 = awards.iter().map(|a| a.points).sum();
    if status == EventStatus::Processed {
        let old = store.awards_of(ev).await?;
        let new: Vec<(String, i64, Option<String>)> = awards
            .iter()
            .map(|a| (a.rule.to_string(), a.points, a.once.clone()))
            .collect();
        if old == new {
            return Ok(Replayed::Unchanged { points });
        }
    }
    if !store.rewrite_awards(ev, &awards).await? {
        // Nothing was written: its once-award claims go back.
        claimed.retain(|_, holder| *holder != ev.id);
        return Ok(Replayed::Skipped {
            reason: "changed while replaying (another replay or a redelivery scored it)".into(),
        });
    }
    Ok(match status {
        EventStatus::Processed => Replayed::Rescored {
            points,
            delta: points - ev.points,
        },
        _ => Replayed::Processed { points },
    })
}
