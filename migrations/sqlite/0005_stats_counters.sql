-- `/api/v1/stats` without scanning every event: counters of events by
-- (source, type, status) and of awarded points by UTC day (of the award).
-- Triggers keep them as rows change, whichever path changes them (queue
-- workers, rescoring, admin retries). The SQLite writer thread runs with
-- triggers off and keeps them itself, summed per transaction: two upserts
-- per event cost 6% of the hook's throughput. (PostgreSQL keeps its scans:
-- its writers run in parallel, and counter rows would serialise them.)
CREATE TABLE event_counts (
    source     TEXT NOT NULL,
    event_type TEXT NOT NULL,
    status     TEXT NOT NULL,
    n          INTEGER NOT NULL,
    PRIMARY KEY (source, event_type, status)
) WITHOUT ROWID;

CREATE TABLE ledger_days (
    day    TEXT NOT NULL PRIMARY KEY,
    points INTEGER NOT NULL,
    -- Ledger rows of the day: a day whose rows were all deleted is not shown.
    entries INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO event_counts (source, event_type, status, n)
SELECT source, COALESCE(event_type, 'unmapped'), status, COUNT(*)
FROM events GROUP BY 1, 2, 3;

INSERT INTO ledger_days (day, points, entries)
SELECT strftime('%Y-%m-%d', created_at / 1000, 'unixepoch'), SUM(points), COUNT(*)
FROM ledger GROUP BY 1;

CREATE TRIGGER event_counts_insert AFTER INSERT ON events
BEGIN
    INSERT INTO event_counts (source, event_type, status, n)
    VALUES (NEW.source, COALESCE(NEW.event_type, 'unmapped'), NEW.status, 1)
    ON CONFLICT (source, event_type, status) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER event_counts_update AFTER UPDATE OF source, event_type, status ON events
WHEN OLD.source IS NOT NEW.source OR OLD.event_type IS NOT NEW.event_type
    OR OLD.status IS NOT NEW.status
BEGIN
    UPDATE event_counts SET n = n - 1
    WHERE source = OLD.source AND event_type = COALESCE(OLD.event_type, 'unmapped')
        AND status = OLD.status;
    INSERT INTO event_counts (source, event_type, status, n)
    VALUES (NEW.source, COALESCE(NEW.event_type, 'unmapped'), NEW.status, 1)
    ON CONFLICT (source, event_type, status) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER event_counts_delete AFTER DELETE ON events
BEGIN
    UPDATE event_counts SET n = n - 1
    WHERE source = OLD.source AND event_type = COALESCE(OLD.event_type, 'unmapped')
        AND status = OLD.status;
END;

CREATE TRIGGER ledger_days_insert AFTER INSERT ON ledger
BEGIN
    INSERT INTO ledger_days (day, points, entries)
    VALUES (strftime('%Y-%m-%d', NEW.created_at / 1000, 'unixepoch'), NEW.points, 1)
    ON CONFLICT (day) DO UPDATE SET points = points + excluded.points, entries = entries + 1;
END;

CREATE TRIGGER ledger_days_update AFTER UPDATE OF points, created_at ON ledger
BEGIN
    UPDATE ledger_days SET points = points - OLD.points, entries = entries - 1
    WHERE day = strftime('%Y-%m-%d', OLD.created_at / 1000, 'unixepoch');
    INSERT INTO ledger_days (day, points, entries)
    VALUES (strftime('%Y-%m-%d', NEW.created_at / 1000, 'unixepoch'), NEW.points, 1)
    ON CONFLICT (day) DO UPDATE SET points = points + excluded.points, entries = entries + 1;
END;

CREATE TRIGGER ledger_days_delete AFTER DELETE ON ledger
BEGIN
    UPDATE ledger_days SET points = points - OLD.points, entries = entries - 1
    WHERE day = strftime('%Y-%m-%d', OLD.created_at / 1000, 'unixepoch');
END;
