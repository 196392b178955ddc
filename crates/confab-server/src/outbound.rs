//! A session's outbound side: the handle the rest of the server uses to reach a connection.
//!
//! Fan-out writes straight into the socket when it can. [`SessionHandle::push`] takes the
//! session's outlet lock and, if nothing is queued ahead and no write is unfinished, writes the
//! shared pre-encoded frames at once with one non-blocking `send`: no queue entry, no task
//! wake-up, no poll, which is what a delivery costs above the kernel's own work. Only when the
//! socket is not ready (or the session's task is writing) is the frame queued, and the task
//! writes it later. A write the socket took only in part leaves its remainder first in line,
//! so frames are never interleaved or reordered.
//!
//! The queue is bounded, and what overflow means depends on the frame's class:
//! - droppable frames (typing, presence) are refused once the queue is three quarters full, so
//!   they never take the room that chat messages need;
//! - every other frame that finds the queue full marks the session *slow*. Its task then closes
//!   the socket with 1013; the client re-joins with `since` and gets everything it missed from
//!   the store. Nothing is dropped silently and nobody else waits.
//!
//! The outlet also keeps, per subscribed room, the highest seq written to the socket. Chat
//! frames at or below it are skipped, wherever they are written from: that is what makes a
//! join's history and the live stream meet without gaps or duplicates. A room still being
//! joined has no mark yet, and its live frames wait in the queue until the `joined` reply
//! (with the history and the mark) has been written.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use confab_proto::{ChatMessage, Ref, ServerEvent, UserRef};
use futures_util::task::AtomicWaker;
use smallvec::SmallVec;
use tokio::net::TcpStream;
use tungstenite::Utf8Bytes;

use crate::heartbeat::{self, Signal};
use crate::send_ring;
use crate::websocket::{self, Frame, Written, try_send_framed, try_write};

/// Process-unique id of one WebSocket connection.
pub type SessionId = u64;

/// The messages one commit stored for one room, encoded once, in seq order, shared by every
/// subscriber.
///
/// Their frames lie back to back in one buffer, so whatever a subscriber still lacks of a batch
/// (all of it, but right after a join or a resume) is one contiguous span: one `send(2)` per
/// subscriber per commit however many messages the commit holds, with nothing gathered per
/// subscriber. A burst (hundreds of messages committed together) is one write (or one queue
/// slot) per subscriber, not hundreds, so a healthy reader is never mistaken for a slow one.
#[derive(Debug)]
pub struct ChatBatch {
    /// Room the messages belong to (the session filters by it).
    room: Arc<str>,
    /// Every message's `message` event as a complete WebSocket text frame, in seq order.
    frames: Bytes,
    /// Each message's seq and where its frame starts in `frames`, ascending. Sessions skip
    /// anything at or below what they already delivered, which is what makes a join's history
    /// and the live stream meet without gaps or duplicates.
    starts: SmallVec<[(u64, usize); 1]>,
}

impl ChatBatch {
    /// The room the messages belong to.
    pub fn room(&self) -> &Arc<str> {
        &self.room
    }

    /// The messages' seqs, ascending.
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.starts.iter().map(|&(seq, _)| seq)
    }

    /// For a subscriber that has delivered up to `delivered`: where the frames of the messages
    /// above it start, and the newest seq among them; `None` if it has them all.
    fn unsent(&self, delivered: u64) -> Option<(usize, u64)> {
        let first = self.starts.partition_point(|&(seq, _)| seq <= delivered);
        let &(_, start) = self.starts.get(first)?;
        let &(newest, _) = self.starts.last()?;
        Some((start, newest))
    }
}

/// A [`ChatBatch`] being filled by the committer, one stored message at a time.
#[derive(Debug)]
pub struct ChatBatchBuilder {
    room: Arc<str>,
    frames: Vec<u8>,
    starts: SmallVec<[(u64, usize); 1]>,
}

impl ChatBatchBuilder {
    /// An empty batch for `room`.
    pub fn new(room: Arc<str>) -> ChatBatchBuilder {
        ChatBatchBuilder {
            room,
            frames: Vec::new(),
            starts: SmallVec::new(),
        }
    }

    /// The room the batch is for.
    pub fn room(&self) -> &Arc<str> {
        &self.room
    }

    /// How many messages the batch holds: several mean the room's messages come faster than
    /// they fan out (see the committer's linger).
    pub fn message_count(&self) -> usize {
        self.starts.len()
    }

    /// Adds a stored message, whose seq must be above every one already added.
    pub fn push(&mut self, message: &ChatMessage) {
        self.push_event(message.seq, |out| {
            confab_proto::write_message_event(out, message)
        });
    }

    /// Adds the frame of `write`'s event as message `seq`'s.
    fn push_event(&mut self, seq: u64, write: impl FnOnce(&mut Vec<u8>)) {
        /// Room for a typical chat message's frame without growing the buffer.
        const TYPICAL_FRAME: usize = 512;
        debug_assert!(
            self.starts.last().is_none_or(|&(last, _)| last < seq),
            "a batch's seqs ascend"
        );
        self.starts.push((seq, self.frames.len()));
        self.frames.reserve(TYPICAL_FRAME);
        crate::websocket::append_text_frame(&mut self.frames, write);
    }

    /// The batch, ready to be shared by every subscriber.
    pub fn finish(self) -> ChatBatch {
        ChatBatch {
            room: self.room,
            frames: Bytes::from(self.frames),
            starts: self.starts,
        }
    }
}

/// One thing to send to a session.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Chat messages (never dropped).
    Chat(Arc<ChatBatch>),
    /// Any other encoded event.
    Event(Utf8Bytes),
    /// Several events for this session alone (e.g. the acks of one commit), in order.
    Events(Arc<[Utf8Bytes]>),
    /// A WebSocket ping from the node's heartbeat.
    Ping,
    /// The session lost its subscription to a room (membership ended or room deleted): it
    /// forgets the room and tells its client with a `left` event. Always handled by the
    /// session's task, which also updates the hub.
    Left(Arc<str>),
}

/// Whether a frame may be dropped under pressure, or wait for company.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Must be delivered or the session closed (chat, acks, joins, reads).
    Reliable,
    /// Reliable, and may wait up to the hub's notice linger to share a write with the room's
    /// notices after it (`user_joined`, `user_left`): a room filling up (a reconnect storm, a
    /// class logging in) would otherwise cost every member one `send(2)` per arrival, most of
    /// a join's CPU. Only [`crate::hub::Hub::deliver`] holds such frames back (see
    /// [`crate::hub::NoticeLinger`]); a session treats them as [`Priority::Reliable`] ones.
    Notice,
    /// May be dropped when the queue is filling up (typing, presence).
    Droppable,
}

/// Frames of one write, on the stack: a write is usually one to a few frames.
type Frames = SmallVec<[Frame; 16]>;

/// The shared half of a session: what the hub, the committer and presence hold.
///
/// `repr(C)` with what every delivery reads first: the slow flag, then the outlet's lock and
/// its hot fields, so a push touches two or three cache lines of a handle that fan-out over
/// thousands of sessions has usually evicted.
#[derive(Debug)]
#[repr(C)]
pub struct SessionHandle {
    /// Set when a reliable frame did not fit: the session must close with 1013. A flag, not a
    /// cancellation token: every push reads it, and a token's check takes a lock.
    slow: AtomicBool,
    /// [`Signal`] bits raised by the node (heartbeat timeout, shutdown) for the task to act on.
    signals: AtomicU8,
    /// Droppable frames refused so far (for metrics and tests). Here, in what would be the
    /// flags' padding: each field of the handle counts once per connection.
    dropped: AtomicU32,
    /// Everything about writing to this connection, under one lock: pushers and the session's
    /// task take turns, so frames go out whole and in order.
    outlet: Mutex<Outlet>,
    /// Wakes the session task when something was queued (or the session became slow).
    ready: AtomicWaker,
    /// Most entries the queue holds; droppable frames are refused once a quarter of it is
    /// left.
    capacity: u32,
    /// When the peer was last heard from ([`clock32`]): the timeout counts from here.
    heard_ms: AtomicU32,
    /// When the node's heartbeat last pinged this session (or when it started), [`clock32`].
    pinged_ms: AtomicU32,
    /// This connection's id.
    pub id: SessionId,
    /// Who is connected. Shared: presence and the hub key their entries by it (see
    /// [`UserKey`]) instead of keeping copies of the id and name per connection.
    pub user: Arc<UserRef>,
}

