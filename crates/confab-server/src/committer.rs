//! The path of a chat message from "accepted" to "stored, acked and delivered".
//!
//! Sessions and REST handlers hand messages to one committer task. It takes everything that has
//! queued up while the previous batch was being written, stores it with a single
//! [`Store::append`] (one commit), and then, in seq order, acks each sender and publishes each
//! new message once-encoded to the room. Because batches are processed one after another and
//! the store assigns seqs in batch order, every room's messages are published in seq order.
//!
//! A commit has fixed costs (the transaction, the table's tail page in the WAL; the store
//! commits small appends on this task's thread, see `SqliteStore::commit_in_place`), so the
//! more messages share one the better, without making a message wait when nothing else is
//! going on:
//!
//! - Before each commit the committer steps aside for the tasks that are ready to run (a few
//!   scheduler rounds, as long as each brings new messages): sessions whose sockets already
//!   hold a message submit it and it joins this commit. On an idle server this costs one
//!   pass of the scheduler; under load it is what groups the messages.
//! - Once a commit has stored several messages for one room (a room whose messages come
//!   faster than they fan out) it also *lingers*: the next commit waits until its oldest
//!   message has waited `commit_linger_ms` for company (never longer; a backlog that arrived
//!   during the last commit goes at once). Each subscriber then gets the room's messages in
//!   one write instead of one per message (W1 at 500-1,000 messages/s: a quarter less CPU
//!   per delivery, and a lower p99). Many quiet rooms (W2) never linger: their messages share no
//!   write, and the wait would be latency for a commit's fixed cost only.
//!
//! The linger is timed by the system's timer (a `timerfd` on Linux): tokio's timers tick in
//! whole milliseconds and fire when the busy runtime next polls its driver, and a 1 ms wait
//! with them took W2's median latency from 0.5 to 5-6 ms.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use confab_proto::{Ref, ServerEvent};
use foldhash::HashMap;
use smallvec::{SmallVec, smallvec};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tungstenite::Utf8Bytes;

use crate::broker::Broker;
use crate::error::ChatError;
use crate::outbound::{
    ChatBatchBuilder, Outbound, Priority, SessionHandle, SessionId, encode, encode_ack,
};
use crate::send_ring::SendBatch;
use crate::store::{Appended, NewMessage, Store};

/// Largest number of messages stored in one commit.
const MAX_BATCH: usize = 1024;

/// Messages waiting for the committer before senders have to wait.
const QUEUE_DEPTH: usize = 8192;

/// Where the outcome of a message goes.
#[derive(Debug)]
pub enum Reply {
    /// A WebSocket session: gets `ack` (or `error`) through its outbound queue.
    Session {
        /// The sender's session.
        handle: Arc<SessionHandle>,
        /// The command's `ref`.
        reference: Option<Ref>,
    },
    /// A REST request waiting for the stored message.
    Request(oneshot::Sender<Result<Appended, ChatError>>),
}

/// A message accepted for storing.
#[derive(Debug)]
pub struct Pending {
    /// The message.
    pub message: NewMessage,
    /// Who to tell.
    pub reply: Reply,
}

/// Handle for submitting messages to the committer task.
#[derive(Debug, Clone)]
pub struct Committer {
    queue: mpsc::Sender<Pending>,
}

impl Committer {
    /// Starts the committer task. It runs until `stop` is cancelled, then stores whatever is
    /// still queued and ends; the returned future completes at that point. `linger` is how
    /// long it waits for more messages before a commit once it is busy (zero: never);
    /// `send_ring` whether a commit's fan-out may be written in one system call
    /// ([`SendBatch`]).
    pub fn start(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        linger: Duration,
        send_ring: bool,
        stop: CancellationToken,
    ) -> (Committer, impl Future<Output = ()> + Send + 'static) {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let task = run(receiver, store, broker, linger, send_ring, stop);
        (Committer { queue }, task)
    }

    /// Queues a message if the queue has room, without waiting: `Ok(None)` once queued,
    /// `Ok(Some(pending))` (given back) when the queue is full and the caller has to
    /// [`Committer::submit`] it.
    pub fn try_submit(&self, pending: Pending) -> Result<Option<Pending>, ChatError> {
        match self.queue.try_send(pending) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(pending)) => Ok(Some(pending)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ChatError::ShuttingDown),
        }
    }

    /// Queues a message; waits only if the committer is far behind (backpressure).
    pub async fn submit(&self, pending: Pending) -> Result<(), ChatError> {
        self.queue
            .send(pending)
            .await
            .map_err(|_| ChatError::ShuttingDown)
    }
}

