//! The SQLite store's retry keys: which `client_id`s each user has already stored, so that a
//! retry is answered with the original message instead of being stored twice.
//!
//! The keys are not an index of the messages table. There, a user's entries share a page of
//! the index, so every message dirtied a page of its own, and each checkpoint wrote as many
//! scattered pages as messages had come in: W2's WAL rewinds grew from 8 to 120 ms over a
//! minute (BENCHMARKS.md, 2026-12-02 afternoon). Instead a message's key waits in memory and
//! is written to the tables together with the same author's next ones: once the
//! author has [`MERGE_AT`] waiting, or once the oldest has fallen [`MERGE_BEHIND`] rows behind
//! the newest message. Several keys then share each page written (many, when `client_id`s
//! grow with time, as UUIDv7s do).
//!
//! Those that come above every key the author has written (keys that grow with time: the
//! usual case) are written as one row of `client_key_runs`, packed (`key_run.rs`); the others
//! (random keys, a client's out of order) as rows of their own in `client_keys`. One row per
//! key had SQLite descend the table, make a cell and now and then split a page for each key:
//! 2.3 % of W2's server CPU, with two thirds of its WAL frames (BENCHMARKS.md, 2026-12-05). An
//! author's runs never overlap (each starts above the last), so a key is looked up with one
//! seek in each table; a row of its own is the newer where both have a key.
//!
//! Looking a new key up costs a scan of the author's waiting keys and a statement, most of
//! the cost of storing a message; so each recent author's greatest key, waiting or written, is
//! kept in memory, and a key above it (a new UUIDv7, ULID or counter, the usual case) is known
//! to be new without either. A key at or below it is looked up as before.
//!
//! Nothing is lost in a crash: `low_marks.client_keys` is kept at or below the rowid of
//! every waiting key, in the same transactions, and at start the keys of the messages from
//! there on are read back. Every key found, in memory or in either table, is checked against
//! the message it names, so one left behind by a rolled-back insert or a deleted room is
//! ignored (and overwritten, or outranked by a row of its own, when its key is stored again).
//! A deleted room's keys are deleted from `client_keys`; in runs, which mix rooms, they stay
//! and are ignored that way.

use std::sync::LazyLock;

use foldhash::HashMap;
use rusqlite::{Connection, OptionalExtension};

use super::backlog::Backlog;
use super::chunked_insert::ChunkedInsert;
use super::held_statements::WriterConn;
use super::key_run;
use super::sqlite::db_err;
use super::{SCALED_FOR_TESTS, StoreError};

/// An author's waiting keys are written together once there are this many (32 in tests).
///
/// Keys that grow with time (UUIDv7s, counters) go to the end of the author's part of
/// `client_keys` whatever the batch; random ones (UUIDv4s) each land on some page of it, and
/// the larger the batch, the more of them share a page. W4 with random ids, 2 interleaved runs
/// each: 48.7k acked/s at 32, **71.7k** at 256, 79.4k at 1,024 (whose commits grew its ack
/// p99 to 93-97 ms, and whose waiting lists, scanned for each new key, got long); with
/// counter ids 117.0k at 32 and 121.9k at 256. Memory stays bounded by [`MERGE_BEHIND`].
const MERGE_AT: usize = if SCALED_FOR_TESTS { 32 } else { 256 };

/// An author's waiting keys are written, whatever their number, once the oldest is this many
/// messages behind the newest: this bounds the memory they take and the messages read at start.
const MERGE_BEHIND: i64 = if SCALED_FOR_TESTS { 50 } else { 100_000 };

/// Authors whose greatest stored key is remembered, at most; past it the memory is emptied and
/// refilled by the authors who send next (a statement each).
const CEILINGS_KEPT: usize = if SCALED_FOR_TESTS { 4 } else { 65_536 };