/// A map key that is a user's id, held through the session's shared [`UserRef`] rather than as
/// a copy of the string. Hashes and compares as the id, so maps keyed by it are looked up with
/// a `&str`. Only the id of a key is ever read: a user who comes back under a new name keeps
/// the key made from the old one.
#[derive(Debug, Clone)]
pub struct UserKey(pub Arc<UserRef>);

impl std::hash::Hash for UserKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.id.as_str().hash(state);
    }
}

impl PartialEq for UserKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for UserKey {}

impl std::borrow::Borrow<str> for UserKey {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}

/// The writing state of one connection. `repr(C)`: the fields a delivery reads come first
/// (see [`SessionHandle`]).
#[derive(Debug, Default)]
#[repr(C)]
struct Outlet {
    /// Where direct writes go: set once the session's first frame (`connected`) is out, unset
    /// once its close frame is.
    socket: Option<Attached>,
    /// The task is waiting for the socket to take the rest of a write.
    writing: bool,
    /// A write failed: the connection is broken and its task will end.
    broken: bool,
    /// Set once the session task is gone or has sent its close frame: nothing more is queued.
    closed: bool,
    /// A direct write is in this thread's [`send_ring::SendBatch`], not yet made: anything
    /// pushed meanwhile queues behind it, and the task waits for its result.
    in_flight: bool,
    /// Acks kept back by [`SessionHandle::hold`] while their commit fans out: they go out in
    /// the same write as the next frame (usually the sender's own copy of its message).
    held: Option<Box<Outbound>>,
    /// A direct write the socket took only part of: its frames and the bytes already written.
    /// It goes out before anything else. Boxed: rare, and every session pays for its inline size.
    unfinished: Option<Box<(Vec<Frame>, usize)>>,
    /// Frames waiting for the session's task. A plain deque rather than a channel: it holds
    /// no memory while empty and gives back what a burst made it grow, which matters with
    /// thousands of idle sessions (a channel keeps its 32-slot blocks for good).
    queue: VecDeque<Outbound>,
    /// Subscribed rooms with the highest seq written in each; `None` while a join is reading
    /// the room's history.
    rooms: RoomMarks,
    /// When something was last written to the socket, by the sweep's clock
    /// ([`heartbeat::swept_ms`]): a peer that is sent something anyway needs no ping to know
    /// the connection is alive (see [`SessionHandle::beat`]).
    written_ms: u32,
}

/// The socket an outlet writes to, with its descriptor kept inline: reading it through the
/// `Arc` was a cache miss per delivery (2-3 % of the server's CPU under W1 and W2).
#[derive(Debug)]
struct Attached {
    fd: RawFd,
    /// Owns the descriptor (shared with the session task's reader).
    _owner: Arc<TcpStream>,
}

impl Attached {
    fn new(stream: Arc<TcpStream>) -> Attached {
        Attached {
            fd: stream.as_raw_fd(),
            _owner: stream,
        }
    }

    #[allow(unsafe_code)]
    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `_owner` owns the descriptor, keeps it open as long as `self` lives, and the
        // borrow cannot outlive `self`.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

/// A session's rooms and the highest seq written in each, sorted by name. Looked up on every
/// delivery: kept inline for the usual one room, so fan-out follows no pointer to a map's
/// buckets (a cache miss per subscriber), and binary-searched for sessions in many rooms.
#[derive(Debug, Default)]
struct RoomMarks(SmallVec<[(Arc<str>, Option<u64>); 1]>);

impl RoomMarks {
    fn find(&self, room: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(key, _)| (**key).cmp(room))
    }

    fn get_mut(&mut self, room: &str) -> Option<&mut Option<u64>> {
        // Every delivery asks, and nearly every session is in one room: one comparison.
        let at = match self.0.as_slice() {
            [(key, _)] => (**key == *room).then_some(0)?,
            _ => self.find(room).ok()?,
        };
        Some(&mut self.0[at].1)
    }

    fn get_key_value(&self, room: &str) -> Option<(&Arc<str>, &Option<u64>)> {
        let (key, mark) = &self.0[self.find(room).ok()?];
        Some((key, mark))
    }

    fn contains_key(&self, room: &str) -> bool {
        self.find(room).is_ok()
    }

    /// Sets a room's mark, keyed by `room` from now on.
    fn insert(&mut self, room: Arc<str>, mark: Option<u64>) {
        match self.find(&room) {
            Ok(at) => self.0[at] = (room, mark),
            Err(at) => self.0.insert(at, (room, mark)),
        }
    }

    fn remove_entry(&mut self, room: &str) -> Option<(Arc<str>, Option<u64>)> {
        let at = self.find(room).ok()?;
        Some(self.0.remove(at))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn into_keys(self) -> impl Iterator<Item = Arc<str>> {
        self.0.into_iter().map(|(key, _)| key)
    }
}

/// The low 32 bits of a [`heartbeat::now_ms`] reading, as sessions keep them: two full
/// readings would cost every connection 8 bytes more, and the heartbeat only ever needs
/// differences of seconds to minutes (see [`ms_since`]).
pub(crate) fn clock32(now_ms: u64) -> u32 {
    // Truncation intended: the clock wraps every 49.7 days and `ms_since` allows for it.
    now_ms as u32
}

/// Milliseconds from `then` to `now`, both [`clock32`] readings: right across the clock's
/// wrap, and 0 for a `then` a little after `now` (a peer heard while the heartbeat was
/// sweeping with an older `now`).
pub(crate) fn ms_since(now: u32, then: u32) -> u64 {
    let elapsed = now.wrapping_sub(then);
    if elapsed > u32::MAX / 2 {
        0
    } else {
        u64::from(elapsed)
    }
}

/// What a direct write did with a frame.
enum Direct {
    /// Written, or nothing to write (already delivered, or for a room left since).
    Done,
    /// Written in part: the rest is [`Outlet::unfinished`], for the task.
    Unfinished,
    /// Not written: queue it.
    Queue,
}

impl Outlet {
    /// Whether a frame may go straight to the socket: nothing is ahead of it.
    fn is_open_for_direct_writes(&self) -> bool {
        self.socket.is_some()
            && self.queue.is_empty()
            && self.unfinished.is_none()
            && !self.writing
            && !self.in_flight
            && !self.broken
    }

    /// Writes `held` (if any) and `item` to the socket in one go without waiting, if they can
    /// be: now, or when the thread's open [`send_ring::SendBatch`] closes (`Done` then, the
    /// outlet in flight until the batch applies the result). `Queue` means neither was written.
    fn write_direct(
        &mut self,
        handle: &Arc<SessionHandle>,
        held: Option<&Outbound>,
        item: &Outbound,
    ) -> Direct {
        if held.is_none()
            && let Outbound::Chat(chat) = item
        {
            return self.write_chat(handle, chat);
        }
        let mut frames = Frames::new();
        if let Some(held) = held {
            event_frames(held, &mut frames);
        }
        // The room's mark, to move once the frames are (at least partly) written.
        let mut mark = None;
        match item {
            Outbound::Chat(chat) => match self.rooms.get_mut(&chat.room) {
                // Not subscribed (any more): nothing of it to write, as the task would do.
                None => {}
                // Joining: it waits for the `joined` reply and the room's mark.
                Some(None) => return Direct::Queue,
                Some(Some(delivered)) => {
                    let newest = chat_frames(chat, *delivered, &mut frames);
                    mark = Some((delivered, newest));
                }
            },
            Outbound::Event(_) | Outbound::Events(_) | Outbound::Ping => {
                event_frames(item, &mut frames);
            }
            Outbound::Left(_) => return Direct::Queue,
        }
        if frames.is_empty() {
            return Direct::Done;
        }
        let socket = self.socket.as_ref().expect("checked by the caller");
        if send_ring::defer(handle, socket.fd, || websocket::wire_bytes(&frames)) {
            self.in_flight = true;
            if let Some((delivered, newest)) = mark {
                *delivered = newest;
            }
            return Direct::Done;
        }
        let sent = try_write(socket.fd(), &frames, 0);
        let parts = WrittenParts {
            unfinished: &mut self.unfinished,
            broken: &mut self.broken,
            written_ms: &mut self.written_ms,
        };
        let Some(outcome) = direct_outcome(sent, parts, || frames.into_vec()) else {
            return Direct::Queue;
        };
        if let Some((delivered, newest)) = mark {
            *delivered = newest;
        }
        outcome
    }

