//! The scenarios: plan the run from the options, connect with bounded concurrency, publish
//! on a schedule, drain, and gather the figures for [`crate::report`].
//!
//! Every connection is one task that both receives and (if it is a publisher) sends, so no
//! locks sit between the socket and the statistics. The run moves through phases announced
//! on a `watch` channel: setup (connect and join), run (publish; the measured window starts
//! after the warmup), stop (publishers stop; in-flight deliveries drain), close.
//!
//! Loss is exact: only messages sent after every connection has joined are published, each
//! receiver tracks which (publisher, seq) it got, and at the end every receiver of a room is
//! expected to have every message its room's publishers got accepted (an `error` reply
//! instead of an `ack` means the server refused it; it is counted as an error, not as lost).

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::BenchArgs;
use crate::payload::{self, Clock, Stamp};
use crate::report::{Durable, Generator, Host, Percentiles, Report, Resume, Second, ServerFigures};
use crate::stats::{self, Arrival, ProcSample, PublisherTally, Receipts, Recorder, Shard};
use crate::target::{Incoming, SetupError, Target, confab_reply, next_text};
use crate::wire::{Opcode, WireError, WsConn};

/// Error kinds kept verbatim for the summary (the rest are only counted).
const ERROR_EXAMPLES: usize = 5;
/// Messages one filler connection stores in resume mode: within the server's default burst
/// of 20, so filling is not slowed by the rate limit.
const FILL_PER_CONNECTION: u64 = 20;

/// CPUs this process may run on (its affinity mask, e.g. after `taskset`).
pub fn allowed_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What kind of run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Publishers and receivers in rooms (W1, W2).
    FanOut,
    /// Connections only, held open (W3).
    Idle,
    /// Publishers pipelining acked messages (W4).
    Durable,
    /// Pre-filled rooms, then everyone resumes with `since` (W5).
    Resume,
}

impl Mode {
    /// Name used in the report.
    pub fn name(self) -> &'static str {
        match self {
            Mode::FanOut => "fanout",
            Mode::Idle => "idle",
            Mode::Durable => "durable",
            Mode::Resume => "resume",
        }
    }
}

/// The run, decided from the options before anything connects.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Which kind of run.
    pub mode: Mode,
    /// Publishing connections: the first `publishers` connections (0 for idle and resume).
    pub publishers: usize,
    /// Seconds between two messages of one publisher; `None` sends as fast as the pipeline
    /// window allows.
    pub publish_interval: Option<f64>,
    /// Per-connection rate actually used (messages/s), if paced.
    pub per_connection_rate: Option<f64>,
}

/// Decides the mode, the number of publishers and their pace, refusing rates that would push
/// a connection over `--max-conn-rate`.
pub fn plan(args: &BenchArgs) -> anyhow::Result<Plan> {
    let mode = if args.idle {
        Mode::Idle
    } else if args.durable {
        Mode::Durable
    } else if args.resume {
        Mode::Resume
    } else {
        Mode::FanOut
    };
    if args.connections == 0 || args.rooms == 0 {
        bail!("--connections and --rooms must be at least 1");
    }
    if args.rooms > args.connections {
        bail!(
            "--rooms {} is more than --connections {}: some rooms would be empty",
            args.rooms,
            args.connections
        );
    }
    if !(args.rate >= 0.0 && args.max_conn_rate >= 0.0 && args.duration > 0.0) {
        bail!("--rate and --max-conn-rate must be >= 0 and --duration > 0");
    }
    if args.pipeline == 0 {
        bail!("--pipeline must be at least 1");
    }
    if args.resume && args.target != Target::Confab {
        bail!("--resume needs --target confab (the peers keep no history)");
    }
    if args.durable && args.target != Target::Confab {
        bail!("--durable needs --target confab (the peers do not acknowledge)");
    }
    if matches!(mode, Mode::Idle | Mode::Resume) {
        return Ok(Plan {
            mode,
            publishers: 0,
            publish_interval: None,
            per_connection_rate: None,
        });
    }
    let limit = (args.max_conn_rate > 0.0).then_some(args.max_conn_rate);
    let needed = match limit {
        Some(limit) if args.rate > 0.0 => (args.rate / limit - 1e-9).ceil().max(1.0) as usize,
        _ => 1,
    };
    let default = match (mode, args.rate > 0.0) {
        (Mode::Durable, _) => args.connections,
        (_, true) => needed,
        (_, false) => args.rooms,
    };
    let publishers = args.publishers.unwrap_or(default);
    if publishers > args.connections {
        bail!(
            "--rate {} at most {} msgs/s per connection (--max-conn-rate) needs {} publishers, \
             but there are only {} connections: add connections, or raise the server's \
             CONFAB_MESSAGE_RATE and --max-conn-rate",
            args.rate,
            args.max_conn_rate,
            publishers,
            args.connections
        );
    }
    if publishers == 0 {
        bail!("--publishers must be at least 1");
    }
    let per_connection_rate = if args.rate > 0.0 {
        let each = args.rate / publishers as f64;
        if let Some(limit) = limit
            && each > limit * (1.0 + 1e-9)
        {
            bail!(
                "--rate {} over {} publishers is {:.2} msgs/s per connection, above \
                 --max-conn-rate {}: use at least {} publishers, or raise the server's \
                 CONFAB_MESSAGE_RATE and --max-conn-rate",
                args.rate,
                publishers,
                each,
                limit,
                needed
            );
        }
        Some(each)
    } else {
        limit
    };
    Ok(Plan {
        mode,
        publishers,
        publish_interval: per_connection_rate.map(|rate| 1.0 / rate),
        per_connection_rate,
    })
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Connecting and joining.
    Setup,
    /// Publishing from `start` on (resume mode: everyone joins with `since` now).
    Run { start: Instant },
    /// Publishers stop; receivers keep reading.
    Stop,
    /// Close the connection and report.
    Close,
}

