//! Bad input, limits, floods and slow consumers: each gets its precise error or close code, the
//! server keeps serving everyone else, and no acknowledged message is lost.

mod common;

use std::time::Duration;

use common::*;
use confab_client::ClientError;
use confab_proto::{ClientCommand, ErrorCode, ServerEvent};
use tokio_tungstenite::tungstenite::Message;

async fn expect_error(
    conn: &mut confab_client::Connection,
) -> (Option<serde_json::Value>, ErrorCode) {
    match next_of_type(conn, "error").await {
        ServerEvent::Error {
            reference, code, ..
        } => (reference, code),
        other => panic!("{other:?}"),
    }
}

async fn still_usable(conn: &mut confab_client::Connection) {
    let pong = conn
        .request(ClientCommand::Ping { reference: None })
        .await
        .unwrap();
    assert!(matches!(pong, ServerEvent::Pong { .. }));
}

#[tokio::test]
async fn malformed_and_unknown_commands_get_bad_request() {
    let server = TestServer::start().await;
    let mut ann = server.connect("ann").await;
    for (frame, expected_ref) in [
        ("{not json", None),
        ("[1,2,3]", None),
        (r#"{"room":"general"}"#, None),
        (
            r#"{"type":"dance","ref":"d1"}"#,
            Some(serde_json::json!("d1")),
        ),
        (r#"{"type":"join","ref":7}"#, Some(serde_json::json!(7))),
        (
            r#"{"type":"message","room":"general","content":5,"ref":"m"}"#,
            Some(serde_json::json!("m")),
        ),
        (
            r#"{"type":"read","room":"general","seq":-1,"ref":"r"}"#,
            Some(serde_json::json!("r")),
        ),
    ] {
        ann.send_text(frame).await.unwrap();
        let (reference, code) = expect_error(&mut ann).await;
        assert_eq!(code, ErrorCode::BadRequest, "{frame}");
        assert_eq!(reference, expected_ref, "{frame}");
    }
    ann.send_message(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert_eq!(expect_error(&mut ann).await.1, ErrorCode::BadRequest);
    still_usable(&mut ann).await;
    let pong = ann
        .request(ClientCommand::Ping { reference: None })
        .await
        .unwrap();
    assert!(matches!(pong, ServerEvent::Pong { reference: Some(_) }));
}

#[tokio::test]
async fn content_rules() {
    let server = TestServer::start().await;
    let mut ann = server.connect("ann").await;
    ann.join("general", None).await.unwrap();
    for empty in ["", "   ", "\n\t"] {
        let err = ann.say("general", empty, None).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    }
    let err = ann
        .say("general", &"x".repeat(4001), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooLarge));
    // 4,000 characters is fine, even when they are multi-byte.
    ann.say("general", &"é".repeat(4000), None).await.unwrap();
    let err = ann
        .say("general", "ok", Some(&"k".repeat(200)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    let rest = server.user("ann");
    let err = rest
        .post_message("general", &"x".repeat(4001), None)
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.code()),
        (Some(413), Some(ErrorCode::TooLarge))
    );
    let err = rest.post_message("general", " ", None).await.unwrap_err();
    assert_eq!(err.status(), Some(400));
    still_usable(&mut ann).await;
}

#[tokio::test]
async fn oversized_frames_close_with_1009_and_others_are_unaffected() {
    let server = TestServer::start().await;
    let mut ann = server.connect("ann").await;
    let mut bob = server.connect("bob").await;
    bob.join("general", None).await.unwrap();
    let huge = format!(
        r#"{{"type":"message","room":"general","content":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    ann.send_text(huge).await.unwrap();
    let (code, _) = within(5, ann.closed()).await;
    assert_eq!(code, 1009);
    bob.say("general", "still here", None).await.unwrap();
    assert_eq!(bob.next_message().await.unwrap().content, "still here");
}

#[tokio::test]
async fn message_floods_are_rate_limited() {
    // A slow refill, so however long sending the burst takes, at most a few tokens come back.
    let server = TestServer::start_with(|c| c.message_rate = 1).await;
    let mut ann = server.connect("ann").await;
    let mut bob = server.connect("bob").await;
    ann.join("general", None).await.unwrap();
    bob.join("general", None).await.unwrap();
    // Burst of 20 then 10/s: send 40 as fast as possible.
    for n in 0..40 {
        ann.send(&ClientCommand::Message {
            reference: Some(serde_json::json!(n)),
            room: "general".into(),
            content: format!("flood {n}"),
            client_id: None,
        })
        .await
        .unwrap();
    }
    let (mut acked, mut limited) = (0, 0);
    while acked + limited < 40 {
        match within(5, ann.next_event()).await.unwrap() {
            ServerEvent::Ack { .. } => acked += 1,
            ServerEvent::Error {
                code: ErrorCode::RateLimited,
                ..
            } => limited += 1,
            _ => {}
        }
    }
    assert!((20..=23).contains(&acked), "acked {acked}");
    assert_eq!(acked + limited, 40);
    // Bob got exactly the acknowledged ones, in order, and can still talk.
    let mut seqs = Vec::new();
    while seqs.len() < acked {
        seqs.push(within(5, bob.next_message()).await.unwrap().seq);
    }
    assert_eq!(seqs, (1..=acked as u64).collect::<Vec<_>>());
    bob.say("general", "unaffected", None).await.unwrap();
    // REST sends are limited per user too.
    let rest = server.user("carol");
    rest.join_room("general").await.unwrap();
    let mut statuses = Vec::new();
    for n in 0..25 {
        statuses.push(
            match rest.post_message("general", &format!("r{n}"), None).await {
                Ok(_) => 201,
                Err(err) => err.status().unwrap(),
            },
        );
    }
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn command_floods_end_in_a_policy_close() {
    let server = TestServer::start_with(|c| {
        c.command_rate = 1;
        c.command_burst = 1;
    })
    .await;
    let mut ann = server.connect("ann").await;
    for _ in 0..150 {
        if ann.send_text(r#"{"type":"ping"}"#).await.is_err() {
            break;
        }
    }
    let (code, reason) = within(5, ann.closed()).await;
    assert_eq!(code, 1008, "{reason}");
    assert!(server.client().healthy().await);
}

#[tokio::test]
async fn per_user_connection_cap() {
    let server = TestServer::start_with(|c| c.max_connections_per_user = 2).await;
    let _a = server.connect("ann").await;
    let _b = server.connect("ann").await;
    let err = server.user("ann").connect().await.unwrap_err();
    assert_eq!(
        (err.status(), err.code()),
        (Some(429), Some(ErrorCode::RateLimited))
    );
    // Other users are not affected.
    server.connect("bob").await;
}

#[tokio::test]
async fn silent_connections_are_closed_by_the_heartbeat() {
    let server = TestServer::start_with(|c| {
        c.heartbeat_interval_ms = 200;
        c.heartbeat_timeout_ms = 500;
    })
    .await;
    let mut quiet = server.connect("quiet").await;
    let mut lively = server.connect("lively").await;
    // Not reading means not answering pings; reading answers them (tungstenite pongs).
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1_200) {
        let _ = lively
            .next_event_within(Duration::from_millis(50))
            .await
            .unwrap();
    }
    let (code, reason) = within(5, quiet.closed()).await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("heartbeat"));
    // The responsive client was pinged several times and is still connected.
    let pong = lively
        .request(ClientCommand::Ping { reference: None })
        .await
        .unwrap();
    assert!(matches!(pong, ServerEvent::Pong { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_are_closed_with_1013_and_resume_without_gaps() {
    let server = TestServer::start_with(|c| {
        c.outbound_queue = 64;
        c.message_rate = 10_000;
        c.message_burst = 10_000;
    })
    .await;
    let mut slow = server.connect("slow").await;
    slow.join("firehose", None).await.unwrap();
    let mut fast = server.connect("fast").await;
    fast.join("firehose", None).await.unwrap();
    let mut sender = server.connect("sender").await;
    sender.join("firehose", None).await.unwrap();

    // Pump until the slow session (which reads nothing) has overflowed. Kernel buffers absorb
    // a few MB first, so use big messages; the fast reader drains alongside.
    let body = "y".repeat(3_900);
    let total: u64 = 3_000;
    let pump = tokio::spawn(async move {
        // Windows of 16 unacknowledged messages: bursts stay well inside a healthy queue, and
        // the sender reads its own acks so it is not the slow one.
        for n in 0..total {
            sender
                .send(&ClientCommand::Message {
                    reference: None,
                    room: "firehose".into(),
                    content: format!("{n} {body}"),
                    client_id: None,
                })
                .await
                .unwrap();
            if n % 16 == 15 {
                let mut acks = 0;
                while acks < 16 {
                    if let ServerEvent::Ack { .. } = within(30, sender.next_event()).await.unwrap()
                    {
                        acks += 1;
                    }
                }
            }
        }
        sender
    });
    let mut fast_seqs = Vec::new();
    while fast_seqs.len() < total as usize {
        fast_seqs.push(within(30, fast.next_message()).await.unwrap().seq);
    }
    assert_eq!(
        fast_seqs,
        (1..=total).collect::<Vec<_>>(),
        "the fast reader was not slowed or cut"
    );
    pump.await.unwrap();

    // The slow reader now reads: a prefix of the stream in order, then 1013.
    let mut last = 0;
    let close = loop {
        match within(30, slow.next_event()).await {
            Ok(ServerEvent::Message(m)) => {
                assert_eq!(m.seq, last + 1, "no gap before the close");
                last = m.seq;
            }
            Ok(_) => {}
            Err(ClientError::Closed { code, reason }) => break (code, reason),
            Err(other) => panic!("{other}"),
        }
    };
    assert_eq!(close.0, 1013, "{}", close.1);
    assert!(last < total, "it really was cut off");

    // Resume: everything after `last`, nothing twice.
    let mut slow = server.connect("slow").await;
    let seqs: Vec<u64> = slow
        .catch_up("firehose", last)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, (last + 1..=total).collect::<Vec<_>>());
}
