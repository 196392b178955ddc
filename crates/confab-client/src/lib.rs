//! A Rust client for confab: REST calls ([`Client`]) and a WebSocket connection
//! ([`Connection`]) that matches replies to commands by `ref`.
//!
//! The integration tests, the load generator and any Rust program that talks to confab use
//! this crate, so it speaks exactly the protocol in `confab-proto`.

use std::collections::VecDeque;
use std::time::Duration;

use confab_proto::{
    AddMemberRequest, AddMemberResponse, AuthRequest, AuthResponse, ChatMessage, ClientCommand,
    CreateRoomRequest, ErrorBody, ErrorCode, Member, MembersResponse, MessageResponse,
    MessagesResponse, PostMessageRequest, PresenceResponse, Ref, RoomInfo, RoomResponse,
    RoomSummary, RoomsResponse, ServerEvent, UserPresence, UserRef,
};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("HTTP {status}: {code:?} {message}")]
    Http {
        /// HTTP status.
        status: u16,
        /// The protocol error code, if the body had one.
        code: Option<ErrorCode>,
        /// The error text.
        message: String,
    },
    /// The server answered a WebSocket command with an `error` event.
    #[error("{code:?}: {message}")]
    Command {
        /// The protocol error code.
        code: ErrorCode,
        /// The error text.
        message: String,
    },
    /// The WebSocket was closed.
    #[error("connection closed ({code}: {reason})")]
    Closed {
        /// Close code (1006 if the connection dropped without one).
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// Network or HTTP transport failure.
    #[error("transport: {0}")]
    Transport(String),
    /// The server sent something this client did not expect.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// An error status with its body: the REST API and a refused upgrade both answer with
    /// `{"error": {code, message}}`; anything else (a proxy's page, say) becomes the message.
    fn http(status: u16, body: &[u8]) -> ClientError {
        let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
            Ok(body) => (Some(body.error.code), body.error.message),
            Err(_) => (None, String::from_utf8_lossy(body).into_owned()),
        };
        ClientError::Http {
            status,
            code,
            message,
        }
    }

    /// The protocol error code, for HTTP and command errors.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Http { code, .. } => *code,
            ClientError::Command { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The HTTP status, for HTTP errors (including a refused WebSocket upgrade).
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Result alias for client calls.
pub type Result<T> = std::result::Result<T, ClientError>;

/// REST client for one server, optionally authenticated.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: impl Into<String>) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: base.into().trim_end_matches('/').to_string(),
            token: None,
        }
    }

    /// The same client, sending `token` as bearer.
    pub fn with_token(&self, token: impl Into<String>) -> Client {
        Client {
            token: Some(token.into()),
            ..self.clone()
        }
    }

    /// The bearer token in use.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The `ws://` URL of the WebSocket endpoint.
    pub fn ws_url(&self) -> String {
        let rest = self
            .base
            .strip_prefix("http://")
            .map(|r| format!("ws://{r}"))
            .or_else(|| {
                self.base
                    .strip_prefix("https://")
                    .map(|r| format!("wss://{r}"))
            })
            .unwrap_or_else(|| self.base.clone());
        format!("{rest}/ws")
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<(u16, T)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if status >= 400 {
            return Err(ClientError::http(status, &bytes));
        }
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        let value = serde_json::from_slice(bytes)
            .map_err(|e| ClientError::Protocol(format!("bad response body: {e}")))?;
        Ok((status, value))
    }

    /// `GET path`, without a body.
    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self.call(reqwest::Method::GET, path, None::<&()>).await?.1)
    }

    /// `POST path` with an optional JSON body.
    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T> {
        Ok(self.call(reqwest::Method::POST, path, body).await?.1)
    }

    /// `POST /api/register`.
    pub async fn register(&self, username: &str, password: &str) -> Result<AuthResponse> {
        let body = AuthRequest {
            username: username.into(),
            password: password.into(),
        };
        self.post("/api/register", Some(&body)).await
    }

    /// `POST /api/login`.
    pub async fn login(&self, username: &str, password: &str) -> Result<AuthResponse> {
        let body = AuthRequest {
            username: username.into(),
            password: password.into(),
        };
        self.post("/api/login", Some(&body)).await
    }

    /// `GET /api/rooms`.
    pub async fn rooms(&self) -> Result<Vec<RoomSummary>> {
        let body: RoomsResponse = self.get("/api/rooms").await?;
        Ok(body.rooms)
    }

    /// `POST /api/rooms`.
    pub async fn create_room(&self, name: &str, private: bool) -> Result<RoomInfo> {
        let body = CreateRoomRequest {
            name: name.into(),
            private,
        };
        let body: RoomResponse = self.post("/api/rooms", Some(&body)).await?;
        Ok(body.room)
    }

    /// `POST /api/rooms/{room}/join`.
    pub async fn join_room(&self, room: &str) -> Result<RoomInfo> {
        let path = format!("/api/rooms/{room}/join");
        let body: RoomResponse = self.post(&path, None::<&()>).await?;
        Ok(body.room)
    }

    /// `POST /api/rooms/{room}/leave`.
    pub async fn leave_room(&self, room: &str) -> Result<()> {
        let path = format!("/api/rooms/{room}/leave");
        let _: serde_json::Value = self.post(&path, None::<&()>).await?;
        Ok(())
    }

    /// `DELETE /api/rooms/{room}`.
    pub async fn delete_room(&self, room: &str) -> Result<()> {
        let path = format!("/api/rooms/{room}");
        let _: (_, serde_json::Value) = self
            .call(reqwest::Method::DELETE, &path, None::<&()>)
            .await?;
        Ok(())
    }

    /// `GET /api/rooms/{room}/members`.
    pub async fn members(&self, room: &str) -> Result<Vec<Member>> {
        let body: MembersResponse = self.get(&format!("/api/rooms/{room}/members")).await?;
        Ok(body.members)
    }

    /// `GET /api/rooms/{room}/messages`.
    pub async fn messages(
        &self,
        room: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<MessagesResponse> {
        let mut query = Vec::new();
        if let Some(before) = before {
            query.push(format!("before={before}"));
        }
        if let Some(after) = after {
            query.push(format!("after={after}"));
        }
        if let Some(limit) = limit {
            query.push(format!("limit={limit}"));
        }
        self.get(&format!("/api/rooms/{room}/messages?{}", query.join("&")))
            .await
    }

    /// `POST /api/rooms/{room}/messages`: returns the stored message and the HTTP status
    /// (201 new, 200 a retry of a known `client_id`).
    pub async fn post_message(
        &self,
        room: &str,
        content: &str,
        client_id: Option<&str>,
    ) -> Result<(u16, ChatMessage)> {
        let body = PostMessageRequest {
            content: content.into(),
            client_id: client_id.map(String::from),
        };
        let path = format!("/api/rooms/{room}/messages");
        let (status, body): (_, MessageResponse) =
            self.call(reqwest::Method::POST, &path, Some(&body)).await?;
        Ok((status, body.message))
    }

    /// `POST /api/rooms/{room}/members`: adds the user with that display name.
    pub async fn add_member(&self, room: &str, username: &str) -> Result<UserRef> {
        let body = AddMemberRequest {
            username: username.into(),
        };
        let path = format!("/api/rooms/{room}/members");
        let body: AddMemberResponse = self.post(&path, Some(&body)).await?;
        Ok(body.user)
    }

    /// `POST /api/dm/{username}`.
    pub async fn open_dm(&self, username: &str) -> Result<RoomInfo> {
        let body: RoomResponse = self
            .post(&format!("/api/dm/{username}"), None::<&()>)
            .await?;
        Ok(body.room)
    }

    /// `GET /api/presence?users=...`.
    pub async fn presence(&self, ids: &[&str]) -> Result<Vec<UserPresence>> {
        let path = format!("/api/presence?users={}", ids.join(","));
        let body: PresenceResponse = self.get(&path).await?;
        Ok(body.users)
    }

    /// `GET /healthz`: true on 200.
    pub async fn healthy(&self) -> bool {
        matches!(
            self.http.get(format!("{}/healthz", self.base)).send().await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Opens a WebSocket with this client's token (sent as `?token=`).
    pub async fn connect(&self) -> Result<Connection> {
        let token = self
            .token
            .as_deref()
            .ok_or_else(|| ClientError::Protocol("no token to connect with".into()))?;
        Connection::connect(&format!("{}?token={token}", self.ws_url()), &[]).await
    }
}

/// An open WebSocket to confab.
#[derive(Debug)]
pub struct Connection {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Events received while waiting for a specific reply.
    pending: VecDeque<ServerEvent>,
    next_ref: u64,
    /// Who the server says we are (from `connected`).
    pub user: UserRef,
    /// Session id (from `connected`).
    pub session: String,
    /// Heartbeat interval announced by the server.
    pub heartbeat_ms: u64,
}

/// The useful part of a `joined` reply.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The room.
    pub room: RoomInfo,
    /// The first members by name, with presence (at most the server's `join_members`).
    pub members: Vec<Member>,
    /// How many members the room has.
    pub member_count: u64,
    /// History or catch-up, oldest first.
    pub messages: Vec<ChatMessage>,
    /// More to page with `history` `after`.
    pub has_more: bool,
    /// Stored read position.
    pub read_seq: u64,
}

impl Connection {
    /// Connects to a full `ws://.../ws?...` URL with extra request headers, and waits for the
    /// `connected` greeting. A refused upgrade comes back as [`ClientError::Http`].
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Connection> {
        let mut request = url
            .into_client_request()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        for (name, value) in headers {
            let name: tokio_tungstenite::tungstenite::http::HeaderName = name
                .parse()
                .map_err(|_| ClientError::Transport(format!("bad header name {name}")))?;
            let value = value
                .parse()
                .map_err(|_| ClientError::Transport(format!("bad header value for {name}")))?;
            request.headers_mut().insert(name, value);
        }
        let (socket, _) = match tokio_tungstenite::connect_async(request).await {
            Ok(ok) => ok,
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.body().clone().unwrap_or_default();
                return Err(ClientError::http(status, &body));
            }
            Err(err) => return Err(ClientError::Transport(err.to_string())),
        };
        let mut connection = Connection {
            socket,
            pending: VecDeque::new(),
            next_ref: 1,
            user: UserRef {
                id: String::new(),
                name: String::new(),
            },
            session: String::new(),
            heartbeat_ms: 0,
        };
        match connection.next_event().await? {
            ServerEvent::Connected {
                user,
                session,
                heartbeat_ms,
            } => {
                connection.user = user;
                connection.session = session;
                connection.heartbeat_ms = heartbeat_ms;
                Ok(connection)
            }
            other => Err(ClientError::Protocol(format!(
                "expected connected, got {other:?}"
            ))),
        }
    }

    /// Sends a command without waiting for anything.
    pub async fn send(&mut self, command: &ClientCommand) -> Result<()> {
        let text = serde_json::to_string(command).expect("commands serialize");
        self.send_text(text).await
    }

    /// Sends a raw text frame (for testing how the server treats bad input).
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<()> {
        self.socket
            .send(Message::text(text.into()))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))
    }

    /// Sends a raw WebSocket message (binary frames, pings, ...).
    pub async fn send_message(&mut self, message: Message) -> Result<()> {
        self.socket
            .send(message)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))
    }

    /// The next event from the server (buffered ones first). A close frame becomes
    /// [`ClientError::Closed`].
    pub async fn next_event(&mut self) -> Result<ServerEvent> {
        if let Some(event) = self.pending.pop_front() {
            return Ok(event);
        }
        self.read_event().await
    }

    /// Like [`Connection::next_event`], but gives up after `timeout` with `None`.
    pub async fn next_event_within(&mut self, timeout: Duration) -> Result<Option<ServerEvent>> {
        if let Some(event) = self.pending.pop_front() {
            return Ok(Some(event));
        }
        match tokio::time::timeout(timeout, self.read_event()).await {
            Ok(event) => event.map(Some),
            Err(_) => Ok(None),
        }
    }

    async fn read_event(&mut self) -> Result<ServerEvent> {
        loop {
            let message = match self.socket.next().await {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    return Err(ClientError::Closed {
                        code: 1006,
                        reason: err.to_string(),
                    });
                }
                None => {
                    return Err(ClientError::Closed {
                        code: 1006,
                        reason: "connection ended".into(),
                    });
                }
            };
            match message {
                Message::Text(text) => {
                    return serde_json::from_str(text.as_str()).map_err(|e| {
                        ClientError::Protocol(format!("bad event {}: {e}", text.as_str()))
                    });
                }
                Message::Close(frame) => {
                    let (code, reason) = close_parts(frame);
                    return Err(ClientError::Closed { code, reason });
                }
                Message::Binary(_) => {
                    return Err(ClientError::Protocol("unexpected binary frame".into()));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Waits for the next event matching `pick`, buffering the others for later.
    pub async fn wait_for<T>(
        &mut self,
        mut pick: impl FnMut(&ServerEvent) -> Option<T>,
    ) -> Result<T> {
        if let Some(index) = self.pending.iter().position(|e| pick(e).is_some()) {
            let event = self.pending.remove(index).expect("index is valid");
            return Ok(pick(&event).expect("matched before"));
        }
        loop {
            let event = self.read_event().await?;
            if let Some(found) = pick(&event) {
                return Ok(found);
            }
            self.pending.push_back(event);
        }
    }

    /// Sends a command with a fresh `ref` and returns its direct reply; an `error` reply
    /// becomes [`ClientError::Command`].
    pub async fn request(&mut self, mut command: ClientCommand) -> Result<ServerEvent> {
        let reference = Ref::from(format!("r{}", self.next_ref));
        self.next_ref += 1;
        command.set_reference(reference.clone());
        self.send(&command).await?;
        let reply = self
            .wait_for(|event| (event.reply_reference() == Some(&reference)).then(|| event.clone()))
            .await?;
        match reply {
            ServerEvent::Error { code, message, .. } => Err(ClientError::Command { code, message }),
            reply => Ok(reply),
        }
    }

    /// `join`, returning the `joined` payload.
    pub async fn join(&mut self, room: &str, since: Option<u64>) -> Result<Joined> {
        let reply = self
            .request(ClientCommand::Join {
                reference: None,
                room: room.into(),
                since,
            })
            .await?;
        match reply {
            ServerEvent::Joined {
                room,
                members,
                member_count,
                messages,
                has_more,
                read_seq,
                ..
            } => Ok(Joined {
                room,
                members,
                member_count,
                messages,
                has_more,
                read_seq,
            }),
            other => Err(ClientError::Protocol(format!(
                "expected joined, got {other:?}"
            ))),
        }
    }

    /// `message`, waiting for the `ack`; returns `(id, seq)`.
    pub async fn say(
        &mut self,
        room: &str,
        content: &str,
        client_id: Option<&str>,
    ) -> Result<(String, u64)> {
        let reply = self
            .request(ClientCommand::Message {
                reference: None,
                room: room.into(),
                content: content.into(),
                client_id: client_id.map(String::from),
            })
            .await?;
        match reply {
            ServerEvent::Ack { id, seq, .. } => Ok((id, seq)),
            other => Err(ClientError::Protocol(format!(
                "expected ack, got {other:?}"
            ))),
        }
    }

    /// `history`: one page, oldest first, and whether more exist in that direction.
    pub async fn history(
        &mut self,
        room: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<(Vec<ChatMessage>, bool)> {
        let reply = self
            .request(ClientCommand::History {
                reference: None,
                room: room.into(),
                before,
                after,
                limit,
            })
            .await?;
        match reply {
            ServerEvent::History {
                messages, has_more, ..
            } => Ok((messages, has_more)),
            other => Err(ClientError::Protocol(format!(
                "expected history, got {other:?}"
            ))),
        }
    }

    /// Resumes a room after a disconnect: joins with `since` and pages on until every message
    /// after `since` has been fetched. Returns them in seq order. Live messages that arrive
    /// meanwhile stay buffered for [`Connection::next_event`]; skip those with a seq already
    /// returned here.
    pub async fn catch_up(&mut self, room: &str, since: u64) -> Result<Vec<ChatMessage>> {
        let joined = self.join(room, Some(since)).await?;
        let mut messages = joined.messages;
        let mut more = joined.has_more;
        while more {
            let after = messages.last().map_or(since, |m| m.seq);
            let (page, has_more) = self.history(room, None, Some(after), None).await?;
            messages.extend(page);
            more = has_more;
        }
        Ok(messages)
    }

    /// `leave`, waiting for the `left` reply.
    pub async fn leave(&mut self, room: &str) -> Result<()> {
        self.request(ClientCommand::Leave {
            reference: None,
            room: room.into(),
        })
        .await
        .map(drop)
    }

    /// `typing` (no reply unless it fails).
    pub async fn typing(&mut self, room: &str, is_typing: bool) -> Result<()> {
        self.send(&ClientCommand::Typing {
            reference: None,
            room: room.into(),
            is_typing,
        })
        .await
    }

    /// `read`: marks the room read up to `seq` (no reply unless it fails).
    pub async fn mark_read(&mut self, room: &str, seq: u64) -> Result<()> {
        self.send(&ClientCommand::Read {
            reference: None,
            room: room.into(),
            seq,
        })
        .await
    }

    /// `status`: this session's own status (no reply unless it fails).
    pub async fn set_status(&mut self, status: confab_proto::SettableStatus) -> Result<()> {
        self.send(&ClientCommand::Status {
            reference: None,
            status,
        })
        .await
    }

    /// Waits for the next chat message broadcast (buffering other events).
    pub async fn next_message(&mut self) -> Result<ChatMessage> {
        self.wait_for(|event| match event {
            ServerEvent::Message(message) => Some(message.clone()),
            _ => None,
        })
        .await
    }

    /// Reads until the server closes the connection; returns its close code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            match self.read_event().await {
                Ok(_) => continue,
                Err(ClientError::Closed { code, reason }) => return (code, reason),
                Err(other) => return (1006, other.to_string()),
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }

    /// Drops the TCP connection without a close handshake (a crash or lost network).
    pub fn abort(self) {
        drop(self);
    }
}

fn close_parts(frame: Option<CloseFrame>) -> (u16, String) {
    match frame {
        Some(frame) => (frame.code.into(), frame.reason.as_str().to_string()),
        None => (1005, String::new()),
    }
}