/// Shared by every connection task.
struct Ctx {
    args: BenchArgs,
    plan: Plan,
    server: SocketAddr,
    sources: Vec<Option<IpAddr>>,
    run_id: String,
    rooms: Vec<String>,
    clock: Clock,
    recorder: Recorder,
    /// Per publisher (global index = connection index).
    tallies: Vec<PublisherTally>,
    /// Per room: its publishers' global indexes, in room order.
    room_publishers: Vec<Vec<usize>>,
    /// Per room: connections that joined it.
    room_members: Vec<AtomicU64>,
    /// Measured window in clock nanoseconds (`u64::MAX` until known).
    window_start_ns: AtomicU64,
    window_end_ns: AtomicU64,
    connected: AtomicU64,
    connect_times: Mutex<Histogram<u64>>,
    errors: Mutex<Errors>,
    keys: Option<jsonwebtoken::EncodingKey>,
    /// True while publishers may publish. Each publish holds the read lock from its check to
    /// its `sent` count, so once the stopper has taken the write lock and cleared it, no
    /// message can be counted later: the drain's expectation is final and a message sent "just
    /// after stop" can never be mistaken for a lost one.
    publishing: std::sync::RwLock<bool>,
    /// One entry per second of the run (see [`spawn_progress`]).
    timeline: Mutex<Vec<Second>>,
    /// When the timeline starts, ms since the Unix epoch.
    started_unix_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct Errors {
    kinds: BTreeMap<String, u64>,
    examples: Vec<String>,
}

impl Ctx {
    fn error(&self, kind: impl Into<String>, detail: impl std::fmt::Display) {
        let kind = kind.into();
        let mut errors = self.errors.lock().expect("errors lock");
        if errors.examples.len() < ERROR_EXAMPLES {
            errors.examples.push(format!("{kind}: {detail}"));
        }
        *errors.kinds.entry(kind).or_default() += 1;
    }

    fn room_of(&self, connection: usize) -> usize {
        connection % self.rooms.len()
    }

    fn token(&self, name: &str) -> Option<String> {
        if let Some(token) = &self.args.token {
            return Some(token.clone());
        }
        let keys = self.keys.as_ref()?;
        let claims = serde_json::json!({
            "sub": name,
            "name": name,
            "exp": jsonwebtoken::get_current_timestamp() + 24 * 3600,
        });
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, keys).ok()
    }

    fn source(&self, connection: usize) -> Option<IpAddr> {
        self.sources[connection % self.sources.len()]
    }

    /// Connects connection `index` as user `user` and, unless `join` is false, joins `room`.
    /// [`Ctx::open`] within the connect timeout, recording its connect time and counting it as
    /// connected, or recording why it failed.
    async fn open_counted(
        &self,
        index: usize,
        user: &str,
        room: &str,
        join: bool,
    ) -> Option<WsConn> {
        let started = Instant::now();
        let timeout = Duration::from_secs_f64(self.args.connect_timeout);
        match tokio::time::timeout(timeout, self.open(index, user, room, join)).await {
            Ok(Ok(conn)) => {
                self.connect_times
                    .lock()
                    .expect("connect histogram lock")
                    .saturating_record(started.elapsed().as_nanos() as u64);
                self.connected.fetch_add(1, Ordering::AcqRel);
                Some(conn)
            }
            Ok(Err(error)) => {
                self.error(format!("connect: {}", setup_kind(&error)), &error);
                None
            }
            Err(_) => {
                self.error("connect: timeout", format!("connection {index}"));
                None
            }
        }
    }

    async fn open(
        &self,
        index: usize,
        user: &str,
        room: &str,
        join: bool,
    ) -> Result<WsConn, SetupError> {
        let token = self.token(user);
        let path = self.args.target.path(room, token.as_deref());
        let mut conn = WsConn::connect(self.server, self.source(index), &path, "").await?;
        if !self.args.no_arrival_times {
            conn.stamp_arrivals()?;
        }
        if join {
            self.args.target.establish(&mut conn, room).await?;
        } else {
            let greeting = next_text(&mut conn).await?;
            if !greeting.starts_with(br#"{"type":"connected""#) {
                return Err(SetupError::Unexpected("no connected greeting".into()));
            }
        }
        Ok(conn)
    }
}

/// Short label of a failure, for counting by kind.
fn setup_kind(error: &SetupError) -> String {
    match error {
        SetupError::Wire(wire) => wire_kind(wire),
        SetupError::Refused { code, .. } => format!("join refused ({code})"),
        SetupError::Unexpected(_) => "unexpected reply".into(),
    }
}

fn wire_kind(error: &WireError) -> String {
    match error {
        WireError::Io(io) => format!("io ({:?})", io.kind()),
        WireError::Refused { status, .. } => format!("upgrade refused (HTTP {status})"),
        WireError::Handshake(_) => "bad handshake".into(),
        WireError::Protocol(_) => "protocol violation".into(),
        WireError::Closed { code, .. } => format!("closed by server ({code})"),
        WireError::Eof => "connection dropped".into(),
    }
}

/// Runs the benchmark described by `args` and returns its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    let plan = plan(&args)?;
    let server = resolve(&args.addr).await?;
    if args.target == Target::Confab && args.jwt_secret.is_none() && args.token.is_none() {
        bail!("confab needs tokens: give --jwt-secret (or CONFAB_JWT_SECRET) or --token");
    }
    let sources: Vec<Option<IpAddr>> = match (server.ip(), args.source_addrs) {
        (IpAddr::V4(_), k) if k > 1 => (1..=k)
            .map(|last| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))))
            .collect(),
        _ => vec![None],
    };
    let run_id = args.run_id.clone().unwrap_or_else(|| {
        let n: u32 = rand::random();
        format!("{n:08x}")
    });
    let rooms: Vec<String> = (0..args.rooms)
        .map(|i| format!("bench-{run_id}-{i}"))
        .collect();
    let mut room_publishers = vec![Vec::new(); rooms.len()];
    for publisher in 0..plan.publishers {
        room_publishers[publisher % rooms.len()].push(publisher);
    }
    let ctx = Arc::new(Ctx {
        keys: args
            .jwt_secret
            .as_ref()
            .map(|secret| jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())),
        plan: plan.clone(),
        server,
        sources,
        run_id,
        room_members: rooms.iter().map(|_| AtomicU64::new(0)).collect(),
        rooms,
        clock: Clock::new(),
        recorder: Recorder::new(),
        tallies: (0..plan.publishers)
            .map(|_| PublisherTally::default())
            .collect(),
        room_publishers,
        window_start_ns: AtomicU64::new(u64::MAX),
        window_end_ns: AtomicU64::new(u64::MAX),
        connected: AtomicU64::new(0),
        connect_times: Mutex::new(stats::histogram()),
        errors: Mutex::new(Errors::default()),
        publishing: std::sync::RwLock::new(true),
        timeline: Mutex::new(Vec::new()),
        started_unix_ms: AtomicU64::new(0),
        args,
    });
    match plan.mode {
        Mode::Resume => run_resume(ctx).await,
        _ => run_traffic(ctx).await,
    }
}

