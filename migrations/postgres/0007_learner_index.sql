-- One ledger index by learner instead of two, as SQLite's migration 0010:
-- a unique (namespace, user_id, rule, once_key) holds once-awards to one
-- per learner, rule and key (NULL keys are distinct, so rows without one
-- never conflict), and finds a learner's rows; every award writes one
-- index entry by learner fewer.
DROP INDEX ledger_once;
DROP INDEX ledger_user;
CREATE UNIQUE INDEX ledger_learner ON ledger (namespace, user_id, rule, once_key);
