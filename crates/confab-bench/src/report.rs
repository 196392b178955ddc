//! The outcome of a run: a human summary for the terminal and a JSON file for scripts and
//! plots (the field names are the JSON keys; times are in the unit their name says).
//!
//! When the generator was saturated its figures are bounds, not measurements: throughput is
//! at least what was seen and latency at most, and the summary says so on every such line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Target;

/// Percentiles of a histogram in one unit (µs for latencies, ms for connect times).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// From a nanosecond histogram, divided by `per_unit` (1e3 for µs, 1e6 for ms). An
    /// empty histogram gives all zeros.
    pub fn from_ns(histogram: &Histogram<u64>, per_unit: f64) -> Percentiles {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        let at = |q: f64| histogram.value_at_quantile(q) as f64 / per_unit;
        Percentiles {
            count: histogram.len(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: histogram.max() as f64 / per_unit,
            mean: histogram.mean() / per_unit,
        }
    }
}

/// The server's cost, from `/proc/<pid>` (with `--server-pid`).
#[derive(Debug, Clone, Serialize)]
pub struct ServerFigures {
    /// The server's process id.
    pub pid: u32,
    /// CPU time (user + system) during the measured window, seconds.
    pub cpu_s: f64,
    /// CPU time per message delivered in the window, µs.
    pub cpu_us_per_delivery: Option<f64>,
    /// RSS before the first connection, KiB.
    pub rss_kib_before: u64,
    /// RSS with every connection joined (idle mode: at the end of the hold), KiB.
    pub rss_kib_connected: u64,
    /// RSS at the end of the window, KiB.
    pub rss_kib_end: u64,
    /// (connected − before) / connections, KiB.
    pub rss_kib_per_connection: Option<f64>,
}

/// The generator's own cost during the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct Generator {
    /// CPU time used, seconds.
    pub cpu_s: f64,
    /// Average cores busy (CPU time / window).
    pub cores_used: f64,
    /// Cores it may run on (affinity mask).
    pub cores_allowed: usize,
    /// `cores_used` ≥ 90 % of `cores_allowed`: the figures are bounds. Pin the generator
    /// (e.g. `taskset -c 1`) so this means "one core was full".
    pub saturated: bool,
    /// The worst `generator_late_ms` of the window's seconds (see [`Second`]).
    pub max_late_ms: f64,
}

/// Durable mode (W4).
#[derive(Debug, Clone, Serialize)]
pub struct Durable {
    /// Unacked messages allowed per publisher.
    pub pipeline: usize,
    /// Acks received in the window.
    pub acked: u64,
    /// Acks per second.
    pub acked_per_s: f64,
    /// Send → ack, µs.
    pub ack_latency_us: Percentiles,
}

/// Resume mode (W5).
#[derive(Debug, Clone, Serialize)]
pub struct Resume {
    /// Messages stored in each room before the storm.
    pub prefill: u64,
    /// How far behind each client was.
    pub behind: u64,
    /// The `since` every client joined with.
    pub since: u64,
    /// Clients that caught up.
    pub caught_up: u64,
    /// From the storm's start until the last client caught up, ms.
    pub all_caught_up_ms: f64,
    /// Per-client time to catch up, ms.
    pub catch_up_ms: Percentiles,
    /// Messages received by all clients together.
    pub messages: u64,
    /// Seqs missing (must be 0).
    pub gaps: u64,
    /// Seqs received twice (must be 0).
    pub duplicates: u64,
}

/// One second of the run, as the live progress line shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Second {
    /// End of this second, seconds since the generator began connecting.
    pub t_s: f64,
    /// Whether the second ended inside the measured window.
    pub in_window: bool,
    /// Connections up at its end.
    pub connected: u64,
    /// Messages published during it.
    pub published: u64,
    /// Deliveries received during it.
    pub delivered: u64,
    /// Latency of what arrived during it, ms (`None` when nothing did).
    pub p99_ms: Option<f64>,
    /// Largest latency of what arrived during it, ms.
    pub max_ms: Option<f64>,
    /// p99 of the same deliveries' latency to their arrival at the socket, ms (see
    /// [`Report::arrival_latency_us`]).
    pub arrival_p99_ms: Option<f64>,
    /// How late, at worst during it, the generator's runtime ran a task due on a 1 ms timer:
    /// time spent behind a burst of ready connections or with its thread descheduled. What it
    /// read then came in late by as much on the generator's side, so a bad second with a high
    /// figure here is (partly) the generator's own.
    pub generator_late_ms: f64,
    /// The most time any one CPU of the machine was stolen during it by the hypervisor for
    /// other guests, ms (`/proc/stat`, in 10 ms ticks; 0 on bare metal). A stolen stretch
    /// stalls whatever ran on that CPU, so a bad second with a high figure here is the host's.
    pub steal_ms: f64,
}

