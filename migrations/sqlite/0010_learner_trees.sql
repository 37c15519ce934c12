-- Fewer B-trees ordered by learner. Once a learner's rows span leaves of
-- their own (a large ledger), each such tree costs every event a leaf of
-- its own: read, written to the WAL, and written again by the checkpoint.
--
-- The ledger's per-learner index and its once-award keys become one unique
-- index. A row without a once key (NULL) never conflicts with another, so
-- only once-awards are held to one per learner, rule and key, as before;
-- and a learner's rows are still one range of the index (read in id order
-- by sorting that learner's rows).
DROP INDEX ledger_once;
DROP INDEX ledger_user;
CREATE UNIQUE INDEX ledger_learner ON ledger (namespace, user_id, rule, once_key);

-- A learner's total lives in its primary key's B-tree alone: as a rowid
-- table it was a row in the table plus an entry in the key's index.
CREATE TABLE totals_by_learner (
    namespace  TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    points     INTEGER NOT NULL,
    events     INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (namespace, user_id)
) WITHOUT ROWID;
INSERT INTO totals_by_learner (namespace, user_id, points, events, updated_at)
SELECT namespace, user_id, points, events, updated_at FROM totals;
DROP TABLE totals;
ALTER TABLE totals_by_learner RENAME TO totals;
CREATE INDEX totals_ns_rank ON totals (namespace, points DESC, user_id);
