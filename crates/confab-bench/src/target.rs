//! Protocol adapters: how to reach a room, join it, publish a payload and find payloads in
//! what comes back, for confab and for the peer servers it is measured against.
//!
//! The receive side ([`Target::decode`]) is the hot path: it looks at raw frame bytes and
//! hands out payload slices without building JSON values. Only replies that are not per
//! delivery (`ack`, `error`) go through serde, into small borrowed structs.

use serde::Deserialize;

use crate::wire::{WireError, WsConn};

/// How the generator makes the `client_id` of each message it publishes to confab.
///
/// The server files each user's retry keys in `client_id` order, so the order matters to
/// what storing a message costs: keys that grow with time are appended to the end of the
/// user's part of the table, random ones each land on a page of their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientIds {
    /// `RUN-CONNECTION-SEQ`, SEQ a counter per connection in 16 zero-padded hex digits, so
    /// that the ids sort in the order they were sent, as UUIDv7s and ULIDs do (the bundled
    /// web client sends UUIDv7s). Unpadded decimal would not: `…-10` sorts before `…-9`.
    #[default]
    Counter,
    /// Random UUIDv4s, as clients using `crypto.randomUUID()` or `uuid4()` send.
    Random,
}

/// Which kind of server is under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// confab itself: a JWT per connection, `join`, `message` with `client_id`, `ack`.
    Confab,
    /// Peer servers with the bare protocol: `/ws?room=ROOM`, every text frame is broadcast
    /// unchanged to the room (sender included); a frame may pack payloads separated by `\n`.
    Raw,
    /// Socket.IO 4 (engine.io v4, WebSocket transport only): `42["msg","PAYLOAD"]` both ways.
    Socketio,
}

/// What a received text frame means to a scenario.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A chat payload (confab: a `message` event's content; raw: one line of the frame;
    /// Socket.IO: the event's argument).
    Payload {
        /// The payload bytes.
        bytes: &'a [u8],
    },
    /// confab `ack`: the message with `ref` = our sequence number was stored as room `seq`.
    Ack {
        /// The command's `ref` (the publisher's sequence number).
        reference: Option<u64>,
        /// The room seq it got.
        seq: u64,
    },
    /// confab `error` reply.
    Error {
        /// The command's `ref`, if it was one of our numbered messages.
        reference: Option<u64>,
        /// Protocol error code.
        code: String,
        /// Human-readable text.
        message: String,
    },
    /// Socket.IO ping (`2`): answer with `3`.
    Ping,
    /// Anything else (presence, `user_joined`, Socket.IO noise...).
    Other,
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Transport or WebSocket failure.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The server refused the join.
    #[error("join refused: {code}: {message}")]
    Refused {
        /// Protocol error code.
        code: String,
        /// Its text.
        message: String,
    },
    /// The server said something out of order.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

#[derive(Deserialize)]
struct AckReply {
    #[serde(rename = "ref")]
    reference: Option<serde_json::Value>,
    seq: u64,
}

#[derive(Deserialize)]
struct ErrorReply {
    #[serde(rename = "ref")]
    reference: Option<serde_json::Value>,
    code: String,
    message: String,
}

#[derive(Deserialize)]
struct TypeOnly<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(rename = "ref", default)]
    reference: Option<serde_json::Value>,
}

const MESSAGE_PREFIX: &[u8] = br#"{"type":"message","#;
const CONTENT_KEY: &[u8] = br#""content":""#;
const SOCKETIO_EVENT: &[u8] = br#"42["msg",""#;

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Confab => "confab",
            Target::Raw => "raw",
            Target::Socketio => "socketio",
        })
    }
}

/// Writes a UUIDv4 drawn from (`prefix`, `seq`) by SplitMix64: random-looking, yet the same
/// for the same message, with no allocation.
fn random_uuid(out: &mut Vec<u8>, prefix: &str, seq: u64) {
    let mut state = prefix.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&next().to_be_bytes());
    bytes[8..].copy_from_slice(&next().to_be_bytes());
    let uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
    out.extend_from_slice(
        uuid.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .as_bytes(),
    );
}

