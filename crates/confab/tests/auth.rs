//! Accounts, tokens and the WebSocket handshake checks.

mod common;

use common::*;
use confab_client::Connection;
use confab_proto::ErrorCode;

#[tokio::test]
async fn register_login_and_conflicts() {
    let server = TestServer::start().await;
    let client = server.client();
    assert!(client.healthy().await);

    let registered = client.register("ann", "correct horse").await.unwrap();
    assert_eq!(registered.user.name, "ann");
    assert!(!registered.user.id.is_empty());
    assert!(!registered.token.is_empty());

    let taken = client.register("ann", "other pass").await.unwrap_err();
    assert_eq!(
        (taken.status(), taken.code()),
        (Some(409), Some(ErrorCode::Conflict))
    );

    let logged_in = client.login("ann", "correct horse").await.unwrap();
    assert_eq!(logged_in.user, registered.user);
    let wrong = client.login("ann", "wrong horse").await.unwrap_err();
    assert_eq!(
        (wrong.status(), wrong.code()),
        (Some(401), Some(ErrorCode::Unauthorized))
    );
    let nobody = client.login("nobody", "whatever").await.unwrap_err();
    assert_eq!(nobody.status(), Some(401));

    // The token from login works for REST and for the WebSocket.
    let ann = client.with_token(logged_in.token);
    assert!(ann.rooms().await.is_ok());
    let conn = ann.connect().await.unwrap();
    assert_eq!(conn.user, registered.user);
    assert!(!conn.session.is_empty());
    assert_eq!(conn.heartbeat_ms, 25_000);
}

#[tokio::test]
async fn bad_registrations_are_rejected() {
    let server = TestServer::start().await;
    let client = server.client();
    for (name, password) in [("", "secret1"), ("has space", "secret1"), ("ok", "short")] {
        let err = client.register(name, password).await.unwrap_err();
        assert_eq!(err.status(), Some(400), "{name:?}/{password:?}");
        assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    }
    let err = reqwest::Client::new()
        .post(format!("{}/api/register", server.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(err.status(), 400);
    let body: serde_json::Value = err.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
}

#[tokio::test]
async fn rest_needs_a_valid_token() {
    let server = TestServer::start().await;
    let anonymous = server.client().rooms().await.unwrap_err();
    assert_eq!(
        (anonymous.status(), anonymous.code()),
        (Some(401), Some(ErrorCode::Unauthorized))
    );
    let forged = server
        .client()
        .with_token(token_with("id-x", "x", "wrong-secret", 3600))
        .rooms()
        .await
        .unwrap_err();
    assert_eq!(forged.status(), Some(401));
    let expired = server
        .client()
        .with_token(token_with("id-x", "x", SECRET, -3600))
        .rooms()
        .await
        .unwrap_err();
    assert_eq!(expired.status(), Some(401));
    let garbage = server
        .client()
        .with_token("garbage")
        .rooms()
        .await
        .unwrap_err();
    assert_eq!(garbage.status(), Some(401));
}

#[tokio::test]
async fn websocket_rejects_missing_forged_and_expired_tokens_before_upgrading() {
    let server = TestServer::start().await;
    let url = server.ws_url();
    let missing = Connection::connect(&url, &[]).await.unwrap_err();
    assert_eq!(missing.status(), Some(401));
    let forged = token_with("id-x", "x", "wrong-secret", 3600);
    let err = Connection::connect(&format!("{url}?token={forged}"), &[])
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401));
    let expired = token_with("id-x", "x", SECRET, -3600);
    let err = Connection::connect(&format!("{url}?token={expired}"), &[])
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401));
    // The server is still fine.
    assert!(server.client().healthy().await);
}

#[tokio::test]
async fn websocket_token_from_header_or_cookie() {
    let server = TestServer::start().await;
    let url = server.ws_url();
    let token = token_for("id-hdr", "hdr");
    let bearer = format!("Bearer {token}");
    let conn = Connection::connect(&url, &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(conn.user.id, "id-hdr");
    let cookie = format!("theme=dark; confab_token={token}");
    let conn = Connection::connect(&url, &[("cookie", &cookie)])
        .await
        .unwrap();
    assert_eq!(conn.user.name, "hdr");
}

#[tokio::test]
async fn origin_allow_list() {
    let server = TestServer::start().await;
    let url = format!("{}?token={}", server.ws_url(), token_for("id-o", "o"));
    let host = server.base.trim_start_matches("http://").to_string();
    // Same origin is allowed by default; a foreign one is refused with 403.
    let same = format!("http://{host}");
    assert!(
        Connection::connect(&url, &[("origin", &same)])
            .await
            .is_ok()
    );
    let err = Connection::connect(&url, &[("origin", "http://evil.example")])
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.code()),
        (Some(403), Some(ErrorCode::Forbidden))
    );

    let open = TestServer::start_with(|c| c.allowed_origins = vec!["*".into()]).await;
    let url = format!("{}?token={}", open.ws_url(), token_for("id-o", "o"));
    assert!(
        Connection::connect(&url, &[("origin", "http://evil.example")])
            .await
            .is_ok()
    );

    let listed =
        TestServer::start_with(|c| c.allowed_origins = vec!["https://app.example".into()]).await;
    let url = format!("{}?token={}", listed.ws_url(), token_for("id-o", "o"));
    assert!(
        Connection::connect(&url, &[("origin", "https://app.example")])
            .await
            .is_ok()
    );
    let err = Connection::connect(&url, &[("origin", "https://other.example")])
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403));
}

