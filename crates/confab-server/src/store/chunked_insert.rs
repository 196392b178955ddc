//! Writing many rows of one shape with a few statements instead of one per row.
//!
//! History index entries and retry keys go to their tables a room's or an author's worth at a
//! time (`room_index.rs`, `retry_keys.rs`): tens to hundreds of rows in one go; a commit's
//! messages up to 16 at a time (`sqlite.rs`). One `INSERT`
//! per row paid SQLite's per-statement work for each (opening the table's cursor, closing it,
//! resetting the statement): a quarter of the 5.0K instructions a row of three integers took
//! (callgrind, W2-shaped, 2026-12-05: 3.8K per index entry written this way).

use rusqlite::{Statement, ToSql};

use super::StoreError;
use super::held_statements::WriterConn;
use super::sqlite::db_err;

/// The row counts of the statements, largest first. Any number of rows is written with the
/// largest as often as it fits, then at most one of each smaller size, so a table needs only
/// these few statements in the writer's statement cache. Sixteen rows of three columns
/// stay well under SQLite's limit on parameters (32,766).
const SIZES: [usize; 5] = [16, 8, 4, 2, 1];

/// An `INSERT` of rows of one shape, in statements of [`SIZES`] rows.
#[derive(Debug)]
pub(super) struct ChunkedInsert {
    /// The statement's text for each of [`SIZES`].
    sql: [String; SIZES.len()],
}

impl ChunkedInsert {
    /// `head` is the statement up to `VALUES` (`INSERT ... INTO table (columns)`), `tail`
    /// what follows the rows (an upsert clause, or nothing).
    pub(super) fn new(head: &str, columns: usize, tail: &str) -> ChunkedInsert {
        let row = format!("({})", vec!["?"; columns].join(", "));
        ChunkedInsert {
            sql: SIZES.map(|rows| {
                format!(
                    "{head} VALUES {} {tail}",
                    vec![row.as_str(); rows].join(", ")
                )
            }),
        }
    }

    /// Writes every row of `rows`, in order (a later row that conflicts with an earlier one
    /// meets it as it would in statements of its own); `bind` gives a row's values, one
    /// [`RowBinder::value`] per column. The statements are the writer's held ones
    /// (`held_statements.rs`): these inserts run in most commits.
    pub(super) fn run<R>(
        &'static self,
        db: &WriterConn<'_, '_>,
        rows: impl ExactSizeIterator<Item = R>,
        mut bind: impl FnMut(R, &mut RowBinder<'_, '_>) -> rusqlite::Result<()>,
    ) -> Result<(), StoreError> {
        let mut rows = rows.peekable();
        let mut left = rows.len();
        for (size, sql) in SIZES.iter().zip(&self.sql) {
            if left < *size {
                continue;
            }
            let statements = left / size;
            db.held(sql, |statement| {
                for _ in 0..statements {
                    let mut binder = RowBinder {
                        statement: &mut *statement,
                        next: 1,
                    };
                    for row in rows.by_ref().take(*size) {
                        bind(row, &mut binder).map_err(db_err)?;
                    }
                    let bound = binder.next - 1;
                    debug_assert_eq!(bound, statement.parameter_count(), "one value per column");
                    statement.raw_execute().map_err(db_err)?;
                }
                Ok(())
            })?;
            left -= statements * size;
        }
        debug_assert!(rows.peek().is_none(), "the iterator's length was exact");
        Ok(())
    }
}

/// Binds a row's values to the next parameters of a [`ChunkedInsert`]'s statement.
pub(super) struct RowBinder<'a, 'conn> {
    statement: &'a mut Statement<'conn>,
    /// The next parameter's index (from 1).
    next: usize,
}

