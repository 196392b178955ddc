-- History becomes a rowid table with (room_id, seq) as a unique index instead of the clustering
-- key. Clustered by room, every group commit appended to the tail leaf of each active room and
-- split those leaves over and over, writing most of a page to the WAL per room per commit; in
-- insertion order the rows fill fresh pages at the end of the table, and only the small index
-- entries still go to one leaf per room. W4 (100 rooms): 13.6 -> 11.4 us of server CPU per
-- acked message.
CREATE TABLE messages_by_rowid (
    room_id    TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    id         TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    user_name  TEXT NOT NULL,
    content    TEXT NOT NULL,
    client_id  TEXT,
    created_at INTEGER NOT NULL
);
INSERT INTO messages_by_rowid (room_id, seq, id, user_id, user_name, content, client_id, created_at)
SELECT room_id, seq, id, user_id, user_name, content, client_id, created_at
FROM messages ORDER BY room_id, seq;
DROP TABLE messages;
ALTER TABLE messages_by_rowid RENAME TO messages;
-- History pages are range scans of this index.
CREATE UNIQUE INDEX messages_room_seq ON messages (room_id, seq);
-- Safe retries: one message per (user, client_id).
CREATE UNIQUE INDEX messages_client_id ON messages (user_id, client_id) WHERE client_id IS NOT NULL;
