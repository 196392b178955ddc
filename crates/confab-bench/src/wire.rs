//! A minimal WebSocket client (RFC 6455) over a plain TCP socket.
//!
//! Why not tokio-tungstenite: the load generator must not be what is measured. A general client
//! library allocates a message per received frame, validates UTF-8, and goes through a `Sink`/
//! `Stream` layer; on one core that tops out near 200-250k frames/s, less than a good server
//! sends. This client keeps one read buffer per connection, parses the server's (unmasked)
//! frames in place and hands out borrowed payload slices, so receiving a frame allocates
//! nothing. Outgoing frames are masked into one reusable write buffer. Only what the benchmark
//! needs is here: text/binary data frames, fragmentation (rare, reassembled into a side buffer),
//! ping → pong, and the close handshake. No extensions, no TLS (the tool is loopback only).
//!
//! Reading is split in two so one task can both receive and publish without locks:
//! [`WsConn::fill`] is the only `await` on the read side and is cancel-safe (one `read` call),
//! so it can sit in a `select!` next to a publish timer; [`WsConn::next_frame`] is synchronous
//! and returns frames already buffered.
//!
//! The socket is driven through tokio's [`AsyncFd`] rather than a `TcpStream` so that a read
//! that leaves the socket empty can say so: a read shorter than the buffer means the kernel
//! had nothing more, and the readiness is cleared right there. Without that, every wake-up
//! cost a second `recvmsg` that only returned `EAGAIN`: half of the generator's `recvmsg`s in
//! W2 (BENCHMARKS.md, 2026-12-04 late evening).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use sha1::{Digest, Sha1};
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpSocket, TcpStream};

/// Read buffer a connection starts with: enough for many small frames per `read`, small
/// enough that tens of thousands of idle connections stay cheap.
const INITIAL_READ_BUF: usize = 4096;
/// A read buffer grown past this (a large `joined` reply) is given back once it is empty.
const SHRINK_ABOVE: usize = 64 * 1024;
/// Largest frame or reassembled message accepted from a server.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Largest HTTP response head accepted during the handshake.
const MAX_HEAD: usize = 16 * 1024;
/// The GUID RFC 6455 appends to the key to compute `Sec-WebSocket-Accept`.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Why a connection failed. Typed because the scenarios count failures by kind.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Socket error (connect refused, reset, address in use...).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered the upgrade with something other than 101.
    #[error("upgrade refused: HTTP {status}: {body}")]
    Refused {
        /// HTTP status of the refusal.
        status: u16,
        /// Start of the response body (usually a JSON error).
        body: String,
    },
    /// The 101 response was malformed or had a wrong `Sec-WebSocket-Accept`.
    #[error("bad handshake: {0}")]
    Handshake(String),
    /// The server broke the framing rules.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// The server closed the connection with a close frame.
    #[error("closed by the server ({code}: {reason})")]
    Closed {
        /// Close code (1005 when the frame had none).
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// The TCP connection ended without a close frame.
    #[error("connection ended without a close frame")]
    Eof,
}

/// Kind of a data frame handed to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// Text frame (the payload is expected to be UTF-8; not checked here).
    Text,
    /// Binary frame.
    Binary,
}

/// A complete data message, borrowed from the connection's buffers until the next call.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Text or binary.
    pub opcode: Opcode,
    /// The unmasked payload.
    pub payload: &'a [u8],
}

/// What parsing the head of the buffer found. Owned, so the borrow of `self` ends before the
/// caller borrows the payload.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// Not a whole frame buffered; `need` bytes from `start` are required.
    NeedMore,
    /// A control frame or a non-final fragment was consumed; look again.
    Consumed,
    /// A whole unfragmented data frame at `rbuf[from..to]`.
    Data {
        opcode: Opcode,
        from: usize,
        to: usize,
    },
    /// A fragmented message finished; it is in `frag`.
    Assembled { opcode: Opcode },
}

