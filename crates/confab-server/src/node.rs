//! The node: one running confab server and every chat operation it offers.
//!
//! REST handlers and WebSocket sessions both call into [`Node`], so a message posted over REST
//! and one sent over a socket take exactly the same path (validation, membership, committer,
//! broker). The node owns the shared parts (store, hub, broker, presence, typing, committer) and
//! the shutdown token and task tracker every background task is registered with.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confab_proto::{
    Member, PresenceStatus, RoomSummary, ServerEvent, SettableStatus, UserPresence, UserRef,
    is_valid_room_name,
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tungstenite::Utf8Bytes;

use crate::auth::{self, TokenKeys};
use crate::broker::Broker;
use crate::committer::{Committer, Pending, Reply};
use crate::config::Config;
use crate::error::ChatError;
use crate::heartbeat::{self, Signal};
use crate::hub::{Departure, Hub};
use crate::outbound::{Outbound, Priority, SessionHandle, SessionId, encode};
use crate::presence::{AfterDisconnect, Presence, StatusChange, TooManyConnections};
use crate::store::{
    Appended, HistoryPage, HistoryQuery, NewMessage, RoomMember, RoomRecord, Store, StoreError,
    now_ms,
};
use crate::typing::Typing;

/// Register/login attempts per second per client address, and the burst allowed.
const AUTH_RATE: u32 = 2;
const AUTH_BURST: u32 = 20;

/// Entries in the known-users cache before it starts over.
const KNOWN_USERS_CAP: usize = 100_000;

/// Which (user id, name) pairs are in the store already, as 128-bit fingerprints rather than
/// copies of the strings: one entry per connected user adds up, and the strings cost about
/// 150 bytes per connection (W3) where a fingerprint costs 17 plus the table's slack. The keys
/// are random per process, so nobody can aim a collision; by chance one is about as likely as
/// guessing two 64-bit secrets.
#[derive(Debug, Default)]
struct KnownUsers {
    keys: [RandomState; 2],
    seen: HashSet<u128>,
}

impl KnownUsers {
    /// The user's fingerprint if it is not known yet (to [`KnownUsers::remember`] once the
    /// store has it).
    fn unknown(&self, user: &UserRef) -> Option<u128> {
        let [high, low] = &self.keys;
        let pair = (&user.id, &user.name);
        let fingerprint = (u128::from(high.hash_one(pair)) << 64) | u128::from(low.hash_one(pair));
        (!self.seen.contains(&fingerprint)).then_some(fingerprint)
    }

    /// Notes a user the store has; starts over at [`KNOWN_USERS_CAP`].
    fn remember(&mut self, fingerprint: u128) {
        if self.seen.len() >= KNOWN_USERS_CAP {
            self.seen.clear();
        }
        self.seen.insert(fingerprint);
    }
}

/// How often expired typing indicators are swept.
const TYPING_SWEEP: Duration = Duration::from_millis(250);

/// One confab server's shared state and operations.
#[derive(Debug)]
pub struct Node {
    /// Effective configuration.
    pub config: Arc<Config>,
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Token signing and verification.
    pub tokens: TokenKeys,
    /// Local subscriptions.
    pub hub: Arc<Hub>,
    /// Room fan-out (local, or across nodes).
    pub broker: Arc<dyn Broker>,
    /// User-level online status.
    pub presence: Presence,
    /// Typing indicators.
    pub typing: Typing,
    /// Group-commit pipeline for chat messages.
    pub committer: Committer,
    /// Cancelled when the server begins shutting down: sessions close with 1001, timers stop.
    pub shutdown: CancellationToken,
    /// Every session and timer task, so shutdown can wait for all of them.
    pub tasks: TaskTracker,
    next_session: AtomicU64,
    /// Token users already written to the store with their current name, so a reconnect
    /// costs no write. Bounded: cleared when it reaches [`KNOWN_USERS_CAP`].
    known_users: Mutex<KnownUsers>,
    /// Presence changes waiting for the announcer task.
    presence_changes: mpsc::UnboundedSender<(UserRef, StatusChange)>,
    /// REST message sends, per user.
    rest_messages: DefaultKeyedRateLimiter<String>,
    /// Register and login attempts, per client address (password guessing, hashing floods).
    auth_attempts: DefaultKeyedRateLimiter<std::net::IpAddr>,
}

