//! The server side of the WebSocket protocol (RFC 6455), written for fan-out.
//!
//! A general WebSocket library copies each outgoing frame into a per-connection write buffer
//! and keeps that buffer at the size of the largest frame it ever wrote (a `joined` with
//! history is kilobytes): with thousands of mostly idle connections, those buffers are most of
//! the server's memory. Here a frame's payload is the once-encoded, shared `Utf8Bytes` the hub
//! fans out; a write gathers the few header bytes and those payloads into vectored writes
//! (`sendmsg`), so nothing is copied and nothing is kept between writes. The read side waits
//! for readiness with no buffer at all, and holds one only while a frame is arriving.
//!
//! The socket is shared (`Arc<TcpStream>`): the session's task reads from it, and whoever
//! fans a message out may write to it directly (see `outbound`). Writes are therefore free
//! functions over `&TcpStream`: [`try_write`] puts what the socket takes without waiting (no
//! future, no timer), and only a write that would block goes on asynchronously
//! ([`finish_write`]).
//!
//! Only what a chat server needs: no extensions (no compression), no subprotocols, text and
//! control frames out; text, binary, fragmented and control frames in, with the checks the RFC
//! requires of a server (masked client frames, no reserved bits, short unfragmented control
//! frames, valid UTF-8, a size limit).

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use rustix::net::{SendAncillaryBuffer, SendFlags};
use smallvec::SmallVec;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tungstenite::Utf8Bytes;

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// Free space made available for each socket read.
const READ_CHUNK: usize = 512;

/// Frame headers of one write.
type Heads = SmallVec<[u8; 128]>;

/// Most slices one `sendmsg` takes (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// A peer that has gone away gives `EPIPE`, not a `SIGPIPE` that would end an embedding
/// program that has not ignored it.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
const SEND_FLAGS: SendFlags = SendFlags::NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
const SEND_FLAGS: SendFlags = SendFlags::empty();

/// A complete message (or control frame) from the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A text message, UTF-8 checked.
    Text(String),
    /// A binary message (the protocol has none; the session answers with an error).
    Binary,
    /// A ping: answer with a pong carrying the same payload.
    Ping(Vec<u8>),
    /// A pong (a sign of life).
    Pong,
    /// The client's close frame, with its status code if it gave one.
    Close(Option<u16>),
}

/// Why no further message can be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The connection ended without a close frame.
    #[error("connection closed")]
    Closed,
    /// A frame or message over the size limit (close with 1009).
    #[error("frame exceeds the size limit")]
    TooBig,
    /// A text message that is not UTF-8 (close with 1007).
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// A violation of RFC 6455 (close with 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One frame to send. Payloads are shared, reference-counted bytes (the once-encoded frames of
/// a broadcast), so a write that has to wait can keep its frames without copying them.
#[derive(Debug, Clone)]
pub(crate) enum Frame {
    /// A text frame (every event the server sends).
    Text(Utf8Bytes),
    /// Complete text frames, headers included ([`append_text_frame`]): a commit's chat
    /// messages are framed once, back to back, and every subscriber's write is a span of that
    /// one buffer, with nothing built per delivery.
    Framed(Bytes),
    /// A heartbeat ping.
    Ping,
    /// The answer to a client's ping.
    Pong(Bytes),
    /// A close frame with a status code and a reason (at most 123 bytes are sent).
    Close(u16, Utf8Bytes),
}

impl Frame {
    /// Whether this frame ends the conversation: nothing may be written after it.
    pub(crate) fn is_close(&self) -> bool {
        matches!(self, Frame::Close(..))
    }
}

/// An upgraded connection: the accepted TCP socket itself, shared with the session's outbound
/// side for writing.
pub(crate) struct WebSocket {
    stream: Arc<TcpStream>,
    reader: Reader,
}

