//! Workers as `SCHED_BATCH` (`server.batch_workers`).
//!
//! A worker that wakes (a response arrived from the upstream) normally
//! preempts whatever runs on its CPU, on a machine it shares with the
//! upstream that is often the upstream itself, halfway through writing that
//! response. Then the worker reads part of it, sleeps, and is woken again
//! for the rest. As `SCHED_BATCH`, a worker waits for the running thread's
//! turn to end instead: at 64 KiB c64 on 2 cores it slept a third as often
//! per response, the backend behind it was preempted a quarter as often,
//! and more responses went through per second (docs/PERFORMANCE.md, step 38).

use std::io;

/// Runs the calling thread under `SCHED_BATCH` (at the nice value it has).
pub fn batch_current_thread() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: 0 is the calling thread; `param` is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