/// What a session needs to answer `join`.
#[derive(Debug)]
pub struct JoinedRoom {
    /// The room.
    pub room: RoomRecord,
    /// The user's stored read position.
    pub read_seq: u64,
}

impl Node {
    /// Assembles a node and starts its background tasks (typing expiry, presence announcer)
    /// on its task tracker. The committer's task is started by the caller (see `Server`).
    pub fn start(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        tokens: TokenKeys,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        committer: Committer,
    ) -> Arc<Node> {
        let rest_quota = quota(config.message_rate, config.message_burst);
        let (presence_changes, presence_queue) = mpsc::unbounded_channel();
        let node = Arc::new(Node {
            typing: Typing::new(config.typing_timeout()),
            config,
            store,
            tokens,
            hub,
            broker,
            presence: Presence::default(),
            committer,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            next_session: AtomicU64::new(1),
            known_users: Mutex::new(KnownUsers::default()),
            presence_changes,
            rest_messages: RateLimiter::keyed(rest_quota),
            auth_attempts: RateLimiter::keyed(quota(AUTH_RATE, AUTH_BURST)),
        });
        node.tasks.spawn(Arc::clone(&node).run_housekeeping());
        node.tasks.spawn(heartbeat::run(Arc::clone(&node)));
        {
            let hub = Arc::clone(&node.hub);
            let shutdown = node.shutdown.clone();
            node.tasks
                .spawn(async move { hub.run_notices(shutdown).await });
        }
        node.tasks
            .spawn(Arc::clone(&node).run_presence_announcer(presence_queue));
        node
    }

    // ---- identity -------------------------------------------------------------------------

    /// Verifies a token and makes sure its user exists in the store.
    pub async fn authenticate(&self, token: &str) -> Result<UserRef, ChatError> {
        let user = self.tokens.verify(token)?;
        let unknown = self.known_users.lock().expect("known users").unknown(&user);
        if let Some(fingerprint) = unknown {
            self.store.ensure_user(&user).await?;
            self.known_users
                .lock()
                .expect("known users")
                .remember(fingerprint);
        }
        Ok(user)
    }

    /// Creates a password account and returns it with a token.
    pub async fn register(
        &self,
        name: &str,
        password: &str,
    ) -> Result<(UserRef, String), ChatError> {
        let user = create_account(self.store.as_ref(), name, password).await?;
        let token = self.tokens.issue(&user, None);
        Ok((user, token))
    }

    /// Counts a register or login attempt from `peer`; refuses past the per-address limit.
    pub fn check_auth_attempt(&self, peer: std::net::IpAddr) -> Result<(), ChatError> {
        self.auth_attempts.check_key(&peer).map_err(|_| {
            ChatError::RateLimited("too many login or register attempts; wait a little".into())
        })
    }

    /// Checks a username and password and returns the account with a fresh token.
    pub async fn login(&self, name: &str, password: &str) -> Result<(UserRef, String), ChatError> {
        let bad = || ChatError::Unauthorized("invalid username or password".into());
        let Some((user, hash)) = self.store.account(name).await? else {
            return Err(bad());
        };
        let password = password.to_string();
        let ok = auth::verify_password_limited(hash, password).await;
        if !ok {
            return Err(bad());
        }
        let token = self.tokens.issue(&user, None);
        Ok((user, token))
    }

    // ---- rooms ----------------------------------------------------------------------------

