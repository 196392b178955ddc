-- History's index written as runs: a room's entries that wait in memory are written together,
-- a few hundred at a time, as one row of their message rowids packed (`store/room_index.rs`)
-- instead of one `room_index` row each. A run holds seqs first_seq to last_seq, all of them;
-- a room's runs follow one another from seq 1. The entries already in `room_index` are moved
-- into runs by the server right after this (`room_index::convert_legacy_entries`), which
-- then drops that table.
CREATE TABLE room_index_runs (
    room_key  INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    rowids    BLOB NOT NULL,
    PRIMARY KEY (room_key, last_seq)
) WITHOUT ROWID;
