//! Presence across devices, join/leave notices with a grace period, and typing indicators.

mod common;

use std::time::Duration;

use common::*;
use confab_proto::{ClientCommand, PresenceStatus, ServerEvent, SettableStatus};

/// A presence change of anyone but the watching user: the watcher's own `online` may or may not
/// reach it, depending on whether the announcer runs before or after its first join.
fn presence_of(event: &ServerEvent) -> Option<(String, PresenceStatus)> {
    match event {
        ServerEvent::Presence { user, status } if user.id != "id-watcher" => {
            Some((user.id.clone(), *status))
        }
        _ => None,
    }
}

async fn next_presence(conn: &mut confab_client::Connection) -> (String, PresenceStatus) {
    within(5, conn.wait_for(presence_of)).await.unwrap()
}

/// The next `user_joined` (room, user id), skipping other events.
async fn next_user_joined(conn: &mut confab_client::Connection) -> (String, String) {
    let pick = |e: &ServerEvent| match e {
        ServerEvent::UserJoined { room, user, .. } => Some((room.clone(), user.id.clone())),
        _ => None,
    };
    within(5, conn.wait_for(pick)).await.unwrap()
}

/// The next `user_left` (room, user id), skipping other events.
async fn next_user_left(conn: &mut confab_client::Connection) -> (String, String) {
    let pick = |e: &ServerEvent| match e {
        ServerEvent::UserLeft { room, user } => Some((room.clone(), user.id.clone())),
        _ => None,
    };
    within(5, conn.wait_for(pick)).await.unwrap()
}

/// The next `n` presence and join/leave notices, sorted: presence comes from the announcer task
/// and `user_joined`/`user_left` from the session, so their relative order is not fixed.
async fn next_notices(conn: &mut confab_client::Connection, n: usize) -> Vec<String> {
    let pick = |e: &ServerEvent| match e {
        ServerEvent::Presence { .. } => {
            presence_of(e).map(|(id, status)| format!("presence {id} {status:?}"))
        }
        ServerEvent::UserJoined { room, user, .. } => Some(format!("joined {room} {}", user.id)),
        ServerEvent::UserLeft { room, user } => Some(format!("left {room} {}", user.id)),
        _ => None,
    };
    let mut seen = Vec::new();
    for _ in 0..n {
        seen.push(within(5, conn.wait_for(pick)).await.unwrap());
    }
    seen.sort();
    seen
}

/// Asserts that the watcher hears nothing for `millis` but (perhaps) its own presence.
async fn assert_no_notices(watcher: &mut confab_client::Connection, millis: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(millis);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(event) = watcher.next_event_within(left).await.unwrap() else {
            return;
        };
        match &event {
            ServerEvent::Presence { user, .. } if user.id == "id-watcher" => {}
            _ => panic!("expected silence, got {event:?}"),
        }
    }
}

#[tokio::test]
async fn presence_follows_the_user_not_the_device() {
    let server = TestServer::start().await;
    let mut watcher = server.connect("watcher").await;
    watcher.join("r", None).await.unwrap();
    server.user("ann").join_room("r").await.unwrap();
    let rest = server.user("watcher");

    let mut phone = server.connect("ann").await;
    assert_eq!(
        next_presence(&mut watcher).await,
        ("id-ann".into(), PresenceStatus::Online)
    );
    let mut laptop = server.connect("ann").await;
    let statuses = rest.presence(&["id-ann", "id-nobody"]).await.unwrap();
    assert_eq!(statuses[0].status, PresenceStatus::Online);
    assert_eq!(statuses[1].status, PresenceStatus::Offline);

    // Away only when every device is away.
    phone.set_status(SettableStatus::Away).await.unwrap();
    laptop.set_status(SettableStatus::Away).await.unwrap();
    assert_eq!(
        next_presence(&mut watcher).await,
        ("id-ann".into(), PresenceStatus::Away)
    );
    laptop.set_status(SettableStatus::Online).await.unwrap();
    assert_eq!(
        next_presence(&mut watcher).await,
        ("id-ann".into(), PresenceStatus::Online)
    );

    // One device leaving changes nothing; the last one leaving means offline after the grace.
    phone.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rest.presence(&["id-ann"]).await.unwrap()[0].status,
        PresenceStatus::Online
    );
    laptop.close().await;
    assert_eq!(
        next_presence(&mut watcher).await,
        ("id-ann".into(), PresenceStatus::Offline)
    );
    assert_eq!(
        rest.presence(&["id-ann"]).await.unwrap()[0].status,
        PresenceStatus::Offline
    );
    let err = rest.presence(&[]).await.unwrap_err();
    assert_eq!(err.status(), Some(400));
}