    /// Creates a room owned by `user`, who becomes its first member.
    pub async fn create_room(
        &self,
        user: &UserRef,
        name: &str,
        private: bool,
    ) -> Result<RoomRecord, ChatError> {
        if !is_valid_room_name(name) {
            return Err(invalid_room_name(name));
        }
        let room = RoomRecord {
            id: name.to_string(),
            name: name.to_string(),
            private,
            owner: Some(user.id.clone()),
            dm: false,
        };
        self.store
            .create_room(&room, std::slice::from_ref(&user.id))
            .await?;
        self.notify_room_added(&user.id, &room);
        Ok(room)
    }

    /// Adds the user called `username` to a room the caller belongs to: how private rooms get
    /// members. Anyone in the room may add (there are no roles); DM rooms keep their two users.
    pub async fn add_member(
        &self,
        user: &UserRef,
        room_id: &str,
        username: &str,
    ) -> Result<UserRef, ChatError> {
        self.require_member(user, room_id).await?;
        let room = self
            .store
            .room(room_id)
            .await?
            .ok_or_else(|| ChatError::room_not_found(room_id))?;
        if room.dm {
            return Err(ChatError::Forbidden(
                "a direct-message room has exactly its two users".into(),
            ));
        }
        let added = self
            .store
            .user_by_name(username)
            .await?
            .ok_or_else(|| ChatError::NotFound(format!("no user named {username:?}")))?;
        if self.store.add_member(room_id, &added.id).await? {
            self.notify_room_added(&added.id, &room);
        }
        Ok(added)
    }

    /// Tells every session of `user_id` that it now belongs to `room`.
    fn notify_room_added(&self, user_id: &str, room: &RoomRecord) {
        let sessions = self.presence.sessions_of(user_id);
        if sessions.is_empty() {
            return;
        }
        let item = Outbound::Event(encode(&ServerEvent::RoomAdded { room: room.info() }));
        for session in sessions {
            session.push(&item, Priority::Reliable);
        }
    }

    /// Makes `user` a member of a room they may join, creating unknown public rooms on demand.
    /// This is the rule behind both WebSocket `join` and `POST /api/rooms/{room}/join`.
    pub async fn enter_room(&self, user: &UserRef, room_id: &str) -> Result<JoinedRoom, ChatError> {
        let (room, membership) = match self.store.room_and_membership(room_id, &user.id).await? {
            Some(found) => found,
            None if self.config.auto_create_rooms && is_valid_room_name(room_id) => {
                let room = RoomRecord {
                    id: room_id.to_string(),
                    name: room_id.to_string(),
                    private: false,
                    owner: Some(user.id.clone()),
                    dm: false,
                };
                match self
                    .store
                    .create_room(&room, std::slice::from_ref(&user.id))
                    .await
                {
                    Ok(()) => return Ok(JoinedRoom { room, read_seq: 0 }),
                    // Someone created it meanwhile (perhaps as private): apply the usual rules.
                    Err(StoreError::Conflict(_)) => self
                        .store
                        .room_and_membership(room_id, &user.id)
                        .await?
                        .ok_or_else(|| ChatError::room_not_found(room_id))?,
                    Err(err) => return Err(err.into()),
                }
            }
            None if !is_valid_room_name(room_id) && !room_id.starts_with("dm:") => {
                return Err(invalid_room_name(room_id));
            }
            None => return Err(ChatError::room_not_found(room_id)),
        };
        match membership {
            Some(read_seq) => Ok(JoinedRoom { room, read_seq }),
            None if room.private => Err(forbidden_room(room_id)),
            None => {
                self.store.add_member(room_id, &user.id).await?;
                Ok(JoinedRoom { room, read_seq: 0 })
            }
        }
    }

    /// The room, if `user` may read it (public, or a member).
    pub async fn readable_room(
        &self,
        user: &UserRef,
        room_id: &str,
    ) -> Result<RoomRecord, ChatError> {
        let room = self
            .store
            .room(room_id)
            .await?
            .ok_or_else(|| ChatError::room_not_found(room_id))?;
        if room.private && self.store.membership(room_id, &user.id).await?.is_none() {
            return Err(forbidden_room(room_id));
        }
        Ok(room)
    }

