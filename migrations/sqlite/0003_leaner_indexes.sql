-- Fewer B-trees per write: nothing reads events by receive time, and only
-- queued or claimed events need the queue index (a partial index costs a
-- processed event nothing).
DROP INDEX events_received;
DROP INDEX events_queue;
CREATE INDEX events_queue ON events (next_attempt_at) WHERE status IN ('queued', 'processing');
