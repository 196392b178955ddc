-- History's (room, seq) index leaves the messages table. As an index of messages, every
-- message put its entry on its own room's page of the index, so a commit of messages in N
-- rooms dirtied N index pages, each written whole to the WAL and again at the next
-- checkpoint. The entries now go to room_index a room's worth at a time
-- (store/room_index.rs); those not yet there are kept in memory and found again at start
-- from the messages at or after low_marks.room_index.
CREATE TABLE room_index (
    room_key INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    -- The message's rowid in messages.
    message  INTEGER NOT NULL,
    PRIMARY KEY (room_key, seq)
) WITHOUT ROWID;

-- In key order (the old index's), so each page of the new table is written once.
INSERT INTO room_index (room_key, seq, message)
SELECT room_key, seq, rowid FROM messages ORDER BY room_key, seq;

DROP INDEX messages_room_seq;

-- The low marks of what waits in memory, in one row so that a commit moving both writes one
-- page: every message with a rowid below `client_keys` has its key in client_keys (if it
-- has a client_id), every one below `room_index` its entry in room_index.
CREATE TABLE low_marks (
    client_keys INTEGER NOT NULL,
    room_index  INTEGER NOT NULL
);
INSERT INTO low_marks (client_keys, room_index)
SELECT low, (SELECT coalesce(max(rowid), 0) + 1 FROM messages) FROM client_keys_pending;

DROP TABLE client_keys_pending;