    /// Fails unless `user` is a member of the room (needed to post or mark read).
    pub async fn require_member(&self, user: &UserRef, room_id: &str) -> Result<u64, ChatError> {
        match self.store.membership(room_id, &user.id).await? {
            Some(read_seq) => Ok(read_seq),
            None => match self.store.room(room_id).await? {
                None => Err(ChatError::room_not_found(room_id)),
                Some(room) if room.private => Err(forbidden_room(room_id)),
                Some(_) => Err(ChatError::Forbidden(format!(
                    "not a member of room {room_id:?}: join it first"
                ))),
            },
        }
    }

    /// Ends `user`'s membership and unsubscribes all of their sessions from the room.
    pub async fn leave_room(&self, user: &UserRef, room_id: &str) -> Result<(), ChatError> {
        if self.store.room(room_id).await?.is_none() {
            return Err(ChatError::room_not_found(room_id));
        }
        if !self.store.remove_member(room_id, &user.id).await? {
            return Err(ChatError::BadRequest(format!(
                "not a member of room {room_id:?}"
            )));
        }
        let room: Arc<str> = Arc::from(room_id);
        let mut announce = false;
        for session in self.hub.sessions_of(room_id, &user.id) {
            announce |= self
                .hub
                .unsubscribe(room_id, session.id, &user.id, Departure::Leave);
            session.push(&Outbound::Left(Arc::clone(&room)), Priority::Reliable);
        }
        if announce {
            self.announce_user_left(room_id, user);
        }
        Ok(())
    }

    /// Deletes a room (owner only); its subscribers are told they left.
    pub async fn delete_room(&self, user: &UserRef, room_id: &str) -> Result<(), ChatError> {
        let room = self
            .store
            .room(room_id)
            .await?
            .ok_or_else(|| ChatError::room_not_found(room_id))?;
        if room.owner.as_deref() != Some(user.id.as_str()) {
            return Err(ChatError::Forbidden(format!(
                "only the owner may delete room {room_id:?}"
            )));
        }
        self.store.delete_room(room_id).await?;
        let room: Arc<str> = Arc::from(room_id);
        for session in self.hub.remove_room(room_id) {
            session.push(&Outbound::Left(Arc::clone(&room)), Priority::Reliable);
        }
        Ok(())
    }

    /// Members of a room the user may read, with their online flag.
    pub async fn members(&self, user: &UserRef, room_id: &str) -> Result<Vec<Member>, ChatError> {
        self.readable_room(user, room_id).await?;
        self.member_list(room_id).await
    }

    /// Members of a room with their online flag (no access check).
    pub async fn member_list(&self, room_id: &str) -> Result<Vec<Member>, ChatError> {
        Ok(self.with_presence(self.store.members(room_id).await?))
    }

    /// Adds each member's presence.
    pub fn with_presence(&self, members: Vec<RoomMember>) -> Vec<Member> {
        members
            .into_iter()
            .map(|m| {
                let status = self.presence.status(&m.user.id);
                Member {
                    online: status != PresenceStatus::Offline,
                    status,
                    read_seq: m.read_seq,
                    id: m.user.id,
                    name: m.user.name,
                }
            })
            .collect()
    }

    /// Public rooms and the user's rooms, with unread information.
    pub async fn list_rooms(&self, user: &UserRef) -> Result<Vec<RoomSummary>, ChatError> {
        let listings = self.store.rooms_for(&user.id).await?;
        Ok(listings
            .into_iter()
            .map(|l| RoomSummary {
                member: l.read_seq.is_some(),
                last_seq: l.last_seq,
                read_seq: l.read_seq.unwrap_or(0),
                room: l.room.info(),
            })
            .collect())
    }

