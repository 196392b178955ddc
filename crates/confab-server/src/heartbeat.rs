//! The node's one heartbeat for every session, and how shutdown reaches them.
//!
//! A session could keep its own ping timer and its own shutdown waiter, but both live in the
//! session task's future, which every connection pays for: with tens of thousands of idle
//! connections they were about 300 bytes each (W3 in BENCHMARKS.md). Instead one task sweeps
//! all sessions a few times per heartbeat interval. It writes pings itself (through the
//! session's outlet, so an idle session's task is not even woken for them) and raises a
//! [`Signal`] on a session the peer has been silent on for the timeout. At shutdown it raises
//! [`Signal::Shutdown`] on every session. A signal wakes the session's task, which acts on it.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::node::Node;

/// Something the session's task must act on, raised from outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Signal {
    /// The server is shutting down: flush, then close with 1001.
    Shutdown = 1,
    /// The peer has been silent for the heartbeat timeout: close with 1008.
    TimedOut = 2,
}

/// Milliseconds on a monotonic clock shared by the process: small enough to keep in an atomic
/// per session.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// [`now_ms`] as of the latest sweep (of any node in the process), in the sessions' 32-bit
/// form ([`crate::outbound::clock32`]). Writes to a connection note when they happened with it:
/// reading the clock itself on every delivery would cost a system-clock read each, and the
/// heartbeat only needs the time of a write to a sweep's precision. It lags the true time,
/// never leads it, so a write noted with it looks older than it is and a ping is never put off
/// for longer than it should be.
static SWEPT_MS: AtomicU32 = AtomicU32::new(0);

/// The time of the latest sweep (see [`SWEPT_MS`]).
pub(crate) fn swept_ms() -> u32 {
    SWEPT_MS.load(Ordering::Relaxed)
}

/// How often the sweep runs: often enough that pings and timeouts are at most a quarter of
/// their period late, at most once a second (a sweep reads every session).
fn sweep_period(interval: Duration, timeout: Duration) -> Duration {
    (interval.min(timeout) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Runs until shutdown: pings and times out sessions; then tells every session to close.
pub async fn run(node: Arc<Node>) {
    let interval = node.config.heartbeat_interval();
    let timeout = node.config.heartbeat_timeout();
    let mut tick = tokio::time::interval(sweep_period(interval, timeout));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interval_ms = node.config.heartbeat_interval_ms;
    let timeout_ms = node.config.heartbeat_timeout_ms;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = node.shutdown.cancelled() => break,
        }
        let now = now_ms();
        SWEPT_MS.store(crate::outbound::clock32(now), Ordering::Relaxed);
        for session in node.presence.sessions_due(now, interval_ms, timeout_ms) {
            session.beat(now, interval_ms, timeout_ms);
        }
    }
    // A session registered after this walk sees the cancelled token itself (`Node::session_started`).
    node.presence.signal_all(Signal::Shutdown);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_a_few_times_per_period_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(sweep_period(ms(200), ms(500)), ms(50));
        assert_eq!(sweep_period(ms(25_000), ms(60_000)), ms(1_000));
        assert_eq!(sweep_period(ms(1), ms(1)), ms(10));
    }

    #[test]
    fn the_clock_moves_forward() {
        let before = now_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert!(now_ms() >= before + 5);
    }
}
