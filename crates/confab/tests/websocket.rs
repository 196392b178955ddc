//! The WebSocket layer itself, driven with raw bytes: handshake checks, fragmented messages,
//! pings, and the close codes for protocol violations.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [7, 1, 2, 3];
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    assert!(payload.len() < 126);
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

/// A raw connection after a successful handshake, with whatever followed the 101 kept.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn open(server: &TestServer, name: &str) -> Raw {
        let host = server.base.trim_start_matches("http://").to_string();
        let mut stream = TcpStream::connect(&host).await.unwrap();
        let request = format!(
            "GET /ws?token={} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            token_for(&format!("id-{name}"), name)
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
        };
        let head = raw.until(b"\r\n\r\n").await;
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // The RFC's own example key and answer.
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        raw
    }

    async fn until(&mut self, end: &[u8]) -> Vec<u8> {
        loop {
            if let Some(at) = self.buf.windows(end.len()).position(|w| w == end) {
                return self.buf.drain(..at + end.len()).collect();
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = within(5, self.stream.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "connection closed");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next server frame: (opcode, payload). Server frames are unmasked.
    async fn next_frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 2 {
                let len = usize::from(self.buf[1] & 0x7f);
                let (len, start) = match len {
                    126 if self.buf.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                        4,
                    ),
                    126 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.buf.len() >= start + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[start..start + len].to_vec();
                    self.buf.drain(..start + len);
                    return (opcode, payload);
                }
            }
            self.fill().await;
        }
    }

    /// The payload of the server's close frame. Events may arrive before it (the user's own
    /// presence is announced asynchronously): text frames are skipped, anything else is not.
    async fn next_close(&mut self) -> Vec<u8> {
        loop {
            match self.next_frame().await {
                (0x1, _) => continue,
                (0x8, payload) => return payload,
                (opcode, _) => panic!("expected a close frame, got opcode {opcode:#x}"),
            }
        }
    }

    /// The next text frame whose JSON has this `type`.
    async fn next_of_type(&mut self, kind: &str) -> serde_json::Value {
        loop {
            let (opcode, payload) = self.next_frame().await;
            if opcode == 1 {
                let value: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                if value["type"] == kind {
                    return value;
                }
            }
        }
    }
}

#[tokio::test]
async fn fragmented_messages_pings_and_a_clean_close() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(&server, "ann").await;
    raw.next_of_type("connected").await;
    // One command in three fragments, with a ping in between (allowed by RFC 6455).
    let command = br#"{"type":"join","room":"general","ref":7}"#;
    let mut bytes = frame(false, 0x1, &command[..10]);
    bytes.extend(frame(false, 0x0, &command[10..20]));
    bytes.extend(frame(true, 0x9, b"are you there"));
    bytes.extend(frame(true, 0x0, &command[20..]));
    raw.stream.write_all(&bytes).await.unwrap();
    assert_eq!(raw.next_frame().await, (0xA, b"are you there".to_vec()));
    let joined = raw.next_of_type("joined").await;
    assert_eq!(joined["ref"], 7);
    // Our close is answered with the same code.
    raw.stream
        .write_all(&frame(true, 0x8, &4000u16.to_be_bytes()))
        .await
        .unwrap();
    let payload = raw.next_close().await;
    assert_eq!(payload[..2], 4000u16.to_be_bytes());
}

#[tokio::test]
async fn protocol_violations_close_with_1002() {
    let server = TestServer::start().await;
    for bad in [
        // unmasked
        vec![0x81, 0x02, b'h', b'i'],
        // reserved bit
        {
            let mut f = frame(true, 0x1, b"hi");
            f[0] |= 0x40;
            f
        },
        // continuation without a message
        frame(true, 0x0, b"hi"),
        // fragmented ping
        frame(false, 0x9, b""),
    ] {
        let mut raw = Raw::open(&server, "ann").await;
        raw.next_of_type("connected").await;
        raw.stream.write_all(&bad).await.unwrap();
        let payload = raw.next_close().await;
        assert_eq!(
            u16::from_be_bytes([payload[0], payload[1]]),
            1002,
            "{bad:?}"
        );
    }
    // The server is fine.
    let mut ann = server.connect("ann").await;
    ann.join("general", None).await.unwrap();
}

#[tokio::test]
async fn requests_that_are_not_websocket_handshakes_are_refused() {
    let server = TestServer::start().await;
    let client = reqwest::Client::new();
    let url = format!("{}/ws?token={}", server.base, token_for("id-ann", "ann"));
    let plain = client.get(&url).send().await.unwrap();
    assert_eq!(plain.status(), 400);
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    let wrong_version = client
        .get(&url)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_version.status(), 400);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Reads frames until `deadline`, counting the server's pings; `send` (if any) goes out every
/// 50 ms meanwhile.
async fn count_pings(raw: &mut Raw, deadline: tokio::time::Instant, send: Option<&[u8]>) -> usize {
    let mut pings = 0;
    let mut next_send = tokio::time::Instant::now();
    while tokio::time::Instant::now() < deadline {
        if let Some(bytes) = send
            && tokio::time::Instant::now() >= next_send
        {
            raw.stream.write_all(bytes).await.unwrap();
            next_send += Duration::from_millis(50);
        }
        let until = if send.is_some() {
            next_send.min(deadline)
        } else {
            deadline
        };
        if let Ok((opcode, _)) = tokio::time::timeout_at(until, raw.next_frame()).await {
            assert_ne!(opcode, 0x8, "closed");
            pings += usize::from(opcode == 0x9);
        }
    }
    pings
}

#[tokio::test]
async fn pings_go_to_quiet_connections_not_to_ones_in_use_both_ways() {
    let server = TestServer::start_with(|c| {
        c.heartbeat_interval_ms = 400;
        c.heartbeat_timeout_ms = 10_000;
        c.message_rate = 100;
    })
    .await;
    let mut quiet = Raw::open(&server, "quiet").await;
    quiet.next_of_type("connected").await;
    let mut chatty = Raw::open(&server, "chatty").await;
    chatty.next_of_type("connected").await;
    chatty
        .stream
        .write_all(&frame(true, 0x1, br#"{"type":"join","room":"busy"}"#))
        .await
        .unwrap();
    chatty.next_of_type("joined").await;
    let message = frame(
        true,
        0x1,
        br#"{"type":"message","room":"busy","content":"hi"}"#,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let (chatty_pings, quiet_pings) = tokio::join!(
        count_pings(&mut chatty, deadline, Some(&message)),
        count_pings(&mut quiet, deadline, None),
    );
    // A ping at most every 300-400 ms (the interval less a per-connection share of a quarter
    // of it), a sweep every 100 ms: four or five in 2 s for the quiet one. The chatty one
    // sends and is sent something every 50 ms: none (one if the machine stalls the test).
    assert!(quiet_pings >= 4, "quiet: {quiet_pings} pings");
    assert!(chatty_pings <= 1, "chatty: {chatty_pings} pings");
}
