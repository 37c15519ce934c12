//! The summary tables as the SQLite writer keeps them: once per transaction,
//! summed over its whole group, instead of by trigger for every row.
//!
//! The writer's connection runs with triggers off
//! (`SQLITE_DBCONFIG_ENABLE_TRIGGER`). A trigger fires as a sub-program of
//! its statement and makes SQLite keep a statement journal (a copy of every
//! page the statement touches that the transaction already changed), which
//! cost the writer about 16 µs per event, a quarter of its time
//! (docs/performance.md, 2026-11-30, night). The writer writes the same sums instead, in the
//! same transaction and with the same SQL expressions, so the tables stay
//! exactly what the triggers would make them; every other connection (the
//! pool: replay, rescore, erasure, retention, the window's move) keeps them
//! through the triggers of migrations 0005 and 0009.
//!
//! [`MIRRORED_TRIGGERS`] lists the triggers this module stands in for; a
//! test fails when a migration adds a trigger on a table the writer writes,
//! or redefines one, so a change cannot be skipped silently.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension, Transaction};

use super::leaderboards::WINDOW_START;
use super::plan::{EventStatus, LedgerRow};

/// The triggers on the tables the writer writes, each mirrored here (the
/// `*_empty` ones delete a sum whose entries reach zero; the writer only
/// adds, so they never apply to its writes), with the first 6 bytes of the
/// SHA-256 of each one's SQL as the migrations define it.
#[cfg(test)]
pub(super) const MIRRORED_TRIGGERS: &[(&str, &str)] = &[
    ("course_points_delete", "a1fa0af0d33b"),
    ("course_points_empty", "9dd471269274"),
    ("course_points_insert", "e3646f0f76ca"),
    ("course_points_update", "337e06129a96"),
    ("event_counts_delete", "0f3560d69606"),
    ("event_counts_insert", "a3104c68b6b1"),
    ("event_counts_update", "c9ecf04ce5c7"),
    ("ledger_days_delete", "7b0a35c0abee"),
    ("ledger_days_insert", "a8a91e44b68e"),
    ("ledger_days_update", "39494c98ec34"),
    ("recent_points_delete", "cdc44080b868"),
    ("recent_points_empty", "103b4ef84576"),
    ("recent_points_insert", "dd5b319f3be1"),
    ("recent_points_update", "38222419a1c6"),
];

const ADD_COUNT: &str = "INSERT INTO event_counts (source, event_type, status, n) \
    VALUES (?1, COALESCE(?2, 'unmapped'), ?3, ?4) \
    ON CONFLICT (source, event_type, status) DO UPDATE SET n = n + excluded.n";
/// A failed event scored again under its stored id: its count moves from
/// `failed` to the status that rescore gave it (?2), as trigger
/// `event_counts_update` does for each update. (Source and type are the
/// stored row's: the rescore changes neither.)
const MOVE_COUNT: [&str; 2] = [
    "UPDATE event_counts SET n = n - 1 WHERE (source, event_type, status) = \
    (SELECT source, COALESCE(event_type, 'unmapped'), 'failed' FROM events WHERE id = ?1)",
    "INSERT INTO event_counts (source, event_type, status, n) \
    SELECT source, COALESCE(event_type, 'unmapped'), ?2, 1 FROM events WHERE id = ?1 \
    ON CONFLICT (source, event_type, status) DO UPDATE SET n = n + 1",
];
const ADD_DAY: &str = "INSERT INTO ledger_days (day, points, entries) \
    VALUES (strftime('%Y-%m-%d', ?1 / 1000, 'unixepoch'), ?2, ?3) \
    ON CONFLICT (day) DO UPDATE SET points = points + excluded.points, \
    entries = entries + excluded.entries";
const ADD_COURSE: &str =
    "INSERT INTO course_points (course_id, namespace, user_id, points, entries) \
    VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (course_id, namespace, user_id) \
    DO UPDATE SET points = points + excluded.points, entries = entries + excluded.entries";
const ADD_RECENT: &str = "INSERT INTO recent_points (namespace, user_id, points, entries) \
    VALUES (?1, ?2, ?3, ?4) ON CONFLICT (namespace, user_id) \
    DO UPDATE SET points = points + excluded.points, entries = entries + excluded.entries";

/// (points, entries) added to one sum.
type Sum = (i64, i64);

/// What one transaction adds to the summary tables.
#[derive(Default)]
pub(super) struct Sums<'a> {
    /// Events inserted, by (source, event type, status).
    counts: HashMap<(&'a str, Option<&'a str>, &'static str), i64>,
    /// Failed events scored again: stored id and new status, for each
    /// rescore (one event may be rescored twice in a group, and stay
    /// failed the first time).
    rescored: Vec<(String, &'static str)>,
    /// Ledger rows inserted (all created at the transaction's `now`).
    day: Sum,
    courses: HashMap<(&'a str, &'a str, &'a str), Sum>,
    /// Ledger rows inserted, for the seven-day window: (namespace, user,
    /// points, occurred_at); which count depends on the window's start,
    /// read once in [`Sums::write`].
    recent: Vec<(&'a str, &'a str, i64, i64)>,
}

impl<'a> Sums<'a> {
    pub(super) fn event(&mut self, source: &'a str, event_type: Option<&'a str>, s: EventStatus) {
        *self
            .counts
            .entry((source, event_type, s.as_str()))
            .or_default() += 1;
    }

    pub(super) fn rescored(&mut self, event_id: &str, s: EventStatus) {
        self.rescored.push((event_id.to_string(), s.as_str()));
    }

    pub(super) fn ledger_row(&mut self, r: &LedgerRow<'a>) {
        let points = r.award.points;
        self.day.0 += points;
        self.day.1 += 1;
        if let Some(course) = r.course {
            let sum = self
                .courses
                .entry((course.as_str(), r.namespace, r.user))
                .or_default();
            sum.0 += points;
            sum.1 += 1;
        }
        self.recent
            .push((r.namespace, r.user, points, r.occurred_at));
    }

    /// Writes the sums in the caller's transaction.
    pub(super) fn write(self, tx: &Transaction<'_>, now: i64) -> rusqlite::Result<()> {
        let mut add = tx.prepare_cached(ADD_COUNT)?;
        for ((source, event_type, status), n) in self.counts {
            add.execute(params![source, event_type, status, n])?;
        }
        for (id, status) in &self.rescored {
            tx.prepare_cached(MOVE_COUNT[0])?.execute([id])?;
            tx.prepare_cached(MOVE_COUNT[1])?.execute([id, *status])?;
        }
        if self.day.1 == 0 {
            return Ok(());
        }
        tx.prepare_cached(ADD_DAY)?
            .execute(params![now, self.day.0, self.day.1])?;
        let mut add = tx.prepare_cached(ADD_COURSE)?;
        for ((course, ns, user), (points, entries)) in self.courses {
            add.execute(params![course, ns, user, points, entries])?;
        }
        let start: Option<i64> = tx
            .prepare_cached(WINDOW_START)?
            .query_row([], |r| r.get(0))
            .optional()?;
        let Some(start) = start else { return Ok(()) };
        let mut recent: HashMap<(&str, &str), Sum> = HashMap::new();
        for (ns, user, points, occurred_at) in self.recent {
            if occurred_at >= start {
                let sum = recent.entry((ns, user)).or_default();
                sum.0 += points;
                sum.1 += 1;
            }
        }
        let mut add = tx.prepare_cached(ADD_RECENT)?;
        for ((ns, user), (points, entries)) in recent {
            add.execute(params![ns, user, points, entries])?;
        }
        Ok(())
    }
}