    /// [`Outlet::write_direct`] of a chat batch with nothing held, the usual delivery: the
    /// frames the session lacks (all of the batch, as a rule) go to the socket as they lie in
    /// the shared buffer, in one `send(2)`, with no list of frames built for them, however
    /// many messages the commit stored.
    fn write_chat(&mut self, handle: &Arc<SessionHandle>, chat: &ChatBatch) -> Direct {
        let (delivered, start, newest) = match self.rooms.get_mut(&chat.room) {
            // Not subscribed (any more): nothing to write.
            None => return Direct::Done,
            // Joining: it waits for the `joined` reply and the room's mark.
            Some(None) => return Direct::Queue,
            Some(Some(delivered)) => match chat.unsent(*delivered) {
                // Already delivered: nothing to write.
                None => return Direct::Done,
                Some((start, newest)) => (delivered, start, newest),
            },
        };
        let socket = self.socket.as_ref().expect("checked by the caller");
        if send_ring::defer(handle, socket.fd, || chat.frames.slice(start..)) {
            self.in_flight = true;
            *delivered = newest;
            return Direct::Done;
        }
        let sent = try_send_framed(socket.fd(), &chat.frames[start..]);
        let parts = WrittenParts {
            unfinished: &mut self.unfinished,
            broken: &mut self.broken,
            written_ms: &mut self.written_ms,
        };
        let Some(outcome) = direct_outcome(sent, parts, || {
            vec![Frame::Framed(chat.frames.slice(start..))]
        }) else {
            return Direct::Queue;
        };
        *delivered = newest;
        outcome
    }

    /// Appends a queue entry's frames to `frames`, skipping chat already delivered. Returns the
    /// room of a `Left` that still applied.
    fn frames_of(&mut self, item: Outbound, frames: &mut Frames) -> Option<Arc<str>> {
        match item {
            Outbound::Chat(chat) => {
                // Skip rooms left since; a room still joining cannot be here (the task is
                // the one flushing, and it is not in the middle of a join).
                if let Some(Some(delivered)) = self.rooms.get_mut(&chat.room) {
                    *delivered = chat_frames(&chat, *delivered, frames);
                }
                None
            }
            Outbound::Event(_) | Outbound::Events(_) | Outbound::Ping => {
                event_frames(&item, frames);
                None
            }
            Outbound::Left(room) => {
                let (room, _) = self.rooms.remove_entry(&room)?;
                frames.push(Frame::Text(encode(&ServerEvent::Left {
                    reference: None,
                    room: room.to_string(),
                })));
                Some(room)
            }
        }
    }
}

/// What a direct write's result means for its outlet: written in full, or in part (the
/// write's frames, made by `frames`, and the bytes sent are left `unfinished` for the task),
/// or `None` when
/// nothing was written (the socket was full, or the write failed and the connection is
/// `broken`: the task's next write fails the same way and ends the session).
fn direct_outcome(
    sent: std::io::Result<Written>,
    outlet: WrittenParts<'_>,
    frames: impl FnOnce() -> Vec<Frame>,
) -> Option<Direct> {
    match sent {
        Ok(Written::All) => {
            *outlet.written_ms = heartbeat::swept_ms();
            Some(Direct::Done)
        }
        Ok(Written::Partly(0)) => None,
        Ok(Written::Partly(written)) => {
            *outlet.written_ms = heartbeat::swept_ms();
            *outlet.unfinished = Some(Box::new((frames(), written)));
            Some(Direct::Unfinished)
        }
        Err(_) => {
            *outlet.broken = true;
            None
        }
    }
}

/// The parts of an [`Outlet`] a direct write's outcome changes, borrowed apart from the rest
/// (the write's frames may still borrow the outlet's rooms).
struct WrittenParts<'a> {
    unfinished: &'a mut Option<Box<(Vec<Frame>, usize)>>,
    broken: &'a mut bool,
    written_ms: &'a mut u32,
}

/// Appends the frames of a chat batch's messages above `delivered` (one span of its shared
/// buffer); returns the newest seq among them (`delivered` if none).
fn chat_frames(chat: &ChatBatch, delivered: u64, frames: &mut Frames) -> u64 {
    match chat.unsent(delivered) {
        Some((start, newest)) => {
            frames.push(Frame::Framed(chat.frames.slice(start..)));
            newest
        }
        None => delivered,
    }
}

/// Appends the frames of an `Event` or `Events` entry.
fn event_frames(item: &Outbound, frames: &mut Frames) {
    match item {
        Outbound::Event(frame) => frames.push(Frame::Text(frame.clone())),
        Outbound::Events(list) => frames.extend(list.iter().cloned().map(Frame::Text)),
        Outbound::Ping => frames.push(Frame::Ping),
        Outbound::Chat(_) | Outbound::Left(_) => debug_assert!(false, "not an event: {item:?}"),
    }
}

impl SessionHandle {
    /// Creates the handle and the receiver its session task drains.
    pub fn new(id: SessionId, user: UserRef, capacity: usize) -> (Arc<Self>, OutboundReceiver) {
        let handle = Arc::new(SessionHandle {
            id,
            user: Arc::new(user),
            outlet: Mutex::new(Outlet::default()),
            ready: AtomicWaker::new(),
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            slow: AtomicBool::new(false),
            signals: AtomicU8::new(0),
            dropped: AtomicU32::new(0),
            heard_ms: AtomicU32::new(clock32(heartbeat::now_ms())),
            pinged_ms: AtomicU32::new(clock32(heartbeat::now_ms())),
        });
        let receiver = OutboundReceiver {
            handle: Arc::clone(&handle),
        };
        (handle, receiver)
    }

