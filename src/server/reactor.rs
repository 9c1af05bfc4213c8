//! A worker's epoll set.
//!
//! An event goes to one waiting thread of the set, so the thread that wakes
//! is the thread that serves (no hand-off), and an idle keep-alive connection
//! costs a registry entry, not a thread. Client sockets and pooled upstream
//! connections are registered edge-triggered for life (see `parked` for how
//! an event for a busy socket is kept); one-off waits (signals, timers)
//! are registered one-shot and re-armed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const ONE_SHOT: libc::c_int = libc::EPOLLIN | libc::EPOLLONESHOT;
const HUNG_UP: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;

/// A readiness event.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub token: u64,
    /// The peer has closed its side (or the socket failed): once what is
    /// buffered has been read, reads return the end. Edge-triggered sockets
    /// must know it, since a read that leaves nothing behind does not say so.
    pub hung_up: bool,
}

pub struct Reactor {
    epoll: OwnedFd,
}

impl Reactor {
    pub fn new() -> io::Result<Reactor> {
        // SAFETY: plain syscall; the fd is owned from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Reactor {
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches a listening socket that every worker's set watches: readable
    /// as long as connections are pending, and an arrival wakes one waiting
    /// worker, not all of them.
    pub fn add_listener(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(
            libc::EPOLL_CTL_ADD,
            fd,
            token,
            libc::EPOLLIN | libc::EPOLLEXCLUSIVE,
        )
    }

    /// Watches `fd` for one readable event carrying `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, ONE_SHOT)
    }

    /// Watches a socket for its whole life, edge-triggered: every arrival
    /// of bytes (or of the peer's FIN) reports `token` once, with no
    /// re-arming between waits; so does a full socket having room again
    /// (for a response waiting to be written) and a new connection's
    /// handshake ending.
    pub fn add_socket(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    /// Re-arms a registered `fd` for its next readable event.
    pub fn rearm(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, ONE_SHOT)
    }

    /// Re-arms `fd`, or adds it if this set has not seen it yet (an upstream
    /// connection's first wait).
    pub fn watch(&self, fd: RawFd, token: u64) -> io::Result<()> {
        match self.rearm(fd, token) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.add(fd, token),
            other => other,
        }
    }

    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL.
        let rc = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: libc::c_int) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: event is a valid epoll_event for the duration of the call.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Blocks until registered sockets are ready and returns what
    /// happened to them (at most `events.len()`), or nothing once
    /// `timeout_ms` passes (-1: never).
    pub fn wait<'e>(
        &self,
        events: &'e mut [libc::epoll_event],
        timeout_ms: i32,
    ) -> io::Result<impl ExactSizeIterator<Item = Ready> + 'e> {
        loop {
            // SAFETY: `events` has room for `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    timeout_ms,
                )
            };
            if n >= 0 {
                return Ok(events[..n as usize].iter().map(|e| Ready {
                    token: e.u64,
                    hung_up: e.events & HUNG_UP != 0,
                }));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
