//! The SQLite store's history index: which message (rowid) holds each seq of each room.
//!
//! Messages are stored in arrival order (a rowid table), so a commit's messages go to the
//! table's last pages whatever their rooms. An index on `(room, seq)` would put each
//! message's entry on its own room's page of the index: with messages spread over many
//! rooms (W2: 1,000 rooms), a commit of N messages dirtied N index pages, each written whole
//! to the WAL and again at the next checkpoint (without that index, W2 at half load cost
//! 7.7 % less server CPU: BENCHMARKS.md, 2026-12-03). Instead a room's newest entries wait in
//! memory and are written together: once the room has about [`FLUSH_AT`] waiting, or once
//! the oldest is [`FLUSH_BEHIND`] messages behind the newest. They go out as one row of
//! `room_index_runs`, a run: the room, its first and last seq, and the rowids packed as
//! differences (a byte or two each). One row per entry, as in the `room_index` table before,
//! cost SQLite's insert work for each (callgrind, W2-shaped: 10 % of the server's
//! instructions while rooms flushed; BENCHMARKS.md, 2026-12-05). A history page reads the
//! runs that cover its range, then its messages by rowid in one statement.
//!
//! A room's runs always cover a prefix of its seqs (1 up to some seq), one after the other,
//! and the waiting entries the rest, in order. Readers need both as of their snapshot: the writer
//! commits and publishes a commit's entries under one lock ([`RoomIndex`]), and a reader
//! starts its read transaction and copies what it needs under that lock too. So the waiting
//! entries a reader holds are exactly those whose messages its snapshot has and whose
//! runs it has not.
//!
//! Nothing is lost in a crash: `low_marks.room_index` is kept at or below the rowid of every
//! waiting entry, in the same transactions, and at start the entries of the messages from
//! there on that the runs lack are read back.

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

use foldhash::{HashMap, HashMapExt};
use rusqlite::Connection;

use super::backlog::Backlog;
use super::held_statements::WriterConn;
use super::packing::{put_varint, take_varint, unzigzag, zigzag};
use super::sqlite::{db_err, select_room_key};
use super::{SCALED_FOR_TESTS, StoreError};

/// A room's waiting entries are written together once there are this many (8 in tests).
///
/// 256 entries make a run of about 300-500 bytes: several rooms' runs share a page.
pub(super) const FLUSH_AT: usize = if SCALED_FOR_TESTS { 8 } else { 256 };

/// How far a room's due size strays from [`FLUSH_AT`], either way, varied from room to room
/// and from one flush to the next (none in tests, which count on exact flushes). Rooms whose
/// messages come in step (W2: 750 rooms taking 10 a second each) all reached 256 within the
/// same second every 25.6 s, and their 192,000 entries made the slowest seconds of every run
/// (BENCHMARKS.md, 2026-12-03, last); due at 192 to 320 they spread over 13 s the first time
/// and drift apart after.
const FLUSH_SPREAD: usize = if SCALED_FOR_TESTS { 0 } else { FLUSH_AT / 4 };

/// A room's waiting entries are written, whatever their number, once the oldest is this many
/// messages behind the newest: this bounds the memory they take (8 bytes each) and the
/// messages read at start.
pub(super) const FLUSH_BEHIND: i64 = if SCALED_FOR_TESTS { 40 } else { 100_000 };

/// Writes a room's waiting entries as one run. `OR FAIL`: see the messages' insert
/// (`INSERT_MESSAGES` in `sqlite.rs`; a failure rolls the whole transaction back).
/// A `static`, not a `const`: the writer's held statement is found by the text's address.
static INSERT_RUN: &str =
    "INSERT OR FAIL INTO room_index_runs (room_key, last_seq, first_seq, rowids)
     VALUES (?1, ?2, ?3, ?4)";

