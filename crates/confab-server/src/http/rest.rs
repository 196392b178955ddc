//! REST handlers: thin wrappers that parse the request, call the [`Node`], and shape the reply.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use confab_proto::{
    AddMemberRequest, AddMemberResponse, AuthRequest, AuthResponse, CreateRoomRequest,
    MembersResponse, MessageResponse, MessagesResponse, PostMessageRequest, PresenceResponse,
    RoomResponse, RoomsResponse,
};
use serde::Deserialize;

use super::{ApiJson, AuthUser};
use crate::error::ChatError;
use crate::node::Node;

type ApiResult<T> = Result<T, ChatError>;

pub(crate) async fn health(State(node): State<Arc<Node>>) -> ApiResult<&'static str> {
    if node.shutdown.is_cancelled() {
        return Err(ChatError::ShuttingDown);
    }
    node.store.room("general").await?;
    Ok("ok")
}

pub(crate) async fn register(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(body): ApiJson<AuthRequest>,
) -> ApiResult<(StatusCode, Json<AuthResponse>)> {
    node.check_auth_attempt(peer.ip())?;
    let (user, token) = node.register(&body.username, &body.password).await?;
    Ok((StatusCode::CREATED, Json(AuthResponse { user, token })))
}

pub(crate) async fn login(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(body): ApiJson<AuthRequest>,
) -> ApiResult<Json<AuthResponse>> {
    node.check_auth_attempt(peer.ip())?;
    let (user, token) = node.login(&body.username, &body.password).await?;
    Ok(Json(AuthResponse { user, token }))
}

pub(crate) async fn list_rooms(
    State(node): State<Arc<Node>>,
    AuthUser(user): AuthUser,
) -> ApiResult<Json<RoomsResponse>> {
    Ok(Json(RoomsResponse {
        rooms: node.list_rooms(&user).await?,
    }))
}

pub(crate) async fn create_room(
    State(node): State<Arc<Node>>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<CreateRoomRequest>,
) -> ApiResult<(StatusCode, Json<RoomResponse>)> {
    let room = node.create_room(&user, &body.name, body.private).await?;
    Ok((
        StatusCode::CREATED,
        Json(RoomResponse { room: room.info() }),
    ))
}

pub(crate) async fn delete_room(
    State(node): State<Arc<Node>>,
    AuthUser(user): AuthUser,
    Path(room): Path<String>,
) -> ApiResult<StatusCode> {
    node.delete_room(&user, &room).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn join_room(
    State(node): State<Arc<Node>>,
    AuthUser(user): AuthUser,
    Path(room): Path<String>,
) -> ApiResult<Json<RoomResponse>> {
    let joined = node.enter_room(&user, &room).await?;
    Ok(Json(RoomResponse {
        room: joined.room.info(),
    }))
}

pub(crate) async fn leave_room(
    State(node): State<Arc<Node>>,
    AuthUser(user): AuthUser,
    Path(room): Path<String>,
) -> ApiResult<StatusCode> {
    node.leave_room(&user, &room).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn members(
    State(node): State<Arc<Node>>,
    AuthUser(user): AuthUser,
    Path(room): Path<String>,
) -> ApiResult<Json<MembersResponse>> {
    Ok(Json(MembersResponse {
        members: node.members(&user, &room).await?,
    }))
}

pub(crate) async fn add_member(
    State(node): State<Arc<Node>>,
    AuthUser(user): AuthUser,
    Path(room): Path<String>,
    ApiJson(body): ApiJson<AddMemberRequest>,
) -> ApiResult<Json<AddMemberResponse>> {
    Ok(Json(AddMemberResponse {
        user: node.add_member(&user, &room, &body.username).await?,
    }))
}

/// Paging parameters of `GET /api/rooms/{room}/messages`.
#[derive(Debug, Deserialize)]
pub(crate) struct Paging {
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
}

pub(crate) async fn messages(
    State(node): State<Arc<Node>>,
    AuthUser(user): AuthUser,
    Path(room): Path<String>,
    paging: Result<Query<Paging>, QueryRejection>,
) -> ApiResult<Json<MessagesResponse>> {
    let Query(paging) = paging.map_err(|err| ChatError::BadRequest(err.body_text()))?;
    let page = node
        .history(&user, &room, paging.before, paging.after, paging.limit)
        .await?;
    Ok(Json(MessagesResponse {
        messages: page.messages,
        has_more: page.has_more,
    }))
}

pub(crate) async fn post_message(
    State(node): State<Arc<Node>>,
    AuthUser(user): AuthUser,
    Path(room): Path<String>,
    ApiJson(body): ApiJson<PostMessageRequest>,
) -> ApiResult<(StatusCode, Json<MessageResponse>)> {
    let appended = node
        .post_message(&user, &room, body.content, body.client_id)
        .await?;
    let status = if appended.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(MessageResponse {
            message: appended.message,
        }),
    ))
}

pub(crate) async fn open_dm(
    State(node): State<Arc<Node>>,
    AuthUser(user): AuthUser,
    Path(username): Path<String>,
) -> ApiResult<Json<RoomResponse>> {
    let room = node.open_dm(&user, &username).await?;
    Ok(Json(RoomResponse { room: room.info() }))
}

/// Query of `GET /api/presence`.
#[derive(Debug, Deserialize)]
pub(crate) struct PresenceQuery {
    users: Option<String>,
}

/// Most ids one presence query may ask about.
const MAX_PRESENCE_IDS: usize = 500;

pub(crate) async fn presence(
    State(node): State<Arc<Node>>,
    AuthUser(_): AuthUser,
    query: Result<Query<PresenceQuery>, QueryRejection>,
) -> ApiResult<Json<PresenceResponse>> {
    let Query(query) = query.map_err(|err| ChatError::BadRequest(err.body_text()))?;
    let users = query.users.unwrap_or_default();
    let ids: Vec<&str> = users
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if ids.is_empty() {
        return Err(ChatError::BadRequest("give ?users=ID1,ID2".into()));
    }
    if ids.len() > MAX_PRESENCE_IDS {
        return Err(ChatError::TooLarge(format!(
            "at most {MAX_PRESENCE_IDS} users per query"
        )));
    }
    Ok(Json(PresenceResponse {
        users: node.presence_of(&ids),
    }))
}
