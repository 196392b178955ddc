//! The benchmark payload: publisher id, sequence number and send time, padded to a size.
//!
//! Format: `b<publisher>-<seq>-<sent_ns>;` followed by `x` up to the requested size, e.g.
//! `b3-17-120443211;xxxxxxxx`. It is plain ASCII without `\n`, `"` or `\\`, so it passes
//! unchanged through JSON string escaping (confab, Socket.IO) and through newline-packed
//! frames (gorilla), and a receiver can find and parse it without a JSON parser. The send time
//! is nanoseconds on the process-wide monotonic clock ([`Clock`]): publishers and receivers
//! are the same process, so the difference is the end-to-end latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Where the payload's fields end; never part of a number.
const END: u8 = b';';
/// Longest header: `b` + 3 × 20 digits + 2 `-` + `;`.
pub const MAX_HEADER: usize = 64;

/// The identity and send time a payload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Global publisher index.
    pub publisher: u32,
    /// The publisher's sequence number, from 0, without gaps.
    pub seq: u64,
    /// Send time in [`Clock`] nanoseconds.
    pub sent_ns: u64,
}

/// The shared monotonic clock timestamps are taken from (nanoseconds since the run started).
///
/// It also converts the kernel's receive timestamps, which are wall-clock time, to itself: the
/// wall clock's offset from it is measured at start and again by [`Clock::resync`] (once a
/// second), so that NTP slewing the wall clock during a long run does not drift the conversion.
#[derive(Debug)]
pub struct Clock {
    origin: Instant,
    /// Wall-clock nanoseconds since the Unix epoch at this clock's zero.
    wall_at_zero_ns: AtomicU64,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Clock {
        let clock = Clock {
            origin: Instant::now(),
            wall_at_zero_ns: AtomicU64::new(0),
        };
        clock.resync();
        clock
    }

    /// Nanoseconds since the clock started.
    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Measures the wall clock's offset again: of a few readings bracketed by two of this
    /// clock's, the one with the tightest bracket (a few hundred nanoseconds at worst).
    pub fn resync(&self) {
        let mut best: Option<(u64, u64)> = None;
        for _ in 0..5 {
            let before = self.now_ns();
            let wall = wall_ns();
            let after = self.now_ns();
            let spread = after - before;
            if best.is_none_or(|(narrowest, _)| spread < narrowest) {
                best = Some((spread, wall.saturating_sub(before + spread / 2)));
            }
        }
        if let Some((_, at_zero)) = best {
            self.wall_at_zero_ns.store(at_zero, Ordering::Relaxed);
        }
    }

    /// A wall-clock time (ns since the Unix epoch, as the kernel stamps what it receives) on
    /// this clock; 0 for anything before the clock started.
    pub fn from_wall_ns(&self, wall: u64) -> u64 {
        wall.saturating_sub(self.wall_at_zero_ns.load(Ordering::Relaxed))
    }
}

/// Wall-clock nanoseconds since the Unix epoch, the kernel's receive timestamps' clock.
pub(crate) fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Appends the payload for `stamp`, padded with `x` to `size` bytes (longer if the header
/// alone is longer).
pub fn encode(out: &mut Vec<u8>, stamp: Stamp, size: usize) {
    let begin = out.len();
    out.push(b'b');
    push_u64(out, u64::from(stamp.publisher));
    out.push(b'-');
    push_u64(out, stamp.seq);
    out.push(b'-');
    push_u64(out, stamp.sent_ns);
    out.push(END);
    let written = out.len() - begin;
    if written < size {
        out.resize(begin + size, b'x');
    }
}

/// Parses a payload from the start of `bytes` (padding and anything after it are ignored).
pub fn parse(bytes: &[u8]) -> Option<Stamp> {
    let rest = bytes.strip_prefix(b"b")?;
    let (publisher, rest) = take_u64(rest, b'-')?;
    let (seq, rest) = take_u64(rest, b'-')?;
    let (sent_ns, _) = take_u64(rest, END)?;
    Some(Stamp {
        publisher: u32::try_from(publisher).ok()?,
        seq,
        sent_ns,
    })
}

/// Decimal digits of `value`, without allocating.
fn push_u64(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// A decimal number terminated by `end`; returns it and what follows `end`.
fn take_u64(bytes: &[u8], end: u8) -> Option<(u64, &[u8])> {
    let mut value: u64 = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        if byte == end {
            return (i > 0).then(|| (value, &bytes[i + 1..]));
        }
        if !byte.is_ascii_digit() || i >= 20 {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let stamp = Stamp {
            publisher: 7,
            seq: 12345,
            sent_ns: 987_654_321_000,
        };
        let mut out = Vec::new();
        encode(&mut out, stamp, 64);
        assert_eq!(out.len(), 64);
        assert!(out.starts_with(b"b7-12345-987654321000;xxx"));
        assert_eq!(parse(&out), Some(stamp));
        assert!(
            out.iter()
                .all(|b| b.is_ascii_graphic() && !b"\"\\".contains(b))
        );
    }

    #[test]
    fn small_sizes_keep_the_whole_header_and_appending_keeps_the_prefix() {
        let stamp = Stamp {
            publisher: u32::MAX,
            seq: u64::MAX,
            sent_ns: u64::MAX,
        };
        let mut out = b"prefix".to_vec();
        encode(&mut out, stamp, 1);
        assert!(out.len() - 6 <= MAX_HEADER);
        assert_eq!(parse(&out[6..]), Some(stamp));
        let mut zero = Vec::new();
        encode(
            &mut zero,
            Stamp {
                publisher: 0,
                seq: 0,
                sent_ns: 0,
            },
            0,
        );
        assert_eq!(zero, b"b0-0-0;");
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &b""[..],
            b"b",
            b"x1-2-3;",
            b"b1-2-3",
            b"b1--3;",
            b"b1-2-3x;",
            b"b99999999999-1-1;",
            b"b1-2-999999999999999999999;",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_clock_moves_forward() {
        let clock = Clock::new();
        let a = clock.now_ns();
        let b = clock.now_ns();
        assert!(b >= a);
    }

    #[test]
    fn wall_clock_times_convert_to_the_clock() {
        let clock = Clock::new();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let before = clock.now_ns();
        let converted = clock.from_wall_ns(wall_ns());
        let after = clock.now_ns();
        // A millisecond of slack: the offset is measured to well under that, and the wall
        // clock is read between the two readings of the clock.
        assert!(converted + 1_000_000 >= before, "{converted} < {before}");
        assert!(converted <= after + 1_000_000, "{converted} > {after}");
        assert!(converted >= 5_000_000);
        assert_eq!(clock.from_wall_ns(0), 0);
    }
}
