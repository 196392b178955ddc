//! `confab bench`: the load generator users run against their own deployment, and the tool
//! the benchmarks compare confab with its peers by.
//!
//! It opens N WebSocket connections (spread over several loopback source addresses to get
//! past the ephemeral-port limit), puts them in rooms, has P of them publish at an aggregate
//! rate (never more per connection than the server allows), and every receiver records the
//! end-to-end latency of each delivery and counts what it got against what was sent, so the
//! report can say **lost** and **duplicated** exactly. Other modes hold idle connections,
//! measure durable (acked) throughput, and replay a resume storm.
//!
//! The generator must not be what is measured: it has its own lean WebSocket client
//! ([`wire`]), parses payloads without building JSON values ([`target`], [`payload`]), keeps
//! per-thread statistics ([`stats`]) and always reports its own CPU use, flagging figures
//! taken while it was saturated as lower bounds ([`report`]).
//!
//! Modules: [`wire`] WebSocket framing, [`payload`] the stamped payload, [`target`] protocol
//! adapters (confab, raw peers, Socket.IO), [`stats`] histograms, loss accounting and `/proc`
//! readings, [`run`] the scenarios, [`report`] the summary and the JSON file.

use std::path::PathBuf;

pub mod payload;
pub mod report;
pub mod run;
pub mod stats;
pub mod target;
pub mod wire;

pub use report::Report;
pub use target::{ClientIds, Target};

/// Command-line options of `confab bench`. Owned here (not by the binary) so the tool and its
/// options evolve together; the binary flattens them into its `bench` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Server address (loopback only), `HOST:PORT` or `http://HOST:PORT`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Protocol of the server under test.
    #[arg(long, value_enum, default_value_t = Target::Confab)]
    pub target: Target,
    /// Connections to open.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub connections: usize,
    /// Rooms; connection i joins room i mod rooms.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Publishing connections (the first P, so they spread over the rooms like the rest).
    /// Default: just enough that no connection exceeds --max-conn-rate (one per room when
    /// --rate is 0; every connection with --durable).
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Aggregate messages/s over all publishers; 0 = as fast as allowed: every publisher at
    /// --max-conn-rate, or with --max-conn-rate 0 as fast as --pipeline lets it.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Highest rate of one connection (the server's per-connection limit, 10/s by default;
    /// raise it together with the server's CONFAB_MESSAGE_RATE). 0 = no limit.
    #[arg(long, default_value_t = 10.0)]
    pub max_conn_rate: f64,
    /// Measured window, seconds (the idle mode holds the connections this long).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Publishing before the measured window starts, seconds (not measured).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Longest wait for in-flight deliveries after publishing stops, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Payload size in bytes (at least the stamp, about 20-40 bytes).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// How `client_id`s are made: a counter per connection (growing with time, as UUIDv7s
    /// do) or random UUIDv4s. The server stores time-ordered ones more cheaply.
    #[arg(long, value_enum, default_value_t = ClientIds::Counter)]
    pub client_ids: ClientIds,
    /// Spread connections over source addresses 127.0.0.1 .. 127.0.0.K (each gives about
    /// 28,000 ephemeral ports).
    #[arg(long, default_value_t = 1)]
    pub source_addrs: u8,
    /// Connections being set up at the same time.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Longest time one connection may take to connect and join, seconds.
    #[arg(long, default_value_t = 15.0)]
    pub connect_timeout: f64,
    /// HS256 secret to mint one token per connection (user `bench-<run>-<i>`).
    #[arg(long, env = "CONFAB_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// One token shared by every connection instead. They are then all the same user: the
    /// server's max_connections_per_user (20) must be raised, and presence is per user.
    #[arg(long, conflicts_with = "jwt_secret")]
    pub token: Option<String>,
    /// Run id used in user ids, room names and client ids [default: random]. Fresh names keep
    /// runs against the same server independent.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Idle mode: hold N joined connections for --duration and report RSS per connection.
    #[arg(long, conflicts_with_all = ["durable", "resume"])]
    pub idle: bool,
    /// Durable mode (W4): every publisher keeps up to --pipeline messages unacked; reports
    /// acked messages/s and ack latency.
    #[arg(long, conflicts_with = "resume")]
    pub durable: bool,
    /// Resume mode (W5): pre-fill each room with --prefill messages, then all connections
    /// join at once with `since` = prefill - behind and page until caught up.
    #[arg(long)]
    pub resume: bool,
    /// Unacknowledged (or, without acks, unreceived) messages one publisher may have in
    /// flight when it sends as fast as it can.
    #[arg(long, default_value_t = 16)]
    pub pipeline: usize,
    /// Resume mode: messages stored in each room before the storm.
    #[arg(long, default_value_t = 200)]
    pub prefill: u64,
    /// Resume mode: how far behind each client is.
    #[arg(long, default_value_t = 100)]
    pub behind: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// PID of the server: its CPU time per delivery and RSS per connection are reported.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Worker threads [default: the CPUs this process may run on]; with one, the run goes on a
    /// current-thread runtime.
    #[arg(long)]
    pub threads: Option<usize>,
    /// No live progress on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Do not ask the kernel for receive timestamps: the report then has no arrival latency
    /// (the latency measured to when each frame reached the generator's socket).
    #[arg(long)]
    pub no_arrival_times: bool,
}

/// Runs the benchmark on its own runtime (sized by `--threads`), prints the summary to stdout
/// and writes the JSON report if asked. Blocking: call it outside any async runtime.
pub fn main(args: BenchArgs) -> anyhow::Result<Report> {
    let threads = args.threads.unwrap_or_else(run::allowed_cpus).max(1);
    // On one CPU a current-thread runtime: the same work without the multi-threaded
    // scheduler's hand-offs on every wake-up (as the server does, `runtime_for_this_machine`).
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let report = runtime.block_on(run::run(args.clone()))?;
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    print!("{}", report.summary());
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    Ok(report)
}
