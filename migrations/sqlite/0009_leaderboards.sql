-- Summary tables for the leaderboards that would otherwise aggregate the
-- ledger: points per learner per course, and points per learner since the
-- start of a trailing window (`recent_window.start_ms`, moved forward by the
-- server about once a minute to seven days before now). Triggers on the
-- ledger keep both exactly right in the transaction that writes the ledger;
-- `entries` counts the rows behind a sum, and a sum with none is deleted,
-- so these tables list exactly the learners a GROUP BY of the ledger would.

CREATE TABLE course_points (
    course_id TEXT NOT NULL,
    namespace TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    points    INTEGER NOT NULL,
    entries   INTEGER NOT NULL,
    PRIMARY KEY (course_id, namespace, user_id)
) WITHOUT ROWID;
CREATE INDEX course_points_rank ON course_points (course_id, points DESC, namespace, user_id);

INSERT INTO course_points (course_id, namespace, user_id, points, entries)
SELECT course_id, namespace, user_id, SUM(points), COUNT(*)
FROM ledger WHERE course_id IS NOT NULL GROUP BY 1, 2, 3;

-- One row. The window starts empty (at the far future); the server's first
-- move brings it to seven days ago, adding what the ledger holds since.
CREATE TABLE recent_window (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    start_ms INTEGER NOT NULL
);
INSERT INTO recent_window (id, start_ms) VALUES (1, 9223372036854775807);

CREATE TABLE recent_points (
    namespace TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    points    INTEGER NOT NULL,
    entries   INTEGER NOT NULL,
    PRIMARY KEY (namespace, user_id)
) WITHOUT ROWID;
CREATE INDEX recent_points_ns_rank ON recent_points (namespace, points DESC, user_id);

-- A sum whose last row went is deleted: one trigger per table, whichever
-- ledger trigger took the row away.
CREATE TRIGGER course_points_empty AFTER UPDATE OF entries ON course_points
WHEN NEW.entries = 0
BEGIN
    DELETE FROM course_points
    WHERE course_id = NEW.course_id AND namespace = NEW.namespace AND user_id = NEW.user_id;
END;

CREATE TRIGGER recent_points_empty AFTER UPDATE OF entries ON recent_points
WHEN NEW.entries = 0
BEGIN
    DELETE FROM recent_points WHERE namespace = NEW.namespace AND user_id = NEW.user_id;
END;

CREATE TRIGGER course_points_insert AFTER INSERT ON ledger
WHEN NEW.course_id IS NOT NULL
BEGIN
    INSERT INTO course_points (course_id, namespace, user_id, points, entries)
    VALUES (NEW.course_id, NEW.namespace, NEW.user_id, NEW.points, 1)
    ON CONFLICT (course_id, namespace, user_id)
    DO UPDATE SET points = points + excluded.points, entries = entries + 1;
END;

CREATE TRIGGER course_points_update AFTER UPDATE OF course_id, namespace, user_id, points ON ledger
BEGIN
    UPDATE course_points SET points = points - OLD.points, entries = entries - 1
    WHERE course_id = OLD.course_id AND namespace = OLD.namespace AND user_id = OLD.user_id;
    INSERT INTO course_points (course_id, namespace, user_id, points, entries)
    SELECT NEW.course_id, NEW.namespace, NEW.user_id, NEW.points, 1
    WHERE NEW.course_id IS NOT NULL
    ON CONFLICT (course_id, namespace, user_id)
    DO UPDATE SET points = points + excluded.points, entries = entries + 1;
END;

CREATE TRIGGER course_points_delete AFTER DELETE ON ledger
WHEN OLD.course_id IS NOT NULL
BEGIN
    UPDATE course_points SET points = points - OLD.points, entries = entries - 1
    WHERE course_id = OLD.course_id AND namespace = OLD.namespace AND user_id = OLD.user_id;
END;

CREATE TRIGGER recent_points_insert AFTER INSERT ON ledger
BEGIN
    INSERT INTO recent_points (namespace, user_id, points, entries)
    SELECT NEW.namespace, NEW.user_id, NEW.points, 1 FROM recent_window
    WHERE NEW.occurred_at >= start_ms
    ON CONFLICT (namespace, user_id)
    DO UPDATE SET points = points + excluded.points, entries = entries + 1;
END;

CREATE TRIGGER recent_points_update AFTER UPDATE OF namespace, user_id, points, occurred_at ON ledger
BEGIN
    UPDATE recent_points SET points = points - OLD.points, entries = entries - 1
    WHERE namespace = OLD.namespace AND user_id = OLD.user_id
        AND OLD.occurred_at >= (SELECT start_ms FROM recent_window);
    INSERT INTO recent_points (namespace, user_id, points, entries)
    SELECT NEW.namespace, NEW.user_id, NEW.points, 1 FROM recent_window
    WHERE NEW.occurred_at >= start_ms
    ON CONFLICT (namespace, user_id)
    DO UPDATE SET points = points + excluded.points, entries = entries + 1;
END;

CREATE TRIGGER recent_points_delete AFTER DELETE ON ledger
WHEN OLD.occurred_at >= (SELECT start_ms FROM recent_window)
BEGIN
    UPDATE recent_points SET points = points - OLD.points, entries = entries - 1
    WHERE namespace = OLD.namespace AND user_id = OLD.user_id;
END;
