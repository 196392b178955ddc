//! The embedded store: SQLite in WAL mode.
//!
//! Writes go to one dedicated thread that owns the only write connection. It takes every job
//! that has queued up (up to [`MAX_JOBS_PER_COMMIT`]), runs each inside its own savepoint of one
//! transaction, commits once, and only then answers the callers. Under load many messages share
//! one fsync-free WAL commit; when idle a job commits alone with no added delay.
//!
//! Reads run on tokio's blocking pool against a small pool of read-only connections; WAL lets
//! them proceed while the writer commits.

use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use confab_proto::{ChatMessage, UserRef};
use foldhash::{HashMap, HashSet};
use rusqlite::config::DbConfig;
use rusqlite::wal::CheckpointMode;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::chunked_insert::ChunkedInsert;
use super::held_statements::{HeldStatements, WriteConnection, WriterConn};
use super::retry_keys::RetryKeys;
use super::room_index::{
    IndexWriter, RoomIndex, Waiting, convert_legacy_entries, indexed_last_seq, indexed_rowids,
};
use super::{
    Appended, HistoryPage, HistoryQuery, JoinSnapshot, NewMessage, RoomListing, RoomMember,
    RoomRecord, SCALED_FOR_TESTS, Store, StoreError, format_timestamp, now_ms,
};
use crate::config::SqliteSync;

/// Upper bound on jobs folded into one transaction, so one commit never grows without limit.
const MAX_JOBS_PER_COMMIT: usize = 256;

/// Largest append committed in place ([`SqliteStore::commit_in_place`]). The hand-over to the
/// writer thread costs the same whatever a commit holds, so it weighs on small commits; a
/// large one would hold the runtime's thread for milliseconds, during which its other tasks
/// (reads, joins, typing) could not run.
const IN_PLACE_MAX_MESSAGES: usize = 64;

/// The writer's page cache: SQLite's default size. A bigger cache costs every commit that
/// splits an index page: SQLite's `balance_nonroot` renumbers pages through the locking page's
/// number (page 262,145), which marks the cache as holding pages that far out, and the
/// commit's truncation to the database's size then walks the cache's whole hash table, a
/// cache miss per cached page (2.5 % of W2's server CPU at 32 MiB; 9-13 % of the writer
/// thread's time in W2 at a quarter and half of its load with 8 MiB). The cache also counts
/// in the process's memory: 8 MiB was 0.27 KiB per connection of W3's 19,000 (2.57 against
/// 2.30 KiB with 2 MiB). W2 and W4 are no slower with 2 MiB (BENCHMARKS.md, 2026-12-02):
/// since the writer remembers each room's tail (`TailCache`), a commit reads few pages, and
/// the OS caches the file anyway. It only grows as pages are used.
const WRITER_CACHE_KIB: u32 = 2 * 1024;

/// Statements the writer keeps prepared: every write the store does fits, so none is parsed
/// again after its first use (rusqlite's default of 16 did not hold them all).
const WRITER_STATEMENT_CACHE: usize = 64;

/// Page cache of each read connection, in KiB. Small on purpose: there are up to
/// [`READ_POOL_SIZE`] of them, each would otherwise grow to SQLite's default 2 MiB (most of
/// it a copy of pages the OS caches anyway), and that memory is counted per connection in
/// the idle-capacity benchmark. 128 KiB holds the upper levels of the member and history
/// indexes a join reads; 256 cost W3 about 0.03 KiB more per connection (BENCHMARKS.md,
/// 2026-12-02 midday).
const READER_CACHE_KIB: u32 = 128;

/// Read connections kept open for reuse.
const READ_POOL_SIZE: usize = 8;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_init.sql"),
    include_str!("../../migrations/sqlite/0002_messages_rowid.sql"),
    include_str!("../../migrations/sqlite/0003_room_keys.sql"),
    include_str!("../../migrations/sqlite/0004_member_names.sql"),
    include_str!("../../migrations/sqlite/0005_client_keys.sql"),
    include_str!("../../migrations/sqlite/0006_room_index.sql"),
    include_str!("../../migrations/sqlite/0007_client_key_runs.sql"),
    include_str!("../../migrations/sqlite/0008_room_index_runs.sql"),
];

/// The migration (counted from 1) after which the history index's entries are moved from
/// `room_index` into runs, which SQL alone cannot pack.
const ROOM_INDEX_RUNS_MIGRATION: usize = 8;

/// A unit of work for the writer thread. It runs inside a savepoint and returns whether it
/// succeeded (to release or roll back the savepoint) plus the function that answers the caller
/// once the commit outcome is known.
type WriteJob = Box<dyn FnOnce(&WriterConn<'_, '_>) -> (bool, Deliver) + Send>;

/// Answers a caller after the commit; receives the commit error if the commit failed.
type Deliver = Box<dyn FnOnce(Option<StoreError>) + Send>;

/// SQLite-backed [`Store`].
pub struct SqliteStore {
    /// Queue to the writer thread. `None` once closed, so late writers get `Closed`.
    writer: Mutex<Option<mpsc::Sender<WriteJob>>>,
    /// The write connection, for appends committed on the caller's thread (see
    /// [`SqliteStore::append`]). `None` once closed, and with `synchronous = FULL`, where a
    /// commit waits for an fsync that must not hold up the runtime.
    in_place: Mutex<Option<Arc<Mutex<Writer>>>>,
    /// The writer thread, joined by [`SqliteStore::close`].
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    /// Commands for the checkpointer (`Stop` ends it), and its thread.
    checkpointer: Mutex<Option<(mpsc::Sender<Checkpoint>, JoinHandle<()>)>>,
    /// Idle read connections.
    readers: Arc<Mutex<Vec<Connection>>>,
    /// Bounds concurrent reads to the pool's size.
    read_slots: tokio::sync::Semaphore,
    /// Database file, for opening more read connections.
    path: PathBuf,
    /// Room tails the writer remembers between commits (only `append` uses it).
    tails: Arc<Mutex<TailCache>>,
    /// The history index entries waiting in memory, as readers see them.
    index: Arc<RoomIndex>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Opens a connection to the store's database through SQLite's `unix-excl` VFS.
///
/// The server is the database's only user, so the process takes one exclusive lock on the
/// file when it first opens it and keeps it until its last connection closes. SQLite then
/// coordinates its own connections (writer, checkpointer, readers) in memory, and the WAL's
/// index lives in the heap instead of a shared `-shm` file: a transaction no longer makes
/// the six `fcntl` locking calls it made on that file, each about a microsecond (W2 at half
/// load: 5-7 % less CPU per delivery, W5 14 % faster; BENCHMARKS.md, 2026-12-04). A second
/// server, or any other process, opening the same database is refused
/// ([`StoreError::InUse`]) instead of racing this one's in-memory state. Read-only
/// connections would bypass this and take the system's locks themselves (`unixFileLock`), so
/// readers open read-write with `query_only`.
fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    Connection::open_with_flags_and_vfs(path, flags, c"unix-excl").map_err(db_err)
}

