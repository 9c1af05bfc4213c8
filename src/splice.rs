//! Moving bytes from one socket to another through a pipe with splice(2),
//! so a large request body never passes through user space: the kernel
//! hands the received pages to the sending socket instead of copying them
//! out to us and back in.

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

/// Moves up to `len` bytes from `from` to `to` and says how many moved:
/// fewer only when `from` is non-blocking and has nothing more for now.
/// Writes to `to` block within its own timeout.
pub fn splice(from: &TcpStream, to: &TcpStream, len: u64) -> Result<u64, SpliceError> {
    let mut pipe = match PIPE.with(|p| p.borrow_mut().take()) {
        Some(pipe) => pipe,
        None => Pipe::new().map_err(SpliceError::From)?,
    };
    let moved = pipe.relay(from.as_raw_fd(), to.as_raw_fd(), len);
    // A pipe left holding bytes would leak them into the next body.
    if pipe.held == 0 {
        PIPE.with(|p| *p.borrow_mut() = Some(pipe));
    }
    moved
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

    /// Fills the pipe from `from` and empties it into `to`, in turns, so
    /// it holds nothing when this returns without an error.
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
            while self.held > 0 {
                let sent =
                    splice_once(self.read.as_raw_fd(), to, self.held).map_err(SpliceError::To)?;
                if sent == 0 {
                    return Err(SpliceError::To(io::ErrorKind::WriteZero.into()));
                }
                self.held -= sent;
            }
        }
        Ok(moved)
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
