-- Events as received (raw bytes and canonical form), the points ledger, and
-- per-user totals. Times are Unix milliseconds (UTC).
CREATE TABLE events (
    id                TEXT PRIMARY KEY,
    source            TEXT NOT NULL,
    dedupe_key        TEXT NOT NULL,
    namespace         TEXT NOT NULL,
    event_type        TEXT,
    vendor_event_type TEXT,
    user_id           TEXT,
    course_id         TEXT,
    object_id         TEXT,
    occurred_at       BIGINT NOT NULL,
    received_at       BIGINT NOT NULL,
    processed_at      BIGINT,
    status            TEXT NOT NULL,
    points            BIGINT NOT NULL DEFAULT 0,
    error             TEXT,
    attempts          BIGINT NOT NULL DEFAULT 1,
    canonical         TEXT NOT NULL,
    raw               BYTEA NOT NULL,
    UNIQUE (source, dedupe_key)
);
CREATE INDEX events_received ON events (received_at);
CREATE INDEX events_user ON events (namespace, user_id, event_type, occurred_at);

CREATE TABLE ledger (
    id          BIGSERIAL PRIMARY KEY,
    event_id    TEXT NOT NULL REFERENCES events (id),
    namespace   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    course_id   TEXT,
    rule        TEXT NOT NULL,
    points      BIGINT NOT NULL,
    reason      TEXT,
    occurred_at BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX ledger_user ON ledger (namespace, user_id, id);
CREATE INDEX ledger_event ON ledger (event_id);
CREATE INDEX ledger_course ON ledger (course_id, occurred_at);
CREATE INDEX ledger_time ON ledger (occurred_at);

CREATE TABLE totals (
    namespace  TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    points     BIGINT NOT NULL,
    events     BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, user_id)
);
CREATE INDEX totals_rank ON totals (points DESC, user_id);
CREATE INDEX totals_ns_rank ON totals (namespace, points DESC, user_id);