    fn outlet(&self) -> MutexGuard<'_, Outlet> {
        // A panic while holding this lock leaves at worst a connection that will fail its
        // next write, not an inconsistent queue.
        self.outlet
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The outlet once no write of it is in a [`send_ring::SendBatch`]: for the session's
    /// task, which must not write to the socket, or let go of it, while a batch on another
    /// worker thread still holds a write for it. A batch's writes are made within its current
    /// submission, so this waits microseconds, and only on a multi-threaded runtime (on a
    /// current-thread one the task cannot run while the batch is open).
    fn settled_outlet(&self) -> MutexGuard<'_, Outlet> {
        loop {
            let outlet = self.outlet();
            if !outlet.in_flight {
                return outlet;
            }
            drop(outlet);
            std::thread::yield_now();
        }
    }

    /// Sends a frame without waiting: straight into the socket if nothing is ahead of it,
    /// otherwise into the queue. Returns false if it was neither (dropped, session slow or
    /// gone). Takes a reference: a fan-out pushes the same item to every subscriber, and only
    /// the ones that queue it need a copy of its `Arc`.
    pub fn push(self: &Arc<Self>, item: &Outbound, priority: Priority) -> bool {
        if self.is_slow() {
            return false;
        }
        send_ring::make_room();
        self.push_locked(self.outlet(), item, priority)
    }

    fn push_locked(
        self: &Arc<Self>,
        mut outlet: MutexGuard<'_, Outlet>,
        item: &Outbound,
        priority: Priority,
    ) -> bool {
        if outlet.closed {
            return false;
        }
        // Held acks were pushed before `item`: they go first, in the same write when they can.
        let held = outlet.held.take();
        if outlet.is_open_for_direct_writes() {
            match outlet.write_direct(self, held.as_deref(), item) {
                Direct::Done => return true,
                Direct::Unfinished => {
                    drop(outlet);
                    self.ready.wake();
                    return true;
                }
                Direct::Queue => {}
            }
        }
        let queued_held = held.is_some();
        if let Some(held) = held {
            // Acks are reliable: queued even past the capacity (by one entry).
            outlet.queue.push_back(*held);
        }
        let capacity = self.capacity as usize;
        let free = capacity.saturating_sub(outlet.queue.len());
        if free == 0 || (priority == Priority::Droppable && free <= capacity / 4) {
            drop(outlet);
            if priority != Priority::Droppable {
                self.slow.store(true, Ordering::Release);
                self.ready.wake();
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if queued_held {
                    self.ready.wake();
                }
            }
            return false;
        }
        outlet.queue.push_back(item.clone());
        drop(outlet);
        self.ready.wake();
        true
    }

    /// Keeps a sender's acks back until [`SessionHandle::release`] or the next push, whichever
    /// comes first. The committer holds each sender's acks while it fans the commit out: the
    /// sender is usually subscribed to the room it wrote to, and its acks then go out in the
    /// same write as its own copy of the messages (one system call instead of two). Only
    /// for a fan-out that does not wait: the acks are late by as long as it takes.
    pub fn hold(self: &Arc<Self>, item: Outbound) -> bool {
        if self.is_slow() {
            return false;
        }
        let mut outlet = self.outlet();
        let holdable = matches!(item, Outbound::Event(_) | Outbound::Events(_));
        if holdable && !outlet.closed && outlet.held.is_none() && outlet.is_open_for_direct_writes()
        {
            outlet.held = Some(Box::new(item));
            return true;
        }
        self.push_locked(outlet, &item, Priority::Reliable)
    }

    /// Sends what [`SessionHandle::hold`] kept back, if no push has taken it along.
    pub fn release(self: &Arc<Self>) {
        send_ring::make_room();
        let mut outlet = self.outlet();
        if let Some(held) = outlet.held.take() {
            self.push_locked(outlet, &held, Priority::Reliable);
        }
    }

    /// Whether a reliable frame found the queue full: the session task wakes up (as for a
    /// push) and closes the connection.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Acquire)
    }

    /// Raises a signal and wakes the session's task to act on it.
    pub(crate) fn raise(&self, signal: Signal) {
        self.signals.fetch_or(signal as u8, Ordering::Release);
        self.ready.wake();
    }

    /// Whether `signal` has been raised.
    pub(crate) fn raised(&self, signal: Signal) -> bool {
        self.signals.load(Ordering::Acquire) & signal as u8 != 0
    }

    /// Notes that the peer was heard from (any frame).
    pub(crate) fn heard(&self) {
        self.heard_ms
            .store(clock32(heartbeat::now_ms()), Ordering::Relaxed);
    }

    /// What the heartbeat owes this session at `now`: a timeout if the peer has been silent
    /// for `timeout_ms`, else a ping every [`SessionHandle::ping_period`].
    fn beat_owed(&self, now: u64, interval_ms: u64, timeout_ms: u64) -> Option<Beat> {
        let now = clock32(now);
        if ms_since(now, self.heard_ms.load(Ordering::Relaxed)) >= timeout_ms {
            Some(Beat::TimedOut)
        } else if ms_since(now, self.pinged_ms.load(Ordering::Relaxed))
            >= self.ping_period(interval_ms)
        {
            Some(Beat::Ping)
        } else {
            None
        }
    }

    /// This session's time between pings: the interval less up to a quarter of it, fixed per
    /// session. Connections that came together (a restart's reconnections, a load test) would
    /// otherwise be pinged together for good, thousands of writes in one sweep that hold up
    /// everything else the node does (W2's p99 at its ping seconds: 18-60 ms, 2-6 ms
    /// elsewhere; BENCHMARKS.md, 2026-12-05).
    fn ping_period(&self, interval_ms: u64) -> u64 {
        let spread = interval_ms / 4 + 1;
        interval_ms - (self.id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % spread
    }

    /// Whether the heartbeat has something to do for this session at `now`.
    pub(crate) fn beat_due(&self, now: u64, interval_ms: u64, timeout_ms: u64) -> bool {
        self.beat_owed(now, interval_ms, timeout_ms).is_some()
    }

    /// The heartbeat's turn, looked at afresh: raises [`Signal::TimedOut`] on a silent peer,
    /// or pings (written straight into the socket when nothing is ahead of it, so an idle
    /// session's task is not woken). A session whose peer was heard from and written to
    /// within its ping period is not pinged: the peer's frames show it is there, ours show
    /// it that we are, and a ping would only cost both sides a write and a read (a busy
    /// node's pings were 1 % of its CPU, in bursts). The write stands for the ping: the next
    /// is due a period after it.
    pub(crate) fn beat(self: &Arc<Self>, now: u64, interval_ms: u64, timeout_ms: u64) {
        match self.beat_owed(now, interval_ms, timeout_ms) {
            Some(Beat::TimedOut) => self.raise(Signal::TimedOut),
            Some(Beat::Ping) => {
                let now = clock32(now);
                if self.is_slow() {
                    // As a refused push: counted as pinged, not looked at again every sweep.
                    self.pinged_ms.store(now, Ordering::Relaxed);
                    return;
                }
                let outlet = self.outlet();
                let period = self.ping_period(interval_ms);
                let written = outlet.written_ms;
                if ms_since(now, written) < period
                    && ms_since(now, self.heard_ms.load(Ordering::Relaxed)) < period
                {
                    self.pinged_ms.store(written, Ordering::Relaxed);
                    return;
                }
                self.pinged_ms.store(now, Ordering::Relaxed);
                self.push_locked(outlet, &Outbound::Ping, Priority::Droppable);
            }
            None => {}
        }
    }

    /// The result of a write a [`send_ring::SendBatch`] made for this outlet, taken as a
    /// direct write's would be: all written; the rest (or, after `EAGAIN`, all of it) left
    /// unfinished for the task, ahead of anything queued meanwhile; or, on an error, the
    /// connection broken, with the write left for the task, whose attempt fails the same way
    /// and ends the session.
    pub(crate) fn deferred_written(&self, bytes: Bytes, result: std::io::Result<usize>) {
        let mut outlet = self.outlet();
        debug_assert!(outlet.in_flight && outlet.unfinished.is_none());
        outlet.in_flight = false;
        let written = match result {
            Ok(written) if written >= bytes.len() => {
                outlet.written_ms = heartbeat::swept_ms();
                None
            }
            Ok(written) => {
                if written > 0 {
                    outlet.written_ms = heartbeat::swept_ms();
                }
                Some(written)
            }
            Err(_) => {
                outlet.broken = true;
                Some(0)
            }
        };
        if let Some(written) = written {
            outlet.unfinished = Some(Box::new((vec![Frame::Framed(bytes)], written)));
        }
        let for_the_task = outlet.unfinished.is_some() || !outlet.queue.is_empty();
        drop(outlet);
        if for_the_task {
            self.ready.wake();
        }
    }

    /// A write a [`send_ring::SendBatch`] may or may not have made (its ring failed before
    /// giving the result): the connection's bytes can no longer be known to be whole and in
    /// order, so it is shut down both ways. The task's read ends, the session closes, and the
    /// client reconnects and resumes from its last seq.
    pub(crate) fn deferred_lost(&self) {
        let mut outlet = self.outlet();
        outlet.in_flight = false;
        outlet.broken = true;
        if let Some(socket) = &outlet.socket {
            let _ = rustix::net::shutdown(socket.fd(), rustix::net::Shutdown::Both);
        }
        drop(outlet);
        self.ready.wake();
    }

    /// Droppable frames refused so far.
    pub fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What the heartbeat owes a session.
enum Beat {
    Ping,
    TimedOut,
}

/// What [`OutboundReceiver::flush`] did.
pub(crate) struct Flushed {
    /// Rooms the session lost (`Left` entries): the caller updates the hub and typing.
    pub left: SmallVec<[Arc<str>; 1]>,
    /// How far the write got.
    pub outcome: FlushOutcome,
}

/// How far a flush's write got.
pub(crate) enum FlushOutcome {
    /// Everything is in the socket buffer.
    Done,
    /// The socket took `written` bytes of `frames`: finish with
    /// [`crate::websocket::finish_write`], then call [`OutboundReceiver::unblock`]. Direct
    /// writes queue up meanwhile.
    Blocked(Vec<Frame>, usize),
    /// The connection is broken.
    Failed,
}

/// The session task's end of its outlet: the only place frames of its own (replies,
/// heartbeats, close) are written from, and where queued entries are drained.
#[derive(Debug)]
pub struct OutboundReceiver {
    handle: Arc<SessionHandle>,
}

impl OutboundReceiver {
    /// Ready when there is something for the task to write (queued entries or the rest of a
    /// direct write) or the session became slow; otherwise `Pending`, with the task registered
    /// to be woken by the next push.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.has_work() {
            return Poll::Ready(());
        }
        self.handle.ready.register(cx.waker());
        // Look again: a push between the first look and the registration woke nobody.
        if self.has_work() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn has_work(&self) -> bool {
        if self.handle.is_slow() || self.handle.signals.load(Ordering::Acquire) != 0 {
            return true;
        }
        let outlet = self.handle.outlet();
        !outlet.writing
            && !outlet.in_flight
            && (!outlet.queue.is_empty() || outlet.unfinished.is_some())
    }

    /// Opens the socket to direct writes once the session's first frame is out: anything
    /// pushed earlier is still queued, so the task writes it first.
    pub(crate) fn attach(&mut self, socket: Arc<TcpStream>) {
        self.handle.outlet().socket = Some(Attached::new(socket));
    }

    /// Writes, in this order and without waiting: the rest of an unfinished direct write,
    /// `first` (the task's own frames), then up to `take` queued entries. `open` gives a room
    /// whose join is being answered by `first` its delivered mark, in the same step, so live
    /// frames of that room written directly from now on come after the `joined` reply. A
    /// close frame in `first` shuts the outlet: nothing is written after it.
    pub(crate) fn flush(
        &mut self,
        socket: &TcpStream,
        first: &[Frame],
        open: Option<(Arc<str>, u64)>,
        take: usize,
    ) -> Flushed {
        let mut outlet = self.handle.settled_outlet();
        let mut frames = Frames::new();
        let mut skip = 0;
        if let Some((rest, written)) = outlet.unfinished.take().map(|unfinished| *unfinished) {
            frames.extend(rest);
            skip = written;
        }
        if let Some(held) = outlet.held.take() {
            event_frames(&held, &mut frames);
        }
        frames.extend(first.iter().cloned());
        if let Some((room, mark)) = open {
            // Keyed from now on by the hub's interned name, which every subscriber of the room
            // shares: fan-out's lookup then compares against one hot allocation, not one per
            // session.
            let before = outlet.rooms.get_mut(&room).and_then(|m| *m).unwrap_or(0);
            outlet.rooms.insert(room, Some(before.max(mark)));
        }
        let mut left = SmallVec::new();
        let taken = outlet.queue.len().min(take);
        for _ in 0..taken {
            let item = outlet.queue.pop_front().expect("counted");
            left.extend(outlet.frames_of(item, &mut frames));
        }
        if outlet.queue.is_empty() && outlet.queue.capacity() > 0 {
            // Most sessions are idle most of the time: an empty queue holds no memory (a few
            // hundred bytes each, times every connection).
            outlet.queue = VecDeque::new();
        }
        if first.iter().any(Frame::is_close) {
            outlet.closed = true;
            outlet.socket = None;
        }
        let outcome = match try_write(socket.as_fd(), &frames, skip) {
            Ok(Written::All) => {
                outlet.written_ms = heartbeat::swept_ms();
                FlushOutcome::Done
            }
            Ok(Written::Partly(written)) => {
                if written > skip {
                    outlet.written_ms = heartbeat::swept_ms();
                }
                outlet.writing = true;
                FlushOutcome::Blocked(frames.into_vec(), written)
            }
            Err(_) => {
                outlet.broken = true;
                FlushOutcome::Failed
            }
        };
        Flushed { left, outcome }
    }

    /// A blocked flush has finished (or failed, and the session is ending): direct writes
    /// may resume once the queue is drained.
    pub(crate) fn unblock(&mut self) {
        self.handle.outlet().writing = false;
    }

    /// Marks a room as being joined (if not subscribed already): its live frames wait until
    /// the join is answered. Returns false if the room was subscribed before.
    pub(crate) fn begin_join(&mut self, room: &str) -> bool {
        let mut outlet = self.handle.outlet();
        if outlet.rooms.contains_key(room) {
            return false;
        }
        outlet.rooms.insert(Arc::from(room), None);
        true
    }

    /// Forgets a room: a join that failed, or a leave. Returns its key if it was known.
    pub(crate) fn forget_room(&mut self, room: &str) -> Option<Arc<str>> {
        self.handle
            .outlet()
            .rooms
            .remove_entry(room)
            .map(|(key, _)| key)
    }

    /// The key of a subscribed room (not one still being joined).
    pub(crate) fn room(&self, room: &str) -> Option<Arc<str>> {
        self.with_subscribed(room, Arc::clone)
    }

    /// Whether the session is subscribed to a room: what [`OutboundReceiver::room`] tells,
    /// without cloning the key (an atomic increment and decrement per message).
    pub(crate) fn is_subscribed(&self, room: &str) -> bool {
        self.with_subscribed(room, |_| ()).is_some()
    }

    /// `f` of a subscribed room's key, under the outlet's lock; `None` if the session is not
    /// subscribed to it or still joining it (no mark yet).
    fn with_subscribed<T>(&self, room: &str, f: impl FnOnce(&Arc<str>) -> T) -> Option<T> {
        self.handle
            .outlet()
            .rooms
            .get_key_value(room)
            .filter(|(_, delivered)| delivered.is_some())
            .map(|(key, _)| f(key))
    }

    /// How many rooms the session is subscribed to or joining.
    pub(crate) fn room_count(&self) -> usize {
        self.handle.outlet().rooms.len()
    }

    /// Every room the session is subscribed to or joining, leaving none: the session is
    /// ending.
    pub(crate) fn take_rooms(&mut self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.handle.outlet().rooms)
            .into_keys()
            .collect()
    }

    /// Takes the oldest queued entry, if any, without writing it.
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.handle.outlet().queue.pop_front()
    }
}

