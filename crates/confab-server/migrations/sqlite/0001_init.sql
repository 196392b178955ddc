-- Users: password accounts (password_hash set) and token users created on first use.
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    password_hash TEXT,
    created_at    INTEGER NOT NULL
);
-- Login names are unique among password accounts only; token users may share display names.
CREATE UNIQUE INDEX users_account_name ON users (name) WHERE password_hash IS NOT NULL;
CREATE INDEX users_name ON users (name);

-- Rooms; last_seq is the seq of the newest message and is bumped in the same transaction
-- that inserts it, which is what keeps seqs gap-free.
CREATE TABLE rooms (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    private    INTEGER NOT NULL DEFAULT 0,
    owner      TEXT,
    dm         INTEGER NOT NULL DEFAULT 0,
    -- For DM rooms, the two user ids as a JSON array: ids may contain ':', so the room id
    -- alone does not say whose conversation it is.
    dm_users   TEXT,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);

-- Membership with the member's read position (unread counts survive restarts).
CREATE TABLE members (
    room_id   TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id   TEXT NOT NULL,
    read_seq  INTEGER NOT NULL DEFAULT 0,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
) WITHOUT ROWID;
CREATE INDEX members_user ON members (user_id);

-- History, clustered by (room, seq) so pages are range scans.
CREATE TABLE messages (
    room_id    TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    id         TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    user_name  TEXT NOT NULL,
    content    TEXT NOT NULL,
    client_id  TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, seq)
) WITHOUT ROWID;
-- Safe retries: one message per (user, client_id).
CREATE UNIQUE INDEX messages_client_id ON messages (user_id, client_id) WHERE client_id IS NOT NULL;

-- Every deployment starts with a public room everyone can find.
INSERT INTO rooms (id, name, private, owner, dm, last_seq, created_at)
VALUES ('general', 'general', 0, NULL, 0, 0, CAST(strftime('%s', 'now') AS INTEGER) * 1000);
