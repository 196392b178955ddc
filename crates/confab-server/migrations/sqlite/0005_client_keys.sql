-- Retry keys leave the messages table's indexes. A unique index on messages (user_id,
-- client_id) put every message's entry on its author's own page of the index, so each
-- message dirtied a page of its own, and every checkpoint wrote as many scattered pages as
-- messages had come in (BENCHMARKS.md, 2026-12-02 afternoon). The keys now go to
-- client_keys in batches, several of an author's at a time (store/retry_keys.rs); those not
-- yet there are kept in memory and found again at start from the messages at or after
-- client_keys_pending.low.
CREATE TABLE client_keys (
    user_id   TEXT NOT NULL,
    client_id TEXT NOT NULL,
    -- The message's rowid in messages.
    message   INTEGER NOT NULL,
    PRIMARY KEY (user_id, client_id)
) WITHOUT ROWID;

-- In key order (the old index's), so each page of the new table is written once.
INSERT INTO client_keys (user_id, client_id, message)
SELECT user_id, client_id, rowid FROM messages WHERE client_id IS NOT NULL
ORDER BY user_id, client_id;

DROP INDEX messages_client_id;

-- Every message with a rowid below `low` has its key in client_keys.
CREATE TABLE client_keys_pending (low INTEGER NOT NULL);
INSERT INTO client_keys_pending (low) SELECT coalesce(max(rowid), 0) + 1 FROM messages;
