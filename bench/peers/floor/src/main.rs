//! The floor: a minimal single-threaded epoll WebSocket room broadcaster, the yardstick for
//! fan-out on this machine.
//!
//! `floor-peer PORT [batched|uring]`: `GET /ws?room=NAME` upgrades to WebSocket; every text
//! message is sent, as one server frame built once in a shared buffer, to every connection of the
//! room (the sender included). `batched` collects all messages read in one epoll wake-up per room
//! and gives each connection of the room one write of all of them. `uring` makes each message's
//! sends in one io_uring submission (`MSG_DONTWAIT`, so each completes during it) instead of a
//! `send` each. Writes are non-blocking; what a socket does not take is kept per connection and
//! flushed on `EPOLLOUT`, never dropped.

mod sys;

use std::collections::HashMap;
use std::io;

use base64::Engine;
use sha1::{Digest, Sha1};

/// Events taken from one `epoll_wait`.
const MAX_EVENTS: usize = 1024;
/// Largest client frame payload accepted; a larger one closes the connection.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest handshake request accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Bytes read from a socket at once.
const READ_CHUNK: usize = 64 * 1024;
/// epoll token of the listening socket (connections use their fd).
const LISTENER: u64 = u64::MAX;
/// `Conn::room` before the handshake is done.
const NO_ROOM: u32 = u32::MAX;
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// One connection, indexed by its fd. Idle, it owns no heap memory.
#[derive(Default)]
struct Conn {
    /// Bytes of an incomplete request or frame, carried to the next read.
    partial: Vec<u8>,
    /// Bytes the socket has not taken yet, sent on `EPOLLOUT` before anything newer.
    unsent: Vec<u8>,
    room: u32,
    /// Position in the room's member list.
    slot: u32,
    open: bool,
    /// Failed or closing: skipped from now on, closed at the end of the wake-up.
    dead: bool,
}

#[derive(Default)]
struct Room {
    members: Vec<i32>,
    /// `batched`: frames of this wake-up for this room.
    batch: Vec<u8>,
}

/// Connections, plus the list of those to close at the end of the wake-up.
struct Conns {
    epfd: i32,
    by_fd: Vec<Conn>,
    dying: Vec<i32>,
}

impl Conns {
    fn kill(&mut self, fd: i32) {
        let conn = &mut self.by_fd[fd as usize];
        if !conn.dead {
            conn.dead = true;
            self.dying.push(fd);
        }
    }

    /// Writes `bytes` to `fd` now, or queues what the socket does not take.
    fn send(&mut self, fd: i32, bytes: &[u8]) {
        let conn = &mut self.by_fd[fd as usize];
        if conn.dead {
            return;
        }
        if !conn.unsent.is_empty() {
            conn.unsent.extend_from_slice(bytes);
            return;
        }
        let result = sys::send(fd, bytes);
        self.settle(fd, bytes, result);
    }

    /// Takes a send's `result` for `bytes` to `fd`: what the socket did not take is queued
    /// (and `EPOLLOUT` watched for), a failed connection is killed.
    fn settle(&mut self, fd: i32, bytes: &[u8], result: io::Result<usize>) {
        let written = match result {
            Ok(n) if n == bytes.len() => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => return self.kill(fd),
        };
        self.by_fd[fd as usize]
            .unsent
            .extend_from_slice(&bytes[written..]);
        if sys::epoll_mod(self.epfd, fd, libc::EPOLLIN | libc::EPOLLOUT).is_err() {
            self.kill(fd);
        }
    }

