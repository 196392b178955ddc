//! Durable state: users, rooms, memberships with read positions, and message history.
//!
//! [`Store`] is the seam between the chat logic and a database. The embedded default is
//! [`SqliteStore`]: one writer thread that commits whatever has queued up in a single
//! transaction (group commit), and a small pool of reader connections. A PostgreSQL store for
//! multi-node deployments implements the same trait.
//!
//! Invariants every implementation keeps:
//! - a room's `seq` starts at 1 and has no gaps, even across crashes (seq assignment and the
//!   insert commit together);
//! - `append` returns only after the batch is durably committed;
//! - `(user, client_id)` is unique: appending a known pair returns the original message with
//!   `duplicate = true` and stores nothing.

mod backlog;
mod chunked_insert;
mod held_statements;
mod key_run;
mod packing;
mod retry_keys;
mod room_index;
mod sqlite;

pub use sqlite::SqliteStore;

use std::sync::Arc;

use async_trait::async_trait;
use confab_proto::{ChatMessage, UserRef};

/// Whether the store's limits (groups written at, the tail cache's size, ...) are scaled down
/// so that unit tests reach them with a few rows. The store's benchmark under callgrind
/// (`append_w2_shaped`) needs the real ones, or it measures a store that flushes and starts
/// over every few messages: it is built with `RUSTFLAGS='--cfg confab_production_limits'`.
const SCALED_FOR_TESTS: bool = cfg!(all(test, not(confab_production_limits)));

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A unique name is taken.
    #[error("{0}")]
    Conflict(String),
    /// The row the operation needs does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(String),
    /// The user is not a member of the room.
    #[error("{0}")]
    NotMember(String),
    /// Another process holds the database: the store takes it for itself (see
    /// `SqliteStore::open`), so a second server, or `confab user add`, beside a running one
    /// is told so at once.
    #[error(
        "{0} is in use by another process; stop the confab server using it first \
         (a running server creates accounts with POST /api/register)"
    )]
    InUse(String),
    /// The store has been shut down.
    #[error("store is closed")]
    Closed,
}

/// A room as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    /// Room id (the name, or `dm:<a>:<b>`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Joinable by members only.
    pub private: bool,
    /// Creator's user id, if a user created it.
    pub owner: Option<String>,
    /// Direct-message room.
    pub dm: bool,
}

impl RoomRecord {
    /// The wire form of the room.
    pub fn info(&self) -> confab_proto::RoomInfo {
        confab_proto::RoomInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            private: self.private,
            owner: self.owner.clone(),
            dm: self.dm,
        }
    }
}

/// A room in a user's list: the room, its newest seq, whether they are a member, and their
/// read position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomListing {
    /// The room.
    pub room: RoomRecord,
    /// Seq of the newest message, 0 when empty (what unread counts are reckoned from).
    pub last_seq: u64,
    /// `Some(read_seq)` if the user is a member.
    pub read_seq: Option<u64>,
}

/// A message on its way into the store; the store assigns `seq`.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Pre-generated id (UUIDv7).
    pub id: String,
    /// Target room.
    pub room: String,
    /// Author, shared with the session that sent it.
    pub user: Arc<UserRef>,
    /// Text.
    pub content: String,
    /// Idempotency key.
    pub client_id: Option<String>,
    /// Server receive time, milliseconds since the epoch.
    pub timestamp_ms: i64,
}

/// The outcome of appending one message.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The stored message (the original one for a duplicate).
    pub message: ChatMessage,
    /// True if `(user, client_id)` was already stored and nothing new was written.
    pub duplicate: bool,
}

/// Which slice of history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The newest `limit` messages.
    Latest {
        /// Page size.
        limit: u32,
    },
    /// The newest `limit` messages with a seq below `before`.
    Before {
        /// Exclusive upper bound.
        before: u64,
        /// Page size.
        limit: u32,
    },
    /// The oldest `limit` messages with a seq above `after` (and below `before`, if given).
    After {
        /// Exclusive lower bound.
        after: u64,
        /// Optional exclusive upper bound.
        before: Option<u64>,
        /// Page size.
        limit: u32,
    },
}

