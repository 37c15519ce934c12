-- The ledger's reference to its event is kept by the writers, not checked
-- by PostgreSQL, as on SQLite: an award is inserted in the statement or
-- transaction that inserts or rescores its event, retention deletes only
-- events without awards, and erasure keeps its events as tombstones. The
-- check cost every award an index probe and a lock on its event's row (a
-- write to that row's page) in the hook's one statement, and the index
-- on `ledger.event_id` it needed is read by nothing else: an event's
-- ledger rows are found as on SQLite, through `ledger_learner` (the
-- learner's rows, their event ids checked on the rows). Retention locks an
-- event's row before it deletes it, so a rescore awarding it at the same
-- time is seen. The API tests look for awards without their event after
-- every kind of write. (Dropped before migration 0010 changes the ids'
-- collation, which would otherwise rebuild this index and re-check the
-- reference across the whole ledger.)
ALTER TABLE ledger DROP CONSTRAINT ledger_event_id_fkey;
DROP INDEX ledger_event;