    /// On `EPOLLOUT`: sends what was queued; stops watching for writability once all is out.
    fn flush(&mut self, fd: i32) {
        let conn = &mut self.by_fd[fd as usize];
        match sys::send(fd, &conn.unsent) {
            Ok(n) if n == conn.unsent.len() => {
                conn.unsent = Vec::new();
                if sys::epoll_mod(self.epfd, fd, libc::EPOLLIN).is_err() {
                    self.kill(fd);
                }
            }
            Ok(n) => {
                conn.unsent.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.kill(fd),
        }
    }
}

struct Server {
    /// `uring`: the ring each message's sends are submitted through.
    ring: Option<io_uring::IoUring>,
    listen_fd: i32,
    listening: bool,
    batched: bool,
    conns: Conns,
    rooms: Vec<Room>,
    room_ids: HashMap<Vec<u8>, u32>,
    /// `batched`: rooms with frames waiting in `Room::batch`.
    dirty: Vec<u32>,
    /// Read buffer shared by all connections.
    input: Vec<u8>,
    /// The one server frame being broadcast.
    frame: Vec<u8>,
}

/// What the frame parser found at the head of a buffer.
enum Frame {
    /// Not all of it is there yet.
    Incomplete,
    /// Something this server does not accept: close the connection.
    Invalid,
    /// A whole frame: opcode, payload range (still masked), mask, total length.
    Whole {
        opcode: u8,
        payload: std::ops::Range<usize>,
        mask: [u8; 4],
        len: usize,
    },
}

fn parse_frame(buf: &[u8]) -> Frame {
    if buf.len() < 2 {
        return Frame::Incomplete;
    }
    let (b0, b1) = (buf[0], buf[1]);
    // Unfragmented and masked only; no extensions.
    if b0 & 0x80 == 0 || b0 & 0x70 != 0 || b1 & 0x80 == 0 {
        return Frame::Invalid;
    }
    let (len, head) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let n = u64::from_be_bytes(buf[2..10].try_into().unwrap());
            (usize::try_from(n).unwrap_or(usize::MAX), 10)
        }
        126 | 127 => return Frame::Incomplete,
        n => (n as usize, 2),
    };
    if len > MAX_PAYLOAD {
        return Frame::Invalid;
    }
    if buf.len() < head + 4 + len {
        return Frame::Incomplete;
    }
    let mask = buf[head..head + 4].try_into().unwrap();
    Frame::Whole {
        opcode: b0 & 0x0f,
        payload: head + 4..head + 4 + len,
        mask,
        len: head + 4 + len,
    }
}

/// Appends a server (unmasked) frame to `out`, unmasking `payload` with `mask` on the way.
fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// The room named in `GET /ws?room=NAME HTTP/1.1` and the Sec-WebSocket-Key, if the request
/// is a WebSocket upgrade on /ws.
fn parse_request(req: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut lines = req
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let target = lines.next()?.strip_prefix(b"GET ")?;
    let target = &target[..target.iter().position(|&b| b == b' ')?];
    let query = match target.strip_prefix(b"/ws")? {
        [] => &[][..],
        [b'?', query @ ..] => query,
        _ => return None,
    };
    let room = query
        .split(|&b| b == b'&')
        .find_map(|kv| kv.strip_prefix(b"room="))
        .unwrap_or_default();
    let key = lines.find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = line.split_at(colon);
        name.eq_ignore_ascii_case(b"sec-websocket-key")
            .then(|| value[1..].trim_ascii())
    })?;
    Some((room, key))
}

fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