impl RowBinder<'_, '_> {
    /// Binds the next column's value.
    pub(super) fn value<T: ToSql>(&mut self, value: T) -> rusqlite::Result<()> {
        self.statement.raw_bind_parameter(self.next, value)?;
        self.next += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use rusqlite::Connection;

    use super::super::held_statements::WriteConnection;
    use super::*;

    static INSERT: LazyLock<ChunkedInsert> = LazyLock::new(|| {
        ChunkedInsert::new(
            "INSERT OR FAIL INTO t (k, n, v)",
            3,
            "ON CONFLICT (k, n) DO UPDATE SET v = excluded.v",
        )
    });

    fn table() -> WriteConnection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (k TEXT NOT NULL, n INTEGER NOT NULL, v INTEGER NOT NULL,
                 PRIMARY KEY (k, n)) WITHOUT ROWID",
        )
        .unwrap();
        WriteConnection::hold(conn)
    }

    fn rows(conn: &Connection) -> Vec<(String, i64, i64)> {
        conn.prepare("SELECT k, n, v FROM t ORDER BY k, n")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Every count is written whole, whatever mix of statement sizes it takes.
    #[test]
    fn writes_every_row_of_any_count() {
        for count in [0_u32, 1, 2, 3, 7, 15, 16, 17, 31, 33, 256, 259] {
            table().with(|db| {
                INSERT
                    .run(db, 0..count, |n, row| {
                        row.value("a")?;
                        row.value(n)?;
                        row.value(n * 10)
                    })
                    .unwrap();
                let expected: Vec<_> = (0..count)
                    .map(|n| ("a".to_owned(), i64::from(n), i64::from(n) * 10))
                    .collect();
                assert_eq!(rows(db), expected, "{count} rows");
            });
        }
    }

    /// The statements stay held from one call to the next, rebound each time: nothing of an
    /// earlier call's rows shows through.
    #[test]
    fn calls_one_after_another_write_their_own_rows() {
        table().with(|db| {
            let mut expected = Vec::new();
            let mut first = 0_u32;
            for count in [17_u32, 3, 16, 31] {
                let k = |n: u32| if n.is_multiple_of(2) { "a" } else { "bb" };
                INSERT
                    .run(db, first..first + count, |n, row| {
                        row.value(k(n))?;
                        row.value(n)?;
                        row.value(n * 10)
                    })
                    .unwrap();
                expected.extend(
                    (first..first + count)
                        .map(|n| (k(n).to_owned(), i64::from(n), i64::from(n) * 10)),
                );
                first += count;
            }
            expected.sort();
            assert_eq!(rows(db), expected);
        });
    }

    /// Rows meet earlier rows of the same call in order: the later of two for one key stays,
    /// within one statement and across two.
    #[test]
    fn a_later_row_for_a_key_wins() {
        table().with(|db| {
            let batch = [
                ("a", 1, 1),
                ("b", 1, 2),
                ("a", 1, 3),
                ("a", 2, 4),
                ("a", 1, 5),
            ];
            INSERT
                .run(db, batch.into_iter(), |(k, n, v), row| {
                    row.value(k)?;
                    row.value(n)?;
                    row.value(v)
                })
                .unwrap();
            assert_eq!(
                rows(db),
                vec![("a".into(), 1, 5), ("a".into(), 2, 4), ("b".into(), 1, 2)]
            );
        });
    }

    /// A row that breaks a constraint fails the call (the writer then rolls its transaction
    /// back), and the statement it failed in works for the next call.
    #[test]
    fn a_bad_row_fails_the_call() {
        table().with(|db| {
            let err = INSERT.run(db, 0..5_u32, |n, row| {
                row.value("a")?;
                row.value(n)?;
                row.value(if n == 3 { None } else { Some(n) })
            });
            assert!(matches!(err, Err(StoreError::Database(_))), "{err:?}");
            INSERT
                .run(db, 10..14_u32, |n, row| {
                    row.value("z")?;
                    row.value(n)?;
                    row.value(n)
                })
                .unwrap();
            assert_eq!(rows(db).iter().filter(|(k, ..)| k == "z").count(), 4);
        });
    }
}
