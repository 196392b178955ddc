//! Measurements: latency histograms and counters sharded per worker thread, loss and
//! duplicate accounting per receiver, and `/proc` readings of CPU time and RSS.
//!
//! Why sharded per thread: a histogram per connection would cost hundreds of megabytes at
//! 10,000 connections, and one shared histogram would be a contended lock on the hot path.
//! Each worker thread records into its own shard behind an uncontended mutex, taken once per
//! batch of frames read together; the progress reporter merges the shards once a second.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

/// Highest value a histogram keeps (one hour in nanoseconds); larger values are clamped.
const HIGHEST_NS: u64 = 3_600_000_000_000;

/// A nanosecond histogram with three significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("static histogram bounds are valid")
}

/// What one worker thread saw since the last progress tick (see [`Recorder::take_interval`]).
#[derive(Debug)]
pub struct Interval {
    /// Latency of everything received (ns), to two significant figures: a second's p99 needs
    /// no more, and the histogram is an eighth of the run's (4,608 counters against 33,792),
    /// so taking it every second costs the generator's thread next to nothing.
    pub latency: Histogram<u64>,
    /// The same to when each frame reached the generator's socket (ns; see
    /// [`Shard::arrival_latency`]).
    pub arrival_latency: Histogram<u64>,
    /// Deliveries.
    pub delivered: u64,
    /// Messages published.
    pub published: u64,
}

impl Interval {
    fn new() -> Interval {
        let two_figures = || {
            Histogram::new_with_bounds(1, HIGHEST_NS, 2).expect("static histogram bounds are valid")
        };
        Interval {
            latency: two_figures(),
            arrival_latency: two_figures(),
            delivered: 0,
            published: 0,
        }
    }
}

/// Counters and histograms of one worker thread. `interval` is taken by the progress reporter
/// every second; the others accumulate over the run.
#[derive(Debug)]
pub struct Shard {
    /// End-to-end latency of messages sent inside the measured window (ns).
    pub latency: Histogram<u64>,
    /// End-to-end latency of the same messages to when they reached the generator's socket
    /// (the kernel's receive timestamp), leaving out the time they then waited for the
    /// generator to read them (ns; empty without receive timestamps).
    pub arrival_latency: Histogram<u64>,
    /// Time from sending a message to its `ack`, inside the measured window (ns).
    pub ack_latency: Histogram<u64>,
    /// Deliveries (first receipt of a (publisher, seq) by a receiver), whole run.
    pub delivered: u64,
    /// Deliveries received inside the measured window.
    pub delivered_in_window: u64,
    /// Repeated receipts of a (publisher, seq) by the same receiver.
    pub duplicated: u64,
    /// Payloads that did not parse, or came from a publisher of another room.
    pub bad_payloads: u64,
    /// Messages published, whole run.
    pub published: u64,
    /// Messages published inside the measured window.
    pub published_in_window: u64,
    /// Since the last progress tick.
    pub interval: Interval,
    /// Acks received, whole run.
    pub acked: u64,
    /// Acks received inside the measured window.
    pub acked_in_window: u64,
}

impl Shard {
    fn new() -> Shard {
        Shard {
            latency: histogram(),
            arrival_latency: histogram(),
            ack_latency: histogram(),
            delivered: 0,
            delivered_in_window: 0,
            duplicated: 0,
            bad_payloads: 0,
            published: 0,
            published_in_window: 0,
            interval: Interval::new(),
            acked: 0,
            acked_in_window: 0,
        }
    }
}

/// Merged view of all shards: the same counters, summed (`interval` left empty).
pub type Totals = Shard;

static NEXT_RECORDER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's shard of each live recorder, by recorder id.
    static LOCAL: RefCell<Vec<(u64, Arc<Mutex<Shard>>)>> = const { RefCell::new(Vec::new()) };
}

/// The per-thread shards of one run.
#[derive(Debug)]
pub struct Recorder {
    id: u64,
    shards: Mutex<Vec<Arc<Mutex<Shard>>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Recorder {
        Recorder {
            id: NEXT_RECORDER.fetch_add(1, Ordering::Relaxed),
            shards: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on the calling thread's shard (created on first use). Do not hold it across
    /// an `await` (it is a plain closure, so that cannot happen).
    pub fn with<R>(&self, f: impl FnOnce(&mut Shard) -> R) -> R {
        let shard = LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            if let Some((_, shard)) = local.iter().find(|(id, _)| *id == self.id) {
                return Arc::clone(shard);
            }
            let shard = Arc::new(Mutex::new(Shard::new()));
            self.shards
                .lock()
                .expect("shard list lock")
                .push(Arc::clone(&shard));
            local.push((self.id, Arc::clone(&shard)));
            shard
        });
        let mut guard = shard.lock().expect("shard lock");
        f(&mut guard)
    }

