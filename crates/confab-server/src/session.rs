//! One WebSocket connection: a single task that reads commands, writes queued frames, keeps the
//! heartbeat and closes the socket with the right code.
//!
//! The task owns the socket's reading side and the session's outlet. What other parts of the
//! server send ([`SessionHandle::push`]) is written straight into the socket by the pusher
//! when nothing is ahead of it; otherwise it is queued, and the task writes whatever has
//! accumulated in one flush. Replies to the client's own commands (`joined`, `history`,
//! `pong`, errors), heartbeats and the close frame are written by the task, through the same
//! outlet, so frames never interleave.
//!
//! Per room the outlet remembers the highest seq written and skips anything at or below it.
//! Combined with "subscribe, then read history" in `join`, and the room's mark being set in the
//! same step as the `joined` reply is written, this gives every subscriber each message exactly
//! once and in seq order.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use confab_proto::{ClientCommand, ErrorCode, Ref, ServerEvent, UserRef, close, parse_command};
use tungstenite::Utf8Bytes;

use crate::committer::{Pending, Reply};
use crate::error::ChatError;
use crate::heartbeat::Signal;
use crate::hub::Departure;
use crate::node::{Node, SessionLimiter, session_limiter};
use crate::outbound::{FlushOutcome, OutboundReceiver, SessionHandle, encode};
use crate::store::HistoryQuery;
use crate::websocket::{Frame, Incoming, ReadError, WebSocket, Written, try_write};

/// Queue entries taken per flush.
const WRITE_BATCH: usize = 128;

/// How long to wait for the peer to answer our close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// Write limit once shutdown has begun: healthy clients get their last frames, stuck ones do
/// not hold the process up.
const SHUTDOWN_WRITE_LIMIT: Duration = Duration::from_secs(1);

/// Consecutive rate-limited commands after which the connection is closed as a flood.
const FLOOD_LIMIT: u32 = 100;

/// Registers a session for an upgraded socket. A user already at the connection cap gets
/// `Err`, and the caller closes the socket with [`Refused::close`].
///
/// Starting is synchronous and the session boxed, so the task that then awaits
/// [`Session::run`] holds little more than that future: its size is paid by every connection.
pub(crate) fn start(
    node: Arc<Node>,
    socket: WebSocket,
    user: UserRef,
) -> Result<Box<Session>, Box<Refused>> {
    let id = node.next_session_id();
    let (handle, queue) = SessionHandle::new(id, user, node.config.outbound_queue);
    if let Err(err) = node.session_started(&handle) {
        return Err(Box::new(Refused {
            socket,
            reason: err.to_string(),
        }));
    }
    Ok(Box::new(Session {
        messages: session_limiter(node.config.message_rate, node.config.message_burst),
        commands: session_limiter(node.config.command_rate, node.config.command_burst),
        write_limit: node.config.write_timeout(),
        node,
        handle,
        queue,
        socket,
        refused_in_a_row: 0,
    }))
}

/// A connection that may not become a session (too many connections for its user).
pub(crate) struct Refused {
    socket: WebSocket,
    reason: String,
}

impl Refused {
    /// Tells the client why (close code 1008) and hangs up.
    pub(crate) async fn close(self, limit: Duration) {
        let goodbye = [Frame::Close(close::POLICY_VIOLATION, self.reason.into())];
        let stream = self.socket.stream();
        if let Ok(Written::Partly(written)) = try_write(stream.as_fd(), &goodbye, 0) {
            let _ = finish_write(stream, &goodbye, written, limit).await;
        }
        crate::websocket::shutdown(stream);
    }
}

impl Drop for Session {
    /// Cleans up however the session ends, even if its task panicked: leaves the hub, stops
    /// typing, and starts the presence grace period.
    fn drop(&mut self) {
        let rooms = self.queue.take_rooms();
        self.node.session_ended(&self.handle, rooms);
    }
}

/// What woke the session's loop.
enum Woken {
    /// Something is queued for the task to write, or the node raised a signal (shutdown,
    /// heartbeat timeout), or the session became slow.
    Queue,
    /// A message (or a read error) from the client.
    Inbound(Result<Incoming, ReadError>),
}