impl Target {
    /// Path and query of the WebSocket endpoint for a connection to `room`.
    pub fn path(self, room: &str, token: Option<&str>) -> String {
        match self {
            Target::Confab => format!("/ws?token={}", token.unwrap_or_default()),
            Target::Raw => format!("/ws?room={room}"),
            Target::Socketio => {
                format!("/socket.io/?EIO=4&transport=websocket&room={room}")
            }
        }
    }

    /// After the upgrade: everything up to the point where the connection receives the room's
    /// traffic (confab: `connected`, then `join` → `joined`; Socket.IO: open, connect to the
    /// default namespace; raw: nothing).
    pub async fn establish(self, conn: &mut WsConn, room: &str) -> Result<(), SetupError> {
        match self {
            Target::Raw => Ok(()),
            Target::Socketio => {
                let open = next_text(conn).await?;
                if !open.starts_with(b"0") {
                    return Err(unexpected("engine.io open packet", &open));
                }
                conn.queue_text(b"40");
                conn.flush().await?;
                loop {
                    let text = next_text(conn).await?;
                    if text.starts_with(b"40") {
                        return Ok(());
                    }
                    if text == b"2" {
                        conn.queue_text(b"3");
                        conn.flush().await?;
                    } else if text.starts_with(b"44") {
                        return Err(unexpected("namespace connect", &text));
                    }
                }
            }
            Target::Confab => {
                let greeting = next_text(conn).await?;
                if !greeting.starts_with(br#"{"type":"connected""#) {
                    return Err(unexpected("connected", &greeting));
                }
                let join = serde_json::json!({"type": "join", "ref": "join", "room": room});
                conn.queue_text(join.to_string().as_bytes());
                conn.flush().await?;
                confab_reply(conn, "join", "joined").await.map(drop)
            }
        }
    }

