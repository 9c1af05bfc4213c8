//! What a parked exchange waits on besides sockets: a [`Signal`] another
//! thread notifies, a [`Timer`], and a line of [`Waiters`] for something
//! that frees up, where each holds a [`Place`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// A file descriptor that becomes readable when notified: for a
/// [`PendingResponse`](crate::pipeline::PendingResponse) that waits on an event rather than a socket.
pub struct Signal(std::os::fd::OwnedFd);

impl Signal {
    pub fn new() -> io::Result<Signal> {
        // SAFETY: plain syscall; the fd is owned from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Signal(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    pub fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to our eventfd.
        unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                one.as_ptr().cast(),
                8,
            )
        };
    }

    pub fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }

    /// Consumes the notifications so far, so the fd waits for the next one.
    pub fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a valid buffer from our non-blocking eventfd.
        unsafe { libc::read(self.fd(), count.as_mut_ptr().cast(), 8) };
    }
}

/// Requests waiting their turn for something that frees up (a server
/// slot, a pooled connection), each on its own [`Signal`], woken one at a
/// time in the order they came.
#[derive(Default)]
pub struct Waiters {
    queue: Mutex<VecDeque<Arc<Signal>>>,
    /// Its length, read without the lock on every release.
    len: AtomicUsize,
}

impl Waiters {
    /// Joins the back of the line, unless `max` wait already (`None`). One
    /// that joins just after a release is woken by nobody: look once more
    /// after joining.
    pub fn join(self: &Arc<Self>, max: usize) -> io::Result<Option<Place>> {
        let signal = Arc::new(Signal::new()?);
        let mut queue = self.queue.lock();
        if queue.len() >= max {
            return Ok(None);
        }
        queue.push_back(signal.clone());
        self.len.fetch_add(1, SeqCst);
        Ok(Some(Place {
            line: self.clone(),
            signal,
            served: false,
        }))
    }

    /// Wakes the one waiting longest, if any: it leaves the line.
    pub fn wake_one(&self) {
        if self.len.load(SeqCst) == 0 {
            return;
        }
        if let Some(waiter) = self.queue.lock().pop_front() {
            self.len.fetch_sub(1, SeqCst);
            waiter.notify();
        }
    }

    /// Takes `signal` out of the line; false if it was not in it (woken).
    fn leave(&self, signal: &Arc<Signal>) -> bool {
        let mut queue = self.queue.lock();
        let Some(i) = queue.iter().position(|w| Arc::ptr_eq(w, signal)) else {
            return false;
        };
        queue.remove(i);
        self.len.fetch_sub(1, SeqCst);
        true
    }
}

/// One request's place in a line of [`Waiters`]: its fd becomes readable
/// when woken. Dropped without being [`served`](Place::served), it leaves
/// the line, and a wake it had received goes on to the next in line: else
/// that one would wait for another release, or time out, with a slot free.
pub struct Place {
    line: Arc<Waiters>,
    signal: Arc<Signal>,
    served: bool,
}

impl Place {
    pub fn fd(&self) -> RawFd {
        self.signal.fd()
    }

    /// Woken, but what freed up was taken first: back to the front of the
    /// line, since it has waited longest, to wait for the next release.
    pub fn wait_again(&self) {
        self.signal.clear();
        let mut queue = self.line.queue.lock();
        if !queue.iter().any(|w| Arc::ptr_eq(w, &self.signal)) {
            queue.push_front(self.signal.clone());
            self.line.len.fetch_add(1, SeqCst);
        }
    }

    /// Got what it waited for: leaves the line, its wake used.
    pub fn served(&mut self) {
        self.served = true;
        self.line.leave(&self.signal);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.served && !self.line.leave(&self.signal) {
            self.line.wake_one();
        }
    }
}

/// A file descriptor that becomes readable once a delay has passed: for a
/// [`PendingResponse`](crate::pipeline::PendingResponse) that waits out a backoff without holding a thread.
pub struct Timer(std::os::fd::OwnedFd);

impl Timer {
    pub fn new(after: Duration) -> io::Result<Timer> {
        // SAFETY: plain syscall; the fd is owned from here on.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let timer = Timer(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
        // A zero expiry would disarm it: at least a nanosecond.
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos().into(),
            },
        };
        // SAFETY: arms our own timerfd with a valid itimerspec.
        if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(timer)
    }

    pub fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }
}

/// Whether `fd` is readable now: for tests of what wakes a wait.
#[cfg(test)]
pub(crate) fn readable(fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd without waiting.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of(n: usize) -> (Arc<Waiters>, Vec<Place>) {
        let line = Arc::new(Waiters::default());
        let places = (0..n).map(|_| line.join(n).unwrap().unwrap()).collect();
        (line, places)
    }

    #[test]
    fn a_full_line_turns_newcomers_away() {
        let (line, _places) = line_of(2);
        assert!(line.join(2).unwrap().is_none());
        assert!(line.join(3).unwrap().is_some());
    }

    #[test]
    fn releases_wake_in_the_order_of_joining() {
        let (line, places) = line_of(3);
        line.wake_one();
        assert!(readable(places[0].fd()));
        assert!(!readable(places[1].fd()) && !readable(places[2].fd()));
        line.wake_one();
        assert!(readable(places[1].fd()));
        assert!(!readable(places[2].fd()));
    }

    #[test]
    fn a_woken_waiter_that_gives_up_passes_the_wake_on() {
        let (line, mut places) = line_of(2);
        line.wake_one();
        let next = places.pop().unwrap();
        drop(places);
        assert!(readable(next.fd()), "the wake went on to the next");
    }

    #[test]
    fn a_served_waiter_keeps_its_wake() {
        let (line, mut places) = line_of(2);
        line.wake_one();
        places[0].served();
        let next = places.pop().unwrap();
        drop(places);
        assert!(!readable(next.fd()));
    }

    #[test]
    fn one_that_leaves_before_its_turn_is_passed_over() {
        let (line, mut places) = line_of(2);
        let next = places.pop().unwrap();
        drop(places);
        assert!(!readable(next.fd()), "leaving unwoken wakes nobody");
        line.wake_one();
        assert!(readable(next.fd()));
    }

    #[test]
    fn waiting_again_goes_to_the_front_of_the_line() {
        let (line, places) = line_of(2);
        line.wake_one();
        places[0].wait_again();
        assert!(!readable(places[0].fd()), "its wake is cleared");
        line.wake_one();
        assert!(readable(places[0].fd()));
        assert!(!readable(places[1].fd()));
    }
}
