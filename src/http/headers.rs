//! An ordered header list that keeps repeats (Set-Cookie) and original case.
//!
//! Names and values live in one byte buffer with ranges into it, so a parsed
//! head costs two allocations instead of one per header, and the list can be
//! cleared and reused.

use std::ops::Range;

#[derive(Clone, Default)]
pub struct Headers {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

#[derive(Clone)]
struct Entry {
    name: Range<u32>,
    value: Range<u32>,
}

impl Headers {
    pub fn new() -> Headers {
        Headers::default()
    }

    /// Room for `bytes` of names and values in `fields` fields (plus a few
    /// more the proxy adds) without reallocating.
    pub fn with_capacity(bytes: usize, fields: usize) -> Headers {
        Headers {
            bytes: Vec::with_capacity(bytes + 256),
            entries: Vec::with_capacity(fields + 8),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn append(&mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let name = self.push_bytes(name.as_ref());
        let value = self.push_bytes(value.as_ref());
        self.entries.push(Entry { name, value });
    }

    /// Adds `item` to the comma-separated list `name` (X-Forwarded-For,
    /// Via), leaving one field with every earlier value and then `item`.
    /// Allocates only when there were earlier values to join.
    pub fn add_to_list(&mut self, name: &str, item: &[u8]) {
        if !self.contains(name) {
            self.append(name, item);
            return;
        }
        let mut joined = Vec::with_capacity(64 + item.len());
        for value in self.get_all(name) {
            joined.extend_from_slice(value);
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(item);
        self.set(name, joined);
    }

    /// Appends a `to` field with the value of the first `from` field, if
    /// there is one (X-Forwarded-Host from Host), without copying it out first.
    pub fn append_copy(&mut self, to: &str, from: &str) {
        let Some(value) = self.find(from).map(|e| range(&e.value)) else {
            return;
        };
        let name = self.push_bytes(to.as_bytes());
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_within(value);
        let value = start..self.bytes.len() as u32;
        self.entries.push(Entry { name, value });
    }

    /// Appends a field whose value is `parts` joined, built in place.
    pub fn append_joined(&mut self, name: &str, parts: &[&[u8]]) {
        let name = self.push_bytes(name.as_bytes());
        let start = self.bytes.len() as u32;
        for part in parts {
            self.bytes.extend_from_slice(part);
        }
        let value = start..self.bytes.len() as u32;
        self.entries.push(Entry { name, value });
    }

    /// Replaces every field of this name with one.
    pub fn set(&mut self, name: &str, value: impl AsRef<[u8]>) {
        self.remove(name);
        self.append(name, value);
    }

    /// Removes every field of this name; true if there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        self.remove_each(&[name])
    }

    /// Removes every field with one of these names, in one pass; true if
    /// there was one.
    pub fn remove_each(&mut self, names: &[&str]) -> bool {
        let before = self.entries.len();
        let bytes = &self.bytes;
        self.entries
            .retain(|e| !names.iter().any(|n| name_is(&bytes[range(&e.name)], n)));
        self.entries.len() != before
    }

    /// Keeps only the fields for which `keep(name, value)` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], &[u8]) -> bool) {
        let bytes = &self.bytes;
        self.entries
            .retain(|e| keep(&bytes[range(&e.name)], &bytes[range(&e.value)]));
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.get_all(name).next()
    }

    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn get_all<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.entries
            .iter()
            .filter(move |e| name_is(&self.bytes[range(&e.name)], name))
            .map(|e| &self.bytes[range(&e.value)])
    }

    fn find(&self, name: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| name_is(&self.bytes[range(&e.name)], name))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every comma-separated element of every `name` field, trimmed.
    pub fn list<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.get_all(name).flat_map(list_items)
    }

    /// True if a comma-separated `name` field holds `token` (case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.list(name)
            .any(|item| item.eq_ignore_ascii_case(token.as_bytes()))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .iter()
            .map(|e| (&self.bytes[range(&e.name)], &self.bytes[range(&e.value)]))
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.entries.clear();
    }

    /// Appends `Name: value\r\n` for every field.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for (name, value) in self.iter() {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }

    fn push_bytes(&mut self, b: &[u8]) -> Range<u32> {
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(b);
        start..self.bytes.len() as u32
    }
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(n, v)| (String::from_utf8_lossy(n), String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

/// Field names compare case-insensitively; lengths first, since most fields
/// are ruled out without touching their bytes.
fn name_is(field: &[u8], name: &str) -> bool {
    field.len() == name.len() && field.eq_ignore_ascii_case(name.as_bytes())
}

fn range(r: &Range<u32>) -> Range<usize> {
    r.start as usize..r.end as usize
}

/// The comma-separated elements of one field value, trimmed, empty ones skipped.
pub fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|item| !item.is_empty())
}

/// Strips optional whitespace (SP / HTAB) from both ends.
pub fn trim(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_copy_copies_a_value_under_another_name() {
        let mut h = Headers::new();
        h.append("Host", "example.com");
        h.append("host", "second");
        h.append_copy("X-Forwarded-Host", "host");
        assert_eq!(
            h.get_all("x-forwarded-host").collect::<Vec<_>>(),
            [&b"example.com"[..]]
        );
        h.append_copy("X-Missing", "no-such-field");
        assert!(!h.contains("x-missing"));
    }

    #[test]
    fn add_to_list_joins_earlier_fields_into_one() {
        let mut h = Headers::new();
        h.add_to_list("Via", b"1.1 a");
        assert_eq!(h.get_all("via").collect::<Vec<_>>(), [&b"1.1 a"[..]]);
        h.append("X-Forwarded-For", "10.0.0.1");
        h.append("x-forwarded-for", "10.0.0.2, 10.0.0.3");
        h.add_to_list("X-Forwarded-For", b"127.0.0.1");
        assert_eq!(
            h.get_all("x-forwarded-for").collect::<Vec<_>>(),
            [&b"10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"[..]]
        );
    }

    #[test]
    fn keeps_order_repeats_and_case() {
        let mut h = Headers::new();
        h.append("Set-Cookie", "a=1");
        h.append("X-One", "1");
        h.append("set-cookie", "b=2");
        let all: Vec<_> = h.get_all("SET-COOKIE").collect();
        assert_eq!(all, [&b"a=1"[..], b"b=2"]);
        let mut out = Vec::new();
        h.write_to(&mut out);
        assert_eq!(out, b"Set-Cookie: a=1\r\nX-One: 1\r\nset-cookie: b=2\r\n");
    }

    #[test]
    fn remove_set_and_tokens() {
        let mut h = Headers::new();
        h.append("Connection", "keep-alive, X-Foo");
        h.append("connection", " Upgrade ");
        assert!(h.has_token("connection", "x-foo"));
        assert!(h.has_token("connection", "upgrade"));
        assert!(!h.has_token("connection", "close"));
        h.append_joined("X-Joined", &[b"a", b"", b"bc"]);
        assert_eq!(h.get("x-joined"), Some(&b"abc"[..]));
        h.remove("x-joined");
        h.append("TE", "trailers");
        h.append("Keep-Alive", "timeout=5");
        assert!(h.remove_each(&["keep-alive", "te", "absent"]));
        assert!(!h.remove_each(&["keep-alive", "te"]));
        assert_eq!(h.len(), 2);
        h.set("Connection", "close");
        assert_eq!(h.len(), 1);
        assert!(h.remove("CONNECTION"));
        assert!(h.is_empty());
    }
}
