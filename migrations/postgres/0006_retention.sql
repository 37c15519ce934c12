-- Retention's progress: per source and kind of pruning (`raw`, `events`),
-- the id up to which events have been examined, so that each pass starts
-- where the last one stopped instead of at the oldest event.
CREATE TABLE retention_marks (
    source TEXT NOT NULL,
    kind   TEXT NOT NULL,
    upto   TEXT NOT NULL,
    PRIMARY KEY (source, kind)
);
