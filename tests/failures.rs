//! Upstream failures, module panics and connection limits: each answered with
//! a precise status and a log line, and nobody else's request is lost.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::*;

#[test]
fn refused_upstream_is_502_with_reason_and_request_id_in_the_log() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut proxy = Proxy::start(closed);
    let resp = get(proxy.addr, "/");
    assert_eq!(resp.status, 502);
    assert!(resp.text().contains("refused"), "{}", resp.text());
    let id = resp.header("x-request-id").unwrap().to_owned();
    let line = proxy.wait_for_log("upstream refused the connection");
    assert!(line.contains(&id), "{line}");
    assert!(line.contains("WARN"), "{line}");
}

#[test]
fn silent_upstream_is_504() {
    let backend = Backend::raw(|stream| {
        std::thread::sleep(Duration::from_secs(3));
        drop(stream);
    });
    let mut proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[upstream]\nread_timeout = \"300ms\"",
            ..Conf::default()
        },
    );
    let resp = get(proxy.addr, "/slow");
    assert_eq!(resp.status, 504);
    assert!(resp.text().contains("timed out"), "{}", resp.text());
    proxy.wait_for_log("upstream read timed out");
}

#[test]
fn upstream_reset_before_responding_is_502() {
    let backend = Backend::raw(|stream| {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        read_request(&mut reader);
        // SO_LINGER 0: close with RST.
        socket_reset(stream);
    });
    let proxy = Proxy::start(backend.addr);
    let resp = get(proxy.addr, "/");
    assert_eq!(resp.status, 502);
}

fn socket_reset(stream: std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid struct on an owned socket.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

#[test]
fn upstream_closing_during_a_large_request_body_is_502() {
    let backend = Backend::raw(|stream| {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        if line.starts_with("PUT") {
            // The upload: its head and a little body, then a close with the rest unread.
            let mut first = [0u8; 1000];
            let _ = reader.read(&mut first);
            return;
        }
        while line != "\r\n" {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
        }
        let _ = reader.get_mut().write_all(&response(200, &[], b"fine"));
    });
    let mut proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    let size = 8 << 20;
    client.send(format!(
        "PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n"
    ));
    let mut writer = client.stream.try_clone().unwrap();
    let upload = std::thread::spawn(move || {
        let block = vec![b'z'; 64 * 1024];
        for _ in 0..size / block.len() {
            if writer.write_all(&block).is_err() {
                return;
            }
        }
    });
    assert_eq!(client.response().status, 502);
    proxy.wait_for_log("upstream write");
    upload.join().unwrap();
    assert_eq!(get(proxy.addr, "/").text(), "fine");
}

#[test]
fn upstream_dying_mid_body_cuts_the_client_connection_only() {
    let backend = Backend::raw(|mut stream| {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let req = read_request(&mut reader).unwrap();
        if req.target == "/broken" {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..");
        } else {
            let _ = stream.write_all(&response(200, &[], b"whole"));
        }
    });
    let mut proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send("GET /broken HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(
        client.try_response().is_none(),
        "a truncated body must not look complete"
    );
    assert_eq!(get(proxy.addr, "/").text(), "whole");
    proxy.wait_for_log("response not completed");
}

#[test]
fn past_max_connections_new_clients_get_503() {
    let backend = Backend::ok("fine");
    let mut proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "max_connections = 2",
            ..Conf::default()
        },
    );
    let mut a = Client::connect(proxy.addr);
    let mut b = Client::connect(proxy.addr);
    a.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    b.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(a.response().status, 200);
    assert_eq!(b.response().status, 200);
    let over = get(proxy.addr, "/");
    assert_eq!(over.status, 503);
    proxy.wait_for_log("over max_connections");
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        get(proxy.addr, "/").status,
        200,
        "a freed place is usable again"
    );
    b.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(b.response().status, 200);
}

#[test]
fn upstream_connection_limit_gives_503_after_waiting() {
    let backend = Backend::raw(|mut stream| {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        while let Some(req) = read_request(&mut reader) {
            if req.target == "/hold" {
                std::thread::sleep(Duration::from_millis(1500));
            }
            let _ = stream.write_all(&response(200, &[], b"ok"));
        }
    });
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[pool]\nmax_conns_per_host = 1\n[upstream]\nconnect_timeout = \"300ms\"",
            ..Conf::default()
        },
    );
    let addr = proxy.addr;
    let holder = std::thread::spawn(move || get(addr, "/hold").status);
    std::thread::sleep(Duration::from_millis(200));
    let resp = get(proxy.addr, "/");
    assert_eq!(resp.status, 503);
    assert!(resp.text().contains("connection limit"), "{}", resp.text());
    assert_eq!(holder.join().unwrap(), 200);
    assert_eq!(get(proxy.addr, "/").status, 200);
}

#[test]
fn a_client_that_stops_reading_is_dropped_after_write_timeout() {
    let big = vec![b'z'; 64 << 20];
    let backend = Backend::start(move |req| match req.target.as_str() {
        "/big" => response(200, &[], &big),
        _ => response(200, &[], b"fine"),
    });
    let mut proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "write_timeout = \"500ms\"",
            ..Conf::default()
        },
    );
    let mut sleeper = Client::connect(proxy.addr);
    sleeper.send("GET /big HTTP/1.1\r\nHost: a\r\n\r\n");
    let line = proxy.wait_for_log("response not completed");
    assert!(
        line.contains("timed out") || line.contains("Resource temporarily unavailable"),
        "{line}"
    );
    assert_eq!(
        get(proxy.addr, "/").text(),
        "fine",
        "others are still served"
    );
}
