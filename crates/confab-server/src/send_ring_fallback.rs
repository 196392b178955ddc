//! [`send_ring`](self) where there is no io_uring (not Linux): no batch ever opens, and every
//! direct write is made at once, one `send(2)` each. Same interface as the Linux module.

use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;

use crate::outbound::SessionHandle;

/// Never open here: see the Linux module.
#[derive(Debug)]
#[must_use = "writes are collected only while the batch is alive"]
pub struct SendBatch {
    _on_this_thread: PhantomData<*const ()>,
}

impl SendBatch {
    /// Always `None`: writes are made one by one.
    pub fn begin(_enabled: bool) -> Option<SendBatch> {
        None
    }
}

/// Always false here.
pub fn is_available() -> bool {
    false
}

/// Always false: the caller writes at once.
pub(crate) fn defer(
    _handle: &Arc<SessionHandle>,
    _fd: std::os::fd::RawFd,
    _bytes: impl FnOnce() -> Bytes,
) -> bool {
    false
}

/// Nothing to do here.
pub(crate) fn make_room() {}