/// The read side's state: bytes received and not yet parsed, and a message being assembled.
struct Reader {
    /// Empty (no allocation) between messages.
    read: BytesMut,
    /// A fragmented message being assembled: its opcode and payload so far. Boxed: browsers
    /// do not fragment, and inline it would make every connection's state 24 bytes larger.
    partial: Option<Box<(u8, Vec<u8>)>>,
    /// Largest frame or message accepted from the client.
    max_message: usize,
}

/// How far a write got without waiting.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// Every byte is in the socket buffer.
    All,
    /// The socket is full after this many bytes: finish with [`finish_write`].
    Partly(usize),
}

impl WebSocket {
    /// Wraps a connection whose upgrade to WebSocket has been answered with 101; `already_read`
    /// is what the HTTP server had read past the request (a client may send right away).
    pub(crate) fn new(stream: TcpStream, already_read: Bytes, max_message: usize) -> WebSocket {
        let mut reader = Reader::new(max_message);
        if !already_read.is_empty() {
            reader.read.extend_from_slice(&already_read);
        }
        WebSocket {
            stream: Arc::new(stream),
            reader,
        }
    }

    /// The socket, for writing.
    pub(crate) fn stream(&self) -> &Arc<TcpStream> {
        &self.stream
    }

    /// The next message. Cancel-safe: bytes read stay buffered.
    pub(crate) async fn read_message(&mut self) -> Result<Incoming, ReadError> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    /// The next message if one has arrived; otherwise `Pending`, with the task registered to
    /// be woken when the socket has data. No future is kept while waiting, and no buffer
    /// either unless part of a frame has arrived: idle connections are the common case.
    pub(crate) fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Incoming, ReadError>> {
        let reader = &mut self.reader;
        loop {
            if let Some(message) = reader.parse()? {
                return Poll::Ready(Ok(message));
            }
            // Nothing buffered: give the buffer back before waiting (the next call after a
            // message comes through here too).
            if reader.read.is_empty() {
                reader.read = BytesMut::new();
            }
            ready!(self.stream.poll_read_ready(cx))?;
            if reader.read.capacity() - reader.read.len() < READ_CHUNK / 2 {
                reader.read.reserve(READ_CHUNK);
            }
            let room = reader.read.capacity() - reader.read.len();
            // A `WouldBlock` clears the readiness, so the next poll waits for data again. A
            // read that did not fill the room given has emptied the socket's receive queue
            // (with epoll and kqueue, new data then raises readiness again), so it clears the
            // readiness too, as tokio's own `poll_read` does: otherwise every message would
            // cost one more read that only finds nothing.
            let read = self.stream.try_io(Interest::READABLE, || {
                match self.stream.try_read_buf(&mut reader.read)? {
                    n if n > 0 && n < room => Err(io::Error::from(io::ErrorKind::WouldBlock)),
                    n => Ok(n),
                }
            });
            match read {
                Ok(0) => return Poll::Ready(Err(ReadError::Closed)),
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Poll::Ready(Err(err.into())),
            }
        }
    }
}

impl Reader {
    fn new(max_message: usize) -> Reader {
        Reader {
            read: BytesMut::new(),
            partial: None,
            max_message,
        }
    }

