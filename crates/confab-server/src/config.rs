//! Every option of the server, with its default, its `CONFAB_*` environment variable and its
//! config-file key (the field name).
//!
//! Precedence, lowest first: built-in defaults, the TOML config file, `CONFAB_*` environment
//! variables, command-line flags. The defaults are chosen so that `confab serve` with nothing
//! else is a working single-node server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};

/// Server configuration. Field names are the config-file keys; the environment variable is the
/// upper-cased name with a `CONFAB_` prefix (`max_frame_bytes` -> `CONFAB_MAX_FRAME_BYTES`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Where the SQLite database and the generated JWT secret live; created on first start.
    pub data_dir: PathBuf,
    /// HS256 secret for tokens. Unset: read `jwt_secret` from the data dir, generating it once.
    pub jwt_secret: Option<String>,
    /// Optional PEM file with an RSA public key: RS256 tokens signed by an external identity
    /// provider are then accepted too.
    pub jwt_public_key: Option<PathBuf>,
    /// Lifetime of tokens the server issues (register, login, `confab token`), in seconds.
    pub token_ttl_secs: u64,
    /// Origins allowed to open a WebSocket. Empty: only the server's own origin (the `Host`
    /// header). `*` allows any. Requests without an `Origin` header (non-browser clients) are
    /// always allowed. In the environment: a comma-separated list.
    #[serde(deserialize_with = "string_or_list")]
    pub allowed_origins: Vec<String>,
    /// Joining an unknown room with a valid name creates it as a public room.
    pub auto_create_rooms: bool,
    /// Serve the built-in browser client at `/`. Off for deployments that only want the API
    /// (their own front end elsewhere).
    pub web_client: bool,
    /// Largest inbound WebSocket frame in bytes; larger closes the connection with 1009.
    pub max_frame_bytes: usize,
    /// Largest message content in characters; larger gets `too_large`.
    pub max_content_chars: usize,
    /// Sustained chat messages per second per session (WebSocket) or per user (REST).
    pub message_rate: u32,
    /// Burst of chat messages allowed above the sustained rate.
    pub message_burst: u32,
    /// Sustained other commands per second per session.
    pub command_rate: u32,
    /// Burst of other commands.
    pub command_burst: u32,
    /// Entries queued for one session before it counts as too slow and is closed with 1013
    /// (an entry is one event, or one commit's messages for a room).
    pub outbound_queue: usize,
    /// Concurrent WebSocket connections one user may hold.
    pub max_connections_per_user: usize,
    /// Rooms one session may be joined to.
    pub max_rooms_per_session: usize,
    /// Longest a connection goes without a frame from the server, in milliseconds: a session
    /// is pinged after three quarters to all of it (spread per session) unless it was written
    /// to and heard from meanwhile.
    pub heartbeat_interval_ms: u64,
    /// A connection silent for this long (no pong, no frame) is closed, in milliseconds.
    pub heartbeat_timeout_ms: u64,
    /// A socket write that takes longer than this closes the connection, in milliseconds.
    pub write_timeout_ms: u64,
    /// How long a user stays online (and in their rooms) after their last session drops, so a
    /// quick reconnect causes no presence flicker, in milliseconds.
    pub presence_grace_ms: u64,
    /// A typing indicator not refreshed within this time is cleared, in milliseconds.
    pub typing_timeout_ms: u64,
    /// Messages returned by `join` without `since`.
    pub join_history: u32,
    /// Members listed in `joined` (the rest is counted): a join into a room of thousands must
    /// cost neither a huge frame nor O(members) work per connection.
    pub join_members: u32,
    /// Largest page of history (and of a `since` catch-up in `join`).
    pub max_history_page: u32,
    /// SQLite `synchronous` mode: `normal` survives a process crash (the default), `full` also
    /// survives power loss at some cost in commit latency.
    pub sqlite_synchronous: SqliteSync,
    /// Once a commit has stored several messages for one room (a room whose messages come
    /// faster than they fan out), how long the next commit's oldest message may wait for
    /// others, in milliseconds (0: never). The room's subscribers then get its messages in
    /// one write each instead of one per message: W1 (a room of 1,000) at 500-1,000
    /// messages/s took a quarter less CPU per delivery with 2 ms, its p99 went down and its
    /// median up by 0.5-1 ms. A lone message never waits, nor does a backlog that built up
    /// during a commit, and many quiet rooms (W2) never make a commit wait.
    pub commit_linger_ms: u64,
    /// How long a `user_joined`/`user_left` notice may wait in its room for the room's notices
    /// after it, so a room filling up (a reconnect storm) sends each member its notices in a
    /// few writes instead of one per arrival, in milliseconds (0: every notice at once). Other
    /// frames are never held back, and nothing published to the room overtakes a waiting
    /// notice. 500 rather than 250 since notices wait in the room and a longer wait no longer
    /// costs memory per member: W3 5,644 against 4,764 handshakes/s, W5 2.5 against 2.8 s to
    /// catch up (BENCHMARKS.md, "Notices held in the room").
    pub notice_linger_ms: u64,
    /// Whether a commit's fan-out is written in one system call through io_uring (Linux),
    /// rather than a `send(2)` per subscriber: 6-9 % less CPU per delivery in W2, 20 % in W1
    /// at 100 msgs/s (BENCHMARKS.md, "Sends in one system call"). Where io_uring is
    /// unavailable the server writes one by one whatever this says.
    pub send_ring: bool,
    /// Longest time graceful shutdown may take before the process exits anyway, in
    /// milliseconds.
    pub shutdown_timeout_ms: u64,
}

