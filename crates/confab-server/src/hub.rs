//! Local bookkeeping of who is subscribed where, and fan-out of pre-encoded frames.
//!
//! Rooms live in `SHARDS` independently locked maps (by room-name hash), so no lock is shared
//! by all rooms. Each room keeps its subscriber list as an immutable `Arc<[..]>` that is replaced
//! on subscribe/unsubscribe (copy-on-write): fan-out holds the shard lock only long enough to
//! clone that `Arc`, then pushes to every queue with no lock held.
//!
//! The hub also counts each user's sessions per room, which is what turns many devices into one
//! `user_joined` (first session in) and one `user_left` (last session out, or gone past the
//! presence grace period after a disconnect), and holds those notices back for company while
//! a room fills up or empties fast (see [`NoticeLinger`]).

use std::hash::BuildHasher;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use foldhash::fast::RandomState;
use foldhash::{HashMap, HashMapExt};
use tungstenite::Utf8Bytes;

use crate::outbound::{Outbound, Priority, SessionHandle, SessionId, UserKey, clock32, ms_since};

/// Number of independently locked room maps.
const SHARDS: usize = 64;

/// Identifies one disconnect, so a grace period that ends after the user came back (and
/// perhaps left again) is told apart from the current one. Never 0, which keeps an
/// `Option<DepartureId>` 8 bytes in every room's user entry and in presence.
pub type DepartureId = NonZeroU64;

/// How a session stopped being subscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// It sent `leave` (or lost membership): if it was the user's last session, `user_left` now.
    Leave,
    /// Its connection dropped: if it was the user's last session, `user_left` only if no session
    /// of theirs re-joins within the grace period. The value identifies this departure.
    Disconnect(DepartureId),
    /// Its join failed after subscribing: put things back as [`Subscribed`] found them, with
    /// no notice either way.
    Undo(Option<DepartureId>),
}

/// What [`Hub::subscribe`] did.
#[derive(Debug, Clone)]
pub struct Subscribed {
    /// The interned room name.
    pub room: Arc<str>,
    /// Others should be told `user_joined` (the user's first session, not a quick return).
    pub announce: bool,
    /// False if the session was already subscribed (nothing changed).
    pub fresh: bool,
    /// The pending disconnect this subscribe cancelled, for [`Departure::Undo`].
    pub cancelled_departure: Option<DepartureId>,
}

#[derive(Debug)]
struct UserInRoom {
    /// Sessions of this user subscribed to the room.
    sessions: u32,
    /// Set while the user has no session here but may still come back (disconnect grace).
    departing: Option<DepartureId>,
}

#[derive(Debug, Default)]
struct Room {
    /// Current subscribers; replaced, never mutated, so fan-out can work on a snapshot.
    subscribers: Arc<[Arc<SessionHandle>]>,
    /// Per-user session counts.
    users: HashMap<UserKey, UserInRoom>,
    /// `user_joined`/`user_left` waiting for company.
    notices: HeldNotices,
}

/// Most notices a room holds back at once; the next one sends them all. Bounds one write to
/// a member (two slices a notice), however large the room and fast the storm.
const MAX_HELD_NOTICES: usize = 256;

/// A room's notices waiting for company (see [`NoticeLinger`]).
#[derive(Debug, Default)]
struct HeldNotices {
    /// When the room's last notice was published ([`clock32`]): one after a quiet spell goes
    /// at once.
    last_ms: Option<u32>,
    /// The notices waiting, in order, each with the session it must not reach (the one whose
    /// arrival it announces).
    frames: Vec<(Utf8Bytes, Option<SessionId>)>,
    /// Sessions that subscribed while notices were waiting, with how many were waiting then:
    /// they get only the ones after, as they would have had the notices gone at once.
    late: Vec<(SessionId, usize)>,
}

impl HeldNotices {
    /// Whether a notice published now waits: it follows the room's previous one within
    /// `linger_ms`, or others wait already.
    fn must_wait(&mut self, now_ms: u64, linger_ms: u64) -> bool {
        let now = clock32(now_ms);
        let quiet = self
            .last_ms
            .is_none_or(|last| ms_since(now, last) >= linger_ms);
        self.last_ms = Some(now);
        !quiet || !self.frames.is_empty()
    }

