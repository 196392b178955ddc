//! Wire types of the confab protocol.
//!
//! Everything that crosses the network is defined here once, so the server, the Rust client,
//! the load generator and the tests cannot drift apart. `docs/protocol.md` is the prose version
//! of this file; keep them in step.
//!
//! # Layout
//! - [`ClientCommand`]: what a client sends over the WebSocket (one JSON object per text frame).
//! - [`ServerEvent`]: what the server sends back: direct replies (which echo the command's `ref`)
//!   and broadcasts (which never carry a `ref`).
//! - [`ErrorCode`]: the stable error vocabulary, shared by WebSocket `error` events and REST
//!   error bodies.
//! - REST request and response bodies ([`AuthRequest`], [`AuthResponse`], ...).
//! - [`close`]: the WebSocket close codes the server uses.
//! - [`write_message_event`], [`write_ack_event`]: the two events of every chat message,
//!   written without serde's byte-by-byte string escaping, to the same bytes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod fast_json;
pub use fast_json::{write_ack_event, write_message_event};

/// A client-chosen correlation id: any JSON value, echoed verbatim in the direct reply.
pub type Ref = Value;

/// A user as it appears in every event: stable id plus display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRef {
    /// Stable user id (UUIDv7 for registered users, the token's `sub` for external ones).
    pub id: String,
    /// Display name.
    pub name: String,
}

/// A room's public description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    /// Room id: its name for ordinary rooms, `dm:<id1>:<id2>` for direct-message rooms.
    pub id: String,
    /// Display name (equal to `id` for ordinary rooms; the two users' names for DM rooms).
    pub name: String,
    /// Private rooms can only be joined by their members.
    pub private: bool,
    /// The creator's user id (for a room created by joining it, the first joiner); `null` for
    /// `general` and direct-message rooms.
    pub owner: Option<String>,
    /// True for direct-message rooms.
    #[serde(default)]
    pub dm: bool,
}

/// A stored chat message as delivered to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Globally unique message id (UUIDv7).
    pub id: String,
    /// Position in the room: starts at 1, no gaps.
    pub seq: u64,
    /// The room the message belongs to.
    pub room: String,
    /// The author: shared, not copied, since every message of a session names the same one
    /// (and the server makes one `ChatMessage` per message it stores).
    pub user: Arc<UserRef>,
    /// The text as sent.
    pub content: String,
    /// The sender's idempotency key, if it gave one.
    pub client_id: Option<String>,
    /// When the server accepted it (RFC 3339, UTC, milliseconds).
    pub timestamp: String,
}

/// A room member as listed in `joined` and `GET /api/rooms/{room}/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// User id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// True while the user has at least one connected session (or is within the grace period).
    pub online: bool,
    /// The aggregate status behind `online`, so a member list can show "away" without a
    /// separate presence query.
    #[serde(default)]
    pub status: PresenceStatus,
    /// How far this member has read the room: what read receipts are drawn from when a
    /// client opens a room (live changes arrive as `read` events).
    #[serde(default)]
    pub read_seq: u64,
}

/// A user's aggregate status across all of their devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    /// At least one session connected and the user did not mark themselves away.
    Online,
    /// Connected, but the user's sessions all said `away`.
    Away,
    /// No session for longer than the grace period.
    #[default]
    Offline,
}

/// Statuses a client may set for itself (`offline` is the server's to decide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettableStatus {
    /// Active.
    Online,
    /// Idle.
    Away,
}