/// What is left of a client's message for the general (boxed) path once the synchronous
/// path for chat messages ([`Session::message_now`]) has done what it can.
enum Unfinished {
    /// Anything but a text frame, or a read error.
    Frame(Result<Incoming, ReadError>),
    /// A text frame that is not a valid command: its `ref`, if it had one, and what is wrong.
    Invalid(Option<Ref>, String),
    /// A command to handle in full.
    Command(ClientCommand),
    /// An admitted chat message the committer's queue has no room for yet, and its `ref`.
    Submit(Pending, Option<Ref>),
    /// An admitted chat message that was refused: its `ref` and why.
    Failed(Option<Ref>, ChatError),
}

/// Why the loop ended and what to tell the peer.
enum Ending {
    /// The connection broke: nothing more can be sent.
    Gone,
    /// The peer sent a close frame (with this code): answer it.
    PeerClosed(Option<u16>),
    /// Close with this code and reason.
    Close(u16, &'static str),
}

/// One connection's state, owned by its task.
pub(crate) struct Session {
    node: Arc<Node>,
    handle: Arc<SessionHandle>,
    queue: OutboundReceiver,
    socket: WebSocket,
    /// Chat message token bucket.
    messages: SessionLimiter,
    /// Token bucket for every other command.
    commands: SessionLimiter,
    /// Rate-limited commands since the last accepted one.
    refused_in_a_row: u32,
    /// How long one write may take: `write_timeout_ms`, shortened during shutdown.
    write_limit: Duration,
}

impl Session {
    /// Serves the connection until either side closes it.
    pub(crate) async fn run(mut self: Box<Self>) {
        // Encoded in a statement of its own: a value alive across an await (even a temporary of
        // the awaiting statement) is stored in the future, whose size every connection pays.
        let connected = Frame::Text(encode(&ServerEvent::Connected {
            user: UserRef::clone(&self.handle.user),
            session: self.handle.id.to_string(),
            heartbeat_ms: self.node.config.heartbeat_interval_ms,
        }));
        if Box::pin(self.write(connected)).await.is_err() {
            return;
        }
        // `connected` is out: from now on fan-out may write to the socket directly.
        self.queue.attach(Arc::clone(self.socket.stream()));
        // Pings, the heartbeat timeout and shutdown come from the node (`heartbeat`), as
        // signals on the outlet's waker: the task keeps no timer or waiter of its own.
        // Queue and socket take turns being looked at first: a busy queue must not starve
        // reading (and pongs), nor a busy reader starve the queue.
        let mut queue_first = false;
        let ending = loop {
            queue_first = !queue_first;
            // Polled by hand rather than with `select!`: the queue and the socket are waited on
            // through their poll functions, which keep no future, so an idle session's task
            // holds nothing but its state.
            let woken = std::future::poll_fn(|cx| {
                for turn in [queue_first, !queue_first] {
                    if turn {
                        if self.queue.poll_ready(cx).is_ready() {
                            return Poll::Ready(Woken::Queue);
                        }
                    } else if let Poll::Ready(inbound) = self.socket.poll_message(cx) {
                        return Poll::Ready(Woken::Inbound(inbound));
                    }
                }
                Poll::Pending
            })
            .await;
            match woken {
                Woken::Queue if self.handle.raised(Signal::Shutdown) => {
                    // Hand over what is already queued (acks, messages), then say goodbye; a
                    // client that does not read gets only a short grace, so shutdown stays
                    // bounded.
                    self.write_limit = SHUTDOWN_WRITE_LIMIT;
                    let _ = Box::pin(self.flush(&[], None, usize::MAX)).await;
                    break Ending::Close(close::GOING_AWAY, "server shutting down");
                }
                Woken::Queue => {
                    if self.handle.raised(Signal::TimedOut) {
                        break Ending::Close(close::POLICY_VIOLATION, "heartbeat timeout");
                    }
                    if self.handle.is_slow() {
                        break Ending::Close(
                            close::TRY_AGAIN_LATER,
                            "too slow: outbound queue overflowed; re-join with since",
                        );
                    }
                    // Without waiting, the usual case; only a blocked write becomes a (boxed)
                    // future, so none is kept inline in every session's task.
                    let flushed = match self.flush_now(&[], None, WRITE_BATCH) {
                        Ok(None) => Ok(()),
                        Ok(Some((frames, written))) => {
                            Box::pin(self.finish_flush(frames, written)).await
                        }
                        Err(()) => Err(()),
                    };
                    if flushed.is_err() {
                        break Ending::Gone;
                    }
                }
                Woken::Inbound(inbound) => {
                    self.handle.heard();
                    let Some(unfinished) = self.message_now(inbound) else {
                        continue;
                    };
                    // Boxed, like every path an idle session is not waiting in: the task's
                    // future is as large as its largest state.
                    if let Err(ending) = Box::pin(self.finish_inbound(unfinished)).await {
                        break ending;
                    }
                }
            }
        };
        Box::pin(self.end(ending)).await;
    }