/// `HOST:PORT` or `http://HOST:PORT[/...]`, resolved to a loopback address.
async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    let bare = addr
        .trim_start_matches("http://")
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default();
    let resolved = tokio::net::lookup_host(bare)
        .await
        .with_context(|| format!("cannot resolve {bare:?}"))?
        .next()
        .with_context(|| format!("{bare:?} has no address"))?;
    if !resolved.ip().is_loopback() {
        bail!("confab bench only runs against loopback addresses (got {resolved})");
    }
    Ok(resolved)
}

/// Server and generator readings at one moment.
#[derive(Debug, Clone)]
struct Snapshot {
    at: Instant,
    server: Option<ProcSample>,
    generator: Option<ProcSample>,
    /// Each CPU's stolen time so far, clock ticks.
    steal: Vec<u64>,
}

fn snapshot(ctx: &Ctx) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        server: ctx
            .args
            .server_pid
            .and_then(|pid| stats::proc_sample(Some(pid))),
        generator: stats::proc_sample(None),
        steal: stats::cpu_steal_ticks(),
    }
}

/// Connects every connection, then runs the fan-out, durable or idle scenario.
async fn run_traffic(ctx: Arc<Ctx>) -> anyhow::Result<Report> {
    let before_connect = snapshot(&ctx);
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<bool>();
    let permits = Arc::new(Semaphore::new(ctx.args.connect_concurrency.max(1)));
    let progress = spawn_progress(&ctx);
    let connect_start = Instant::now();
    let mut tasks = Vec::with_capacity(ctx.args.connections);
    for index in 0..ctx.args.connections {
        tasks.push(tokio::spawn(connection_task(
            Arc::clone(&ctx),
            index,
            Arc::clone(&permits),
            ready_tx.clone(),
            phase_rx.clone(),
        )));
    }
    drop(ready_tx);
    let mut settled = 0;
    while settled < ctx.args.connections {
        if ready_rx.recv().await.is_none() {
            break;
        }
        settled += 1;
    }
    let connect_elapsed = connect_start.elapsed();
    let connected = ctx.connected.load(Ordering::Acquire);
    let after_connect = snapshot(&ctx);

    let (window_begin, window_end) = if ctx.plan.mode == Mode::Idle {
        let begin = snapshot(&ctx);
        ctx.window_start_ns
            .store(ctx.clock.now_ns(), Ordering::Release);
        tokio::time::sleep(Duration::from_secs_f64(ctx.args.duration)).await;
        ctx.window_end_ns
            .store(ctx.clock.now_ns(), Ordering::Release);
        (begin, snapshot(&ctx))
    } else {
        let start = Instant::now() + Duration::from_millis(20);
        let _ = phase_tx.send(Phase::Run { start });
        tokio::time::sleep_until((start + Duration::from_secs_f64(ctx.args.warmup)).into()).await;
        let begin = snapshot(&ctx);
        ctx.window_start_ns
            .store(ctx.clock.now_ns(), Ordering::Release);
        tokio::time::sleep(Duration::from_secs_f64(ctx.args.duration)).await;
        ctx.window_end_ns
            .store(ctx.clock.now_ns(), Ordering::Release);
        let end = snapshot(&ctx);
        *ctx.publishing.write().expect("publishing lock") = false;
        let _ = phase_tx.send(Phase::Stop);
        drain(&ctx).await;
        (begin, end)
    };
    let _ = phase_tx.send(Phase::Close);
    let mut lost = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    for task in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, task).await {
            Ok(Ok(Some((room, receipts)))) => {
                let tallies: Vec<&PublisherTally> = ctx.room_publishers[room]
                    .iter()
                    .map(|&p| &ctx.tallies[p])
                    .collect();
                lost += stats::lost(&receipts, &tallies);
            }
            Ok(Ok(None)) => {}
            Ok(Err(join)) => ctx.error("task failed", join),
            Err(_) => ctx.error("task did not stop", "connection task hung at close"),
        }
    }
    progress.abort();
    Ok(build_report(
        &ctx,
        Figures {
            connected,
            connect_elapsed,
            before_connect,
            after_connect,
            window_begin,
            window_end,
            lost,
            expected: expected_deliveries(&ctx),
        },
    ))
}

/// Deliveries every receiver should get in total, from what was accepted so far.
fn expected_deliveries(ctx: &Ctx) -> u64 {
    ctx.room_publishers
        .iter()
        .zip(&ctx.room_members)
        .map(|(publishers, members)| {
            let per_receiver: u64 = publishers.iter().map(|&p| ctx.tallies[p].expected()).sum();
            per_receiver * members.load(Ordering::Acquire)
        })
        .sum()
}