/// A page of history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// Messages, oldest first.
    pub messages: Vec<ChatMessage>,
    /// More messages exist beyond the page in the direction asked.
    pub has_more: bool,
    /// The room's newest seq when the page was read.
    pub last_seq: u64,
}

/// Durable state behind the chat logic. Methods are grouped by table, in create-read-update-
/// delete order.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a password account; `Conflict` if the name is taken by another account.
    async fn create_account(&self, user: &UserRef, password_hash: &str) -> Result<(), StoreError>;
    /// Records a token user on first sight, or refreshes their display name.
    async fn ensure_user(&self, user: &UserRef) -> Result<(), StoreError>;
    /// The account and password hash for a login name.
    async fn account(&self, name: &str) -> Result<Option<(UserRef, String)>, StoreError>;
    /// A user by display name (accounts first, then token users).
    async fn user_by_name(&self, name: &str) -> Result<Option<UserRef>, StoreError>;

    /// Creates a room and makes `members` its members; `Conflict` if the id exists.
    async fn create_room(&self, room: &RoomRecord, members: &[String]) -> Result<(), StoreError>;
    /// Gets or creates the direct-message room `room` of users `a` and `b` and makes both of
    /// them members. `Conflict` if a room with that id exists but belongs to other users.
    async fn open_dm_room(
        &self,
        room: &RoomRecord,
        a: &str,
        b: &str,
    ) -> Result<RoomRecord, StoreError>;
    /// A room by id.
    async fn room(&self, id: &str) -> Result<Option<RoomRecord>, StoreError>;
    /// Public rooms plus every room the user is a member of.
    async fn rooms_for(&self, user_id: &str) -> Result<Vec<RoomListing>, StoreError>;
    /// Deletes a room with its members and messages.
    async fn delete_room(&self, id: &str) -> Result<(), StoreError>;

    /// Makes a user a member; returns false if they already were.
    async fn add_member(&self, room: &str, user_id: &str) -> Result<bool, StoreError>;
    /// `Some(read_seq)` if the user is a member of the room.
    async fn membership(&self, room: &str, user_id: &str) -> Result<Option<u64>, StoreError>;
    /// The room and the user's membership in it, read together (one round trip for the
    /// common "may this user enter" question).
    async fn room_and_membership(
        &self,
        room: &str,
        user_id: &str,
    ) -> Result<Option<(RoomRecord, Option<u64>)>, StoreError>;
    /// Every member of a room with their read position, sorted by name then id.
    async fn members(&self, room: &str) -> Result<Vec<RoomMember>, StoreError>;
    /// For each user, in the order given, the ids of every room they are a member of. Batched
    /// so that a burst of presence changes (thousands of clients connecting) costs one store
    /// round trip, not one each.
    async fn rooms_of_users(&self, user_ids: Vec<String>) -> Result<Vec<Vec<String>>, StoreError>;
    /// Moves the user's read position forward (never back); returns the stored position.
    async fn set_read(&self, room: &str, user_id: &str, seq: u64) -> Result<u64, StoreError>;
    /// Ends a membership; returns false if there was none.
    async fn remove_member(&self, room: &str, user_id: &str) -> Result<bool, StoreError>;

    /// Stores a batch in one commit, assigning seqs in order. The outer error fails the whole
    /// batch (nothing committed); inner errors fail single messages: `NotFound` if the room is
    /// gone, `NotMember` if the author is not a member (checked here, in the same transaction,
    /// so no leave or delete can slip between the check and the insert).
    async fn append(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError>;
    /// A page of a room's history.
    async fn history(&self, room: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError>;
    /// Everything a `joined` reply needs, from one consistent snapshot: the user's membership,
    /// a page of history, the first `members_limit` members by name and the member count.
    async fn join_snapshot(
        &self,
        room: &str,
        user_id: &str,
        query: HistoryQuery,
        members_limit: u32,
    ) -> Result<JoinSnapshot, StoreError>;
}

/// What a `join` reads in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinSnapshot {
    /// `Some(read_seq)` if the user is (still) a member.
    pub read_seq: Option<u64>,
    /// The history page asked for.
    pub page: HistoryPage,
    /// The first members by name (at most the limit asked for).
    pub members: Vec<RoomMember>,
    /// How many members the room has.
    pub member_count: u64,
}

