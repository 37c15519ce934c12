-- Every index is rewritten by every write: fewer B-trees per event.
-- An event's ledger rows are found through its user (ledger_user), which
-- the event row names; and the overall leaderboard merges the per-namespace
-- leaderboards (totals_ns_rank) instead of keeping an index of its own.
DROP INDEX ledger_event;
DROP INDEX totals_rank;