impl Drop for OutboundReceiver {
    /// The session is gone: refuse further pushes and free what is queued.
    fn drop(&mut self) {
        // A batch's write still names the socket's descriptor: it must not be closed (and
        // reused) before the write is made.
        let mut outlet = self.handle.settled_outlet();
        outlet.closed = true;
        outlet.socket = None;
        outlet.unfinished = None;
        outlet.held = None;
        std::mem::take(&mut outlet.queue);
    }
}

/// Encodes an event as a text frame. Broadcasts call this once and share the result.
pub fn encode(event: &confab_proto::ServerEvent) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(event).expect("server events always serialize"))
}

/// The `ack` of a stored message to its sender, written from the message's own fields.
pub fn encode_ack(reference: Option<&Ref>, message: &ChatMessage) -> Utf8Bytes {
    /// Room for an ack with a short `ref` and `client_id` without growing the buffer.
    const TYPICAL_ACK: usize = 160;
    let mut out = Vec::with_capacity(TYPICAL_ACK);
    confab_proto::write_ack_event(
        &mut out,
        reference,
        &message.id,
        message.seq,
        message.client_id.as_deref(),
    );
    Utf8Bytes::try_from(Bytes::from(out)).expect("JSON is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::send_ring::SendBatch;

    fn handle(capacity: usize) -> (Arc<SessionHandle>, OutboundReceiver) {
        SessionHandle::new(
            1,
            UserRef {
                id: "u".into(),
                name: "u".into(),
            },
            capacity,
        )
    }

    #[test]
    fn heartbeat_clock_differences_survive_the_wrap() {
        assert_eq!(ms_since(clock32(5_000), clock32(1_000)), 4_000);
        // Across the 32-bit wrap (every 49.7 days).
        let before_wrap = (1u64 << 32) - 1_000;
        assert_eq!(
            ms_since(clock32(before_wrap + 3_000), clock32(before_wrap)),
            3_000
        );
        // Heard just after the heartbeat read its clock: no time has passed, not 49 days.
        assert_eq!(ms_since(clock32(10_000), clock32(10_005)), 0);
    }

    #[test]
    fn droppable_frames_leave_room_for_reliable_ones() {
        let (handle, _rx) = handle(8);
        let event = || Outbound::Event(Utf8Bytes::from_static("{}"));
        // 8 slots, floor 2: six droppable frames fit, the seventh is refused.
        for _ in 0..6 {
            assert!(handle.push(&event(), Priority::Droppable));
        }
        assert!(!handle.push(&event(), Priority::Droppable));
        assert_eq!(handle.dropped(), 1);
        assert!(handle.push(&event(), Priority::Reliable));
        assert!(handle.push(&event(), Priority::Reliable));
        assert!(!handle.is_slow());
        // The queue is full: a reliable frame marks the session slow instead of vanishing.
        assert!(!handle.push(&event(), Priority::Reliable));
        assert!(handle.is_slow());
        assert!(!handle.push(&event(), Priority::Reliable));
    }

    /// A connected pair: the server's end (shared, as a session's is) and the client's.
    async fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (Arc::new(accepted.unwrap().0), client.unwrap())
    }

    /// A session over a connected socket: the server's end, the client's, the session's
    /// handle and its task's receiver.
    type TestSession = (
        Arc<TcpStream>,
        TcpStream,
        Arc<SessionHandle>,
        OutboundReceiver,
    );

    /// A session handle whose outlet is attached to a connected socket, as after `connected`.
    async fn attached(capacity: usize) -> TestSession {
        let (socket, client) = socket_pair().await;
        let (handle, mut rx) = handle(capacity);
        rx.attach(Arc::clone(&socket));
        (socket, client, handle, rx)
    }

    /// [`attached`], and subscribed to room "r" with nothing delivered yet, as after its join.
    async fn joined(capacity: usize) -> TestSession {
        let (socket, client, handle, mut rx) = attached(capacity).await;
        assert!(rx.begin_join("r"));
        rx.flush(&socket, &[], Some(("r".into(), 0)), 0);
        (socket, client, handle, rx)
    }

    /// Reads unmasked server frames until `count` have arrived; returns their text payloads.
    async fn read_texts(client: &mut TcpStream, count: usize) -> Vec<String> {
        use tokio::io::AsyncReadExt;
        let mut texts = Vec::new();
        while texts.len() < count {
            let mut head = [0u8; 2];
            client.read_exact(&mut head).await.unwrap();
            assert_eq!(head[0], 0x81, "a final text frame");
            let len = match head[1] {
                126 => client.read_u16().await.unwrap() as usize,
                127 => client.read_u64().await.unwrap() as usize,
                n => n as usize,
            };
            let mut payload = vec![0; len];
            client.read_exact(&mut payload).await.unwrap();
            texts.push(String::from_utf8(payload).unwrap());
        }
        texts
    }

    fn chat(room: &str, seqs: std::ops::RangeInclusive<u64>) -> Outbound {
        let mut batch = ChatBatchBuilder::new(room.into());
        for seq in seqs {
            batch.push_event(seq, |out| {
                out.extend_from_slice(format!("m{seq}").as_bytes())
            });
        }
        Outbound::Chat(Arc::new(batch.finish()))
    }

    fn text(s: &str) -> Outbound {
        Outbound::Event(s.to_string().into())
    }

    /// Writes everything pending the way the session task does.
    async fn drain(rx: &mut OutboundReceiver, socket: &TcpStream) -> Vec<Arc<str>> {
        let flushed = rx.flush(socket, &[], None, usize::MAX);
        if let FlushOutcome::Blocked(frames, written) = flushed.outcome {
            crate::websocket::finish_write(socket, &frames, written)
                .await
                .unwrap();
            rx.unblock();
        }
        flushed.left.into_vec()
    }

    /// A batch is its messages' frames back to back, and what a subscriber lacks of it is
    /// always one span of them: the messages above its mark.
    #[test]
    fn a_batch_leaves_each_subscriber_one_span_to_send() {
        let Outbound::Chat(batch) = chat("r", 4..=6) else {
            unreachable!("chat() makes a chat batch")
        };
        let framed = |seqs: &[u64]| -> Vec<u8> {
            seqs.iter()
                .flat_map(|seq| crate::websocket::text_frame(format!("m{seq}").as_bytes()))
                .collect()
        };
        assert_eq!(batch.frames, framed(&[4, 5, 6]));
        assert_eq!(batch.seqs().collect::<Vec<_>>(), [4, 5, 6]);
        for (delivered, lacking) in [
            (0, &[4, 5, 6][..]),
            (3, &[4, 5, 6]),
            (4, &[5, 6]),
            (5, &[6]),
            (6, &[]),
            (9, &[]),
        ] {
            let unsent = batch.unsent(delivered);
            match lacking {
                [] => assert_eq!(unsent, None, "after {delivered}"),
                _ => {
                    let (start, newest) = unsent.expect("something to send");
                    assert_eq!(batch.frames[start..], framed(lacking), "after {delivered}");
                    assert_eq!(newest, 6);
                }
            }
        }
    }

    #[tokio::test]
    async fn fan_out_writes_directly_after_the_join_and_never_twice() {
        let (socket, mut client, handle, mut rx) = attached(64).await;
        // Joining: live frames wait, whatever their seq, until the answer sets the mark.
        assert!(rx.begin_join("r"));
        assert!(rx.room("r").is_none(), "not usable before the answer");
        assert!(handle.push(&chat("r", 1..=3), Priority::Reliable));
        assert!(handle.push(&chat("r", 3..=3), Priority::Reliable));
        assert_eq!(handle.outlet().queue.len(), 2, "a single message waits too");
        let joined = [Frame::Text("joined(history to 2)".into())];
        let flushed = rx.flush(&socket, &joined, Some(("r".into(), 2)), usize::MAX);
        assert!(matches!(flushed.outcome, FlushOutcome::Done));
        // Now straight to the socket, skipping what was delivered, a batch of one message
        // (its own path) as a longer one.
        assert!(handle.push(&chat("r", 3..=3), Priority::Reliable));
        assert!(handle.push(&chat("r", 3..=4), Priority::Reliable));
        assert!(handle.push(&chat("r", 5..=5), Priority::Reliable));
        assert!(handle.push(&text("typing"), Priority::Droppable));
        assert!(rx.try_recv().is_none(), "nothing was queued");
        // Losing the room goes through the task (it updates the hub); later frames of the
        // room are skipped.
        assert!(handle.push(&Outbound::Left("r".into()), Priority::Reliable));
        assert_eq!(drain(&mut rx, &socket).await, vec![Arc::<str>::from("r")]);
        assert!(handle.push(&chat("r", 6..=6), Priority::Reliable));
        assert!(handle.push(&text("after"), Priority::Reliable));
        assert_eq!(
            read_texts(&mut client, 7).await,
            [
                "joined(history to 2)",
                "m3",
                "m4",
                "m5",
                "typing",
                r#"{"type":"left","ref":null,"room":"r"}"#,
                "after"
            ]
        );
        // A close frame shuts the outlet.
        rx.flush(&socket, &[Frame::Close(1000, "bye".into())], None, 0);
        assert!(!handle.push(&text("too late"), Priority::Reliable));
    }

    #[tokio::test]
    async fn the_heartbeat_pings_in_place_and_raises_a_timeout() {
        let (_socket, mut client, handle, mut rx) = attached(4).await;
        let (interval, timeout) = (1_000, 5_000);
        let start = heartbeat::now_ms();
        assert!(!handle.beat_due(start, interval, timeout));
        // A ping is due: written straight into the socket, the task not woken.
        assert!(handle.beat_due(start + interval, interval, timeout));
        handle.beat(start + interval, interval, timeout);
        let mut ping = [0; 2];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut ping)
            .await
            .unwrap();
        assert_eq!(ping, [0x89, 0], "an empty final ping frame");
        assert!(!handle.beat_due(start + interval + 10, interval, timeout));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_ready(&mut cx).is_pending());
        // Heard from: the timeout counts from then.
        assert!(handle.beat_due(start + timeout + 5, interval * 10, timeout));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        handle.heard();
        assert!(!handle.beat_due(start + timeout + 5, interval * 10, timeout));
        // Silent for the timeout: a signal for the task, which is woken.
        let later = heartbeat::now_ms() + timeout;
        assert!(handle.beat_due(later, interval * 10, timeout));
        handle.beat(later, interval * 10, timeout);
        assert!(handle.raised(Signal::TimedOut));
        assert!(!handle.raised(Signal::Shutdown));
        assert!(rx.poll_ready(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_write_and_a_frame_heard_within_the_period_stand_for_a_ping() {
        let (_socket, mut client, handle, _rx) = attached(4).await;
        let (interval, timeout) = (1_000, 60_000);
        let period = handle.ping_period(interval);
        assert!((interval * 3 / 4..=interval).contains(&period), "{period}");
        let due = heartbeat::now_ms() + interval;
        let expect_ping = async |client: &mut TcpStream| {
            let mut ping = [0; 2];
            tokio::io::AsyncReadExt::read_exact(client, &mut ping)
                .await
                .unwrap();
            assert_eq!(ping, [0x89, 0]);
        };
        // Both ways within the period: no ping, and the next is due a period after the write.
        handle.heard_ms.store(clock32(due - 100), Ordering::Relaxed);
        handle.outlet().written_ms = clock32(due - 200);
        handle.beat(due, interval, timeout);
        assert!(!handle.beat_due(due + 1, interval, timeout));
        let next = due - 200 + period;
        assert!(handle.beat_due(next, interval, timeout));
        // Heard from, but nothing written since: pinged (the first frame the client gets).
        handle.heard_ms.store(clock32(next - 10), Ordering::Relaxed);
        handle.beat(next, interval, timeout);
        expect_ping(&mut client).await;
        // Written to, but not heard from since: pinged.
        let after = next + period;
        handle.outlet().written_ms = clock32(after - 10);
        handle.beat(after, interval, timeout);
        expect_ping(&mut client).await;
        // Sessions' periods differ, so that connections made together are not pinged together.
        let periods: std::collections::HashSet<u64> = (0..100)
            .map(|id| {
                let user = UserRef {
                    id: "u".into(),
                    name: "u".into(),
                };
                SessionHandle::new(id, user, 1).0.ping_period(interval)
            })
            .collect();
        assert!(periods.len() > 50, "{periods:?}");
    }

    #[tokio::test]
    async fn held_acks_go_out_first_whatever_comes_next() {
        let (socket, mut client, handle, mut rx) = joined(64).await;
        // Taken along by the next push (the sender's own copy of its message)...
        assert!(handle.hold(text("ack1")));
        assert!(handle.push(&chat("r", 1..=1), Priority::Reliable));
        handle.release();
        // ...or sent on its own when released...
        assert!(handle.hold(text("ack2")));
        handle.release();
        // ...or written ahead of the task's own frames...
        assert!(handle.hold(text("ack3")));
        let reply = [Frame::Text("reply".into())];
        rx.flush(&socket, &reply, None, usize::MAX);
        // ...or queued ahead of an entry that has to wait for the task.
        assert!(handle.hold(text("ack4")));
        assert!(handle.push(&Outbound::Left("r".into()), Priority::Reliable));
        drain(&mut rx, &socket).await;
        // Chat of a room the session is not in: the held ack still goes out.
        assert!(handle.hold(text("ack5")));
        assert!(handle.push(&chat("elsewhere", 1..=1), Priority::Reliable));
        assert_eq!(
            read_texts(&mut client, 7).await,
            [
                "ack1",
                "m1",
                "ack2",
                "ack3",
                "reply",
                "ack4",
                r#"{"type":"left","ref":null,"room":"r"}"#,
            ]
        );
        assert_eq!(read_texts(&mut client, 1).await, ["ack5"]);
        assert!(handle.outlet().held.is_none());
    }

    #[tokio::test]
    async fn a_full_socket_queues_and_everything_arrives_whole_and_in_order() {
        full_socket_case(false).await;
    }

    /// The same through a [`send_ring::SendBatch`]: the batch's write stops part-way, what
    /// was pushed while it was in the batch queued behind it, and the task finishes both.
    #[tokio::test]
    async fn a_full_socket_in_a_batch_leaves_the_rest_to_the_task_in_order() {
        if ring_available_or_skip("a_full_socket_in_a_batch_leaves_the_rest_to_the_task_in_order") {
            full_socket_case(true).await;
        }
    }

    async fn full_socket_case(batched: bool) {
        let (socket, mut client, handle, mut rx) = attached(1024).await;
        // The client reads nothing yet: 40 frames of 64 KiB overflow the (shrunk) socket
        // buffers, so a direct write stops part-way and the rest queues behind it.
        rustix::net::sockopt::set_socket_send_buffer_size(&*socket, 32 * 1024).unwrap();
        rustix::net::sockopt::set_socket_recv_buffer_size(&client, 32 * 1024).unwrap();
        let big = |n: usize| format!("{n:04}{}", "x".repeat(64 * 1024));
        assert!(rx.begin_join("r"));
        rx.flush(&socket, &[], Some(("r".into(), 0)), 0);
        let batch = batched.then(|| SendBatch::begin(true).expect("a batch opens"));
        for n in 0..40 {
            // Single chat messages and events, whose direct writes take different paths; the
            // first (a message) is the write that stops part-way.
            let item = if n % 2 == 0 {
                let mut batch = ChatBatchBuilder::new("r".into());
                batch.push_event(n as u64 + 1, |out| out.extend_from_slice(big(n).as_bytes()));
                Outbound::Chat(Arc::new(batch.finish()))
            } else {
                text(&big(n))
            };
            assert!(handle.push(&item, Priority::Reliable));
        }
        drop(batch);
        assert!(
            rx.handle.outlet().unfinished.is_some(),
            "a write stopped part-way"
        );
        assert!(
            !rx.handle.outlet().queue.is_empty(),
            "later frames were queued"
        );
        let reader = tokio::spawn(async move { read_texts(&mut client, 40).await });
        while std::future::poll_fn(|cx| Poll::Ready(rx.poll_ready(cx)))
            .await
            .is_ready()
        {
            drain(&mut rx, &socket).await;
        }
        let texts = reader.await.unwrap();
        let expected: Vec<String> = (0..40).map(big).collect();
        assert_eq!(texts.len(), expected.len());
        assert!(texts == expected, "frames arrive whole and in order");
        let outlet = handle.outlet();
        assert!(outlet.is_open_for_direct_writes(), "direct writes resume");
        assert_eq!(
            outlet.queue.capacity(),
            0,
            "a drained burst gives its memory back"
        );
    }

    /// Whether io_uring works here; if not, says so (a test that needs it is then skipped,
    /// visibly), and fails under CI, whose machine has it.
    fn ring_available_or_skip(test: &str) -> bool {
        if send_ring::is_available() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: io_uring is unavailable on this CI machine"
        );
        eprintln!("SKIPPED {test}: io_uring is unavailable here");
        false
    }

    /// Writes made during a batch reach their sockets only when it closes, all in one
    /// submission; a session's later frames queue behind its write in the batch and follow it,
    /// and a held ack still shares the write of the message after it.
    #[tokio::test]
    async fn a_batch_makes_its_writes_when_it_closes_and_keeps_each_sessions_order() {
        if !ring_available_or_skip(
            "a_batch_makes_its_writes_when_it_closes_and_keeps_each_sessions_order",
        ) {
            return;
        }
        let mut sessions = Vec::new();
        for _ in 0..3 {
            sessions.push(joined(64).await);
        }
        assert!(SendBatch::begin(false).is_none(), "switched off");
        let batch = SendBatch::begin(true).expect("a batch opens");
        assert!(
            SendBatch::begin(true).is_none(),
            "one batch per thread at a time"
        );
        for (_, _, handle, rx) in &mut sessions {
            assert!(handle.hold(text("ack")));
            assert!(handle.push(&chat("r", 1..=2), Priority::Reliable));
            assert!(handle.outlet().in_flight);
            assert!(handle.push(&text("after"), Priority::Reliable));
            assert_eq!(
                handle.outlet().queue.len(),
                1,
                "queued behind the batch's write"
            );
            let ready = std::future::poll_fn(|cx| Poll::Ready(rx.poll_ready(cx))).await;
            assert!(ready.is_pending(), "the task waits for the batch");
        }
        let mut buf = [0; 64];
        for (_, client, _, _) in &sessions {
            assert_eq!(
                client.try_read(&mut buf).unwrap_err().kind(),
                std::io::ErrorKind::WouldBlock,
                "nothing is written before the batch closes"
            );
        }
        drop(batch);
        for (socket, client, handle, rx) in &mut sessions {
            assert!(!handle.outlet().in_flight);
            let ready = std::future::poll_fn(|cx| Poll::Ready(rx.poll_ready(cx))).await;
            assert!(ready.is_ready(), "the queued frame wakes the task");
            drain(rx, socket).await;
            assert_eq!(read_texts(client, 4).await, ["ack", "m1", "m2", "after"]);
            assert!(handle.outlet().is_open_for_direct_writes());
        }
    }

    /// A fan-out larger than the ring (W1's thousand subscribers) is submitted a ring's worth
    /// at a time, and every write is made once, in order.
    #[tokio::test]
    async fn a_fan_out_larger_than_the_ring_reaches_everyone() {
        if !ring_available_or_skip("a_fan_out_larger_than_the_ring_reaches_everyone") {
            return;
        }
        let mut sessions = Vec::new();
        for _ in 0..600 {
            sessions.push(joined(8).await);
        }
        for seqs in [1..=1, 2..=3] {
            let item = chat("r", seqs);
            let batch = SendBatch::begin(true).expect("a batch opens");
            for (_, _, handle, _) in &sessions {
                assert!(handle.push(&item, Priority::Reliable));
            }
            drop(batch);
        }
        for (_, client, handle, _) in &mut sessions {
            assert!(!handle.outlet().in_flight);
            assert_eq!(read_texts(client, 3).await, ["m1", "m2", "m3"]);
        }
    }

    /// A write whose fate the ring could not tell (it failed) cuts the connection off: the
    /// client sees the end of the stream rather than bytes it cannot trust, and nothing more
    /// is written directly.
    #[tokio::test]
    async fn a_write_lost_with_its_ring_cuts_the_connection_off() {
        use tokio::io::AsyncReadExt;
        let (_socket, mut client, handle, _rx) = joined(64).await;
        handle.outlet().in_flight = true;
        handle.deferred_lost();
        {
            let outlet = handle.outlet();
            assert!(outlet.broken && !outlet.in_flight);
            assert!(!outlet.is_open_for_direct_writes());
        }
        let mut rest = Vec::new();
        let read = client.read_to_end(&mut rest);
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("the stream ends")
            .unwrap();
        assert!(rest.is_empty(), "nothing after the cut");
    }

    /// On a multi-threaded runtime a session's task can run while its write is in a batch on
    /// another thread: its own write waits for the batch's, and follows it on the wire.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_on_another_thread_writes_after_the_batchs_write() {
        if !ring_available_or_skip("a_task_on_another_thread_writes_after_the_batchs_write") {
            return;
        }
        let (socket, mut client, handle, mut rx) = joined(64).await;
        let batch = SendBatch::begin(true).expect("a batch opens");
        assert!(handle.push(&chat("r", 1..=1), Priority::Reliable));
        assert!(handle.outlet().in_flight);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let task = std::thread::spawn(move || {
            started_tx.send(()).unwrap();
            let reply = Frame::Text(Utf8Bytes::from_static("reply"));
            let flushed = rx.flush(&socket, &[reply], None, usize::MAX);
            assert!(matches!(flushed.outcome, FlushOutcome::Done));
            drop(rx);
        });
        started_rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            handle.outlet().in_flight,
            "the task's flush waits for the batch"
        );
        drop(batch);
        task.join().unwrap();
        assert_eq!(read_texts(&mut client, 2).await, ["m1", "reply"]);
    }

    /// A write in a batch to a connection the peer has reset breaks the session as a direct
    /// write would: the task's attempt fails, and nothing more goes out.
    #[tokio::test]
    async fn a_failed_write_in_a_batch_breaks_the_session() {
        if !ring_available_or_skip("a_failed_write_in_a_batch_breaks_the_session") {
            return;
        }
        let (socket, client, handle, mut rx) = joined(64).await;
        // Closed with unread data: the peer answers with a reset.
        client.set_zero_linger().unwrap();
        drop(client);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut failed = false;
        for seq in 1..=50 {
            let batch = SendBatch::begin(true).expect("a batch opens");
            handle.push(&chat("r", seq..=seq), Priority::Reliable);
            drop(batch);
            if handle.outlet().broken {
                failed = true;
                break;
            }
        }
        assert!(failed, "a write to a reset connection fails");
        assert!(!handle.outlet().is_open_for_direct_writes());
        assert!(matches!(
            rx.flush(&socket, &[], None, usize::MAX).outcome,
            FlushOutcome::Failed
        ));
    }

    #[tokio::test]
    async fn a_queued_push_wakes_the_task_and_a_gone_session_takes_nothing() {
        let (handle, mut rx) = handle(16);
        let pusher = Arc::clone(&handle);
        let waiter = tokio::spawn(async move {
            std::future::poll_fn(|cx| rx.poll_ready(cx)).await;
            rx.try_recv().is_some()
        });
        tokio::task::yield_now().await;
        // No socket attached yet: it is queued, and the task woken.
        assert!(pusher.push(&text("x"), Priority::Reliable));
        assert!(waiter.await.unwrap());
        assert!(!handle.push(&text("y"), Priority::Reliable));
    }

    #[test]
    fn room_marks_find_every_room_of_a_busy_session() {
        let mut marks = RoomMarks::default();
        // Inserted out of order; re-inserting replaces the key and the mark.
        for n in (0..200).rev().chain(0..200) {
            marks.insert(format!("room-{}", (n * 37) % 200).into(), Some(n));
        }
        assert_eq!(marks.len(), 200);
        for n in 0..200 {
            assert!(marks.get_mut(&format!("room-{n}")).is_some(), "{n}");
        }
        assert!(marks.get_mut("room-200").is_none());
        assert!(marks.remove_entry("room-7").is_some());
        assert!(!marks.contains_key("room-7"));
        assert!(marks.contains_key("room-8"));
        let keys: Vec<_> = marks.into_keys().collect();
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]), "kept sorted");
    }
}
