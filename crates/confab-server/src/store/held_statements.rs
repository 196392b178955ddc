//! The write connection, with the statements of every commit kept prepared on it.
//!
//! rusqlite's statement cache is made for statements run now and then: each use looks the
//! statement up by its SQL text (trimmed, hashed, compared, and copied as the key) and, when
//! it goes back, clears every parameter (64 for W2's eight messages a commit in one insert).
//! For a commit's `BEGIN`, `COMMIT` and multi-row inserts that was 744 instructions per
//! stored message. The writer keeps those statements instead: found by the address of their
//! `'static` text, run with their bindings left in place (every use binds every parameter
//! again), never cleared: 9.72K → 9.17K instructions per message of the store's own
//! (callgrind, BENCHMARKS.md, 2026-12-05, night).
//!
//! They borrow the connection they were prepared on, which the writer owns alongside them:
//! [`WriteConnection`] is that pair (`self_cell`), and drops the statements first.

use std::cell::RefCell;
use std::ops::Deref;

use rusqlite::{Connection, PrepFlags, Statement};

use super::StoreError;
use super::sqlite::db_err;

self_cell::self_cell!(
    /// The writer's connection and the statements [`HeldStatements`] keeps on it.
    pub(super) struct WriteConnection {
        owner: Connection,
        #[not_covariant]
        dependent: HeldStatements,
    }
);

// SAFETY: what makes the pair `!Send` is its statements' `&Connection` (a `Connection` is not
// `Sync`) and raw statement handles. They only ever point into the connection this same cell
// owns (on the heap, so it does not move with the cell), and they go wherever it goes: the
// connection and every statement prepared on it change threads together, which is what
// rusqlite's own `Send` for `Connection` already does with the statements in its cache (SQLite,
// built thread-safe, lets a connection and its statements be used from any one thread at a
// time). The cell is not `Sync`, so only the thread holding it (the writer's lock) uses them.
#[allow(unsafe_code)]
unsafe impl Send for WriteConnection {}

impl WriteConnection {
    /// Takes `conn` as the writer's, with no statement held yet.
    pub(super) fn hold(conn: Connection) -> WriteConnection {
        WriteConnection::new(conn, |_| HeldStatements::default())
    }

    /// The connection alone, for what does not run held statements (a rewind, the last
    /// checkpoint).
    pub(super) fn conn(&self) -> &Connection {
        self.borrow_owner()
    }

    /// Runs `f` with the connection and its held statements.
    pub(super) fn with<R>(&self, f: impl FnOnce(&WriterConn<'_, '_>) -> R) -> R {
        self.with_dependent(|conn, held| f(&WriterConn { conn, held }))
    }
}

/// Statements prepared on one connection, each found by its SQL text's address.
#[derive(Default)]
pub(super) struct HeldStatements<'conn> {
    /// A handful (the statements of a commit), so a scan beats hashing.
    statements: RefCell<Vec<(&'static str, Statement<'conn>)>>,
}

/// The write connection as a job sees it: a [`Connection`] (it dereferences to one), plus the
/// held statements of the commit's hot path.
pub(super) struct WriterConn<'held, 'conn> {
    conn: &'conn Connection,
    held: &'held HeldStatements<'conn>,
}

impl<'held, 'conn> WriterConn<'held, 'conn> {
    /// A connection with statements held only for the life of `held` (a throwaway database's,
    /// or a test's).
    pub(super) fn new(
        conn: &'conn Connection,
        held: &'held HeldStatements<'conn>,
    ) -> WriterConn<'held, 'conn> {
        WriterConn { conn, held }
    }

    /// Runs `f` with the statement of `sql`, prepared on first use and kept for the next.
    /// Its parameters keep what the last use bound: `f` must bind every one it runs with.
    /// A use inside another's `f` gets a statement of its own.
    pub(super) fn held<R>(
        &self,
        sql: &'static str,
        f: impl FnOnce(&mut Statement<'conn>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let found = {
            let mut statements = self.held.statements.borrow_mut();
            statements
                .iter()
                .position(|(held, _)| std::ptr::eq(*held, sql))
                .map(|at| statements.swap_remove(at).1)
        };
        let mut statement = match found {
            Some(statement) => statement,
            None => self
                .conn
                .prepare_with_flags(sql, PrepFlags::SQLITE_PREPARE_PERSISTENT)
                .map_err(db_err)?,
        };
        let result = f(&mut statement);
        self.held.statements.borrow_mut().push((sql, statement));
        result
    }

    /// Runs a parameterless held statement (`BEGIN`, `COMMIT`).
    pub(super) fn run_held(&self, sql: &'static str) -> Result<(), StoreError> {
        self.held(sql, |statement| {
            statement.raw_execute().map_err(db_err)?;
            Ok(())
        })
    }
}

impl Deref for WriterConn<'_, '_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> WriteConnection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (k TEXT NOT NULL, v INTEGER NOT NULL)")
            .unwrap();
        WriteConnection::hold(conn)
    }

    const INSERT: &str = "INSERT INTO t (k, v) VALUES (?1, ?2)";

    /// A held statement is prepared once and then reused, with nothing left bound from one
    /// use showing through the next (each binds all it runs with).
    #[test]
    fn a_held_statement_is_prepared_once_and_rebound_each_use() {
        let db = table();
        db.with(|db| {
            for (k, v) in [("a", 1), ("bb", 2), ("c", 3)] {
                db.held(INSERT, |statement| {
                    statement.raw_bind_parameter(1, k).map_err(db_err)?;
                    statement.raw_bind_parameter(2, v).map_err(db_err)?;
                    statement.raw_execute().map_err(db_err)?;
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(db.held.statements.borrow().len(), 1);
            let rows: Vec<(String, i64)> = db
                .prepare("SELECT k, v FROM t ORDER BY v")
                .unwrap()
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(rows, [("a".into(), 1), ("bb".into(), 2), ("c".into(), 3)]);
        });
    }

    /// Statements are told apart by their text's address: two texts, two statements, and a
    /// use nested in another's gets its own.
    #[test]
    fn statements_are_kept_apart_and_may_nest() {
        const COUNT: &str = "SELECT count(*) FROM t";
        let db = table();
        db.with(|db| {
            db.run_held("BEGIN").unwrap();
            let counted = db
                .held(INSERT, |statement| {
                    statement.raw_bind_parameter(1, "k").map_err(db_err)?;
                    statement.raw_bind_parameter(2, 7).map_err(db_err)?;
                    statement.raw_execute().map_err(db_err)?;
                    db.held(COUNT, |count| {
                        count
                            .query_row([], |row| row.get::<_, i64>(0))
                            .map_err(db_err)
                    })
                })
                .unwrap();
            assert_eq!(counted, 1);
            db.run_held("COMMIT").unwrap();
            assert_eq!(db.held.statements.borrow().len(), 4);
            assert!(db.is_autocommit());
        });
    }

    /// A statement that fails stays held and works again once its cause is gone.
    #[test]
    fn a_failed_use_leaves_the_statement_usable() {
        let db = table();
        db.with(|db| {
            db.run_held("BEGIN").unwrap();
            assert!(db.run_held("BEGIN").is_err(), "no nested transaction");
            db.run_held("COMMIT").unwrap();
            db.run_held("BEGIN").unwrap();
            db.run_held("COMMIT").unwrap();
        });
    }
}