pub(super) fn db_err(err: rusqlite::Error) -> StoreError {
    StoreError::Database(err.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/confab.db`, applies migrations and starts the writer.
    /// The process holds the database for itself until the store is closed: another
    /// process opening it meanwhile gets [`StoreError::InUse`].
    pub fn open(dir: &Path, sync: SqliteSync) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(dir, sync, WAL_RESTART_FRAMES)
    }

    /// [`SqliteStore::open`] with the WAL rewound from `wal_restart_frames` frames on.
    fn open_with(
        dir: &Path,
        sync: SqliteSync,
        wal_restart_frames: u32,
    ) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|err| {
            StoreError::Database(format!("cannot create {}: {err}", dir.display()))
        })?;
        let path = dir.join("confab.db");
        let mut conn = open_connection(&path, OpenFlags::default())?;
        let synchronous = match sync {
            SqliteSync::Normal => "NORMAL",
            SqliteSync::Full => "FULL",
        };
        // The first statement takes the process's lock on the file (`open_connection`).
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = {synchronous};
             PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 5000;
             PRAGMA temp_store = MEMORY;
             PRAGMA wal_autocheckpoint = 0;
             PRAGMA cache_size = -{WRITER_CACHE_KIB};"
        ))
        .map_err(|err| match err.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy) => {
                StoreError::InUse(path.display().to_string())
            }
            _ => db_err(err),
        })?;
        keep_plans(&conn)?;
        conn.set_prepared_statement_cache_capacity(WRITER_STATEMENT_CACHE);
        migrate(&mut conn)?;
        let wal = Arc::new(WalState::default());
        let state = Arc::clone(&wal);
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames: c_int| {
            let frames = u32::try_from(frames).unwrap_or(0);
            state.frames.store(frames, Ordering::Relaxed);
            Ok(())
        }))
        .map_err(db_err)?;

        // Checkpoints run on their own thread: done by the writer (SQLite's default), each one
        // stalled every commit behind it for the copy and its fsync.
        let checkpoint_conn = open_connection(&path, OpenFlags::default())?;
        // The read opens the connection's WAL: checkpoints through the C API do nothing on a
        // connection that has not read the database yet.
        checkpoint_conn
            .execute_batch("PRAGMA busy_timeout = 5000; SELECT count(*) FROM sqlite_schema;")
            .map_err(db_err)?;
        let (checkpoints, commands) = mpsc::channel::<Checkpoint>();
        let state = Arc::clone(&wal);

        // The history index entries left waiting by the last run, for the writer and readers.
        let tails = Arc::new(Mutex::new(TailCache::default()));
        let index = Arc::new(RoomIndex::default());
        {
            let mut cache = lock_tails(&tails);
            cache.index.load(&conn)?;
            cache.index.publish(&conn, true, &mut index.lock());
        }

        let (sender, receiver) = mpsc::channel::<WriteJob>();
        let writer = Arc::new(Mutex::new(Writer {
            conn: WriteConnection::hold(conn),
            tails: Arc::clone(&tails),
            index: Arc::clone(&index),
            restarts: WalRestarts {
                wal,
                checkpointer: checkpoints.clone(),
                restart_frames: wal_restart_frames,
                requested: false,
                handed_over: false,
            },
            batch: Vec::with_capacity(MAX_JOBS_PER_COMMIT),
            deliveries: Vec::with_capacity(MAX_JOBS_PER_COMMIT),
        }));
        let in_place = matches!(sync, SqliteSync::Normal).then(|| Arc::clone(&writer));
        let rewinder = Arc::downgrade(&writer);
        // The checkpointer keeps the default scheduling policy. At `SCHED_IDLE` a core the
        // runtime fills (W4) starved it in the middle of a pass, holding the checkpoint lock
        // that the writer's own rewind needs: the WAL grew to 5.5 GB in 60 s (BENCHMARKS.md,
        // 2026-12-04, Xeon).
        let checkpoint_thread = std::thread::Builder::new()
            .name("confab-sqlite-checkpoint".into())
            .spawn(move || {
                run_checkpointer(
                    checkpoint_conn,
                    commands,
                    &state,
                    &rewinder,
                    wal_restart_frames / 4,
                )
            })
            .map_err(|err| StoreError::Database(format!("cannot start checkpointer: {err}")))?;
        let writer_thread = std::thread::Builder::new()
            .name("confab-sqlite-writer".into())
            .spawn(move || {
                wake_without_preempting();
                run_writer(&writer, receiver)
            })
            .map_err(|err| StoreError::Database(format!("cannot start writer thread: {err}")))?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(sender)),
            in_place: Mutex::new(in_place),
            writer_thread: Mutex::new(Some(writer_thread)),
            checkpointer: Mutex::new(Some((checkpoints, checkpoint_thread))),
            readers: Arc::new(Mutex::new(Vec::new())),
            read_slots: tokio::sync::Semaphore::new(READ_POOL_SIZE),
            path,
            tails,
            index,
        })
    }

    /// Finishes every queued write, then stops the writer thread. Later writes fail `Closed`.
    pub fn close(&self) {
        // The checkpointer first, so the writer's final checkpoint has the WAL to itself.
        if let Some((commands, thread)) =
            self.checkpointer.lock().expect("checkpointer lock").take()
        {
            let _ = commands.send(Checkpoint::Stop);
            let _ = thread.join();
        }
        drop(self.in_place.lock().expect("in-place writer lock").take());
        drop(self.writer.lock().expect("writer lock").take());
        if let Some(thread) = self.writer_thread.lock().expect("thread lock").take() {
            let _ = thread.join();
        }
    }

    /// Runs `job` on the writer thread inside the next group commit and waits for the commit.
    async fn write<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_and_settle(move |db: &WriterConn<'_, '_>| job(db), |_| {}, false)
            .await
    }

    /// [`SqliteStore::write`], also telling `settle`, on the writing thread, whether the job's
    /// writes were committed. With `in_place`, the job is committed on the calling thread if
    /// the write connection is free at that moment, else queued as usual.
    async fn write_and_settle<T, F, S>(
        &self,
        job: F,
        settle: S,
        in_place: bool,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriterConn<'_, '_>) -> Result<T, StoreError> + Send + 'static,
        S: FnOnce(bool) + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: WriteJob = Box::new(move |conn| {
            let result = job(conn);
            let ok = result.is_ok();
            let deliver: Deliver = Box::new(move |commit_error| {
                settle(ok && commit_error.is_none());
                let _ = reply.send(match commit_error {
                    Some(err) => Err(err),
                    None => result,
                });
            });
            (ok, deliver)
        });
        if let Err(job) = self.commit_in_place(job, in_place) {
            let writer = self.writer.lock().expect("writer lock");
            let sender = writer.as_ref().ok_or(StoreError::Closed)?;
            sender.send(job).map_err(|_| StoreError::Closed)?;
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Commits `job` alone, here and now, if asked to and the write connection is free (not
    /// closed, not in the writer thread's hands); gives it back otherwise.
    ///
    /// Handing a commit to the writer thread and back costs two thread switches and their
    /// wake-ups (a futex wake, an eventfd write, an extra poll): at W2's half load on one
    /// core, 14,700 context switches in 5 s against 3,900 in place (the CPU saved, up to
    /// 6 %, is within that host's noise). The committer's appends are already batched, so
    /// they lose nothing by not waiting in the writer's queue. Never blocks: a busy connection means the writer thread
    /// is committing, or the writer or checkpointer thread is rewinding the WAL (two fsyncs),
    /// and the job queues behind that. Neither a rewind nor the first commit into a WAL that
    /// starts over (see [`WalRestarts::starts_over`]) is made here.
    fn commit_in_place(&self, job: WriteJob, in_place: bool) -> Result<(), WriteJob> {
        if !in_place {
            return Err(job);
        }
        let Some(writer) = self.in_place.lock().expect("in-place writer lock").clone() else {
            return Err(job);
        };
        let Ok(mut writer) = writer.try_lock() else {
            return Err(job);
        };
        if writer.restarts.starts_over() {
            return Err(job);
        }
        writer.batch.push(job);
        if writer.commit(false) {
            // The WAL is due for a rewind: an empty job has the writer thread do it.
            if let Some(sender) = self.writer.lock().expect("writer lock").as_ref() {
                let _ = sender.send(Box::new(|_| (true, Box::new(|_| {}))));
            }
        }
        Ok(())
    }

    /// Runs `job` with a read connection on the blocking pool.
    async fn read<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        // At most READ_POOL_SIZE reads at once: a reconnect storm queues here instead of
        // spawning hundreds of blocking threads that each open a fresh connection.
        let _permit = self
            .read_slots
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let readers = Arc::clone(&self.readers);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            reading_thread();
            let pooled = readers.lock().expect("reader pool lock").pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => {
                    // Read-write but `query_only`: a read-only file would take the
                    // system's locks itself (see `open_connection`).
                    let conn = open_connection(
                        &path,
                        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )?;
                    conn.busy_timeout(std::time::Duration::from_secs(5))
                        .map_err(db_err)?;
                    conn.execute_batch(&format!(
                        "PRAGMA query_only = ON; PRAGMA cache_size = -{READER_CACHE_KIB};"
                    ))
                    .map_err(db_err)?;
                    keep_plans(&conn)?;
                    rusqlite::vtab::array::load_module(&conn).map_err(db_err)?;
                    conn
                }
            };
            let result = job(&conn);
            let mut pool = readers.lock().expect("reader pool lock");
            if pool.len() < READ_POOL_SIZE {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|err| StoreError::Database(format!("reader task failed: {err}")))?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(db_err)?;
    if version >= MIGRATIONS.len() {
        return Ok(());
    }
    // SQLite's procedure for rebuilding a table: foreign keys off (a dropped parent table
    // would otherwise cascade into its children; the pragma is ignored inside a
    // transaction), then a check of every reference before each commit.
    conn.execute_batch("PRAGMA foreign_keys = OFF")
        .map_err(db_err)?;
    let result = apply_migrations(conn, version);
    conn.execute_batch("PRAGMA foreign_keys = ON")
        .map_err(db_err)?;
    result
}

fn apply_migrations(conn: &mut Connection, version: usize) -> Result<(), StoreError> {
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction().map_err(db_err)?;
        tx.execute_batch(sql).map_err(db_err)?;
        if index + 1 == ROOM_INDEX_RUNS_MIGRATION {
            convert_legacy_entries(&tx)?;
        }
        let broken: Option<String> = tx
            .query_row("PRAGMA foreign_key_check", [], |row| row.get(0))
            .optional()
            .map_err(db_err)?;
        if let Some(table) = broken {
            return Err(StoreError::Database(format!(
                "migration {} left rows in {table} pointing nowhere",
                index + 1
            )));
        }
        tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        tracing::info!(migration = index + 1, "applied SQLite migration");
    }
    Ok(())
}

/// How often the checkpointer looks at the WAL's size, and copies its committed frames back
/// into the database file if it has reached a quarter of [`WAL_RESTART_FRAMES`].
///
/// Not at any size: a pass that copies everything lets the next commit start the WAL over,
/// and SQLite syncs a new WAL header in that commit (whatever `synchronous` is, but `off`), so
/// a pass every 250 ms had the writer wait for an fsync (0.3 to 9 ms here) about three times
/// a second under W1's steady stream. SQLite's own autocheckpoint works by size, too.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL size, in frames, from which the writer has the WAL start over from its beginning.
///
/// SQLite rewinds the WAL only if, when a write transaction begins, every frame in it has been
/// checkpointed. Under a steady stream of commits a checkpointer that merely runs now and then
/// never catches up with the writer: the WAL grew without bound (1.8 GB in a 12 s W4 run), and
/// every frame was appended past the end of the file, which the kernel zeroes before the copy
/// (a third of the server's CPU). Rewound at about this size (64 MiB), its pages are rewritten
/// in place.
const WAL_RESTART_FRAMES: u32 = 16 * 1024;

/// What the writer and the checkpointer thread share about the WAL.
#[derive(Debug, Default)]
struct WalState {
    /// Frames in the WAL after the writer's last commit (from the connection's WAL hook).
    frames: AtomicU32,
    /// Set by the checkpointer when it has finished the passes the writer asked for but could
    /// not rewind the WAL itself (readers in the way): the writer then does.
    pass_done: AtomicBool,
    /// Rewound WALs whose pages the checkpointer has asked the kernel to read back in (see
    /// [`prefetch_wal`]).
    prefetched: AtomicU32,
    /// Rewinds the checkpointer made itself, between two of the writer's commits (see
    /// [`rewind_between_commits`]); the rest were the writer's.
    rewound_between_commits: AtomicU32,
}

/// Commands for the checkpointer thread.
#[derive(Debug)]
enum Checkpoint {
    /// The writer wants the WAL rewound: copy what is there now.
    Now,
    /// The writer has rewound the WAL and overwrites it from the start next: bring its pages
    /// back into the page cache ahead of it ([`prefetch_wal`]).
    Prefetch,
    /// The store is closing.
    Stop,
}

/// The writer's side of rewinding the WAL. The checkpointer copies the bulk of the WAL while
/// the writer goes on committing; then it takes the write connection between two commits,
/// copies the little committed meanwhile and rewinds the WAL ([`rewind_between_commits`]).
/// Only if it cannot (readers in the way), or falls too far behind, does the writer thread do
/// that itself. Done by the writer alone, the whole copy and its fsync (40 to 75 ms at W4's
/// rate) stalled every commit behind it.
struct WalRestarts {
    wal: Arc<WalState>,
    checkpointer: mpsc::Sender<Checkpoint>,
    /// [`WAL_RESTART_FRAMES`] outside tests.
    restart_frames: u32,
    /// A pass was asked for and has not been followed up yet.
    requested: bool,
    /// A commit made in place left the rewind to the writer thread, which has not tried it
    /// yet: later commits in place need not ask again.
    handed_over: bool,
}

impl WalRestarts {
    /// Whether the next commit starts the WAL over: after a rewind (or at open), the first
    /// commit writes a new WAL header and SQLite fsyncs it before the frames (whatever
    /// `synchronous` is, but `off`). That fsync must not hold up the runtime (every session,
    /// not only the messages waiting for the commit), so such a commit is left to the writer
    /// thread: on these hosts a flush takes from under a millisecond to over half a second
    /// when the disk is shared with other guests.
    fn starts_over(&self) -> bool {
        self.wal.frames.load(Ordering::Relaxed) == 0
    }

    /// Called after each commit. A commit made in place (`may_rewind` false) does not rewind
    /// (its fsyncs would hold up the runtime): it returns true when the writer thread should
    /// be asked to, once.
    fn after_commit(&mut self, conn: &Connection, may_rewind: bool) -> bool {
        let frames = self.wal.frames.load(Ordering::Relaxed);
        if frames < self.restart_frames {
            return false;
        }
        if !self.requested {
            self.requested = true;
            if self.checkpointer.send(Checkpoint::Now).is_ok() {
                return false;
            }
            // The checkpointer is gone (the store is closing): do it all here.
        } else if !self.wal.pass_done.load(Ordering::Acquire)
            && frames < self.restart_frames.saturating_mul(2)
        {
            // Still copying. Past twice the size the writer stops waiting for it, so the WAL
            // stays bounded however late the checkpointer thread gets to run.
            return false;
        }
        if !may_rewind {
            return !std::mem::replace(&mut self.handed_over, true);
        }
        self.handed_over = false;
        self.wal.pass_done.store(false, Ordering::Release);
        // If the checkpointer is copying right now this fails at once; the request stands and
        // a later commit tries again (asking again would only queue more passes to collide
        // with).
        if rewind(conn) {
            self.rewound();
            let _ = self.checkpointer.send(Checkpoint::Prefetch);
        }
        false
    }

    /// Notes that the WAL was rewound (by the writer or the checkpointer): the next commit
    /// starts it over, and nothing is asked of anyone any more.
    fn rewound(&mut self) {
        self.requested = false;
        self.handed_over = false;
        self.wal.pass_done.store(false, Ordering::Release);
        self.wal.frames.store(0, Ordering::Relaxed);
    }
}

/// How long a rewind waits for a checkpoint or readers in its way before it gives up (the
/// writer tries again after a later commit).
const REWIND_WAIT: Duration = Duration::from_millis(10);

/// The writer's usual busy timeout (only a rewind ever waits for anything).
const WRITER_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A RESTART checkpoint on the writer's connection: it copies what the checkpointer has not yet
/// and rewinds the WAL itself. A PASSIVE one only makes the rewind possible at the next
/// `BEGIN`, which any checkpoint pass running at that moment prevents (it holds the read lock
/// a rewind needs), and the WAL went on growing. True if the WAL was rewound.
fn rewind(conn: &Connection) -> bool {
    if let Err(err) = conn.busy_timeout(REWIND_WAIT) {
        tracing::warn!(error = %err, "cannot set the busy timeout for a WAL rewind");
        return false;
    }
    let result = conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::RESTART);
    if let Err(err) = conn.busy_timeout(WRITER_BUSY_TIMEOUT) {
        tracing::warn!(error = %err, "cannot restore the writer's busy timeout");
    }
    match result {
        Ok(_) => true,
        Err(err) if err.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => false,
        Err(err) => {
            tracing::warn!(error = %err, "WAL checkpoint failed");
            false
        }
    }
}

/// A PASSIVE checkpoint, which never waits for the writer or readers. Returns how many of the
/// WAL's frames are now in the database file, if it ran.
fn checkpoint(conn: &Connection) -> Option<u32> {
    match conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
        Ok((_, copied)) => u32::try_from(copied).ok(),
        // Another checkpoint is running: nothing to do.
        Err(err) if err.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => None,
        Err(err) => {
            tracing::warn!(error = %err, "WAL checkpoint failed");
            None
        }
    }
}

/// Frames the checkpointer leaves for the rewind to copy: it passes over the WAL
/// again while more than this many were committed during its last pass.
///
/// The rewind stalls every commit for its copy and two fsyncs, and a pass takes long enough
/// (tens of milliseconds at W2's 10,000 messages a second, more as the database grows) that
/// the writer commits hundreds or thousands of frames meanwhile; the rewind used to copy all
/// of them. Each further pass copies only what came during the one before, so the remainder
/// shrinks quickly. W2 over 45 s: the rewinds' stalls 16-129 ms -> 3-90 ms, p99 112 -> 66 ms
/// (BENCHMARKS.md, 2026-12-02 afternoon).
const CATCH_UP_FRAMES: u32 = 64;

/// Passes per request at most, so a writer that commits faster than a pass copies cannot
/// keep the checkpointer from answering (the writer then copies the rest itself).
const CATCH_UP_PASSES: u32 = 8;

/// The checkpointer thread: PASSIVE checkpoints whenever the writer asks for them (repeated
/// until little is left to copy, see [`CATCH_UP_FRAMES`]) and then the WAL's rewind, between
/// two of the writer's commits ([`rewind_between_commits`]); and now and then once the WAL
/// holds `from_frames` frames, until the store closes. Its passes never block the writer or
/// readers.
fn run_checkpointer(
    conn: Connection,
    commands: mpsc::Receiver<Checkpoint>,
    wal: &WalState,
    writer: &Weak<Mutex<Writer>>,
    from_frames: u32,
) {
    let db_path = conn.path().map(PathBuf::from);
    let wal_path = conn.path().map(|db| PathBuf::from(format!("{db}-wal")));
    loop {
        let requested = match commands.recv_timeout(CHECKPOINT_EVERY) {
            Ok(Checkpoint::Now) => true,
            Ok(Checkpoint::Prefetch) => {
                if let Some(path) = &wal_path {
                    prefetch_wal(wal, path);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Ok(Checkpoint::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if !requested && wal.frames.load(Ordering::Relaxed) < from_frames {
            continue;
        }
        let mut copied = checkpoint(&conn);
        if requested {
            let mut passes = 1;
            while let Some(done) = copied
                && passes < CATCH_UP_PASSES
                && wal.frames.load(Ordering::Relaxed).saturating_sub(done) > CATCH_UP_FRAMES
            {
                copied = checkpoint(&conn);
                passes += 1;
            }
            // The rewind syncs both files while every commit waits: what they hold unsynced
            // is flushed here first, while commits go on, so little is left for it.
            for path in [&db_path, &wal_path].into_iter().flatten() {
                flush_file(path);
            }
            match rewind_between_commits(writer) {
                Rewind::Done => {
                    wal.rewound_between_commits.fetch_add(1, Ordering::Relaxed);
                    if let Some(path) = &wal_path {
                        prefetch_wal(wal, path);
                    }
                }
                Rewind::NotNeeded => {}
                Rewind::Failed => wal.pass_done.store(true, Ordering::Release),
            }
        }
    }
}

/// Has the kernel write a file's dirty pages to disk (`fsync` flushes the file, whichever
/// descriptor wrote them).
///
/// A checkpoint pass that leaves part of the WAL uncopied does not sync the database file, so
/// the rewind's sync of it used to flush everything every pass had copied since the last
/// rewind: up to 15 ms at 75 % of W2's load, while commits waited (BENCHMARKS.md, 2026-12-03,
/// last).
fn flush_file(path: &Path) {
    if let Err(err) = std::fs::File::open(path).and_then(|file| file.sync_all()) {
        tracing::debug!(error = %err, path = %path.display(), "cannot flush before a rewind");
    }
}

/// What [`rewind_between_commits`] did.
enum Rewind {
    /// The WAL starts over at the next commit.
    Done,
    /// The writer rewound the WAL meanwhile, or the store is closing.
    NotNeeded,
    /// Readers on older snapshots were in the way (or the checkpoint failed): the writer
    /// tries after a later commit.
    Failed,
}

/// Rewinds the WAL from the checkpointer's thread, with the write connection, right after the
/// checkpointer's last pass, so the rewind copies only what was committed during that pass.
///
/// Left to the writer, the rewind waited for a commit to notice the finished pass, then (for a
/// commit made in place) for the writer thread, which does not preempt the runtime, to be
/// scheduled: the runtime committed hundreds of frames meanwhile, all of which the rewind then
/// copied while every commit waited. At 75 % of W2's load a rewind copied about 190 pages,
/// 14 ms of the 28 ms it held commits up (traced; BENCHMARKS.md, 2026-12-03, last). Holding the
/// writer's lock keeps commits out meanwhile: commits in place find the connection busy and
/// queue for the writer thread, which commits them together once the rewind is done (that
/// commit, which starts the WAL over and syncs its header, is the writer thread's anyway).
fn rewind_between_commits(writer: &Weak<Mutex<Writer>>) -> Rewind {
    let Some(writer) = writer.upgrade() else {
        return Rewind::NotNeeded;
    };
    let Ok(mut writer) = writer.lock() else {
        return Rewind::NotNeeded;
    };
    let Writer { conn, restarts, .. } = &mut *writer;
    if !restarts.requested {
        return Rewind::NotNeeded;
    }
    if rewind(conn.conn()) {
        restarts.rewound();
        Rewind::Done
    } else {
        Rewind::Failed
    }
}

/// Asks the kernel to read a rewound WAL's pages back into the page cache, in the background.
///
/// The writer overwrites the WAL from its start after a rewind, and a frame (a 24-byte header
/// and a page) never covers its file pages whole: a write into a page the kernel no longer
/// caches first reads that page from disk, inside the commit, and a commit made in place holds
/// up the runtime meanwhile. Pages a few seconds old do get dropped: on a host whose kernel
/// pages out cold memory on its own (DAMON), W2 at full load had 176 such reads in 8 s, all on
/// the runtime's thread (`perf record -e block:block_rq_issue`). Counted in
/// `wal.prefetched`, whether or not the kernel took the advice.
fn prefetch_wal(wal: &WalState, path: &Path) {
    let advised = std::fs::File::open(path).and_then(|file| {
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::WillNeed).map_err(Into::into)
    });
    if let Err(err) = advised {
        tracing::debug!(error = %err, "cannot prefetch the rewound WAL");
    }
    wal.prefetched.fetch_add(1, Ordering::Relaxed);
}

/// Readers run on tokio's blocking pool: each of its threads is woken without preempting its
/// waker (as the writer is, see [`wake_without_preempting`]) from the first read it runs on.
/// A join reads twice, and on a core shared with the runtime each read used to interrupt it.
/// W3 (10,000 joins, 2 interleaved runs): 1,161 -> 1,375 handshakes/s, connect p99 400 -> 373
/// ms; W5: 10.96 -> 10.30 s to catch everyone up.
fn reading_thread() {
    thread_local! {
        static SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !SET.replace(true) {
        wake_without_preempting();
    }
}

/// Has the calling thread (the writer, a reader) woken without preempting the thread that
/// woke it: Linux's `SCHED_BATCH` policy; its share of the CPU and its nice value stay as
/// they were.
///
/// With a core to spare this changes nothing. On a core shared with the runtime, a woken
/// writer used to interrupt the runtime at once and commit the one message just handed over,
/// a commit and two thread switches per message; now it runs when the runtime reaches a
/// stopping point, and the next commit carries everything queued meanwhile. W2 (10,000
/// messages/s on one core): 23,700 -> 4,500 context switches/s together with the
/// committer's gathering (see `committer`).
fn wake_without_preempting() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `sched_setscheduler` only reads `param` during the call; pid 0 is this
        // thread, and SCHED_BATCH takes priority 0 and needs no privilege.
        #[allow(unsafe_code)]
        let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if result != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "an SQLite thread keeps the default scheduling policy"
            );
        }
    }
}

/// The write connection and what goes with it. Behind a mutex: the writer thread commits
/// queued jobs with it, and appends are committed with it on their caller's thread when it is
/// free ([`SqliteStore::commit_in_place`]).
struct Writer {
    /// The write connection, with the statements of every commit held prepared on it.
    conn: WriteConnection,
    /// What the writer remembers between commits, the history index's waiting entries among
    /// them: published to `index` by each commit that changes them.
    tails: Arc<Mutex<TailCache>>,
    index: Arc<RoomIndex>,
    restarts: WalRestarts,
    /// The jobs of the commit being made (kept for their capacity).
    batch: Vec<WriteJob>,
    /// Their answers, sent once the commit's outcome is known.
    deliveries: Vec<Deliver>,
}

impl Writer {
    /// Runs the jobs in `batch` in one transaction (each in its own savepoint when there are
    /// several), commits, answers every job and keeps the WAL bounded. Returns true when the
    /// WAL is due for a rewind that `may_rewind` did not allow here.
    fn commit(&mut self, may_rewind: bool) -> bool {
        let Writer {
            conn,
            tails,
            index,
            restarts,
            batch,
            deliveries,
        } = self;
        conn.with(|conn| {
            if let Err(err) = conn.run_held("BEGIN IMMEDIATE") {
                for job in batch.drain(..) {
                    // The job never ran; answer with the error without touching the database.
                    fail_unrun(job, err.clone());
                }
                return false;
            }
            let mut aborted: Option<StoreError> = None;
            // Each job in its own savepoint, so a failing one leaves the others in the
            // commit. A job alone needs none (the transaction is its savepoint): a savepoint
            // copies every page the job touches into the statement journal, and under load the
            // committer's one append job per commit is the usual case.
            let savepoints = batch.len() > 1;
            let mut failed_alone = false;
            for job in batch.drain(..) {
                if let Some(err) = &aborted {
                    fail_unrun(job, err.clone());
                    continue;
                }
                if savepoints {
                    let _ = conn.run_held("SAVEPOINT job");
                }
                let (ok, deliver) = job(conn);
                if savepoints {
                    if !ok {
                        let _ = conn.run_held("ROLLBACK TO job");
                    }
                    let _ = conn.run_held("RELEASE job");
                } else {
                    failed_alone = !ok;
                }
                deliveries.push(deliver);
                if conn.is_autocommit() {
                    // SQLite rolled the whole transaction back (disk full, I/O error): nothing
                    // of this batch is stored, and later jobs must not run outside a
                    // transaction.
                    aborted = Some(StoreError::Database(
                        "the transaction was rolled back by SQLite".into(),
                    ));
                }
            }
            // A commit that changes the history index's waiting entries holds off readers'
            // snapshots until they are published (see `room_index`).
            let news = lock_tails(tails).index.has_news();
            let mut published = news.then(|| index.lock());
            let commit_error = match aborted {
                Some(err) => Some(err),
                // The job's own error is its answer; nothing of it may be committed.
                None if failed_alone => {
                    let _ = conn.run_held("ROLLBACK");
                    None
                }
                None => conn.run_held("COMMIT").err(),
            };
            if commit_error.is_some() {
                let _ = conn.run_held("ROLLBACK");
            }
            if let Some(published) = &mut published {
                let committed = commit_error.is_none() && !failed_alone;
                lock_tails(tails).index.publish(conn, committed, published);
            }
            drop(published);
            for deliver in deliveries.drain(..) {
                deliver(commit_error.clone());
            }
            restarts.after_commit(conn, may_rewind)
        })
    }
}

/// The writer thread: group commit until every sender is gone.
fn run_writer(writer: &Mutex<Writer>, jobs: mpsc::Receiver<WriteJob>) {
    while let Ok(first) = jobs.recv() {
        let mut writer = writer.lock().expect("writer lock");
        writer.batch.push(first);
        while writer.batch.len() < MAX_JOBS_PER_COMMIT {
            match jobs.try_recv() {
                Ok(job) => writer.batch.push(job),
                Err(_) => break,
            }
        }
        writer.commit(true);
    }
    // Keep the WAL small for the next start.
    let writer = writer.lock().expect("writer lock");
    let _ = writer
        .conn
        .conn()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
}

/// Keeps a cached statement compiled whatever values are bound to it. By default SQLite
/// compiles a statement again whenever a parameter its planner looked at is bound to a new
/// value, and since 3.54 that includes every `LIMIT ?`: each history page and member list
/// (a join reads both) was parsed and planned again, about 110,000 instructions, several
/// times a join's other work. The query planner stability guarantee turns that off; our
/// queries' plans come from their indexes, never from a bound value.
fn keep_plans(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(db_err)?;
    Ok(())
}

/// Runs a parameterless statement through the statement cache (no re-parsing per call).
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute([])
}

/// Answers a job that could not run because its transaction is gone. The job is consumed only
/// to reach its reply channel: it runs against a throwaway in-memory database, so none of its
/// statements can touch the real one outside a transaction.
fn fail_unrun(job: WriteJob, err: StoreError) {
    let scratch = Connection::open_in_memory().expect("an in-memory SQLite database opens");
    let held = HeldStatements::default();
    let (_, deliver) = job(&WriterConn::new(&scratch, &held));
    deliver(Some(err));
}

fn room_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RoomRecord> {
    Ok(RoomRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        private: row.get(2)?,
        owner: row.get(3)?,
        dm: row.get(4)?,
    })
}

/// A room's columns, from `rooms r`.
const ROOM_COLUMNS: &str = "r.id, r.name, r.private, r.owner, r.dm";

/// A stored message. `last_author` is the author of the row read before it, shared when this
/// row's is the same: a history page is mostly a few authors' runs of messages, and a resume
/// storm reads a million rows (two strings and an `Arc` less to allocate per row).
fn message_from_row(
    row: &rusqlite::Row<'_>,
    last_author: &mut Option<Arc<UserRef>>,
) -> rusqlite::Result<ChatMessage> {
    let user_id = row.get_ref(3)?.as_str()?;
    let user_name = row.get_ref(4)?.as_str()?;
    let user = match last_author {
        Some(last) if last.id == user_id && last.name == user_name => Arc::clone(last),
        _ => last_author
            .insert(Arc::new(UserRef {
                id: user_id.to_owned(),
                name: user_name.to_owned(),
            }))
            .clone(),
    };
    Ok(ChatMessage {
        room: row.get(0)?,
        seq: row.get(1)?,
        id: row.get(2)?,
        user,
        content: row.get(5)?,
        client_id: row.get(6)?,
        timestamp: format_timestamp(row.get(7)?),
    })
}

/// A message's columns, from `messages m` joined with its room as `rooms r`.
const MESSAGE_COLUMNS: &str =
    "r.id, m.seq, m.id, m.user_id, m.user_name, m.content, m.client_id, m.created_at";

fn insert_room(
    conn: &Connection,
    room: &RoomRecord,
    members: &[String],
) -> Result<bool, StoreError> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO rooms (id, name, private, owner, dm, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                room.id,
                room.name,
                room.private,
                room.owner,
                room.dm,
                now_ms()
            ])
        })
        .map_err(db_err)?;
    for member in members {
        add_member_row(conn, &room.id, member)?;
    }
    Ok(inserted == 1)
}

fn add_member_row(conn: &Connection, room: &str, user_id: &str) -> Result<bool, StoreError> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO members (room_id, user_id, user_name, read_seq, joined_at)
             VALUES (?1, ?2, (SELECT name FROM users WHERE id = ?2), 0, ?3)
             ON CONFLICT (room_id, user_id) DO NOTHING",
        )
        .and_then(|mut stmt| stmt.execute(params![room, user_id, now_ms()]))
        .map_err(db_err)?;
    Ok(inserted == 1)
}

fn select_room(conn: &Connection, id: &str) -> Result<Option<RoomRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.id = ?1"
    ))
    .and_then(|mut stmt| stmt.query_row([id], room_from_row).optional())
    .map_err(db_err)
}

/// Rooms the tail cache holds at most; past that it starts over (4 in tests, so that they
/// start over too).
const TAIL_CACHE_ROOMS: usize = if SCALED_FOR_TESTS { 4 } else { 16_384 };

/// Members (over all rooms) the tail cache holds at most; past that it starts over (8 in
/// tests).
const TAIL_CACHE_MEMBERS: usize = if SCALED_FOR_TESTS { 8 } else { 262_144 };

/// What the writer knows about rooms between commits: each room's key and last seq and which
/// authors are members. With it a busy room's message costs its insert alone, not also a
/// room read and a membership read. It is trusted only while the
/// connection's change counter (`total_changes`, which counts every row any statement
/// inserts, updates or deletes) is where the last committed append left it: any other write
/// (a leave, a deleted room) may have changed what it knows, and empties it, except the
/// store's own joins and read receipts, which cannot (`TailCache::kept_through`). An append
/// updates it as it goes (a message's room is looked up once, in this map alone); if its
/// commit does not go through, the whole cache is emptied, so a rolled-back batch leaves
/// nothing behind.
#[derive(Debug, Default)]
struct TailCache {
    /// `total_changes` after the append the cache is up to date with.
    changes: u64,
    rooms: HashMap<String, CachedRoom>,
    /// Member entries in `rooms`, for the bound.
    members: usize,
    /// `total_changes` after the append waiting for its commit, which updated the cache.
    pending: Option<u64>,
    /// Retry keys not yet in `client_keys`. Unlike the rest, other writes leave them true
    /// (each is checked against its message when found); only a failed append empties them.
    retry: RetryKeys,
    /// History index entries not yet written as runs. Like the retry keys, true whatever
    /// else is written; a write that is rolled back has them read back.
    index: IndexWriter,
}

#[derive(Debug, Default)]
struct CachedRoom {
    /// The room's `rooms.key`, which its messages are filed under.
    key: i64,
    last_seq: u64,
    members: HashSet<String>,
}

impl TailCache {
    /// Whether the cache is still true of the database seen through `conn`; empties it if not.
    fn check(&mut self, conn: &Connection) {
        if self.changes != conn.total_changes() {
            self.forget();
        }
        self.pending = None;
    }

    /// Empties the cache (the pending append aside).
    fn forget(&mut self) {
        self.rooms.clear();
        self.members = 0;
    }

    /// After an append's commit: keeps what it learned if the commit went through, else
    /// forgets everything.
    fn settle(&mut self, committed: bool) {
        let pending = self.pending.take();
        if !committed {
            self.forget();
            self.retry.forget();
        } else if let Some(changes) = pending {
            self.changes = changes;
        }
    }

    /// Runs `write`, one of the store's own writes that cannot make anything the cache holds
    /// false (a join, a read receipt), and keeps the cache trusted across the rows it moved
    /// the change counter by. Without this such a write emptied it, and the next message of
    /// every room read its room and its author's membership again: a chat's read receipts,
    /// which come with its messages, kept it nearly empty.
    fn kept_through<T>(&mut self, conn: &Connection, write: impl FnOnce() -> T) -> T {
        let before = conn.total_changes();
        let written = write();
        let after = conn.total_changes();
        match &mut self.pending {
            Some(pending) if *pending == before => *pending = after,
            Some(_) => {}
            None if self.changes == before => self.changes = after,
            None => {}
        }
        written
    }

    /// The room's key and last seq if the cache knows `user` is a member of it: what a busy
    /// room's message needs, without reading anything.
    fn cached_member(&self, room: &str, user: &str) -> Option<(i64, u64)> {
        self.rooms
            .get(room)
            .filter(|cached| cached.members.contains(user))
            .map(|cached| (cached.key, cached.last_seq))
    }

    /// Where `user` stands in `room`, as the open transaction sees it: looked up in the cache,
    /// and what it lacks read from the database and remembered.
    fn standing(
        &mut self,
        conn: &Connection,
        room: &str,
        user: &str,
    ) -> Result<Standing, StoreError> {
        let (key, last_seq) = match self.rooms.get(room) {
            Some(cached) if cached.members.contains(user) => {
                return Ok(Standing::Member(cached.key, cached.last_seq));
            }
            Some(cached) => (cached.key, cached.last_seq),
            None => match select_room_tail(conn, &self.index, room)? {
                Some(tail) => tail,
                None => return Ok(Standing::NoRoom),
            },
        };
        let member = is_member(conn, room, user)?;
        self.remember(room, key, last_seq, member.then_some(user));
        Ok(if member {
            Standing::Member(key, last_seq)
        } else {
            Standing::NotMember
        })
    }

    /// Adds a room (and a member of it) to the cache, starting over when it is full.
    fn remember(&mut self, room: &str, key: i64, last_seq: u64, member: Option<&str>) {
        let cached = self.rooms.get(room);
        let new_room = cached.is_none() && self.rooms.len() >= TAIL_CACHE_ROOMS;
        let new_member = member.is_some_and(|member| {
            self.members >= TAIL_CACHE_MEMBERS
                && !cached.is_some_and(|c| c.members.contains(member))
        });
        if new_room || new_member {
            self.forget();
        }
        let cached = match self.rooms.get_mut(room) {
            Some(cached) => cached,
            None => self.rooms.entry(room.to_owned()).or_insert(CachedRoom {
                key,
                last_seq,
                members: HashSet::default(),
            }),
        };
        if let Some(member) = member
            && cached.members.insert(member.to_owned())
        {
            self.members += 1;
        }
    }

    /// Notes a message stored in a cached room as its last.
    fn advance(&mut self, room: &str, seq: u64) {
        if let Some(cached) = self.rooms.get_mut(room) {
            cached.last_seq = seq;
        }
    }
}

/// Whether an author may post in a room.
enum Standing {
    /// A member: the room's key and last seq.
    Member(i64, u64),
    /// The room exists and the author is not a member.
    NotMember,
    /// No such room.
    NoRoom,
}

fn lock_tails(tails: &Mutex<TailCache>) -> std::sync::MutexGuard<'_, TailCache> {
    // Only the writer thread takes this lock; a panic there is answered by `check` (the
    // counter no longer matches) or by the emptied cache of `settle`.
    tails
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Appends a batch inside the writer's transaction: a room's key and last seq, and that an
/// author is a member, are read once and kept in the tail cache (the last seq is the index's,
/// so there is nothing to write back), instead of three statements per message. Seqs are
/// handed out in batch order and only to rows that were inserted, so a failed or duplicate
/// message leaves no gap. The outer error means the batch
/// must be rolled back (some of its rows may be written).
fn append_batch(
    conn: &WriterConn<'_, '_>,
    batch: Vec<NewMessage>,
    tails: &Mutex<TailCache>,
) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
    let mut cache = lock_tails(tails);
    let appended = append_locked(conn, batch, &mut cache);
    if appended.is_err() {
        // Rolled back: what it added to the waiting index entries must go too.
        cache.index.forget();
    }
    appended
}

/// [`append_batch`] with the tail cache in hand.
fn append_locked(
    conn: &WriterConn<'_, '_>,
    batch: Vec<NewMessage>,
    cache: &mut TailCache,
) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
    cache.check(conn);
    cache.retry.load(conn)?;
    cache.index.load(conn)?;
    let mut results = Vec::with_capacity(batch.len());
    let mut unwritten = Unwritten {
        // Room for a statement's worth at once: growing it from empty was two reallocations
        // per commit.
        rows: Vec::with_capacity(UNWRITTEN_MAX.min(batch.len())),
        ..Unwritten::default()
    };
    for msg in batch {
        if unwritten.holds_key(&results, &msg) {
            // A retry of a message earlier in this batch (wherever it is sent): its key must
            // be known first.
            unwritten.write(conn, cache, &results)?;
        }
        let standing = match cache.cached_member(&msg.room, &msg.user.id) {
            Some((key, last_seq)) => Standing::Member(key, last_seq),
            None => {
                if !cache.rooms.contains_key(&msg.room) {
                    // The room's last seq is read from the history index, which needs the
                    // rows before this one filed in it.
                    unwritten.write(conn, cache, &results)?;
                }
                cache.standing(conn, &msg.room, &msg.user.id)?
            }
        };
        let Standing::Member(key, last_seq) = standing else {
            // A retry of a message stored before its author left (or the room went) is still
            // answered with the original.
            if let Some(original) = select_retried(conn, &mut cache.retry, &msg)? {
                results.push(Ok(original));
                continue;
            }
            results.push(Err(if matches!(standing, Standing::NoRoom) {
                StoreError::NotFound(format!("room {:?} does not exist", msg.room))
            } else {
                StoreError::NotMember(format!(
                    "not a member of room {:?}: join it first",
                    msg.room
                ))
            }));
            continue;
        };
        if let Some(original) = select_retried(conn, &mut cache.retry, &msg)? {
            results.push(Ok(original));
            continue;
        }
        let seq = last_seq + 1;
        cache.advance(&msg.room, seq);
        unwritten.rows.push(UnwrittenRow {
            result: results.len(),
            key,
            created_at: msg.timestamp_ms,
        });
        results.push(Ok(Appended {
            message: ChatMessage {
                id: msg.id,
                seq,
                room: msg.room,
                user: msg.user,
                content: msg.content,
                client_id: msg.client_id,
                timestamp: format_timestamp(msg.timestamp_ms),
            },
            duplicate: false,
        }));
        if unwritten.rows.len() == UNWRITTEN_MAX {
            unwritten.write(conn, cache, &results)?;
        }
    }
    unwritten.write(conn, cache, &results)?;
    cache
        .retry
        .write_due(conn, unwritten.newest, unwritten.stored)?;
    cache
        .index
        .write_due(conn, unwritten.newest, unwritten.stored)?;
    cache.pending = Some(conn.total_changes());
    Ok(results)
}

/// Messages inserted per statement at most, and so the most an append holds unwritten. A
/// retry's lookup in the rows held looks at this many at most.
const UNWRITTEN_MAX: usize = 16;

/// Inserts a batch's messages with a statement per [`UNWRITTEN_MAX`] of them rather than one
/// each: every statement costs SQLite's per-statement work (opening the table's cursor,
/// halting, resetting) on top of its rows. At W2's eight messages a commit that was about
/// 1.2K of the 23.6K instructions the store spent per message (callgrind, 2026-12-05).
/// `OR FAIL`: without it SQLite keeps a statement journal for a statement that may abort
/// half-way, copying every page the transaction already dirtied; a failure here rolls the
/// whole transaction back anyway.
static INSERT_MESSAGES: LazyLock<ChunkedInsert> = LazyLock::new(|| {
    ChunkedInsert::new(
        "INSERT OR FAIL INTO messages
             (room_key, seq, id, user_id, user_name, content, client_id, created_at)",
        8,
        "",
    )
});

/// An append's stored messages not yet inserted: each is numbered (its seq, its room's
/// last seq in the tail cache) as it is accepted, and inserted, given its rowid and filed in
/// the history index and the retry keys, a statement's worth at a time. Whatever would read
/// what they change (a room not in the tail cache, a retry of one of them) writes them first.
#[derive(Default)]
struct Unwritten {
    rows: Vec<UnwrittenRow>,
    /// The last rowid inserted, for the low marks of the groups written after the batch.
    newest: Option<i64>,
    /// How many messages the append inserted.
    stored: usize,
}

/// A message accepted and numbered, not yet inserted.
struct UnwrittenRow {
    /// Its place in the append's results, which hold the message.
    result: usize,
    /// Its room's key.
    key: i64,
    created_at: i64,
}

impl Unwritten {
    /// Whether `msg`'s `client_id`, from its author, is one of the rows held.
    fn holds_key(&self, results: &[Result<Appended, StoreError>], msg: &NewMessage) -> bool {
        let Some(client_id) = &msg.client_id else {
            return false;
        };
        self.rows.iter().any(|row| {
            let held = &stored(results, row).message;
            held.client_id.as_ref() == Some(client_id) && held.user.id == msg.user.id
        })
    }

    /// Inserts the rows held and files them in the history index and the retry keys.
    fn write(
        &mut self,
        conn: &WriterConn<'_, '_>,
        cache: &mut TailCache,
        results: &[Result<Appended, StoreError>],
    ) -> Result<(), StoreError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        INSERT_MESSAGES.run(conn, self.rows.iter(), |row, values| {
            let message = &stored(results, row).message;
            values.value(row.key)?;
            values.value(message.seq)?;
            values.value(&message.id)?;
            values.value(&message.user.id)?;
            values.value(&message.user.name)?;
            values.value(&message.content)?;
            values.value(&message.client_id)?;
            values.value(row.created_at)
        })?;
        // Rows inserted without a rowid are each given one more than the table's largest,
        // in order, so these are consecutive and end at the last one inserted. (SQLite picks
        // at random only once a rowid reaches `i64::MAX`: 9.2e18 messages.)
        let last = conn.last_insert_rowid();
        let count = i64::try_from(self.rows.len()).expect("at most UNWRITTEN_MAX rows");
        for (rowid, row) in (last - count + 1..).zip(self.rows.drain(..)) {
            let message = &stored(results, &row).message;
            cache.index.add(row.key, message.seq, rowid);
            if let Some(client_id) = &message.client_id {
                cache.retry.add(&message.user.id, client_id.clone(), rowid);
            }
        }
        self.newest = Some(last);
        self.stored += usize::try_from(count).expect("a small count");
        Ok(())
    }
}

/// The message a held row stands for.
fn stored<'a>(results: &'a [Result<Appended, StoreError>], row: &UnwrittenRow) -> &'a Appended {
    results[row.result]
        .as_ref()
        .expect("a held row's result is its stored message")
}

/// A room's key and last seq, as the writer sees them; `None` if it does not exist.
fn select_room_tail(
    conn: &Connection,
    index: &IndexWriter,
    room: &str,
) -> Result<Option<(i64, u64)>, StoreError> {
    let Some(key) = select_room_key(conn, room)? else {
        return Ok(None);
    };
    Ok(Some((key, index.last_seq(conn, key)?)))
}

/// The key a room's history is filed under; `None` if it does not exist.
pub(super) fn select_room_key(conn: &Connection, room: &str) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached("SELECT key FROM rooms WHERE id = ?1")
        .and_then(|mut stmt| stmt.query_row([room], |row| row.get(0)).optional())
        .map_err(db_err)
}

fn is_member(conn: &Connection, room: &str, user_id: &str) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM members WHERE room_id = ?1 AND user_id = ?2)")
        .and_then(|mut stmt| stmt.query_row([room, user_id], |row| row.get(0)))
        .map_err(db_err)
}

/// The stored message with the same author and `client_id`, marked duplicate. The key found
/// is checked against the row it names, which a deleted room may have emptied (or a later
/// message taken over).
fn select_retried(
    conn: &Connection,
    keys: &mut RetryKeys,
    msg: &NewMessage,
) -> Result<Option<Appended>, StoreError> {
    let Some(client_id) = &msg.client_id else {
        return Ok(None);
    };
    let Some(rowid) = keys.find(conn, &msg.user.id, client_id)? else {
        return Ok(None);
    };
    Ok(select_message(conn, rowid)?
        .filter(|message| {
            message.user.id == msg.user.id && message.client_id.as_deref() == Some(client_id)
        })
        .map(|message| Appended {
            message,
            duplicate: true,
        }))
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_account(&self, user: &UserRef, password_hash: &str) -> Result<(), StoreError> {
        let user = user.clone();
        let hash = password_hash.to_string();
        self.write(move |conn| {
            let taken: bool = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM users WHERE name = ?1 AND password_hash IS NOT NULL)",
                    [&user.name],
                    |row| row.get(0),
                )
                .map_err(db_err)?;
            if taken {
                return Err(StoreError::Conflict(format!(
                    "username {:?} is taken",
                    user.name
                )));
            }
            conn.execute(
                "INSERT INTO users (id, name, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![user.id, user.name, hash, now_ms()],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn ensure_user(&self, user: &UserRef) -> Result<(), StoreError> {
        let user = user.clone();
        self.write(move |conn| {
            let changed = conn.prepare_cached(
                "INSERT INTO users (id, name, password_hash, created_at) VALUES (?1, ?2, NULL, ?3)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name
                 WHERE users.password_hash IS NULL AND users.name <> excluded.name",
            )
            .and_then(|mut stmt| stmt.execute(params![user.id, user.name, now_ms()]))
            .map_err(db_err)?;
            if changed > 0 {
                // A new user (who may already be a member, added by id) or a new name: the
                // member lists' copy follows.
                conn.prepare_cached("UPDATE members SET user_name = ?2 WHERE user_id = ?1")
                    .and_then(|mut stmt| stmt.execute([&user.id, &user.name]))
                    .map_err(db_err)?;
            }
            Ok(())
        })
        .await
    }

    async fn account(&self, name: &str) -> Result<Option<(UserRef, String)>, StoreError> {
        let name = name.to_string();
        self.read(move |conn| {
            conn.query_row(
                "SELECT id, name, password_hash FROM users WHERE name = ?1 AND password_hash IS NOT NULL",
                [&name],
                |row| Ok((UserRef { id: row.get(0)?, name: row.get(1)? }, row.get(2)?)),
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn user_by_name(&self, name: &str) -> Result<Option<UserRef>, StoreError> {
        let name = name.to_string();
        self.read(move |conn| {
            conn.query_row(
                "SELECT id, name FROM users WHERE name = ?1
                 ORDER BY password_hash IS NULL, created_at LIMIT 1",
                [&name],
                |row| {
                    Ok(UserRef {
                        id: row.get(0)?,
                        name: row.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn create_room(&self, room: &RoomRecord, members: &[String]) -> Result<(), StoreError> {
        let room = room.clone();
        let members = members.to_vec();
        self.write(move |conn| {
            if insert_room(conn, &room, &members)? {
                Ok(())
            } else {
                Err(StoreError::Conflict(format!(
                    "room {:?} already exists",
                    room.id
                )))
            }
        })
        .await
    }

    async fn open_dm_room(
        &self,
        room: &RoomRecord,
        a: &str,
        b: &str,
    ) -> Result<RoomRecord, StoreError> {
        let room = room.clone();
        let mut users = [a.to_string(), b.to_string()];
        users.sort();
        let pair = serde_json::to_string(&users).expect("strings serialize");
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO rooms (id, name, private, owner, dm, dm_users, created_at)
                 VALUES (?1, ?2, 1, NULL, 1, ?3, ?4) ON CONFLICT (id) DO NOTHING",
            )
            .and_then(|mut stmt| stmt.execute(params![room.id, room.name, pair, now_ms()]))
            .map_err(db_err)?;
            let stored: Option<String> = conn
                .query_row(
                    "SELECT dm_users FROM rooms WHERE id = ?1",
                    [&room.id],
                    |row| row.get(0),
                )
                .map_err(db_err)?;
            if stored.as_deref() != Some(pair.as_str()) {
                return Err(StoreError::Conflict(format!(
                    "room {:?} belongs to other users",
                    room.id
                )));
            }
            for user in &users {
                add_member_row(conn, &room.id, user)?;
            }
            select_room(conn, &room.id)?
                .ok_or_else(|| StoreError::NotFound(format!("room {:?} does not exist", room.id)))
        })
        .await
    }

    async fn room(&self, id: &str) -> Result<Option<RoomRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |conn| select_room(conn, &id)).await
    }

    async fn rooms_for(&self, user_id: &str) -> Result<Vec<RoomListing>, StoreError> {
        let user_id = user_id.to_string();
        let index = Arc::clone(&self.index);
        self.read(move |conn| {
            in_read_transaction(conn, |conn| {
                let waiting = index.last_seqs(conn)?;
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "SELECT {ROOM_COLUMNS}, mb.read_seq, r.key,
                             (SELECT coalesce(max(i.last_seq), 0) FROM room_index_runs i
                              WHERE i.room_key = r.key)
                         FROM rooms r
                         LEFT JOIN members mb ON mb.room_id = r.id AND mb.user_id = ?1
                         WHERE r.private = 0 OR mb.user_id IS NOT NULL
                         ORDER BY r.dm, r.id"
                    ))
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map([&user_id], |row| {
                        let key: i64 = row.get(6)?;
                        Ok(RoomListing {
                            room: room_from_row(row)?,
                            read_seq: row.get(5)?,
                            last_seq: match waiting.get(&key) {
                                Some(&last_seq) => last_seq,
                                None => row.get(7)?,
                            },
                        })
                    })
                    .map_err(db_err)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
            })
        })
        .await
    }

    async fn delete_room(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        let tails = Arc::clone(&self.tails);
        self.write(move |conn| {
            let Some(key) = select_room_key(conn, &id)? else {
                return Err(StoreError::NotFound(format!("room {id:?} does not exist")));
            };
            let mut cache = lock_tails(&tails);
            let deleted = cache.index.delete_room(conn, key).and_then(|()| {
                conn.execute("DELETE FROM rooms WHERE key = ?1", [key])
                    .map_err(db_err)
            });
            if deleted.is_err() {
                // Rolled back: the waiting entries it took must come back.
                cache.index.forget();
            }
            deleted.map(drop)
        })
        .await
    }

    async fn add_member(&self, room: &str, user_id: &str) -> Result<bool, StoreError> {
        let room = room.to_string();
        let user_id = user_id.to_string();
        let tails = Arc::clone(&self.tails);
        self.write(move |conn| {
            // A new member is nothing the cache holds (it learns of them at their first message).
            lock_tails(&tails).kept_through(conn, || add_member_row(conn, &room, &user_id))
        })
        .await
    }

    async fn membership(&self, room: &str, user_id: &str) -> Result<Option<u64>, StoreError> {
        let room = room.to_string();
        let user_id = user_id.to_string();
        self.read(move |conn| select_membership(conn, &room, &user_id))
            .await
    }

    async fn room_and_membership(
        &self,
        room: &str,
        user_id: &str,
    ) -> Result<Option<(RoomRecord, Option<u64>)>, StoreError> {
        let room = room.to_string();
        let user_id = user_id.to_string();
        self.read(move |conn| {
            in_read_transaction(conn, |conn| {
                let Some(record) = select_room(conn, &room)? else {
                    return Ok(None);
                };
                Ok(Some((record, select_membership(conn, &room, &user_id)?)))
            })
        })
        .await
    }

    async fn members(&self, room: &str) -> Result<Vec<RoomMember>, StoreError> {
        let room = room.to_string();
        self.read(move |conn| select_members(conn, &room, None))
            .await
    }

    async fn join_snapshot(
        &self,
        room: &str,
        user_id: &str,
        query: HistoryQuery,
        members_limit: u32,
    ) -> Result<JoinSnapshot, StoreError> {
        let room = room.to_string();
        let user_id = user_id.to_string();
        let index = Arc::clone(&self.index);
        self.read(move |conn| {
            in_read_transaction(conn, |conn| {
                let page = read_history(conn, &index, &room, query)?;
                Ok(JoinSnapshot {
                    read_seq: select_membership(conn, &room, &user_id)?,
                    page,
                    members: select_members(conn, &room, Some(members_limit))?,
                    member_count: count_members(conn, &room)?,
                })
            })
        })
        .await
    }

    async fn rooms_of_users(&self, user_ids: Vec<String>) -> Result<Vec<Vec<String>>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT room_id FROM members WHERE user_id = ?1")
                .map_err(db_err)?;
            user_ids
                .iter()
                .map(|user_id| {
                    stmt.query_map([user_id], |row| row.get(0))
                        .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
                        .map_err(db_err)
                })
                .collect()
        })
        .await
    }

    async fn set_read(&self, room: &str, user_id: &str, seq: u64) -> Result<u64, StoreError> {
        // SQLite integers are signed; anything larger is clamped to the newest seq anyway.
        let seq = seq.min(i64::MAX as u64);
        let room = room.to_string();
        let user_id = user_id.to_string();
        let tails = Arc::clone(&self.tails);
        self.write(move |conn| {
            let not_member = || StoreError::NotFound(format!("not a member of room {room:?}"));
            let mut cache = lock_tails(&tails);
            let (_, last_seq) =
                select_room_tail(conn, &cache.index, &room)?.ok_or_else(not_member)?;
            // A read mark is nothing the cache holds.
            let read = cache.kept_through(conn, || {
                conn.prepare_cached(
                    "UPDATE members SET read_seq = max(read_seq, ?3)
                     WHERE room_id = ?1 AND user_id = ?2
                     RETURNING read_seq",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![room, user_id, seq.min(last_seq)], |row| row.get(0))
                        .optional()
                })
                .map_err(db_err)
            });
            read?.ok_or_else(not_member)
        })
        .await
    }

    async fn remove_member(&self, room: &str, user_id: &str) -> Result<bool, StoreError> {
        let room = room.to_string();
        let user_id = user_id.to_string();
        self.write(move |conn| {
            let deleted = conn
                .execute(
                    "DELETE FROM members WHERE room_id = ?1 AND user_id = ?2",
                    [&room, &user_id],
                )
                .map_err(db_err)?;
            Ok(deleted == 1)
        })
        .await
    }

    async fn append(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        // The tail cache keeps what the append learned only if its commit went through.
        let tails = Arc::clone(&self.tails);
        let settled = Arc::clone(&self.tails);
        let in_place = batch.len() <= IN_PLACE_MAX_MESSAGES;
        self.write_and_settle(
            move |conn| append_batch(conn, batch, &tails),
            move |committed| lock_tails(&settled).settle(committed),
            in_place,
        )
        .await
    }

    async fn history(&self, room: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError> {
        let room = room.to_string();
        let index = Arc::clone(&self.index);
        // One read transaction so the page and `last_seq` are consistent.
        self.read(move |conn| {
            in_read_transaction(conn, |conn| read_history(conn, &index, &room, query))
        })
        .await
    }
}

/// Runs several reads against one snapshot of the database.
fn in_read_transaction<T>(
    conn: &Connection,
    reads: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    run_cached(conn, "BEGIN").map_err(db_err)?;
    let result = reads(conn);
    let _ = run_cached(conn, "COMMIT");
    result
}

fn select_membership(
    conn: &Connection,
    room: &str,
    user_id: &str,
) -> Result<Option<u64>, StoreError> {
    conn.prepare_cached("SELECT read_seq FROM members WHERE room_id = ?1 AND user_id = ?2")
        .and_then(|mut stmt| stmt.query_row([room, user_id], |row| row.get(0)).optional())
        .map_err(db_err)
}

/// Members sorted by name then id; `limit` None means all of them. A range of the
/// `members_by_name` index: only the rows listed are read. Members whose user has no users row
/// yet have no name and are not listed (they are counted).
const MEMBERS_PAGE: &str = "SELECT user_id, user_name, read_seq FROM members
     WHERE room_id = ?1 AND user_name IS NOT NULL ORDER BY user_name, user_id LIMIT ?2";

fn select_members(
    conn: &Connection,
    room: &str,
    limit: Option<u32>,
) -> Result<Vec<RoomMember>, StoreError> {
    let mut stmt = conn.prepare_cached(MEMBERS_PAGE).map_err(db_err)?;
    let limit = limit.map_or(-1, i64::from);
    let rows = stmt
        .query_map(params![room, limit], |row| {
            Ok(RoomMember {
                user: UserRef {
                    id: row.get(0)?,
                    name: row.get(1)?,
                },
                read_seq: row.get(2)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
}

fn count_members(conn: &Connection, room: &str) -> Result<u64, StoreError> {
    conn.prepare_cached("SELECT COUNT(*) FROM members WHERE room_id = ?1")
        .and_then(|mut stmt| stmt.query_row([room], |row| row.get(0)))
        .map_err(db_err)
}

/// A page of a room's history. Starts the read transaction's snapshot (see
/// [`RoomIndex::room`]): call it before any other read of the transaction.
///
/// The room's seqs up to some seq are in the index's runs, the rest wait in memory
/// (`room_index`'s module); a page takes what it needs from each, the older ones first.
fn read_history(
    conn: &Connection,
    index: &RoomIndex,
    room: &str,
    query: HistoryQuery,
) -> Result<HistoryPage, StoreError> {
    let (key, waiting) = index
        .room(conn, room)?
        .ok_or_else(|| StoreError::NotFound(format!("room {room:?} does not exist")))?;
    let waiting = match waiting {
        Some(waiting) => waiting,
        None => Waiting {
            indexed: indexed_last_seq(conn, key)?,
            rowids: Vec::new(),
        },
    };
    let last_seq = waiting.last_seq();
    // Exclusive bounds.
    let (lower, upper, limit, newest_first) = match query {
        HistoryQuery::Latest { limit } => (0, u64::MAX, limit, true),
        HistoryQuery::Before { before, limit } => (0, before, limit, true),
        HistoryQuery::After {
            after,
            before,
            limit,
        } => (after, before.unwrap_or(u64::MAX), limit, false),
    };
    // One more than asked, to tell whether there are more.
    let wanted = limit as usize + 1;
    let in_memory =
        lower.max(waiting.indexed).saturating_add(1)..=upper.saturating_sub(1).min(last_seq);
    // The page's (seq, rowid)s, the waiting ones from memory and the older ones from the
    // index's runs, then every message in one statement.
    let indexed = |page: &mut Vec<(u64, i64)>, newest_first: bool, wanted: usize| {
        if lower >= waiting.indexed || wanted == 0 {
            return Ok(());
        }
        let upper = upper.min(waiting.indexed + 1);
        page.extend(indexed_rowids(
            conn,
            key,
            lower,
            upper,
            newest_first,
            wanted,
        )?);
        Ok::<_, StoreError>(())
    };
    let waiting_entry = |seq: u64| {
        waiting
            .rowid(seq)
            .map(|rowid| (seq, rowid))
            .ok_or_else(|| StoreError::Database(format!("seq {seq} is not waiting")))
    };
    let mut page = Vec::new();
    if newest_first {
        for seq in in_memory.rev().take(wanted) {
            page.push(waiting_entry(seq)?);
        }
        let rest = wanted - page.len();
        indexed(&mut page, true, rest)?;
        page.reverse();
    } else {
        indexed(&mut page, false, wanted)?;
        let rest = wanted - page.len();
        for seq in in_memory.take(rest) {
            page.push(waiting_entry(seq)?);
        }
    }
    let mut messages = select_page(conn, &page)?;
    let has_more = messages.len() > limit as usize;
    if has_more {
        if newest_first {
            messages.remove(0);
        } else {
            messages.pop();
        }
    }
    Ok(HistoryPage {
        messages,
        has_more,
        last_seq,
    })
}

/// The messages of `page`'s (seq, rowid)s, in ascending seq, each checked against its seq.
/// One statement for the page (`rarray`, loaded on every read connection): a statement per
/// message paid SQLite's per-statement work for each.
fn select_page(conn: &Connection, page: &[(u64, i64)]) -> Result<Vec<ChatMessage>, StoreError> {
    /// Built once: every history page uses it.
    static SELECT_PAGE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {MESSAGE_COLUMNS} FROM rarray(?1) a
             JOIN messages m ON m.rowid = a.value JOIN rooms r ON r.key = m.room_key"
        )
    });
    if page.is_empty() {
        return Ok(Vec::new());
    }
    debug_assert!(
        page.windows(2).all(|pair| pair[0].0 < pair[1].0),
        "seqs ascend"
    );
    let rowids: rusqlite::vtab::array::Array = std::rc::Rc::new(
        page.iter()
            .map(|&(_, rowid)| rusqlite::types::Value::Integer(rowid))
            .collect(),
    );
    let mut last_author = None;
    let mut messages = conn
        .prepare_cached(&SELECT_PAGE)
        .and_then(|mut stmt| {
            stmt.query_map([rowids], |row| message_from_row(row, &mut last_author))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(db_err)?;
    messages.sort_unstable_by_key(|message| message.seq);
    if messages.len() != page.len()
        || messages
            .iter()
            .zip(page)
            .any(|(message, &(seq, _))| message.seq != seq)
    {
        let found: Vec<u64> = messages.iter().map(|message| message.seq).collect();
        return Err(StoreError::Database(format!(
            "history index: seqs {:?} gave messages of seqs {found:?}",
            page.iter().map(|&(seq, _)| seq).collect::<Vec<_>>()
        )));
    }
    // Consecutive messages of one author share one `UserRef` (the rows came in the order
    // SQLite chose).
    for at in 1..messages.len() {
        let (before, after) = messages.split_at_mut(at);
        let (previous, message) = (&before[at - 1], &mut after[0]);
        if !Arc::ptr_eq(&previous.user, &message.user) && previous.user == message.user {
            message.user = Arc::clone(&previous.user);
        }
    }
    Ok(messages)
}

/// The stored message with this rowid, if any.
fn select_message(conn: &Connection, rowid: i64) -> Result<Option<ChatMessage>, StoreError> {
    /// Built once: every retry is checked with it.
    static SELECT_MESSAGE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m JOIN rooms r ON r.key = m.room_key
             WHERE m.rowid = ?1"
        )
    });
    conn.prepare_cached(&SELECT_MESSAGE)
        .and_then(|mut stmt| {
            stmt.query_row([rowid], |row| message_from_row(row, &mut None))
                .optional()
        })
        .map_err(db_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> UserRef {
        UserRef {
            id: id.into(),
            name: format!("name-{id}"),
        }
    }

    fn room(id: &str) -> RoomRecord {
        RoomRecord {
            id: id.into(),
            name: id.into(),
            private: false,
            owner: None,
            dm: false,
        }
    }

    fn message(room: &str, user_id: &str, content: &str, client_id: Option<&str>) -> NewMessage {
        NewMessage {
            id: uuid::Uuid::now_v7().to_string(),
            room: room.into(),
            user: Arc::new(user(user_id)),
            content: content.into(),
            client_id: client_id.map(String::from),
            timestamp_ms: now_ms(),
        }
    }

    /// The room's newest seq, as a history page reports it.
    async fn last_seq(store: &SqliteStore, room: &str) -> u64 {
        let page = store.history(room, HistoryQuery::Latest { limit: 0 });
        page.await.unwrap().last_seq
    }

    /// A store in `dir` with room `name`, whose members are `members`, each a known user.
    async fn store_with_room(dir: &Path, name: &str, members: &[&str]) -> SqliteStore {
        let store = SqliteStore::open(dir, SqliteSync::Normal).unwrap();
        for member in members {
            store.ensure_user(&user(member)).await.unwrap();
        }
        let members: Vec<String> = members.iter().map(|member| member.to_string()).collect();
        store.create_room(&room(name), &members).await.unwrap();
        store
    }

    /// Not a check: a W2-shaped workload for `valgrind --tool=callgrind`, whose instruction
    /// counts repeat on this noisy machine. 1,000 rooms of 10 members, then commits of
    /// messages from rooms and authors picked at random, each with a client id as
    /// `confab bench` sends (20 commits of 500 unless `APPEND_COMMITS` and `APPEND_BATCH`
    /// say otherwise). Built with `--cfg confab_production_limits`, or it measures the
    /// store's limits scaled down for tests ([`SCALED_FOR_TESTS`]). See BENCHMARKS.md for
    /// the command.
    #[tokio::test]
    #[ignore]
    async fn append_w2_shaped() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        for r in 0..1000 {
            let members: Vec<String> = (0..10).map(|m| format!("user-{r}-{m}")).collect();
            store
                .create_room(&room(&format!("room-{r}")), &members)
                .await
                .unwrap();
        }
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let content = "x".repeat(64);
        // `APPEND_COMMITS=0` measures the setup alone, to subtract.
        let commits = std::env::var("APPEND_COMMITS").map_or(20, |n| n.parse().unwrap());
        // `APPEND_BATCH` messages per commit (500 unless given): W2's commits carry about 10.
        let per_commit = std::env::var("APPEND_BATCH").map_or(500, |n| n.parse().unwrap());
        // Client ids shaped like `confab bench`'s: run, connection, then a counter in
        // zero-padded hex, so that an author's ids sort in the order they were sent.
        let mut sent = 0_u64;
        for _ in 0..commits {
            let batch = (0..per_commit)
                .map(|_| {
                    let (r, m) = (next() % 1000, next() % 10);
                    sent += 1;
                    message(
                        &format!("room-{r}"),
                        &format!("user-{r}-{m}"),
                        &content,
                        Some(&format!("7703a351-{}-{sent:016x}", r * 10 + m)),
                    )
                })
                .collect();
            for result in store.append(batch).await.unwrap() {
                result.unwrap();
            }
        }
    }

    /// A join's reads (a history page and a member list, each with a `LIMIT ?`) run from
    /// their cached statements as compiled, whatever limits are bound: none is compiled again.
    #[tokio::test]
    async fn reads_with_new_limits_are_not_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["ann", "bob"]).await;
        let batch = (0..20)
            .map(|n| message("r", "ann", &format!("m{n}"), None))
            .collect();
        store.append(batch).await.unwrap();
        let index = Arc::clone(&store.index);
        let recompiled = store
            .read(move |conn| {
                for limit in [1, 5, 2, 7, 3] {
                    let snapshot = in_read_transaction(conn, |conn| {
                        Ok((
                            read_history(conn, &index, "r", HistoryQuery::Latest { limit })?,
                            read_history(
                                conn,
                                &index,
                                "r",
                                HistoryQuery::After {
                                    after: limit.into(),
                                    before: None,
                                    limit,
                                },
                            )?,
                            select_members(conn, "r", Some(limit))?,
                        ))
                    })?;
                    assert_eq!(snapshot.0.messages.len(), limit as usize);
                    assert_eq!(snapshot.1.messages.len(), limit as usize);
                }
                let recompiled = |sql: &str| {
                    conn.prepare_cached(sql)
                        .unwrap()
                        .get_status(rusqlite::StatementStatus::RePrepare)
                };
                Ok([
                    recompiled(super::super::room_index::RUNS_IN_RANGE_DESC),
                    recompiled(super::super::room_index::RUNS_IN_RANGE),
                    recompiled(MEMBERS_PAGE),
                ])
            })
            .await
            .unwrap();
        assert_eq!(recompiled, [0, 0, 0]);
    }

    /// The writer's tail cache never answers for a room whose membership or existence changed
    /// since it learned about it.
    #[tokio::test]
    async fn remembered_tails_follow_joins_leaves_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a", "b"]).await;
        let outcome = |results: Vec<Result<Appended, StoreError>>| match &results[0] {
            Ok(appended) => format!("#{}", appended.message.seq),
            Err(StoreError::NotMember(_)) => "not member".into(),
            Err(StoreError::NotFound(_)) => "not found".into(),
            Err(err) => panic!("{err}"),
        };
        let send = |author: &'static str| {
            let store = &store;
            async move {
                store
                    .append(vec![message("r", author, "m", None)])
                    .await
                    .unwrap()
            }
        };
        assert_eq!(outcome(send("a").await), "#1");
        assert_eq!(outcome(send("b").await), "#2");
        // Learned from the cache alone (no other write in between).
        assert_eq!(outcome(send("b").await), "#3");
        assert_eq!(outcome(send("c").await), "not member");
        assert!(store.remove_member("r", "b").await.unwrap());
        assert_eq!(outcome(send("b").await), "not member");
        assert!(store.add_member("r", "c").await.unwrap());
        assert_eq!(outcome(send("c").await), "#4");
        assert_eq!(outcome(send("a").await), "#5");
        store.delete_room("r").await.unwrap();
        assert_eq!(outcome(send("a").await), "not found");
        // A room of the same name starts again at 1, whatever was remembered.
        store.create_room(&room("r"), &["a".into()]).await.unwrap();
        assert_eq!(outcome(send("a").await), "#1");
        assert_eq!(outcome(send("a").await), "#2");
    }

    #[tokio::test]
    async fn joins_and_read_marks_keep_the_tails() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        let members = |store: &SqliteStore| {
            let cache = lock_tails(&store.tails);
            let mut members: Vec<String> = cache
                .rooms
                .get("r")
                .map(|room| room.members.iter().cloned().collect())
                .unwrap_or_default();
            members.sort();
            members
        };
        let first = store.append(vec![message("r", "a", "m", None)]).await;
        assert_eq!(first.unwrap()[0].as_ref().unwrap().message.seq, 1);
        assert_eq!(members(&store), ["a"]);
        // A join and a read mark keep what the cache knew; the new member is learned at
        // their first message.
        assert!(store.add_member("r", "b").await.unwrap());
        assert_eq!(members(&store), ["a"]);
        assert_eq!(store.set_read("r", "a", 1).await.unwrap(), 1);
        assert_eq!(members(&store), ["a"]);
        let second = store.append(vec![message("r", "b", "m", None)]).await;
        assert_eq!(second.unwrap()[0].as_ref().unwrap().message.seq, 2);
        assert_eq!(members(&store), ["a", "b"]);
        // A leave is not one of them: the next append finds the cache untrusted and empties it.
        assert!(store.remove_member("r", "b").await.unwrap());
        let refused = store.append(vec![message("r", "b", "m", None)]).await;
        assert!(matches!(refused.unwrap()[0], Err(StoreError::NotMember(_))));
        assert_eq!(members(&store), Vec::<String>::new());
    }

    #[test]
    fn a_full_tail_cache_starts_over() {
        let mut cache = TailCache::default();
        for key in 1..=4 {
            cache.remember(&format!("r{key}"), key, 0, None);
        }
        cache.remember("r1", 1, 0, Some("a"));
        assert_eq!(cache.rooms.len(), 4, "a known room is not a new one");
        cache.remember("r5", 5, 0, None);
        assert_eq!(cache.rooms.keys().collect::<Vec<_>>(), ["r5"]);
        for user in 0..8 {
            cache.remember("r5", 5, 0, Some(&format!("u{user}")));
        }
        assert_eq!(cache.members, 8);
        cache.remember("r5", 5, 0, Some("u0"));
        assert_eq!(cache.members, 8, "a known member is not a new one");
        cache.remember("r5", 5, 0, Some("u8"));
        assert_eq!(
            (cache.rooms.len(), cache.members),
            (1, 1),
            "a ninth member starts over"
        );
        assert!(cache.rooms["r5"].members.contains("u8"));
    }

    #[test]
    fn a_failed_commit_leaves_no_tails_behind() {
        let conn = Connection::open_in_memory().unwrap();
        let mut cache = TailCache::default();
        cache.check(&conn);
        cache.remember("r", 1, 6, Some("a"));
        cache.advance("r", 7);
        cache.pending = Some(conn.total_changes());
        cache.settle(true);
        assert_eq!(cache.rooms["r"].last_seq, 7);
        assert!(cache.rooms["r"].members.contains("a"));
        cache.check(&conn);
        assert!(cache.rooms.contains_key("r"), "nothing else wrote");
        cache.advance("r", 8);
        cache.pending = Some(conn.total_changes());
        cache.settle(false);
        assert!(cache.rooms.is_empty(), "a rolled-back append's updates go");
        // Any other write empties it on the next look.
        cache.remember("r", 1, 8, None);
        cache.pending = Some(conn.total_changes());
        cache.settle(true);
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        cache.check(&conn);
        assert!(cache.rooms.is_empty());
    }

    /// An append commits on its caller's thread while the write connection is free, and
    /// queues for the writer thread, without blocking its caller, while it is not.
    #[tokio::test]
    async fn appends_commit_in_place_unless_the_writer_is_busy() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        // Free (once the writer thread is done with the room's creation): done by the time
        // the first poll returns.
        let writer = store.in_place.lock().unwrap().clone().unwrap();
        drop(writer.lock().unwrap());
        let first = store.append(vec![message("r", "a", "one", None)]);
        let stored = first.now_or_never().expect("committed in place").unwrap();
        assert_eq!(stored[0].as_ref().unwrap().message.seq, 1);
        // Busy (held here as the writer thread holds it while committing or rewinding): the
        // append waits in the writer's queue, and this thread goes on.
        let (held, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        let second = std::thread::scope(|scope| {
            scope.spawn(|| {
                let _busy = writer.lock().unwrap();
                held.wait();
                release.wait();
            });
            held.wait();
            let mut second = Box::pin(store.append(vec![message("r", "a", "two", None)]));
            assert!(
                (&mut second).now_or_never().is_none(),
                "queued, not blocked"
            );
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                (&mut second).now_or_never().is_none(),
                "not committed meanwhile"
            );
            release.wait();
            second
        });
        let stored = second.await.unwrap();
        assert_eq!(stored[0].as_ref().unwrap().message.seq, 2);
        // Closed: nothing is committed in place any more.
        store.close();
        let late = store.append(vec![message("r", "a", "three", None)]).await;
        assert!(matches!(late, Err(StoreError::Closed)));
    }

    /// The first commit into a WAL that starts over (here: at open, after a clean close left
    /// it empty; otherwise after each rewind) syncs the WAL's new header, so it is left to the
    /// writer thread; the commits after it are made in place again.
    #[tokio::test]
    async fn the_commit_that_starts_the_wal_over_is_not_made_in_place() {
        let dir = tempfile::tempdir().unwrap();
        store_with_room(dir.path(), "r", &["a"]).await.close();
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        let nothing = || -> WriteJob { Box::new(|_| (true, Box::new(|_| {}))) };
        assert!(
            store.commit_in_place(nothing(), true).is_err(),
            "the WAL starts over: the writer thread's"
        );
        let stored = append_one(&store, message("r", "a", "one", None)).await;
        assert_eq!(stored.message.seq, 1);
        assert!(
            store.commit_in_place(nothing(), true).is_ok(),
            "in place once the WAL has begun"
        );
        store.close();
    }

    /// Appends one message alone and returns how it was stored.
    async fn append_one(store: &SqliteStore, msg: NewMessage) -> Appended {
        store.append(vec![msg]).await.unwrap().remove(0).unwrap()
    }

    /// Sends `count` messages from `a` to `r` with client ids `c{from}`.. one append each,
    /// and returns whether each was a duplicate.
    async fn send_keyed(store: &SqliteStore, from: usize, count: usize) -> Vec<bool> {
        let mut duplicates = Vec::new();
        for i in from..from + count {
            let key = format!("c{i}");
            let appended = append_one(store, message("r", "a", &key, Some(&key))).await;
            duplicates.push(appended.duplicate);
        }
        duplicates
    }

    /// Retry keys written, one row each in `client_keys` or packed in `client_key_runs`.
    fn written_keys(dir: &Path) -> usize {
        let conn = Connection::open(dir.join("confab.db")).unwrap();
        let single: usize = conn
            .query_row("SELECT count(*) FROM client_keys", [], |row| row.get(0))
            .unwrap();
        let mut runs = conn.prepare("SELECT keys FROM client_key_runs").unwrap();
        let packed: usize = runs
            .query_map([], |row| row.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(|run| super::super::key_run::len(&run.unwrap()))
            .sum();
        single + packed
    }

    /// Retries are recognised whether their key still waits in memory, was written to
    /// `client_keys` with the author's next ones, or was read back after a restart.
    #[tokio::test]
    async fn retries_are_recognised_wherever_their_key_is() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        assert_eq!(send_keyed(&store, 0, 40).await, vec![false; 40]);
        // The first 32 were written together; 8 wait.
        assert_eq!(written_keys(dir.path()), 32);
        assert_eq!(lock_tails(&store.tails).retry.waiting(), 8);
        // A written key and a waiting one.
        assert_eq!(send_keyed(&store, 3, 1).await, vec![true]);
        assert_eq!(send_keyed(&store, 37, 1).await, vec![true]);
        let retried = append_one(&store, message("r", "a", "again", Some("c37"))).await;
        assert_eq!(
            (retried.message.seq, retried.message.content.as_str()),
            (38, "c37")
        );
        store.close();
        drop(store);

        // The waiting keys are read back from the messages after the low mark.
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        assert_eq!(send_keyed(&store, 39, 2).await, vec![true, false]);
        assert_eq!(send_keyed(&store, 0, 1).await, vec![true]);
        let page = store
            .history("r", HistoryQuery::Latest { limit: 100 })
            .await
            .unwrap();
        assert_eq!(page.last_seq, 41, "each key stored once");
    }

    /// A key is taken as new without a lookup only above the greatest key its author has,
    /// waiting or written, as remembered: that memory follows every key stored, is read back
    /// after a restart, and is refilled when it overflows (4 authors in tests).
    #[tokio::test]
    async fn retries_at_the_greatest_stored_key_are_still_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        // Sends `a`'s message with key "d" (above "c9"); whether it was a duplicate.
        let sent_d = async |store: &SqliteStore| {
            append_one(store, message("r", "a", "d", Some("d")))
                .await
                .duplicate
        };
        // The first message has `a` remembered with no stored keys; the 32nd writes c0..c31,
        // of which "c9" sorts last.
        assert_eq!(send_keyed(&store, 0, 32).await, vec![false; 32]);
        assert_eq!(lock_tails(&store.tails).retry.waiting(), 0);
        assert_eq!(send_keyed(&store, 9, 1).await, vec![true]);
        // "d" waits in memory, above the written keys; its retry is found.
        assert!(!sent_d(&store).await);
        assert!(sent_d(&store).await);
        // Other authors push `a` out of the memory, and come back.
        let authors: Vec<String> = (0..6).map(|n| format!("u{n}")).collect();
        for author in &authors {
            store.ensure_user(&user(author)).await.unwrap();
            store.add_member("r", author).await.unwrap();
        }
        for round in 0..2 {
            for author in &authors {
                let appended = append_one(&store, message("r", author, "hi", Some("k"))).await;
                assert_eq!(appended.duplicate, round == 1, "{author} in round {round}");
            }
        }
        assert_eq!(send_keyed(&store, 9, 1).await, vec![true]);
        assert!(sent_d(&store).await);
        store.close();
        drop(store);
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        assert_eq!(send_keyed(&store, 9, 1).await, vec![true]);
        assert!(sent_d(&store).await);
        assert!(
            !append_one(&store, message("r", "a", "e", Some("e")))
                .await
                .duplicate
        );
    }

    /// A quiet author's keys are written once the newest message is far enough ahead (50 rows
    /// in tests), so the low mark, and what a restart reads back, does not stay behind.
    #[tokio::test]
    async fn a_quiet_authors_keys_are_written_when_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a", "b"]).await;
        store
            .append(vec![message("r", "b", "quiet", Some("q"))])
            .await
            .unwrap();
        // 31 of a's keys wait with b's; the 51st message leaves b's key 50 rows behind.
        assert_eq!(send_keyed(&store, 0, 31).await, vec![false; 31]);
        assert_eq!(lock_tails(&store.tails).retry.waiting(), 32);
        assert_eq!(send_keyed(&store, 31, 20).await, vec![false; 20]);
        let rows = written_keys(dir.path());
        assert_eq!(rows, 32 + 1, "a's first 32 and b's one");
        let low: i64 = Connection::open(dir.path().join("confab.db"))
            .unwrap()
            .query_row("SELECT client_keys FROM low_marks", [], |row| row.get(0))
            .unwrap();
        assert!(low > 1, "the low mark moved past b's message");
        let retried = append_one(&store, message("r", "b", "quiet again", Some("q"))).await;
        assert!(retried.duplicate);
    }

    /// When a deleted room took the newest messages, rowids are handed out again below an
    /// author's waiting key: the low mark follows them down, so a restart still finds them.
    #[tokio::test]
    async fn keys_below_a_deleted_rooms_rowids_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        store.create_room(&room("x"), &["a".into()]).await.unwrap();
        append_one(&store, message("r", "a", "1", None)).await;
        append_one(&store, message("x", "a", "2", None)).await;
        append_one(&store, message("x", "a", "3", Some("old"))).await;
        store.delete_room("x").await.unwrap();
        // Rowid 2 again, below the waiting key of the deleted rowid 3.
        assert!(
            !append_one(&store, message("r", "a", "4", Some("new")))
                .await
                .duplicate
        );
        store.close();
        drop(store);
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        let retried = append_one(&store, message("r", "a", "4 again", Some("new"))).await;
        assert!(retried.duplicate);
        assert_eq!(retried.message.content, "4");
    }

    /// A deleted room takes its messages' keys with it: they can be used again, whether they
    /// were rows of their own, packed in a run (which stays, naming rows that are gone, or
    /// rows that later messages took over) or waiting in memory; and the new ones are found.
    #[tokio::test]
    async fn a_deleted_rooms_keys_can_be_used_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        // 33 keys: 32 written as one run, one waiting in memory; then one below them all,
        // written as a row of its own with the next 31.
        assert_eq!(send_keyed(&store, 0, 33).await, vec![false; 33]);
        let below = append_one(&store, message("r", "a", "below", Some("b"))).await;
        assert!(!below.duplicate);
        assert_eq!(send_keyed(&store, 100, 31).await, vec![false; 31]);
        assert_eq!(written_keys(dir.path()), 64);
        store.delete_room("r").await.unwrap();
        store.create_room(&room("r"), &["a".into()]).await.unwrap();
        for round in [false, true] {
            // Run-packed (c5, c31), waiting (c32), a row of its own ("b").
            assert_eq!(send_keyed(&store, 31, 2).await, vec![round, round]);
            assert_eq!(send_keyed(&store, 5, 1).await, vec![round]);
            let again = append_one(&store, message("r", "a", "below", Some("b"))).await;
            assert_eq!(again.duplicate, round);
        }
        store.close();
        drop(store);
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        assert_eq!(send_keyed(&store, 31, 2).await, vec![true, true]);
        assert_eq!(send_keyed(&store, 5, 1).await, vec![true]);
        assert_eq!(send_keyed(&store, 6, 1).await, vec![false]);
    }

    /// Keys above every key their author has written go out packed as one run; keys below
    /// (random ones, or a client's out of order) as rows of their own. Every one of them is
    /// found, before and after a restart, and a key is never stored twice.
    #[tokio::test]
    async fn keys_in_runs_and_rows_of_their_own_are_all_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_room(dir.path(), "r", &["a"]).await;
        let keyed = async |store: &SqliteStore, keys: &[String]| -> Vec<bool> {
            let mut duplicates = Vec::new();
            for key in keys {
                let appended = append_one(store, message("r", "a", key, Some(key))).await;
                duplicates.push(appended.duplicate);
            }
            duplicates
        };
        let count = |sql: &str| -> i64 {
            Connection::open(dir.path().join("confab.db"))
                .unwrap()
                .query_row(sql, [], |row| row.get(0))
                .unwrap()
        };
        // Keys of one width sort as they are sent: k000..k063 are written as two runs of 32.
        let ascending: Vec<String> = (0..64).map(|n| format!("k{n:03}")).collect();
        assert_eq!(keyed(&store, &ascending).await, vec![false; 64]);
        assert_eq!(count("SELECT count(*) FROM client_key_runs"), 2);
        assert_eq!(count("SELECT count(*) FROM client_keys"), 0);
        // Keys between and below the runs' (a client with random ids): rows of their own
        // (32 written, 2 waiting).
        let scattered: Vec<String> = (0..32)
            .map(|n| format!("k{:03}x", (n * 37) % 64))
            .chain(["a".into(), "k".into()])
            .collect();
        assert_eq!(keyed(&store, &scattered).await, vec![false; 34]);
        assert_eq!(count("SELECT count(*) FROM client_key_runs"), 2);
        assert_eq!(count("SELECT count(*) FROM client_keys"), 32);
        for round in 0..2 {
            assert_eq!(
                keyed(&store, &ascending).await,
                vec![true; 64],
                "round {round}"
            );
            assert_eq!(
                keyed(&store, &scattered).await,
                vec![true; 34],
                "round {round}"
            );
            store.close();
            drop(store);
            store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        }
        // Near misses are new.
        let new: Vec<String> = ["k0", "k0000", "k063y", "k064", "j"]
            .map(String::from)
            .into();
        assert_eq!(keyed(&store, &new).await, vec![false; 5]);
        let page = store
            .history("r", HistoryQuery::Latest { limit: 1000 })
            .await
            .unwrap();
        assert_eq!(page.last_seq, 64 + 34 + 5, "each key stored once");
    }

    #[tokio::test]
    async fn seqs_are_gap_free_and_client_ids_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        let results = store
            .append(vec![
                message("r", "a", "one", Some("c1")),
                message("r", "a", "two", None),
                message("missing", "a", "x", None),
                message("r", "a", "one again", Some("c1")),
                message("r", "a", "three", Some("c3")),
            ])
            .await
            .unwrap();
        let seqs: Vec<_> = results
            .iter()
            .map(|r| r.as_ref().map(|a| (a.message.seq, a.duplicate)).ok())
            .collect();
        assert_eq!(
            seqs,
            vec![
                Some((1, false)),
                Some((2, false)),
                None,
                Some((1, true)),
                Some((3, false))
            ]
        );
        let page = store
            .history("r", HistoryQuery::Latest { limit: 2 })
            .await
            .unwrap();
        assert_eq!(
            page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(page.has_more);
        assert_eq!(page.last_seq, 3);
        let page = store
            .history(
                "r",
                HistoryQuery::After {
                    after: 1,
                    before: None,
                    limit: 10,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(!page.has_more);
        let page = store
            .history(
                "r",
                HistoryQuery::Before {
                    before: 3,
                    limit: 1,
                },
            )
            .await
            .unwrap();
        assert_eq!(page.messages[0].seq, 2);
        assert!(page.has_more);
    }

    /// One batch mixing rooms, authors, retries and refusals: seqs stay gap-free per room,
    /// every outcome lands at its message's position, and `last_seq` ends at the newest seq.
    #[tokio::test]
    async fn mixed_batches_keep_seqs_gap_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r1", &["a", "b"]).await;
        store.create_room(&room("r2"), &["a".into()]).await.unwrap();
        store
            .append(vec![message("r1", "a", "earlier", Some("old"))])
            .await
            .unwrap();
        let results = store
            .append(vec![
                message("r1", "a", "1", Some("x1")),
                message("r2", "a", "2", Some("x2")),
                message("r2", "b", "not a member", Some("y1")),
                message("r1", "b", "3", None),
                message("gone", "a", "no room", Some("x3")),
                message("r1", "a", "retry of an earlier batch", Some("old")),
                message("r1", "a", "retry in the same batch", Some("x1")),
                message("r2", "a", "4", None),
                // Same client_id as x2 but another author: not a duplicate.
                message("r1", "b", "5", Some("x2")),
                message("r2", "b", "still not a member", None),
                message("r1", "a", "6", Some("x4")),
            ])
            .await
            .unwrap();
        let outcomes: Vec<_> = results
            .iter()
            .map(|result| match result {
                Ok(appended) => format!(
                    "{}#{}{}",
                    appended.message.room,
                    appended.message.seq,
                    if appended.duplicate { " dup" } else { "" }
                ),
                Err(StoreError::NotMember(_)) => "not member".into(),
                Err(StoreError::NotFound(_)) => "not found".into(),
                Err(err) => panic!("{err}"),
            })
            .collect();
        assert_eq!(
            outcomes,
            vec![
                "r1#2",
                "r2#1",
                "not member",
                "r1#3",
                "not found",
                "r1#1 dup",
                "r1#2 dup",
                "r2#2",
                "r1#4",
                "not member",
                "r1#5",
            ]
        );
        // Duplicates answer with the stored original, not the retry's content.
        assert_eq!(results[5].as_ref().unwrap().message.content, "earlier");
        assert_eq!(results[6].as_ref().unwrap().message.content, "1");
        for (id, last) in [("r1", 5), ("r2", 2)] {
            assert_eq!(last_seq(&store, id).await, last);
            let page = store
                .history(id, HistoryQuery::Latest { limit: 100 })
                .await
                .unwrap();
            let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "room {id}");
        }
        // The next batch continues where this one ended.
        let next = store
            .append(vec![message("r2", "a", "7", None)])
            .await
            .unwrap();
        assert_eq!(next[0].as_ref().unwrap().message.seq, 3);
    }

    /// A batch over more rooms and members than the tail cache holds in tests (so it starts
    /// over mid-batch), with a retry of a message earlier in the batch: every message gets
    /// the next seq of its room, is read back under that seq with its own content, and its
    /// key finds it afterwards.
    #[tokio::test]
    async fn large_batches_file_every_row_under_its_own_seq() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r0", &["a", "b", "c"]).await;
        for r in 1..6 {
            store
                .create_room(
                    &room(&format!("r{r}")),
                    &["a".into(), "b".into(), "c".into()],
                )
                .await
                .unwrap();
        }
        let authors = ["a", "b", "c"];
        let mut batch = Vec::new();
        let mut expected: HashMap<String, Vec<String>> = HashMap::default();
        for n in 0..70 {
            let (room_id, author) = (format!("r{}", (n / 2) % 6), authors[n % 3]);
            let content = format!("m{n}");
            batch.push(message(&room_id, author, &content, Some(&format!("k{n}"))));
            expected.entry(room_id).or_default().push(content);
            if n == 40 {
                // A retry of message 25 (room r0, author b).
                batch.push(message("r0", "b", "retried", Some("k25")));
            }
        }
        let results = store.append(batch.clone()).await.unwrap();
        let retry = results[41].as_ref().unwrap();
        assert!(retry.duplicate);
        assert_eq!(retry.message.content, "m25");
        for (room_id, contents) in &expected {
            let page = store
                .history(room_id, HistoryQuery::Latest { limit: 100 })
                .await
                .unwrap();
            let read: Vec<(u64, &str)> = page
                .messages
                .iter()
                .map(|m| (m.seq, m.content.as_str()))
                .collect();
            let sent: Vec<(u64, &str)> = (1..).zip(contents.iter().map(String::as_str)).collect();
            assert_eq!(read, sent, "room {room_id}");
        }
        // Every key now finds its original, stored where the history says.
        let again = store.append(batch).await.unwrap();
        for (first, second) in results.iter().zip(&again) {
            let (first, second) = (first.as_ref().unwrap(), second.as_ref().unwrap());
            assert!(second.duplicate);
            assert_eq!(
                (first.message.seq, &first.message.content),
                (second.message.seq, &second.message.content)
            );
        }
    }

    /// A retry sent to a room its author is not a member of, of a message earlier in the
    /// same batch that is not inserted yet, is still answered with that message.
    #[tokio::test]
    async fn a_retry_elsewhere_finds_a_message_earlier_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "solo", &["a"]).await;
        store
            .create_room(&room("r"), &["a".into(), "b".into()])
            .await
            .unwrap();
        let results = store
            .append(vec![
                message("solo", "a", "solo's", None),
                message("r", "b", "original", Some("k1")),
                message("solo", "b", "retried where b is not a member", Some("k1")),
            ])
            .await
            .unwrap();
        let retry = results[2].as_ref().expect("the retry finds the original");
        assert!(retry.duplicate);
        assert_eq!(
            (
                retry.message.room.as_str(),
                retry.message.seq,
                retry.message.content.as_str()
            ),
            ("r", 1, "original")
        );
    }

    /// A retry keeps getting its original message after the author left the room (the
    /// message was stored while they were a member); a new message from them is refused.
    #[tokio::test]
    async fn retries_after_leaving_still_find_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        store
            .append(vec![message("r", "a", "hello", Some("c1"))])
            .await
            .unwrap();
        assert!(store.remove_member("r", "a").await.unwrap());
        let results = store
            .append(vec![
                message("r", "a", "hello", Some("c1")),
                message("r", "a", "new", Some("c2")),
            ])
            .await
            .unwrap();
        let first = results[0].as_ref().unwrap();
        assert_eq!((first.message.seq, first.duplicate), (1, true));
        assert!(matches!(results[1], Err(StoreError::NotMember(_))));
        assert_eq!(last_seq(&store, "r").await, 1);
    }

    /// A failing write leaves nothing behind, whether it ran alone in its commit (no
    /// savepoint) or next to others (its own savepoint), and the others still commit.
    #[tokio::test]
    async fn a_failing_write_is_undone_alone_or_among_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        store.create_room(&room("r"), &["a".into()]).await.unwrap();
        // Alone: the conflicting create inserts its member row before it finds the clash.
        assert!(matches!(
            store.create_room(&room("r"), &["b".into()]).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(store.membership("r", "b").await.unwrap(), None);
        // Among others: queued together, so they usually share one commit.
        let (again, members) = (room("r"), ["c".to_string()]);
        let (clash, appended, added) = tokio::join!(
            store.create_room(&again, &members),
            store.append(vec![message("r", "a", "x", None)]),
            store.add_member("r", "d"),
        );
        assert!(matches!(clash, Err(StoreError::Conflict(_))));
        assert_eq!(appended.unwrap()[0].as_ref().unwrap().message.seq, 1);
        assert!(added.unwrap());
        assert_eq!(store.membership("r", "c").await.unwrap(), None);
        assert_eq!(store.membership("r", "d").await.unwrap(), Some(0));
        // Still writable afterwards: no transaction was left open.
        let next = store
            .append(vec![message("r", "a", "y", None)])
            .await
            .unwrap();
        assert_eq!(next[0].as_ref().unwrap().message.seq, 2);
    }

    /// Seqs of a history page, whether it has more, and its last seq.
    async fn page_of(
        store: &SqliteStore,
        room: &str,
        query: HistoryQuery,
    ) -> (Vec<u64>, bool, u64) {
        let page = store.history(room, query).await.unwrap();
        for message in &page.messages {
            assert_eq!(message.content, format!("m{}", message.seq), "{query:?}");
        }
        let seqs = page.messages.iter().map(|m| m.seq).collect();
        (seqs, page.has_more, page.last_seq)
    }

    /// The page `query` asks of a room holding seqs 1 to `last`, worked out directly.
    fn expected_page(last: u64, query: HistoryQuery) -> (Vec<u64>, bool, u64) {
        let (lower, upper, limit, newest_first) = match query {
            HistoryQuery::Latest { limit } => (0, u64::MAX, limit as usize, true),
            HistoryQuery::Before { before, limit } => (0, before, limit as usize, true),
            HistoryQuery::After {
                after,
                before,
                limit,
            } => (after, before.unwrap_or(u64::MAX), limit as usize, false),
        };
        let all: Vec<u64> = (1..=last).filter(|&s| s > lower && s < upper).collect();
        let page = if newest_first {
            all[all.len().saturating_sub(limit)..].to_vec()
        } else {
            all[..limit.min(all.len())].to_vec()
        };
        (page, all.len() > limit, last)
    }

    /// What readers are given of the waiting entries is what the writer holds.
    fn assert_published(store: &SqliteStore) {
        let writer = lock_tails(&store.tails).index.rooms().clone();
        assert_eq!(*store.index.lock(), writer, "published waiting entries");
    }

    /// Checks every page shape of room `r`, holding seqs 1 to `last`, against
    /// [`expected_page`] (and the published waiting entries against the writer's).
    async fn check_pages(store: &SqliteStore, last: u64) {
        assert_published(store);
        for limit in [0, 1, 3, 7, 8, 9, 40] {
            let mut queries = vec![HistoryQuery::Latest { limit }];
            for bound in 0..=last + 2 {
                queries.push(HistoryQuery::Before {
                    before: bound,
                    limit,
                });
                queries.push(HistoryQuery::After {
                    after: bound,
                    before: None,
                    limit,
                });
                queries.push(HistoryQuery::After {
                    after: bound,
                    before: Some(bound + 6),
                    limit,
                });
            }
            for query in queries {
                assert_eq!(
                    page_of(store, "r", query).await,
                    expected_page(last, query),
                    "{query:?} of 1..={last}"
                );
            }
        }
    }

    /// Every page shape, over a room whose seqs are partly in runs and partly waiting
    /// in memory (8 per flush in tests), agrees with the pages worked out directly, after
    /// every append and after a restart (which reads the waiting ones back).
    #[tokio::test]
    async fn history_pages_span_indexed_and_waiting_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        let mut last = 0;
        for size in [1, 2, 5, 1, 9, 3] {
            let batch = (last + 1..=last + size)
                .map(|seq| message("r", "a", &format!("m{seq}"), None))
                .collect();
            store.append(batch).await.unwrap();
            last += size;
            check_pages(&store, last).await;
        }
        // 21 messages: 18 indexed (all that waited, each time 8 or more did), 3 waiting.
        assert_eq!(lock_tails(&store.tails).index.waiting(), 3);
        store.close();
        drop(store);
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        assert_eq!(lock_tails(&store.tails).index.waiting(), 3, "read back");
        check_pages(&store, last).await;
        let next = append_one(&store, message("r", "a", "m22", None)).await;
        assert_eq!(next.message.seq, 22);
        check_pages(&store, 22).await;
    }

    /// A page shares one author between consecutive rows by the same one, and never between
    /// rows whose id or name (as sent) differ.
    #[tokio::test]
    async fn history_rows_share_their_author_only_when_it_is_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a", "b"]).await;
        let renamed = Arc::new(UserRef {
            id: "a".into(),
            name: "Ann, renamed".into(),
        });
        let authors = ["a", "a", "b", "b", "a", "renamed", "renamed", "a"];
        let batch = (0..40)
            .map(|i| {
                let author = authors[i % authors.len()];
                let mut msg = message("r", author, &format!("m{i}"), None);
                if author == "renamed" {
                    msg.user = renamed.clone();
                }
                msg
            })
            .collect();
        store.append(batch).await.unwrap();
        let indexed = 40 - lock_tails(&store.tails).index.waiting() as usize;
        assert!(indexed >= 16, "most of the page comes from the index");
        let page = store.history("r", HistoryQuery::Latest { limit: 40 });
        let messages = page.await.unwrap().messages;
        assert_eq!(messages.len(), 40);
        for (i, message) in messages.iter().enumerate() {
            let expected = match authors[i % authors.len()] {
                "renamed" => (*renamed).clone(),
                author => user(author),
            };
            assert_eq!(*message.user, expected, "seq {}", message.seq);
        }
        // Read newest first: within the indexed rows a run of one author is one allocation.
        for pair in messages[..indexed].windows(2) {
            let same = pair[0].user == pair[1].user;
            assert_eq!(Arc::ptr_eq(&pair[0].user, &pair[1].user), same);
        }
    }

    /// A room that falls behind the others has its waiting entries written even though it
    /// never reaches a flush's worth, and the low mark follows; a restart then reads back
    /// only what still waits.
    #[tokio::test]
    async fn a_quiet_rooms_entries_are_written_when_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "quiet", &["a"]).await;
        store
            .create_room(&room("busy"), &["a".into()])
            .await
            .unwrap();
        append_one(&store, message("quiet", "a", "m1", None)).await;
        for seq in 1..=50 {
            append_one(&store, message("busy", "a", &format!("m{seq}"), None)).await;
        }
        let conn = Connection::open(dir.path().join("confab.db")).unwrap();
        let indexed: i64 = conn
            .query_row(
                "SELECT coalesce(sum(i.last_seq - i.first_seq + 1), 0) FROM room_index_runs i
                 JOIN rooms r ON r.key = i.room_key WHERE r.id = 'quiet'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(indexed, 1, "written once 40 messages behind");
        let low: i64 = conn
            .query_row("SELECT room_index FROM low_marks", [], |row| row.get(0))
            .unwrap();
        assert!(low > 1, "the low mark moved past the quiet room's message");
        assert_eq!(
            page_of(&store, "quiet", HistoryQuery::Latest { limit: 5 }).await,
            (vec![1], false, 1)
        );
        store.close();
        drop(store);
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        assert_eq!(
            lock_tails(&store.tails).index.waiting(),
            2,
            "busy's 49 and 50"
        );
        assert_eq!(last_seq(&store, "busy").await, 50);
        assert_eq!(
            append_one(&store, message("quiet", "a", "m2", None))
                .await
                .message
                .seq,
            2
        );
    }

    /// Deleting a room deletes its history, indexed and waiting, and the entries of a room
    /// that takes its key do not mix with the old ones.
    #[tokio::test]
    async fn a_deleted_room_takes_its_indexed_and_waiting_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        let batch = (1..=11)
            .map(|seq| message("r", "a", &format!("m{seq}"), Some(&format!("c{seq}"))))
            .collect();
        store.append(batch).await.unwrap();
        store.delete_room("r").await.unwrap();
        let conn = Connection::open(dir.path().join("confab.db")).unwrap();
        let count = |table: &str| -> i64 {
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .unwrap()
        };
        assert_eq!((count("messages"), count("room_index_runs")), (0, 0));
        assert_eq!(lock_tails(&store.tails).index.waiting(), 0);
        // The newest room's key is handed out again.
        store.create_room(&room("r2"), &["a".into()]).await.unwrap();
        append_one(&store, message("r2", "a", "m1", None)).await;
        assert_published(&store);
        assert_eq!(
            page_of(&store, "r2", HistoryQuery::Latest { limit: 20 }).await,
            (vec![1], false, 1)
        );
        let listing = store.rooms_for("a").await.unwrap();
        let r2 = listing.iter().find(|l| l.room.id == "r2").unwrap();
        assert_eq!(r2.last_seq, 1);
    }

    /// Waiting entries forgotten by the writer (as after a rolled-back write) are read back
    /// from the database and published again, the same as before.
    #[tokio::test]
    async fn forgotten_entries_are_read_back_and_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_room(dir.path(), "r", &["a"]).await;
        store.create_room(&room("s"), &["a".into()]).await.unwrap();
        let batch = (1..=6)
            .flat_map(|seq| {
                let content = format!("m{seq}");
                [
                    message("r", "a", &content, None),
                    message("s", "a", &content, None),
                ]
            })
            .collect();
        store.append(batch).await.unwrap();
        let before = store.index.lock().clone();
        assert_eq!(before.len(), 2);
        lock_tails(&store.tails).index.forget();
        append_one(&store, message("r", "a", "m7", None)).await;
        let mut after = store.index.lock().clone();
        let r = after.values_mut().find(|w| w.last_seq() == 7).unwrap();
        assert_eq!(r.rowids.pop(), Some(13), "the new message's entry");
        assert_eq!(after, before);
        assert_eq!(
            page_of(&store, "r", HistoryQuery::Latest { limit: 3 }).await,
            (vec![5, 6, 7], true, 7)
        );
    }

    /// Readers running while messages are stored and their entries written see, in each
    /// page, consecutive seqs up to the page's `last_seq`, which never goes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_see_whole_history_while_entries_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store_with_room(dir.path(), "r", &["a"]).await);
        let done = Arc::new(AtomicBool::new(false));
        // Readers that have read a page: the writes may all be done before a reader is first
        // scheduled on a busy machine, and every reader must read at least once.
        let reading = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (store, done) = (Arc::clone(&store), Arc::clone(&done));
                let reading = Arc::clone(&reading);
                tokio::spawn(async move {
                    let mut seen = 0;
                    let mut pages = 0;
                    while !done.load(Ordering::Relaxed) {
                        let query = HistoryQuery::Latest { limit: 12 };
                        let (seqs, _, last) = page_of(&store, "r", query).await;
                        assert!(last >= seen, "last_seq went back from {seen} to {last}");
                        let from = last.saturating_sub(11).max(1);
                        assert_eq!(seqs, (from..=last).collect::<Vec<_>>());
                        seen = last;
                        pages += 1;
                        if pages == 1 {
                            reading.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    pages
                })
            })
            .collect();
        let mut last = 0;
        for size in (1..=5).cycle().take(200) {
            let batch = (last + 1..=last + size)
                .map(|seq| message("r", "a", &format!("m{seq}"), None))
                .collect();
            store.append(batch).await.unwrap();
            last += size;
        }
        // (A reader that failed before its first page is found below, not waited for.)
        while reading.load(Ordering::Relaxed) < 3 && !readers.iter().any(|r| r.is_finished()) {
            tokio::task::yield_now().await;
        }
        done.store(true, Ordering::Relaxed);
        for reader in readers {
            assert!(reader.await.unwrap() > 0);
        }
    }

    /// The checkpointer copies the WAL into the database file only once the WAL has grown
    /// (each copy of everything has the next commit sync a new WAL header), and then does.
    #[tokio::test]
    async fn a_small_wal_is_left_alone_by_the_checkpointer() {
        /// Messages in the database file alone, without its WAL (a copy of the file).
        fn checkpointed_messages(dir: &Path) -> i64 {
            let copy = tempfile::tempdir().unwrap();
            std::fs::copy(dir.join("confab.db"), copy.path().join("confab.db")).unwrap();
            Connection::open(copy.path().join("confab.db"))
                .unwrap()
                .query_row("SELECT count(*) FROM messages", [], |row| row.get(0))
                .unwrap()
        }
        let dir = tempfile::tempdir().unwrap();
        // Closed once, so that the migrations' frames are out of the WAL.
        SqliteStore::open(dir.path(), SqliteSync::Normal)
            .unwrap()
            .close();
        // Passes from 32 frames on.
        let store = SqliteStore::open_with(dir.path(), SqliteSync::Normal, 128).unwrap();
        store.create_room(&room("r"), &["a".into()]).await.unwrap();
        for n in 0..3 {
            let batch = vec![message("r", "a", "hi", Some(&format!("c{n}")))];
            store.append(batch).await.unwrap().pop().unwrap().unwrap();
        }
        tokio::time::sleep(CHECKPOINT_EVERY * 3).await;
        assert_eq!(
            checkpointed_messages(dir.path()),
            0,
            "a few frames stay in the WAL"
        );
        for n in 3..30 {
            let batch = vec![message("r", "a", &"x".repeat(300), Some(&format!("c{n}")))];
            store.append(batch).await.unwrap().pop().unwrap().unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while checkpointed_messages(dir.path()) != 30 {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was never copied"
            );
            tokio::time::sleep(CHECKPOINT_EVERY).await;
        }
        store.close();
    }

    /// A store whose WAL is rewound from 64 frames on, with 20 rooms that "a" is a member of.
    async fn store_with_small_wal(dir: &Path) -> (SqliteStore, Vec<String>) {
        let store = SqliteStore::open_with(dir, SqliteSync::Normal, 64).unwrap();
        let rooms: Vec<String> = (0..20).map(|n| format!("r{n}")).collect();
        for id in &rooms {
            store.create_room(&room(id), &["a".into()]).await.unwrap();
        }
        (store, rooms)
    }

    /// Commits round `n` of messages: one of ~300 bytes to each room, in one append.
    async fn append_round(store: &SqliteStore, rooms: &[String], n: u64) {
        let batch = rooms
            .iter()
            .map(|id| message(id, "a", &"x".repeat(200), Some(&format!("{id}-{n}"))))
            .collect();
        for result in store.append(batch).await.unwrap() {
            result.unwrap();
        }
    }

    /// What the writer and the checkpointer share about `store`'s WAL.
    fn wal_state(store: &SqliteStore) -> Arc<WalState> {
        let writer = store
            .in_place
            .lock()
            .unwrap()
            .clone()
            .expect("commits in place");
        Arc::clone(&writer.lock().unwrap().restarts.wal)
    }

    /// Under a steady stream of commits the WAL is rewound instead of growing with every one.
    #[tokio::test]
    async fn the_wal_is_rewound_under_steady_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rooms) = store_with_small_wal(dir.path()).await;
        let mut largest = 0;
        for n in 0..300 {
            append_round(&store, &rooms, n).await;
            let wal = std::fs::metadata(dir.path().join("confab.db-wal")).unwrap();
            largest = largest.max(wal.len());
        }
        // 300 commits of 20 rows of ~300 bytes write some 15,000 frames (up to ~60 each);
        // rewound, the WAL holds twice the threshold plus the commits made while the
        // checkpointer's thread waited for a CPU: a few hundred frames on an idle machine,
        // up to 4,600 seen while two builds kept both cores busy. Half of what it grows to
        // without rewinding.
        let frame = 4096 + 24;
        assert!(largest < 7_500 * frame, "the WAL grew to {largest} bytes");
        for id in &rooms {
            assert_eq!(last_seq(&store, id).await, 300);
        }
        // After each rewind the checkpointer has the kernel read the WAL back in for the writer.
        let wal = wal_state(&store);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while wal.prefetched.load(Ordering::Relaxed) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no rewound WAL was prefetched"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Once its passes have caught up with the writer, the checkpointer rewinds the WAL itself,
    /// between two commits, and every message committed around the rewinds is kept.
    #[tokio::test]
    async fn the_checkpointer_rewinds_the_wal_between_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rooms) = store_with_small_wal(dir.path()).await;
        let wal = wal_state(&store);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut commits = 0;
        while wal.rewound_between_commits.load(Ordering::Relaxed) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the checkpointer did not rewind the WAL"
            );
            append_round(&store, &rooms, commits).await;
            commits += 1;
            // Leaves the checkpointer's thread room to run between commits.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for id in &rooms {
            assert_eq!(last_seq(&store, id).await, commits);
        }
        store.close();
        let reopened = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        for id in &rooms {
            assert_eq!(last_seq(&reopened, id).await, commits);
        }
    }

    /// A database created by the first schema keeps its messages, seqs, members and retries'
    /// originals through every later migration (history as a rowid table, then filed under
    /// integer room keys with rebuilt rooms: foreign keys must not cascade into members; then
    /// indexed in `room_index`, then in runs).
    #[tokio::test]
    async fn migrations_keep_history_members_and_seqs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("confab.db")).unwrap();
            conn.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO rooms (id, name, last_seq, created_at) VALUES ('r', 'r', 2, 0);
                 INSERT INTO users (id, name, created_at) VALUES ('a', 'Ann', 0);
                 INSERT INTO members (room_id, user_id, read_seq, joined_at) VALUES ('r', 'a', 1, 0);
                 INSERT INTO rooms (id, name, private, dm, dm_users, created_at)
                     VALUES ('dm', 'dm', 1, 1, '[\"a\",\"b\"]', 0);
                 INSERT INTO members (room_id, user_id, joined_at) VALUES ('dm', 'b', 0);
                 INSERT INTO messages VALUES ('r', 2, 'm2', 'a', 'A', 'two', NULL, 20);
                 INSERT INTO messages VALUES ('r', 1, 'm1', 'a', 'A', 'one', 'c1', 10);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        assert_eq!(last_seq(&store, "r").await, 2);
        assert_eq!(store.membership("r", "a").await.unwrap(), Some(1));
        assert_eq!(store.membership("dm", "b").await.unwrap(), Some(0));
        let ann = RoomMember {
            user: UserRef {
                id: "a".into(),
                name: "Ann".into(),
            },
            read_seq: 1,
        };
        assert_eq!(store.members("r").await.unwrap(), vec![ann]);
        let dm = RoomRecord {
            id: "dm".into(),
            name: "dm".into(),
            private: true,
            owner: None,
            dm: true,
        };
        assert_eq!(store.open_dm_room(&dm, "b", "a").await.unwrap(), dm);
        let page = store
            .history("r", HistoryQuery::Latest { limit: 10 })
            .await
            .unwrap();
        let rows: Vec<_> = page
            .messages
            .iter()
            .map(|m| (m.seq, m.id.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(rows, vec![(1, "m1", "one"), (2, "m2", "two")]);
        let results = store
            .append(vec![
                message("r", "a", "one again", Some("c1")),
                message("r", "a", "three", Some("c3")),
            ])
            .await
            .unwrap();
        let first = results[0].as_ref().unwrap();
        assert_eq!((first.message.id.as_str(), first.duplicate), ("m1", true));
        assert_eq!(results[1].as_ref().unwrap().message.seq, 3);
        // The migrated history is in the (room, seq) index as a run of seqs 1 and 2, which
        // refuses a second run ending at 2; the legacy table is gone.
        let conn = Connection::open(dir.path().join("confab.db")).unwrap();
        let clash = conn.execute(
            "INSERT INTO room_index_runs VALUES ((SELECT key FROM rooms WHERE id = 'r'), 2, 2, x'00')",
            [],
        );
        assert!(clash.is_err());
        let legacy: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'room_index'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(legacy, 0);
    }

    /// The writer thread and the threads that have run a read are `SCHED_BATCH` (see
    /// `wake_without_preempting`). Other tests' stores have such threads too, and some may not
    /// have started yet: ours, which have answered, must be among those that are.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn sqlite_threads_do_not_preempt_their_wakers() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        store.ensure_user(&user("a")).await.unwrap();
        store.room("general").await.unwrap().unwrap();
        // The writer, and tokio's blocking threads (where reads run).
        for thread in ["confab-sqlite-w", "tokio-rt-worker"] {
            assert!(
                thread_policies(thread).contains(&libc::SCHED_BATCH),
                "{thread}: {:?}",
                thread_policies(thread)
            );
        }
    }

    /// The scheduling policies of this process's threads named `name` (cut to 15 bytes).
    #[cfg(target_os = "linux")]
    fn thread_policies(name: &str) -> Vec<i32> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let path = task.ok()?.path();
                let comm = std::fs::read_to_string(path.join("comm")).ok()?;
                if comm.trim_end() != name {
                    return None;
                }
                // The policy is field 41 of stat(5), the 39th after the command name.
                let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                stat.rsplit_once(") ")?.1.split(' ').nth(38)?.parse().ok()
            })
            .collect()
    }

    /// Member lists come by name from the index, follow renames, and list a member added by
    /// id once their user exists.
    #[tokio::test]
    async fn member_lists_follow_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        let named = |id: &str, name: &str| UserRef {
            id: id.into(),
            name: name.into(),
        };
        store.ensure_user(&named("b", "zed")).await.unwrap();
        store.ensure_user(&named("c", "amy")).await.unwrap();
        store
            .create_room(&room("r"), &["a".into(), "b".into(), "c".into()])
            .await
            .unwrap();
        let names = async |limit: u32| -> Vec<String> {
            store
                .join_snapshot("r", "c", HistoryQuery::Latest { limit: 1 }, limit)
                .await
                .unwrap()
                .members
                .into_iter()
                .map(|m| m.user.name)
                .collect()
        };
        // "a" has no user yet: counted, not listed.
        assert_eq!(names(50).await, vec!["amy", "zed"]);
        let snapshot = store
            .join_snapshot("r", "c", HistoryQuery::Latest { limit: 1 }, 50)
            .await
            .unwrap();
        assert_eq!(snapshot.member_count, 3);
        store.ensure_user(&named("a", "mid")).await.unwrap();
        assert_eq!(names(50).await, vec!["amy", "mid", "zed"]);
        store.ensure_user(&named("b", "adam")).await.unwrap();
        assert_eq!(names(50).await, vec!["adam", "amy", "mid"]);
        assert_eq!(names(2).await, vec!["adam", "amy"]);
    }

    #[tokio::test]
    async fn data_survives_reopen_and_read_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
            store.ensure_user(&user("a")).await.unwrap();
            store.create_room(&room("r"), &["a".into()]).await.unwrap();
            store
                .append(vec![message("r", "a", "x", None)])
                .await
                .unwrap();
            // Clamped to the newest message, and never moved back.
            assert_eq!(store.set_read("r", "a", 5).await.unwrap(), 1);
            store
                .append(vec![
                    message("r", "a", "y", None),
                    message("r", "a", "z", None),
                ])
                .await
                .unwrap();
            assert_eq!(store.set_read("r", "a", 5).await.unwrap(), 3);
            assert_eq!(store.set_read("r", "a", 2).await.unwrap(), 3);
            store.close();
            assert!(matches!(
                store.add_member("r", "b").await,
                Err(StoreError::Closed)
            ));
        }
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        assert_eq!(store.membership("r", "a").await.unwrap(), Some(3));
        let (_, membership) = store.room_and_membership("r", "a").await.unwrap().unwrap();
        assert_eq!((last_seq(&store, "r").await, membership), (3, Some(3)));
        assert_eq!(
            store
                .room_and_membership("r", "b")
                .await
                .unwrap()
                .unwrap()
                .1,
            None
        );
        assert!(
            store
                .room_and_membership("nope", "a")
                .await
                .unwrap()
                .is_none()
        );
        let snapshot = store
            .join_snapshot("r", "a", HistoryQuery::Latest { limit: 2 }, 50)
            .await
            .unwrap();
        assert_eq!(snapshot.read_seq, Some(3));
        assert_eq!(
            snapshot
                .page
                .messages
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(
            snapshot.members,
            vec![RoomMember {
                user: user("a"),
                read_seq: snapshot.read_seq.unwrap(),
            }]
        );
        assert_eq!(snapshot.member_count, 1);
        assert_eq!(last_seq(&store, "r").await, 3);
        let listing = store.rooms_for("a").await.unwrap();
        let ids: Vec<_> = listing.iter().map(|l| l.room.id.as_str()).collect();
        assert_eq!(ids, vec!["general", "r"], "the built-in room and ours");
        assert_eq!(listing[1].read_seq, Some(3));
        assert_eq!(listing[0].read_seq, None);
    }

    #[tokio::test]
    async fn accounts_are_unique_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteSync::Normal).unwrap();
        store.create_account(&user("a"), "hash").await.unwrap();
        let mut clash = user("b");
        clash.name = "name-a".into();
        assert!(matches!(
            store.create_account(&clash, "hash").await,
            Err(StoreError::Conflict(_))
        ));
        let (found, hash) = store.account("name-a").await.unwrap().unwrap();
        assert_eq!((found.id.as_str(), hash.as_str()), ("a", "hash"));
        assert_eq!(store.user_by_name("name-a").await.unwrap().unwrap().id, "a");
    }
}