    /// Gets or creates the direct-message room between `user` and the user named `other`.
    pub async fn open_dm(&self, user: &UserRef, other: &str) -> Result<RoomRecord, ChatError> {
        let other = self
            .store
            .user_by_name(other)
            .await?
            .ok_or_else(|| ChatError::NotFound(format!("no user named {other:?}")))?;
        if other.id == user.id {
            return Err(ChatError::BadRequest(
                "cannot open a direct-message room with yourself".into(),
            ));
        }
        let id = confab_proto::dm_room_id(&user.id, &other.id);
        let (first, second) = if user.id <= other.id {
            (user, &other)
        } else {
            (&other, user)
        };
        let room = RoomRecord {
            name: format!("{}, {}", first.name, second.name),
            id,
            private: true,
            owner: None,
            dm: true,
        };
        let room = self.store.open_dm_room(&room, &user.id, &other.id).await?;
        self.notify_room_added(&user.id, &room);
        self.notify_room_added(&other.id, &room);
        Ok(room)
    }

    // ---- messages -------------------------------------------------------------------------

    /// A page of history from a room the user may read.
    pub async fn history(
        &self,
        user: &UserRef,
        room_id: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, ChatError> {
        self.readable_room(user, room_id).await?;
        let query = self.history_query(before, after, limit)?;
        Ok(self.store.history(room_id, query).await?)
    }

    /// Turns the optional paging parameters into a store query, applying the page cap.
    pub fn history_query(
        &self,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<HistoryQuery, ChatError> {
        let max = self.config.max_history_page;
        let limit = match limit {
            Some(0) => return Err(ChatError::BadRequest("limit must be at least 1".into())),
            Some(limit) => limit.min(max),
            None => self.config.join_history.clamp(1, max),
        };
        Ok(match (before, after) {
            (None, None) => HistoryQuery::Latest { limit },
            (Some(before), None) => HistoryQuery::Before { before, limit },
            (before, Some(after)) => HistoryQuery::After {
                after,
                before,
                limit,
            },
        })
    }

    /// Checks a message's content against the protocol's rules.
    pub fn validate_content(
        &self,
        content: &str,
        client_id: Option<&str>,
    ) -> Result<(), ChatError> {
        if content.trim().is_empty() {
            return Err(ChatError::BadRequest("content must not be empty".into()));
        }
        let max = self.config.max_content_chars;
        if content.len() > max && content.chars().count() > max {
            return Err(ChatError::TooLarge(format!(
                "content is longer than {max} characters"
            )));
        }
        if client_id.is_some_and(|c| c.is_empty() || c.len() > 128) {
            return Err(ChatError::BadRequest(
                "client_id must be 1 to 128 characters".into(),
            ));
        }
        Ok(())
    }

    /// Builds a message ready for the committer. Takes the room's name as parsed, so a
    /// WebSocket message moves it instead of copying it, and the session's own author.
    pub fn new_message(
        &self,
        user: Arc<UserRef>,
        room: String,
        content: String,
        client_id: Option<String>,
    ) -> NewMessage {
        let timestamp_ms = now_ms();
        NewMessage {
            id: message_id(timestamp_ms),
            room,
            user,
            content,
            client_id,
            timestamp_ms,
        }
    }

    /// Posts a message over REST: rate limit, validation, membership, then the same committer
    /// path as a WebSocket send. Returns once the message is stored.
    pub async fn post_message(
        &self,
        user: &UserRef,
        room_id: &str,
        content: String,
        client_id: Option<String>,
    ) -> Result<Appended, ChatError> {
        if self.rest_messages.check_key(&user.id).is_err() {
            return Err(ChatError::RateLimited(
                "too many messages; slow down".into(),
            ));
        }
        self.validate_content(&content, client_id.as_deref())?;
        self.require_member(user, room_id).await?;
        let (reply, answer) = oneshot::channel();
        self.committer
            .submit(Pending {
                message: self.new_message(
                    Arc::new(user.clone()),
                    room_id.to_owned(),
                    content,
                    client_id,
                ),
                reply: Reply::Request(reply),
            })
            .await?;
        answer.await.map_err(|_| ChatError::ShuttingDown)?
    }

    /// Stores a read position and tells the room.
    pub async fn mark_read(
        &self,
        user: &UserRef,
        room_id: &str,
        seq: u64,
    ) -> Result<u64, ChatError> {
        self.require_member(user, room_id).await?;
        let stored = self.store.set_read(room_id, &user.id, seq).await?;
        let event = ServerEvent::Read {
            room: room_id.to_string(),
            user: user.clone(),
            seq: stored,
        };
        self.publish(room_id, &event, Priority::Reliable, None);
        Ok(stored)
    }

    /// Encodes an event once and publishes it to a room.
    pub fn publish(
        &self,
        room: &str,
        event: &ServerEvent,
        priority: Priority,
        except: Option<SessionId>,
    ) {
        self.broker
            .publish(room, Outbound::Event(encode(event)), priority, except);
    }

    // ---- typing ---------------------------------------------------------------------------

    /// Handles a `typing` command from a session subscribed to `room`.
    pub fn set_typing(&self, room: &Arc<str>, handle: &SessionHandle, is_typing: bool) {
        let changed = if is_typing {
            self.typing
                .start(room, handle.id, &handle.user, Instant::now())
        } else {
            self.typing.stop(room, handle.id)
        };
        if changed {
            self.announce_typing(room, &handle.user, handle.id, is_typing);
        }
    }

    fn announce_typing(&self, room: &str, user: &UserRef, session: SessionId, is_typing: bool) {
        let event = ServerEvent::Typing {
            room: room.to_string(),
            user: user.clone(),
            is_typing,
        };
        self.publish(room, &event, Priority::Droppable, Some(session));
    }

    /// Runs until shutdown, switching off typing indicators whose refreshes stopped and
    /// forgetting idle rate-limit keys.
    pub async fn run_housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TYPING_SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            for expired in self.typing.expire(Instant::now()) {
                self.announce_typing(&expired.room, &expired.user, expired.session, false);
            }
            ticks += 1;
            if ticks.is_multiple_of(240) {
                self.rest_messages.retain_recent();
                self.auth_attempts.retain_recent();
            }
        }
    }

