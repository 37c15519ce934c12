-- Fewer B-trees per write: nothing reads events by receive time, and only
-- queued or claimed events need the queue index (a partial index costs a
-- processed event nothing).
DROP INDEX events_received;
DROP INDEX events_queue;
CREATE INDEX events_queue ON events (next_attempt_at) WHERE status IN ('queued', 'processing');
-- The overall leaderboard orders by points, then namespace and user.
DROP INDEX totals_rank;
CREATE INDEX totals_rank ON totals (points DESC, namespace, user_id);
