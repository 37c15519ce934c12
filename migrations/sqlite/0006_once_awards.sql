-- Awards a rule gives at most once per (namespace, user, rule, key), such as
-- a lesson's points per learner and lesson whatever the event ids: the key
-- is kept on the ledger row, and this index refuses a second one.
ALTER TABLE ledger ADD COLUMN once_key TEXT;

-- The shipped rules' awards already in the ledger get the keys those rules
-- give from now on (the earliest award of each key only: a learner who
-- earned one twice before keeps both, and earns it no more), so that an
-- upgraded server does not award them again.
WITH keyed AS (
    SELECT l.id, l.namespace, l.user_id, l.rule,
        CASE
            WHEN l.rule = 'course_completed' THEN json_extract(e.canonical, '$.course_id')
            WHEN l.rule IN ('lesson_completed', 'lesson_capped', 'quiz_passed')
                THEN json_extract(e.canonical, '$.object_id')
            WHEN l.rule = 'xapi_verbs' AND json_extract(e.canonical, '$.event_type') = 'xapi.completed'
                THEN 'completed:' || json_extract(e.canonical, '$.object_id')
            WHEN l.rule = 'xapi_verbs' AND json_extract(e.canonical, '$.event_type') = 'xapi.passed'
                THEN 'passed:' || json_extract(e.canonical, '$.object_id')
        END AS once_key
    FROM ledger l JOIN events e ON e.id = l.event_id
),
firsts AS (
    SELECT id, once_key FROM (
        SELECT id, once_key, ROW_NUMBER() OVER (
            PARTITION BY namespace, user_id, rule, once_key ORDER BY id) AS n
        FROM keyed WHERE once_key IS NOT NULL
    ) WHERE n = 1
)
UPDATE ledger SET once_key = (SELECT f.once_key FROM firsts f WHERE f.id = ledger.id)
WHERE id IN (SELECT id FROM firsts);

CREATE UNIQUE INDEX ledger_once ON ledger (namespace, user_id, rule, once_key)
    WHERE once_key IS NOT NULL;