    /// Handles what [`Session::message_now`] left of one message from the client. `Err` ends
    /// the connection.
    async fn finish_inbound(&mut self, unfinished: Unfinished) -> Result<(), Ending> {
        let inbound = match unfinished {
            Unfinished::Frame(inbound) => inbound,
            Unfinished::Invalid(reference, message) => {
                return self.on_invalid(reference, message).await;
            }
            Unfinished::Command(command) => return self.on_command(command).await,
            Unfinished::Submit(pending, reference) => {
                return match self.node.committer.submit(pending).await {
                    Ok(()) => Ok(()),
                    Err(err) => self.send_error(reference, &err).await,
                };
            }
            Unfinished::Failed(reference, err) => return self.send_error(reference, &err).await,
        };
        let sent = match inbound {
            // `message_now` takes text frames apart; one that came here whole is handled in
            // full all the same.
            Ok(Incoming::Text(text)) => return self.on_text(&text).await,
            Ok(Incoming::Binary) => {
                let error = error_event(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text frames".into(),
                );
                self.send(&error).await
            }
            Ok(Incoming::Ping(payload)) => self.write(Frame::Pong(payload.into())).await,
            Ok(Incoming::Pong) => Ok(()),
            Ok(Incoming::Close(code)) => return Err(Ending::PeerClosed(code)),
            Err(err) => return Err(ending_for(&err)),
        };
        sent.map_err(|()| Ending::Gone)
    }

    /// Says goodbye the way `ending` calls for.
    async fn end(&mut self, ending: Ending) {
        match ending {
            Ending::Close(code, reason) => self.close(code, reason).await,
            // Answer the peer's close with its own code (RFC 6455 §5.5.1), then hang up.
            Ending::PeerClosed(code) => {
                let code = code
                    .filter(|c| sendable_close_code(*c))
                    .unwrap_or(close::NORMAL);
                self.write_limit = CLOSE_HANDSHAKE.min(self.write_limit);
                let _ = self.write(Frame::Close(code, Utf8Bytes::default())).await;
                crate::websocket::shutdown(self.socket.stream());
            }
            Ending::Gone => {}
        }
    }