    /// Takes complete frames off the read buffer until one finishes a message; `None` when more
    /// bytes are needed.
    fn parse(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let Some(header) = FrameHeader::parse(&self.read)? else {
                return Ok(None);
            };
            let control = header.opcode & 0x8 != 0;
            let so_far = self.partial.as_ref().map_or(0, |partial| partial.1.len());
            let total = if control {
                header.len
            } else {
                header.len.saturating_add(so_far as u64)
            };
            if total > self.max_message as u64 {
                return Err(ReadError::TooBig);
            }
            // Fits in memory: it is at most `max_message`.
            let end = header.start + header.len as usize;
            if self.read.len() < end {
                self.read.reserve(end - self.read.len());
                return Ok(None);
            }
            let frame = self.read.split_to(end);
            let mut payload = frame[header.start..].to_vec();
            unmask(&mut payload, header.mask);
            match header.opcode {
                PING => return Ok(Some(Incoming::Ping(payload))),
                PONG => return Ok(Some(Incoming::Pong)),
                CLOSE => {
                    return match payload.len() {
                        0 => Ok(Some(Incoming::Close(None))),
                        1 => Err(ReadError::Protocol("close frame with a one-byte payload")),
                        _ => Ok(Some(Incoming::Close(Some(u16::from_be_bytes([
                            payload[0], payload[1],
                        ]))))),
                    };
                }
                TEXT | BINARY => {
                    if self.partial.is_some() {
                        return Err(ReadError::Protocol("new message inside a fragmented one"));
                    }
                    if header.fin {
                        return finish(header.opcode, payload).map(Some);
                    }
                    self.partial = Some(Box::new((header.opcode, payload)));
                }
                CONTINUATION => {
                    let Some(mut partial) = self.partial.take() else {
                        return Err(ReadError::Protocol("continuation without a message"));
                    };
                    partial.1.extend_from_slice(&payload);
                    if header.fin {
                        let (opcode, data) = *partial;
                        return finish(opcode, data).map(Some);
                    }
                    self.partial = Some(partial);
                }
                _ => return Err(ReadError::Protocol("unknown opcode")),
            }
        }
    }
}

/// Writes frames in order, after their first `skip` bytes, with as few `sendmsg` calls as the
/// socket takes without waiting. If it would block, the caller finishes with [`finish_write`]
/// (same frames, the count returned); a frame may be cut in between, so a caller that gives up
/// must drop the connection, and nothing else may be written to the socket meanwhile.
///
/// The socket is tried directly, without tokio's readiness bookkeeping (a lookup in another
/// allocation per delivery, ~5 % of W1's CPU): a `WouldBlock` here leaves tokio believing the
/// socket writable, which costs [`finish_write`] one extra try, and that one is tracked.
pub(crate) fn try_write(
    socket: BorrowedFd<'_>,
    frames: &[Frame],
    skip: usize,
) -> io::Result<Written> {
    send_frames(socket, None, frames, skip)
}

/// `frames` as the bytes one write of them puts on the wire, in one buffer: what a write that
/// the kernel makes later (a [`crate::send_ring::SendBatch`]'s) sends, since it cannot borrow
/// the frames' slices until then. A pre-framed span alone is shared, not copied.
pub(crate) fn wire_bytes(frames: &[Frame]) -> Bytes {
    if let [Frame::Framed(whole)] = frames {
        return whole.clone();
    }
    let mut heads = Heads::new();
    let mut out = Vec::new();
    for frame in frames {
        heads.clear();
        let payload = push_head(&mut heads, frame);
        out.extend_from_slice(&heads);
        out.extend_from_slice(payload);
    }
    Bytes::from(out)
}

/// Appends what goes on the wire before `frame`'s payload (its header, and a close frame's
/// code and reason, at most 123 bytes of it) to `heads`, and returns the payload: the whole
/// of a pre-framed span, which has its headers already.
fn push_head<'a>(heads: &mut Heads, frame: &'a Frame) -> &'a [u8] {
    match frame {
        Frame::Framed(whole) => whole,
        Frame::Text(payload) => {
            push_header(heads, TEXT, payload.len());
            payload.as_bytes()
        }
        Frame::Ping => {
            push_header(heads, PING, 0);
            &[]
        }
        Frame::Pong(payload) => {
            push_header(heads, PONG, payload.len());
            payload
        }
        Frame::Close(code, reason) => {
            let reason = truncate_utf8(reason.as_str(), 123);
            push_header(heads, CLOSE, 2 + reason.len());
            heads.extend_from_slice(&code.to_be_bytes());
            heads.extend_from_slice(reason.as_bytes());
            &[]
        }
    }
}

