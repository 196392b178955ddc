//! Chat messages: delivery, acks, ordering, idempotency, history and resume.

mod common;

use common::*;
use confab_proto::{ClientCommand, ErrorCode, PresenceStatus, ServerEvent};

#[tokio::test]
async fn two_users_chat_and_an_outsider_sees_nothing() {
    let server = TestServer::start().await;
    let mut ann = server.connect("ann").await;
    let mut bob = server.connect("bob").await;
    let mut carol = server.connect("carol").await;
    ann.join("lobby", None).await.unwrap();
    let joined = bob.join("lobby", None).await.unwrap();
    assert!(joined.members.iter().any(|m| m.id == "id-ann" && m.online));
    match next_of_type(&mut ann, "user_joined").await {
        ServerEvent::UserJoined { room, user, status } => {
            assert_eq!(
                (room.as_str(), user, status),
                ("lobby", user_ref("bob"), PresenceStatus::Online)
            );
        }
        other => panic!("{other:?}"),
    }

    // Ack carries ref, id, seq and client_id.
    ann.send_text(
        r#"{"type":"message","room":"lobby","content":"hello bob","client_id":"c-1","ref":"x1"}"#,
    )
    .await
    .unwrap();
    let ack = next_of_type(&mut ann, "ack").await;
    let ack = serde_json::to_value(&ack).unwrap();
    assert_eq!(ack["ref"], "x1");
    assert_eq!(ack["seq"], 1);
    assert_eq!(ack["client_id"], "c-1");

    for conn in [&mut ann, &mut bob] {
        let message = within(5, conn.next_message()).await.unwrap();
        assert_eq!(message.content, "hello bob");
        assert_eq!(message.seq, 1);
        assert_eq!(message.room, "lobby");
        assert_eq!(*message.user, user_ref("ann"));
        assert_eq!(message.client_id.as_deref(), Some("c-1"));
        assert_eq!(message.id, ack["id"]);
        // RFC 3339 UTC with milliseconds.
        assert_eq!(message.timestamp.len(), 24, "{}", message.timestamp);
        assert!(message.timestamp.ends_with('Z'));
    }
    assert_silent(&mut carol, 300).await;
}

#[tokio::test]
async fn broadcasts_carry_no_ref_and_all_devices_get_messages() {
    let server = TestServer::start().await;
    let mut phone = server.connect("ann").await;
    let mut laptop = server.connect("ann").await;
    let mut bob = server.connect("bob").await;
    phone.join("r", None).await.unwrap();
    laptop.join("r", None).await.unwrap();
    bob.join("r", None).await.unwrap();
    bob.say("r", "to every device", None).await.unwrap();
    for conn in [&mut phone, &mut laptop, &mut bob] {
        let raw = within(5, async {
            loop {
                let event = conn.next_event().await.unwrap();
                if matches!(event, ServerEvent::Message(_)) {
                    return serde_json::to_value(event).unwrap();
                }
            }
        })
        .await;
        assert_eq!(raw["content"], "to every device");
        assert!(raw.get("ref").is_none(), "broadcasts have no ref: {raw}");
    }
}