/// The runs of a room (`?1`) that hold seqs above `?2` and up to `?3`, in `$order` of seq.
/// The run holding `?3` is the first to end at or after it; those after it are not read.
macro_rules! runs_in_range {
    ($order:literal) => {
        concat!(
            "SELECT first_seq, rowids FROM room_index_runs
             WHERE room_key = ?1 AND last_seq > ?2 AND last_seq <= coalesce(
                 (SELECT min(last_seq) FROM room_index_runs WHERE room_key = ?1 AND last_seq >= ?3),
                 9223372036854775807)
             ORDER BY last_seq ",
            $order
        )
    };
}

/// A range's runs, oldest first (see `runs_in_range!`).
pub(super) const RUNS_IN_RANGE: &str = runs_in_range!("ASC");

/// A range's runs, newest first.
pub(super) const RUNS_IN_RANGE_DESC: &str = runs_in_range!("DESC");

/// Entries a run holds at most when the legacy `room_index` rows are moved into runs.
const LEGACY_RUN: usize = FLUSH_AT;

/// A room's index entries that are not written as runs yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Waiting {
    /// The room's greatest seq in its runs (0 if none): the waiting seqs follow it.
    pub(super) indexed: u64,
    /// The rowids of seqs `indexed + 1`, `indexed + 2`, ... in order.
    pub(super) rowids: Vec<i64>,
}

impl Waiting {
    /// The room's newest seq.
    pub(super) fn last_seq(&self) -> u64 {
        self.indexed + self.rowids.len() as u64
    }

    /// The rowid of the message with `seq`, if that seq is waiting.
    pub(super) fn rowid(&self, seq: u64) -> Option<i64> {
        let offset = seq.checked_sub(self.indexed + 1)?;
        self.rowids.get(usize::try_from(offset).ok()?).copied()
    }

    /// The lowest rowid waiting: the room's place in the backlog.
    fn first_rowid(&self) -> i64 {
        self.rowids.iter().copied().min().unwrap_or(i64::MAX)
    }

    /// How many entries waiting make the room `key` due (see [`due_size`]).
    fn due_size(&self, key: i64) -> usize {
        due_size(FLUSH_AT, FLUSH_SPREAD, key, self.indexed)
    }
}

/// The number of waiting entries that makes room `key` due, whose greatest indexed seq is
/// `indexed`: `at` give or take up to `spread`, the same for the same room and flush (so an
/// append that reaches it is the one that fills the room, and a restart agrees), different
/// from room to room and, as `indexed` moves on, from one flush to the next.
fn due_size(at: usize, spread: usize, key: i64, indexed: u64) -> usize {
    if spread == 0 {
        return at;
    }
    let hash = foldhash::quality::FixedState::default().hash_one((key, indexed));
    at - spread + (hash % (2 * spread as u64 + 1)) as usize
}

/// The committed waiting entries of every room that has some, as readers see them. Its lock
/// is held by the writer across each COMMIT that changes them and their publication, and by
/// a reader while it starts its snapshot and copies what it needs.
#[derive(Debug, Default)]
pub(super) struct RoomIndex {
    published: Mutex<HashMap<i64, Waiting>>,
}

impl RoomIndex {
    /// Holds off readers' snapshots, for a commit and its publication.
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<i64, Waiting>> {
        // Nothing under this lock can leave the map half-changed; a panic elsewhere while it
        // was held does not make it wrong.
        self.published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The key of the room `room` and its waiting entries, as of the snapshot of the read
    /// transaction this starts: call it in a transaction (`BEGIN`) before any other read.
    /// `None` if the room does not exist.
    pub(super) fn room(
        &self,
        conn: &Connection,
        room: &str,
    ) -> Result<Option<(i64, Option<Waiting>)>, StoreError> {
        let published = self.lock();
        let key = select_room_key(conn, room)?;
        Ok(key.map(|key| (key, published.get(&key).cloned())))
    }

    /// The newest seq of every room with waiting entries, as of the snapshot of the read
    /// transaction this starts: call it in a transaction (`BEGIN`) before any other read.
    pub(super) fn last_seqs(&self, conn: &Connection) -> Result<HashMap<i64, u64>, StoreError> {
        let published = self.lock();
        conn.prepare_cached("SELECT room_index FROM low_marks")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get::<_, i64>(0)))
            .map_err(db_err)?;
        Ok(published
            .iter()
            .map(|(&key, waiting)| (key, waiting.last_seq()))
            .collect())
    }
}

