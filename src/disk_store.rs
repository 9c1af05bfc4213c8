//! A directory of files keyed by string, bounded in bytes: the disk tier of
//! the cache, so a warm cache outlives a restart.
//!
//! One file per key, named by a hash of the key; the key is stored inside and
//! checked on read, so a hash collision reads as a miss. Writes go to a
//! temporary file first and are renamed into place, so a crash never leaves a
//! half-written entry. Past `max_bytes` the least recently written files go.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

pub struct DiskStore {
    dir: PathBuf,
    max_bytes: u64,
    used: AtomicU64,
    /// Serialises evictions (scans of the directory).
    evicting: Mutex<()>,
}

const SUFFIX: &str = ".entry";

impl DiskStore {
    /// Opens (creating) `dir` and counts what it already holds.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<DiskStore> {
        fs::create_dir_all(dir)?;
        let used = files(dir)?.iter().map(|(_, len, _)| len).sum();
        Ok(DiskStore {
            dir: dir.to_owned(),
            max_bytes,
            used: AtomicU64::new(used),
            evicting: Mutex::new(()),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        self.dir.join(format!("{:016x}{SUFFIX}", hasher.finish()))
    }

    /// Stores `value` under `key`, replacing what was there.
    pub fn put(&self, key: &str, value: &[u8]) -> io::Result<()> {
        let record_len = 4 + key.len() + value.len();
        if record_len as u64 > self.max_bytes {
            return Ok(());
        }
        let path = self.path(key);
        let old = fs::metadata(&path).map_or(0, |m| m.len());
        let mut record = Vec::with_capacity(record_len);
        record.extend_from_slice(&(key.len() as u32).to_le_bytes());
        record.extend_from_slice(key.as_bytes());
        record.extend_from_slice(value);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, &record)?;
        fs::rename(&tmp, &path)?;
        // The old file (if any) was counted; the new one replaces it.
        self.used.fetch_sub(old, Relaxed);
        let used = self.used.fetch_add(record_len as u64, Relaxed) + record_len as u64;
        if used > self.max_bytes {
            self.evict()?;
        }
        Ok(())
    }

    /// The value stored under `key`, if any.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let record = fs::read(self.path(key)).ok()?;
        let key_len = u32::from_le_bytes(record.get(..4)?.try_into().ok()?) as usize;
        (record.get(4..4 + key_len)? == key.as_bytes()).then(|| record[4 + key_len..].to_vec())
    }

    /// Whether something may be stored under `key`: a hash collision says
    /// yes too, without reading the file.
    pub fn holds(&self, key: &str) -> bool {
        self.path(key).exists()
    }

    pub fn remove(&self, key: &str) {
        let path = self.path(key);
        if let Ok(meta) = fs::metadata(&path) {
            if fs::remove_file(&path).is_ok() {
                self.used.fetch_sub(meta.len(), Relaxed);
            }
        }
    }

    /// Removes every entry whose key fails `keep`.
    pub fn retain(&self, mut keep: impl FnMut(&str, &[u8]) -> bool) {
        let Ok(files) = files(&self.dir) else { return };
        for (path, len, _) in files {
            let Ok(record) = fs::read(&path) else {
                continue;
            };
            let Some(key_len) = record
                .get(..4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
            else {
                continue;
            };
            let Some(key) = record
                .get(4..4 + key_len)
                .and_then(|k| std::str::from_utf8(k).ok())
            else {
                continue;
            };
            if !keep(key, &record[4 + key_len..]) && fs::remove_file(&path).is_ok() {
                self.used.fetch_sub(len, Relaxed);
            }
        }
    }

    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// Deletes the oldest files until the store is within 90% of its bound
    /// (headroom, so not every write scans the directory).
    fn evict(&self) -> io::Result<()> {
        let _one_at_a_time = self.evicting.lock();
        let mut files = files(&self.dir)?;
        files.sort_by_key(|(_, _, modified)| *modified);
        let target = self.max_bytes / 10 * 9;
        for (path, len, _) in files {
            if self.used.load(Relaxed) <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                self.used.fetch_sub(len, Relaxed);
            }
        }
        Ok(())
    }
}

/// The entry files in `dir`: path, size, last write.
fn files(dir: &Path) -> io::Result<Vec<(PathBuf, u64, std::time::SystemTime)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.to_string_lossy().ends_with(SUFFIX) {
            let meta = entry.metadata()?;
            out.push((path, meta.len(), meta.modified()?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("proxycache-disk-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn put_get_remove_and_reopen() {
        let dir = scratch("basic");
        let store = DiskStore::open(&dir, 1 << 20).unwrap();
        store.put("http://a/x", b"value").unwrap();
        assert_eq!(store.get("http://a/x").unwrap(), b"value");
        assert!(store.get("http://a/y").is_none());
        let reopened = DiskStore::open(&dir, 1 << 20).unwrap();
        assert_eq!(reopened.used(), store.used());
        assert_eq!(reopened.get("http://a/x").unwrap(), b"value");
        reopened.remove("http://a/x");
        assert!(reopened.get("http://a/x").is_none());
        assert_eq!(reopened.used(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stays_within_its_bound_dropping_the_oldest() {
        let dir = scratch("bound");
        let store = DiskStore::open(&dir, 10_000).unwrap();
        for i in 0..30 {
            store.put(&format!("k{i}"), &[b'x'; 1000]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(store.used() <= 10_000, "{}", store.used());
        assert!(store.get("k29").is_some(), "the newest stays");
        assert!(store.get("k0").is_none(), "the oldest went");
        store.retain(|key, _| key != "k29");
        assert!(store.get("k29").is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