/// Writes an author's waiting keys; a key already there (left by a message since deleted)
/// takes the new message. `OR FAIL`, like the writer's other inserts (see the messages'
/// insert, `INSERT_MESSAGES` in `sqlite.rs`: no statement journal; a failure rolls the whole
/// transaction back), with an upsert for that one conflict, where it used to be `OR REPLACE`.
static INSERT_KEYS: LazyLock<ChunkedInsert> = LazyLock::new(|| {
    ChunkedInsert::new(
        "INSERT OR FAIL INTO client_keys (user_id, client_id, message)",
        3,
        "ON CONFLICT (user_id, client_id) DO UPDATE SET message = excluded.message",
    )
});

/// The keys not yet written. Owned by the writer thread (through the tail cache's
/// lock); after a failed commit it is emptied and read back from the database.
#[derive(Debug, Default)]
pub(super) struct RetryKeys {
    /// Whether this holds what the database says; false at first and after a failed commit.
    loaded: bool,
    /// What is kept of each author with keys waiting or a greatest key remembered: one entry,
    /// so that storing a message looks its author up once in memory that has gone cold since
    /// the author's last message (W2: every author sends once a second).
    authors: HashMap<String, Author>,
    /// Authors whose greatest key is remembered, for [`CEILINGS_KEPT`].
    ceilings_known: usize,
    /// Authors with waiting keys, and which are due to be written (those who reached
    /// [`MERGE_AT`], in an append or while loading, are written from the next append on), with
    /// `low_marks.client_keys` as stored.
    backlog: Backlog<String>,
}

/// One author's waiting keys and greatest key.
#[derive(Debug, Default)]
struct Author {
    /// `client_id` and the message's rowid of each waiting key, in insert order.
    waiting: Vec<(String, i64)>,
    /// Whether the author's greatest key is remembered, and what it is.
    ceiling: Ceiling,
}

/// A `client_id` at or above every key of an author's, waiting or written, and one at or
/// above every written key (which decides what a merge may write as a run).
#[derive(Debug, Default)]
enum Ceiling {
    /// Not remembered: to be read from the tables and the waiting keys when needed.
    #[default]
    Unknown,
    /// Both only ever grow, so they stay upper bounds when keys go with a deleted room
    /// (`None`: the author has no key). Compared as SQLite compares text (bytes), which is how
    /// `str` compares.
    Known {
        /// Above every key, waiting or written.
        all: Option<String>,
        /// Above every written key: kept so that a merge need not read it again.
        written: Option<String>,
    },
}

impl RetryKeys {
    /// Forgets everything, to be read back from the database before the next use (after a
    /// commit that failed: the waiting keys may name rows that were rolled back, and keys
    /// written in it are not there).
    pub(super) fn forget(&mut self) {
        *self = RetryKeys::default();
    }