/// How the open transaction changed a room's waiting entries since they were published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Only added entries after them: the published copy is a prefix and is extended, not
    /// copied again (a room's entries are up to [`FLUSH_AT`] rowids, and W2's commits change a
    /// room or two each).
    Added,
    /// Wrote them as a run, deleted them or started them: the copy is replaced.
    Replaced,
}

/// The writer's side: every waiting entry, committed or not, and what the open transaction
/// changed. Owned by the writer (through the tail cache's lock).
#[derive(Debug, Default)]
pub(super) struct IndexWriter {
    /// Whether `rooms` holds what the database says; false at first and after a write that
    /// was rolled back.
    loaded: bool,
    /// Each room's waiting entries; rooms with none are absent.
    rooms: HashMap<i64, Waiting>,
    /// Rooms with waiting entries, and which are due to be written (those that reached their
    /// due size are written from the next append on), with `low_marks.room_index` as stored.
    backlog: Backlog<i64>,
    /// Rooms whose entries the open transaction changed, and how, to publish once it commits.
    changed: HashMap<i64, Change>,
    /// Publish every room at the next commit (the entries were read back from the database).
    republish: bool,
}

impl IndexWriter {
    /// Reads the waiting entries back from the messages at or after the stored low mark, if
    /// they are not loaded. Every room is published at the next commit.
    pub(super) fn load(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.loaded {
            return Ok(());
        }
        *self = IndexWriter::default();
        let low = conn
            .query_row("SELECT room_index FROM low_marks", [], |row| row.get(0))
            .map_err(db_err)?;
        self.backlog.set_stored_low(low);
        let mut stmt = conn
            .prepare("SELECT rowid, room_key, seq FROM messages WHERE rowid >= ?1 ORDER BY rowid")
            .map_err(db_err)?;
        let rows = stmt
            .query_map([low], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .map_err(db_err)?;
        // The rooms met so far: their greatest indexed seq, and their waiting entries.
        let mut seen: HashMap<i64, Waiting> = HashMap::new();
        for row in rows {
            let (rowid, key, seq): (i64, i64, u64) = row.map_err(db_err)?;
            let waiting = match seen.entry(key) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => entry.insert(Waiting {
                    indexed: indexed_last_seq(conn, key)?,
                    rowids: Vec::new(),
                }),
            };
            if seq <= waiting.indexed {
                continue;
            }
            if seq != waiting.last_seq() + 1 {
                return Err(StoreError::Database(format!(
                    "history index: room key {key} has seq {seq} after {}",
                    waiting.last_seq()
                )));
            }
            waiting.rowids.push(rowid);
        }
        for (key, waiting) in seen {
            if !waiting.rowids.is_empty() {
                self.backlog.started(waiting.first_rowid(), key);
                if waiting.rowids.len() >= waiting.due_size(key) {
                    self.backlog.filled(key);
                }
                self.rooms.insert(key, waiting);
            }
        }
        self.loaded = true;
        self.republish = true;
        Ok(())
    }

    /// Forgets everything, to be read back before the next use: after a write that was rolled
    /// back, whose entries may be here.
    pub(super) fn forget(&mut self) {
        self.loaded = false;
    }

    /// The room's newest seq, as the write connection sees it.
    pub(super) fn last_seq(&self, conn: &Connection, key: i64) -> Result<u64, StoreError> {
        match self.rooms.get(&key) {
            Some(waiting) => Ok(waiting.last_seq()),
            None => indexed_last_seq(conn, key),
        }
    }

