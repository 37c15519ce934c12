-- Awards a rule gives at most once per (namespace, user, rule, key), such as
-- a lesson's points per learner and lesson whatever the event ids: the key
-- is kept on the ledger row, and this index refuses a second one.
ALTER TABLE ledger ADD COLUMN once_key TEXT;
CREATE UNIQUE INDEX ledger_once ON ledger (namespace, user_id, rule, once_key)
    WHERE once_key IS NOT NULL;