    /// Reads the waiting keys back from the messages at or after the stored low mark, if they
    /// are not loaded.
    pub(super) fn load(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.loaded {
            return Ok(());
        }
        self.forget();
        let low = conn
            .query_row("SELECT client_keys FROM low_marks", [], |row| row.get(0))
            .map_err(db_err)?;
        self.backlog.set_stored_low(low);
        let mut stmt = conn
            .prepare(
                "SELECT rowid, user_id, client_id FROM messages
                 WHERE rowid >= ?1 AND client_id IS NOT NULL ORDER BY rowid",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map([low], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get(2)?))
            })
            .map_err(db_err)?;
        for row in rows {
            let (rowid, user, client_id): (i64, String, String) = row.map_err(db_err)?;
            self.add(&user, client_id, rowid);
        }
        self.loaded = true;
        Ok(())
    }

    /// The rowid of the message `user` stored with `client_id`, if any. It may name a row that
    /// no longer holds that message: check it (see [`RetryKeys`]).
    pub(super) fn find(
        &mut self,
        conn: &Connection,
        user: &str,
        client_id: &str,
    ) -> Result<Option<i64>, StoreError> {
        let author = self.author_with_ceiling(conn, user)?;
        if let Ceiling::Known { all: ceiling, .. } = &author.ceiling
            && ceiling.as_deref().is_none_or(|ceiling| client_id > ceiling)
        {
            return Ok(None);
        }
        let waiting = author
            .waiting
            .iter()
            .rev()
            .find(|(key, _)| key == client_id)
            .map(|&(_, rowid)| rowid);
        if waiting.is_some() {
            return Ok(waiting);
        }
        // A key in both tables is newer in `client_keys`: a run only ever takes keys above
        // all the author's others.
        let single: Option<i64> = conn
            .prepare_cached("SELECT message FROM client_keys WHERE user_id = ?1 AND client_id = ?2")
            .and_then(|mut stmt| {
                stmt.query_row([user, client_id], |row| row.get(0))
                    .optional()
            })
            .map_err(db_err)?;
        if single.is_some() {
            return Ok(single);
        }
        let run: Option<Vec<u8>> = conn
            .prepare_cached(
                "SELECT keys FROM client_key_runs WHERE user_id = ?1 AND last_key >= ?2
                 ORDER BY last_key LIMIT 1",
            )
            .and_then(|mut stmt| {
                stmt.query_row([user, client_id], |row| row.get(0))
                    .optional()
            })
            .map_err(db_err)?;
        Ok(run.and_then(|run| key_run::find(&run, client_id)))
    }

    /// The author's entry, with their greatest key remembered: read from the tables and
    /// the waiting keys (one statement) if it was not.
    fn author_with_ceiling(
        &mut self,
        conn: &Connection,
        user: &str,
    ) -> Result<&mut Author, StoreError> {
        let known = self
            .authors
            .get(user)
            .is_some_and(|author| matches!(author.ceiling, Ceiling::Known { .. }));
        if !known {
            if self.ceilings_known >= CEILINGS_KEPT {
                // Start over; authors with keys waiting stay, their ceilings forgotten.
                self.authors.retain(|_, author| {
                    author.ceiling = Ceiling::Unknown;
                    !author.waiting.is_empty()
                });
                self.ceilings_known = 0;
            }
            let written = greatest_written(conn, user)?;
            let author = author_mut(&mut self.authors, user);
            let waiting = author.waiting.iter().map(|(key, _)| key).max();
            author.ceiling = Ceiling::Known {
                all: written.clone().max(waiting.cloned()),
                written,
            };
            self.ceilings_known += 1;
        }
        Ok(author_mut(&mut self.authors, user))
    }

    /// Records the key of a message just inserted as `rowid`.
    pub(super) fn add(&mut self, user: &str, client_id: String, rowid: i64) {
        let author = author_mut(&mut self.authors, user);
        if let Ceiling::Known { all: ceiling, .. } = &mut author.ceiling
            && ceiling.as_ref().is_none_or(|ceiling| client_id > *ceiling)
        {
            // Into the old ceiling's buffer: keys of one author are mostly of one length.
            ceiling.get_or_insert_default().clone_from(&client_id);
        }
        let keys = &mut author.waiting;
        if keys.is_empty() {
            keys.push((client_id, rowid));
            self.backlog.started(rowid, user.to_owned());
            return;
        }
        // Rowids only grow, unless a deleted room took the newest messages: then the author's
        // oldest may be this one.
        if keys.last().is_some_and(|&(_, last)| rowid < last) {
            let first = first_rowid(keys);
            if rowid < first {
                self.backlog.moved_down(first, rowid, user.to_owned());
            }
        }
        keys.push((client_id, rowid));
        if keys.len() == MERGE_AT {
            self.backlog.filled(user.to_owned());
        }
    }

    /// At the end of an append of `stored` messages, in its transaction: writes the keys
    /// that are due (of authors with [`MERGE_AT`] waiting, then of those whose oldest
    /// fell [`MERGE_BEHIND`] behind `newest`, the append's last rowid), about twice as many as
    /// the append stored (see `Backlog::write_due`), and moves the low mark.
    pub(super) fn write_due(
        &mut self,
        conn: &WriterConn<'_, '_>,
        newest: Option<i64>,
        stored: usize,
    ) -> Result<(), StoreError> {
        let authors = &mut self.authors;
        let low = self
            .backlog
            .write_due(newest, MERGE_BEHIND, stored, |user| {
                let Some(author) = authors.get_mut(user) else {
                    return Ok(None);
                };
                let keys = std::mem::take(&mut author.waiting);
                // An author can be due twice (full and behind); the first write took them.
                if keys.is_empty() {
                    return Ok(None);
                }
                let first = first_rowid(&keys);
                let count = keys.len();
                match &mut author.ceiling {
                    Ceiling::Known { written, .. } => {
                        let greatest = write_keys(conn, user, keys, written.take())?;
                        *written = greatest;
                    }
                    Ceiling::Unknown => {
                        authors.remove(user);
                        let greatest = greatest_written(conn, user)?;
                        write_keys(conn, user, keys, greatest)?;
                    }
                }
                Ok(Some((first, count)))
            })?;
        if let Some(low) = low {
            conn.held("UPDATE low_marks SET client_keys = ?1", |stmt| {
                stmt.execute([low]).map_err(db_err)
            })?;
        }
        Ok(())
    }

    /// Keys waiting in memory, for tests.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.authors
            .values()
            .map(|author| author.waiting.len())
            .sum()
    }
}