/// Everything a client may send over the WebSocket.
///
/// Each variant is one JSON object with a `"type"` field; any command may also carry `"ref"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientCommand {
    /// Subscribe this session to a room (creating public rooms on demand) and get its recent
    /// history, or with `since` every message after that seq.
    Join {
        /// Correlation id.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        /// Room id.
        room: String,
        /// Resume point: deliver every message with a greater seq.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    /// Unsubscribe this session from a room.
    Leave {
        /// Correlation id.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        /// Room id.
        room: String,
    },
    /// Post a chat message; acked once it is durably stored.
    Message {
        /// Correlation id.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        /// Room id.
        room: String,
        /// Message text.
        content: String,
        /// Idempotency key, unique per user: a retry with the same key is acked, not re-stored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
    },
    /// Start or stop the typing indicator in a room.
    Typing {
        /// Correlation id.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        /// Room id.
        room: String,
        /// True while typing; the server expires it after a few seconds without refresh.
        is_typing: bool,
    },
    /// Record that the user has read a room up to `seq`.
    Read {
        /// Correlation id.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        /// Room id.
        room: String,
        /// Highest seq the user has seen.
        seq: u64,
    },
    /// Page through a room's history.
    History {
        /// Correlation id.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        /// Room id.
        room: String,
        /// Only messages with a smaller seq (the newest `limit` of them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// Only messages with a greater seq (the oldest `limit` of them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        /// Page size (server caps it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Set the user's status on this session.
    Status {
        /// Correlation id.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        /// New status.
        status: SettableStatus,
    },
    /// Application-level liveness check.
    Ping {
        /// Correlation id.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
}

/// The `reference` field of any command, by shared or mutable reference alike.
macro_rules! reference_field {
    ($command:expr) => {
        match $command {
            ClientCommand::Join { reference, .. }
            | ClientCommand::Leave { reference, .. }
            | ClientCommand::Message { reference, .. }
            | ClientCommand::Typing { reference, .. }
            | ClientCommand::Read { reference, .. }
            | ClientCommand::History { reference, .. }
            | ClientCommand::Status { reference, .. }
            | ClientCommand::Ping { reference } => reference,
        }
    };
}

impl ClientCommand {
    /// The command's correlation id, if it carried one.
    pub fn reference(&self) -> Option<&Ref> {
        reference_field!(self).as_ref()
    }

    /// Sets the correlation id (clients number their requests with it).
    pub fn set_reference(&mut self, value: Ref) {
        *reference_field!(self) = Some(value);
    }
}

/// Everything the server sends over the WebSocket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    /// First frame of every connection.
    Connected {
        /// Who the token says we are.
        user: UserRef,
        /// This connection's session id.
        session: String,
        /// How often the server pings; clients may use it to size their own timeouts.
        heartbeat_ms: u64,
    },
    /// Reply to `join`.
    Joined {
        /// Echo of the command's `ref`.
        #[serde(rename = "ref", default)]
        reference: Option<Ref>,
        /// The room.
        room: RoomInfo,
        /// The first `join_members` (50) members by name, with presence and read position.
        /// A join must not cost O(members): for a big room, fetch the full list over REST.
        members: Vec<Member>,
        /// How many members the room has (more than `members` lists when it is big).
        #[serde(default)]
        member_count: u64,
        /// Recent history, or everything after `since`, oldest first.
        messages: Vec<ChatMessage>,
        /// With `since`: more missed messages exist after the last one here (page on with
        /// `history` `after`). Without: older messages exist (page back with `before`).
        has_more: bool,
        /// The user's stored read position in this room (0 if never read).
        read_seq: u64,
    },
    /// Reply to `leave`.
    Left {
        /// Echo of the command's `ref`.
        #[serde(rename = "ref", default)]
        reference: Option<Ref>,
        /// The room left.
        room: String,
    },
    /// Reply to `message` once it is durably stored.
    Ack {
        /// Echo of the command's `ref`.
        #[serde(rename = "ref", default)]
        reference: Option<Ref>,
        /// The stored message's id.
        id: String,
        /// Its seq in the room.
        seq: u64,
        /// Echo of the command's `client_id`.
        client_id: Option<String>,
    },
    /// Reply to `history`.
    History {
        /// Echo of the command's `ref`.
        #[serde(rename = "ref", default)]
        reference: Option<Ref>,
        /// The room.
        room: String,
        /// Oldest first.
        messages: Vec<ChatMessage>,
        /// More messages exist beyond this page in the direction asked.
        has_more: bool,
    },
    /// Reply to `ping`.
    Pong {
        /// Echo of the command's `ref`.
        #[serde(rename = "ref", default)]
        reference: Option<Ref>,
    },
    /// Reply to a command that failed. The connection stays usable.
    Error {
        /// Echo of the command's `ref` (null if the frame could not be parsed).
        #[serde(rename = "ref", default)]
        reference: Option<Ref>,
        /// Stable machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
    /// Broadcast: a new chat message in a subscribed room.
    Message(ChatMessage),
    /// Broadcast: a user's first session joined the room.
    UserJoined {
        /// Room id.
        room: String,
        /// Who.
        user: UserRef,
        /// Their aggregate status as the notice was sent: a user who just came online is
        /// announced to the rooms they join by this notice alone, not by a `presence` as well.
        status: PresenceStatus,
    },
    /// Broadcast: a user's last session left the room (or stayed away past the grace period).
    UserLeft {
        /// Room id.
        room: String,
        /// Who.
        user: UserRef,
    },
    /// Broadcast: someone started or stopped typing.
    Typing {
        /// Room id.
        room: String,
        /// Who.
        user: UserRef,
        /// Whether they are typing now.
        is_typing: bool,
    },
    /// Broadcast: a member's read position moved.
    Read {
        /// Room id.
        room: String,
        /// Who.
        user: UserRef,
        /// Their new read position.
        seq: u64,
    },
    /// Broadcast: a user's aggregate status changed.
    Presence {
        /// Who.
        user: UserRef,
        /// The new status.
        status: PresenceStatus,
    },
    /// To every session of a user who became a member of a room through someone else's action
    /// (a DM opened with them, being added to a room) or on another of their devices: without
    /// it a client would only notice the room on its next room-list refresh.
    RoomAdded {
        /// The room.
        room: RoomInfo,
    },
}

impl ServerEvent {
    /// The `ref` of a direct reply (`None` for broadcasts and replies without one).
    pub fn reply_reference(&self) -> Option<&Ref> {
        match self {
            ServerEvent::Joined { reference, .. }
            | ServerEvent::Left { reference, .. }
            | ServerEvent::Ack { reference, .. }
            | ServerEvent::History { reference, .. }
            | ServerEvent::Pong { reference }
            | ServerEvent::Error { reference, .. } => reference.as_ref(),
            _ => None,
        }
    }
}

/// The stable error vocabulary of the protocol (WebSocket `error.code` and REST `error.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, unknown command, missing or invalid field, empty content.
    BadRequest,
    /// Missing, forged or expired credentials.
    Unauthorized,
    /// Authenticated, but not allowed (private room, not the owner, not a member).
    Forbidden,
    /// No such room or user.
    NotFound,
    /// Something already exists (username taken, room name taken).
    Conflict,
    /// Content or request over the configured limit.
    TooLarge,
    /// Too many requests; slow down.
    RateLimited,
    /// The server failed; the request may be retried.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
        }
    }
}

