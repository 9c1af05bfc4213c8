//! Malformed and hostile requests get a precise status, the connection is
//! closed, the reason is logged, and the daemon goes on serving everyone else.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;

const CASES: &[(&str, &str, u16)] = &[
    ("no Host in 1.1", "GET / HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("bad method token", "G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target not origin-form", "GET index.html HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("asterisk with GET", "GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("HTTP/2.0 in an HTTP/1 line", "GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("garbage version", "GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400),
    ("CONNECT", "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    ("CL and TE", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE last not chunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
    ("TE in HTTP/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("differing CL", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("malformed CL", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3x\r\n\r\nabc", 400),
    ("negative CL", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    ("obs-fold", "GET / HTTP/1.1\r\nHost: a\r\nX-Long: a\r\n  folded\r\n\r\n", 400),
    ("space before colon", "GET / HTTP/1.1\r\nHost: a\r\nX-Bad : v\r\n\r\n", 400),
    ("NUL in value", "GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\0b\r\n\r\n", 400),
    ("CR in value", "GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\rb\r\n\r\n", 400),
    ("bare LF line ending", "GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare LF after a field", "GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    ("bad chunk size", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
    ("chunk size overflow", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n", 400),
    ("chunk without CRLF", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\n", 400),
    ("unknown expectation", "GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", 417),
];

#[test]
fn every_malformed_request_gets_its_status_and_the_daemon_keeps_serving() {
    let backend = Backend::ok("fine");
    let mut proxy = Proxy::start(backend.addr);
    for (name, raw, status) in CASES {
        let mut client = Client::connect(proxy.addr);
        client.send(raw);
        let resp = client
            .try_response()
            .unwrap_or_else(|| panic!("{name}: no response"));
        assert_eq!(resp.status, *status, "{name}: {}", resp.text());
        assert_eq!(resp.header("connection"), Some("close"), "{name}");
        assert!(client.is_closed(), "{name}: connection left open");
        assert_eq!(
            get(proxy.addr, "/").text(),
            "fine",
            "{name}: next request failed"
        );
    }
    proxy.wait_for_log("bad request: 400 bare LF line ending");
    proxy.wait_for_log("bad request: 505");
    proxy.wait_for_log("request body: malformed chunked body");
}

#[test]
fn header_size_limits_answer_414_and_431() {
    let backend = Backend::ok("fine");
    let mut proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "max_request_line = 100\nmax_header_size = 1000\nmax_headers = 10",
            ..Conf::default()
        },
    );
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(200));
    let big_head = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(2000)
    );
    let many = format!(
        "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
        "X-N: 1\r\n".repeat(11)
    );
    for (raw, status) in [(long_target, 414), (big_head, 431), (many, 431)] {
        let resp = request(proxy.addr, &raw);
        assert_eq!(resp.status, status);
        assert_eq!(get(proxy.addr, "/").text(), "fine");
    }
    // An endless request line is cut off at the limit, not buffered.
    let mut client = Client::connect(proxy.addr);
    client.send(format!("GET /{}", "a".repeat(500)));
    assert_eq!(client.response().status, 414);
    proxy.wait_for_log("414 request line too long");
}

#[test]
fn request_bodies_over_max_body_size_get_413() {
    let backend = Backend::start(|req| response(200, &[], &req.body));
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "max_body_size = 10",
            ..Conf::default()
        },
    );
    let resp = request(
        proxy.addr,
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n01234567890",
    );
    assert_eq!(resp.status, 413);
    let chunked = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n012345\r\n6\r\n678901\r\n0\r\n\r\n";
    assert_eq!(request(proxy.addr, chunked).status, 413);
    let fits = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789";
    assert_eq!(request(proxy.addr, fits).text(), "0123456789");
}

#[test]
fn a_slow_header_drip_gets_408_without_holding_a_worker() {
    let backend = Backend::ok("fine");
    let mut proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "header_timeout = \"1s\"\nworkers = 2",
            ..Conf::default()
        },
    );
    // More drips than workers: none of them may starve a normal request.
    let mut drips: Vec<Client> = (0..4).map(|_| Client::connect(proxy.addr)).collect();
    let started = Instant::now();
    for step in 0..3 {
        for client in &mut drips {
            client.send(if step == 0 {
                "GET / HTTP/1.1\r\nHost: a\r\n"
            } else {
                "X-Drip: 1\r\n"
            });
        }
        assert_eq!(get(proxy.addr, "/").text(), "fine");
        std::thread::sleep(Duration::from_millis(300));
    }
    for client in &mut drips {
        let resp = client.response();
        assert_eq!(resp.status, 408);
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(3), "408 came after {waited:?}");
    proxy.wait_for_log("request head not received in time");
}

#[test]
fn a_stalled_request_body_gets_408() {
    let backend = Backend::start(|req| response(200, &[], &req.body));
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "body_timeout = \"500ms\"",
            ..Conf::default()
        },
    );
    let mut client = Client::connect(proxy.addr);
    client.send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly part");
    let resp = client.response();
    assert_eq!(resp.status, 408);
    assert_eq!(get(proxy.addr, "/").status, 200);
}

#[test]
fn a_client_that_disconnects_mid_body_does_not_disturb_others() {
    let backend = Backend::start(|req| response(200, &[], &req.body));
    let proxy = Proxy::start(backend.addr);
    {
        let mut client = Client::connect(proxy.addr);
        client.send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\npartial");
    }
    let mut raw = std::net::TcpStream::connect(proxy.addr).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let resp = read_response(&mut std::io::BufReader::new(raw), false).unwrap();
    assert_eq!(resp.status, 200);
}

#[test]
fn refused_uploads_linger_without_holding_the_worker() {
    // An upload answered before its body is read (here 413) is read and
    // dropped for up to 500 ms, so its client sees the answer rather than a
    // reset. With one worker and no helpers, ten such at once must not hold
    // a plain GET up for 500 ms each.
    let backend = Backend::ok("fine");
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "workers = 1\nmax_workers = 1\nmax_body_size = 10",
            ..Conf::default()
        },
    );
    let mut uploads: Vec<Client> = (0..10).map(|_| Client::connect(proxy.addr)).collect();
    for upload in &mut uploads {
        upload.send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\nsome");
    }
    let started = Instant::now();
    assert_eq!(get(proxy.addr, "/").text(), "fine");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "the GET took {took:?}");
    for upload in &mut uploads {
        assert_eq!(upload.response().status, 413);
    }
}
