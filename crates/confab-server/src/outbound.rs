//! A session's bounded outbound queue and the handle the rest of the server uses to reach it.
//!
//! Fan-out never waits on a socket: it calls [`SessionHandle::push`], which either queues the
//! pre-encoded frame or decides, by the frame's class, what overflow means:
//! - droppable frames (typing, presence) are refused once the queue is three quarters full, so
//!   they never take the room that chat messages need;
//! - every other frame that finds the queue full marks the session *slow*. Its task then closes
//!   the socket with 1013; the client re-joins with `since` and gets everything it missed from
//!   the store. Nothing is dropped silently and nobody else waits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use confab_proto::UserRef;
use futures_util::task::AtomicWaker;
use tungstenite::Utf8Bytes;

/// Process-unique id of one WebSocket connection.
pub type SessionId = u64;

/// One stored chat message, encoded once.
#[derive(Debug)]
pub struct ChatFrame {
    /// The message's seq: sessions skip anything at or below what they already delivered, which
    /// is what makes a join's history and the live stream meet without gaps or duplicates.
    pub seq: u64,
    /// The encoded `message` event.
    pub frame: Utf8Bytes,
}

/// The messages one commit stored for one room, in seq order, shared by every subscriber.
///
/// A burst (hundreds of messages committed together) takes one queue slot per subscriber, not
/// hundreds, so a healthy reader is never mistaken for a slow one, and fan-out costs one queue
/// operation per subscriber per commit instead of per message.
#[derive(Debug)]
pub struct ChatBatch {
    /// Room the messages belong to (the session filters by it).
    pub room: Arc<str>,
    /// The messages, ascending seq.
    pub frames: Vec<ChatFrame>,
}

/// One item in a session's queue.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Chat messages (never dropped).
    Chat(Arc<ChatBatch>),
    /// Any other encoded event.
    Event(Utf8Bytes),
    /// Several events for this session alone (e.g. the acks of one commit), in order.
    Events(Arc<[Utf8Bytes]>),
    /// The session lost its subscription to a room (membership ended or room deleted): it
    /// forgets the room and tells its client with a `left` event.
    Left(Arc<str>),
}

/// Whether a frame may be dropped under pressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Must be delivered or the session closed (chat, acks, joins, reads).
    Reliable,
    /// May be dropped when the queue is filling up (typing, presence).
    Droppable,
}

/// The shared half of a session: what the hub, the committer and presence hold.
#[derive(Debug)]
pub struct SessionHandle {
    /// This connection's id.
    pub id: SessionId,
    /// Who is connected.
    pub user: UserRef,
    /// The bounded queue. A plain deque rather than a channel: it holds no memory while empty
    /// and gives back what a burst made it grow, which matters with thousands of idle sessions
    /// (a channel keeps its 32-slot blocks for good).
    queue: Mutex<VecDeque<Outbound>>,
    /// Wakes the session task when something was queued (or the session became slow).
    ready: AtomicWaker,
    /// Set once the session task is gone: nothing more is queued.
    closed: AtomicBool,
    /// Most entries the queue holds.
    capacity: usize,
    /// Free slots below which droppable frames are refused.
    droppable_floor: usize,
    /// Set when a reliable frame did not fit: the session must close with 1013. A flag, not a
    /// cancellation token: every push reads it, and a token's check takes a lock.
    slow: AtomicBool,
    /// Droppable frames refused so far (for metrics and tests).
    dropped: AtomicU64,
}