    // ---- sessions and presence ------------------------------------------------------------

    /// A fresh session id.
    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a new session with presence (enforcing the per-user connection cap).
    pub fn session_started(&self, handle: &Arc<SessionHandle>) -> Result<(), TooManyConnections> {
        let change = self
            .presence
            .connect(handle, self.config.max_connections_per_user)?;
        // The heartbeat tells every registered session when shutdown begins; one registered
        // after its walk finds out here.
        if self.shutdown.is_cancelled() {
            handle.raise(Signal::Shutdown);
        }
        if let Some(change) = change {
            self.announce_presence(UserRef::clone(&handle.user), change);
        }
        Ok(())
    }

    /// Sets a session's own status.
    pub fn set_status(&self, handle: &SessionHandle, status: SettableStatus) {
        if let Some(status) = self.presence.set_status(handle.id, &handle.user.id, status) {
            self.announce_presence(UserRef::clone(&handle.user), StatusChange::to(status));
        }
    }

    /// Cleans up after a session's connection is gone: typing off now; `user_left` and
    /// `offline` only if the user does not come back within the grace period.
    pub fn session_ended(self: &Arc<Self>, handle: &SessionHandle, rooms: Vec<Arc<str>>) {
        let user = &handle.user;
        let departure = self.hub.next_departure_id();
        for room in &rooms {
            if self.typing.stop(room, handle.id) {
                self.announce_typing(room, user, handle.id, false);
            }
            self.hub
                .unsubscribe(room, handle.id, &user.id, Departure::Disconnect(departure));
        }
        let offline_pending = match self.presence.disconnect(handle.id, &user.id, departure) {
            AfterDisconnect::GracePeriod => true,
            AfterDisconnect::Changed(status) => {
                self.announce_presence(UserRef::clone(user), StatusChange::to(status));
                false
            }
            AfterDisconnect::Unchanged => false,
        };
        if rooms.is_empty() && !offline_pending {
            return;
        }
        let node = Arc::clone(self);
        let user = user.clone();
        let grace = self.config.presence_grace();
        self.tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(grace) => {}
                () = node.shutdown.cancelled() => return,
            }
            for room in rooms {
                if node.hub.departure_expired(&room, &user.id, departure) {
                    node.announce_user_left(&room, &user);
                }
            }
            if offline_pending && let Some(user) = node.presence.grace_expired(&user.id, departure)
            {
                node.announce_presence(user, StatusChange::to(PresenceStatus::Offline));
            }
        });
    }

    /// Tells a room that a user's first session arrived, and their status: for a user who
    /// just came online, this is how the room learns it (see [`StatusChange::came_online`]).
    pub fn announce_user_joined(&self, room: &str, user: &UserRef, session: SessionId) {
        let event = ServerEvent::UserJoined {
            room: room.to_string(),
            user: user.clone(),
            status: self.presence.status(&user.id),
        };
        self.publish(room, &event, Priority::Notice, Some(session));
    }

    /// Tells a room that a user's last session left it.
    pub fn announce_user_left(&self, room: &str, user: &UserRef) {
        let event = ServerEvent::UserLeft {
            room: room.to_string(),
            user: user.clone(),
        };
        self.publish(room, &event, Priority::Notice, None);
    }

    /// Sends a user's new status to every session subscribed to a room the user belongs to
    /// (once per session, however many rooms they share).
    fn announce_presence(&self, user: UserRef, change: StatusChange) {
        // One announcer task, fed in order: two changes in quick succession (online, then
        // away) can never reach observers in the opposite order.
        let _ = self.presence_changes.send((user, change));
    }

    /// Runs until shutdown, announcing presence changes one after another: each goes to every
    /// session subscribed to a room the user belongs to (once per session, however many rooms
    /// they share), except, for a user who just came online, rooms they already have a session
    /// in: those had `user_joined`, with the status.
    pub async fn run_presence_announcer(
        self: Arc<Self>,
        mut changes: mpsc::UnboundedReceiver<(UserRef, StatusChange)>,
    ) {
        let mut batch = Vec::new();
        loop {
            let received = tokio::select! {
                received = changes.recv_many(&mut batch, ANNOUNCE_BATCH) => received,
                () = self.shutdown.cancelled() => return,
            };
            if received == 0 {
                return;
            }
            let ids = batch.iter().map(|(user, _)| user.id.clone()).collect();
            let rooms = match self.store.rooms_of_users(ids).await {
                Ok(rooms) => rooms,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot announce presence");
                    batch.clear();
                    continue;
                }
            };
            // Each session gets the batch's changes in the order they happened, as one queue
            // entry: a burst of connects must not fill every observer's queue with presence.
            let mut per_session: HashMap<SessionId, (Arc<SessionHandle>, Vec<Utf8Bytes>)> =
                HashMap::new();
            for ((user, change), rooms) in batch.drain(..).zip(rooms) {
                // A room the user is joining may still get this, if the announcer looks
                // before the join subscribes: then `user_joined` follows with the same status,
                // or a newer one whose change follows too, so observers end on the current
                // status either way.
                let audience = self
                    .hub
                    .presence_audience(&rooms, &user.id, change.came_online);
                if audience.is_empty() {
                    continue;
                }
                let frame = encode(&ServerEvent::Presence {
                    user,
                    status: change.status,
                });
                let mut told = HashSet::new();
                for room_subscribers in audience {
                    for session in room_subscribers.iter() {
                        if told.insert(session.id) {
                            per_session
                                .entry(session.id)
                                .or_insert_with(|| (Arc::clone(session), Vec::new()))
                                .1
                                .push(frame.clone());
                        }
                    }
                }
            }
            for (session, frames) in per_session.into_values() {
                let item = match <[Utf8Bytes; 1]>::try_from(frames) {
                    Ok([frame]) => Outbound::Event(frame),
                    Err(frames) => Outbound::Events(frames.into()),
                };
                session.push(&item, Priority::Droppable);
            }
        }
    }

    /// Statuses for a list of user ids, in the order asked.
    pub fn presence_of(&self, ids: &[&str]) -> Vec<UserPresence> {
        ids.iter()
            .map(|id| UserPresence {
                id: (*id).to_string(),
                status: self.presence.status(id),
            })
            .collect()
    }
}

