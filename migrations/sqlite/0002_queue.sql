-- Async processing: a queued event waits for a worker; a worker claims it
-- with a token and a lease (claimed_at), so a crashed worker's claim expires.
ALTER TABLE events ADD COLUMN next_attempt_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN claim TEXT;
ALTER TABLE events ADD COLUMN claimed_at INTEGER;
CREATE INDEX events_queue ON events (status, next_attempt_at);