    /// The run's totals so far: every shard merged.
    pub fn totals(&self) -> Totals {
        let mut totals = Shard::new();
        let shards: Vec<_> = self.shards.lock().expect("shard list lock").clone();
        for shard in shards {
            let shard = shard.lock().expect("shard lock");
            for (total, part) in [
                (&mut totals.latency, &shard.latency),
                (&mut totals.arrival_latency, &shard.arrival_latency),
                (&mut totals.ack_latency, &shard.ack_latency),
            ] {
                total.add(part).expect("same histogram bounds");
            }
            totals.delivered += shard.delivered;
            totals.delivered_in_window += shard.delivered_in_window;
            totals.duplicated += shard.duplicated;
            totals.bad_payloads += shard.bad_payloads;
            totals.published += shard.published;
            totals.published_in_window += shard.published_in_window;
            totals.acked += shard.acked;
            totals.acked_in_window += shard.acked_in_window;
        }
        totals
    }

    /// What every shard saw since the last call, merged; the shards start a new interval.
    pub fn take_interval(&self) -> Interval {
        let mut merged = Interval::new();
        let shards: Vec<_> = self.shards.lock().expect("shard list lock").clone();
        for shard in shards {
            let mut shard = shard.lock().expect("shard lock");
            let interval = &mut shard.interval;
            for (total, part) in [
                (&mut merged.latency, &mut interval.latency),
                (&mut merged.arrival_latency, &mut interval.arrival_latency),
            ] {
                total.add(&*part).expect("same histogram bounds");
                part.reset();
            }
            merged.delivered += std::mem::take(&mut interval.delivered);
            merged.published += std::mem::take(&mut interval.published);
        }
        merged
    }
}

/// What one receiver got from one publisher: every seq below `base` arrived, and `bits`
/// marks those at and above it. In-order arrival (the normal case) keeps `bits` empty.
#[derive(Debug, Default, Clone)]
pub struct Receipt {
    base: u64,
    bits: VecDeque<u64>,
}

/// Whether a receipt was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First time this receiver got this seq.
    New,
    /// It had it already.
    Duplicate,
}

impl Receipt {
    /// Records seq `seq`.
    pub fn record(&mut self, seq: u64) -> Arrival {
        // In-order arrival, the normal case: no bitmap at all.
        if seq == self.base && self.bits.is_empty() {
            self.base += 1;
            return Arrival::New;
        }
        if seq < self.base {
            return Arrival::Duplicate;
        }
        let offset = seq - self.base;
        let word = (offset / 64) as usize;
        let bit = 1u64 << (offset % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & bit != 0 {
            return Arrival::Duplicate;
        }
        self.bits[word] |= bit;
        while self.bits.front() == Some(&u64::MAX) {
            self.bits.pop_front();
            self.base += 64;
        }
        Arrival::New
    }

    /// Distinct seqs received.
    pub fn distinct(&self) -> u64 {
        self.base
            + self
                .bits
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>()
    }
}

/// Everything one receiver got, per publisher of its room (indexed by the publisher's
/// position in the room).
#[derive(Debug, Default, Clone)]
pub struct Receipts {
    /// One entry per publisher of the room.
    pub per_publisher: Vec<Receipt>,
}

impl Receipts {
    /// Receipts for a room with `publishers` publishers.
    pub fn new(publishers: usize) -> Receipts {
        Receipts {
            per_publisher: vec![Receipt::default(); publishers],
        }
    }
}

/// What each publisher sent, for computing what every receiver should have got.
#[derive(Debug, Default)]
pub struct PublisherTally {
    /// Messages written to the socket.
    pub sent: AtomicU64,
    /// Of those, refused by the server (an `error` reply instead of an `ack`): never
    /// delivered, so not expected.
    pub refused: AtomicU64,
}

impl PublisherTally {
    /// Messages every receiver of the room should get.
    pub fn expected(&self) -> u64 {
        self.sent
            .load(Ordering::Acquire)
            .saturating_sub(self.refused.load(Ordering::Acquire))
    }
}

/// Lost deliveries of one receiver: what its room's publishers got accepted minus what it
/// received (`tallies` and `receipts` are both in the room's publisher order).
pub fn lost(receipts: &Receipts, tallies: &[&PublisherTally]) -> u64 {
    receipts
        .per_publisher
        .iter()
        .zip(tallies)
        .map(|(receipt, tally)| tally.expected().saturating_sub(receipt.distinct()))
        .sum()
}

/// CPU time and memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    /// User + system CPU time in seconds.
    pub cpu_secs: f64,
    /// Resident set size in KiB.
    pub rss_kib: u64,
}

/// Reads `/proc/<pid>/stat` (utime + stime) and `/proc/<pid>/status` (VmRSS); `pid` `None`
/// means this process. Clock ticks are taken as 100/s (USER_HZ on every Linux platform
/// confab supports). `None` if the process is gone or this is not Linux.
pub fn proc_sample(pid: Option<u32>) -> Option<ProcSample> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}"),
        None => "/proc/self".to_string(),
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    Some(ProcSample {
        cpu_secs: parse_cpu_ticks(&stat)? as f64 / 100.0,
        rss_kib: parse_rss_kib(&status)?,
    })
}