/// Unmasks a client frame's payload in place, eight bytes at a time: byte by byte it was
/// about 1,700 instructions of every chat message a client sends (W2 callgrind).
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let [a, b, c, d] = mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut words = payload.chunks_exact_mut(8);
    for word in &mut words {
        let unmasked = u64::from_ne_bytes((&*word).try_into().expect("eight bytes")) ^ wide;
        word.copy_from_slice(&unmasked.to_ne_bytes());
    }
    // The rest starts at a multiple of eight, so the mask starts over with it.
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// [`try_write`] for the usual delivery, pre-framed chat messages (a span of a commit's shared
/// buffer): one `send(2)` of it and nothing assembled around it. Building the general path's
/// headers and slices for a single frame was about 400 of the 850 instructions a W1 delivery
/// cost in user space. A socket that takes part of it returns `Partly` at once, as the general
/// path would after its next try (the socket is full).
pub(crate) fn try_send_framed(socket: BorrowedFd<'_>, framed: &[u8]) -> io::Result<Written> {
    match rustix::net::send(socket, framed, SEND_FLAGS) {
        Ok(0) if !framed.is_empty() => Err(io::ErrorKind::WriteZero.into()),
        Ok(sent) if sent >= framed.len() => Ok(Written::All),
        Ok(sent) => Ok(Written::Partly(sent)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(Written::Partly(0)),
        Err(err) => Err(err.into()),
    }
}

/// [`try_write`], with `tracked`'s write readiness cleared by a `WouldBlock` (so that
/// `writable()` then waits).
fn send_frames(
    socket: BorrowedFd<'_>,
    tracked: Option<&TcpStream>,
    frames: &[Frame],
    skip: usize,
) -> io::Result<Written> {
    if frames.is_empty() {
        return Ok(Written::All);
    }
    // Headers (and close payloads) of every frame, one after another. On the stack: this runs
    // once per delivery, and a typical write is a few frames.
    let mut heads = Heads::new();
    let mut spans: SmallVec<[(Range<usize>, &[u8]); 16]> = SmallVec::new();
    for frame in frames {
        let start = heads.len();
        let payload = push_head(&mut heads, frame);
        spans.push((start..heads.len(), payload));
    }
    let mut slices: SmallVec<[IoSlice<'_>; 32]> = SmallVec::new();
    for (span, payload) in spans {
        if !span.is_empty() {
            slices.push(IoSlice::new(&heads[span]));
        }
        if !payload.is_empty() {
            slices.push(IoSlice::new(payload));
        }
    }
    let mut remaining = &mut slices[..];
    IoSlice::advance_slices(&mut remaining, skip);
    let mut written = skip;
    while !remaining.is_empty() {
        let take = remaining.len().min(MAX_IOVECS);
        // sendmsg(2) rather than writev(2): the same vectored write without the file layer
        // (about 7 % of the server's CPU in a W1 profile). Through rustix, which makes the
        // system call itself: libc's wrappers are cancellation points, whose bookkeeping
        // around every call was 1.5 % of W1's CPU.
        let send = || {
            match &remaining[..take] {
                // One buffer (a pre-framed message, the usual delivery): send(2), which spares
                // the kernel importing an iovec array.
                [one] => rustix::net::send(socket, one, SEND_FLAGS),
                several => rustix::net::sendmsg(
                    socket,
                    several,
                    &mut SendAncillaryBuffer::default(),
                    SEND_FLAGS,
                ),
            }
            .map_err(io::Error::from)
        };
        // Through `try_io`, a `WouldBlock` clears the readiness, so `writable()` then waits.
        let sent = match tracked {
            Some(stream) => stream.try_io(Interest::WRITABLE, send),
            None => send(),
        };
        match sent {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut remaining, n);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Written::Partly(written));
            }
            Err(err) => return Err(err),
        }
    }
    Ok(Written::All)
}

/// Writes the rest of `frames` after the first `written` bytes, waiting for the socket.
/// Rebuilding the slices after each wait is cheap next to waiting.
pub(crate) async fn finish_write(
    stream: &TcpStream,
    frames: &[Frame],
    mut written: usize,
) -> io::Result<()> {
    loop {
        stream.writable().await?;
        match send_frames(stream.as_fd(), Some(stream), frames, written)? {
            Written::All => return Ok(()),
            Written::Partly(so_far) => written = so_far,
        }
    }
}