    /// Records the entry of a message just inserted as `rowid`, with the room's next seq
    /// (the caller has checked it is `last_seq + 1`).
    pub(super) fn add(&mut self, key: i64, seq: u64, rowid: i64) {
        match self.rooms.get_mut(&key) {
            Some(waiting) => {
                self.changed.entry(key).or_insert(Change::Added);
                debug_assert_eq!(seq, waiting.last_seq() + 1);
                // Rowids only grow, unless a deleted room took the newest messages: then the
                // room's oldest may be this one.
                if waiting.rowids.last().is_some_and(|&last| rowid < last) {
                    let first = waiting.first_rowid();
                    if rowid < first {
                        self.backlog.moved_down(first, rowid, key);
                    }
                }
                waiting.rowids.push(rowid);
                if waiting.rowids.len() == waiting.due_size(key) {
                    self.backlog.filled(key);
                }
            }
            None => {
                self.changed.insert(key, Change::Replaced);
                self.backlog.started(rowid, key);
                self.rooms.insert(
                    key,
                    Waiting {
                        indexed: seq - 1,
                        rowids: vec![rowid],
                    },
                );
            }
        }
    }

    /// At the end of an append of `stored` messages, in its transaction: writes the entries
    /// that are due as runs (of rooms with their due size waiting, then of those whose
    /// oldest fell [`FLUSH_BEHIND`] behind `newest`, the append's last rowid), about twice as
    /// many as the append stored (see `Backlog::write_due`; at least one room's), and
    /// moves the low mark.
    pub(super) fn write_due(
        &mut self,
        conn: &WriterConn<'_, '_>,
        newest: Option<i64>,
        stored: usize,
    ) -> Result<(), StoreError> {
        let (rooms, changed) = (&mut self.rooms, &mut self.changed);
        let low = self
            .backlog
            .write_due(newest, FLUSH_BEHIND, stored, |&key| {
                // A room can be due twice (full and behind); the first write took it.
                let Some(waiting) = rooms.remove(&key) else {
                    return Ok(None);
                };
                conn.held(INSERT_RUN, |stmt| {
                    execute_run(stmt, key, waiting.indexed + 1, &waiting.rowids)
                })?;
                changed.insert(key, Change::Replaced);
                Ok(Some((waiting.first_rowid(), waiting.rowids.len())))
            })?;
        if let Some(low) = low {
            conn.held("UPDATE low_marks SET room_index = ?1", |stmt| {
                stmt.execute([low]).map_err(db_err)
            })?;
        }
        Ok(())
    }

    /// Deletes the room's messages, their retry keys (those that are rows of their own; see
    /// `retry_keys.rs`) and their index entries, in the open transaction.
    pub(super) fn delete_room(&mut self, conn: &Connection, key: i64) -> Result<(), StoreError> {
        let mut rowids = Vec::new();
        for (_, rowid) in indexed_rowids(conn, key, 0, u64::MAX, false, usize::MAX)? {
            rowids.push(rowid);
        }
        conn.execute("DELETE FROM room_index_runs WHERE room_key = ?1", [key])
            .map_err(db_err)?;
        let waiting = self.rooms.remove(&key);
        if let Some(waiting) = &waiting {
            rowids.extend_from_slice(&waiting.rowids);
        }
        for rowid in rowids {
            conn.prepare_cached(
                "DELETE FROM client_keys WHERE (user_id, client_id) =
                     (SELECT user_id, client_id FROM messages WHERE rowid = ?1)",
            )
            .and_then(|mut stmt| stmt.execute([rowid]))
            .map_err(db_err)?;
            conn.prepare_cached("DELETE FROM messages WHERE rowid = ?1")
                .and_then(|mut stmt| stmt.execute([rowid]))
                .map_err(db_err)?;
        }
        if let Some(waiting) = waiting {
            self.backlog.done(waiting.first_rowid(), key);
            self.changed.insert(key, Change::Replaced);
        }
        Ok(())
    }

    /// Whether the open transaction's commit has entries to publish (and so must hold off
    /// readers' snapshots while it commits).
    pub(super) fn has_news(&self) -> bool {
        !self.changed.is_empty() || self.republish || !self.loaded
    }