#[tokio::test]
async fn a_quick_reconnect_does_not_flicker() {
    let server = TestServer::start_with(|c| c.presence_grace_ms = 1_000).await;
    let mut watcher = server.connect("watcher").await;
    watcher.join("r", None).await.unwrap();
    // Ann is a member before she connects, and not subscribed yet: her coming online is
    // announced to r.
    server.user("ann").join_room("r").await.unwrap();
    let mut ann = server.connect("ann").await;
    assert_eq!(
        next_presence(&mut watcher).await,
        ("id-ann".into(), PresenceStatus::Online)
    );
    ann.join("r", None).await.unwrap();
    assert_eq!(
        next_user_joined(&mut watcher).await,
        ("r".into(), "id-ann".into())
    );

    ann.abort();
    let mut ann = server.connect("ann").await;
    ann.join("r", None).await.unwrap();
    // No user_left, no user_joined, no offline/online pair within and after the grace period.
    assert_no_notices(&mut watcher, 1_500).await;

    // A real departure is announced once the grace period has passed.
    ann.abort();
    assert_eq!(
        next_notices(&mut watcher, 2).await,
        ["left r id-ann", "presence id-ann Offline"]
    );
}

#[tokio::test]
async fn user_joined_carries_the_status() {
    let server = TestServer::start().await;
    let mut watcher = server.connect("watcher").await;
    watcher.join("r", None).await.unwrap();
    let pick = |e: &ServerEvent| match e {
        ServerEvent::UserJoined { user, status, .. } => Some((user.id.clone(), *status)),
        _ => None,
    };
    let mut ann = server.connect("ann").await;
    ann.join("r", None).await.unwrap();
    let joined = within(5, watcher.wait_for(pick)).await.unwrap();
    assert_eq!(joined, ("id-ann".into(), PresenceStatus::Online));

    // Bob is away before he joins: the room learns that, not "online".
    let mut bob = server.connect("bob").await;
    bob.set_status(SettableStatus::Away).await.unwrap();
    bob.join("r", None).await.unwrap();
    let joined = within(5, watcher.wait_for(pick)).await.unwrap();
    assert_eq!(joined, ("id-bob".into(), PresenceStatus::Away));
}

#[tokio::test]
async fn join_and_leave_notices_count_sessions_not_devices() {
    let server = TestServer::start().await;
    let mut watcher = server.connect("watcher").await;
    watcher.join("r", None).await.unwrap();
    let mut phone = server.connect("ann").await;
    let mut laptop = server.connect("ann").await;
    phone.join("r", None).await.unwrap();
    laptop.join("r", None).await.unwrap();
    assert_eq!(
        next_user_joined(&mut watcher).await,
        ("r".into(), "id-ann".into())
    );
    phone.leave("r").await.unwrap();
    let quiet = watcher
        .next_event_within(Duration::from_millis(300))
        .await
        .unwrap();
    assert!(
        !matches!(
            quiet,
            Some(ServerEvent::UserLeft { .. }) | Some(ServerEvent::UserJoined { .. })
        ),
        "{quiet:?}"
    );
    let reply = laptop
        .request(ClientCommand::Leave {
            reference: None,
            room: "r".into(),
        })
        .await
        .unwrap();
    assert!(matches!(reply, ServerEvent::Left { ref room, .. } if room == "r"));
    assert_eq!(
        next_user_left(&mut watcher).await,
        ("r".into(), "id-ann".into())
    );
    // After leaving, the session no longer receives the room's messages. Ann's own coming
    // online may still reach it: whether the announcer looked her rooms up before or after
    // her devices joined is a matter of timing.
    watcher.say("r", "anyone?", None).await.unwrap();
    assert_silent_except(
        &mut laptop,
        300,
        |event| matches!(event, ServerEvent::Presence { user, .. } if user.id == "id-ann"),
    )
    .await;
}

fn typing_of(event: &ServerEvent) -> Option<(String, bool)> {
    match event {
        ServerEvent::Typing {
            user, is_typing, ..
        } => Some((user.id.clone(), *is_typing)),
        _ => None,
    }
}