/// Ends the TCP connection's sending side (after our close frame).
pub(crate) fn shutdown(stream: &TcpStream) {
    let _ = rustix::net::shutdown(stream, rustix::net::Shutdown::Write);
}

/// The fixed part of a client frame.
#[derive(Debug, PartialEq, Eq)]
struct FrameHeader {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Payload length.
    len: u64,
    /// Where the payload starts.
    start: usize,
}

impl FrameHeader {
    /// Parses a client frame's header; `None` if `buf` does not hold all of it yet.
    fn parse(buf: &[u8]) -> Result<Option<FrameHeader>, ReadError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol("client frames must be masked"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        let (len, at) = match b1 & 0x7F {
            126 => match buf.get(2..4) {
                Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(bytes) => (
                    u64::from_be_bytes(bytes.try_into().expect("eight bytes")),
                    10,
                ),
                None => return Ok(None),
            },
            short => (u64::from(short), 2),
        };
        if opcode & 0x8 != 0 && (!fin || len > 125) {
            return Err(ReadError::Protocol(
                "control frames must be short and unfragmented",
            ));
        }
        let Some(mask) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        Ok(Some(FrameHeader {
            fin,
            opcode,
            mask: mask.try_into().expect("four bytes"),
            len,
            start: at + 4,
        }))
    }
}

fn finish(opcode: u8, payload: Vec<u8>) -> Result<Incoming, ReadError> {
    if opcode == TEXT {
        String::from_utf8(payload)
            .map(Incoming::Text)
            .map_err(|_| ReadError::InvalidUtf8)
    } else {
        Ok(Incoming::Binary)
    }
}

/// Longest frame header a server writes (opcode, 127, then a 64-bit length).
const MAX_HEADER: usize = 10;

/// Appends a complete unmasked text frame holding `write`'s output to `buf`. The payload is
/// written after room for the longest header and moved up against its header once its length
/// is known. A commit's messages to one room are framed this way back to back, once, and every
/// subscriber's write is a span of that buffer ([`Frame::Framed`]).
pub(crate) fn append_text_frame(buf: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.resize(start + MAX_HEADER, 0);
    write(buf);
    let payload = start + MAX_HEADER;
    let mut head = Heads::new();
    push_header(&mut head, TEXT, buf.len() - payload);
    let body = start + head.len();
    buf.copy_within(payload.., body);
    buf.truncate(buf.len() - (MAX_HEADER - head.len()));
    buf[start..body].copy_from_slice(&head);
}

/// A complete unmasked text frame for `payload` (see [`append_text_frame`]).
#[cfg(test)]
pub(crate) fn text_frame(payload: &[u8]) -> Bytes {
    let mut head = Heads::new();
    push_header(&mut head, TEXT, payload.len());
    let mut frame = Vec::with_capacity(head.len() + payload.len());
    frame.extend_from_slice(&head);
    frame.extend_from_slice(payload);
    frame.into()
}