    /// After a commit, under the readers' lock taken before it: publishes what the commit
    /// changed, or, if it was rolled back (or a write in it was), reads the entries back and
    /// publishes them all.
    pub(super) fn publish(
        &mut self,
        conn: &Connection,
        committed: bool,
        published: &mut HashMap<i64, Waiting>,
    ) {
        if !committed {
            self.loaded = false;
        }
        if let Err(err) = self.load(conn) {
            // Readers keep the last entries published (true unless a commit went through
            // with a failed append in it); the next append tries again.
            tracing::error!(error = %err, "cannot read the history index back");
            self.changed.clear();
            return;
        }
        if std::mem::take(&mut self.republish) {
            published.clone_from(&self.rooms);
            self.changed.clear();
            return;
        }
        for (key, change) in self.changed.drain() {
            let Some(waiting) = self.rooms.get(&key) else {
                published.remove(&key);
                continue;
            };
            match published.get_mut(&key) {
                Some(copy)
                    if change == Change::Added
                        && copy.indexed == waiting.indexed
                        && copy.rowids.len() <= waiting.rowids.len() =>
                {
                    copy.rowids
                        .extend_from_slice(&waiting.rowids[copy.rowids.len()..]);
                }
                Some(copy) => copy.clone_from(waiting),
                None => {
                    published.insert(key, waiting.clone());
                }
            }
        }
    }

    /// Every room's waiting entries, for tests to hold the published ones against.
    #[cfg(test)]
    pub(super) fn rooms(&self) -> &HashMap<i64, Waiting> {
        &self.rooms
    }

    /// Entries waiting in memory, for tests.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.rooms
            .values()
            .map(|waiting| waiting.rowids.len())
            .sum()
    }
}

/// The room's greatest seq in `room_index_runs`, 0 if none: its last run's, one seek.
pub(super) fn indexed_last_seq(conn: &Connection, key: i64) -> Result<u64, StoreError> {
    conn.prepare_cached(
        "SELECT coalesce(max(last_seq), 0) FROM room_index_runs WHERE room_key = ?1",
    )
    .and_then(|mut stmt| stmt.query_row([key], |row| row.get(0)))
    .map_err(db_err)
}

/// Writes the entries of seqs `first_seq`, `first_seq + 1`, ... of room `key` as one run.
fn insert_run(
    conn: &Connection,
    key: i64,
    first_seq: u64,
    rowids: &[i64],
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(INSERT_RUN).map_err(db_err)?;
    execute_run(&mut stmt, key, first_seq, rowids)
}

/// [`insert_run`] with `stmt`, a statement of [`INSERT_RUN`] (the writer holds one).
fn execute_run(
    stmt: &mut rusqlite::Statement<'_>,
    key: i64,
    first_seq: u64,
    rowids: &[i64],
) -> Result<(), StoreError> {
    if rowids.is_empty() {
        return Ok(());
    }
    let last_seq = first_seq + rowids.len() as u64 - 1;
    stmt.execute(rusqlite::params![
        key,
        last_seq,
        first_seq,
        encode_rowids(rowids)
    ])
    .map_err(db_err)?;
    Ok(())
}

/// A run's rowids, each as its difference from the one before (from 0): a room's messages
/// mostly follow one another closely in the table, so most take a byte or two.
fn encode_rowids(rowids: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rowids.len() * 2 + 8);
    let mut previous = 0i64;
    for &rowid in rowids {
        put_varint(&mut out, zigzag(rowid.wrapping_sub(previous)));
        previous = rowid;
    }
    out
}

/// The rowids [`encode_rowids`] packed; an error for a damaged run.
fn decode_rowids(mut packed: &[u8]) -> Result<Vec<i64>, StoreError> {
    let mut rowids = Vec::with_capacity(packed.len());
    let mut previous = 0i64;
    while !packed.is_empty() {
        let delta = take_varint(&mut packed)
            .ok_or_else(|| StoreError::Database("history index: a damaged run".into()))?;
        previous = previous.wrapping_add(unzigzag(delta));
        rowids.push(previous);
    }
    Ok(rowids)
}

