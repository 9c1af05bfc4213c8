//! `proxycache demo`: a small origin to put the proxy in front of, so a fresh
//! checkout shows the proxy doing its job with nothing else running.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

use crate::http::body::BodyReader;
use crate::http::{request, Limits, ReadBuf};

const LIMITS: Limits = Limits {
    max_request_line: 8192,
    max_header_size: 32 * 1024,
    max_headers: 100,
    max_body_size: 1 << 20,
};

/// Starts the origin on an ephemeral loopback port, a thread per connection.
pub fn start_origin() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::Builder::new()
        .name("demo-origin".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || {
                    let _ = serve(stream);
                });
            }
        })?;
    log::info!("demo origin listening on {addr}");
    Ok(addr)
}

fn serve(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = ReadBuf::default();
    loop {
        let parsed = match request::parse(buf.filled(), &LIMITS) {
            Ok(parsed) => parsed,
            Err(e) => return respond(&mut stream, e.status, "", e.reason.as_bytes(), false),
        };
        let Some((req, framing, len)) = parsed else {
            if buf.read_from(&mut stream)? == 0 {
                return Ok(());
            }
            continue;
        };
        buf.consume(len);
        let mut body = Vec::new();
        let mut reader = BodyReader::new(framing.body, LIMITS.max_body_size);
        while let Some(piece) = reader
            .next(&mut stream, &mut buf)
            .map_err(|e| io::Error::other(e.to_string()))?
        {
            body.extend_from_slice(piece);
        }
        let path = req.target.split('?').next().unwrap_or("/");
        let mut extra = "";
        let (status, reply) = match path {
            "/" => (200, b"Hello from the Proxycache demo origin!\n".to_vec()),
            "/cached" => {
                extra = "Cache-Control: max-age=30\r\n";
                let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
                (
                    200,
                    format!("Made by the origin at {now}; cacheable for 30 s.\n").into_bytes(),
                )
            }
            "/headers" => {
                let mut text = format!("{} {} {}\n", req.method, req.target, req.version.as_str())
                    .into_bytes();
                req.headers.write_to(&mut text);
                (200, text)
            }
            "/echo" => (200, body),
            _ => (404, b"No such page on the demo origin.\n".to_vec()),
        };
        respond(&mut stream, status, extra, &reply, framing.keep_alive)?;
        if !framing.keep_alive {
            return Ok(());
        }
    }
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    extra: &str,
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\n{extra}Content-Length: {}\r\n{}\r\n",
        crate::http::reason_phrase(status),
        body.len(),
        if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        }
    )
    .into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out)
}

/// Tells the user what to try once the proxy is up.
pub fn print_tryouts(proxy: SocketAddr) {
    println!(
        "\nProxycache demo: the proxy on http://{proxy} forwards to a built-in origin.\n\
         Try, in another terminal:\n\
         \x20 curl -i http://{proxy}/                      # proxied response with X-Request-Id and Via\n\
         \x20 curl -s http://{proxy}/headers               # what the origin received: X-Forwarded-For, Via, ...\n\
         \x20 curl -s -d 'hello' http://{proxy}/echo       # request body streamed through\n\
         \x20 curl -si http://{proxy}/cached               # twice: Cache-Status says miss, then hit\n\
         \x20 curl -i -H 'Host:' http://{proxy}/           # a bad request answered 400\n\
         Press Ctrl-C to stop (graceful shutdown).\n"
    );
}
