//! Pinning each worker to a CPU of its own (`server.pin_workers`, on by
//! default), as nginx's `worker_cpu_affinity auto` does. With one worker per
//! CPU, the scheduler can still stack two workers on one CPU while another
//! runs the load generator or the backend: then one waits milliseconds
//! behind the other, and so does every connection of its home. Pinned, a
//! worker cannot move to a CPU that frees up either; before workers ran as
//! `SCHED_BATCH` that cost 64 KiB responses 10-15 % of their throughput, and
//! since, nothing measurable (docs/PERFORMANCE.md, step 39).

use std::io;
use std::mem;

/// A CPU for each of `workers` workers, when they are one per CPU this
/// thread may run on (threads it starts inherit those); else `None`.
pub fn one_cpu_each(workers: usize) -> io::Result<Option<Vec<usize>>> {
    let cpus = allowed_cpus()?;
    Ok((cpus.len() == workers).then_some(cpus))
}

/// The CPUs this thread may run on, in order.
fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(0, mem::size_of_val(&set), &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * mem::size_of_val(&set);
    // SAFETY: CPU_ISSET reads a bit of the set, below its size.
    Ok((0..max)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Lets the calling thread run on `cpu` only.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: as above; CPU_SET writes a bit below the set's size.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
    if unsafe { libc::sched_setaffinity(0, mem::size_of_val(&set), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
