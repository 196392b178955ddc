//! A session's bounded outbound queue and the handle the rest of the server uses to reach it.
//!
//! Fan-out never waits on a socket: it calls [`SessionHandle::push`], which either queues the
//! pre-encoded frame or decides, by the frame's class, what overflow means:
//! - droppable frames (typing, presence) are refused once the queue is three quarters full, so
//!   they never take the room that chat messages need;
//! - every other frame that finds the queue full marks the session *slow*. Its task then closes
//!   the socket with 1013; the client re-joins with `since` and gets everything it missed from
//!   the store. Nothing is dropped silently and nobody else waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use confab_proto::UserRef;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
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
    /// Sending side of the bounded queue; the session task owns the receiver.
    queue: mpsc::Sender<Outbound>,
    /// Free slots below which droppable frames are refused.
    droppable_floor: usize,
    /// Cancelled when a reliable frame did not fit: the session must close with 1013.
    slow: CancellationToken,
    /// Droppable frames refused so far (for metrics and tests).
    dropped: AtomicU64,
}

impl SessionHandle {
    /// Creates the handle and the receiver its session task drains.
    pub fn new(
        id: SessionId,
        user: UserRef,
        capacity: usize,
    ) -> (Arc<Self>, mpsc::Receiver<Outbound>) {
        let (queue, receiver) = mpsc::channel(capacity);
        let handle = SessionHandle {
            id,
            user,
            queue,
            droppable_floor: capacity / 4,
            slow: CancellationToken::new(),
            dropped: AtomicU64::new(0),
        };
        (Arc::new(handle), receiver)
    }

    /// Queues a frame without waiting. Returns false if it was not queued (dropped, session
    /// slow or gone).
    pub fn push(&self, item: Outbound, priority: Priority) -> bool {
        if self.slow.is_cancelled() {
            return false;
        }
        if priority == Priority::Droppable && self.queue.capacity() <= self.droppable_floor {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match self.queue.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if priority == Priority::Reliable {
                    self.slow.cancel();
                } else {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Resolves when the session has been marked slow.
    pub fn slow(&self) -> &CancellationToken {
        &self.slow
    }

    /// Droppable frames refused so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Encodes an event as a text frame. Broadcasts call this once and share the result.
pub fn encode(event: &confab_proto::ServerEvent) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(event).expect("server events always serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(capacity: usize) -> (Arc<SessionHandle>, mpsc::Receiver<Outbound>) {
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
        assert!(!handle.slow().is_cancelled());
        // The queue is full: a reliable frame marks the session slow instead of vanishing.
        assert!(!handle.push(event(), Priority::Reliable));
        assert!(handle.slow().is_cancelled());
        assert!(!handle.push(event(), Priority::Reliable));
    }
}
