//! The path of a chat message from "accepted" to "stored, acked and delivered".
//!
//! Sessions and REST handlers hand messages to one committer task. It takes everything that has
//! queued up while the previous batch was being written, stores it with a single
//! [`Store::append`] (one commit), and then, in seq order, acks each sender and publishes each
//! new message once-encoded to the room. Because batches are processed one after another and
//! the store assigns seqs in batch order, every room's messages are published in seq order.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use confab_proto::{Ref, ServerEvent};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::error::ChatError;
use crate::outbound::{ChatBatch, ChatFrame, Outbound, Priority, SessionHandle, encode};
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
    /// still queued and ends; the returned future completes at that point.
    pub fn start(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        stop: CancellationToken,
    ) -> (Committer, impl Future<Output = ()> + Send + 'static) {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let task = run(receiver, store, broker, stop);
        (Committer { queue }, task)
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
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let received = tokio::select! {
            received = receiver.recv_many(&mut batch, MAX_BATCH) => received,
            () = stop.cancelled() => break,
        };
        if received == 0 {
            return;
        }
        commit(&mut batch, store.as_ref(), broker.as_ref()).await;
    }
    // Shutting down: refuse new messages, store everything already accepted.
    receiver.close();
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        commit(&mut batch, store.as_ref(), broker.as_ref()).await;
    }
}

async fn commit(batch: &mut Vec<Pending>, store: &dyn Store, broker: &dyn Broker) {
    let (messages, replies): (Vec<_>, Vec<_>) =
        batch.drain(..).map(|p| (p.message, p.reply)).unzip();
    let results = match store.append(messages).await {
        Ok(results) => results,
        Err(err) => {
            tracing::error!(error = %err, "storing a batch of messages failed");
            for reply in replies {
                fail(reply, ChatError::Store(err.clone()));
            }
            return;
        }
    };
    // Acks grouped per sending session and new messages grouped per room, both in seq order,
    // so each session and each subscriber gets one queue entry for the whole commit.
    let mut acks: Vec<(Arc<SessionHandle>, Vec<Utf8Bytes>)> = Vec::new();
    let mut rooms: Vec<ChatBatch> = Vec::new();
    for (result, reply) in results.into_iter().zip(replies) {
        let appended = match result {
            Ok(appended) => appended,
            Err(err) => {
                fail(reply, ChatError::from(err));
                continue;
            }
        };
        match reply {
            Reply::Session { handle, reference } => {
                let ack = encode(&ServerEvent::Ack {
                    reference,
                    id: appended.message.id.clone(),
                    seq: appended.message.seq,
                    client_id: appended.message.client_id.clone(),
                });
                match acks.iter_mut().find(|(h, _)| h.id == handle.id) {
                    Some((_, frames)) => frames.push(ack),
                    None => acks.push((handle, vec![ack])),
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
        let frame = ChatFrame {
            seq: message.seq,
            frame: encode(&ServerEvent::Message(message.clone())),
        };
        match rooms.iter_mut().find(|b| *b.room == *message.room) {
            Some(room) => room.frames.push(frame),
            None => rooms.push(ChatBatch {
                room: Arc::from(message.room.as_str()),
                frames: vec![frame],
            }),
        }
    }
    for (handle, frames) in acks {
        let item = match <[Utf8Bytes; 1]>::try_from(frames) {
            Ok([one]) => Outbound::Event(one),
            Err(many) => Outbound::Events(many.into()),
        };
        handle.push(item, Priority::Reliable);
    }
    for room in rooms {
        let name = Arc::clone(&room.room);
        broker.publish(
            &name,
            Outbound::Chat(Arc::new(room)),
            Priority::Reliable,
            None,
        );
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
            handle.push(Outbound::Event(encode(&event)), Priority::Reliable);
        }
        Reply::Request(sender) => {
            let _ = sender.send(Err(err));
        }
    }
}
