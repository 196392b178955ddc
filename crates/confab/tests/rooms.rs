//! Rooms over REST and WebSocket: creation, privacy, membership, direct messages.

mod common;

use common::*;
use confab_proto::{ErrorCode, ServerEvent};

#[tokio::test]
async fn general_exists_from_the_first_start() {
    let server = TestServer::start().await;
    let rooms = server.user("ann").rooms().await.unwrap();
    let general = rooms
        .iter()
        .find(|r| r.room.id == "general")
        .expect("general");
    assert!(!general.room.private);
    assert!(!general.member);
}

#[tokio::test]
async fn create_list_join_leave_delete() {
    let server = TestServer::start().await;
    let ann = server.user("ann");
    let bob = server.user("bob");
    let room = ann.create_room("team-1", false).await.unwrap();
    assert_eq!(
        (room.id.as_str(), room.name.as_str(), room.private),
        ("team-1", "team-1", false)
    );
    assert_eq!(room.owner.as_deref(), Some("id-ann"));

    let dup = bob.create_room("team-1", false).await.unwrap_err();
    assert_eq!(
        (dup.status(), dup.code()),
        (Some(409), Some(ErrorCode::Conflict))
    );
    for bad in ["Team", "-x", "a b", &"x".repeat(65)] {
        let err = ann.create_room(bad, false).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{bad}");
    }

    // Bob sees the public room, joins it over REST, and shows up as a member.
    let listed = bob.rooms().await.unwrap();
    assert!(listed.iter().any(|r| r.room.id == "team-1" && !r.member));
    bob.join_room("team-1").await.unwrap();
    let members = ann.members("team-1").await.unwrap();
    let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec!["ann", "bob"]);
    assert!(
        bob.rooms()
            .await
            .unwrap()
            .iter()
            .any(|r| r.room.id == "team-1" && r.member)
    );

    // Only the owner deletes.
    let err = bob.delete_room("team-1").await.unwrap_err();
    assert_eq!(err.status(), Some(403));
    bob.leave_room("team-1").await.unwrap();
    assert_eq!(ann.members("team-1").await.unwrap().len(), 1);
    ann.delete_room("team-1").await.unwrap();
    let gone = ann.members("team-1").await.unwrap_err();
    assert_eq!(
        (gone.status(), gone.code()),
        (Some(404), Some(ErrorCode::NotFound))
    );
    let unknown = ann.join_room("dm:nope").await.unwrap_err();
    assert_eq!(unknown.code(), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn private_rooms_refuse_outsiders() {
    let server = TestServer::start().await;
    let ann = server.user("ann");
    let bob = server.user("bob");
    ann.create_room("secret", true).await.unwrap();
    ann.post_message("secret", "for members only", None)
        .await
        .unwrap();

    // Not listed, not joinable, not readable, not writable for bob.
    assert!(
        !bob.rooms()
            .await
            .unwrap()
            .iter()
            .any(|r| r.room.id == "secret")
    );
    let mut bob_ws = server.connect("bob").await;
    let err = bob_ws.join("secret", None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    for err in [
        bob.join_room("secret").await.unwrap_err(),
        bob.messages("secret", None, None, None).await.unwrap_err(),
        bob.post_message("secret", "let me in", None)
            .await
            .map(|_| ())
            .unwrap_err(),
        bob.members("secret").await.unwrap_err(),
    ] {
        assert_eq!(
            (err.status(), err.code()),
            (Some(403), Some(ErrorCode::Forbidden))
        );
    }
    let err = bob_ws.say("secret", "hi", None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    let err = bob_ws
        .request(confab_proto::ClientCommand::History {
            reference: None,
            room: "secret".into(),
            before: None,
            after: None,
            limit: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    // The connection is still usable after the refusals.
    bob_ws.join("general", None).await.unwrap();
}

#[tokio::test]
async fn unknown_rooms() {
    let server = TestServer::start_with(|c| c.auto_create_rooms = false).await;
    let mut ann = server.connect("ann").await;
    let err = ann.join("nowhere", None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = ann.join("Not A Name", None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    let err = ann.say("nowhere", "hello?", None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    // With auto-creation on (the default) joining a new valid name creates a public room.
    let server = TestServer::start().await;
    let mut ann = server.connect("ann").await;
    let joined = ann.join("fresh", None).await.unwrap();
    assert_eq!(joined.room.id, "fresh");
    assert!(!joined.room.private);
    assert!(joined.messages.is_empty());
}

#[tokio::test]
async fn direct_messages_are_private_to_their_two_users() {
    let server = TestServer::start().await;
    let ann = server.user("ann");
    let bob = server.user("bob");
    // Both users exist once they have used the server.
    bob.rooms().await.unwrap();
    let dm = ann.open_dm("bob").await.unwrap();
    assert_eq!(dm.id, "dm:id-ann:id-bob");
    assert!(dm.private && dm.dm);
    assert_eq!(
        bob.open_dm("ann").await.unwrap().id,
        dm.id,
        "same room from either side"
    );
    let err = ann.open_dm("nobody").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = ann.open_dm("ann").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));

    let mut ann_ws = server.connect("ann").await;
    let mut bob_ws = server.connect("bob").await;
    let mut eve_ws = server.connect("eve").await;
    ann_ws.join(&dm.id, None).await.unwrap();
    bob_ws.join(&dm.id, None).await.unwrap();
    let err = eve_ws.join(&dm.id, None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    let eve = server.user("eve");
    assert_eq!(
        eve.messages(&dm.id, None, None, None)
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
    assert!(
        !eve.rooms()
            .await
            .unwrap()
            .iter()
            .any(|r| r.room.id == dm.id)
    );

    ann_ws.say(&dm.id, "psst", None).await.unwrap();
    assert_eq!(bob_ws.next_message().await.unwrap().content, "psst");
    assert_silent(&mut eve_ws, 300).await;
    let history = bob.messages(&dm.id, None, None, None).await.unwrap();
    assert_eq!(history.messages.len(), 1);
}

/// The next `room_added` event's room id, skipping others.
async fn next_room_added(conn: &mut confab_client::Connection) -> String {
    let pick = |e: &ServerEvent| match e {
        ServerEvent::RoomAdded { room } => Some(room.id.clone()),
        _ => None,
    };
    within(5, conn.wait_for(pick)).await.unwrap()
}

#[tokio::test]
async fn members_add_people_to_private_rooms_and_they_are_told() {
    let server = TestServer::start().await;
    let ann = server.user("ann");
    let bob = server.user("bob");
    let eve = server.user("eve");
    eve.rooms().await.unwrap();
    let mut bob_phone = server.connect("bob").await;
    let mut bob_laptop = server.connect("bob").await;
    ann.create_room("staff", true).await.unwrap();

    // An outsider can neither read nor add; a member can add by name.
    let err = eve.add_member("staff", "eve").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    assert_eq!(ann.add_member("staff", "bob").await.unwrap().id, "id-bob");
    for conn in [&mut bob_phone, &mut bob_laptop] {
        assert_eq!(next_room_added(conn).await, "staff");
    }
    // Bob is a member now: he can join, read and add someone himself.
    let joined = bob_phone.join("staff", None).await.unwrap();
    assert_eq!(joined.members.len(), 2);
    bob.add_member("staff", "eve").await.unwrap();
    assert!(eve.members("staff").await.is_ok());
    // Adding twice is fine (and tells nobody again).
    ann.add_member("staff", "bob").await.unwrap();
    assert_silent(&mut bob_laptop, 300).await;

    let err = ann.add_member("staff", "nobody").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = ann.add_member("nowhere", "bob").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    // A DM keeps its two users.
    let dm = ann.open_dm("bob").await.unwrap();
    assert_eq!(next_room_added(&mut bob_laptop).await, dm.id);
    let err = ann.add_member(&dm.id, "eve").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
}

#[tokio::test]
async fn joined_lists_the_first_members_and_counts_them_all() {
    let server = TestServer::start_with(|c| c.join_members = 3).await;
    for name in ["eve", "dan", "cat", "bob"] {
        server.user(name).join_room("big").await.unwrap();
    }
    let mut ann = server.connect("ann").await;
    let joined = ann.join("big", None).await.unwrap();
    let names: Vec<_> = joined.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["ann", "bob", "cat"]);
    assert_eq!(joined.member_count, 5);
    // The full list is one REST call away.
    assert_eq!(server.user("ann").members("big").await.unwrap().len(), 5);
}

#[tokio::test]
async fn rest_leave_unsubscribes_every_session_of_the_user() {
    let server = TestServer::start().await;
    let mut phone = server.connect("ann").await;
    let mut laptop = server.connect("ann").await;
    phone.join("general", None).await.unwrap();
    laptop.join("general", None).await.unwrap();
    server.user("ann").leave_room("general").await.unwrap();
    for conn in [&mut phone, &mut laptop] {
        match next_of_type(conn, "left").await {
            confab_proto::ServerEvent::Left { room, .. } => assert_eq!(room, "general"),
            other => panic!("{other:?}"),
        }
    }
    let err = phone.say("general", "still here?", None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
}

#[tokio::test]
async fn session_room_cap() {
    let server = TestServer::start_with(|c| c.max_rooms_per_session = 2).await;
    let mut ann = server.connect("ann").await;
    ann.join("a1", None).await.unwrap();
    ann.join("a2", None).await.unwrap();
    ann.join("a2", None)
        .await
        .expect("re-joining a joined room is fine");
    let err = ann.join("a3", None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
}

#[tokio::test]
async fn dm_ids_of_users_with_colons_cannot_collide() {
    let server = TestServer::start().await;
    // Identity providers often use ids such as "github:42"; "a" + "b:c" and "a:b" + "c" both
    // spell dm:a:b:c.
    let user = |id: &str| {
        server
            .client()
            .with_token(token_for(id, &id.replace(':', "_")))
    };
    let (a, bc, ab, c) = (user("a"), user("b:c"), user("a:b"), user("c"));
    for client in [&a, &bc, &ab, &c] {
        client.rooms().await.unwrap();
    }
    let first = a.open_dm("b_c").await.unwrap();
    assert_eq!(first.id, "dm:a:b:c");
    a.post_message(&first.id, "private to a and b:c", None)
        .await
        .unwrap();
    let err = ab.open_dm("c").await.unwrap_err();
    assert_eq!(
        (err.status(), err.code()),
        (Some(409), Some(ErrorCode::Conflict))
    );
    assert_eq!(
        ab.messages(&first.id, None, None, None)
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
    assert_eq!(
        c.messages(&first.id, None, None, None)
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
}
