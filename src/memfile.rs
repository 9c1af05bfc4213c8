//! Bytes held in an anonymous in-memory file (memfd) and mapped for reading:
//! modules see them as a slice, and they reach a socket by `sendfile`, which
//! hands the file's pages to the network stack instead of copying them
//! through a user-space buffer. For large cached bodies, sent again and again.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;

pub struct MemFile {
    fd: OwnedFd,
    map: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and lives as long as the MemFile; the
// file is never written after `new`, so sharing it between threads is sound.
unsafe impl Send for MemFile {}
unsafe impl Sync for MemFile {}

impl MemFile {
    /// A copy of `bytes` (which must not be empty). Refused once memory
    /// files hold a quarter of the process's file descriptors, so they never
    /// crowd out connections: the caller keeps plain bytes instead.
    pub fn new(bytes: &[u8]) -> io::Result<MemFile> {
        if bytes.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty MemFile",
            ));
        }
        if LIVE.fetch_add(1, Relaxed) >= *CAP.get_or_init(fd_budget) {
            LIVE.fetch_sub(1, Relaxed);
            return Err(io::Error::other(
                "memory files use their share of file descriptors",
            ));
        }
        let made = MemFile::create(bytes);
        if made.is_err() {
            LIVE.fetch_sub(1, Relaxed);
        }
        made
    }

    fn create(bytes: &[u8]) -> io::Result<MemFile> {
        // SAFETY: a NUL-terminated name; the fd is owned from here on.
        let raw = unsafe { libc::memfd_create(c"proxycache-body".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut file = std::fs::File::from(fd);
        io::Write::write_all(&mut file, bytes)?;
        let fd = OwnedFd::from(file);
        // SAFETY: maps `len` bytes of our own file read-only; checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes.len(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MemFile {
            fd,
            map: NonNull::new(map.cast()).expect("mmap does not return null on success"),
            len: bytes.len(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping covers `len` readable bytes until drop.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.len) }
    }

    /// One `sendfile` of the file from `from` on to `socket`; how much went.
    pub fn send_to(&self, socket: RawFd, from: usize) -> io::Result<usize> {
        let mut offset = from as libc::off_t;
        // SAFETY: sendfile from our file to a socket the caller owns.
        let sent =
            unsafe { libc::sendfile(socket, self.fd.as_raw_fd(), &mut offset, self.len - from) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }
}

impl Drop for MemFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.len) };
        LIVE.fetch_sub(1, Relaxed);
    }
}

/// Memory files alive now, and how many may be.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static CAP: OnceLock<usize> = OnceLock::new();

/// A quarter of the soft limit on open files.
fn fd_budget() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    (limit.rlim_cur / 4).min(1 << 20) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn holds_the_bytes_and_sends_them_in_pieces() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let file = MemFile::new(&bytes).unwrap();
        assert_eq!(file.as_slice(), &bytes[..]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            got
        });
        let mut sent = 0;
        while sent < bytes.len() {
            sent += file.send_to(server.as_raw_fd(), sent).unwrap();
        }
        drop(server);
        assert_eq!(reader.join().unwrap(), bytes);
        assert!(MemFile::new(&[]).is_err());
    }
}