/// The (seq, rowid) of room `key`'s indexed seqs above `lower` and below `upper`, at most
/// `wanted`, from the oldest or the newest.
pub(super) fn indexed_rowids(
    conn: &Connection,
    key: i64,
    lower: u64,
    upper: u64,
    newest_first: bool,
    wanted: usize,
) -> Result<Vec<(u64, i64)>, StoreError> {
    let mut found = Vec::new();
    if wanted == 0 || upper <= lower.saturating_add(1) {
        return Ok(found);
    }
    let sql = if newest_first {
        RUNS_IN_RANGE_DESC
    } else {
        RUNS_IN_RANGE
    };
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let clamp = |seq: u64| i64::try_from(seq).unwrap_or(i64::MAX);
    let mut rows = stmt
        .query(rusqlite::params![key, clamp(lower), clamp(upper - 1)])
        .map_err(db_err)?;
    while let Some(row) = rows.next().map_err(db_err)? {
        let first_seq: u64 = row.get(0).map_err(db_err)?;
        let packed = row
            .get_ref(1)
            .map_err(db_err)?
            .as_blob()
            .map_err(|err| StoreError::Database(format!("history index: a run: {err}")))?;
        let run = decode_rowids(packed)?
            .into_iter()
            .enumerate()
            .map(|(at, rowid)| (first_seq + at as u64, rowid))
            .filter(|&(seq, _)| seq > lower && seq < upper);
        let before = found.len();
        if newest_first {
            found.extend(run.rev().take(wanted - before));
        } else {
            found.extend(run.take(wanted - before));
        }
        if found.len() == wanted {
            break;
        }
    }
    Ok(found)
}