/// Waits until every accepted message reached every receiver (and, for confab, every
/// message was answered), or the drain timeout passes.
async fn drain(ctx: &Ctx) {
    let deadline = Instant::now() + Duration::from_secs_f64(ctx.args.drain);
    while Instant::now() < deadline {
        let totals = ctx.recorder.totals();
        let sent: u64 = ctx
            .tallies
            .iter()
            .map(|t| t.sent.load(Ordering::Acquire))
            .sum();
        let refused: u64 = ctx
            .tallies
            .iter()
            .map(|t| t.refused.load(Ordering::Acquire))
            .sum();
        let answered = ctx.args.target != Target::Confab || totals.acked + refused >= sent;
        if answered && totals.delivered >= expected_deliveries(ctx) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A publisher's own state, local to its connection task.
struct Publisher {
    index: usize,
    seq: u64,
    /// Sent, not yet acked (confab): seq and send time, in send order.
    unacked: VecDeque<(u64, u64)>,
    /// Own messages received back (raw, Socket.IO: the pipeline window without acks).
    echoed: u64,
    client_prefix: String,
    text: Vec<u8>,
}

impl Publisher {
    fn in_flight(&self, target: Target) -> u64 {
        match target {
            Target::Confab => self.unacked.len() as u64,
            _ => self.seq.saturating_sub(self.echoed),
        }
    }
}

/// One connection from connect to close; returns its room and receipts if it joined.
async fn connection_task(
    ctx: Arc<Ctx>,
    index: usize,
    permits: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<bool>,
    mut phase: watch::Receiver<Phase>,
) -> Option<(usize, Receipts)> {
    let room = ctx.room_of(index);
    let user = format!("bench-{}-{index}", ctx.run_id);
    let opened = {
        let _permit = permits.acquire().await.ok()?;
        let conn = ctx.open_counted(index, &user, &ctx.rooms[room], true).await;
        if conn.is_some() {
            ctx.room_members[room].fetch_add(1, Ordering::AcqRel);
        }
        conn
    };
    let _ = ready.send(opened.is_some());
    let mut conn = opened?;
    let mut receipts = Receipts::new(ctx.room_publishers[room].len());
    let mut publisher = (index < ctx.plan.publishers).then(|| Publisher {
        index,
        seq: 0,
        unacked: VecDeque::new(),
        echoed: 0,
        client_prefix: format!("{}-{index}", ctx.run_id),
        text: Vec::with_capacity(ctx.args.payload + 256),
    });
    let target = ctx.args.target;
    let interval = ctx.plan.publish_interval.map(Duration::from_secs_f64);
    // Publishers start staggered over one interval so the aggregate rate is smooth.
    let offset = interval.map_or(Duration::ZERO, |i| {
        i.mul_f64((index as f64 / ctx.plan.publishers.max(1) as f64).fract())
    });
    let mut current = *phase.borrow_and_update();
    let mut sent_on_schedule: u64 = 0;
    // One timer for the connection's life, re-armed only when the next publish's time moves
    // (once per publish): a fresh `sleep_until` per wake-up registered and cancelled a timer
    // on every received frame, ten times a second per connection in W2.
    let publish_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(publish_timer);
    let mut armed_for: Option<Instant> = None;
    // Likewise one wait for the next phase, kept across wake-ups: a fresh `changed()` per
    // wake-up joined and left the channel's list of waiters every time.
    let phase_change = next_phase(phase);
    tokio::pin!(phase_change);
    enum Wake {
        Read(Result<(), WireError>),
        Send,
        Phase(watch::Receiver<Phase>),
    }
    loop {
        if let Err(error) = handle_frames(&ctx, &mut conn, room, &mut receipts, publisher.as_mut())
        {
            ctx.error(wire_kind(&error), &error);
            break;
        }
        if let Err(error) = conn.flush().await {
            ctx.error(wire_kind(&error), &error);
            break;
        }
        // When may this connection publish next?
        let mut due: Option<Instant> = None;
        if let (Some(p), Phase::Run { start }) = (publisher.as_mut(), current) {
            let window_open = p.in_flight(target) < ctx.args.pipeline as u64;
            match interval {
                Some(interval) if ctx.plan.mode != Mode::Durable || window_open => {
                    due = Some(start + offset + interval.mul_f64(sent_on_schedule as f64));
                }
                None if window_open => {
                    // As fast as the window allows: fill it and flush once.
                    while p.in_flight(target) < ctx.args.pipeline as u64 {
                        if !publish(&ctx, &mut conn, room, p) {
                            current = Phase::Stop;
                            break;
                        }
                    }
                    continue;
                }
                _ => {}
            }
        }
        if let Some(due) = due
            && armed_for != Some(due)
        {
            publish_timer.as_mut().reset(due.into());
            armed_for = Some(due);
        }
        let wake = tokio::select! {
            result = conn.fill() => Wake::Read(result),
            () = &mut publish_timer, if due.is_some() => Wake::Send,
            (phase, changed) = &mut phase_change => {
                if changed.is_err() {
                    break;
                }
                Wake::Phase(phase)
            }
        };
        match wake {
            Wake::Read(Ok(())) => {}
            Wake::Read(Err(error)) => {
                if !matches!(current, Phase::Close) {
                    ctx.error(wire_kind(&error), &error);
                }
                break;
            }
            Wake::Send => {
                if let Some(p) = publisher.as_mut() {
                    if publish(&ctx, &mut conn, room, p) {
                        sent_on_schedule += 1;
                    } else {
                        current = Phase::Stop;
                    }
                }
            }
            Wake::Phase(mut phase) => {
                current = *phase.borrow_and_update();
                if current == Phase::Close {
                    break;
                }
                phase_change.set(next_phase(phase));
            }
        }
    }
    conn.close().await;
    Some((room, receipts))
}

/// Waits for the run's next phase, giving the receiver back with the outcome.
async fn next_phase(
    mut phase: watch::Receiver<Phase>,
) -> (watch::Receiver<Phase>, Result<(), watch::error::RecvError>) {
    let changed = phase.changed().await;
    (phase, changed)
}

/// Queues one stamped message (written by the next flush); false once publishing has stopped.
fn publish(ctx: &Ctx, conn: &mut WsConn, room: usize, p: &mut Publisher) -> bool {
    let open = ctx.publishing.read().expect("publishing lock");
    if !*open {
        return false;
    }
    let seq = p.seq;
    p.seq += 1;
    let now = ctx.clock.now_ns();
    let stamp = Stamp {
        publisher: p.index as u32,
        seq,
        sent_ns: now,
    };
    p.text.clear();
    let size = ctx.args.payload;
    ctx.args.target.publish_text(
        &mut p.text,
        &ctx.rooms[room],
        (&p.client_prefix, ctx.args.client_ids),
        seq,
        |out| {
            payload::encode(out, stamp, size);
        },
    );
    conn.queue_text(&p.text);
    if ctx.args.target == Target::Confab {
        p.unacked.push_back((seq, now));
    }
    ctx.tallies[p.index].sent.fetch_add(1, Ordering::AcqRel);
    let in_window = in_window(ctx, now);
    ctx.recorder.with(|shard| {
        shard.published += 1;
        shard.interval.published += 1;
        shard.published_in_window += u64::from(in_window);
    });
    true
}

fn in_window(ctx: &Ctx, ns: u64) -> bool {
    ns >= ctx.window_start_ns.load(Ordering::Relaxed)
        && ns < ctx.window_end_ns.load(Ordering::Relaxed)
}

/// The receive hot path: every frame already buffered, under one shard lock, with one clock
/// reading (they arrived together).
fn handle_frames(
    ctx: &Ctx,
    conn: &mut WsConn,
    room: usize,
    receipts: &mut Receipts,
    mut publisher: Option<&mut Publisher>,
) -> Result<(), WireError> {
    let now = ctx.clock.now_ns();
    // Every frame complete now was complete after the latest read, whose last segment
    // arrived then (never later than now, whatever the clocks' rounding).
    let arrived = conn
        .arrived_wall_ns()
        .map(|wall| ctx.clock.from_wall_ns(wall).min(now));
    let at = Times { now, arrived };
    let window = (
        ctx.window_start_ns.load(Ordering::Relaxed),
        ctx.window_end_ns.load(Ordering::Relaxed),
    );
    let target = ctx.args.target;
    let mut ping = false;
    let result = ctx.recorder.with(|shard| {
        while let Some(frame) = conn.next_frame()? {
            if frame.opcode == Opcode::Binary && target != Target::Raw {
                continue;
            }
            target.decode(frame.payload, |item| match item {
                Incoming::Payload { bytes } => deliver(
                    ctx,
                    shard,
                    room,
                    receipts,
                    publisher.as_deref_mut(),
                    bytes,
                    at,
                    window,
                ),
                Incoming::Ack { reference, .. } => {
                    if let (Some(p), Some(seq)) = (publisher.as_deref_mut(), reference) {
                        acked(p, shard, seq, now, window);
                    }
                }
                Incoming::Error {
                    reference,
                    code,
                    message,
                } => {
                    if let (Some(p), Some(seq)) = (publisher.as_deref_mut(), reference)
                        && let Some(at) = p.unacked.iter().position(|&(s, _)| s == seq)
                    {
                        p.unacked.remove(at);
                        ctx.tallies[p.index].refused.fetch_add(1, Ordering::AcqRel);
                    }
                    ctx.error(format!("server error ({code})"), message);
                }
                Incoming::Ping => ping = true,
                Incoming::Other => {}
            });
        }
        Ok(())
    });
    if ping {
        conn.queue_text(b"3");
    }
    result
}

/// When the frames being handled were read, and when their last bytes reached the socket
/// (clock ns).
#[derive(Debug, Clone, Copy)]
struct Times {
    now: u64,
    arrived: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
fn deliver(
    ctx: &Ctx,
    shard: &mut Shard,
    room: usize,
    receipts: &mut Receipts,
    publisher: Option<&mut Publisher>,
    bytes: &[u8],
    Times { now, arrived }: Times,
    (start, end): (u64, u64),
) {
    let Some(stamp) = payload::parse(bytes) else {
        shard.bad_payloads += 1;
        return;
    };
    let from = stamp.publisher as usize;
    let local = ctx.room_publishers[room].iter().position(|&p| p == from);
    let Some(local) = local else {
        // Not a publisher of this room: a message leaked across rooms.
        shard.bad_payloads += 1;
        return;
    };
    match receipts.per_publisher[local].record(stamp.seq) {
        Arrival::Duplicate => shard.duplicated += 1,
        Arrival::New => {
            let latency = now.saturating_sub(stamp.sent_ns).max(1);
            let arrival = arrived.map(|arrived| arrived.saturating_sub(stamp.sent_ns).max(1));
            shard.delivered += 1;
            shard.interval.delivered += 1;
            shard.interval.latency.saturating_record(latency);
            if let Some(arrival) = arrival {
                shard.interval.arrival_latency.saturating_record(arrival);
            }
            if now >= start && now < end {
                shard.delivered_in_window += 1;
            }
            if stamp.sent_ns >= start && stamp.sent_ns < end {
                shard.latency.saturating_record(latency);
                if let Some(arrival) = arrival {
                    shard.arrival_latency.saturating_record(arrival);
                }
            }
            if let Some(p) = publisher
                && p.index == from
            {
                p.echoed += 1;
            }
        }
    }
}

fn acked(p: &mut Publisher, shard: &mut Shard, seq: u64, now: u64, (start, end): (u64, u64)) {
    // Acks come in send order; anything older still listed was answered by an error.
    while let Some(&(front, sent)) = p.unacked.front() {
        if front > seq {
            return;
        }
        p.unacked.pop_front();
        if front == seq {
            shard.acked += 1;
            if now >= start && now < end {
                shard.acked_in_window += 1;
            }
            if sent >= start && sent < end {
                shard
                    .ack_latency
                    .saturating_record(now.saturating_sub(sent).max(1));
            }
            return;
        }
    }
}

/// Once a second: adds a [`Second`] to the timeline and, on a terminal, prints it as a
/// progress line (connections up, published/s, delivered/s, current p99). In between, a 1 ms
/// timer measures how late the generator's runtime gets to it.
fn spawn_progress(ctx: &Arc<Ctx>) -> tokio::task::JoinHandle<()> {
    use std::io::IsTerminal as _;
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        let show = !ctx.args.quiet && std::io::stderr().is_terminal();
        let started = Instant::now();
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        ctx.started_unix_ms.store(unix_ms, Ordering::Relaxed);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut probe = tokio::time::interval(Duration::from_millis(1));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut late = Duration::ZERO;
        let mut steal = stats::cpu_steal_ticks();
        loop {
            tokio::select! {
                biased;
                _ = tick.tick() => {}
                due = probe.tick() => {
                    late = late.max(due.elapsed());
                    continue;
                }
            }
            ctx.clock.resync();
            let steal_now = stats::cpu_steal_ticks();
            let stolen_ticks = stolen(&steal, &steal_now).max().unwrap_or(0);
            steal = steal_now;
            let interval = ctx.recorder.take_interval();
            let now = ctx.clock.now_ns();
            let latency = &interval.latency;
            let arrival = &interval.arrival_latency;
            let ms = |ns: u64| ns as f64 / 1e6;
            let second = Second {
                t_s: started.elapsed().as_secs_f64(),
                in_window: in_window(&ctx, now),
                connected: ctx.connected.load(Ordering::Relaxed),
                published: interval.published,
                delivered: interval.delivered,
                p99_ms: (!latency.is_empty()).then(|| ms(latency.value_at_quantile(0.99))),
                max_ms: (!latency.is_empty()).then(|| ms(latency.max())),
                arrival_p99_ms: (!arrival.is_empty()).then(|| ms(arrival.value_at_quantile(0.99))),
                generator_late_ms: std::mem::take(&mut late).as_secs_f64() * 1e3,
                steal_ms: (stolen_ticks * 1000 / stats::TICKS_PER_SEC) as f64,
            };
            if show {
                let errors: u64 = ctx.errors.lock().expect("errors lock").kinds.values().sum();
                eprintln!(
                    "[{:>4.0}s] conns {}/{}  published {}/s  delivered {}/s  p99 {}  errors {}",
                    second.t_s,
                    second.connected,
                    ctx.args.connections,
                    second.published,
                    second.delivered,
                    second
                        .p99_ms
                        .map_or_else(|| "-".to_string(), |p99| format!("{p99:.2} ms")),
                    errors
                );
            }
            ctx.timeline.lock().expect("timeline lock").push(second);
        }
    })
}

/// Each CPU's time stolen between two readings of [`stats::cpu_steal_ticks`], clock ticks.
fn stolen(before: &[u64], after: &[u64]) -> impl Iterator<Item = u64> {
    before.iter().zip(after).map(|(b, a)| a.saturating_sub(*b))
}

/// Raw material for the report.
struct Figures {
    connected: u64,
    connect_elapsed: Duration,
    before_connect: Snapshot,
    after_connect: Snapshot,
    window_begin: Snapshot,
    window_end: Snapshot,
    lost: u64,
    expected: u64,
}

fn build_report(ctx: &Ctx, figures: Figures) -> Report {
    let totals = ctx.recorder.totals();
    let timeline = ctx.timeline.lock().expect("timeline lock").clone();
    let window = figures
        .window_end
        .at
        .duration_since(figures.window_begin.at)
        .as_secs_f64()
        .max(1e-9);
    let errors = ctx.errors.lock().expect("errors lock");
    let generator_cpu = match (figures.window_begin.generator, figures.window_end.generator) {
        (Some(a), Some(b)) => b.cpu_secs - a.cpu_secs,
        _ => 0.0,
    };
    let cores_allowed = allowed_cpus();
    let cores_used = generator_cpu / window;
    // The rule: saturated when the generator used at least 90 % of the CPUs it may run on.
    let saturated = cores_used >= 0.9 * cores_allowed as f64;
    let server = ctx.args.server_pid.and_then(|pid| {
        let before = figures.before_connect.server?;
        let begin = figures.window_begin.server?;
        let end = figures.window_end.server?;
        let cpu = end.cpu_secs - begin.cpu_secs;
        let rss_after = if ctx.plan.mode == Mode::Idle {
            end.rss_kib
        } else {
            figures
                .after_connect
                .server
                .map_or(end.rss_kib, |s| s.rss_kib)
        };
        Some(ServerFigures {
            pid,
            cpu_s: cpu,
            cpu_us_per_delivery: (totals.delivered_in_window > 0)
                .then(|| cpu * 1e6 / totals.delivered_in_window as f64),
            rss_kib_before: before.rss_kib,
            rss_kib_connected: rss_after,
            rss_kib_end: end.rss_kib,
            rss_kib_per_connection: (figures.connected > 0)
                .then(|| (rss_after as f64 - before.rss_kib as f64) / figures.connected as f64),
        })
    });
    let connect = ctx.connect_times.lock().expect("connect histogram lock");
    Report {
        target: ctx.args.target,
        mode: ctx.plan.mode.name(),
        run_id: ctx.run_id.clone(),
        connections_requested: ctx.args.connections,
        connections: figures.connected,
        rooms: ctx.rooms.len(),
        publishers: ctx.plan.publishers,
        rate_target: ctx.args.rate,
        per_connection_rate: ctx.plan.per_connection_rate,
        payload_bytes: ctx.args.payload,
        client_ids: ctx.args.client_ids,
        window_s: window,
        published: totals.published_in_window,
        published_per_s: totals.published_in_window as f64 / window,
        delivered: totals.delivered_in_window,
        delivered_per_s: totals.delivered_in_window as f64 / window,
        latency_us: Percentiles::from_ns(&totals.latency, 1e3),
        arrival_latency_us: (!ctx.args.no_arrival_times)
            .then(|| Percentiles::from_ns(&totals.arrival_latency, 1e3)),
        connect_ms: Percentiles::from_ns(&connect, 1e6),
        handshakes_per_s: figures.connected as f64
            / figures.connect_elapsed.as_secs_f64().max(1e-9),
        errors: errors.kinds.values().sum(),
        error_kinds: errors.kinds.clone(),
        error_examples: errors.examples.clone(),
        published_total: totals.published,
        expected_deliveries: figures.expected,
        deliveries_total: totals.delivered,
        lost: figures.lost,
        duplicated: totals.duplicated,
        bad_payloads: totals.bad_payloads,
        server,
        generator: Generator {
            cpu_s: generator_cpu,
            cores_used,
            cores_allowed,
            saturated,
            max_late_ms: timeline
                .iter()
                .filter(|second| second.in_window)
                .map(|second| second.generator_late_ms)
                .fold(0.0, f64::max),
        },
        durable: (ctx.plan.mode == Mode::Durable).then(|| Durable {
            pipeline: ctx.args.pipeline,
            acked: totals.acked_in_window,
            acked_per_s: totals.acked_in_window as f64 / window,
            ack_latency_us: Percentiles::from_ns(&totals.ack_latency, 1e3),
        }),
        resume: None,
        host: Host {
            steal_by_cpu: stolen(&figures.window_begin.steal, &figures.window_end.steal)
                .map(|ticks| (ticks as f64 / stats::TICKS_PER_SEC as f64 / window).min(1.0))
                .collect(),
        },
        started_unix_ms: ctx.started_unix_ms.load(Ordering::Relaxed),
        timeline,
    }
}

/// Only the seqs of a page of messages (resume mode).
#[derive(Deserialize)]
struct Page {
    messages: Vec<SeqOnly>,
    has_more: bool,
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// Gap and duplicate count of one client's catch-up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SeqCheck {
    next: u64,
    /// Seqs never received.
    pub gaps: u64,
    /// Seqs received more than once (or out of order).
    pub duplicates: u64,
    /// Messages received.
    pub received: u64,
}

impl SeqCheck {
    /// Expecting every seq after `since`.
    pub fn after(since: u64) -> SeqCheck {
        SeqCheck {
            next: since + 1,
            ..SeqCheck::default()
        }
    }

    /// One received seq.
    pub fn see(&mut self, seq: u64) {
        self.received += 1;
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            self.gaps += seq - self.next;
            self.next = seq + 1;
        } else {
            self.duplicates += 1;
        }
    }

    /// The highest seq received so far (or `since`).
    pub fn last(&self) -> u64 {
        self.next - 1
    }

    /// Ends the check: everything up to `newest` should have arrived.
    pub fn finish(&mut self, newest: u64) {
        if newest >= self.next {
            self.gaps += newest + 1 - self.next;
            self.next = newest + 1;
        }
    }
}

