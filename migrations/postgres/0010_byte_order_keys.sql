-- The text columns that key an index compare byte by byte (collation "C"),
-- as every text comparison does on SQLite. Under the database's own
-- collation (a locale such as en_US.UTF-8, or C.UTF-8) each comparison in
-- a B-tree goes through the C library's `strcoll`: about a tenth of
-- PostgreSQL's CPU time on the hook's writes. The ids and keys are
-- identifiers, not prose, so no reader loses an order it relied on, and
-- the leaderboards now break ties in the same order on both stores.
--
-- Only the collation changes: PostgreSQL rebuilds the indexes on these
-- columns, not the tables, holding each table's lock meanwhile (every
-- instance waits). A view of an operator's on one of these columns makes
-- the migration fail ("cannot alter type of a column used by a view"):
-- drop it first and create it again after.

ALTER TABLE events
    ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN source TYPE TEXT COLLATE "C",
    ALTER COLUMN dedupe_key TYPE TEXT COLLATE "C",
    ALTER COLUMN namespace TYPE TEXT COLLATE "C",
    ALTER COLUMN user_id TYPE TEXT COLLATE "C",
    ALTER COLUMN event_type TYPE TEXT COLLATE "C";

ALTER TABLE ledger
    ALTER COLUMN event_id TYPE TEXT COLLATE "C",
    ALTER COLUMN namespace TYPE TEXT COLLATE "C",
    ALTER COLUMN user_id TYPE TEXT COLLATE "C",
    ALTER COLUMN course_id TYPE TEXT COLLATE "C",
    ALTER COLUMN rule TYPE TEXT COLLATE "C",
    ALTER COLUMN once_key TYPE TEXT COLLATE "C";

ALTER TABLE totals
    ALTER COLUMN namespace TYPE TEXT COLLATE "C",
    ALTER COLUMN user_id TYPE TEXT COLLATE "C";

ALTER TABLE course_points
    ALTER COLUMN course_id TYPE TEXT COLLATE "C",
    ALTER COLUMN namespace TYPE TEXT COLLATE "C",
    ALTER COLUMN user_id TYPE TEXT COLLATE "C";

ALTER TABLE recent_points
    ALTER COLUMN namespace TYPE TEXT COLLATE "C",
    ALTER COLUMN user_id TYPE TEXT COLLATE "C";

ALTER TABLE retention_marks
    ALTER COLUMN source TYPE TEXT COLLATE "C",
    ALTER COLUMN kind TYPE TEXT COLLATE "C";