#[tokio::test]
async fn token_users_are_created_on_first_use() {
    let server = TestServer::start().await;
    let mut conn = server.connect("external").await;
    conn.join("general", None).await.unwrap();
    let members = server.user("other").members("general").await.unwrap();
    assert!(
        members
            .iter()
            .any(|m| m.id == "id-external" && m.name == "external")
    );
    // And they can be found by name for a DM.
    let dm = server.user("other").open_dm("external").await.unwrap();
    assert!(dm.dm);
}

#[tokio::test]
async fn identity_fields_sent_by_clients_are_ignored() {
    let server = TestServer::start().await;
    let mut ann = server.connect("ann").await;
    ann.join("general", None).await.unwrap();
    ann.send_text(r#"{"type":"message","room":"general","content":"hi","ref":1,"user":{"id":"id-bob","name":"bob"},"user_id":"id-bob"}"#)
        .await
        .unwrap();
    let message = ann.next_message().await.unwrap();
    assert_eq!(*message.user, user_ref("ann"));
}

#[tokio::test]
async fn rs256_tokens_from_an_identity_provider() {
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../confab-server/tests/fixtures"
    );
    let public = std::path::PathBuf::from(format!("{fixtures}/rs256-test-public.pem"));
    let private = std::fs::read(format!("{fixtures}/rs256-test-private.pem")).unwrap();
    let server = TestServer::start_with(|c| c.jwt_public_key = Some(public)).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A typical provider token: an audience and issuer confab does not check, no name claim.
    let claims = serde_json::json!({ "sub": "idp-7", "exp": now + 600, "aud": "my-app", "iss": "https://idp.example" });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap(),
    )
    .unwrap();
    let conn = server.client().with_token(&token).connect().await.unwrap();
    assert_eq!(
        (conn.user.id.as_str(), conn.user.name.as_str()),
        ("idp-7", "idp-7")
    );
    // HS256 tokens keep working next to RS256 ones.
    server.connect("ann").await;

    // Without a configured key, RS256 is refused.
    let plain = TestServer::start().await;
    let err = plain
        .client()
        .with_token(&token)
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401));
}

#[tokio::test]
async fn cookie_authenticated_writes_need_an_allowed_origin() {
    let server = TestServer::start().await;
    let token = token_for("id-ann", "ann");
    let http = reqwest::Client::new();
    let host = server.base.trim_start_matches("http://").to_string();
    let post = |origin: &str| {
        http.post(format!("{}/api/rooms/general/join", server.base))
            .header("cookie", format!("confab_token={token}"))
            .header("origin", origin.to_string())
    };
    assert_eq!(
        post("http://evil.example").send().await.unwrap().status(),
        403
    );
    assert_eq!(
        post(&format!("http://{host}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Reads with the cookie, and bearer-authenticated writes, are not affected.
    let read = http
        .get(format!("{}/api/rooms", server.base))
        .header("cookie", format!("confab_token={token}"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let bearer = http
        .post(format!("{}/api/rooms/general/join", server.base))
        .bearer_auth(&token)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
}

#[tokio::test]
async fn password_guessing_is_rate_limited_per_address() {
    let server = TestServer::start().await;
    let client = server.client();
    client.register("target", "the-real-one").await.unwrap();
    let mut statuses = Vec::new();
    // Unknown names fail fast (no hashing), so the burst is used up quickly whatever the load.
    for n in 0..40 {
        let status = match client.login(&format!("guess-{n}"), "whatever").await {
            Ok(_) => 200,
            Err(err) => err.status().unwrap(),
        };
        statuses.push(status);
    }
    assert!(statuses.contains(&401), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    let err = client.login("target", "the-real-one").await.unwrap_err();
    assert_eq!(
        (err.status(), err.code()),
        (Some(429), Some(ErrorCode::RateLimited))
    );
}
