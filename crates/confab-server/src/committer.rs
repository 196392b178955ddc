//! The path of a chat message from "accepted" to "stored, acked and delivered".
//!
//! Sessions and REST handlers hand messages to one committer task. It takes everything that has
//! queued up while the previous batch was being written, stores it with a single
//! [`Store::append`] (one commit), and then, in seq order, acks each sender and publishes each
//! new message once-encoded to the room. Because batches are processed one after another and
//! the store assigns seqs in batch order, every room's messages are published in seq order.

use std::sync::Arc;

use confab_proto::{Ref, ServerEvent};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::error::ChatError;
use crate::outbound::{ChatFrame, Outbound, Priority, SessionHandle, encode};
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
    match store.append(messages).await {
        Ok(results) => {
            for (result, reply) in results.into_iter().zip(replies) {
                match result {
                    Ok(appended) => deliver(appended, reply, broker),
                    Err(err) => fail(reply, ChatError::from(err)),
                }
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "storing a batch of messages failed");
            for reply in replies {
                fail(reply, ChatError::Store(err.clone()));
            }
        }
    }
}

fn deliver(appended: Appended, reply: Reply, broker: &dyn Broker) {
    let duplicate = appended.duplicate;
    let frame = (!duplicate).then(|| encode_chat(&appended));
    match reply {
        Reply::Session { handle, reference } => {
            let ack = ServerEvent::Ack {
                reference,
                id: appended.message.id.clone(),
                seq: appended.message.seq,
                client_id: appended.message.client_id.clone(),
            };
            handle.push(Outbound::Event(encode(&ack)), Priority::Reliable);
        }
        Reply::Request(sender) => {
            let _ = sender.send(Ok(appended.clone()));
        }
    }
    if let Some(frame) = frame {
        let room = Arc::clone(&frame.room);
        broker.publish(&room, Outbound::Chat(frame), Priority::Reliable, None);
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

/// Encodes a stored message once for all of its subscribers.
fn encode_chat(appended: &Appended) -> Arc<ChatFrame> {
    let message = &appended.message;
    Arc::new(ChatFrame {
        room: Arc::from(message.room.as_str()),
        seq: message.seq,
        frame: encode(&ServerEvent::Message(message.clone())),
    })
}