/// Writes an author's waiting keys: those above `greatest` (at or above every key the author
/// has written) as one run, the others (random keys, or keys that went out of order) one row
/// each, as before runs. Returns the new `greatest`.
fn write_keys(
    conn: &WriterConn<'_, '_>,
    user: &str,
    mut keys: Vec<(String, i64)>,
    greatest: Option<String>,
) -> Result<Option<String>, StoreError> {
    // Stable, then reversed: of two entries for one key (the first naming a deleted
    // message), the later comes first and is the one `dedup_by` keeps.
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    keys.reverse();
    keys.dedup_by(|a, b| a.0 == b.0);
    keys.reverse();
    let mut above = match &greatest {
        Some(greatest) => keys.partition_point(|(key, _)| key <= greatest),
        None => 0,
    };
    if keys.len() - above < 2 {
        // A run of one would only be a row with more to it.
        above = keys.len();
    }
    let (below, run) = keys.split_at(above);
    INSERT_KEYS.run(conn, below.iter(), |(client_id, rowid), row| {
        row.value(user)?;
        row.value(client_id)?;
        row.value(rowid)
    })?;
    if let [.., (last, _)] = run {
        let packed = key_run::encode(run.iter().map(|(key, rowid)| (key.as_str(), *rowid)));
        conn.held(
            "INSERT OR FAIL INTO client_key_runs (user_id, last_key, keys) VALUES (?1, ?2, ?3)",
            |stmt| {
                stmt.execute(rusqlite::params![user, last, packed])
                    .map_err(db_err)
            },
        )?;
    }
    let written = keys.pop().map(|(key, _)| key);
    Ok(greatest.max(written))
}

/// The greatest key the author has in either table (`None`: none).
fn greatest_written(conn: &Connection, user: &str) -> Result<Option<String>, StoreError> {
    let (single, run): (Option<String>, Option<String>) = conn
        .prepare_cached(
            "SELECT (SELECT max(client_id) FROM client_keys WHERE user_id = ?1),
                    (SELECT max(last_key) FROM client_key_runs WHERE user_id = ?1)",
        )
        .and_then(|mut stmt| stmt.query_row([user], |row| Ok((row.get(0)?, row.get(1)?))))
        .map_err(db_err)?;
    Ok(single.max(run))
}

/// The author's entry, made if there is none.
fn author_mut<'a>(authors: &'a mut HashMap<String, Author>, user: &str) -> &'a mut Author {
    // Not `entry`: it would copy the name for every look-up of an author already here.
    if !authors.contains_key(user) {
        authors.insert(user.to_owned(), Author::default());
    }
    authors.get_mut(user).expect("just made")
}

/// The lowest rowid among an author's waiting keys: the author's place in the backlog.
fn first_rowid(keys: &[(String, i64)]) -> i64 {
    keys.iter()
        .map(|&(_, rowid)| rowid)
        .min()
        .unwrap_or(i64::MAX)
}