/// W5: fill every room, connect everyone, then all join with `since` at once and page until
/// caught up.
async fn run_resume(ctx: Arc<Ctx>) -> anyhow::Result<Report> {
    let prefill = ctx.args.prefill;
    let since = prefill.saturating_sub(ctx.args.behind);
    fill_rooms(&ctx).await?;

    let before_connect = snapshot(&ctx);
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<bool>();
    let permits = Arc::new(Semaphore::new(ctx.args.connect_concurrency.max(1)));
    let catch_up = Arc::new(Mutex::new(stats::histogram()));
    let checks = Arc::new(Mutex::new(SeqCheck::default()));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let connect_start = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..ctx.args.connections {
        let ctx = Arc::clone(&ctx);
        let permits = Arc::clone(&permits);
        let ready = ready_tx.clone();
        let mut phase = phase_rx.clone();
        let catch_up = Arc::clone(&catch_up);
        let checks = Arc::clone(&checks);
        let done = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            let room = ctx.room_of(index);
            let user = format!("bench-{}-{index}", ctx.run_id);
            let opened = {
                let Ok(_permit) = permits.acquire().await else {
                    return;
                };
                ctx.open_counted(index, &user, &ctx.rooms[room], false)
                    .await
            };
            let _ = ready.send(opened.is_some());
            let Some(mut conn) = opened else { return };
            let start = loop {
                if let Phase::Run { start } = *phase.borrow_and_update() {
                    break start;
                }
                if phase.changed().await.is_err() {
                    return;
                }
            };
            let timeout = Duration::from_secs_f64(ctx.args.duration + ctx.args.drain);
            let outcome = tokio::time::timeout(
                timeout,
                resume_one(&mut conn, &ctx.rooms[room], since, prefill),
            )
            .await;
            match outcome {
                Ok(Ok(check)) => {
                    catch_up
                        .lock()
                        .expect("catch-up histogram lock")
                        .saturating_record(start.elapsed().as_nanos() as u64);
                    let mut all = checks.lock().expect("checks lock");
                    all.gaps += check.gaps;
                    all.duplicates += check.duplicates;
                    all.received += check.received;
                }
                Ok(Err(error)) => ctx.error(format!("resume: {}", setup_kind(&error)), &error),
                Err(_) => ctx.error("resume: timeout", format!("connection {index}")),
            }
            let _ = done.send(());
            // Keep reading (pings, other clients' user_joined) until everyone is done.
            loop {
                while let Ok(Some(_)) = conn.next_frame() {}
                if conn.flush().await.is_err() {
                    break;
                }
                tokio::select! {
                    result = conn.fill() => if result.is_err() { break },
                    changed = phase.changed() => {
                        if changed.is_err() || *phase.borrow_and_update() == Phase::Close {
                            break;
                        }
                    }
                }
            }
            conn.close().await;
        }));
    }
    drop(ready_tx);
    drop(done_tx);
    let mut settled = 0;
    while settled < ctx.args.connections && ready_rx.recv().await.is_some() {
        settled += 1;
    }
    let connect_elapsed = connect_start.elapsed();
    let connected = ctx.connected.load(Ordering::Acquire);
    let after_connect = snapshot(&ctx);
    let window_begin = snapshot(&ctx);
    ctx.window_start_ns
        .store(ctx.clock.now_ns(), Ordering::Release);
    let _ = phase_tx.send(Phase::Run {
        start: window_begin.at,
    });
    let mut finished = 0;
    while finished < connected && done_rx.recv().await.is_some() {
        finished += 1;
    }
    let all_caught_up = window_begin.at.elapsed();
    ctx.window_end_ns
        .store(ctx.clock.now_ns(), Ordering::Release);
    let window_end = snapshot(&ctx);
    let _ = phase_tx.send(Phase::Close);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let mut report = build_report(
        &ctx,
        Figures {
            connected,
            connect_elapsed,
            before_connect,
            after_connect,
            window_begin,
            window_end,
            lost: 0,
            expected: 0,
        },
    );
    let check = *checks.lock().expect("checks lock");
    let catch_up = catch_up.lock().expect("catch-up histogram lock");
    report.delivered = check.received;
    report.delivered_per_s = check.received as f64 / all_caught_up.as_secs_f64().max(1e-9);
    report.duplicated = check.duplicates;
    report.lost = check.gaps;
    if let Some(server) = report.server.as_mut() {
        server.cpu_us_per_delivery =
            (check.received > 0).then(|| server.cpu_s * 1e6 / check.received as f64);
    }
    report.resume = Some(Resume {
        prefill,
        behind: ctx.args.behind,
        since,
        caught_up: catch_up.len(),
        all_caught_up_ms: all_caught_up.as_secs_f64() * 1e3,
        catch_up_ms: Percentiles::from_ns(&catch_up, 1e6),
        messages: check.received,
        gaps: check.gaps,
        duplicates: check.duplicates,
    });
    Ok(report)
}

