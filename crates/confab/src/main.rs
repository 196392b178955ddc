//! `confab`: the chat server binary. Parses the command line and calls the library; no logic
//! of its own lives here.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use confab_server::store::SqliteStore;
use confab_server::{Config, Server};

/// The server allocates and frees small buffers for every message, and holds thousands of
/// idle sessions: jemalloc does the first in fewer instructions than glibc's malloc and packs
/// the second tighter (BENCHMARKS.md, "the allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A real-time chat server in one binary.
#[derive(Debug, Parser)]
#[command(name = "confab", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Mint a token for a user, for integrating an existing login system.
    Token(TokenArgs),
    /// Manage accounts.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Load generator: many connections, publishers at a rate, latency, loss and server cost.
    Bench(Box<confab_bench::BenchArgs>),
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create a password account.
    Add(UserAddArgs),
}

/// Options shared by every subcommand that reads the configuration.
#[derive(Debug, Args)]
struct ConfigArgs {
    /// TOML config file (keys are the option names, e.g. `addr`, `data_dir`).
    #[arg(long, env = "CONFAB_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: ./confab-data] (env CONFAB_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// JWT secret [default: generated and kept in the data dir] (env CONFAB_JWT_SECRET).
    #[arg(long)]
    jwt_secret: Option<String>,
}

impl ConfigArgs {
    fn load(&self, mut flags: BTreeMap<&'static str, String>) -> Result<Config> {
        if let Some(dir) = &self.data_dir {
            flags.insert("data_dir", dir.display().to_string());
        }
        if let Some(secret) = &self.jwt_secret {
            flags.insert("jwt_secret", secret.clone());
        }
        Ok(Config::load(self.config.as_deref(), &flags)?)
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Address to listen on [default: 127.0.0.1:8080] (env CONFAB_ADDR).
    #[arg(long)]
    addr: Option<String>,
    /// Origins allowed to open WebSockets, comma-separated; `*` for any
    /// [default: same origin] (env CONFAB_ALLOWED_ORIGINS).
    #[arg(long)]
    allowed_origins: Option<String>,
}

#[derive(Debug, Args)]
struct TokenArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The user id (`sub` claim).
    #[arg(long)]
    user_id: String,
    /// Display name (`name` claim) [default: the user id].
    #[arg(long)]
    name: Option<String>,
    /// Lifetime in seconds [default: token_ttl_secs, 7 days].
    #[arg(long)]
    ttl: Option<u64>,
}

#[derive(Debug, Args)]
struct UserAddArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Login name.
    username: String,
    /// Password; if omitted it is read from standard input (one line).
    #[arg(long)]
    password: Option<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The load generator sizes its own runtime (one worker per allowed CPU) and logs nothing.
    if let Command::Bench(args) = cli.command {
        let report = confab_bench::main(*args)?;
        if report.connections == 0 {
            bail!("no connection could be set up");
        }
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONFAB_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = runtime_for_this_machine()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Token(args) => token(args),
            Command::User {
                command: UserCommand::Add(args),
            } => add_user(args).await,
            Command::Bench(_) => unreachable!("handled before the runtime starts"),
        }
    })
}

/// A work-stealing runtime with a worker per CPU the process may use; on one CPU, a
/// current-thread runtime instead: with a single worker there is nothing to steal, and the
/// multi-threaded scheduler's bookkeeping around each task it runs (its queues' atomics, a
/// clock read each time it starts and stops a round of tasks) was 1.4 % of a message's
/// instructions in a W2-shaped callgrind run.
fn runtime_for_this_machine() -> tokio::runtime::Builder {
    match std::thread::available_parallelism() {
        Ok(cpus) if cpus.get() == 1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut flags = BTreeMap::new();
    if let Some(addr) = args.addr {
        flags.insert("addr", addr);
    }
    if let Some(origins) = args.allowed_origins {
        flags.insert("allowed_origins", origins);
    }
    let config = args.config.load(flags)?;
    let data_dir = config.data_dir.clone();
    let server = Server::bind(config).await?;
    let addr = server.local_addr();
    println!(
        "confab listening on http://{addr} (data in {})",
        data_dir.display()
    );
    server.run(shutdown_signal()).await?;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested");
}

fn token(args: TokenArgs) -> Result<()> {
    let config = args.config.load(BTreeMap::new())?;
    let keys = confab_server::token_keys(&config)?;
    let user = confab_proto::UserRef {
        name: args.name.unwrap_or_else(|| args.user_id.clone()),
        id: args.user_id,
    };
    if user.id.is_empty() {
        bail!("--user-id must not be empty");
    }
    println!("{}", keys.issue(&user, args.ttl));
    Ok(())
}

async fn add_user(args: UserAddArgs) -> Result<()> {
    let config = args.config.load(BTreeMap::new())?;
    let password = match args.password {
        Some(password) => password,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_to_string(&mut line)
                .context("cannot read the password from standard input")?;
            line.lines().next().unwrap_or_default().to_string()
        }
    };
    let keys = confab_server::token_keys(&config)?;
    let store = SqliteStore::open(&config.data_dir, config.sqlite_synchronous)?;
    let user = confab_server::node::create_account(&store, &args.username, &password).await?;
    store.close();
    println!("created user {} with id {}", user.name, user.id);
    println!("token: {}", keys.issue(&user, None));
    Ok(())
}