#[tokio::test]
async fn typing_is_relayed_refreshed_and_expires() {
    let server = TestServer::start_with(|c| c.typing_timeout_ms = 1_500).await;
    let mut ann = server.connect("ann").await;
    let mut bob = server.connect("bob").await;
    ann.join("r", None).await.unwrap();
    bob.join("r", None).await.unwrap();

    ann.typing("r", true).await.unwrap();
    assert_eq!(
        within(5, bob.wait_for(typing_of)).await.unwrap(),
        ("id-ann".into(), true)
    );
    // Refreshes keep it on without new broadcasts.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        ann.typing("r", true).await.unwrap();
    }
    assert!(
        bob.next_event_within(Duration::from_millis(100))
            .await
            .unwrap()
            .is_none()
    );
    // Silence: the server switches it off by itself.
    let started = std::time::Instant::now();
    assert_eq!(
        within(5, bob.wait_for(typing_of)).await.unwrap(),
        ("id-ann".into(), false)
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    // The typist's own session never hears its own indicator.
    assert!(
        ann.next_event_within(Duration::from_millis(100))
            .await
            .unwrap()
            .and_then(|e| typing_of(&e))
            .is_none()
    );

    // Explicit stop, and stop on disconnect.
    ann.typing("r", true).await.unwrap();
    assert_eq!(
        within(5, bob.wait_for(typing_of)).await.unwrap(),
        ("id-ann".into(), true)
    );
    ann.typing("r", false).await.unwrap();
    assert_eq!(
        within(5, bob.wait_for(typing_of)).await.unwrap(),
        ("id-ann".into(), false)
    );
    ann.typing("r", true).await.unwrap();
    assert_eq!(
        within(5, bob.wait_for(typing_of)).await.unwrap(),
        ("id-ann".into(), true)
    );
    ann.abort();
    let started = std::time::Instant::now();
    assert_eq!(
        within(5, bob.wait_for(typing_of)).await.unwrap(),
        ("id-ann".into(), false)
    );
    assert!(
        started.elapsed() < Duration::from_millis(1_200),
        "cleared on disconnect, not by expiry"
    );
}

#[tokio::test]
async fn typing_needs_a_joined_room() {
    let server = TestServer::start().await;
    let mut ann = server.connect("ann").await;
    let err = ann
        .request(ClientCommand::Typing {
            reference: None,
            room: "general".into(),
            is_typing: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(confab_proto::ErrorCode::BadRequest));
}

/// A room filling up (a reconnect storm): notices that follow one another within the linger
/// are held back and sent together. Each member still gets every `user_joined` of those who
/// came after it, in the order they came, and nothing overtakes a held notice (a newcomer's
/// first message reaches the others after its `user_joined`).
#[tokio::test]
async fn a_room_filling_up_gets_every_notice_in_order() {
    const MEMBERS: usize = 12;
    let server = TestServer::start_with(|c| c.notice_linger_ms = 300).await;
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let mut conn = server.connect(&format!("m{i:02}")).await;
        conn.join("r", None).await.unwrap();
        members.push(conn);
    }
    let last = members.last_mut().unwrap();
    let (_, said) = last.say("r", "hello from the last", None).await.unwrap();

    let first = &mut members[0];
    let mut joined = Vec::new();
    let message = within(5, async {
        loop {
            match first.next_event().await.unwrap() {
                ServerEvent::UserJoined { room, user, .. } => {
                    assert_eq!(room, "r");
                    joined.push(user.id);
                }
                ServerEvent::Message(message) => return message,
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(message.seq, said);
    let expected: Vec<String> = (1..MEMBERS).map(|i| format!("id-m{i:02}")).collect();
    assert_eq!(
        joined, expected,
        "every later arrival, in order, before the message"
    );

    // The middle member heard of exactly those who came after it.
    let middle = MEMBERS / 2;
    let conn = &mut members[middle];
    let mut heard = Vec::new();
    while heard.len() < MEMBERS - 1 - middle {
        let pick = |e: &ServerEvent| match e {
            ServerEvent::UserJoined { user, .. } => Some(user.id.clone()),
            _ => None,
        };
        heard.push(within(5, conn.wait_for(pick)).await.unwrap());
    }
    assert_eq!(heard, expected[middle..]);
    assert_silent_except(conn, 400, |e| matches!(e, ServerEvent::Message(_))).await;
}
