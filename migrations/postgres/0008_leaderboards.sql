-- Summary tables for the leaderboards that would otherwise aggregate the
-- ledger, as SQLite's 0009: points per learner per course, and points per
-- learner since the start of a trailing window (`recent_window.start_ms`,
-- moved forward by the server about once a minute to seven days before
-- now). `entries` counts the rows behind a sum, and a sum with none is
-- deleted, so these tables list exactly the learners a GROUP BY of the
-- ledger would.
--
-- Statement-level triggers on the ledger keep both exact in the statement
-- that writes the ledger: each statement's rows are summed per key and
-- applied in key order, so concurrent writers lock the sums' rows in the
-- same order, and every writer locks a learner's total (in key order)
-- before it writes the ledger, so none waits on another in a circle. A
-- writer holds a shared advisory lock while it reads the window's start;
-- a move of the window takes it exclusively, so no row is counted under a
-- start that is being moved.
--
-- SQLite's stats counters (its 0005) are not kept here: every writer would
-- update the same few rows, serialising PostgreSQL's parallel writers.
--
-- The overall leaderboard merges each namespace's top of `totals_ns_rank`
-- (as on SQLite since its 0009), so `totals_rank` is read by nothing: one
-- index less to update per event pays for part of the sums below.
DROP INDEX totals_rank;

CREATE TABLE course_points (
    course_id TEXT NOT NULL,
    namespace TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    points    BIGINT NOT NULL,
    entries   BIGINT NOT NULL,
    PRIMARY KEY (course_id, namespace, user_id)
);
CREATE INDEX course_points_rank ON course_points (course_id, points DESC, namespace, user_id);

INSERT INTO course_points (course_id, namespace, user_id, points, entries)
SELECT course_id, namespace, user_id, SUM(points), COUNT(*)
FROM ledger WHERE course_id IS NOT NULL GROUP BY 1, 2, 3;

-- One row. The window starts empty (at the far future); the server's first
-- move brings it to seven days ago, adding what the ledger holds since.
CREATE TABLE recent_window (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    start_ms BIGINT NOT NULL
);
INSERT INTO recent_window (id, start_ms) VALUES (1, 9223372036854775807);

CREATE TABLE recent_points (
    namespace TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    points    BIGINT NOT NULL,
    entries   BIGINT NOT NULL,
    PRIMARY KEY (namespace, user_id)
);
CREATE INDEX recent_points_ns_rank ON recent_points (namespace, points DESC, user_id);

-- The window's start for a ledger writer, read under the advisory lock
-- that writers share and a move of the window (`move_recent_window`) takes
-- exclusively (the key is the text 'recent_window' hashed). The read is a
-- statement after the lock, so it sees a move that committed meanwhile.
CREATE FUNCTION recent_window_start_shared() RETURNS BIGINT LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('recent_window'));
    RETURN (SELECT start_ms FROM recent_window WHERE id = 1);
END $$;

-- Adds the statement's new ledger rows (`new_rows`) to the sums.
CREATE FUNCTION ledger_sums_add() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    window_start BIGINT := recent_window_start_shared();
BEGIN
    INSERT INTO course_points AS c (course_id, namespace, user_id, points, entries)
    SELECT course_id, namespace, user_id, SUM(points), COUNT(*) FROM new_rows
    WHERE course_id IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (course_id, namespace, user_id) DO UPDATE
    SET points = c.points + excluded.points, entries = c.entries + excluded.entries;
    INSERT INTO recent_points AS r (namespace, user_id, points, entries)
    SELECT namespace, user_id, SUM(points), COUNT(*) FROM new_rows
    WHERE occurred_at >= window_start GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (namespace, user_id) DO UPDATE
    SET points = r.points + excluded.points, entries = r.entries + excluded.entries;
    RETURN NULL;
END $$;

-- Takes the statement's old ledger rows (`old_rows`) out of the sums, and
-- deletes the sums left with no rows.
CREATE FUNCTION ledger_sums_subtract() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    window_start BIGINT := recent_window_start_shared();
BEGIN
    UPDATE course_points AS c
    SET points = c.points - o.points, entries = c.entries - o.entries
    FROM (SELECT course_id, namespace, user_id, SUM(points) AS points, COUNT(*) AS entries
          FROM old_rows WHERE course_id IS NOT NULL GROUP BY 1, 2, 3) AS o
    WHERE (c.course_id, c.namespace, c.user_id) = (o.course_id, o.namespace, o.user_id);
    DELETE FROM course_points AS c USING old_rows AS o
    WHERE c.entries = 0
        AND (c.course_id, c.namespace, c.user_id) = (o.course_id, o.namespace, o.user_id);
    UPDATE recent_points AS r
    SET points = r.points - o.points, entries = r.entries - o.entries
    FROM (SELECT namespace, user_id, SUM(points) AS points, COUNT(*) AS entries
          FROM old_rows WHERE occurred_at >= window_start GROUP BY 1, 2) AS o
    WHERE (r.namespace, r.user_id) = (o.namespace, o.user_id);
    DELETE FROM recent_points AS r USING old_rows AS o
    WHERE r.entries = 0 AND (r.namespace, r.user_id) = (o.namespace, o.user_id);
    RETURN NULL;
END $$;

-- An update adds its new rows before it subtracts its old ones (triggers
-- fire in name order), so a sum that keeps its rows is never emptied on
-- the way.
CREATE TRIGGER ledger_sums_insert AFTER INSERT ON ledger
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_sums_add();
CREATE TRIGGER ledger_sums_update_1_new AFTER UPDATE ON ledger
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_sums_add();
CREATE TRIGGER ledger_sums_update_2_old AFTER UPDATE ON ledger
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_sums_subtract();
CREATE TRIGGER ledger_sums_delete AFTER DELETE ON ledger
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_sums_subtract();