/// WebSocket close codes the server sends.
pub mod close {
    /// Normal closure: the answer to a client's close frame that carried no code.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down; reconnect (to this or another node) later.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol (unmasked frame, reserved bits, bad fragments).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation: for example a heartbeat timeout.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// An inbound frame exceeded the size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The session could not keep up with its outbound traffic; re-join with `since` to resume.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// `POST /api/register` and `POST /api/login` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthRequest {
    /// Account name.
    pub username: String,
    /// Plain-text password (hashed with argon2 by the server).
    pub password: String,
}

/// `POST /api/register` and `POST /api/login` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthResponse {
    /// The account.
    pub user: UserRef,
    /// A bearer token for REST and WebSocket.
    pub token: String,
}

/// `POST /api/rooms` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateRoomRequest {
    /// Room name, `[a-z0-9][a-z0-9_-]{0,63}`.
    pub name: String,
    /// Private rooms are joinable by members only.
    #[serde(default)]
    pub private: bool,
}

/// `POST /api/rooms/{room}/members` body: whom to add.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddMemberRequest {
    /// The user's display name, looked up like `POST /api/dm/{username}`.
    pub username: String,
}

/// `POST /api/rooms/{room}/members` response: who was added.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddMemberResponse {
    /// The member.
    pub user: UserRef,
}

/// `{"room": {...}}` responses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomResponse {
    /// The room.
    pub room: RoomInfo,
}

/// `GET /api/rooms` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomsResponse {
    /// Public rooms and the caller's rooms.
    pub rooms: Vec<RoomSummary>,
}

