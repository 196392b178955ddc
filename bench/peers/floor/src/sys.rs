//! The few system calls the floor makes, as safe functions returning `io::Result`.

use std::io;
use std::mem::size_of;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_len(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn set_int_opt(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the option value is a live c_int and its size is passed along.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    check(ret).map(drop)
}

/// A non-blocking TCP socket listening on 127.0.0.1:`port` with the given backlog.
pub(crate) fn listen_tcp(port: u16, backlog: i32) -> io::Result<i32> {
    // SAFETY: plain socket creation.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a valid sockaddr_in and its size is passed along.
    check(unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    // SAFETY: `fd` is a bound socket.
    check(unsafe { libc::listen(fd, backlog) })?;
    Ok(fd)
}

/// Accepts one connection, non-blocking, with TCP_NODELAY on.
pub(crate) fn accept(listen_fd: i32) -> io::Result<i32> {
    // SAFETY: null address pointers are allowed when the peer address is not wanted.
    let fd = check(unsafe {
        libc::accept4(
            listen_fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    let _ = set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    Ok(fd)
}

pub(crate) fn read(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    check_len(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
}

/// `send` without SIGPIPE.
pub(crate) fn send(fd: i32, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length.
    check_len(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) })
}

pub(crate) fn close(fd: i32) {
    // SAFETY: the caller owns `fd` and forgets it.
    unsafe { libc::close(fd) };
}

pub(crate) fn epoll_create() -> io::Result<i32> {
    // SAFETY: plain epoll instance creation.
    check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
}

fn epoll_ctl(epfd: i32, op: i32, fd: i32, events: i32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: events as u32,
        u64: token,
    };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call.
    check(unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) }).map(drop)
}

/// Watches `fd` (level-triggered) for `events`, reporting it as `token`.
pub(crate) fn epoll_add(epfd: i32, fd: i32, events: i32, token: u64) -> io::Result<()> {
    epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, events, token)
}

/// Changes the events watched on a connection (whose token is its fd).
pub(crate) fn epoll_mod(epfd: i32, fd: i32, events: i32) -> io::Result<()> {
    epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, events, fd as u64)
}

pub(crate) fn epoll_del(epfd: i32, fd: i32) -> io::Result<()> {
    epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, 0, 0)
}

/// Waits for events (retrying on EINTR); returns how many of `events` were filled.
pub(crate) fn epoll_wait(epfd: i32, events: &mut [libc::epoll_event]) -> io::Result<usize> {
    loop {
        // SAFETY: `events` is valid for writes of its length.
        let ret = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, -1) };
        match check_len(ret as libc::ssize_t) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
