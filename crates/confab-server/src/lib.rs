//! The confab chat server as a library.
//!
//! [`Server::bind`] opens the store and the listener; [`Server::run`] serves until the given
//! shutdown future resolves, then drains. Tests bind port 0 and talk to the real thing.
//!
//! # Layout
//! - [`config`]: every option, its default and where it can be set.
//! - `http` (private): axum router, REST handlers, the `/ws` upgrade, error responses.
//! - [`session`]: one task per WebSocket connection (reader, writer, heartbeat, close codes).
//! - `websocket` (private): our own RFC 6455 framing; frames are written from shared bytes with
//!   vectored writes, so a connection keeps no write buffer.
//! - [`outbound`]: a session's bounded queue and its overflow policy.
//! - [`node`]: the façade every chat operation goes through, REST and WebSocket alike.
//! - [`committer`]: group-commit pipeline: store a batch, ack senders, publish in seq order.
//! - [`hub`]: local rooms → subscribers, fan-out of pre-encoded frames.
//! - [`broker`]: fan-out between nodes (local by default).
//! - [`presence`], [`typing`]: user-level status with a grace period; typing with expiry.
//! - [`store`]: the durable state behind a trait; SQLite is the embedded default.
//! - [`auth`]: JWT, passwords, origin check. [`error`]: the error type and its wire codes.

pub mod auth;
pub mod broker;
pub mod committer;
pub mod config;
pub mod error;
pub mod heartbeat;
mod http;
pub mod hub;
pub mod node;
pub mod outbound;
pub mod presence;
#[cfg(target_os = "linux")]
pub mod send_ring;
#[cfg(not(target_os = "linux"))]
#[path = "send_ring_fallback.rs"]
pub mod send_ring;
pub mod session;
pub mod store;
pub mod typing;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::auth::TokenKeys;
use crate::broker::LocalBroker;
use crate::committer::Committer;
use crate::hub::Hub;
use crate::node::Node;
use crate::store::{SqliteStore, StoreError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Data directory or listener problem.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// Token keys could not be loaded.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
}

/// A bound, not yet serving, confab server.
#[derive(Debug)]
pub struct Server {
    node: Arc<Node>,
    listener: TcpListener,
    store: Arc<SqliteStore>,
    committer_stop: CancellationToken,
    committer_task: JoinHandle<()>,
}

/// Reads the configured JWT secret, or the one stored in the data directory (creating it).
pub fn jwt_secret(config: &Config) -> Result<String, StartError> {
    if let Some(secret) = config.jwt_secret.as_ref().filter(|s| !s.is_empty()) {
        return Ok(secret.clone());
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::Io {
        context: format!("cannot create data dir {}", config.data_dir.display()),
        source,
    })?;
    auth::load_or_create_secret(&config.data_dir).map_err(|source| StartError::Io {
        context: "cannot read or create the JWT secret".into(),
        source,
    })
}

/// The token keys a configuration describes.
pub fn token_keys(config: &Config) -> Result<TokenKeys, StartError> {
    let secret = jwt_secret(config)?;
    Ok(TokenKeys::new(
        secret.as_bytes(),
        config.jwt_public_key.as_deref(),
        config.token_ttl_secs,
    )?)
}

impl Server {
    /// Opens the data directory and store, starts the background tasks and binds the listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let config = Arc::new(config);
        let tokens = token_keys(&config)?;
        let store = {
            let config = Arc::clone(&config);
            tokio::task::spawn_blocking(move || {
                SqliteStore::open(&config.data_dir, config.sqlite_synchronous)
            })
            .await
            .map_err(|err| StoreError::Database(err.to_string()))??
        };
        let store = Arc::new(store);
        let hub = Arc::new(Hub::with_notice_linger(config.notice_linger()));
        let broker = Arc::new(LocalBroker::new(Arc::clone(&hub)));
        let committer_stop = CancellationToken::new();
        let (committer, committer_run) = Committer::start(
            store.clone(),
            broker.clone(),
            config.commit_linger(),
            config.send_ring,
            committer_stop.clone(),
        );
        let committer_task = tokio::spawn(committer_run);
        let node = Node::start(
            Arc::clone(&config),
            store.clone(),
            tokens,
            hub,
            broker,
            committer,
        );
        let listener = listen(config.addr).map_err(|source| StartError::Io {
            context: format!("cannot listen on {}", config.addr),
            source,
        })?;
        Ok(Server {
            node,
            listener,
            store,
            committer_stop,
            committer_task,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then shuts down in order: stop accepting and close
    /// every socket with 1001, wait for sessions, store every accepted message, close the
    /// store. The whole drain shares one deadline, `shutdown_timeout_ms`.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Server {
            node,
            listener,
            store,
            committer_stop,
            committer_task,
        } = self;
        let app = http::router(Arc::clone(&node));
        let stop = node.shutdown.clone();
        let serve = node
            .tasks
            .spawn(http::serve(listener, app, Arc::clone(&node)));
        tokio::select! {
            () = shutdown => {}
            () = stop.cancelled() => {}
        }
        // Whether asked to stop or the listener failed, drain the same way, against one
        // deadline. Sessions first (they flush what is queued and close with 1001), then the
        // committer stores everything accepted, whatever happened to the sessions.
        stop.cancel();
        let deadline = tokio::time::Instant::now() + node.config.shutdown_timeout();
        // Keep a share of the budget for storing messages and closing the store.
        let sessions_deadline = deadline - node.config.shutdown_timeout() / 4;
        node.tasks.close();
        if tokio::time::timeout_at(sessions_deadline, node.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not finish closing in time");
        }
        committer_stop.cancel();
        if tokio::time::timeout_at(deadline, committer_task)
            .await
            .is_err()
        {
            tracing::error!("the committer did not finish storing accepted messages in time");
        }
        // The accept loop stopped on the token; it is a tracked task, so it has been waited for.
        drop(serve);
        tokio::task::spawn_blocking(move || store.close())
            .await
            .map_err(std::io::Error::other)
    }
}

/// Connections the kernel queues for `accept` while the server is busy: a reconnect storm of
/// thousands of clients should wait in the queue, not be refused (the default is 1024).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listening socket with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As std's bind does: a restarted server can listen again at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