    /// Appends the text of the frame that publishes `payload` (written by `payload`) into
    /// `room`. `seq` becomes the confab `ref` and, with `client_prefix`, the `client_id`, made
    /// as `ids` says (the same for the same prefix and seq).
    pub fn publish_text(
        self,
        out: &mut Vec<u8>,
        room: &str,
        (client_prefix, ids): (&str, ClientIds),
        seq: u64,
        payload: impl FnOnce(&mut Vec<u8>),
    ) {
        match self {
            Target::Raw => payload(out),
            Target::Socketio => {
                out.extend_from_slice(SOCKETIO_EVENT);
                payload(out);
                out.extend_from_slice(b"\"]");
            }
            Target::Confab => {
                out.extend_from_slice(br#"{"type":"message","ref":"#);
                out.extend_from_slice(seq.to_string().as_bytes());
                out.extend_from_slice(br#","room":""#);
                out.extend_from_slice(room.as_bytes());
                out.extend_from_slice(br#"","content":""#);
                payload(out);
                out.extend_from_slice(br#"","client_id":""#);
                match ids {
                    ClientIds::Counter => {
                        use std::io::Write as _;
                        out.extend_from_slice(client_prefix.as_bytes());
                        let _ = write!(out, "-{seq:016x}");
                    }
                    ClientIds::Random => random_uuid(out, client_prefix, seq),
                }
                out.extend_from_slice(br#""}"#);
            }
        }
    }

    /// Finds what a received text frame carries and passes each item to `each` (a raw frame
    /// may pack several payloads).
    pub fn decode<'a>(self, text: &'a [u8], mut each: impl FnMut(Incoming<'a>)) {
        match self {
            Target::Raw => {
                for line in text.split(|&b| b == b'\n') {
                    if !line.is_empty() {
                        each(Incoming::Payload { bytes: line });
                    }
                }
            }
            Target::Socketio => {
                if let Some(rest) = text.strip_prefix(SOCKETIO_EVENT) {
                    let end = memchr::memchr(b'"', rest).unwrap_or(rest.len());
                    each(Incoming::Payload {
                        bytes: &rest[..end],
                    });
                } else if text == b"2" {
                    each(Incoming::Ping);
                } else {
                    each(Incoming::Other);
                }
            }
            Target::Confab => each(decode_confab(text)),
        }
    }
}

/// The confab receive path: `message` events by byte search, the rest by serde.
fn decode_confab(text: &[u8]) -> Incoming<'_> {
    if text.starts_with(MESSAGE_PREFIX) {
        // Every string before `content` is JSON-escaped, so the first unescaped
        // `"content":"` is the key; our payloads contain no `"` or `\`.
        static CONTENT: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(CONTENT_KEY));
        if let Some(at) = CONTENT.find(text) {
            let rest = &text[at + CONTENT_KEY.len()..];
            let end = memchr::memchr(b'"', rest).unwrap_or(rest.len());
            return Incoming::Payload {
                bytes: &rest[..end],
            };
        }
        return Incoming::Other;
    }
    if text.starts_with(br#"{"type":"ack""#) {
        if let Ok(ack) = serde_json::from_slice::<AckReply>(text) {
            return Incoming::Ack {
                reference: ack.reference.as_ref().and_then(serde_json::Value::as_u64),
                seq: ack.seq,
            };
        }
    } else if text.starts_with(br#"{"type":"error""#)
        && let Ok(error) = serde_json::from_slice::<ErrorReply>(text)
    {
        return Incoming::Error {
            reference: error.reference.as_ref().and_then(serde_json::Value::as_u64),
            code: error.code,
            message: error.message,
        };
    }
    Incoming::Other
}

/// Waits for confab's direct reply with `ref` = `reference`: the `expected` type, or an
/// `error` (returned as [`SetupError::Refused`]). Other events are skipped. Returns the reply.
pub async fn confab_reply(
    conn: &mut WsConn,
    reference: &str,
    expected: &str,
) -> Result<Vec<u8>, SetupError> {
    loop {
        let text = next_text(conn).await?;
        let Ok(head) = serde_json::from_slice::<TypeOnly<'_>>(&text) else {
            continue;
        };
        if head.reference.as_ref().and_then(serde_json::Value::as_str) != Some(reference) {
            continue;
        }
        if head.kind == expected {
            return Ok(text);
        }
        if head.kind == "error" {
            let error: ErrorReply =
                serde_json::from_slice(&text).map_err(|_| unexpected("an error reply", &text))?;
            return Err(SetupError::Refused {
                code: error.code,
                message: error.message,
            });
        }
        return Err(unexpected(expected, &text));
    }
}

/// The next text frame, owned (setup paths only; the hot path borrows).
pub async fn next_text(conn: &mut WsConn) -> Result<Vec<u8>, WireError> {
    loop {
        if let Some(frame) = conn.next_frame()? {
            return Ok(frame.payload.to_vec());
        }
        if conn.has_pending_writes() {
            conn.flush().await?;
        }
        conn.fill().await?;
    }
}

fn unexpected(wanted: &str, got: &[u8]) -> SetupError {
    let got = String::from_utf8_lossy(&got[..got.len().min(200)]).into_owned();
    SetupError::Unexpected(format!("expected {wanted}, got {got}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{self, Stamp};
    use confab_proto::{ChatMessage, ServerEvent, UserRef};

    fn stamp() -> Stamp {
        Stamp {
            publisher: 4,
            seq: 9,
            sent_ns: 1234,
        }
    }

    fn decoded(target: Target, text: &[u8]) -> Vec<Incoming<'_>> {
        let mut out = Vec::new();
        target.decode(text, |item| out.push(item));
        out
    }

    /// The real server's `message` event (serialized with confab-proto) yields the payload.
    #[test]
    fn confab_message_events_yield_the_content() {
        let mut content = Vec::new();
        payload::encode(&mut content, stamp(), 64);
        let event = ServerEvent::Message(ChatMessage {
            id: "0195f3b4-2b3c-7d4e-8f50-61728394a5b6".into(),
            seq: 43,
            room: "r1".into(),
            user: std::sync::Arc::new(UserRef {
                id: "weird \"content\":\"".into(),
                name: "ann".into(),
            }),
            content: String::from_utf8(content.clone()).unwrap(),
            client_id: Some("c-1".into()),
            timestamp: "2025-03-30T14:05:20.618Z".into(),
        });
        let text = serde_json::to_vec(&event).unwrap();
        let items = decoded(Target::Confab, &text);
        assert_eq!(items, vec![Incoming::Payload { bytes: &content }]);
        let Incoming::Payload { bytes } = &items[0] else {
            unreachable!()
        };
        assert_eq!(payload::parse(bytes), Some(stamp()));
    }

    #[test]
    fn confab_acks_errors_and_others() {
        let ack = br#"{"type":"ack","ref":17,"id":"x","seq":5,"client_id":"c-17"}"#;
        assert_eq!(
            decoded(Target::Confab, ack),
            vec![Incoming::Ack {
                reference: Some(17),
                seq: 5
            }]
        );
        let error = br#"{"type":"error","ref":3,"code":"rate_limited","message":"slow down"}"#;
        assert_eq!(
            decoded(Target::Confab, error),
            vec![Incoming::Error {
                reference: Some(3),
                code: "rate_limited".into(),
                message: "slow down".into()
            }]
        );
        let joined = br#"{"type":"user_joined","room":"r","user":{"id":"a","name":"a"}}"#;
        assert_eq!(decoded(Target::Confab, joined), vec![Incoming::Other]);
    }

    #[test]
    fn publish_frames_per_target() {
        let write = |out: &mut Vec<u8>| payload::encode(out, stamp(), 0);
        let confab_command = |seq: u64| {
            let mut out = Vec::new();
            Target::Confab.publish_text(
                &mut out,
                "room-1",
                ("bench-x-4", ClientIds::Counter),
                seq,
                write,
            );
            let command: serde_json::Value = serde_json::from_slice(&out).unwrap();
            (out, command)
        };
        let (out, command) = confab_command(9);
        assert_eq!(command["type"], "message");
        assert_eq!(command["ref"], 9);
        assert_eq!(command["room"], "room-1");
        assert_eq!(command["content"], "b4-9-1234;");
        assert_eq!(command["client_id"], "bench-x-4-0000000000000009");
        // The command parses as the server's own type.
        serde_json::from_slice::<confab_proto::ClientCommand>(&out).unwrap();
        // Counter ids sort as they were sent.
        let ids: Vec<String> = [9, 10, 99, 100, 255, 256, 70_000]
            .into_iter()
            .map(|seq| {
                confab_command(seq).1["client_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert!(ids.is_sorted(), "{ids:?}");

        // Random ids: UUIDv4s, the same for the same message, different from message to
        // message and from connection to connection.
        let random_id = |prefix: &str, seq: u64| {
            let mut out = Vec::new();
            Target::Confab.publish_text(&mut out, "r", (prefix, ClientIds::Random), seq, write);
            let command: serde_json::Value = serde_json::from_slice(&out).unwrap();
            command["client_id"].as_str().unwrap().to_string()
        };
        let id = random_id("bench-x-4", 9);
        let uuid = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(uuid.get_version_num(), 4, "{id}");
        assert_eq!(id, random_id("bench-x-4", 9));
        assert_ne!(id, random_id("bench-x-4", 10));
        assert_ne!(id, random_id("bench-x-5", 9));

        let mut out = Vec::new();
        Target::Socketio.publish_text(&mut out, "r", ("p", ClientIds::Counter), 9, write);
        assert_eq!(out, br#"42["msg","b4-9-1234;"]"#);
        assert_eq!(
            decoded(Target::Socketio, &out),
            vec![Incoming::Payload {
                bytes: b"b4-9-1234;"
            }]
        );

        let mut out = Vec::new();
        Target::Raw.publish_text(&mut out, "r", ("p", ClientIds::Counter), 9, write);
        assert_eq!(out, b"b4-9-1234;");
    }

    #[test]
    fn raw_frames_may_pack_several_payloads() {
        let items = decoded(Target::Raw, b"b1-0-5;xx\nb2-0-6;yy\n");
        assert_eq!(
            items,
            vec![
                Incoming::Payload {
                    bytes: b"b1-0-5;xx"
                },
                Incoming::Payload {
                    bytes: b"b2-0-6;yy"
                }
            ]
        );
    }

    #[test]
    fn socketio_pings_and_noise() {
        assert_eq!(decoded(Target::Socketio, b"2"), vec![Incoming::Ping]);
        assert_eq!(
            decoded(Target::Socketio, b"40{\"sid\":\"x\"}"),
            vec![Incoming::Other]
        );
    }

    #[test]
    fn paths() {
        assert_eq!(Target::Confab.path("r", Some("t")), "/ws?token=t");
        assert_eq!(Target::Raw.path("r", None), "/ws?room=r");
        assert_eq!(
            Target::Socketio.path("r", None),
            "/socket.io/?EIO=4&transport=websocket&room=r"
        );
    }
}