/// SQLite durability level.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SqliteSync {
    /// WAL with `synchronous=NORMAL`: committed data survives a crash of the process.
    Normal,
    /// WAL with `synchronous=FULL`: committed data survives power loss.
    Full,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("confab-data"),
            jwt_secret: None,
            jwt_public_key: None,
            token_ttl_secs: 7 * 24 * 3600,
            allowed_origins: Vec::new(),
            auto_create_rooms: true,
            web_client: true,
            max_frame_bytes: 64 * 1024,
            max_content_chars: 4000,
            message_rate: 10,
            message_burst: 20,
            command_rate: 50,
            command_burst: 100,
            outbound_queue: 256,
            max_connections_per_user: 20,
            max_rooms_per_session: 200,
            heartbeat_interval_ms: 25_000,
            heartbeat_timeout_ms: 60_000,
            write_timeout_ms: 10_000,
            presence_grace_ms: 2_000,
            typing_timeout_ms: 5_000,
            join_history: 50,
            join_members: 50,
            max_history_page: 500,
            sqlite_synchronous: SqliteSync::Normal,
            commit_linger_ms: 2,
            notice_linger_ms: 500,
            send_ring: true,
            shutdown_timeout_ms: 10_000,
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads defaults, then `file` (if given), then `CONFAB_*` variables, then `overrides`
    /// (typically the command-line flags that were actually given).
    pub fn load(file: Option<&Path>, overrides: &impl Serialize) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(format!(
                    "config file {} not found",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        // Only keys that are options: other CONFAB_* variables (CONFAB_LOG, test settings)
        // must not trip `deny_unknown_fields`.
        let known: Vec<String> = match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let env = Env::prefixed("CONFAB_")
            .filter(move |key| known.iter().any(|k| key.as_str().eq_ignore_ascii_case(k)));
        let figment = figment.merge(env).merge(Serialized::defaults(overrides));
        let config: Config = figment
            .extract()
            .map_err(|err| ConfigError(err.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("max_content_chars", self.max_content_chars as u64),
            ("message_rate", self.message_rate.into()),
            ("message_burst", self.message_burst.into()),
            ("command_rate", self.command_rate.into()),
            ("command_burst", self.command_burst.into()),
            ("outbound_queue", self.outbound_queue as u64),
            (
                "max_connections_per_user",
                self.max_connections_per_user as u64,
            ),
            ("max_rooms_per_session", self.max_rooms_per_session as u64),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("heartbeat_timeout_ms", self.heartbeat_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
            ("typing_timeout_ms", self.typing_timeout_ms),
            ("max_history_page", self.max_history_page.into()),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError(format!("{name} must be greater than 0")));
            }
        }
        if self.outbound_queue < 8 {
            return Err(ConfigError("outbound_queue must be at least 8".into()));
        }
        Ok(())
    }

    /// `commit_linger_ms` as a duration.
    pub fn commit_linger(&self) -> Duration {
        Duration::from_millis(self.commit_linger_ms)
    }

    /// `notice_linger_ms` as a duration.
    pub fn notice_linger(&self) -> Duration {
        Duration::from_millis(self.notice_linger_ms)
    }

    /// `heartbeat_interval_ms` as a duration.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// `heartbeat_timeout_ms` as a duration.
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }

    /// `write_timeout_ms` as a duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// `presence_grace_ms` as a duration.
    pub fn presence_grace(&self) -> Duration {
        Duration::from_millis(self.presence_grace_ms)
    }

    /// `typing_timeout_ms` as a duration.
    pub fn typing_timeout(&self) -> Duration {
        Duration::from_millis(self.typing_timeout_ms)
    }

    /// `shutdown_timeout_ms` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

/// Accepts `["a", "b"]` (config file) or `"a,b"` (environment variable).
fn string_or_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StringOrList {
        One(String),
        Many(Vec<String>),
    }
    Ok(match StringOrList::deserialize(deserializer)? {
        StringOrList::One(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        StringOrList::Many(list) => list,
    })
}

#[cfg(test)]
// figment's Jail API returns its own large error type; nothing to gain from boxing it in tests.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_then_overrides() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "confab.toml",
                "addr = \"127.0.0.1:9000\"\nmessage_rate = 3\nallowed_origins = [\"https://a.example\"]\n",
            )?;
            jail.set_env("CONFAB_MESSAGE_RATE", "4");
            jail.set_env("CONFAB_COMMIT_LINGER_MS", "1");
            jail.set_env(
                "CONFAB_ALLOWED_ORIGINS",
                "https://b.example, https://c.example",
            );
            #[derive(Serialize)]
            struct Flags {
                data_dir: &'static str,
            }
            let config = Config::load(
                Some(Path::new("confab.toml")),
                &Flags { data_dir: "/tmp/x" },
            )
            .expect("loads");
            assert_eq!(config.addr.port(), 9000);
            assert_eq!(config.message_rate, 4);
            assert_eq!(
                config.allowed_origins,
                vec!["https://b.example", "https://c.example"]
            );
            assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
            assert_eq!(config.message_burst, 20);
            assert_eq!(config.commit_linger(), Duration::from_millis(1));
            assert_eq!(Config::default().commit_linger(), Duration::from_millis(2));
            Ok(())
        });
    }

    #[test]
    fn rejects_zero_limits_and_unknown_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "outbound_queue = 0\n")?;
            let none = std::collections::BTreeMap::<String, String>::new();
            let err = Config::load(Some(Path::new("bad.toml")), &none).unwrap_err();
            assert!(err.to_string().contains("outbound_queue"), "{err}");
            jail.create_file("typo.toml", "max_frame_byte = 1\n")?;
            assert!(Config::load(Some(Path::new("typo.toml")), &none).is_err());
            Ok(())
        });
    }
}