impl Server {
    fn new(port: u16, batched: bool) -> io::Result<Self> {
        let listen_fd = sys::listen_tcp(port, 4096)?;
        let epfd = sys::epoll_create()?;
        sys::epoll_add(epfd, listen_fd, libc::EPOLLIN, LISTENER)?;
        Ok(Server {
            ring: None,
            listen_fd,
            listening: true,
            batched,
            conns: Conns {
                epfd,
                by_fd: Vec::new(),
                dying: Vec::new(),
            },
            rooms: Vec::new(),
            room_ids: HashMap::new(),
            dirty: Vec::new(),
            input: vec![0; MAX_REQUEST + MAX_PAYLOAD + 14 + READ_CHUNK],
            frame: Vec::with_capacity(MAX_PAYLOAD + 14),
        })
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        loop {
            let n = sys::epoll_wait(self.conns.epfd, &mut events)?;
            for ev in &events[..n] {
                let (token, flags) = (ev.u64, ev.events as i32);
                if token == LISTENER {
                    self.accept_all();
                    continue;
                }
                let fd = token as i32;
                if self.conns.by_fd[fd as usize].dead {
                    continue;
                }
                if flags & libc::EPOLLOUT != 0 {
                    self.conns.flush(fd);
                }
                if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
                    self.read(fd);
                }
            }
            if self.batched {
                self.send_batches();
            }
            self.close_dying();
        }
    }

    fn accept_all(&mut self) {
        loop {
            match sys::accept(self.listen_fd) {
                Ok(fd) => {
                    let i = fd as usize;
                    if self.conns.by_fd.len() <= i {
                        self.conns.by_fd.resize_with(i + 1, Conn::default);
                    }
                    self.conns.by_fd[i] = Conn {
                        room: NO_ROOM,
                        ..Conn::default()
                    };
                    if sys::epoll_add(self.conns.epfd, fd, libc::EPOLLIN, fd as u64).is_err() {
                        self.conns.kill(fd);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                    // Out of fds: stop watching the listener until a connection closes.
                    eprintln!("floor: accept: {e}; pausing accepts");
                    let _ = sys::epoll_del(self.conns.epfd, self.listen_fd);
                    self.listening = false;
                    return;
                }
                Err(_) => return,
            }
        }
    }

    fn read(&mut self, fd: i32) {
        let mut input = std::mem::take(&mut self.input);
        let conn = &mut self.conns.by_fd[fd as usize];
        let carried = conn.partial.len();
        input[..carried].copy_from_slice(&conn.partial);
        conn.partial = Vec::new();
        match sys::read(fd, &mut input[carried..carried + READ_CHUNK]) {
            Ok(0) => self.conns.kill(fd),
            Ok(n) => self.consume(fd, &input[..carried + n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.conns.by_fd[fd as usize].partial = input[..carried].to_vec();
            }
            Err(_) => self.conns.kill(fd),
        }
        self.input = input;
    }

    /// Handles the handshake and every whole frame in `data`; keeps the rest for the next read.
    fn consume(&mut self, fd: i32, data: &[u8]) {
        let mut at = 0;
        if !self.conns.by_fd[fd as usize].open {
            let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                if data.len() > MAX_REQUEST {
                    self.conns.kill(fd);
                } else {
                    self.conns.by_fd[fd as usize].partial = data.to_vec();
                }
                return;
            };
            at = end + 4;
            if !self.handshake(fd, &data[..at]) {
                return;
            }
        }
        while !self.conns.by_fd[fd as usize].dead {
            match parse_frame(&data[at..]) {
                Frame::Incomplete => {
                    if at < data.len() {
                        self.conns.by_fd[fd as usize].partial = data[at..].to_vec();
                    }
                    return;
                }
                Frame::Invalid => return self.conns.kill(fd),
                Frame::Whole {
                    opcode,
                    payload,
                    mask,
                    len,
                } => {
                    let payload = &data[at + payload.start..at + payload.end];
                    at += len;
                    match opcode {
                        0x1 => self.broadcast(fd, payload, mask),
                        0x9 | 0x8 => {
                            // Ping: pong with its payload. Close: echo it, then close.
                            self.frame.clear();
                            let reply = if opcode == 0x9 { 0xA } else { 0x8 };
                            push_frame(&mut self.frame, reply, payload, mask);
                            self.conns.send(fd, &self.frame);
                            if opcode == 0x8 {
                                self.conns.kill(fd);
                            }
                        }
                        _ => {} // pong, binary: ignored
                    }
                }
            }
        }
    }

    /// Answers the upgrade request and joins the room; false if the connection was refused.
    fn handshake(&mut self, fd: i32, request: &[u8]) -> bool {
        let Some((room, key)) = parse_request(request) else {
            self.conns
                .send(fd, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            self.conns.kill(fd);
            return false;
        };
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            accept_key(key)
        );
        let next_id = self.rooms.len() as u32;
        let id = *self.room_ids.entry(room.to_vec()).or_insert(next_id);
        if id == next_id {
            self.rooms.push(Room::default());
        }
        let members = &mut self.rooms[id as usize].members;
        let conn = &mut self.conns.by_fd[fd as usize];
        conn.open = true;
        conn.room = id;
        conn.slot = members.len() as u32;
        members.push(fd);
        self.conns.send(fd, response.as_bytes());
        true
    }

    fn broadcast(&mut self, fd: i32, payload: &[u8], mask: [u8; 4]) {
        let id = self.conns.by_fd[fd as usize].room;
        let room = &mut self.rooms[id as usize];
        if self.batched {
            if room.batch.is_empty() {
                self.dirty.push(id);
            }
            push_frame(&mut room.batch, 0x1, payload, mask);
            return;
        }
        self.frame.clear();
        push_frame(&mut self.frame, 0x1, payload, mask);
        if let Some(ring) = self.ring.as_mut() {
            return send_all_in_one_call(ring, &mut self.conns, &room.members, &self.frame);
        }
        for &member in &room.members {
            self.conns.send(member, &self.frame);
        }
    }

    /// `batched`: one write of the wake-up's frames to every connection of each room.
    fn send_batches(&mut self) {
        for id in self.dirty.drain(..) {
            let room = &mut self.rooms[id as usize];
            for &member in &room.members {
                self.conns.send(member, &room.batch);
            }
            room.batch.clear();
        }
    }

    fn close_dying(&mut self) {
        for fd in std::mem::take(&mut self.conns.dying) {
            let conn = std::mem::take(&mut self.conns.by_fd[fd as usize]);
            if conn.open {
                let members = &mut self.rooms[conn.room as usize].members;
                members.swap_remove(conn.slot as usize);
                if let Some(&moved) = members.get(conn.slot as usize) {
                    self.conns.by_fd[moved as usize].slot = conn.slot;
                }
            }
            sys::close(fd);
        }
        if !self.listening
            && sys::epoll_add(self.conns.epfd, self.listen_fd, libc::EPOLLIN, LISTENER).is_ok()
        {
            self.listening = true;
        }
    }
}