/// One client of the storm: `join` with `since`, then `history` `after` until `has_more` is
/// false; checks that exactly `since+1 ..= newest` arrived.
async fn resume_one(
    conn: &mut WsConn,
    room: &str,
    since: u64,
    newest: u64,
) -> Result<SeqCheck, SetupError> {
    let mut check = SeqCheck::after(since);
    let join = serde_json::json!({"type": "join", "ref": "join", "room": room, "since": since});
    conn.queue_text(join.to_string().as_bytes());
    conn.flush().await?;
    let reply = confab_reply(conn, "join", "joined").await?;
    let mut page: Page = serde_json::from_slice(&reply)
        .map_err(|e| SetupError::Unexpected(format!("bad joined: {e}")))?;
    let mut pages = 0u64;
    loop {
        for message in &page.messages {
            check.see(message.seq);
        }
        if !page.has_more {
            break;
        }
        pages += 1;
        let reference = format!("h{pages}");
        let history = serde_json::json!({
            "type": "history", "ref": reference, "room": room, "after": check.last(), "limit": 500
        });
        conn.queue_text(history.to_string().as_bytes());
        conn.flush().await?;
        let reply = confab_reply(conn, &reference, "history").await?;
        page = serde_json::from_slice(&reply)
            .map_err(|e| SetupError::Unexpected(format!("bad history: {e}")))?;
    }
    check.finish(newest);
    Ok(check)
}