    /// Takes what waits, if anything.
    fn take(&mut self) -> Option<Released> {
        if self.frames.is_empty() {
            return None;
        }
        Some(Released {
            frames: std::mem::take(&mut self.frames),
            late: std::mem::take(&mut self.late),
        })
    }
}

/// Notices let go together, for [`fan_out_notices`].
#[derive(Debug)]
struct Released {
    frames: Vec<(Utf8Bytes, Option<SessionId>)>,
    late: Vec<(SessionId, usize)>,
}

/// Where rooms' notices wait for company, and the task that lets them go.
///
/// A notice (`user_joined`, `user_left`) that follows the room's previous one within the linger
/// waits in the room for the ones after it; when the linger ends they all go to each member
/// in one write. A room filling up (a reconnect storm, a class logging in) then costs each
/// member a write per linger instead of one per arrival, and a lone join or leave in a quiet
/// room goes at once. Held in the room, not in each member's queue: a storm's notices cost
/// memory once, not once per member, and the members' tasks are not woken for them (the
/// release writes straight to each socket, as fan-out does). Anything else published to the
/// room first lets its waiting notices go, so nothing overtakes them. One sweep for the node
/// rather than a timer per room.
#[derive(Debug)]
pub struct NoticeLinger {
    /// How long a notice may wait; zero sends every notice at once.
    linger: std::time::Duration,
    /// Rooms with notices waiting, in the order they began to.
    waiting: Mutex<Vec<Arc<str>>>,
    /// Raised when `waiting` stops being empty: the sweep starts its linger.
    started: tokio::sync::Notify,
}

impl NoticeLinger {
    fn new(linger: std::time::Duration) -> NoticeLinger {
        NoticeLinger {
            linger,
            waiting: Mutex::new(Vec::new()),
            started: tokio::sync::Notify::new(),
        }
    }

    fn is_on(&self) -> bool {
        !self.linger.is_zero()
    }

    fn linger_ms(&self) -> u64 {
        u64::try_from(self.linger.as_millis()).unwrap_or(u64::MAX)
    }

    /// Has the sweep let `room`'s notices go when the current linger ends.
    fn enlist(&self, room: Arc<str>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let first = waiting.is_empty();
        waiting.push(room);
        drop(waiting);
        if first {
            self.started.notify_one();
        }
    }
}

/// One shard of rooms, keyed by the interned room name.
type RoomMap = HashMap<Arc<str>, Room>;

/// Rooms and their local subscribers.
#[derive(Debug)]
pub struct Hub {
    shards: Box<[Mutex<RoomMap>]>,
    hasher: RandomState,
    next_departure: AtomicU64,
    /// Where [`Priority::Notice`] frames wait for company.
    notices: NoticeLinger,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    /// An empty hub that sends notices at once.
    pub fn new() -> Hub {
        Hub::with_notice_linger(std::time::Duration::ZERO)
    }