/// Moves the entries of the legacy `room_index` (a row each) into runs of up to
/// [`LEGACY_RUN`], and drops that table: run once, by the migration that made runs.
pub(super) fn convert_legacy_entries(conn: &Connection) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare("SELECT room_key, seq, message FROM room_index ORDER BY room_key, seq")
        .map_err(db_err)?;
    let mut rows = stmt.query([]).map_err(db_err)?;
    // The run being gathered: its room, first seq and rowids.
    let mut run: Option<(i64, u64, Vec<i64>)> = None;
    while let Some(row) = rows.next().map_err(db_err)? {
        let (key, seq, rowid): (i64, u64, i64) = (
            row.get(0).map_err(db_err)?,
            row.get(1).map_err(db_err)?,
            row.get(2).map_err(db_err)?,
        );
        if let Some((run_key, first, rowids)) = &mut run {
            let follows = *run_key == key && *first + rowids.len() as u64 == seq;
            if follows && rowids.len() < LEGACY_RUN {
                rowids.push(rowid);
                continue;
            }
            insert_run(conn, *run_key, *first, rowids)?;
        }
        run = Some((key, seq, vec![rowid]));
    }
    if let Some((key, first, rowids)) = run {
        insert_run(conn, key, first, &rowids)?;
    }
    drop(rows);
    drop(stmt);
    conn.execute_batch("DROP TABLE room_index").map_err(db_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database with the legacy `room_index` holding room 1's seqs 1 to 20 and room 2's 1
    /// to 3 (rowids that interleave, and one that steps back), moved into runs.
    fn converted() -> (Connection, Vec<(i64, u64, i64)>) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE room_index (room_key INTEGER NOT NULL, seq INTEGER NOT NULL,
                 message INTEGER NOT NULL, PRIMARY KEY (room_key, seq)) WITHOUT ROWID;",
        )
        .unwrap();
        conn.execute_batch(include_str!(
            "../../migrations/sqlite/0008_room_index_runs.sql"
        ))
        .unwrap();
        let mut entries: Vec<(i64, u64, i64)> =
            (1..=20).map(|seq| (1, seq, seq as i64 * 3)).collect();
        entries.extend([(2, 1, 2), (2, 2, 1_000_000), (2, 3, 5)]);
        for (key, seq, rowid) in &entries {
            conn.execute(
                "INSERT INTO room_index VALUES (?1, ?2, ?3)",
                rusqlite::params![key, seq, rowid],
            )
            .unwrap();
        }
        convert_legacy_entries(&conn).unwrap();
        (conn, entries)
    }

    #[test]
    fn legacy_entries_become_runs_of_at_most_a_flush() {
        let (conn, _) = converted();
        let runs: Vec<(i64, u64, u64)> = conn
            .prepare("SELECT room_key, first_seq, last_seq FROM room_index_runs")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(runs, [(1, 1, 8), (1, 9, 16), (1, 17, 20), (2, 1, 3)]);
        assert_eq!(indexed_last_seq(&conn, 1).unwrap(), 20);
        assert_eq!(indexed_last_seq(&conn, 3).unwrap(), 0);
        let legacy = conn.prepare("SELECT 1 FROM room_index");
        assert!(legacy.is_err(), "the legacy table is dropped");
    }

    /// Every range, either way, any limit: what a scan of the entries one by one would give.
    #[test]
    fn indexed_rowids_match_the_entries_one_by_one() {
        let (conn, entries) = converted();
        for key in [1, 2, 3] {
            for lower in 0..23u64 {
                for upper in (lower..24).chain([u64::MAX]) {
                    for wanted in [0, 1, 5, 9, usize::MAX] {
                        for newest_first in [false, true] {
                            let mut expected: Vec<(u64, i64)> = entries
                                .iter()
                                .filter(|&&(k, seq, _)| k == key && seq > lower && seq < upper)
                                .map(|&(_, seq, rowid)| (seq, rowid))
                                .collect();
                            if newest_first {
                                expected.reverse();
                            }
                            expected.truncate(wanted);
                            let found =
                                indexed_rowids(&conn, key, lower, upper, newest_first, wanted)
                                    .unwrap();
                            assert_eq!(found, expected, "{key} ({lower}, {upper}) {wanted}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_damaged_run_is_an_error_not_a_wrong_answer() {
        assert_eq!(
            decode_rowids(&encode_rowids(&[7, 3, i64::MAX, i64::MIN])).unwrap(),
            [7, 3, i64::MAX, i64::MIN]
        );
        assert!(decode_rowids(&[0x80]).is_err());
    }

    #[test]
    fn waiting_seqs_follow_the_indexed_ones() {
        let waiting = Waiting {
            indexed: 10,
            rowids: vec![100, 104, 109],
        };
        assert_eq!(waiting.last_seq(), 13);
        assert_eq!(waiting.rowid(10), None);
        assert_eq!(waiting.rowid(11), Some(100));
        assert_eq!(waiting.rowid(13), Some(109));
        assert_eq!(waiting.rowid(14), None);
        assert_eq!(waiting.first_rowid(), 100);
    }

    /// Rooms that start together are due at sizes spread over the whole range, and a room's
    /// due size changes from one flush to the next.
    #[test]
    fn due_sizes_vary_by_room_and_by_flush() {
        let (at, spread) = (256, 64);
        let firsts: Vec<usize> = (1..=750).map(|key| due_size(at, spread, key, 0)).collect();
        assert!(firsts.iter().all(|size| (192..=320).contains(size)));
        let distinct: std::collections::BTreeSet<_> = firsts.iter().collect();
        assert!(distinct.len() > 100, "{} distinct sizes", distinct.len());
        let below = firsts.iter().filter(|&&size| size < at).count();
        assert!((300..450).contains(&below), "{below} of 750 below {at}");
        // One room's successive flushes, each starting where the last ended.
        let mut indexed = 0;
        let sizes: Vec<usize> = (0..20)
            .map(|_| {
                let size = due_size(at, spread, 7, indexed);
                indexed += size as u64;
                size
            })
            .collect();
        let distinct: std::collections::BTreeSet<_> = sizes.iter().collect();
        assert!(distinct.len() > 10, "{sizes:?}");
        assert_eq!(
            due_size(at, spread, 7, 0),
            sizes[0],
            "the same for the same flush"
        );
        assert_eq!(due_size(8, 0, 7, 123), 8, "exact without a spread");
    }
}