/// Stores `--prefill` messages in every room through filler connections (one user each,
/// at most [`FILL_PER_CONNECTION`] messages, pipelined), retrying rate-limited ones.
async fn fill_rooms(ctx: &Arc<Ctx>) -> anyhow::Result<()> {
    let prefill = ctx.args.prefill;
    if prefill == 0 {
        return Ok(());
    }
    let per_room = prefill.div_ceil(FILL_PER_CONNECTION);
    let permits = Arc::new(Semaphore::new(ctx.args.connect_concurrency.max(1)));
    let mut tasks = Vec::new();
    for room in 0..ctx.rooms.len() {
        for filler in 0..per_room {
            let first = filler * FILL_PER_CONNECTION;
            let count = FILL_PER_CONNECTION.min(prefill - first);
            let ctx = Arc::clone(ctx);
            let permits = Arc::clone(&permits);
            tasks.push(tokio::spawn(async move {
                let _permit = permits.acquire().await?;
                let user = format!("bench-{}-fill-{room}-{filler}", ctx.run_id);
                let index = room * per_room as usize + filler as usize;
                let mut conn = ctx
                    .open(index, &user, &ctx.rooms[room], true)
                    .await
                    .with_context(|| format!("filler {user} cannot join"))?;
                let result = tokio::time::timeout(
                    Duration::from_secs(60),
                    fill_one(&ctx, &mut conn, room, &user, count),
                )
                .await
                .with_context(|| format!("filler {user} timed out"))?;
                conn.close().await;
                result
            }));
        }
    }
    for task in tasks {
        task.await.context("filler task failed")??;
    }
    Ok(())
}