/// Validates and stores a new password account (shared by `POST /api/register` and
/// `confab user add`).
pub async fn create_account(
    store: &dyn Store,
    name: &str,
    password: &str,
) -> Result<UserRef, ChatError> {
    validate_username(name)?;
    if password.chars().count() < 6 || password.len() > 1024 {
        return Err(ChatError::BadRequest(
            "password must be 6 to 1024 characters".into(),
        ));
    }
    let password = password.to_string();
    let hash = auth::hash_password_limited(password)
        .await
        .ok_or(ChatError::ShuttingDown)?;
    let user = UserRef {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.to_string(),
    };
    store.create_account(&user, &hash).await?;
    Ok(user)
}

/// A UUIDv7 for a message received at `timestamp_ms`. Its random part comes from the thread's
/// user-space CSPRNG: `Uuid::now_v7` made a `getrandom` system call per message (2 % of the
/// server's CPU under W4). Ids only need to be unique; messages are ordered by seq.
fn message_id(timestamp_ms: i64) -> String {
    let random: [u8; 10] = rand::random();
    let millis = u64::try_from(timestamp_ms).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}

/// Presence changes the announcer handles per store round trip.
const ANNOUNCE_BATCH: usize = 256;

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

/// One clock for every session's rate limiters: creating a fresh one (what
/// `RateLimiter::direct` does) calibrates the TSC each time, which showed up at ~2.5 % of the
/// server's CPU while thousands of clients connected.
static LIMITER_CLOCK: std::sync::LazyLock<governor::clock::QuantaClock> =
    std::sync::LazyLock::new(governor::clock::QuantaClock::default);