/// The machine the run shared.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    /// For each CPU, the share of the window the hypervisor gave it to other guests
    /// (0 to 1; empty where `/proc/stat` has no steal column).
    pub steal_by_cpu: Vec<f64>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Server kind.
    pub target: Target,
    /// `fanout`, `idle`, `durable` or `resume`.
    pub mode: &'static str,
    /// Run id (in user and room names).
    pub run_id: String,
    /// Connections asked for.
    pub connections_requested: usize,
    /// Connections that connected and joined.
    pub connections: u64,
    /// Rooms.
    pub rooms: usize,
    /// Publishing connections.
    pub publishers: usize,
    /// Aggregate rate asked for (0 = as fast as allowed).
    pub rate_target: f64,
    /// Rate of each publisher, if paced.
    pub per_connection_rate: Option<f64>,
    /// Payload size, bytes.
    pub payload_bytes: usize,
    /// How `client_id`s were made (they change what the server's store costs).
    pub client_ids: crate::ClientIds,
    /// Length of the measured window, seconds.
    pub window_s: f64,
    /// Messages published in the window.
    pub published: u64,
    /// Published per second.
    pub published_per_s: f64,
    /// Deliveries received in the window (resume: messages received by the storm).
    pub delivered: u64,
    /// Delivered per second.
    pub delivered_per_s: f64,
    /// End-to-end latency of messages sent in the window, µs: from the publisher's send to the
    /// receiver's read, as a client sees it.
    pub latency_us: Percentiles,
    /// The same messages' latency to when they reached the receiver's socket (the kernel's
    /// receive timestamp of the read's last segment), µs: without the time they waited for the
    /// generator's thread, which a busy generator adds to what it reads. `None` when the run
    /// had no receive timestamps (`--no-arrival-times`).
    pub arrival_latency_us: Option<Percentiles>,
    /// Connect time (TCP + upgrade + token check + join), ms.
    pub connect_ms: Percentiles,
    /// Connections set up per second during the connect phase.
    pub handshakes_per_s: f64,
    /// Failures of any kind.
    pub errors: u64,
    /// Failures by kind.
    pub error_kinds: BTreeMap<String, u64>,
    /// The first few failures verbatim.
    pub error_examples: Vec<String>,
    /// Messages published over the whole run (warmup and window).
    pub published_total: u64,
    /// Deliveries owed over the whole run (accepted messages × receivers of their room).
    pub expected_deliveries: u64,
    /// Distinct deliveries received over the whole run.
    pub deliveries_total: u64,
    /// Deliveries owed but never received (resume: gaps).
    pub lost: u64,
    /// Deliveries received more than once by the same receiver.
    pub duplicated: u64,
    /// Payloads that did not parse or came from another room.
    pub bad_payloads: u64,
    /// Server cost, with `--server-pid`.
    pub server: Option<ServerFigures>,
    /// The generator's own cost.
    pub generator: Generator,
    /// Durable-mode figures.
    pub durable: Option<Durable>,
    /// Resume-mode figures.
    pub resume: Option<Resume>,
    /// What the machine's other tenants took.
    pub host: Host,
    /// When the generator began connecting (the origin of the timeline's `t_s`), ms since
    /// the Unix epoch: lines the timeline up with the server's logs.
    pub started_unix_ms: u64,
    /// Second by second over the whole run: a stall shows as one bad second, which the
    /// window's percentiles spread over all the others.
    pub timeline: Vec<Second>,
}