async fn fill_one(
    ctx: &Ctx,
    conn: &mut WsConn,
    room: usize,
    user: &str,
    count: u64,
) -> anyhow::Result<()> {
    let mut pending: VecDeque<u64> = (0..count).collect();
    let mut in_flight = 0usize;
    let mut acked = 0;
    let mut text = Vec::new();
    while acked < count {
        while in_flight < ctx.args.pipeline
            && let Some(i) = pending.pop_front()
        {
            text.clear();
            ctx.args.target.publish_text(
                &mut text,
                &ctx.rooms[room],
                (user, ctx.args.client_ids),
                i,
                |out| {
                    out.extend_from_slice(format!("fill {i}").as_bytes());
                },
            );
            conn.queue_text(&text);
            in_flight += 1;
        }
        conn.flush().await?;
        let reply = next_text(conn).await?;
        let mut outcome = None;
        ctx.args.target.decode(&reply, |item| match item {
            Incoming::Ack {
                reference: Some(_), ..
            } => outcome = Some(Ok(())),
            Incoming::Error {
                reference: Some(i),
                code,
                message,
            } => outcome = Some(Err((i, code, message))),
            _ => {}
        });
        match outcome {
            Some(Ok(())) => {
                acked += 1;
                in_flight -= 1;
            }
            Some(Err((i, code, _))) if code == "rate_limited" => {
                in_flight -= 1;
                pending.push_back(i);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(Err((_, code, message))) => bail!("filling refused: {code}: {message}"),
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn args(line: &str) -> BenchArgs {
        Cli::parse_from(std::iter::once("bench").chain(line.split_whitespace())).args
    }

    #[test]
    fn publishers_are_chosen_to_respect_the_per_connection_limit() {
        let p = plan(&args("--connections 1000 --rate 100")).unwrap();
        assert_eq!(p.publishers, 10);
        assert_eq!(p.per_connection_rate, Some(10.0));
        let p = plan(&args("--connections 1000 --rate 105")).unwrap();
        assert_eq!(p.publishers, 11);
        assert!(p.per_connection_rate.unwrap() <= 10.0);
        let p = plan(&args("--connections 1000 --rate 500 --max-conn-rate 1000")).unwrap();
        assert_eq!(p.publishers, 1);
    }

    #[test]
    fn impossible_rates_are_refused_with_a_reason() {
        let err = plan(&args("--connections 5 --rate 100")).unwrap_err();
        assert!(err.to_string().contains("needs 10 publishers"), "{err}");
        let err = plan(&args("--connections 100 --rate 100 --publishers 4")).unwrap_err();
        assert!(err.to_string().contains("at least 10 publishers"), "{err}");
        assert!(plan(&args("--connections 2 --rooms 3")).is_err());
    }

    #[test]
    fn as_fast_as_allowed_and_modes() {
        let p = plan(&args("--connections 100 --rooms 4 --rate 0")).unwrap();
        assert_eq!(p.publishers, 4);
        assert_eq!(p.per_connection_rate, Some(10.0));
        let p = plan(&args("--connections 100 --rate 0 --max-conn-rate 0")).unwrap();
        assert_eq!(p.publish_interval, None);
        let p = plan(&args("--connections 50 --durable --rate 0")).unwrap();
        assert_eq!((p.mode, p.publishers), (Mode::Durable, 50));
        let p = plan(&args("--connections 50 --idle")).unwrap();
        assert_eq!((p.mode, p.publishers), (Mode::Idle, 0));
        assert!(plan(&args("--connections 50 --resume --target raw")).is_err());
    }

    #[test]
    fn seq_check_finds_gaps_and_duplicates() {
        let mut check = SeqCheck::after(100);
        for seq in [101, 102, 104, 104, 105, 103] {
            check.see(seq);
        }
        check.finish(107);
        assert_eq!(check.gaps, 3); // 103 (late arrival counted as a duplicate), 106, 107
        assert_eq!(check.duplicates, 2);
        let mut clean = SeqCheck::after(0);
        (1..=50).for_each(|seq| clean.see(seq));
        clean.finish(50);
        assert_eq!((clean.gaps, clean.duplicates, clean.received), (0, 0, 50));
    }
}