/// One client WebSocket connection.
#[derive(Debug)]
pub struct WsConn {
    stream: AsyncFd<std::net::TcpStream>,
    /// Storage for received bytes; `rbuf[start..end]` is unparsed.
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes from `start` the frame being parsed needs (0 when unknown).
    need: usize,
    /// Masked frames waiting to be written.
    wbuf: Vec<u8>,
    /// Reassembly of a fragmented message (servers rarely fragment).
    frag: Vec<u8>,
    frag_opcode: Option<Opcode>,
    /// `frag` holds a message handed out last time; clear it before parsing on.
    frag_ready: bool,
    /// xorshift state for masking keys (RFC 6455 asks for unpredictable keys to protect
    /// proxies; a per-connection seeded PRNG is plenty for a loopback benchmark).
    mask_state: u64,
    /// A close frame was sent.
    close_sent: bool,
    /// Reads ask for the kernel's receive timestamp ([`WsConn::stamp_arrivals`]).
    stamped: bool,
    /// Wall-clock time (ns) the last segment taken by the latest read reached the socket;
    /// 0 when unknown.
    arrived_wall_ns: u64,
}

impl WsConn {
    /// Opens a TCP connection to `server` from `source` (any port) and performs the upgrade
    /// for `path` (with query). `extra_headers` are complete `Name: value\r\n` lines.
    pub async fn connect(
        server: SocketAddr,
        source: Option<IpAddr>,
        path: &str,
        extra_headers: &str,
    ) -> Result<WsConn, WireError> {
        let socket = match server {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(server).await?;
        stream.set_nodelay(true)?;
        let mut conn = WsConn::from_stream(stream, rand::random())?;
        conn.handshake(&server.to_string(), path, extra_headers)
            .await?;
        Ok(conn)
    }

    /// Takes over a connected stream (still non-blocking once out of tokio's hands).
    fn from_stream(stream: TcpStream, seed: u64) -> std::io::Result<WsConn> {
        let stream = stream.into_std()?;
        // SAFETY: the `AsyncFd` owns the stream, so the descriptor it registers stays open
        // until the `AsyncFd` is dropped (which deregisters it first).
        #[allow(unsafe_code)]
        let stream = unsafe { AsyncFd::register(stream) }.map_err(std::io::Error::from)?;
        Ok(WsConn {
            stream,
            rbuf: vec![0; INITIAL_READ_BUF],
            start: 0,
            end: 0,
            need: 0,
            wbuf: Vec::with_capacity(256),
            frag: Vec::new(),
            frag_opcode: None,
            frag_ready: false,
            mask_state: seed | 1,
            close_sent: false,
            stamped: false,
            arrived_wall_ns: 0,
        })
    }

    /// One `read` into `rbuf[from..to]` once the socket is readable.
    async fn read_into(&mut self, from: usize, to: usize) -> std::io::Result<usize> {
        read_when_ready(&mut self.stream, &mut self.rbuf[from..to], |stream, buf| {
            stream.read(buf)
        })
        .await
    }

    /// Writes all of `bytes`, waiting for room in the socket's buffer as needed.
    async fn write_all(
        stream: &mut AsyncFd<std::net::TcpStream>,
        mut bytes: &[u8],
    ) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let mut ready = stream.writable_mut().await?;
            match ready.try_io(|stream| stream.get_mut().write(bytes)) {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => bytes = &bytes[n..],
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    async fn handshake(
        &mut self,
        host: &str,
        path: &str,
        extra_headers: &str,
    ) -> Result<(), WireError> {
        let key_bytes: [u8; 16] = rand::random();
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        Self::write_all(&mut self.stream, request.as_bytes()).await?;
        let head_end = loop {
            if let Some(pos) = memchr::memmem::find(&self.rbuf[..self.end], b"\r\n\r\n") {
                break pos + 4;
            }
            if self.end >= MAX_HEAD {
                return Err(WireError::Handshake("response head too large".into()));
            }
            if self.end == self.rbuf.len() {
                self.rbuf.resize(self.rbuf.len() * 2, 0);
            }
            let n = self.read_into(self.end, self.rbuf.len()).await?;
            if n == 0 {
                return Err(WireError::Handshake(
                    "connection closed during the handshake".into(),
                ));
            }
            self.end += n;
        };
        let head = String::from_utf8_lossy(&self.rbuf[..head_end]).into_owned();
        let status = parse_status(&head)?;
        if status != 101 {
            let body = self.refusal_body(&head, head_end).await;
            return Err(WireError::Refused { status, body });
        }
        let accept = header(&head, "sec-websocket-accept")
            .ok_or_else(|| WireError::Handshake("no Sec-WebSocket-Accept".into()))?;
        if accept != accept_key(&key) {
            return Err(WireError::Handshake("wrong Sec-WebSocket-Accept".into()));
        }
        // Whatever followed the head is already frame data.
        self.start = head_end;
        Ok(())
    }

    /// Reads the body of a refused upgrade (bounded by Content-Length and 4 KiB) for the
    /// error message; best effort.
    async fn refusal_body(&mut self, head: &str, head_end: usize) -> String {
        let length = header(head, "content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(4096);
        let wanted = head_end + length;
        if self.rbuf.len() < wanted {
            self.rbuf.resize(wanted, 0);
        }
        while self.end < wanted {
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                self.read_into(self.end, wanted),
            )
            .await;
            match read {
                Ok(Ok(n)) if n > 0 => self.end += n,
                _ => break,
            }
        }
        String::from_utf8_lossy(&self.rbuf[head_end..self.end.min(wanted)]).into_owned()
    }

    /// Waits for more bytes from the server. Cancel-safe: the only awaits are one `read` or
    /// one wait for readiness, and the buffer bookkeeping before them can be repeated
    /// harmlessly.
    pub async fn fill(&mut self) -> Result<(), WireError> {
        self.make_room();
        let n = if self.stamped {
            self.read_stamped().await?
        } else {
            self.read_into(self.end, self.rbuf.len()).await?
        };
        if n == 0 {
            return Err(WireError::Eof);
        }
        self.end += n;
        Ok(())
    }

    /// Has the kernel stamp each segment it receives on this connection with its arrival time
    /// (`SO_TIMESTAMPNS`); every later [`WsConn::fill`] then records when the last segment it
    /// took arrived ([`WsConn::arrived_wall_ns`]). That is when the server's bytes reached this
    /// machine's socket, before the generator got round to reading them: a latency measured
    /// to it leaves out the generator's own delays, which a busy generator thread adds to
    /// everything it reads. When no socket of the machine had asked before, the kernel
    /// switches stamping on a moment later, so the first segments may come without a stamp
    /// (the generator asks at connect, long before it measures).
    pub fn stamp_arrivals(&mut self) -> Result<(), WireError> {
        nix::sys::socket::setsockopt(
            self.stream.get_ref(),
            nix::sys::socket::sockopt::ReceiveTimestampns,
            &true,
        )
        .map_err(std::io::Error::from)?;
        self.stamped = true;
        Ok(())
    }

    /// Wall-clock nanoseconds at which the last segment taken by the latest
    /// [`WsConn::fill`] reached the socket, if stamped: every frame completed by that read
    /// had arrived by then. `None` when that read had no stamp.
    pub fn arrived_wall_ns(&self) -> Option<u64> {
        (self.arrived_wall_ns != 0).then_some(self.arrived_wall_ns)
    }

    /// One `recvmsg` once the socket is readable, keeping its timestamp.
    async fn read_stamped(&mut self) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd as _;

        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

        /// Room for one `SCM_TIMESTAMPNS` message (`CMSG_SPACE(16)` is 32 bytes), aligned
        /// as a `cmsghdr` must be.
        #[repr(C, align(8))]
        struct ControlBuffer([u8; 64]);

        let arrived = &mut self.arrived_wall_ns;
        read_when_ready(
            &mut self.stream,
            &mut self.rbuf[self.end..],
            |stream, buf| {
                // Segments queued before the stamps were asked for carry none.
                *arrived = 0;
                let mut control = ControlBuffer([0; 64]);
                let mut iov = [std::io::IoSliceMut::new(buf)];
                let msg = recvmsg::<()>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut control.0),
                    MsgFlags::empty(),
                )?;
                for cmsg in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmTimestampns(at) = cmsg {
                        let ns = at.tv_sec() as u64 * 1_000_000_000 + at.tv_nsec() as u64;
                        *arrived = ns;
                    }
                }
                Ok(msg.bytes)
            },
        )
        .await
    }

    /// Makes sure there is free space after `end`, enough for the frame being parsed.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.rbuf.len() > SHRINK_ABOVE && self.need <= INITIAL_READ_BUF {
                self.rbuf = vec![0; INITIAL_READ_BUF];
            }
        }
        let wanted = self.need.max(1);
        if self.rbuf.len() - self.start < wanted || self.end == self.rbuf.len() {
            self.rbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.rbuf.len() < wanted {
            self.rbuf.resize(wanted.next_power_of_two(), 0);
        } else if self.end == self.rbuf.len() {
            self.rbuf.resize(self.rbuf.len() * 2, 0);
        }
    }

    /// The next complete data message in the buffer, or `None` when [`WsConn::fill`] must be
    /// called first. Pings are answered (the pong is queued; call [`WsConn::flush`]), pongs are
    /// skipped, and a close frame is answered and returned as [`WireError::Closed`].
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, WireError> {
        if self.frag_ready {
            self.frag.clear();
            self.frag_ready = false;
        }
        loop {
            match self.parse_one()? {
                Parsed::NeedMore => return Ok(None),
                Parsed::Consumed => continue,
                Parsed::Data { opcode, from, to } => {
                    return Ok(Some(Frame {
                        opcode,
                        payload: &self.rbuf[from..to],
                    }));
                }
                Parsed::Assembled { opcode } => {
                    self.frag_ready = true;
                    return Ok(Some(Frame {
                        opcode,
                        payload: &self.frag,
                    }));
                }
            }
        }
    }

    fn parse_one(&mut self) -> Result<Parsed, WireError> {
        let buf = &self.rbuf[self.start..self.end];
        if buf.len() < 2 {
            self.need = 2;
            return Ok(Parsed::NeedMore);
        }
        let (b0, b1) = (buf[0], buf[1]);
        if b0 & 0x70 != 0 {
            return Err(WireError::Protocol(
                "reserved bits set (no extension agreed)",
            ));
        }
        if b1 & 0x80 != 0 {
            return Err(WireError::Protocol("server frames must not be masked"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        let (header_len, len) = match b1 & 0x7f {
            126 => {
                if buf.len() < 4 {
                    self.need = 4;
                    return Ok(Parsed::NeedMore);
                }
                (4, u64::from(u16::from_be_bytes([buf[2], buf[3]])))
            }
            127 => {
                if buf.len() < 10 {
                    self.need = 10;
                    return Ok(Parsed::NeedMore);
                }
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&buf[2..10]);
                (10, u64::from_be_bytes(bytes))
            }
            short => (2, u64::from(short)),
        };
        if len > MAX_MESSAGE as u64 {
            return Err(WireError::Protocol("frame too large"));
        }
        let total = header_len + len as usize;
        if buf.len() < total {
            self.need = total;
            return Ok(Parsed::NeedMore);
        }
        self.need = 0;
        let from = self.start + header_len;
        let to = self.start + total;
        self.start = to;
        match opcode {
            OP_TEXT | OP_BINARY => {
                let kind = if opcode == OP_TEXT {
                    Opcode::Text
                } else {
                    Opcode::Binary
                };
                if self.frag_opcode.is_some() {
                    return Err(WireError::Protocol(
                        "data frame inside a fragmented message",
                    ));
                }
                if fin {
                    return Ok(Parsed::Data {
                        opcode: kind,
                        from,
                        to,
                    });
                }
                self.frag_opcode = Some(kind);
                self.frag.clear();
                self.frag.extend_from_slice(&self.rbuf[from..to]);
                Ok(Parsed::Consumed)
            }
            OP_CONTINUATION => {
                let Some(kind) = self.frag_opcode else {
                    return Err(WireError::Protocol("continuation without a start"));
                };
                if self.frag.len() + (to - from) > MAX_MESSAGE {
                    return Err(WireError::Protocol("message too large"));
                }
                self.frag.extend_from_slice(&self.rbuf[from..to]);
                if fin {
                    self.frag_opcode = None;
                    return Ok(Parsed::Assembled { opcode: kind });
                }
                Ok(Parsed::Consumed)
            }
            OP_PING | OP_PONG | OP_CLOSE => {
                if !fin || len > 125 {
                    return Err(WireError::Protocol("bad control frame"));
                }
                let mut body = [0u8; 125];
                let body = &mut body[..to - from];
                body.copy_from_slice(&self.rbuf[from..to]);
                match opcode {
                    OP_PING => self.queue_frame(OP_PONG, body),
                    OP_PONG => {}
                    _ => {
                        let (code, reason) = if body.len() >= 2 {
                            (
                                u16::from_be_bytes([body[0], body[1]]),
                                String::from_utf8_lossy(&body[2..]).into_owned(),
                            )
                        } else {
                            (1005, String::new())
                        };
                        if !self.close_sent {
                            self.queue_frame(OP_CLOSE, &body[..body.len().min(2)]);
                            self.close_sent = true;
                        }
                        return Err(WireError::Closed { code, reason });
                    }
                }
                Ok(Parsed::Consumed)
            }
            _ => Err(WireError::Protocol("unknown opcode")),
        }
    }

    /// Queues a masked text frame; nothing is written until [`WsConn::flush`].
    pub fn queue_text(&mut self, payload: &[u8]) {
        self.queue_frame(OP_TEXT, payload);
    }

    fn queue_frame(&mut self, opcode: u8, payload: &[u8]) {
        let len = payload.len();
        self.wbuf.push(0x80 | opcode);
        if len < 126 {
            self.wbuf.push(0x80 | len as u8);
        } else if len <= usize::from(u16::MAX) {
            self.wbuf.push(0x80 | 126);
            self.wbuf.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.wbuf.push(0x80 | 127);
            self.wbuf.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let key = self.next_mask();
        self.wbuf.extend_from_slice(&key);
        let body_start = self.wbuf.len();
        self.wbuf.extend_from_slice(payload);
        for (i, byte) in self.wbuf[body_start..].iter_mut().enumerate() {
            *byte ^= key[i & 3];
        }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.mask_state = x;
        (x as u32).to_le_bytes()
    }

    /// Whether frames (data, pongs, a close reply) wait to be written.
    pub fn has_pending_writes(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// Writes every queued frame.
    pub async fn flush(&mut self) -> Result<(), WireError> {
        if !self.wbuf.is_empty() {
            Self::write_all(&mut self.stream, &self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Sends a close frame (1000) if none was sent yet and shuts the write side; best effort.
    pub async fn close(&mut self) {
        if !self.close_sent {
            self.queue_frame(OP_CLOSE, &1000u16.to_be_bytes());
            self.close_sent = true;
        }
        let _ = self.flush().await;
        let _ = self.stream.get_ref().shutdown(std::net::Shutdown::Write);
    }

    /// The local address (for checking the source-address spread).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.get_ref().local_addr()
    }
}

/// One read into `buf` by `read`, once the socket is readable. A read shorter than `buf` left
/// the socket empty: its readiness is cleared there, so the next read waits for new bytes
/// instead of spending a system call on `EAGAIN` (tokio clears it only on `EAGAIN`).
async fn read_when_ready(
    stream: &mut AsyncFd<std::net::TcpStream>,
    buf: &mut [u8],
    mut read: impl FnMut(&mut std::net::TcpStream, &mut [u8]) -> std::io::Result<usize>,
) -> std::io::Result<usize> {
    let wanted = buf.len();
    loop {
        let mut ready = stream.readable_mut().await?;
        match ready.try_io(|stream| read(stream.get_mut(), buf)) {
            Ok(result) => {
                if matches!(result, Ok(n) if n > 0 && n < wanted) {
                    ready.clear_ready();
                }
                return result;
            }
            Err(_would_block) => continue,
        }
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

fn parse_status(head: &str) -> Result<u16, WireError> {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next().and_then(|s| s.parse().ok())) {
        (Some(version), Some(status)) if version.starts_with("HTTP/1.") => Ok(status),
        _ => Err(WireError::Handshake(format!("bad status line {line:?}"))),
    }
}

/// The value of header `name` (lower-case) in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: our client side and the raw server side.
    async fn pair() -> (WsConn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (
            WsConn::from_stream(client.unwrap(), 42).unwrap(),
            server.unwrap().0,
        )
    }

    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 65535 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// Reads every frame currently obtainable, filling as needed until `count` arrived.
    async fn collect(conn: &mut WsConn, count: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while got.len() < count {
            while let Some(frame) = conn.next_frame().unwrap() {
                got.push(frame.payload.to_vec());
            }
            if got.len() < count {
                conn.fill().await.unwrap();
            }
        }
        got
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn headers_are_found_case_insensitively() {
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nsec-websocket-accept: abc \r\n\r\n";
        assert_eq!(parse_status(head).unwrap(), 101);
        assert_eq!(header(head, "sec-websocket-accept"), Some("abc"));
        assert_eq!(header(head, "content-length"), None);
        assert!(parse_status("garbage").is_err());
    }

    use crate::payload::wall_ns;

    #[tokio::test]
    async fn stamped_reads_know_when_the_bytes_arrived_not_when_they_were_read() {
        let (mut conn, mut server) = pair().await;
        conn.stamp_arrivals().unwrap();
        assert_eq!(conn.arrived_wall_ns(), None);
        // The kernel starts stamping a moment after the first socket of the machine asks
        // (a deferred switch): wait until a read comes stamped.
        for attempt in 0.. {
            server
                .write_all(&server_frame(true, OP_TEXT, b"warm-up"))
                .await
                .unwrap();
            assert_eq!(collect(&mut conn, 1).await, [b"warm-up".to_vec()]);
            if conn.arrived_wall_ns().is_some() {
                break;
            }
            assert!(attempt < 100, "the kernel never stamped a read");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let before_send = wall_ns();
        server
            .write_all(&server_frame(true, OP_TEXT, b"early"))
            .await
            .unwrap();
        // The bytes wait in the socket while this client is busy elsewhere.
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        let before_read = wall_ns();
        assert_eq!(collect(&mut conn, 1).await, [b"early".to_vec()]);
        let arrived = conn.arrived_wall_ns().expect("a stamped read");
        assert!(arrived >= before_send, "{arrived} < {before_send}");
        assert!(
            arrived + 50_000_000 <= before_read,
            "arrived {} ms before the read, not about 60",
            before_read.saturating_sub(arrived) / 1_000_000
        );
        // The next read's stamp is that of its own bytes.
        server
            .write_all(&server_frame(true, OP_TEXT, b"late"))
            .await
            .unwrap();
        assert_eq!(collect(&mut conn, 1).await, [b"late".to_vec()]);
        assert!(conn.arrived_wall_ns().unwrap() >= before_read);
    }

    #[tokio::test]
    async fn several_frames_in_one_read() {
        let (mut conn, mut server) = pair().await;
        let mut bytes = server_frame(true, OP_TEXT, b"one");
        bytes.extend(server_frame(true, OP_TEXT, b"two"));
        bytes.extend(server_frame(true, OP_BINARY, b"three"));
        server.write_all(&bytes).await.unwrap();
        let got = collect(&mut conn, 3).await;
        assert_eq!(
            got,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        assert!(conn.next_frame().unwrap().is_none());
    }

    #[tokio::test]
    async fn frames_split_across_reads_byte_by_byte() {
        let (mut conn, mut server) = pair().await;
        let big = vec![b'a'; 70_000];
        let mut bytes = server_frame(true, OP_TEXT, b"small");
        bytes.extend(server_frame(true, OP_TEXT, &vec![b'm'; 300]));
        bytes.extend(server_frame(true, OP_TEXT, &big));
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(1) {
                server.write_all(chunk).await.unwrap();
                server.flush().await.unwrap();
            }
            server
        });
        let got = collect(&mut conn, 3).await;
        assert_eq!(got[0], b"small");
        assert_eq!(got[1], vec![b'm'; 300]);
        assert_eq!(got[2], big);
        let _server = writer.await.unwrap();
    }

    #[tokio::test]
    async fn the_buffer_is_reused_and_shrinks_after_a_large_frame() {
        let (mut conn, mut server) = pair().await;
        server
            .write_all(&server_frame(true, OP_TEXT, &vec![b'z'; 200_000]))
            .await
            .unwrap();
        let got = collect(&mut conn, 1).await;
        assert_eq!(got[0].len(), 200_000);
        server
            .write_all(&server_frame(true, OP_TEXT, b"after"))
            .await
            .unwrap();
        let got = collect(&mut conn, 1).await;
        assert_eq!(got[0], b"after");
        assert_eq!(conn.rbuf.len(), INITIAL_READ_BUF);
    }

    #[tokio::test]
    async fn fragments_are_reassembled_and_pings_answered_in_between() {
        let (mut conn, mut server) = pair().await;
        let mut bytes = server_frame(false, OP_TEXT, b"hel");
        bytes.extend(server_frame(true, OP_PING, b"p!"));
        bytes.extend(server_frame(false, OP_CONTINUATION, b"lo "));
        bytes.extend(server_frame(true, OP_CONTINUATION, b"world"));
        bytes.extend(server_frame(true, OP_TEXT, b"next"));
        server.write_all(&bytes).await.unwrap();
        let got = collect(&mut conn, 2).await;
        assert_eq!(got, vec![b"hello world".to_vec(), b"next".to_vec()]);
        assert!(conn.has_pending_writes());
        conn.flush().await.unwrap();
        let mut pong = [0u8; 8];
        server.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong[0], 0x80 | OP_PONG);
        assert_eq!(pong[1], 0x80 | 2);
        let key = &pong[2..6];
        assert_eq!([pong[6] ^ key[0], pong[7] ^ key[1]], *b"p!");
    }

    #[tokio::test]
    async fn close_frames_end_the_connection_with_their_code() {
        let (mut conn, mut server) = pair().await;
        let mut body = 1013u16.to_be_bytes().to_vec();
        body.extend_from_slice(b"too slow");
        server
            .write_all(&server_frame(true, OP_CLOSE, &body))
            .await
            .unwrap();
        conn.fill().await.unwrap();
        match conn.next_frame() {
            Err(WireError::Closed { code, reason }) => {
                assert_eq!(code, 1013);
                assert_eq!(reason, "too slow");
            }
            other => panic!("expected close, got {other:?}"),
        }
        drop(server);
    }

    #[tokio::test]
    async fn masked_server_frames_are_refused() {
        let (mut conn, mut server) = pair().await;
        server
            .write_all(&[0x81, 0x81, 1, 2, 3, 4, b'x'])
            .await
            .unwrap();
        conn.fill().await.unwrap();
        assert!(matches!(conn.next_frame(), Err(WireError::Protocol(_))));
    }

    #[tokio::test]
    async fn client_frames_are_masked_and_decodable() {
        let (mut conn, mut server) = pair().await;
        let long = vec![b'q'; 300];
        conn.queue_text(b"hi");
        conn.queue_text(&long);
        conn.flush().await.unwrap();
        let mut head = [0u8; 8];
        server.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x81);
        assert_eq!(head[1], 0x82);
        let key = [head[2], head[3], head[4], head[5]];
        assert_eq!([head[6] ^ key[0], head[7] ^ key[1]], *b"hi");
        let mut second = vec![0u8; 4 + 4 + 300];
        server.read_exact(&mut second).await.unwrap();
        assert_eq!(second[0], 0x81);
        assert_eq!(second[1], 0x80 | 126);
        assert_eq!(u16::from_be_bytes([second[2], second[3]]), 300);
        let key = [second[4], second[5], second[6], second[7]];
        let body: Vec<u8> = second[8..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i & 3])
            .collect();
        assert_eq!(body, long);
    }

    #[tokio::test]
    async fn handshake_checks_the_accept_key() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            while memchr::memmem::find(&buf[..len], b"\r\n\r\n").is_none() {
                len += socket.read(&mut buf[len..]).await.unwrap();
            }
            let request = String::from_utf8_lossy(&buf[..len]).into_owned();
            assert!(request.starts_with("GET /ws?room=a HTTP/1.1\r\n"));
            let key = header(&format!("X\r\n{request}"), "sec-websocket-key")
                .unwrap()
                .to_string();
            let mut reply = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                accept_key(&key)
            )
            .into_bytes();
            // The first frame arrives in the same segment as the response head.
            reply.extend(server_frame(true, OP_TEXT, b"welcome"));
            socket.write_all(&reply).await.unwrap();
            socket
        });
        let mut conn = WsConn::connect(addr, Some("127.0.0.1".parse().unwrap()), "/ws?room=a", "")
            .await
            .unwrap();
        let got = collect(&mut conn, 1).await;
        assert_eq!(got[0], b"welcome");
        let _socket = server.await.unwrap();
    }

    #[tokio::test]
    async fn refused_upgrades_report_status_and_body() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 2048];
            let _ = socket.read(&mut buf).await.unwrap();
            let body = r#"{"error":{"code":"unauthorized","message":"missing token"}}"#;
            let reply = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(reply.as_bytes()).await.unwrap();
        });
        match WsConn::connect(addr, None, "/ws", "").await {
            Err(WireError::Refused { status, body }) => {
                assert_eq!(status, 401);
                assert!(body.contains("missing token"), "{body}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