/// `uring`: `frame` to every connection of `members`, as one submission of sends (a full queue is
/// submitted first); each result is taken as a `send`'s would be.
fn send_all_in_one_call(
    ring: &mut io_uring::IoUring,
    conns: &mut Conns,
    members: &[i32],
    frame: &[u8],
) {
    let mut queued = 0;
    for &member in members {
        let conn = &conns.by_fd[member as usize];
        if conn.dead || !conn.unsent.is_empty() {
            // Behind earlier bytes: queued after them, as `send` does.
            conns.send(member, frame);
            continue;
        }
        if ring.submission().is_full() {
            complete(ring, conns, frame, queued);
            queued = 0;
        }
        let send = io_uring::opcode::Send::new(
            io_uring::types::Fd(member),
            frame.as_ptr(),
            frame.len() as u32,
        )
        .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        .build()
        .user_data(member as u64);
        // SAFETY: `frame` outlives the request: `complete` below waits for its result.
        unsafe { ring.submission().push(&send) }.expect("checked: not full");
        queued += 1;
    }
    complete(ring, conns, frame, queued);
}

/// Submits the `queued` sends of `frame` and waits for their results, each taken as a `send`'s
/// (`Conns::settle`).
fn complete(ring: &mut io_uring::IoUring, conns: &mut Conns, frame: &[u8], queued: usize) {
    if queued == 0 {
        return;
    }
    let mut seen = 0;
    while seen < queued {
        match ring.submit_and_wait(queued - seen) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("io_uring_enter: {e}"),
        }
        let results: Vec<(i32, i32)> = ring
            .completion()
            .map(|entry| (entry.user_data() as i32, entry.result()))
            .collect();
        seen += results.len();
        for (fd, result) in results {
            let result = if result >= 0 {
                Ok(result as usize)
            } else {
                Err(io::Error::from_raw_os_error(-result))
            };
            conns.settle(fd, frame, result);
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .and_then(|p| p.parse().ok())
        .expect("usage: floor-peer PORT [batched|uring]");
    let variant = args.next();
    let (batched, uring) = match variant.as_deref() {
        None => (false, false),
        Some("batched") => (true, false),
        Some("uring") => (false, true),
        Some(other) => panic!("unknown variant {other:?}; they are \"batched\" and \"uring\""),
    };
    let mut server = Server::new(port, batched).expect("listen");
    if uring {
        server.ring = Some(
            io_uring::IoUring::builder()
                .setup_single_issuer()
                .build(256)
                .expect("io_uring"),
        );
    }
    eprintln!(
        "floor peer ({}) listening on 127.0.0.1:{port}",
        variant.as_deref().unwrap_or("unbatched")
    );
    server.run().expect("epoll_wait");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc6455_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn request_parsing() {
        let req = b"GET /ws?x=1&room=abc HTTP/1.1\r\nHost: h\r\nsec-websocket-key: k== \r\n\r\n";
        assert_eq!(parse_request(req), Some((&b"abc"[..], &b"k=="[..])));
        assert_eq!(
            parse_request(b"GET /other HTTP/1.1\r\nSec-WebSocket-Key: k\r\n\r\n"),
            None
        );
    }
}
