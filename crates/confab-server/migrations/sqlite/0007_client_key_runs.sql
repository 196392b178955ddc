-- Retry keys written as runs: an author's keys that come above every key the author already
-- has are written together as one row, packed (`store/key_run.rs`), instead of one
-- `client_keys` row each. `last_key` is the run's greatest key; an author's runs never
-- overlap, so the first run at or above a key is the only one that can hold it. Keys below
-- the author's greatest stay one row each in `client_keys`, which is looked up first.
CREATE TABLE client_key_runs (
    user_id  TEXT NOT NULL,
    last_key TEXT NOT NULL,
    keys     BLOB NOT NULL,
    PRIMARY KEY (user_id, last_key)
) WITHOUT ROWID;
