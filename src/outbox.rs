//! Bytes bound for a non-blocking socket that it had no room for yet: the
//! rest of a request head or body frame, or spliced body bytes still in
//! their pipe, on their way upstream; an interim or error response on its
//! way to a client. They wait here, and go before anything sent after
//! them, so a peer slow to read holds a few buffers, not a thread.

use std::io;
use std::net::TcpStream;

use crate::server::send_some;
use crate::splice::{self, Held};

#[derive(Default)]
pub struct Outbox {
    bytes: Vec<u8>,
    /// Filled by [`splice::splice`] (see [`Outbox::spliced`]).
    spliced: Option<Held>,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.spliced.is_none()
    }

    /// Writes `data` to `to` as far as it takes now, and keeps the rest.
    pub fn send(&mut self, to: &TcpStream, data: &[u8]) -> io::Result<()> {
        let sent = match self.is_empty() {
            true => send_some(to, data)?,
            false => 0,
        };
        debug_assert!(self.spliced.is_none(), "spliced bytes go first");
        self.bytes.extend_from_slice(&data[sent..]);
        Ok(())
    }

    /// Sends on what waits, as far as `to` takes it: true once nothing does.
    pub fn flush(&mut self, to: &TcpStream) -> io::Result<bool> {
        let sent = send_some(to, &self.bytes)?;
        self.bytes.drain(..sent);
        if !self.bytes.is_empty() {
            return Ok(false);
        }
        splice::flush(&mut self.spliced, to)
    }

    /// The bytes that wait, handed over to go out in front of what is sent
    /// next by other means (a response framed behind them).
    pub fn take(&mut self) -> Vec<u8> {
        debug_assert!(
            self.spliced.is_none(),
            "spliced bytes cannot be handed over"
        );
        std::mem::take(&mut self.bytes)
    }

    /// Where a splice towards the same socket keeps what it had no room for.
    pub fn spliced(&mut self) -> &mut Option<Held> {
        &mut self.spliced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    #[test]
    fn what_a_full_socket_cannot_take_waits_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut reader, _) = listener.accept().unwrap();
        writer.set_nonblocking(true).unwrap();
        let mut outbox = Outbox::default();
        // More than both socket buffers hold, at their largest.
        let first: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
        outbox.send(&writer, &first).unwrap();
        assert!(
            !outbox.is_empty(),
            "32 MiB unread fit in the socket buffers"
        );
        outbox.send(&writer, b"second").unwrap();
        let drained = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            all
        });
        while !outbox.flush(&writer).unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(outbox.is_empty());
        drop(writer);
        let all = drained.join().unwrap();
        assert_eq!(all.len(), first.len() + 6);
        assert!(all.starts_with(&first) && all.ends_with(b"second"));
    }
}