async fn run(
    mut receiver: mpsc::Receiver<Pending>,
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    linger: Duration,
    send_ring: bool,
    stop: CancellationToken,
) {
    let outlets = Outlets {
        store: store.as_ref(),
        broker: broker.as_ref(),
        send_ring,
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut scratch = Scratch::default();
    let mut timer = LingerTimer::new();
    // Whether the last commit stored several messages for one room: then more are likely on
    // the way and the next commit waits for them.
    let mut hot = false;
    // When the queue was last emptied: whatever is queued now arrived after it.
    let mut last_taken = Instant::now();
    loop {
        let waited = receiver.is_empty();
        let received = tokio::select! {
            received = receiver.recv_many(&mut batch, MAX_BATCH) => received,
            () = stop.cancelled() => break,
        };
        if received == 0 {
            return;
        }
        // The earliest its messages can have arrived: just now if the committer waited for
        // them, else during the last commit.
        let oldest = if waited { Instant::now() } else { last_taken };
        gather_ready(&mut receiver, &mut batch).await;
        // The linger counts from the oldest message's arrival, so no message waits longer
        // than `linger` for company; a backlog that already waited through a commit goes at
        // once.
        let deadline = oldest + linger;
        if hot && !linger.is_zero() && batch.len() < MAX_BATCH && Instant::now() < deadline {
            // Shutdown cuts the wait short; what was taken is still committed.
            tokio::select! {
                () = timer.sleep_until(deadline) => {}
                () = stop.cancelled() => {}
            }
            take_queued(&mut receiver, &mut batch);
        }
        last_taken = Instant::now();
        hot = commit(&mut batch, &mut scratch, &outlets).await;
    }
    // Shutting down: refuse new messages, store everything already accepted.
    receiver.close();
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        commit(&mut batch, &mut scratch, &outlets).await;
    }
}

/// Scheduler rounds the committer steps aside for, at most, before a commit.
const GATHER_ROUNDS: usize = 4;

/// Lets the tasks that are ready run first and takes what they submit, for as long as each
/// round brings something new (at most [`GATHER_ROUNDS`]).
async fn gather_ready(receiver: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) {
    for _ in 0..GATHER_ROUNDS {
        if batch.len() == MAX_BATCH {
            return;
        }
        yield_to_ready_tasks().await;
        if take_queued(receiver, batch) == 0 {
            return;
        }
    }
}

/// Goes to the back of the scheduler's queue once, behind the tasks already woken.
///
/// Not `tokio::task::yield_now`: that one waits for the runtime to poll its I/O driver first,
/// an `epoll_wait` system call per round that under load mostly finds nothing (W2 at half
/// load: two empty ones per commit, two thirds of the server's `epoll_wait`s). Sockets that
/// became readable meanwhile are still found: by the driver poll the runtime makes every few
/// dozen tasks, and at the latest once the commit is done and the queue has run dry.
async fn yield_to_ready_tasks() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        // A task that wakes itself while running is queued behind the others (tokio's
        // `yield_now` before it learnt to defer).
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

/// Moves what is queued into `batch`, up to [`MAX_BATCH`], without waiting; returns how many.
fn take_queued(receiver: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) -> usize {
    let before = batch.len();
    while batch.len() < MAX_BATCH {
        match receiver.try_recv() {
            Ok(pending) => batch.push(pending),
            Err(_) => break,
        }
    }
    batch.len() - before
}

/// The lists a commit sorts its outcomes into, kept from one commit to the next for their
/// capacity: under load most commits carry a message or two, and each list would otherwise be
/// allocated and freed for them.
#[derive(Default)]
struct Scratch {
    /// Who to tell about each message of the batch, in batch order.
    replies: Vec<Reply>,
    /// Acks grouped per sending session, in first-seen order.
    acks: Vec<(Arc<SessionHandle>, SmallVec<[Utf8Bytes; 1]>)>,
    /// Where each session's acks are in `acks`.
    ack_index: HashMap<SessionId, usize>,
    /// New messages grouped per room, in first-seen order.
    rooms: Vec<ChatBatchBuilder>,
    /// Where each room's messages are in `rooms`. Keyed by the batch's own name, looked up by
    /// the message's: no copy of either.
    room_index: HashMap<Arc<str>, usize>,
    /// Senders whose acks are held while the rooms fan out.
    held: Vec<Arc<SessionHandle>>,
}

