-- The event log (`GET /api/v1/events`), newest first by id (a ULID: the
-- time it was received): one source's events, and the failed ones (a small
-- partial index), without scanning the table. Time bounds are id bounds.
CREATE INDEX events_source_log ON events (source, id);
CREATE INDEX events_failed_log ON events (id) WHERE status = 'failed';
-- The request as received: its headers (JSON, credentials redacted).
ALTER TABLE events ADD COLUMN request_headers TEXT;