/// A room in the caller's room list, with what a client needs for unread badges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSummary {
    /// The room.
    #[serde(flatten)]
    pub room: RoomInfo,
    /// Whether the caller is a member.
    pub member: bool,
    /// Seq of the newest message (0 if none).
    pub last_seq: u64,
    /// The caller's read position (0 if never read or not a member).
    pub read_seq: u64,
}

/// `GET /api/rooms/{room}/members` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembersResponse {
    /// Members with their online flag.
    pub members: Vec<Member>,
}

/// `GET /api/rooms/{room}/messages` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessagesResponse {
    /// Oldest first.
    pub messages: Vec<ChatMessage>,
    /// More messages exist beyond this page.
    pub has_more: bool,
}

/// `POST /api/rooms/{room}/messages` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostMessageRequest {
    /// Message text.
    pub content: String,
    /// Idempotency key, unique per user.
    #[serde(default)]
    pub client_id: Option<String>,
}

/// `POST /api/rooms/{room}/messages` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageResponse {
    /// The stored message.
    pub message: ChatMessage,
}

/// One entry of `GET /api/presence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPresence {
    /// User id.
    pub id: String,
    /// Current status (`offline` for unknown ids too).
    pub status: PresenceStatus,
}

/// `GET /api/presence?users=...` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceResponse {
    /// One entry per requested id, in the order asked.
    pub users: Vec<UserPresence>,
}

/// REST error body: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

/// Checks a room name against `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn is_valid_room_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

/// The id of the direct-message room between two users: `dm:<a>:<b>` with the ids sorted.
pub fn dm_room_id(user_a: &str, user_b: &str) -> String {
    let (first, second) = if user_a <= user_b {
        (user_a, user_b)
    } else {
        (user_b, user_a)
    };
    format!("dm:{first}:{second}")
}

/// Parses one client frame. On failure returns the `ref` it could still recover (if any) and
/// a message saying what was wrong, so the server can answer with a precise `bad_request`.
pub fn parse_command(text: &str) -> Result<ClientCommand, (Option<Ref>, String)> {
    if let Some(message) = parse_message(text) {
        return Ok(message);
    }
    match serde_json::from_str::<ClientCommand>(text) {
        Ok(command) => Ok(command),
        Err(err) => {
            let value: Value = match serde_json::from_str(text) {
                Ok(value) => value,
                Err(json_err) => return Err((None, format!("invalid JSON: {json_err}"))),
            };
            let Some(object) = value.as_object() else {
                return Err((None, "a command must be a JSON object".into()));
            };
            let reference = object.get("ref").cloned();
            let message = match object.get("type").and_then(Value::as_str) {
                None => "missing \"type\" field".to_string(),
                Some(kind) if !KNOWN_COMMANDS.contains(&kind) => {
                    format!("unknown command type {kind:?}")
                }
                Some(kind) => format!("invalid {kind:?} command: {err}"),
            };
            Err((reference, message))
        }
    }
}

/// A well-formed `message` command, read by hand ([`fast_json::read_message_command`]);
/// `None` for anything else, which the general path then parses (and explains). Messages are
/// most of what clients send. Whenever it succeeds it gives what the general path would (a
/// property test holds it to that).
fn parse_message(text: &str) -> Option<ClientCommand> {
    fast_json::read_message_command(text)
}