/// Where a commit's messages go: the store, then the broker, whose fan-out may be written in
/// one system call ([`SendBatch`]) when `send_ring` says so.
#[derive(Clone, Copy)]
struct Outlets<'a> {
    store: &'a dyn Store,
    broker: &'a dyn Broker,
    send_ring: bool,
}

/// Stores, acks and publishes a batch. Returns whether it stored several messages for one
/// room.
async fn commit(batch: &mut Vec<Pending>, scratch: &mut Scratch, outlets: &Outlets<'_>) -> bool {
    let Outlets {
        store,
        broker,
        send_ring,
    } = *outlets;
    tracing::trace!(messages = batch.len(), "committing a batch");
    let Scratch {
        replies,
        acks,
        ack_index,
        rooms,
        room_index,
        held,
    } = scratch;
    let mut messages = Vec::with_capacity(batch.len());
    for pending in batch.drain(..) {
        messages.push(pending.message);
        replies.push(pending.reply);
    }
    let results = match store.append(messages).await {
        Ok(results) => results,
        Err(err) => {
            tracing::error!(error = %err, "storing a batch of messages failed");
            for reply in replies.drain(..) {
                fail(reply, ChatError::Store(err.clone()));
            }
            return false;
        }
    };
    // Acks grouped per sending session and new messages grouped per room, both in seq order,
    // so each session and each subscriber gets one queue entry for the whole commit.
    // Vectors keep first-seen order; the maps only index into them.
    // Most sessions send one message per commit: their acks fit inline.
    for (result, reply) in results.into_iter().zip(replies.drain(..)) {
        let appended = match result {
            Ok(appended) => appended,
            Err(err) => {
                fail(reply, ChatError::from(err));
                continue;
            }
        };
        match reply {
            Reply::Session { handle, reference } => {
                let ack = encode_ack(reference.as_ref(), &appended.message);
                match ack_index.get(&handle.id) {
                    Some(&index) => acks[index].1.push(ack),
                    None => {
                        ack_index.insert(handle.id, acks.len());
                        acks.push((handle, smallvec![ack]));
                    }
                }
            }
            Reply::Request(sender) => {
                let _ = sender.send(Ok(appended.clone()));
            }
        }
        if appended.duplicate {
            continue;
        }
        let message = appended.message;
        let index = match room_index.get(message.room.as_str()) {
            Some(&index) => index,
            None => {
                let room: Arc<str> = Arc::from(message.room.as_str());
                room_index.insert(Arc::clone(&room), rooms.len());
                rooms.push(ChatBatchBuilder::new(room));
                rooms.len() - 1
            }
        };
        rooms[index].push(&message);
    }
    ack_index.clear();
    room_index.clear();
    // Every write of the fan-out below goes to the kernel in one system call, when `sends`
    // is dropped (without io_uring, each is made at once).
    let sends = SendBatch::begin(send_ring);
    // Each sender's acks are held while the rooms fan out and go out with the sender's own
    // copy of its messages (one write), or on their own when released after.
    for (handle, frames) in acks.drain(..) {
        let item = match frames.into_inner() {
            Ok([one]) => Outbound::Event(one),
            Err(many) => Outbound::Events(many.into_iter().collect()),
        };
        handle.hold(item);
        held.push(handle);
    }
    let mut several_for_a_room = false;
    for room in rooms.drain(..) {
        several_for_a_room |= room.message_count() > 1;
        let name = Arc::clone(room.room());
        broker.publish(
            &name,
            Outbound::Chat(Arc::new(room.finish())),
            Priority::Reliable,
            None,
        );
    }
    for handle in held.drain(..) {
        handle.release();
    }
    drop(sends);
    several_for_a_room
}

/// How the committer waits out a linger.
enum LingerTimer {
    /// The operating system's own timer (a `timerfd` on Linux), to the microsecond (see the
    /// module's notes on tokio's). One, re-armed for each linger.
    Precise(tokio_timerd::Delay),
    /// tokio's own timer: if the system's cannot be had, and in unit tests, whose paused
    /// clock only tokio's timers follow.
    Coarse,
}