impl SessionHandle {
    /// Creates the handle and the receiver its session task drains.
    pub fn new(id: SessionId, user: UserRef, capacity: usize) -> (Arc<Self>, OutboundReceiver) {
        let handle = Arc::new(SessionHandle {
            id,
            user,
            queue: Mutex::new(VecDeque::new()),
            ready: AtomicWaker::new(),
            closed: AtomicBool::new(false),
            capacity,
            droppable_floor: capacity / 4,
            slow: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let receiver = OutboundReceiver {
            handle: Arc::clone(&handle),
        };
        (handle, receiver)
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Outbound>> {
        // A panic while holding this lock cannot leave the deque inconsistent.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a frame without waiting. Returns false if it was not queued (dropped, session
    /// slow or gone).
    pub fn push(&self, item: Outbound, priority: Priority) -> bool {
        if self.is_slow() || self.closed.load(Ordering::Acquire) {
            return false;
        }
        let mut queue = self.queue();
        let free = self.capacity.saturating_sub(queue.len());
        if free == 0 || (priority == Priority::Droppable && free <= self.droppable_floor) {
            drop(queue);
            if priority == Priority::Reliable {
                self.slow.store(true, Ordering::Release);
                self.ready.wake();
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        queue.push_back(item);
        drop(queue);
        self.ready.wake();
        true
    }

    /// Whether a reliable frame found the queue full: the session task wakes up (as for a
    /// push) and closes the connection.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Acquire)
    }

    /// Droppable frames refused so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The session task's end of its queue.
#[derive(Debug)]
pub struct OutboundReceiver {
    handle: Arc<SessionHandle>,
}

impl OutboundReceiver {
    /// Waits until something is queued, then moves up to `limit` entries into `out`, oldest
    /// first, and returns how many. Cancel-safe: entries stay queued until taken.
    pub async fn recv_many(&mut self, out: &mut Vec<Outbound>, limit: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_recv_many(cx, out, limit)).await
    }

    /// Moves up to `limit` queued entries into `out` and returns how many; while the queue is
    /// empty, `Pending`, with the task registered to be woken by the next push.
    pub fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Outbound>,
        limit: usize,
    ) -> Poll<usize> {
        if let taken @ 1.. = self.take(out, limit) {
            return Poll::Ready(taken);
        }
        self.handle.ready.register(cx.waker());
        // Look again: a push between the first look and the registration woke nobody.
        match self.take(out, limit) {
            0 => Poll::Pending,
            taken => Poll::Ready(taken),
        }
    }

    fn take(&mut self, out: &mut Vec<Outbound>, limit: usize) -> usize {
        let mut queue = self.handle.queue();
        let taken = queue.len().min(limit);
        out.extend(queue.drain(..taken));
        if queue.is_empty() && queue.capacity() > 0 {
            // Most sessions are idle most of the time: an empty queue holds no memory (a few
            // hundred bytes each, times every connection).
            *queue = VecDeque::new();
        }
        taken
    }

    /// Takes the oldest entry, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.handle.queue().pop_front()
    }
}

impl Drop for OutboundReceiver {
    /// The session is gone: refuse further pushes and free what is queued.
    fn drop(&mut self) {
        self.handle.closed.store(true, Ordering::Release);
        std::mem::take(&mut *self.handle.queue());
    }
}

/// Encodes an event as a text frame. Broadcasts call this once and share the result.
pub fn encode(event: &confab_proto::ServerEvent) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(event).expect("server events always serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn droppable_frames_leave_room_for_reliable_ones() {
        let (handle, _rx) = handle(8);
        let event = || Outbound::Event(Utf8Bytes::from_static("{}"));
        // 8 slots, floor 2: six droppable frames fit, the seventh is refused.
        for _ in 0..6 {
            assert!(handle.push(event(), Priority::Droppable));
        }
        assert!(!handle.push(event(), Priority::Droppable));
        assert_eq!(handle.dropped(), 1);
        assert!(handle.push(event(), Priority::Reliable));
        assert!(handle.push(event(), Priority::Reliable));
        assert!(!handle.is_slow());
        // The queue is full: a reliable frame marks the session slow instead of vanishing.
        assert!(!handle.push(event(), Priority::Reliable));
        assert!(handle.is_slow());
        assert!(!handle.push(event(), Priority::Reliable));
    }

    #[tokio::test]
    async fn the_receiver_gets_everything_in_order_and_memory_back() {
        let (handle, mut rx) = handle(256);
        for n in 0..100 {
            assert!(handle.push(Outbound::Left(n.to_string().into()), Priority::Reliable));
        }
        let mut batch = Vec::new();
        assert_eq!(rx.recv_many(&mut batch, 64).await, 64);
        assert_eq!(rx.recv_many(&mut batch, 64).await, 36);
        let rooms: Vec<String> = batch
            .iter()
            .map(|item| match item {
                Outbound::Left(room) => room.to_string(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(rooms, (0..100).map(|n| n.to_string()).collect::<Vec<_>>());
        assert_eq!(
            handle.queue().capacity(),
            0,
            "a drained burst gives its memory back"
        );
        // A push from another task wakes a waiting receiver.
        let pusher = Arc::clone(&handle);
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            rx.recv_many(&mut got, 8).await;
            got.len()
        });
        tokio::task::yield_now().await;
        assert!(pusher.push(Outbound::Left("x".into()), Priority::Reliable));
        assert_eq!(waiter.await.unwrap(), 1);
        // The receiver is gone (the session ended): nothing is queued any more.
        assert!(!handle.push(Outbound::Left("y".into()), Priority::Reliable));
    }
}