impl Report {
    /// The second of the measured window whose deliveries had the highest p99.
    pub fn worst_second(&self) -> Option<&Second> {
        self.timeline
            .iter()
            .filter(|second| second.in_window && second.p99_ms.is_some())
            .max_by(|a, b| {
                a.p99_ms
                    .partial_cmp(&b.p99_ms)
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let saturated = self.generator.saturated;
        let lower = if saturated { "  (lower bound)" } else { "" };
        let upper = if saturated { "  (upper bound)" } else { "" };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "confab bench: {} {} run {}, {}/{} connections in {} rooms, {} publishers",
            self.target,
            self.mode,
            self.run_id,
            self.connections,
            self.connections_requested,
            self.rooms,
            self.publishers
        );
        let c = &self.connect_ms;
        let _ = writeln!(
            out,
            "  connect      p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({:.0} handshakes/s)",
            c.p50, c.p99, c.max, self.handshakes_per_s
        );
        if self.mode != "idle" && self.resume.is_none() {
            let _ = writeln!(
                out,
                "  window       {:.1} s: published {} ({:.0}/s), delivered {} ({:.0}/s){lower}",
                self.window_s,
                self.published,
                self.published_per_s,
                self.delivered,
                self.delivered_per_s
            );
        }
        if self.latency_us.count > 0 {
            let l = &self.latency_us;
            let _ = writeln!(
                out,
                "  latency      p50 {:.0} µs  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}{upper}",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        if let Some(a) = self.arrival_latency_us.as_ref().filter(|a| a.count > 0) {
            let _ = writeln!(
                out,
                "  at arrival   p50 {:.0} µs  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}{upper}  \
                 (to the socket: without the generator's delay in reading)",
                a.p50, a.p90, a.p99, a.p999, a.max
            );
        }
        if let Some(worst) = self.worst_second() {
            let _ = writeln!(
                out,
                "  worst second p99 {:.1} ms  max {:.1} ms{}  (at {:.0} s, the generator up to {:.1} ms late; \
                 `timeline` in the JSON)",
                worst.p99_ms.unwrap_or(0.0),
                worst.max_ms.unwrap_or(0.0),
                worst
                    .arrival_p99_ms
                    .map_or_else(String::new, |p99| format!("  at arrival p99 {p99:.1} ms")),
                worst.t_s,
                worst.generator_late_ms
            );
        }
        if let Some(durable) = &self.durable {
            let a = &durable.ack_latency_us;
            let _ = writeln!(
                out,
                "  acked        {} ({:.0}/s, pipeline {}){lower}\n  ack latency  p50 {:.0} µs  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}{upper}",
                durable.acked,
                durable.acked_per_s,
                durable.pipeline,
                a.p50,
                a.p90,
                a.p99,
                a.p999,
                a.max
            );
        }
        if let Some(resume) = &self.resume {
            let r = &resume.catch_up_ms;
            let _ = writeln!(
                out,
                "  resume       {} clients joined with since={} ({} behind): all caught up in {:.1} ms \
                 (per client p50 {:.1} ms, p99 {:.1} ms), {} messages, gaps {}, duplicates {}",
                resume.caught_up,
                resume.since,
                resume.behind,
                resume.all_caught_up_ms,
                r.p50,
                r.p99,
                resume.messages,
                resume.gaps,
                resume.duplicates
            );
        } else if self.mode != "idle" {
            let _ = writeln!(
                out,
                "  deliveries   {} of {} expected: lost {}, duplicated {}, bad payloads {}",
                self.deliveries_total,
                self.expected_deliveries,
                self.lost,
                self.duplicated,
                self.bad_payloads
            );
        }
        let _ = writeln!(out, "  errors       {}", self.errors);
        for (kind, count) in &self.error_kinds {
            let _ = writeln!(out, "    {count} × {kind}");
        }
        for example in &self.error_examples {
            let _ = writeln!(out, "    e.g. {example}");
        }
        if let Some(server) = &self.server {
            let per = server
                .cpu_us_per_delivery
                .map_or("-".to_string(), |v| format!("{v:.2} µs"));
            let rss = server
                .rss_kib_per_connection
                .map_or("-".to_string(), |v| format!("{v:.2} KiB"));
            let _ = writeln!(
                out,
                "  server       pid {}: CPU {:.2} s, {per} per delivery; RSS {} → {} KiB, {rss} per connection",
                server.pid, server.cpu_s, server.rss_kib_before, server.rss_kib_connected
            );
        }
        let g = &self.generator;
        let _ = writeln!(
            out,
            "  generator    CPU {:.2} s, {:.2} of {} cores, up to {:.1} ms late{}",
            g.cpu_s,
            g.cores_used,
            g.cores_allowed,
            g.max_late_ms,
            if saturated {
                ": SATURATED, figures are bounds"
            } else {
                ""
            }
        );
        if self.host.steal_by_cpu.iter().any(|&share| share >= 0.005) {
            let shares: Vec<String> = self
                .host
                .steal_by_cpu
                .iter()
                .enumerate()
                .map(|(cpu, share)| format!("cpu{cpu} {:.1} %", share * 100.0))
                .collect();
            let _ = writeln!(
                out,
                "  host         CPU time stolen by other guests: {} of the window \
                 (`steal_ms` per second in the timeline)",
                shares.join(", ")
            );
        }
        out
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::histogram;

    #[test]
    fn percentiles_scale_and_empty_histograms_are_zero() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let p = Percentiles::from_ns(&h, 1e3);
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() < 2.0, "{p:?}");
        assert!((p.max - 1000.0).abs() < 1.0, "{p:?}");
        assert_eq!(
            Percentiles::from_ns(&histogram(), 1e3),
            Percentiles::default()
        );
    }
}
