//! Shared harness for the integration tests: a real server on a random port with its own data
//! directory, token minting, and helpers to run the real `confab` binary.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use confab_client::{Client, Connection};
use confab_proto::{ServerEvent, UserRef};
use confab_server::{Config, Server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The secret every test server signs tokens with.
pub const SECRET: &str = "integration-test-secret";

/// A server running inside the test process.
pub struct TestServer {
    pub base: String,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    /// Keeps the data directory alive for the server's lifetime (and across restarts).
    pub dir: std::sync::Arc<tempfile::TempDir>,
}

/// The configuration tests start from: quick grace periods so tests do not wait long.
pub fn test_config(dir: &Path) -> Config {
    Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        jwt_secret: Some(SECRET.into()),
        presence_grace_ms: 300,
        ..Config::default()
    }
}

impl TestServer {
    /// Starts a server with the test defaults.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after letting the test adjust the configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut config = test_config(dir.path());
        adjust(&mut config);
        Self::launch(config, dir).await
    }

    async fn launch(config: Config, dir: std::sync::Arc<tempfile::TempDir>) -> TestServer {
        let server = Server::bind(config.clone()).await.expect("server binds");
        let base = format!("http://{}", server.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer {
            base,
            config,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    /// Graceful shutdown; waits until the server has finished.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    /// Stops the server and starts a new one on the same data directory (new port).
    pub async fn restart(mut self) -> TestServer {
        self.shutdown().await;
        let mut config = self.config.clone();
        config.addr = "127.0.0.1:0".parse().unwrap();
        Self::launch(config, std::sync::Arc::clone(&self.dir)).await
    }

    /// An anonymous REST client.
    pub fn client(&self) -> Client {
        Client::new(&self.base)
    }

    /// A REST client for a token user (created by the server on first use).
    pub fn user(&self, name: &str) -> Client {
        self.client()
            .with_token(token_for(&format!("id-{name}"), name))
    }

    /// A connected WebSocket for a token user.
    pub async fn connect(&self, name: &str) -> Connection {
        self.user(name).connect().await.expect("connects")
    }

    pub fn ws_url(&self) -> String {
        self.client().ws_url()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Mints an HS256 token with the test secret.
pub fn token_for(id: &str, name: &str) -> String {
    token_with(id, name, SECRET, 3600)
}

/// Mints a token with any secret and lifetime (negative lifetimes make expired tokens).
pub fn token_with(id: &str, name: &str, secret: &str, ttl: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({ "sub": id, "name": name, "exp": now + ttl });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// The user a [`TestServer::user`] client speaks for.
pub fn user_ref(name: &str) -> UserRef {
    UserRef {
        id: format!("id-{name}"),
        name: name.into(),
    }
}

/// Fails the test if `future` takes longer than `secs`.
pub async fn within<T>(secs: u64, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), future)
        .await
        .expect("timed out")
}

/// Asserts that nothing arrives on `conn` for `millis`.
pub async fn assert_silent(conn: &mut Connection, millis: u64) {
    if let Some(event) = conn
        .next_event_within(Duration::from_millis(millis))
        .await
        .expect("connection alive")
    {
        panic!("expected silence, got {event:?}");
    }
}

/// Asserts that nothing arrives on `conn` for `millis` but events `expected` accepts (one
/// whose timing the test cannot pin down, say).
pub async fn assert_silent_except(
    conn: &mut Connection,
    millis: u64,
    expected: impl Fn(&ServerEvent) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(millis);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match conn
            .next_event_within(left)
            .await
            .expect("connection alive")
        {
            None => return,
            Some(event) if expected(&event) => {}
            Some(event) => panic!("expected silence, got {event:?}"),
        }
    }
}

/// Waits for the next event of a given `type` tag, skipping others.
pub async fn next_of_type(conn: &mut Connection, kind: &str) -> ServerEvent {
    let kind = kind.to_string();
    within(10, async {
        loop {
            let event = conn.next_event().await.expect("event");
            if serde_json::to_value(&event).unwrap()["type"] == kind.as_str() {
                return event;
            }
        }
    })
    .await
}

/// A `confab` process started from the real binary.
pub struct Process {
    pub child: Child,
    pub base: String,
    pub data_dir: PathBuf,
}

/// Starts `confab serve` on a random port in `data_dir` and waits until it is listening.
pub fn spawn_binary(data_dir: &Path, extra_env: &[(&str, &str)]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_confab"));
    command
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("CONFAB_JWT_SECRET", SECRET)
        .env("CONFAB_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (key, value) in extra_env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reads the banner");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in banner {line:?}"))
        .to_string();
    Process {
        child,
        base: url,
        data_dir: data_dir.to_path_buf(),
    }
}

impl Process {
    pub fn client(&self) -> Client {
        Client::new(&self.base)
    }

    pub fn user(&self, name: &str) -> Client {
        self.client()
            .with_token(token_for(&format!("id-{name}"), name))
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