/// Appends an unmasked server frame header (FIN set).
fn push_header(out: &mut Heads, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames appended in place are each payload behind its header, back to back, for every
    /// header length (and after a frame of any length).
    #[test]
    fn frames_appended_in_place_match_framed_payloads() {
        let lens = [0, 1, 125, 126, 300, 65_535, 65_536, 70_000];
        for first in lens {
            for len in lens {
                let payload =
                    |len: usize| -> Vec<u8> { (0..len).map(|i| b'a' + (i % 26) as u8).collect() };
                let mut built = Vec::new();
                append_text_frame(&mut built, |out| out.extend_from_slice(&payload(first)));
                append_text_frame(&mut built, |out| out.extend_from_slice(&payload(len)));
                let mut expected = text_frame(&payload(first)).to_vec();
                expected.extend_from_slice(&text_frame(&payload(len)));
                assert_eq!(built, expected, "{first} then {len} bytes");
            }
        }
    }

    /// A masked client frame.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    #[test]
    fn unmasking_by_words_matches_unmasking_by_bytes() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            let original: Vec<u8> = (0..len).map(|i| (i * 37 + 5) as u8).collect();
            let mut fast = original.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i & 3])
                .collect();
            assert_eq!(fast, slow, "length {len}");
        }
    }

    /// Parses `bytes` fed in pieces of `chunk` bytes, collecting every message.
    fn parse_all(bytes: &[u8], chunk: usize, max: usize) -> Result<Vec<Incoming>, ReadError> {
        let mut reader = Reader::new(max);
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            reader.read.extend_from_slice(piece);
            while let Some(message) = reader.parse()? {
                out.push(message);
            }
        }
        Ok(out)
    }

    #[test]
    fn frames_split_anywhere_and_several_per_read() {
        let mut bytes = client_frame(true, TEXT, b"hello");
        bytes.extend(client_frame(true, PING, b"p"));
        bytes.extend(client_frame(false, TEXT, "h\u{e9}".as_bytes()));
        bytes.extend(client_frame(true, PONG, b""));
        bytes.extend(client_frame(true, CONTINUATION, b"llo"));
        bytes.extend(client_frame(true, TEXT, &[b'x'; 300]));
        bytes.extend(client_frame(true, CLOSE, &1000u16.to_be_bytes()));
        let expected = vec![
            Incoming::Text("hello".into()),
            Incoming::Ping(b"p".to_vec()),
            Incoming::Pong,
            Incoming::Text("h\u{e9}llo".into()),
            Incoming::Text("x".repeat(300)),
            Incoming::Close(Some(1000)),
        ];
        for chunk in [1, 2, 3, 7, 64, 10_000] {
            assert_eq!(
                parse_all(&bytes, chunk, 1 << 16).unwrap(),
                expected,
                "{chunk}"
            );
        }
    }

    #[test]
    fn limits_and_violations() {
        let big = client_frame(true, TEXT, &[b'a'; 70_000]);
        assert!(matches!(
            parse_all(&big, 100, 65_536),
            Err(ReadError::TooBig)
        ));
        // The limit counts the whole message across fragments.
        let mut parts = client_frame(false, TEXT, &[b'a'; 40_000]);
        parts.extend(client_frame(true, CONTINUATION, &[b'a'; 40_000]));
        assert!(matches!(
            parse_all(&parts, 4096, 65_536),
            Err(ReadError::TooBig)
        ));
        let bad_utf8 = client_frame(true, TEXT, &[0xff, 0xfe]);
        assert!(matches!(
            parse_all(&bad_utf8, 10, 100),
            Err(ReadError::InvalidUtf8)
        ));
        let mut unmasked = client_frame(true, TEXT, b"x");
        unmasked[1] &= 0x7f;
        assert!(matches!(
            parse_all(&unmasked, 10, 100),
            Err(ReadError::Protocol(_))
        ));
        let fragmented_ping = client_frame(false, PING, b"");
        assert!(matches!(
            parse_all(&fragmented_ping, 10, 100),
            Err(ReadError::Protocol(_))
        ));
        let stray = client_frame(true, CONTINUATION, b"x");
        assert!(matches!(
            parse_all(&stray, 10, 100),
            Err(ReadError::Protocol(_))
        ));
        let mut reserved = client_frame(true, TEXT, b"x");
        reserved[0] |= 0x40;
        assert!(matches!(
            parse_all(&reserved, 10, 100),
            Err(ReadError::Protocol(_))
        ));
        assert_eq!(
            parse_all(&client_frame(true, BINARY, b"\x00"), 10, 100).unwrap(),
            vec![Incoming::Binary]
        );
    }

    #[test]
    fn server_headers() {
        let mut out = Heads::new();
        push_header(&mut out, TEXT, 5);
        assert_eq!(out[..], [0x81, 5]);
        out.clear();
        push_header(&mut out, TEXT, 300);
        assert_eq!(out[..], [0x81, 126, 1, 44]);
        out.clear();
        push_header(&mut out, TEXT, 70_000);
        assert_eq!(out[..], [0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(truncate_utf8("h\u{e9}llo", 2), "h");
    }
}
