//! Moving bytes from one socket to another through a pipe with splice(2),
//! so a large request body never passes through user space: the kernel
//! hands the received pages to the sending socket instead of copying them
//! out to us and back in.
//!
//! Neither socket is waited on: what the destination has no room for yet
//! stays in the pipe, which the caller then keeps ([`Held`]) and sends on
//! with [`flush`] once the destination is writable again.

use std::cell::RefCell;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A pipe's capacity: a quarter of a MiB moves in one splice pair, where the
/// default 64 KiB would take four. Unprivileged processes may ask up to
/// `/proc/sys/fs/pipe-max-size` (1 MiB by default).
const PIPE_SIZE: usize = 256 * 1024;

/// One kernel pipe, reused by its thread for every splice it does.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe not yet sent on.
    held: usize,
    capacity: usize,
}

thread_local! {
    /// Each worker keeps its pipe: two descriptors, not two system calls per body.
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

/// Which side of a splice failed.
#[derive(Debug)]
pub enum SpliceError {
    /// Reading the source, or making the pipe; `Ok(0)` from the source is
    /// reported as `UnexpectedEof`.
    From(io::Error),
    /// Writing the destination.
    To(io::Error),
}

/// Bytes taken from the source that the destination had no room for yet,
/// in a pipe of their own: they go before anything else sent after them.
pub struct Held(Pipe);

/// Takes up to `len` bytes from `from` (non-blocking) towards `to` (non-blocking)
/// and says how many it took: fewer when `from` has nothing more for now, or
/// `to` has no room. Then `held` keeps what `to` has not taken yet; `held`
/// must be empty when called (see [`flush`]).
pub fn splice(
    from: &TcpStream,
    to: &TcpStream,
    len: u64,
    held: &mut Option<Held>,
) -> Result<u64, SpliceError> {
    debug_assert!(held.is_none(), "what is held goes first");
    let mut pipe = match PIPE.with(|p| p.borrow_mut().take()) {
        Some(pipe) => pipe,
        None => Pipe::new().map_err(SpliceError::From)?,
    };
    let moved = pipe.relay(from.as_raw_fd(), to.as_raw_fd(), len);
    match pipe.held {
        0 => give_back(pipe),
        // Failed: the pipe goes with its bytes.
        _ if moved.is_err() => {}
        _ => *held = Some(Held(pipe)),
    }
    moved
}

/// Sends on what `held` keeps, as far as `to` takes it: true once all is sent.
pub fn flush(held: &mut Option<Held>, to: &TcpStream) -> io::Result<bool> {
    let Some(Held(pipe)) = held else {
        return Ok(true);
    };
    if !pipe.drain(to.as_raw_fd())? {
        return Ok(false);
    }
    if let Some(Held(pipe)) = held.take() {
        give_back(pipe);
    }
    Ok(true)
}

/// An empty pipe back to its thread for the next splice (one is enough).
fn give_back(pipe: Pipe) {
    PIPE.with(|p| {
        p.borrow_mut().get_or_insert(pipe);
    });
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just opened and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe we own. A refusal keeps the default size.
        let resized = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        // SAFETY: F_GETPIPE_SZ reads the size the pipe actually has.
        let capacity = match resized {
            n if n > 0 => n as usize,
            _ => unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) }.max(4096) as usize,
        };
        Ok(Pipe {
            read,
            write,
            held: 0,
            capacity,
        })
    }

    /// Fills the pipe from `from` and empties it into `to`, in turns, until
    /// `len` bytes are taken, `from` has no more for now or `to` no room.
    fn relay(&mut self, from: RawFd, to: RawFd, len: u64) -> Result<u64, SpliceError> {
        let mut moved = 0;
        while moved < len {
            let want = (len - moved).min(self.capacity as u64) as usize;
            let n = match splice_once(from, self.write.as_raw_fd(), want) {
                Ok(0) => return Err(SpliceError::From(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(SpliceError::From(e)),
            };
            self.held += n;
            moved += n as u64;
            if !self.drain(to).map_err(SpliceError::To)? {
                break;
            }
        }
        Ok(moved)
    }

    /// Empties the pipe into `to` as far as it takes: true once empty.
    fn drain(&mut self, to: RawFd) -> io::Result<bool> {
        while self.held > 0 {
            match splice_once(self.read.as_raw_fd(), to, self.held) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(sent) => self.held -= sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// One splice(2), retried when a signal interrupts it.
fn splice_once(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: plain descriptors and null offsets (sockets and pipes have none).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
