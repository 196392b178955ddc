//! A commit's fan-out written in one system call: direct writes made while a [`SendBatch`] is
//! open on a thread go into an io_uring submission queue instead of a `send(2)` each, and the
//! kernel performs them all in one `io_uring_enter` when the batch closes (or fills up).
//!
//! Why: a chat message in a room of ten is ten `send(2)`s, and each pays the system call's
//! entry and exit on its own. A commit fans out several messages, so a submission carries tens
//! of sends (W2: about 68) or hundreds (W1: a thousand, in four): 6-9 % less CPU per delivery
//! in W2 and 20 % in W1 at 100 msgs/s on an EPYC host (BENCHMARKS.md, "Sends in one system
//! call").
//!
//! The writes stay what `send(2)` on a non-blocking socket is: every request carries
//! `MSG_DONTWAIT`, so the kernel performs it during the submission and posts its result (bytes
//! taken, `EAGAIN` for a full socket, or the error) at once; nothing waits for a socket. Each
//! result goes back to its session's outlet exactly as a direct write's would: written, the
//! rest left for the session's task, or the connection broken
//! (`SessionHandle::deferred_written`).
//!
//! Invariants:
//! - A batch's writes are submitted and their results applied before its thread does anything
//!   else: a [`SendBatch`] is not `Send`, so the committer cannot hold one across an `.await`.
//! - While a session's write is in the ring its outlet is `in_flight`, which works as a lock
//!   the batch holds on the socket's write side: anything pushed meanwhile queues behind it,
//!   and the session's task, if it runs on another worker thread, waits before writing or
//!   letting go of the socket (`OutboundReceiver::flush` and its drop), at most until the
//!   batch's next submission returns. So a session's bytes go out in order, and a socket is
//!   not closed (its descriptor reused) while the ring still names it.
//! - The kernel reads a request's bytes until its result is in: the batch owns them (shared
//!   [`Bytes`]) until then.
//!
//! Where io_uring is missing or refused (an old kernel, a seccomp policy, `send_ring = false`),
//! [`SendBatch::begin`] returns `None` and writes are made one by one, as before.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;

use crate::outbound::SessionHandle;

/// Most writes one submission carries; a larger fan-out submits every this many.
const RING_ENTRIES: u32 = 256;

/// Open while a fan-out runs: direct writes on this thread are collected and made together
/// when it is dropped. Not `Send`: it belongs to the thread whose writes it collects.
#[derive(Debug)]
#[must_use = "writes are collected only while the batch is alive"]
pub struct SendBatch {
    _on_this_thread: PhantomData<*const ()>,
}

impl SendBatch {
    /// Opens a batch on this thread if `enabled`, io_uring works here and no batch is open
    /// already.
    pub fn begin(enabled: bool) -> Option<SendBatch> {
        if !enabled {
            return None;
        }
        RING.with(|slot| {
            let mut slot = slot.borrow_mut();
            let ring = slot.ready()?;
            if ring.open {
                return None;
            }
            ring.open = true;
            Some(SendBatch {
                _on_this_thread: PhantomData,
            })
        })
    }
}

impl Drop for SendBatch {
    fn drop(&mut self) {
        let finished = RING.with(|slot| {
            let mut slot = slot.borrow_mut();
            let Some(ring) = slot.ready() else {
                return Vec::new();
            };
            ring.open = false;
            slot.submit()
        });
        apply(finished);
    }
}

/// Whether io_uring works on this thread (a ring could be made), for tests that must say
/// when they cannot exercise it.
pub fn is_available() -> bool {
    RING.with(|slot| slot.borrow_mut().ready().is_some())
}

/// Hands a write of `bytes` to `fd` to this thread's open batch, for `handle`'s outlet (which
/// the caller marks in flight). False when no batch is open here, or its queue is full (see
/// [`make_room`]): the caller writes at once. `bytes` is only made when the write is taken.
/// Called under the outlet's lock, so it takes no other lock: it never submits.
pub(crate) fn defer(
    handle: &Arc<SessionHandle>,
    fd: std::os::fd::RawFd,
    bytes: impl FnOnce() -> Bytes,
) -> bool {
    RING.with(|slot| match &mut *slot.borrow_mut() {
        // Not `ready()`: a thread that never opens a batch (the heartbeat's, say) makes no ring.
        Slot::Ready(ring) if ring.open && ring.pending.len() < RING_ENTRIES as usize => {
            ring.push(Arc::clone(handle), fd, bytes());
            true
        }
        _ => false,
    })
}

/// Submits this thread's open batch if its queue is full, so that the next write can join
/// it. Called before a push takes its outlet's lock: applying the results locks the outlets
/// they belong to, and no outlet's lock is held while another's is taken.
pub(crate) fn make_room() {
    let finished = RING.with(|slot| {
        let mut slot = slot.borrow_mut();
        match &*slot {
            Slot::Ready(ring) if ring.open && ring.pending.len() >= RING_ENTRIES as usize => {
                slot.submit()
            }
            _ => Vec::new(),
        }
    });
    apply(finished);
}

/// Gives each finished write's result to its outlet; a write whose fate is unknown (its
/// ring failed) cuts its connection off.
fn apply(finished: Vec<(Pending, Landed)>) {
    for (pending, landed) in finished {
        match landed {
            Some(result) => pending.handle.deferred_written(pending.bytes, result),
            None => pending.handle.deferred_lost(),
        }
    }
}