    /// An empty hub whose notices may wait up to `linger` for company (see [`NoticeLinger`]);
    /// its [`Hub::run_notices`] must then be run.
    pub fn with_notice_linger(linger: std::time::Duration) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::default(),
            next_departure: AtomicU64::new(1),
            notices: NoticeLinger::new(linger),
        }
    }

    /// The sweep that lets waiting notices go (see [`NoticeLinger`]), until `shutdown`: the
    /// node runs it on its task tracker. At shutdown it lets everything still waiting go at
    /// once, for the sessions to write before they close.
    pub async fn run_notices(&self, shutdown: tokio_util::sync::CancellationToken) {
        let mut due = Vec::new();
        loop {
            let stopping = tokio::select! {
                () = self.notices.started.notified() => {
                    tokio::select! {
                        () = tokio::time::sleep(self.notices.linger) => false,
                        () = shutdown.cancelled() => true,
                    }
                }
                () = shutdown.cancelled() => true,
            };
            std::mem::swap(
                &mut due,
                &mut *self
                    .notices
                    .waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            for room in due.drain(..) {
                self.release_notices(&room);
            }
            if stopping {
                return;
            }
        }
    }

    /// Lets a room's waiting notices go now.
    fn release_notices(&self, room: &str) {
        let (subscribers, released) = {
            let mut shard = self.shard(room);
            let Some(entry) = shard.get_mut(room) else {
                return;
            };
            let Some(released) = entry.notices.take() else {
                return;
            };
            (Arc::clone(&entry.subscribers), released)
        };
        fan_out_notices(&subscribers, released);
    }

    // A std mutex: every critical section below is a few map operations and never awaits.
    fn shard(&self, room: &str) -> MutexGuard<'_, RoomMap> {
        let index = (self.hasher.hash_one(room) as usize) % SHARDS;
        self.shards[index].lock().expect("hub shard lock poisoned")
    }

    /// A fresh id for a [`Departure::Disconnect`].
    pub fn next_departure_id(&self) -> DepartureId {
        // Counts up from 1; a u64 does not wrap in the life of a process.
        DepartureId::new(self.next_departure.fetch_add(1, Ordering::Relaxed))
            .expect("departure ids start at 1")
    }

    /// Adds a session to a room.
    pub fn subscribe(&self, room: &str, handle: &Arc<SessionHandle>) -> Subscribed {
        let mut shard = self.shard(room);
        let key = match shard.get_key_value(room) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(room),
        };
        let entry = shard.entry(Arc::clone(&key)).or_default();
        if entry.subscribers.iter().any(|s| s.id == handle.id) {
            return Subscribed {
                room: key,
                announce: false,
                fresh: false,
                cancelled_departure: None,
            };
        }
        let mut subscribers = entry.subscribers.to_vec();
        subscribers.push(Arc::clone(handle));
        entry.subscribers = subscribers.into();
        if !entry.notices.frames.is_empty() {
            let waiting = entry.notices.frames.len();
            entry.notices.late.push((handle.id, waiting));
        }
        let user = entry
            .users
            .entry(UserKey(Arc::clone(&handle.user)))
            .or_insert(UserInRoom {
                sessions: 0,
                departing: None,
            });
        let announce = user.sessions == 0 && user.departing.is_none();
        user.sessions += 1;
        Subscribed {
            room: key,
            announce,
            fresh: true,
            cancelled_departure: user.departing.take(),
        }
    }

    /// Removes a session from a room. Returns true if others should be told `user_left` now.
    pub fn unsubscribe(
        &self,
        room: &str,
        session: SessionId,
        user_id: &str,
        how: Departure,
    ) -> bool {
        let mut shard = self.shard(room);
        let Some(entry) = shard.get_mut(room) else {
            return false;
        };
        let before = entry.subscribers.len();
        let subscribers: Vec<_> = entry
            .subscribers
            .iter()
            .filter(|s| s.id != session)
            .cloned()
            .collect();
        if subscribers.len() == before {
            return false;
        }
        entry.subscribers = subscribers.into();
        let mut announce = false;
        if let Some(user) = entry.users.get_mut(user_id) {
            user.sessions = user.sessions.saturating_sub(1);
            if user.sessions == 0 {
                match how {
                    Departure::Leave => {
                        entry.users.remove(user_id);
                        announce = true;
                    }
                    Departure::Disconnect(id) => user.departing = Some(id),
                    Departure::Undo(Some(id)) => user.departing = Some(id),
                    Departure::Undo(None) => {
                        entry.users.remove(user_id);
                    }
                }
            }
        }
        Self::drop_if_empty(&mut shard, room);
        announce
    }

    /// Called when a disconnect's grace period ends. Returns true if the user never came back to
    /// the room and others should now be told `user_left`.
    pub fn departure_expired(&self, room: &str, user_id: &str, departure: DepartureId) -> bool {
        let mut shard = self.shard(room);
        let Some(entry) = shard.get_mut(room) else {
            return false;
        };
        let expired = entry
            .users
            .get(user_id)
            .is_some_and(|u| u.sessions == 0 && u.departing == Some(departure));
        if expired {
            entry.users.remove(user_id);
            Self::drop_if_empty(&mut shard, room);
        }
        expired
    }

    fn drop_if_empty(shard: &mut RoomMap, room: &str) {
        if shard
            .get(room)
            .is_some_and(|r| r.subscribers.is_empty() && r.users.is_empty())
        {
            shard.remove(room);
        }
    }

    /// Whether the user has a session subscribed to the room.
    fn has_sessions(&self, room: &str, user_id: &str) -> bool {
        self.shard(room)
            .get(room)
            .and_then(|r| r.users.get(user_id))
            .is_some_and(|u| u.sessions > 0)
    }

    /// Who to tell about a user's new status, as a snapshot of each room's subscribers, given
    /// the rooms the user belongs to. For a user who just came online, rooms they already have a
    /// session in are left out: `user_joined` told those, with the status.
    pub fn presence_audience(
        &self,
        rooms: &[String],
        user_id: &str,
        came_online: bool,
    ) -> Vec<Arc<[Arc<SessionHandle>]>> {
        rooms
            .iter()
            .filter(|room| !(came_online && self.has_sessions(room, user_id)))
            .map(|room| self.subscribers(room))
            .filter(|subscribers| !subscribers.is_empty())
            .collect()
    }

    /// A snapshot of a room's subscribers (empty if none).
    pub fn subscribers(&self, room: &str) -> Arc<[Arc<SessionHandle>]> {
        self.shard(room)
            .get(room)
            .map(|r| Arc::clone(&r.subscribers))
            .unwrap_or_else(|| Arc::new([]))
    }

    /// Pushes one encoded frame to every subscriber of `room` except `except`. A
    /// [`Priority::Notice`] may wait in the room for company instead (see [`NoticeLinger`]);
    /// anything else lets the room's waiting notices go first.
    pub fn deliver(
        &self,
        room: &str,
        item: &Outbound,
        priority: Priority,
        except: Option<SessionId>,
    ) {
        let (subscribers, released, held) = {
            let mut shard = self.shard(room);
            let Some(entry) = shard.get_mut(room) else {
                return;
            };
            let mut held = false;
            if priority == Priority::Notice
                && self.notices.is_on()
                && let Outbound::Event(frame) = item
                && entry
                    .notices
                    .must_wait(crate::heartbeat::now_ms(), self.notices.linger_ms())
            {
                entry.notices.frames.push((frame.clone(), except));
                held = true;
                let waiting = entry.notices.frames.len();
                if waiting < MAX_HELD_NOTICES {
                    // The first to wait has the sweep come for the room, under the hub's
                    // interned name.
                    let room = (waiting == 1)
                        .then(|| shard.get_key_value(room).map(|(key, _)| Arc::clone(key)))
                        .flatten();
                    drop(shard);
                    if let Some(room) = room {
                        self.notices.enlist(room);
                    }
                    return;
                }
                // As many as one write should carry: they all go now, this one with them.
            }
            (Arc::clone(&entry.subscribers), entry.notices.take(), held)
        };
        if let Some(released) = released {
            fan_out_notices(&subscribers, released);
        }
        if held {
            return;
        }
        for (at, subscriber) in subscribers.iter().enumerate() {
            // Each push's first reads of its handle were cache misses (4-5 % of W1's server
            // CPU): the kernel's work for one socket evicts the next handle. Asking for the
            // lines a push reads (the handle's hot fields come first) one push ahead
            // hides that.
            if let Some(next) = subscribers.get(at + 1) {
                let hot = Arc::as_ptr(next).cast::<u8>();
                for line in 0..3 {
                    prefetch(hot.wrapping_add(line * 64));
                }
                // And the snapshot's next line of handles, evicted the same way.
                prefetch(subscribers.as_ptr().wrapping_add(at + 9));
            }
            if Some(subscriber.id) != except {
                subscriber.push(item, priority);
            }
        }
    }

    /// Forgets a room entirely (it was deleted) and returns who was subscribed.
    pub fn remove_room(&self, room: &str) -> Vec<Arc<SessionHandle>> {
        self.shard(room)
            .remove(room)
            .map(|r| r.subscribers.to_vec())
            .unwrap_or_default()
    }

    /// The sessions of one user subscribed to a room.
    pub fn sessions_of(&self, room: &str, user_id: &str) -> Vec<Arc<SessionHandle>> {
        self.subscribers(room)
            .iter()
            .filter(|s| s.user.id == user_id)
            .cloned()
            .collect()
    }
}