impl LingerTimer {
    fn new() -> LingerTimer {
        if cfg!(test) {
            return LingerTimer::Coarse;
        }
        match tokio_timerd::Delay::new(std::time::Instant::now()) {
            Ok(delay) => LingerTimer::Precise(delay),
            Err(err) => {
                tracing::warn!(error = %err, "no system timer: commits linger by tokio's timer");
                LingerTimer::Coarse
            }
        }
    }

    async fn sleep_until(&mut self, deadline: Instant) {
        if let LingerTimer::Precise(delay) = self {
            delay.reset(deadline.into_std());
            match delay.await {
                Ok(()) => return,
                Err(err) => {
                    tracing::warn!(error = %err, "the system timer failed: lingering by tokio's");
                    *self = LingerTimer::Coarse;
                }
            }
        }
        tokio::time::sleep_until(deadline).await;
    }
}

fn fail(reply: Reply, err: ChatError) {
    match reply {
        Reply::Session { handle, reference } => {
            let event = ServerEvent::Error {
                reference,
                code: err.code(),
                message: err.public_message(),
            };
            handle.push(&Outbound::Event(encode(&event)), Priority::Reliable);
        }
        Reply::Request(sender) => {
            let _ = sender.send(Err(err));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::LocalBroker;
    use crate::config::SqliteSync;
    use crate::hub::Hub;
    use crate::store::{RoomRecord, SqliteStore, now_ms};
    use confab_proto::UserRef;

    fn user(id: &str) -> UserRef {
        UserRef {
            id: id.into(),
            name: id.into(),
        }
    }

    fn message(room: &str, author: &str, n: u32) -> NewMessage {
        NewMessage {
            id: format!("{room}-{author}-{n}"),
            room: room.into(),
            user: Arc::new(user(author)),
            content: format!("{n}"),
            client_id: None,
            timestamp_ms: now_ms(),
        }
    }

    /// A store with rooms `r1` and `r2`, both with members `ann` and `bob`.
    async fn store_with_rooms(dir: &std::path::Path) -> Arc<dyn Store> {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir, SqliteSync::Normal).unwrap());
        for room in ["r1", "r2"] {
            let record = RoomRecord {
                id: room.into(),
                name: room.into(),
                private: false,
                owner: None,
                dm: false,
            };
            store
                .create_room(&record, &["ann".into(), "bob".into()])
                .await
                .unwrap();
        }
        store
    }

    fn from_ann(ann: &Arc<SessionHandle>, room: &str, n: u32) -> Pending {
        Pending {
            message: message(room, "ann", n),
            reply: Reply::Session {
                handle: Arc::clone(ann),
                reference: None,
            },
        }
    }

    /// The seqs of the next chat batch queued for a session, waiting (in real time: the
    /// SQLite writer is a thread of its own) until one arrives.
    async fn next_chat(queue: &mut crate::outbound::OutboundReceiver) -> Vec<u64> {
        for _ in 0..5000 {
            match queue.try_recv() {
                Some(Outbound::Chat(batch)) => return batch.seqs().collect(),
                Some(_) => {}
                None => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    tokio::task::yield_now().await;
                }
            }
        }
        panic!("no chat batch arrived");
    }

    #[tokio::test]
    async fn one_commit_is_one_queue_entry_per_subscriber_and_per_sender() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_rooms(dir.path()).await;
        let hub = Arc::new(Hub::new());
        let (ann, mut ann_queue) = SessionHandle::new(1, user("ann"), 16);
        let (watcher, mut watcher_queue) = SessionHandle::new(2, user("bob"), 16);
        hub.subscribe("r1", &watcher);
        hub.subscribe("r2", &watcher);

        // Queue a burst before the committer starts, so it lands in one commit.
        let stop = CancellationToken::new();
        let (committer, run) = Committer::start(
            store,
            Arc::new(LocalBroker::new(hub)),
            Duration::ZERO,
            true,
            stop.clone(),
        );
        for n in 0..20 {
            let room = if n % 2 == 0 { "r1" } else { "r2" };
            committer.submit(from_ann(&ann, room, n)).await.unwrap();
        }
        let task = tokio::spawn(run);
        stop.cancel();
        task.await.unwrap();

        // The sender: one entry holding all 20 acks, in order.
        match ann_queue.try_recv().unwrap() {
            Outbound::Events(acks) => assert_eq!(acks.len(), 20),
            other => panic!("{other:?}"),
        }
        assert!(ann_queue.try_recv().is_none());
        // The watcher: one entry per room, each with that room's seqs 1..=10 in order.
        for room in ["r1", "r2"] {
            match watcher_queue.try_recv().unwrap() {
                Outbound::Chat(batch) => {
                    assert_eq!(&**batch.room(), room);
                    let seqs: Vec<u64> = batch.seqs().collect();
                    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(watcher_queue.try_recv().is_none());
    }

    /// Before a commit the committer lets ready tasks run and takes what they submit; a lone
    /// message is committed without waiting; once a commit has stored several messages for
    /// one room, a message waits until `linger` after its arrival and what arrived meanwhile
    /// shares its commit; several messages for different rooms do not make the next wait.
    /// The clock is paused and only moves when the test advances it, so a committer that
    /// waited for an idle message would never deliver it.
    #[tokio::test(start_paused = true)]
    async fn the_committer_gathers_ready_messages_and_lingers_only_for_a_busy_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_rooms(dir.path()).await;
        let hub = Arc::new(Hub::new());
        let (ann, _ann_queue) = SessionHandle::new(1, user("ann"), 64);
        let (watcher, mut watcher_queue) = SessionHandle::new(2, user("bob"), 64);
        hub.subscribe("r1", &watcher);
        let stop = CancellationToken::new();
        let linger = Duration::from_millis(50);
        let (committer, run) = Committer::start(
            store,
            Arc::new(LocalBroker::new(hub)),
            linger,
            true,
            stop.clone(),
        );
        let task = tokio::spawn(run);
        // The test's steps run as a task of their own, as a session does: the future `block_on`
        // drives is polled only between batches of tasks, never queued among them.
        let stop_steps = stop.clone();
        tokio::spawn(async move {
            // Yields until the committer has taken everything submitted. Like the committer, this
            // task steps aside to the back of the queue: a session woken by its socket is already
            // in it, ready to run, when the committer yields.
            let taken = async || {
                while committer.queue.capacity() < QUEUE_DEPTH {
                    yield_to_ready_tasks().await;
                }
            };

            // Idle: committed without waiting.
            committer.submit(from_ann(&ann, "r1", 1)).await.unwrap();
            assert_eq!(next_chat(&mut watcher_queue).await, vec![1]);

            // The committer takes a message and steps aside; this task, ready to run, submits
            // another, which joins the same commit (and makes the committer busy).
            committer.submit(from_ann(&ann, "r1", 2)).await.unwrap();
            taken().await;
            committer.submit(from_ann(&ann, "r1", 3)).await.unwrap();
            assert_eq!(next_chat(&mut watcher_queue).await, vec![2, 3]);

            // Busy: the committer takes the next message, gathers nothing more and waits; one
            // sent 10 ms later joins its commit, which goes `linger` after the first arrived.
            let first_sent = tokio::time::Instant::now();
            committer.submit(from_ann(&ann, "r1", 4)).await.unwrap();
            taken().await;
            for _ in 0..4 * GATHER_ROUNDS {
                yield_to_ready_tasks().await;
            }
            tokio::time::advance(Duration::from_millis(10)).await;
            committer.submit(from_ann(&ann, "r1", 5)).await.unwrap();
            tokio::time::advance(linger - Duration::from_millis(11)).await;
            for _ in 0..4 * GATHER_ROUNDS {
                yield_to_ready_tasks().await;
            }
            assert!(
                watcher_queue.try_recv().is_none(),
                "not before its deadline"
            );
            tokio::time::advance(Duration::from_millis(1)).await;
            assert_eq!(next_chat(&mut watcher_queue).await, vec![4, 5]);
            // Not `linger` after the second (the paused clock would have been moved on to it).
            assert_eq!(first_sent.elapsed(), linger);

            // Several messages in one commit, but one per room: they share no write, and the
            // commit after them does not wait. (These two still wait, after the commit of 4
            // and 5.)
            committer.submit(from_ann(&ann, "r1", 6)).await.unwrap();
            taken().await;
            committer.submit(from_ann(&ann, "r2", 1)).await.unwrap();
            tokio::time::advance(linger).await;
            assert_eq!(next_chat(&mut watcher_queue).await, vec![6]);
            committer.submit(from_ann(&ann, "r1", 7)).await.unwrap();
            assert_eq!(next_chat(&mut watcher_queue).await, vec![7]);
            stop_steps.cancel();
        })
        .await
        .unwrap();
        task.await.unwrap();
    }
}