/// What became of a write: the kernel's result, or `None` when the ring failed before giving
/// it (the kernel may still make the write, or may not).
type Landed = Option<std::io::Result<usize>>;

thread_local! {
    /// This thread's ring, made on first use.
    static RING: RefCell<Slot> = const { RefCell::new(Slot::Untried) };
}

/// A thread's ring, or why it has none.
enum Slot {
    /// Not needed yet.
    Untried,
    /// io_uring is not available here (or failed once): writes go one by one.
    Unavailable,
    /// Ready for batches. Boxed: the ring's handle is large, and most threads never make one.
    Ready(Box<Ring>),
}

impl Slot {
    fn ready(&mut self) -> Option<&mut Ring> {
        if let Slot::Untried = self {
            *self = match Ring::new() {
                Ok(ring) => Slot::Ready(Box::new(ring)),
                Err(err) => {
                    tracing::info!(error = %err, "io_uring unavailable: fan-out writes one send(2) each");
                    Slot::Unavailable
                }
            };
        }
        match self {
            Slot::Ready(ring) => Some(ring),
            Slot::Untried | Slot::Unavailable => None,
        }
    }

    /// Submits the ring's queued writes and returns their results; a ring whose submission
    /// failed is given up (see [`Ring::submit`]).
    fn submit(&mut self) -> Vec<(Pending, Landed)> {
        let Slot::Ready(ring) = self else {
            return Vec::new();
        };
        let (finished, failed) = ring.submit();
        if failed {
            *self = Slot::Unavailable;
        }
        finished
    }
}

/// A write in the ring: whose it is, and the bytes the kernel reads.
struct Pending {
    handle: Arc<SessionHandle>,
    bytes: Bytes,
}

struct Ring {
    ring: io_uring::IoUring,
    /// Writes submitted in the next call, by position (a request's `user_data`).
    pending: Vec<Pending>,
    /// A batch is open.
    open: bool,
}

impl Ring {
    fn new() -> std::io::Result<Ring> {
        // Only this thread submits, and it waits for its own results: the kernel can skip the
        // locking and interruptions meant for rings shared between threads (Linux 6.0); older
        // kernels get a plain ring.
        let ring = io_uring::IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(RING_ENTRIES)
            .or_else(|_| io_uring::IoUring::new(RING_ENTRIES))?;
        // `SEND` came in Linux 5.6; a kernel with io_uring but without it would fail every
        // write (and probing came in 5.6 too).
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(io_uring::opcode::Send::CODE) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "io_uring without SEND",
            ));
        }
        Ok(Ring {
            ring,
            pending: Vec::with_capacity(RING_ENTRIES as usize),
            open: false,
        })
    }

    #[allow(unsafe_code)]
    fn push(&mut self, handle: Arc<SessionHandle>, fd: std::os::fd::RawFd, bytes: Bytes) {
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let send = io_uring::opcode::Send::new(io_uring::types::Fd(fd), bytes.as_ptr(), len)
            .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            .build()
            .user_data(self.pending.len() as u64);
        // SAFETY: the request reads `len` bytes of `bytes`, which `pending` keeps alive (and
        // in place: `Bytes` is a handle to a heap buffer) until `submit` has its result; `fd`
        // is the outlet's socket, which the outlet keeps open while its write is in flight.
        // The queue has room: `defer` pushes only below `RING_ENTRIES`.
        let pushed = unsafe { self.ring.submission().push(&send) };
        debug_assert!(pushed.is_ok(), "the submission queue was full");
        self.pending.push(Pending { handle, bytes });
    }

    /// Submits the queued writes, waits for all their results (each is immediate: see the
    /// module's notes) and returns them, each with its write, and whether the submission
    /// failed (the ring must not be used again).
    fn submit(&mut self) -> (Vec<(Pending, Landed)>, bool) {
        let count = self.pending.len();
        if count == 0 {
            return (Vec::new(), false);
        }
        let mut results: Vec<Landed> = Vec::new();
        results.resize_with(count, || None);
        let mut seen = 0;
        while seen < count {
            match self.ring.submit_and_wait(count - seen) {
                Ok(_) => {}
                Err(err)
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(err) => {
                    // Not expected of a ring that works. What was submitted may still be read
                    // by the kernel: its bytes are kept for good, the ring is given up, and
                    // the connections whose write has no result are cut off, since whether
                    // it was made is unknown (their clients resume from their last seq;
                    // nothing stored is lost).
                    tracing::error!(error = %err, "io_uring submission failed: writes go one by one from now on");
                    let pending = std::mem::take(&mut self.pending);
                    let finished = pending
                        .into_iter()
                        .zip(results)
                        .inspect(|(pending, _)| std::mem::forget(pending.bytes.clone()))
                        .collect();
                    return (finished, true);
                }
            }
            for entry in self.ring.completion() {
                let Some(result) = usize::try_from(entry.user_data())
                    .ok()
                    .and_then(|at| results.get_mut(at))
                else {
                    continue;
                };
                if result.is_none() {
                    seen += 1;
                }
                let code = entry.result();
                *result = Some(if code >= 0 {
                    Ok(code as usize)
                } else if code == -libc::EAGAIN {
                    Ok(0)
                } else {
                    Err(std::io::Error::from_raw_os_error(-code))
                });
            }
        }
        debug_assert!(results.iter().all(Option::is_some), "every result was seen");
        (self.pending.drain(..).zip(results).collect(), false)
    }
}