/// Writes notices let go together to a room's subscribers: one push of all of them to each
/// (one write), shared by every subscriber that gets them all. A session gets only those
/// published after it subscribed, and not the one announcing its own arrival.
fn fan_out_notices(subscribers: &[Arc<SessionHandle>], released: Released) {
    let Released { frames, late } = released;
    let all = match frames.as_slice() {
        [(one, _)] => Outbound::Event(one.clone()),
        _ => Outbound::Events(frames.iter().map(|(frame, _)| frame.clone()).collect()),
    };
    // The few sessions that get less than all of them.
    let mut partial: Vec<SessionId> = frames
        .iter()
        .filter_map(|(_, except)| *except)
        .chain(late.iter().map(|&(id, _)| id))
        .collect();
    partial.sort_unstable();
    partial.dedup();
    for subscriber in subscribers {
        if partial.binary_search(&subscriber.id).is_err() {
            subscriber.push(&all, Priority::Notice);
            continue;
        }
        // Subscribed again since: what was waiting by the last time counts.
        let from = late
            .iter()
            .rev()
            .find(|&&(id, _)| id == subscriber.id)
            .map_or(0, |&(_, from)| from);
        let own: Vec<Utf8Bytes> = frames[from..]
            .iter()
            .filter(|(_, except)| *except != Some(subscriber.id))
            .map(|(frame, _)| frame.clone())
            .collect();
        match own.as_slice() {
            [] => {}
            [one] => {
                subscriber.push(&Outbound::Event(one.clone()), Priority::Notice);
            }
            _ => {
                subscriber.push(&Outbound::Events(own.into()), Priority::Notice);
            }
        }
    }
}

