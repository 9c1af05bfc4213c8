//! Storage of small per-request buffers (header lists, response heads), kept
//! per thread for the next request instead of freed. A worker has dozens of
//! requests in flight, so their buffers are freed in bursts that overflow
//! glibc's per-thread cache (seven blocks of a size): most of those
//! allocations went to the arena, at about 50 ns a pair.

use std::cell::RefCell;

/// Spare vectors of one element type; one per thread (`thread_local!`).
pub struct Spares<T> {
    kept: RefCell<Vec<Vec<T>>>,
    /// How many are kept at most: enough for those of every request one worker has in flight.
    keep: usize,
    /// Larger storage is freed: an odd huge head should not stay pinned.
    max_capacity: usize,
}

impl<T> Spares<T> {
    pub const fn new(keep: usize, max_capacity: usize) -> Spares<T> {
        Spares {
            kept: RefCell::new(Vec::new()),
            keep,
            max_capacity,
        }
    }

    /// An empty vector, with room from an earlier one if one was kept.
    pub fn take(&self) -> Vec<T> {
        self.kept.borrow_mut().pop().unwrap_or_default()
    }

    pub fn give_back(&self, mut storage: Vec<T>) {
        if storage.capacity() == 0 || storage.capacity() > self.max_capacity {
            return;
        }
        let mut kept = self.kept.borrow_mut();
        if kept.len() < self.keep {
            storage.clear();
            kept.push(storage);
        }
    }
}

thread_local! {
    static BYTES: Spares<u8> = const { Spares::new(256, 4096) };
}

/// An empty byte buffer with room for at least `capacity` bytes.
pub fn bytes(capacity: usize) -> Vec<u8> {
    let mut storage = BYTES.try_with(Spares::take).unwrap_or_default();
    storage.reserve(capacity);
    storage
}

/// Keeps `storage` for [`bytes`]. While the thread ends (its spares gone),
/// buffers are new and freed as usual.
pub fn give_back_bytes(storage: Vec<u8>) {
    let _ = BYTES.try_with(|spares| spares.give_back(storage));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_given_back_is_taken_again_empty() {
        let spares = Spares::new(2, 64);
        let mut first: Vec<u8> = Vec::with_capacity(32);
        first.extend_from_slice(b"left over");
        let address = first.as_ptr();
        spares.give_back(first);
        let again = spares.take();
        assert_eq!(again.as_ptr(), address, "not the storage given back");
        assert!(again.is_empty() && again.capacity() >= 32);
        assert_eq!(spares.take().capacity(), 0, "only one was given back");
    }

    #[test]
    fn large_storage_and_storage_past_the_limit_are_freed() {
        let spares = Spares::new(1, 64);
        spares.give_back(Vec::<u8>::with_capacity(65));
        assert_eq!(
            spares.take().capacity(),
            0,
            "storage over max_capacity was kept"
        );
        spares.give_back(Vec::<u8>::with_capacity(8));
        spares.give_back(Vec::<u8>::with_capacity(16));
        assert_eq!(spares.take().capacity(), 8);
        assert_eq!(spares.take().capacity(), 0, "more than `keep` were kept");
    }
}