/// Clock ticks in a second in `/proc` (USER_HZ, 100 on every Linux platform confab supports).
pub const TICKS_PER_SEC: u64 = 100;

/// Time each CPU (by index) was taken by the hypervisor for other guests, from `/proc/stat`'s
/// `steal` column, in clock ticks ([`TICKS_PER_SEC`]); empty where that cannot be read. On a
/// shared virtual machine a stolen stretch stalls whatever was running (server, generator, or
/// the kernel's loopback work), so a latency taken across it is partly the host's.
pub fn cpu_steal_ticks() -> Vec<u64> {
    std::fs::read_to_string("/proc/stat")
        .map(|stat| parse_steal_ticks(&stat))
        .unwrap_or_default()
}

/// The `steal` column (the 8th number) of each `cpuN` line, in CPU order.
fn parse_steal_ticks(stat: &str) -> Vec<u64> {
    stat.lines()
        .filter(|line| {
            line.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(|line| {
            line.split_whitespace()
                .nth(8)
                .and_then(|steal| steal.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// utime + stime (fields 14 and 15) from a `/proc/<pid>/stat` line. The command name (field
/// 2) may contain spaces and parentheses, so fields are counted after the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // `after` starts at field 3 (state); utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_receipts_stay_compact() {
        let mut receipt = Receipt::default();
        for seq in 0..1000 {
            assert_eq!(receipt.record(seq), Arrival::New);
        }
        assert_eq!(receipt.distinct(), 1000);
        assert!(receipt.bits.is_empty());
        assert_eq!(receipt.record(999), Arrival::Duplicate);
        assert_eq!(receipt.record(3), Arrival::Duplicate);
    }

    #[test]
    fn out_of_order_gaps_and_duplicates() {
        let mut receipt = Receipt::default();
        for seq in [5, 1, 0, 200, 2, 5, 4] {
            receipt.record(seq);
        }
        // 0 1 2 4 5 200 are distinct; 5 came twice.
        assert_eq!(receipt.distinct(), 6);
        assert_eq!(receipt.record(200), Arrival::Duplicate);
        assert_eq!(receipt.record(3), Arrival::New);
        assert_eq!(receipt.distinct(), 7);
    }

    #[test]
    fn lost_counts_what_was_accepted_but_not_received() {
        let a = PublisherTally::default();
        a.sent.store(10, Ordering::Release);
        a.refused.store(2, Ordering::Release);
        let b = PublisherTally::default();
        b.sent.store(5, Ordering::Release);
        let mut receipts = Receipts::new(2);
        for seq in 0..8 {
            receipts.per_publisher[0].record(seq);
        }
        for seq in [0, 1, 3] {
            receipts.per_publisher[1].record(seq);
        }
        assert_eq!(lost(&receipts, &[&a, &b]), 2);
    }

    #[test]
    fn shards_merge_across_threads_and_intervals_reset() {
        let recorder = Arc::new(Recorder::new());
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let recorder = Arc::clone(&recorder);
                std::thread::spawn(move || {
                    recorder.with(|shard| {
                        shard.delivered += 10;
                        shard.interval.delivered += 10;
                        shard.latency.saturating_record(1000 * (i + 1));
                        shard.arrival_latency.saturating_record(900 * (i + 1));
                        shard.interval.latency.saturating_record(5);
                        shard.interval.arrival_latency.saturating_record(4);
                    })
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        recorder.with(|shard| shard.delivered += 1);
        let first = recorder.take_interval();
        assert_eq!(first.delivered, 30);
        assert_eq!(first.latency.len(), 3);
        assert_eq!(first.arrival_latency.len(), 3);
        let totals = recorder.totals();
        assert_eq!(totals.delivered, 31);
        assert_eq!(totals.latency.len(), 3);
        assert_eq!(totals.arrival_latency.len(), 3);
        let arrivals = &totals.arrival_latency;
        assert!(arrivals.equivalent(arrivals.max(), 2700));
        let second = recorder.take_interval();
        assert_eq!(second.delivered, 0);
        assert_eq!(second.latency.len(), 0);
        assert_eq!(second.arrival_latency.len(), 0);
        assert_eq!(recorder.totals().delivered, 31);
    }

    #[test]
    fn steal_is_read_per_cpu() {
        let stat = "cpu  100 0 50 9000 3 0 7 40 0 0\n\
                    cpu0 60 0 30 4500 1 0 4 35 0 0\n\
                    cpu1 40 0 20 4500 2 0 3 5 0 0\n\
                    intr 12345 1 2\nctxt 999\n";
        assert_eq!(parse_steal_ticks(stat), [35, 5]);
        assert!(!cpu_steal_ticks().is_empty());
    }

    #[test]
    fn proc_parsing() {
        let stat = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 200";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        let status = "Name:\tx\nVmPeak:\t  999 kB\nVmRSS:\t   5120 kB\nThreads: 1\n";
        assert_eq!(parse_rss_kib(status), Some(5120));
        let me = proc_sample(None).expect("linux /proc");
        assert!(me.rss_kib > 0);
    }
}