/// A member as stored: who, and how far they have read (for read receipts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomMember {
    /// The member.
    pub user: UserRef,
    /// Their read position in the room.
    pub read_seq: u64,
}

/// RFC 3339 UTC with milliseconds, the protocol's timestamp format.
///
/// Every stored message and every history row goes through here, so the date is worked out
/// with integer arithmetic and the digits written straight into a fixed buffer: `time`'s
/// general formatter cost over 3,000 instructions a call, and its date conversion alone
/// (through 128-bit nanoseconds) about 1,000, a twelfth of storing a message.
pub fn format_timestamp(ms: i64) -> String {
    const EPOCH: &str = "1970-01-01T00:00:00.000Z";
    const MS_PER_DAY: i64 = 86_400_000;
    let (year, month, day) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    // The wire format has four digits for the year.
    let Some(year) = u16::try_from(year).ok().filter(|&year| year <= 9999) else {
        return EPOCH.to_string();
    };
    // Below a day's milliseconds, so every field fits a u16.
    let in_day = ms.rem_euclid(MS_PER_DAY);
    let field = |value: i64| u16::try_from(value).unwrap_or(0);
    let mut text = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    put_digits(&mut text[11..13], field(in_day / 3_600_000));
    put_digits(&mut text[14..16], field(in_day / 60_000 % 60));
    put_digits(&mut text[17..19], field(in_day / 1_000 % 60));
    put_digits(&mut text[20..23], field(in_day % 1_000));
    String::from_utf8(text.to_vec()).unwrap_or_else(|_| EPOCH.to_string())
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01: Howard
/// Hinnant's `civil_from_days`, which counts in 400-year eras starting on 1 March, so that
/// the leap day falls at the end of a year.
fn civil_from_days(days: i64) -> (i64, u16, u16) {
    let shifted = days + 719_468; // days since 0000-03-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097); // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11], 0 is March
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1; // [1, 31]
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both are small and positive by construction.
    (
        year,
        u16::try_from(month).unwrap_or(1),
        u16::try_from(day).unwrap_or(1),
    )
}

/// Writes `value`'s last `out.len()` decimal digits into `out`, zero-padded.
fn put_digits(out: &mut [u8], mut value: u16) {
    for digit in out.iter_mut().rev() {
        // `value % 10` is below 10, so the cast keeps it whole.
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_milliseconds() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_timestamp(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        // Before 1970 or past year 9999 (the wire format has four digits), the epoch.
        assert_eq!(format_timestamp(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_timestamp(i64::MAX), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_timestamp(i64::MIN), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_timestamp(-62_167_219_200_000),
            "0000-01-01T00:00:00.000Z"
        );
        assert_eq!(
            format_timestamp(-62_167_219_200_001),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            format_timestamp(253_402_300_799_999),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(
            format_timestamp(253_402_300_800_000),
            "1970-01-01T00:00:00.000Z"
        );
    }

    /// The hand-written date and digits agree with `time`'s own RFC 3339 formatter everywhere
    /// in the years the format can carry (leap days, century years, month ends and millisecond
    /// edges included).
    #[test]
    fn timestamps_agree_with_the_time_crate() {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        // From year 0 to year 9999.
        let mut ms: i64 = -62_167_219_200_000;
        while ms < 253_402_300_799_999 {
            let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap();
            assert_eq!(format_timestamp(ms), at.format(&format).unwrap(), "{ms}");
            // A step that is not a whole number of seconds or days walks every field.
            ms += 86_399_937 * 7;
        }
    }
}