/// Asks the CPU to bring the cache line at `value` in; a hint, nothing else happens.
#[inline]
#[allow(unsafe_code)]
fn prefetch<T>(value: *const T) {
    // SAFETY: a prefetch never faults and changes no memory, whatever the address; SSE, which
    // it needs, is part of every x86_64 CPU.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(value.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_proto::UserRef;

    fn session(id: SessionId, user: &str) -> Arc<SessionHandle> {
        with_queue(id, user).0
    }

    /// A session of `user` (no socket: what is pushed to it queues), with its queue.
    fn with_queue(
        id: SessionId,
        user: &str,
    ) -> (Arc<SessionHandle>, crate::outbound::OutboundReceiver) {
        SessionHandle::new(
            id,
            UserRef {
                id: user.into(),
                name: user.into(),
            },
            16,
        )
    }

    #[test]
    fn first_session_in_and_last_out_are_announced_once() {
        let hub = Hub::new();
        let (phone, laptop) = (session(1, "ann"), session(2, "ann"));
        assert!(hub.subscribe("r", &phone).announce);
        assert!(!hub.subscribe("r", &laptop).announce);
        assert!(
            !hub.subscribe("r", &laptop).fresh,
            "re-subscribing is a no-op"
        );
        assert_eq!(hub.subscribers("r").len(), 2);
        assert!(hub.has_sessions("r", "ann"));
        assert!(!hub.unsubscribe("r", 1, "ann", Departure::Leave));
        assert!(hub.has_sessions("r", "ann"));
        assert!(hub.unsubscribe("r", 2, "ann", Departure::Leave));
        assert!(!hub.has_sessions("r", "ann"));
        assert!(hub.subscribers("r").is_empty());
        assert!(!hub.unsubscribe("r", 2, "ann", Departure::Leave));
    }

    #[test]
    fn a_user_coming_online_is_not_announced_where_user_joined_told_it() {
        let hub = Hub::new();
        let (ann, bob) = (session(1, "ann"), session(2, "bob"));
        hub.subscribe("r", &ann);
        hub.subscribe("q", &ann);
        hub.subscribe("r", &bob);
        let rooms = ["r".to_string(), "q".to_string(), "empty".to_string()];
        let ids = |audience: Vec<Arc<[Arc<SessionHandle>]>>| -> Vec<Vec<SessionId>> {
            audience
                .iter()
                .map(|room| room.iter().map(|s| s.id).collect())
                .collect()
        };
        // Bob came online and is already in r: only q hears it from presence.
        assert_eq!(ids(hub.presence_audience(&rooms, "bob", true)), [vec![1]]);
        // Any other change of his goes to every room he belongs to.
        assert_eq!(
            ids(hub.presence_audience(&rooms, "bob", false)),
            [vec![1, 2], vec![1]]
        );
    }

    #[test]
    fn quick_reconnect_is_silent_and_late_one_is_announced() {
        let hub = Hub::new();
        let first = session(1, "ann");
        hub.subscribe("r", &first);
        let departure = hub.next_departure_id();
        assert!(!hub.unsubscribe("r", 1, "ann", Departure::Disconnect(departure)));
        // Back within the grace period: no user_joined, and the old departure is void.
        let back = hub.subscribe("r", &session(2, "ann"));
        assert!(!back.announce);
        assert_eq!(back.cancelled_departure, Some(departure));
        assert!(!hub.departure_expired("r", "ann", departure));
        // Gone for good this time.
        let departure = hub.next_departure_id();
        hub.unsubscribe("r", 2, "ann", Departure::Disconnect(departure));
        assert!(hub.departure_expired("r", "ann", departure));
        assert!(hub.subscribe("r", &session(3, "ann")).announce);
    }

    #[test]
    fn a_failed_join_restores_the_pending_departure() {
        let hub = Hub::new();
        hub.subscribe("r", &session(1, "ann"));
        let departure = hub.next_departure_id();
        hub.unsubscribe("r", 1, "ann", Departure::Disconnect(departure));
        let attempt = hub.subscribe("r", &session(2, "ann"));
        hub.unsubscribe("r", 2, "ann", Departure::Undo(attempt.cancelled_departure));
        assert!(
            hub.departure_expired("r", "ann", departure),
            "user_left still due"
        );
        // Undoing a first join leaves no trace.
        let first = hub.subscribe("q", &session(3, "bob"));
        assert!(!hub.unsubscribe("q", 3, "bob", Departure::Undo(first.cancelled_departure)));
        assert!(hub.subscribe("q", &session(4, "bob")).announce);
    }

    #[test]
    fn deliver_skips_the_excluded_session() {
        let hub = Hub::new();
        let (a, mut a_rx) = with_queue(1, "a");
        let (b, mut b_rx) = with_queue(2, "b");
        hub.subscribe("r", &a);
        hub.subscribe("r", &b);
        let item = Outbound::Event(tungstenite::Utf8Bytes::from_static("x"));
        hub.deliver("r", &item, Priority::Reliable, Some(1));
        assert!(a_rx.try_recv().is_none());
        assert!(b_rx.try_recv().is_some());
    }

    /// What a session has been sent so far (queued: test sessions have no socket), one entry
    /// per write, each as its frames' texts.
    fn writes(rx: &mut crate::outbound::OutboundReceiver) -> Vec<Vec<String>> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|item| match item {
                Outbound::Event(frame) => vec![frame.to_string()],
                Outbound::Events(frames) => frames.iter().map(|f| f.to_string()).collect(),
                Outbound::Chat(chat) => vec![format!("chat {}", chat.room())],
                other => vec![format!("{other:?}")],
            })
            .collect()
    }

    fn notice(text: &'static str) -> Outbound {
        Outbound::Event(tungstenite::Utf8Bytes::from_static(text))
    }

    fn member(id: SessionId) -> (Arc<SessionHandle>, crate::outbound::OutboundReceiver) {
        with_queue(id, &format!("u{id}"))
    }

    /// Runs a hub's sweep until the returned token is cancelled; the handle says when it
    /// has finished.
    fn sweep(
        hub: &Arc<Hub>,
    ) -> (
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let hub = Arc::clone(hub);
            let stop = stop.clone();
            async move { hub.run_notices(stop).await }
        });
        (stop, task)
    }

    /// A notice in a quiet room goes at once; the ones that follow within the linger wait in
    /// the room and reach each member together, in one write, when the linger ends. A member
    /// hears only of what was published after it subscribed, and never of its own arrival.
    #[tokio::test]
    async fn a_room_filling_up_holds_its_notices_and_lets_them_go_together() {
        let hub = Arc::new(Hub::with_notice_linger(std::time::Duration::from_millis(
            40,
        )));
        let (stop, _) = sweep(&hub);
        let (a, mut a_rx) = member(1);
        hub.subscribe("r", &a);
        let (b, mut b_rx) = member(2);
        hub.subscribe("r", &b);
        hub.deliver("r", &notice("b joined"), Priority::Notice, Some(2));
        assert_eq!(writes(&mut a_rx), [["b joined"]], "the first goes at once");
        let (c, mut c_rx) = member(3);
        hub.subscribe("r", &c);
        hub.deliver("r", &notice("c joined"), Priority::Notice, Some(3));
        let (d, mut d_rx) = member(4);
        hub.subscribe("r", &d);
        hub.deliver("r", &notice("d joined"), Priority::Notice, Some(4));
        assert!(writes(&mut a_rx).is_empty(), "the next ones wait");
        assert!(writes(&mut b_rx).is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        assert_eq!(writes(&mut a_rx), [["c joined", "d joined"]]);
        assert_eq!(writes(&mut b_rx), [["c joined", "d joined"]]);
        assert_eq!(
            writes(&mut c_rx),
            [["d joined"]],
            "not its own, not from before it"
        );
        assert!(writes(&mut d_rx).is_empty());
        stop.cancel();
    }

    /// Shutting down lets what still waits go at once, for the sessions to write before they
    /// close.
    #[tokio::test]
    async fn shutdown_lets_waiting_notices_go() {
        let hub = Arc::new(Hub::with_notice_linger(std::time::Duration::from_secs(60)));
        let (stop, sweep) = sweep(&hub);
        let (a, mut a_rx) = member(1);
        hub.subscribe("r", &a);
        hub.deliver("r", &notice("x joined"), Priority::Notice, None);
        hub.deliver("r", &notice("y joined"), Priority::Notice, None);
        assert_eq!(writes(&mut a_rx), [["x joined"]]);
        tokio::task::yield_now().await;
        stop.cancel();
        sweep.await.unwrap();
        assert_eq!(writes(&mut a_rx), [["y joined"]]);
    }

    /// Anything else published to a room lets its waiting notices go first: a newcomer's
    /// first message never reaches a member before its `user_joined`.
    #[test]
    fn nothing_published_to_the_room_overtakes_its_waiting_notices() {
        let hub = Hub::with_notice_linger(std::time::Duration::from_secs(60));
        let (a, mut a_rx) = member(1);
        hub.subscribe("r", &a);
        hub.deliver("r", &notice("x joined"), Priority::Notice, None);
        hub.deliver("r", &notice("y joined"), Priority::Notice, None);
        hub.deliver("r", &notice("z joined"), Priority::Notice, None);
        assert_eq!(writes(&mut a_rx), [["x joined"]]);
        hub.deliver("r", &notice("z says hi"), Priority::Reliable, None);
        assert_eq!(
            writes(&mut a_rx),
            [vec!["y joined", "z joined"], vec!["z says hi"]]
        );
        // Other rooms' notices wait on their own.
        hub.subscribe("q", &a);
        hub.deliver("q", &notice("q1"), Priority::Notice, None);
        hub.deliver("q", &notice("q2"), Priority::Notice, None);
        hub.deliver("r", &notice("r1"), Priority::Reliable, None);
        assert_eq!(writes(&mut a_rx), [["q1"], ["r1"]]);
    }

    /// However fast a storm, a room holds at most [`MAX_HELD_NOTICES`]: the one that fills it
    /// sends them all, in order, in one write.
    #[test]
    fn a_room_holds_a_bounded_number_of_notices() {
        let hub = Hub::with_notice_linger(std::time::Duration::from_secs(60));
        let (a, mut a_rx) = member(1);
        hub.subscribe("r", &a);
        let texts: Vec<String> = (0..=MAX_HELD_NOTICES).map(|i| format!("n{i}")).collect();
        for text in &texts {
            let frame = tungstenite::Utf8Bytes::from(text.clone());
            hub.deliver("r", &Outbound::Event(frame), Priority::Notice, None);
        }
        let written = writes(&mut a_rx);
        assert_eq!(written.len(), 2);
        assert_eq!(written[0], texts[..1]);
        assert_eq!(written[1], texts[1..]);
    }

    /// With no linger every notice goes at once.
    #[test]
    fn without_a_linger_notices_go_at_once() {
        let hub = Hub::new();
        let (a, mut a_rx) = member(1);
        hub.subscribe("r", &a);
        hub.deliver("r", &notice("x joined"), Priority::Notice, None);
        hub.deliver("r", &notice("y joined"), Priority::Notice, None);
        assert_eq!(writes(&mut a_rx), [["x joined"], ["y joined"]]);
    }
}