const KNOWN_COMMANDS: &[&str] = &[
    "join", "leave", "message", "typing", "read", "history", "status", "ping",
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn room_names() {
        assert!(is_valid_room_name("general"));
        assert!(is_valid_room_name("a"));
        assert!(is_valid_room_name("0-team_x"));
        assert!(is_valid_room_name(&"a".repeat(64)));
        assert!(!is_valid_room_name(&"a".repeat(65)));
        assert!(!is_valid_room_name(""));
        assert!(!is_valid_room_name("-x"));
        assert!(!is_valid_room_name("_x"));
        assert!(!is_valid_room_name("General"));
        assert!(!is_valid_room_name("dm:a:b"));
        assert!(!is_valid_room_name("a b"));
    }

    #[test]
    fn dm_ids_are_order_independent() {
        assert_eq!(dm_room_id("b", "a"), "dm:a:b");
        assert_eq!(dm_room_id("a", "b"), "dm:a:b");
    }

    #[test]
    fn parses_commands_with_ref() {
        let cmd = parse_command(r#"{"type":"join","room":"general","since":5,"ref":7}"#).unwrap();
        assert_eq!(
            cmd,
            ClientCommand::Join {
                reference: Some(json!(7)),
                room: "general".into(),
                since: Some(5)
            }
        );
        assert_eq!(cmd.reference(), Some(&json!(7)));
        let cmd = parse_command(r#"{"type":"ping"}"#).unwrap();
        assert_eq!(cmd, ClientCommand::Ping { reference: None });
    }

    #[test]
    fn ignores_identity_fields_sent_by_clients() {
        let cmd = parse_command(
            r#"{"type":"message","room":"r","content":"hi","user":{"id":"x"},"user_id":"x"}"#,
        )
        .unwrap();
        assert!(matches!(cmd, ClientCommand::Message { .. }));
    }

    #[test]
    fn parse_errors_keep_the_ref() {
        let (reference, message) = parse_command(r#"{"type":"nope","ref":"a"}"#).unwrap_err();
        assert_eq!(reference, Some(json!("a")));
        assert!(message.contains("unknown command"), "{message}");
        let (reference, message) = parse_command(r#"{"type":"join","ref":1}"#).unwrap_err();
        assert_eq!(reference, Some(json!(1)));
        assert!(message.contains("room"), "{message}");
        let (reference, message) = parse_command("{nope").unwrap_err();
        assert_eq!(reference, None);
        assert!(message.contains("invalid JSON"));
        let (_, message) = parse_command("[1]").unwrap_err();
        assert!(message.contains("object"));
        let (_, message) = parse_command(r#"{"room":"x"}"#).unwrap_err();
        assert!(message.contains("type"));
    }

    #[test]
    fn events_serialize_to_the_documented_shape() {
        let event = ServerEvent::Ack {
            reference: Some(json!("r1")),
            id: "m1".into(),
            seq: 3,
            client_id: None,
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({"type":"ack","ref":"r1","id":"m1","seq":3,"client_id":null})
        );
        let event = ServerEvent::Message(ChatMessage {
            id: "m".into(),
            seq: 1,
            room: "general".into(),
            user: Arc::new(UserRef {
                id: "u".into(),
                name: "ann".into(),
            }),
            content: "hi".into(),
            client_id: Some("c".into()),
            timestamp: "2026-01-01T00:00:00.000Z".into(),
        });
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(value["type"], "message");
        assert_eq!(value["seq"], 1);
        assert_eq!(value["user"]["name"], "ann");
        assert!(value.get("ref").is_none());
        let presence = ServerEvent::Presence {
            user: UserRef {
                id: "u".into(),
                name: "ann".into(),
            },
            status: PresenceStatus::Away,
        };
        assert_eq!(serde_json::to_value(&presence).unwrap()["status"], "away");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn command() -> impl Strategy<Value = ClientCommand> {
            let reference = proptest::option::of(prop_oneof![
                any::<i64>().prop_map(Ref::from),
                "[a-z0-9]{0,8}".prop_map(Ref::from),
            ]);
            let room = "[a-z0-9][a-z0-9_-]{0,20}";
            prop_oneof![
                (reference.clone(), room, proptest::option::of(any::<u64>())).prop_map(
                    |(reference, room, since)| ClientCommand::Join {
                        reference,
                        room,
                        since
                    }
                ),
                (
                    reference.clone(),
                    room,
                    ".{0,50}",
                    proptest::option::of("[a-z0-9-]{1,20}")
                )
                    .prop_map(|(reference, room, content, client_id)| {
                        ClientCommand::Message {
                            reference,
                            room,
                            content,
                            client_id,
                        }
                    }),
                (reference.clone(), room, any::<bool>()).prop_map(
                    |(reference, room, is_typing)| {
                        ClientCommand::Typing {
                            reference,
                            room,
                            is_typing,
                        }
                    }
                ),
                (reference.clone(), room, any::<u64>()).prop_map(|(reference, room, seq)| {
                    ClientCommand::Read {
                        reference,
                        room,
                        seq,
                    }
                }),
                reference.prop_map(|reference| ClientCommand::Ping { reference }),
            ]
        }

        proptest! {
            #[test]
            fn commands_survive_a_round_trip(command in command()) {
                let text = serde_json::to_string(&command).unwrap();
                prop_assert_eq!(parse_command(&text).unwrap(), command);
            }

            /// Objects made of command fields in any order, of any type, repeated or missing,
            /// among others: wherever the `message` path accepts one, it reads what serde's
            /// tagged enum reads.
            #[test]
            fn the_message_path_agrees_with_the_general_one(
                fields in proptest::collection::vec(
                    (
                        prop_oneof![
                            Just("type"), Just("ref"), Just("room"), Just("content"),
                            Just("client_id"), Just("since"), Just("seq"), Just("other"),
                        ],
                        prop_oneof![
                            Just(r#""message""#.to_string()),
                            Just(r#""join""#.to_string()),
                            Just("null".to_string()),
                            Just("[1,{}]".to_string()),
                            Just(r#""mess\u0061ge""#.to_string()),
                            any::<i64>().prop_map(|n| n.to_string()),
                            any::<u64>().prop_map(|n| n.to_string()),
                            Just("-0".to_string()),
                            Just("007".to_string()),
                            Just("1.5".to_string()),
                            Just("2e3".to_string()),
                            Just("123456789012345678901".to_string()),
                            Just("true".to_string()),
                            Just("false".to_string()),
                            Just("nul".to_string()),
                            Just("{}".to_string()),
                            Just("\"tab\there\"".to_string()),
                            "[a-z\"\\\\é]{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
                        ],
                    ),
                    0..6,
                ),
                valid in any::<bool>(),
                order in any::<u64>(),
            ) {
                // Often a valid message's fields among them, so that the path is taken.
                let mut body: Vec<String> = fields
                    .iter()
                    .map(|(key, value)| format!("{key:?}:{value}"))
                    .collect();
                if valid {
                    body.extend([
                        r#""type":"message""#.to_string(),
                        r#""room":"general""#.to_string(),
                        r#""content":"hi""#.to_string(),
                    ]);
                }
                body.sort_by_key(|entry| {
                    let mut h = std::hash::DefaultHasher::new();
                    std::hash::Hash::hash(&(entry, order), &mut h);
                    std::hash::Hasher::finish(&h)
                });
                let separator = [",", " , ", ",\n\t", "\r\n,"][(order % 4) as usize];
                let text = format!("{{{}}}", body.join(separator));
                if let Some(fast) = parse_message(&text) {
                    let general = serde_json::from_str::<ClientCommand>(&text);
                    prop_assert_eq!(Some(fast), general.ok(), "{}", text);
                }
            }

            /// The common shapes are read by the fast path, not only agreed with.
            #[test]
            fn plain_messages_take_the_message_path(
                reference in proptest::option::of(any::<i64>()),
                room in "[a-z0-9][a-z0-9_-]{0,20}",
                content in "[^\"\\\\\u{0}-\u{1f}]{1,50}",
                client_id in proptest::option::of("[a-z0-9-]{1,36}"),
            ) {
                let command = ClientCommand::Message {
                    reference: reference.map(Ref::from),
                    room,
                    content,
                    client_id,
                };
                let text = serde_json::to_string(&command).unwrap();
                prop_assert_eq!(parse_message(&text), Some(command.clone()));
                let spaced = serde_json::to_string_pretty(&command).unwrap();
                prop_assert_eq!(parse_message(&spaced), Some(command));
            }

            #[test]
            fn arbitrary_text_never_panics(text in ".{0,200}") {
                let _ = parse_command(&text);
            }

            #[test]
            fn json_objects_with_a_ref_keep_it_in_errors(kind in "[a-z]{0,10}", reference in any::<i64>()) {
                let text = format!(r#"{{"type":"{kind}","ref":{reference},"extra":[1,{{}}]}}"#);
                if let Err((echoed, _)) = parse_command(&text) {
                    prop_assert_eq!(echoed, Some(Ref::from(reference)));
                }
            }
        }
    }
}