#[tokio::test]
async fn seqs_are_gap_free_and_ordered_for_every_subscriber() {
    let server = TestServer::start().await;
    let mut watchers = Vec::new();
    for i in 0..3 {
        let mut conn = server.connect(&format!("watcher{i}")).await;
        conn.join("busy", None).await.unwrap();
        watchers.push(conn);
    }
    // Three senders at once, 30 messages each, with a raised rate limit.
    let mut senders = Vec::new();
    for i in 0..3 {
        let mut conn = server.connect(&format!("sender{i}")).await;
        conn.join("busy", None).await.unwrap();
        senders.push(tokio::spawn(async move {
            for n in 0..15 {
                conn.say("busy", &format!("s{i}-{n}"), None).await.unwrap();
            }
            conn
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    for watcher in &mut watchers {
        let mut seqs = Vec::new();
        while seqs.len() < 45 {
            seqs.push(within(5, watcher.next_message()).await.unwrap().seq);
        }
        assert_eq!(seqs, (1..=45).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn retried_client_ids_are_stored_once() {
    let server = TestServer::start().await;
    let mut ann = server.connect("ann").await;
    let mut bob = server.connect("bob").await;
    ann.join("r", None).await.unwrap();
    bob.join("r", None).await.unwrap();
    let first = ann.say("r", "only once", Some("retry-1")).await.unwrap();
    let again = ann.say("r", "only once", Some("retry-1")).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(bob.next_message().await.unwrap().seq, 1);
    // Only presence may still arrive: whether the announcer looked up ann's and bob's rooms
    // before or after they joined is a matter of timing.
    assert_silent_except(&mut bob, 300, |event| {
        matches!(event, ServerEvent::Presence { .. })
    })
    .await;

    // The same key over REST acks the original too (200, not 201).
    let (status, message) = server
        .user("ann")
        .post_message("r", "only once", Some("retry-1"))
        .await
        .unwrap();
    assert_eq!(
        (status, message.id, message.seq),
        (200, first.0.clone(), first.1)
    );
    // Another user may use the same key: keys are per user.
    let (_, seq) = bob.say("r", "mine", Some("retry-1")).await.unwrap();
    assert_eq!(seq, 2);
    let history = server
        .user("ann")
        .messages("r", None, None, None)
        .await
        .unwrap();
    assert_eq!(history.messages.len(), 2);
}

#[tokio::test]
async fn rest_posts_reach_websocket_subscribers() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob").await;
    bob.join("r", None).await.unwrap();
    let ann = server.user("ann");
    let err = ann
        .post_message("r", "not a member yet", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    ann.join_room("r").await.unwrap();
    let (status, stored) = ann
        .post_message("r", "via REST", Some("rest-1"))
        .await
        .unwrap();
    assert_eq!(status, 201);
    assert_eq!(stored.seq, 1);
    let pushed = bob.next_message().await.unwrap();
    assert_eq!(pushed, stored);
}

#[tokio::test]
async fn history_pages_over_websocket_and_rest() {
    let server = TestServer::start_with(|c| c.message_burst = 100).await;
    let ann = server.user("ann");
    ann.join_room("h").await.unwrap();
    for n in 1..=60 {
        ann.post_message("h", &format!("m{n}"), None).await.unwrap();
    }
    // join without since: the newest 50, oldest first.
    let mut conn = server.connect("ann").await;
    let joined = conn.join("h", None).await.unwrap();
    let seqs: Vec<_> = joined.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (11..=60).collect::<Vec<_>>());
    assert!(joined.has_more);

    let page = conn
        .request(ClientCommand::History {
            reference: None,
            room: "h".into(),
            before: Some(11),
            after: None,
            limit: Some(5),
        })
        .await
        .unwrap();
    match page {
        ServerEvent::History {
            room,
            messages,
            has_more,
            ..
        } => {
            assert_eq!(room, "h");
            assert_eq!(
                messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
                vec![6, 7, 8, 9, 10]
            );
            assert!(has_more);
        }
        other => panic!("{other:?}"),
    }
    let rest = ann.messages("h", None, Some(55), None).await.unwrap();
    assert_eq!(
        rest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![56, 57, 58, 59, 60]
    );
    assert!(!rest.has_more);
    let rest = ann.messages("h", Some(3), None, None).await.unwrap();
    assert_eq!(
        rest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(!rest.has_more);
    let rest = ann
        .messages("h", Some(30), Some(20), Some(3))
        .await
        .unwrap();
    assert_eq!(
        rest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![21, 22, 23]
    );
    assert!(rest.has_more);
    let bad = reqwest::Client::new()
        .get(format!("{}/api/rooms/h/messages?limit=abc", server.base))
        .bearer_auth(ann.token().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn resume_with_since_gets_exactly_the_missed_messages() {
    let server = TestServer::start().await;
    let mut ann = server.connect("ann").await;
    ann.join("r", None).await.unwrap();
    let mut bob = server.connect("bob").await;
    bob.join("r", None).await.unwrap();
    ann.say("r", "before", None).await.unwrap();
    let last_seen = bob.next_message().await.unwrap().seq;
    bob.abort();

    for n in 0..5 {
        ann.say("r", &format!("missed {n}"), None).await.unwrap();
    }
    let mut bob = server.connect("bob").await;
    let joined = bob.join("r", Some(last_seen)).await.unwrap();
    let contents: Vec<_> = joined.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        contents,
        vec!["missed 0", "missed 1", "missed 2", "missed 3", "missed 4"]
    );
    assert!(!joined.has_more);
    // Live messages continue right after, with nothing repeated.
    ann.say("r", "live", None).await.unwrap();
    let live = bob.next_message().await.unwrap();
    assert_eq!((live.seq, live.content.as_str()), (7, "live"));
    assert_silent(&mut bob, 200).await;
}

#[tokio::test]
async fn large_catch_up_is_paged() {
    let server = TestServer::start_with(|c| {
        c.max_history_page = 10;
        c.message_burst = 100;
    })
    .await;
    let ann = server.user("ann");
    ann.join_room("r").await.unwrap();
    for n in 0..25 {
        ann.post_message("r", &format!("{n}"), None).await.unwrap();
    }
    let mut bob = server.connect("bob").await;
    let joined = bob.join("r", Some(0)).await.unwrap();
    assert_eq!(joined.messages.len(), 10);
    assert!(joined.has_more);
    let seen: Vec<u64> = bob
        .catch_up("r", 0)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
}

#[tokio::test]
async fn read_positions_are_broadcast_and_survive_a_restart() {
    let server = TestServer::start().await;
    let mut ann = server.connect("ann").await;
    let mut bob = server.connect("bob").await;
    ann.join("r", None).await.unwrap();
    bob.join("r", None).await.unwrap();
    for n in 0..3 {
        ann.say("r", &format!("{n}"), None).await.unwrap();
    }
    bob.mark_read("r", 2).await.unwrap();
    for conn in [&mut ann, &mut bob] {
        match next_of_type(conn, "read").await {
            ServerEvent::Read { room, user, seq } => {
                assert_eq!((room.as_str(), user, seq), ("r", user_ref("bob"), 2));
            }
            other => panic!("{other:?}"),
        }
    }
    drop((ann, bob));
    let server = server.restart().await;
    let mut bob = server.connect("bob").await;
    let joined = bob.join("r", None).await.unwrap();
    assert_eq!(joined.read_seq, 2);
    // Every member's position is listed too: that is what read receipts are drawn from.
    let positions = |members: &[confab_proto::Member]| -> Vec<(String, u64, PresenceStatus)> {
        members
            .iter()
            .map(|m| (m.name.clone(), m.read_seq, m.status))
            .collect()
    };
    let expected = vec![
        ("ann".to_string(), 0, PresenceStatus::Offline),
        ("bob".to_string(), 2, PresenceStatus::Online),
    ];
    assert_eq!(positions(&joined.members), expected);
    let listed = server.user("ann").members("r").await.unwrap();
    assert_eq!(positions(&listed), expected);
    let listed = server.user("bob").rooms().await.unwrap();
    let r = listed.iter().find(|r| r.room.id == "r").unwrap();
    assert_eq!((r.read_seq, r.last_seq, r.member), (2, 3, true));
    // Reading "backwards" never lowers the stored position.
    bob.mark_read("r", 1).await.unwrap();
    match next_of_type(&mut bob, "read").await {
        ServerEvent::Read { seq, .. } => assert_eq!(seq, 2),
        other => panic!("{other:?}"),
    }
}
