//! An ordered header list that keeps repeats (Set-Cookie) and original case.
//!
//! The fields live as their own lines (`Name: value\r\n`) in one byte buffer,
//! with ranges into it for names and values: a parsed head is one copy of
//! its header section, and writing a head copies each run of fields that are
//! still side by side at once, so a forwarded head is a few copies, not four
//! per field.

use std::ops::Range;

use crate::spare::{self, Spares};

#[derive(Clone, Default)]
pub struct Headers {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

#[derive(Clone)]
struct Entry {
    name: Range<u32>,
    value: Range<u32>,
    /// Where the field's line ends, past its CRLF; it starts at its name.
    end: u32,
}

impl Headers {
    pub fn new() -> Headers {
        Headers::default()
    }

    /// The fields httparse found in `head` (a whole head, ending in the
    /// empty line), their lines kept as they came.
    pub fn from_parsed(head: &[u8], fields: &[httparse::Header]) -> Headers {
        let Some(first) = fields.first() else {
            return Headers::default();
        };
        let base = offset_in(head, first.name.as_bytes());
        // Every line from the first field to the empty line that ends the head.
        let section = &head[base..head.len() - 2];
        let mut bytes = spare::bytes(section.len() + 256);
        bytes.extend_from_slice(section);
        let at = |part: &[u8]| (offset_in(head, part) - base) as u32;
        let mut entries = SPARE_ENTRIES.try_with(Spares::take).unwrap_or_default();
        entries.reserve(fields.len() + 8);
        for field in fields {
            let start = at(field.name.as_bytes());
            let name = start..start + field.name.len() as u32;
            if let Some(previous) = entries.last_mut() {
                previous.end = name.start;
            }
            // An empty value may point anywhere: place it after the name.
            let value = match field.value {
                [] => name.end..name.end,
                value => {
                    let start = at(value);
                    start..start + value.len() as u32
                }
            };
            entries.push(Entry {
                name,
                value,
                end: 0,
            });
        }
        if let Some(last) = entries.last_mut() {
            last.end = section.len() as u32;
        }
        Headers { bytes, entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn append(&mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let name = self.start_line(name.as_ref());
        self.bytes.extend_from_slice(value.as_ref());
        self.end_line(name);
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
        let name = self.start_line(to.as_bytes());
        self.bytes.extend_from_within(value);
        self.end_line(name);
    }

    /// Appends a field whose value is `parts` joined, built in place.
    pub fn append_joined(&mut self, name: &str, parts: &[&[u8]]) {
        let name = self.start_line(name.as_bytes());
        for part in parts {
            self.bytes.extend_from_slice(part);
        }
        self.end_line(name);
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
            .retain(|e| !names.iter().any(|n| e.is_named(bytes, n)));
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
            .filter(move |e| e.is_named(&self.bytes, name))
            .map(|e| &self.bytes[range(&e.value)])
    }

    fn find(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.is_named(&self.bytes, name))
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
        self.get_all(name)
            .any(|value| list_items(value).any(|item| item.eq_ignore_ascii_case(token.as_bytes())))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .iter()
            .map(|e| (&self.bytes[range(&e.name)], &self.bytes[range(&e.value)]))
    }

    /// Appends `Name: value\r\n` for every field. Fields still side by side
    /// in the buffer (as parsed, or appended one after another) go in one copy.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut run = 0..0;
        for e in &self.entries {
            if e.name.start != run.end {
                out.extend_from_slice(&self.bytes[range(&run)]);
                run.start = e.name.start;
            }
            run.end = e.end;
        }
        out.extend_from_slice(&self.bytes[range(&run)]);
    }

    /// Writes `name: ` for a new field; its value follows, then `end_line`.
    fn start_line(&mut self, name: &[u8]) -> Range<u32> {
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(name);
        let name = start..self.bytes.len() as u32;
        self.bytes.extend_from_slice(b": ");
        name
    }

    /// Ends the field `start_line` began: its value is what was written since.
    fn end_line(&mut self, name: Range<u32>) {
        let value = name.end + 2..self.bytes.len() as u32;
        self.bytes.extend_from_slice(b"\r\n");
        let end = self.bytes.len() as u32;
        self.entries.push(Entry { name, value, end });
    }
}

/// A list's storage goes to the next head this thread parses (`spare`).
impl Drop for Headers {
    fn drop(&mut self) {
        spare::give_back_bytes(std::mem::take(&mut self.bytes));
        let entries = std::mem::take(&mut self.entries);
        let _ = SPARE_ENTRIES.try_with(|spares| spares.give_back(entries));
    }
}

thread_local! {
    static SPARE_ENTRIES: Spares<Entry> = const { Spares::new(128, 64) };
}

/// Where `part`, a slice of `whole`, starts in it.
fn offset_in(whole: &[u8], part: &[u8]) -> usize {
    let offset = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    assert!(offset + part.len() <= whole.len(), "a slice from elsewhere");
    offset
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

impl Entry {
    /// Field names compare case-insensitively; lengths first, since most
    /// fields are ruled out without touching their bytes.
    fn is_named(&self, bytes: &[u8], name: &str) -> bool {
        (self.name.end - self.name.start) as usize == name.len()
            && bytes[range(&self.name)].eq_ignore_ascii_case(name.as_bytes())
    }
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
    fn a_parsed_head_is_written_back_line_for_line_less_what_was_removed() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nConnection:  close \r\nx-spaced:\tv  w\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(head).unwrap().is_complete());
        let mut h = Headers::from_parsed(head, req.headers);
        assert_eq!(h.len(), 4);
        assert_eq!(h.get("host"), Some(&b"a"[..]));
        assert_eq!(h.get("x-empty"), Some(&b""[..]));
        assert_eq!(h.get("connection"), Some(&b"close"[..]));
        assert_eq!(h.get("X-Spaced"), Some(&b"v  w"[..]));
        let mut out = Vec::new();
        h.write_to(&mut out);
        assert_eq!(out, &head[16..head.len() - 2]);

        h.remove("connection");
        h.append("Via", "1.1 us");
        h.append_copy("X-Host", "host");
        let mut out = Vec::new();
        h.write_to(&mut out);
        assert_eq!(
            out,
            b"Host: a\r\nX-Empty:\r\nx-spaced:\tv  w\r\nVia: 1.1 us\r\nX-Host: a\r\n"
        );
        assert!(Headers::from_parsed(b"GET / HTTP/1.1\r\n\r\n", &[]).is_empty());
    }

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