/// `LIMITER_CLOCK` as a zero-sized clock: a limiter embeds its clock, and a `QuantaClock`
/// copy is 40 bytes, twice per session.
#[derive(Debug, Clone, Copy, Default)]
pub struct SharedClock;

impl governor::clock::Clock for SharedClock {
    type Instant = governor::clock::QuantaInstant;

    fn now(&self) -> Self::Instant {
        governor::clock::Clock::now(&*LIMITER_CLOCK)
    }
}

/// A session's token bucket: 32 bytes.
pub type SessionLimiter =
    governor::RateLimiter<governor::state::NotKeyed, governor::state::InMemoryState, SharedClock>;

/// A token bucket for one session's commands.
pub fn session_limiter(per_second: u32, burst: u32) -> SessionLimiter {
    RateLimiter::direct_with_clock(quota(per_second, burst), SharedClock)
}

fn validate_username(name: &str) -> Result<(), ChatError> {
    let ok = (1..=32).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ChatError::BadRequest(
            "username must be 1 to 32 letters, digits, '_', '-' or '.'".into(),
        ))
    }
}

fn invalid_room_name(name: &str) -> ChatError {
    ChatError::BadRequest(format!(
        "invalid room name {name:?}: use 1 to 64 of a-z, 0-9, '_' and '-', starting with a letter or digit"
    ))
}

fn forbidden_room(room: &str) -> ChatError {
    ChatError::Forbidden(format!("room {room:?} is private"))
}