    /// Sends a close frame and waits briefly for the peer's reply before the socket is dropped.
    /// Dropping at once could reset the connection and destroy the close frame (and any data
    /// before it) in the peer's receive buffer, so the client would never learn the code.
    async fn close(&mut self, code: u16, reason: &'static str) {
        if self
            .write(Frame::Close(code, Utf8Bytes::from_static(reason)))
            .await
            .is_err()
        {
            return;
        }
        let drain = async {
            while let Ok(message) = self.socket.read_message().await {
                if matches!(message, Incoming::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE.min(self.write_limit), drain).await;
        crate::websocket::shutdown(self.socket.stream());
    }

    /// Writes, through the outlet: the rest of an unfinished direct write, `first`, then up to
    /// `take` queued entries, in one vectored write of the shared encoded frames (no copies).
    /// Only what the socket does not take at once goes on asynchronously, bounded by the write
    /// limit; direct writes queue up meanwhile.
    async fn flush(
        &mut self,
        first: &[Frame],
        open: Option<(Arc<str>, u64)>,
        take: usize,
    ) -> Result<(), ()> {
        match self.flush_now(first, open, take)? {
            None => Ok(()),
            // Boxed: waiting for the socket (and the write timer) is rare, and inline it would
            // make every session's future that much larger.
            Some((frames, written)) => Box::pin(self.finish_flush(frames, written)).await,
        }
    }

    /// The part of [`Session::flush`] that does not wait: returns the frames the socket did
    /// not take at once and how many bytes of them it did.
    fn flush_now(
        &mut self,
        first: &[Frame],
        open: Option<(Arc<str>, u64)>,
        take: usize,
    ) -> Result<Option<(Vec<Frame>, usize)>, ()> {
        let flushed = self.queue.flush(self.socket.stream(), first, open, take);
        for room in flushed.left {
            // A join racing the loss may have subscribed us again: undo that too, so the hub
            // and this session agree.
            self.leave_room(&room);
        }
        match flushed.outcome {
            FlushOutcome::Done => Ok(None),
            FlushOutcome::Failed => Err(()),
            FlushOutcome::Blocked(frames, written) => Ok(Some((frames, written))),
        }
    }

    /// Waits for the socket to take the rest of a blocked flush, then reopens the outlet.
    async fn finish_flush(&mut self, frames: Vec<Frame>, written: usize) -> Result<(), ()> {
        let stream = self.socket.stream();
        let finished = finish_write(stream, &frames, written, self.write_limit).await;
        self.queue.unblock();
        finished
    }

    /// Writes one frame of the task's own (and whatever is queued behind it). A close frame
    /// goes alone and is the last one.
    async fn write(&mut self, frame: Frame) -> Result<(), ()> {
        let take = if frame.is_close() { 0 } else { WRITE_BATCH };
        self.flush(&[frame], None, take).await
    }

    async fn send(&mut self, event: &ServerEvent) -> Result<(), ()> {
        self.write(Frame::Text(encode(event))).await
    }

    /// Handles one text frame. `Err` ends the connection.
    async fn on_text(&mut self, text: &str) -> Result<(), Ending> {
        match parse_command(text) {
            Ok(command) => self.on_command(command).await,
            Err((reference, message)) => self.on_invalid(reference, message).await,
        }
    }

    /// Answers a text frame that is not a valid command.
    async fn on_invalid(&mut self, reference: Option<Ref>, message: String) -> Result<(), Ending> {
        if !self.admit(false) {
            return self.refuse(reference).await;
        }
        let error = error_event(reference, ErrorCode::BadRequest, message);
        self.send(&error).await.map_err(|()| Ending::Gone)
    }

    /// Answers a command with its error.
    async fn send_error(&mut self, reference: Option<Ref>, err: &ChatError) -> Result<(), Ending> {
        let error = error_event(reference, err.code(), err.public_message());
        self.send(&error).await.map_err(|()| Ending::Gone)
    }

    /// The usual command, a chat message to a room this session has joined, handled on the
    /// spot: nothing in it waits unless the committer's queue is full, so it needs none of
    /// the general path's (boxed) futures. `None` when it is done; otherwise what is left for
    /// [`Session::finish_inbound`]: any other frame or command, a message to a room the
    /// session has not joined or one over the rate limit (neither admitted yet), a refusal
    /// to answer or a submission that has to wait.
    fn message_now(&mut self, inbound: Result<Incoming, ReadError>) -> Option<Unfinished> {
        let text = match inbound {
            Ok(Incoming::Text(text)) => text,
            other => return Some(Unfinished::Frame(other)),
        };
        let command = match parse_command(&text) {
            Ok(command) => command,
            Err((reference, message)) => return Some(Unfinished::Invalid(reference, message)),
        };
        let ClientCommand::Message {
            reference,
            room,
            content,
            client_id,
        } = command
        else {
            return Some(Unfinished::Command(command));
        };
        if !self.queue.is_subscribed(&room) || !self.admit(true) {
            return Some(Unfinished::Command(ClientCommand::Message {
                reference,
                room,
                content,
                client_id,
            }));
        }
        if let Err(err) = self.node.validate_content(&content, client_id.as_deref()) {
            return Some(Unfinished::Failed(reference, err));
        }
        let message =
            self.node
                .new_message(Arc::clone(&self.handle.user), room, content, client_id);
        let pending = Pending {
            message,
            reply: Reply::Session {
                handle: Arc::clone(&self.handle),
                reference: reference.clone(),
            },
        };
        match self.node.committer.try_submit(pending) {
            Ok(None) => None,
            Ok(Some(pending)) => Some(Unfinished::Submit(pending, reference)),
            Err(err) => Some(Unfinished::Failed(reference, err)),
        }
    }

    /// Handles one command. `Err` ends the connection.
    async fn on_command(&mut self, command: ClientCommand) -> Result<(), Ending> {
        let is_message = matches!(command, ClientCommand::Message { .. });
        if !self.admit(is_message) {
            return self.refuse(command.reference().cloned()).await;
        }
        let reference = command.reference().cloned();
        // Boxed: the command futures (join reads history and members) are much larger than an
        // idle session, and would otherwise make every session's state that large.
        match Box::pin(self.dispatch(command)).await {
            Ok(Answer::Reply(reply)) => self.send(&reply).await.map_err(|()| Ending::Gone),
            Ok(Answer::Joined { reply, room, mark }) => {
                let frame = [Frame::Text(encode(&reply))];
                self.flush(&frame, Some((room, mark)), WRITE_BATCH)
                    .await
                    .map_err(|()| Ending::Gone)
            }
            Ok(Answer::Nothing) => Ok(()),
            Err(err) => self.send_error(reference, &err).await,
        }
    }

    /// Takes a token from the right bucket.
    fn admit(&mut self, is_message: bool) -> bool {
        let limiter = if is_message {
            &self.messages
        } else {
            &self.commands
        };
        let admitted = limiter.check().is_ok();
        if admitted {
            self.refused_in_a_row = 0;
        }
        admitted
    }

    async fn refuse(&mut self, reference: Option<Ref>) -> Result<(), Ending> {
        self.refused_in_a_row += 1;
        if self.refused_in_a_row > FLOOD_LIMIT {
            return Err(Ending::Close(
                close::POLICY_VIOLATION,
                "flooding: too many rate-limited commands",
            ));
        }
        let error = error_event(
            reference,
            ErrorCode::RateLimited,
            "rate limit exceeded; slow down".into(),
        );
        self.send(&error).await.map_err(|()| Ending::Gone)
    }

    /// Executes a command; returns its answer, if it has one besides errors.
    async fn dispatch(&mut self, command: ClientCommand) -> Result<Answer, ChatError> {
        let node = Arc::clone(&self.node);
        let user = self.handle.user.clone();
        match command {
            ClientCommand::Join {
                reference,
                room,
                since,
            } => self.join(reference, &room, since).await,
            ClientCommand::Leave { reference, room } => {
                if let Some(key) = self.queue.forget_room(&room) {
                    self.leave_room(&key);
                }
                Ok(Answer::Reply(ServerEvent::Left { reference, room }))
            }
            ClientCommand::Message {
                reference,
                room,
                content,
                client_id,
            } => {
                node.validate_content(&content, client_id.as_deref())?;
                if !self.queue.is_subscribed(&room) {
                    node.require_member(&user, &room).await?;
                }
                let message = node.new_message(user, room, content, client_id);
                let reply = Reply::Session {
                    handle: Arc::clone(&self.handle),
                    reference,
                };
                node.committer.submit(Pending { message, reply }).await?;
                Ok(Answer::Nothing)
            }
            ClientCommand::Typing {
                room, is_typing, ..
            } => {
                let key = self.subscribed(&room)?;
                node.set_typing(&key, &self.handle, is_typing);
                Ok(Answer::Nothing)
            }
            ClientCommand::Read { room, seq, .. } => {
                node.mark_read(&user, &room, seq).await?;
                Ok(Answer::Nothing)
            }
            ClientCommand::History {
                reference,
                room,
                before,
                after,
                limit,
            } => {
                let page = node.history(&user, &room, before, after, limit).await?;
                Ok(Answer::Reply(ServerEvent::History {
                    reference,
                    room,
                    messages: page.messages,
                    has_more: page.has_more,
                }))
            }
            ClientCommand::Status { status, .. } => {
                node.set_status(&self.handle, status);
                Ok(Answer::Nothing)
            }
            ClientCommand::Ping { reference } => Ok(Answer::Reply(ServerEvent::Pong { reference })),
        }
    }

    /// After the session forgot a room: stops its typing there, unsubscribes it from the hub,
    /// and tells the room `user_left` if it was the user's last session in it.
    fn leave_room(&self, room: &Arc<str>) {
        let user = &self.handle.user;
        self.node.set_typing(room, &self.handle, false);
        if self
            .node
            .hub
            .unsubscribe(room, self.handle.id, &user.id, Departure::Leave)
        {
            self.node.announce_user_left(room, user);
        }
    }

    fn subscribed(&self, room: &str) -> Result<Arc<str>, ChatError> {
        self.queue
            .room(room)
            .ok_or_else(|| ChatError::BadRequest(format!("join room {room:?} first")))
    }

    /// Subscribe first, then read history: anything committed in between arrives live, and the
    /// delivered-seq watermark drops what the history already contained. Until the answer is
    /// written (with the watermark, in the same step), the room's live frames wait in the queue.
    async fn join(
        &mut self,
        reference: Option<Ref>,
        room_id: &str,
        since: Option<u64>,
    ) -> Result<Answer, ChatError> {
        let node = Arc::clone(&self.node);
        let user = self.handle.user.clone();
        let already = self.queue.room(room_id).is_some();
        if !already && self.queue.room_count() >= node.config.max_rooms_per_session {
            return Err(ChatError::Forbidden(format!(
                "a session may join at most {} rooms",
                node.config.max_rooms_per_session
            )));
        }
        let joined = node.enter_room(&user, room_id).await?;
        // Before subscribing, so no live frame of the room finds it unknown and is skipped.
        let joining = self.queue.begin_join(room_id);
        let subscribed = node.hub.subscribe(room_id, &self.handle);
        let query = match since {
            Some(since) => HistoryQuery::After {
                after: since,
                before: None,
                limit: node.config.max_history_page,
            },
            None => node.history_query(None, None, None)?,
        };
        let loaded = async {
            let snapshot = node
                .store
                .join_snapshot(room_id, &user.id, query, node.config.join_members)
                .await?;
            // Membership may have ended (REST leave, room deleted) between the check above and
            // the subscription: it is read again, now that live messages are flowing to us.
            if snapshot.read_seq.is_none() {
                return Err(ChatError::Forbidden(format!(
                    "not a member of room {room_id:?}"
                )));
            }
            let members = node.with_presence(snapshot.members);
            Ok::<_, ChatError>((snapshot.page, members, snapshot.member_count))
        }
        .await;
        let (page, members, member_count) = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                if subscribed.fresh {
                    let undo = Departure::Undo(subscribed.cancelled_departure);
                    node.hub
                        .unsubscribe(room_id, self.handle.id, &user.id, undo);
                }
                if joining {
                    self.queue.forget_room(room_id);
                }
                return Err(err);
            }
        };
        let newest_sent = page.messages.last().map_or(0, |m| m.seq);
        let watermark = if page.has_more {
            newest_sent
        } else {
            page.last_seq.max(newest_sent)
        };
        if subscribed.announce {
            node.announce_user_joined(room_id, &user, self.handle.id);
        }
        Ok(Answer::Joined {
            reply: ServerEvent::Joined {
                reference,
                room: joined.room.info(),
                members,
                member_count,
                messages: page.messages,
                has_more: page.has_more,
                read_seq: joined.read_seq,
            },
            room: subscribed.room,
            mark: watermark,
        })
    }
}

/// Writes what the socket did not take at once (after `written` bytes), within `limit`. Boxed,
/// so waiting for a slow reader does not make every session's state larger.
async fn finish_write(
    stream: &tokio::net::TcpStream,
    frames: &[Frame],
    written: usize,
    limit: Duration,
) -> Result<(), ()> {
    let rest = tokio::time::timeout(
        limit,
        crate::websocket::finish_write(stream, frames, written),
    );
    match Box::pin(rest).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// What a command answers.
enum Answer {
    /// Nothing (errors aside): the outcome arrives later or not at all.
    Nothing,
    /// This event.
    Reply(ServerEvent),
    /// A `joined` event, whose writing also opens the room to live frames above `mark`.
    Joined {
        reply: ServerEvent,
        room: Arc<str>,
        mark: u64,
    },
}

fn error_event(reference: Option<Ref>, code: ErrorCode, message: String) -> ServerEvent {
    ServerEvent::Error {
        reference,
        code,
        message,
    }
}

/// Codes a close frame may carry (RFC 6455 §7.4): a peer's reserved or unknown code is not
/// echoed back.
fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Maps a read error to how the connection ends: oversized frames get 1009, bad UTF-8 1007,
/// protocol violations 1002; a broken connection gets nothing.
fn ending_for(err: &ReadError) -> Ending {
    match err {
        ReadError::TooBig => Ending::Close(close::MESSAGE_TOO_BIG, "frame exceeds the size limit"),
        ReadError::InvalidUtf8 => Ending::Close(close::INVALID_PAYLOAD, "invalid UTF-8"),
        ReadError::Protocol(why) => Ending::Close(close::PROTOCOL_ERROR, why),
        ReadError::Closed | ReadError::Io(_) => Ending::Gone,
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection pays for these (W3 measures server memory per idle connection): a
    /// field added carelessly shows up here first.
    #[test]
    fn per_connection_structs_stay_small() {
        assert!(
            std::mem::size_of::<Session>() <= 192,
            "{}",
            std::mem::size_of::<Session>()
        );
        let handle = std::mem::size_of::<SessionHandle>();
        assert!(handle <= 256, "{handle}");
        assert!(std::mem::size_of::<SessionLimiter>() <= 32);
    }
}
