//! Proxy semantics and HTTP/1.1 behaviour through the real daemon.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

#[test]
fn clients_of_different_workers_share_pooled_upstream_connections() {
    // Each worker has its own event loop, and connections take them in turn:
    // these two clients are served by different workers. The second finds
    // only the first's idle upstream connection, whose reply is announced in
    // the first's loop; it must still get its answer on that connection.
    let backend = Backend::ok("shared");
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "workers = 2",
            ..Conf::default()
        },
    );
    let mut first = Client::connect(proxy.addr);
    let mut second = Client::connect(proxy.addr);
    for _ in 0..5 {
        for client in [&mut first, &mut second] {
            client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            assert_eq!(client.response().text(), "shared");
        }
    }
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[test]
fn curl_gets_the_backend_response_with_request_id_and_via() {
    let backend = Backend::ok("hello");
    let proxy = Proxy::start(backend.addr);
    let (out, err) = curl(&["-i", &format!("http://{}/path?q=1", proxy.addr)]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}{err}");
    assert!(out.ends_with("hello"), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("X-Request-Id: "))
        .expect("X-Request-Id in the response")
        .trim();
    // UUID v7: version nibble 7, variant 10xx.
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(&id[14..15], "7", "{id}");
    assert!(out.contains("Via: 1.1 proxycache"), "{out}");
    let seen = backend.last();
    assert_eq!(seen.header("x-request-id"), Some(id));
    assert_eq!(seen.target, "/path?q=1");
}

#[test]
fn a_valid_incoming_request_id_is_kept_and_a_bad_one_replaced() {
    let backend = Backend::ok("x");
    let proxy = Proxy::start(backend.addr);
    let resp = request(
        proxy.addr,
        "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc-123\r\n\r\n",
    );
    assert_eq!(resp.header("x-request-id"), Some("abc-123"));
    assert_eq!(backend.last().header("x-request-id"), Some("abc-123"));
    let resp = request(
        proxy.addr,
        "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: has spaces\"\r\n\r\n",
    );
    assert_eq!(resp.header("x-request-id").unwrap().len(), 36);
}

#[test]
fn forwarding_headers_are_added_and_hop_by_hop_ones_stripped() {
    let backend = Backend::start(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nVia: 1.1 origin-cache\r\n\r\n".to_vec()
    });
    let proxy = Proxy::start(backend.addr);
    let resp = request(
        proxy.addr,
        "GET /x HTTP/1.1\r\nHost: shop.example\r\nX-Early: named after\r\nConnection: keep-alive, X-Hop, x-early\r\nX-Hop: drop me\r\nKeep-Alive: 300\r\n\
         TE: trailers\r\nUpgrade: websocket\r\nProxy-Connection: keep-alive\r\nX-Forwarded-For: 203.0.113.9\r\n\
         Via: 1.0 edge\r\nX-Keep: yes\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    let seen = backend.last();
    for name in [
        "x-hop",
        "x-early",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
    ] {
        assert_eq!(seen.header(name), None, "{name} was forwarded: {seen:?}");
    }
    // The backend sees a fresh Connection field of ours or none, never the client's.
    assert!(!seen.header("connection").unwrap_or("").contains("X-Hop"));
    assert_eq!(seen.header("x-keep"), Some("yes"));
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    // The client's own X-Forwarded-Proto and -Host are replaced, not added to.
    let all = |name: &str| -> Vec<&str> {
        seen.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(all("x-forwarded-proto"), ["http"]);
    assert_eq!(all("x-forwarded-host"), ["shop.example"]);
    assert_eq!(seen.header("via"), Some("1.0 edge, 1.1 proxycache"));
    assert_eq!(seen.header("host"), Some("shop.example"));
    // And on the way back.
    assert_eq!(resp.header("x-secret"), None);
    assert_eq!(resp.header("keep-alive"), None);
    assert_eq!(resp.header("via"), Some("1.1 origin-cache, 1.1 proxycache"));
}

#[test]
fn header_order_and_repeats_survive_both_ways() {
    let backend = Backend::start(|_| {
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Mid: m\r\nSet-Cookie: b=2\r\nSet-Cookie: c=3\r\nContent-Length: 0\r\n\r\n".to_vec()
    });
    let proxy = Proxy::start(backend.addr);
    let resp = request(
        proxy.addr,
        "GET / HTTP/1.1\r\nHost: a\r\nX-B: 1\r\nX-A: 2\r\nX-B: 3\r\nCookie: k=v\r\n\r\n",
    );
    assert_eq!(resp.headers_named("set-cookie"), ["a=1", "b=2", "c=3"]);
    let names: Vec<&str> = resp
        .headers
        .iter()
        .map(|(n, _)| n.as_str())
        .take(4)
        .collect();
    assert_eq!(names, ["Set-Cookie", "X-Mid", "Set-Cookie", "Set-Cookie"]);
    let seen = backend.last();
    let sent: Vec<(&str, &str)> = seen
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .take(5)
        .collect();
    assert_eq!(
        sent,
        [
            ("Host", "a"),
            ("X-B", "1"),
            ("X-A", "2"),
            ("X-B", "3"),
            ("Cookie", "k=v")
        ]
    );
}

#[test]
fn raw_target_is_forwarded_unchanged_and_absolute_form_becomes_origin_form() {
    let backend = Backend::ok("x");
    let proxy = Proxy::start(backend.addr);
    let raw = "/a/../b/%2e%2E//c%2F?x=%20&y=1#";
    request(
        proxy.addr,
        &format!("GET {raw} HTTP/1.1\r\nHost: a\r\n\r\n"),
    );
    assert_eq!(backend.last().target, raw);
    request(
        proxy.addr,
        "GET http://origin.example:8080/p?q HTTP/1.1\r\nHost: ignored\r\n\r\n",
    );
    let seen = backend.last();
    assert_eq!(seen.target, "/p?q");
    assert_eq!(seen.header("host"), Some("origin.example:8080"));
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let backend = Backend::start(|req| response(200, &[], req.target.as_bytes()));
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send(
        "GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcHEAD /3 HTTP/1.1\r\nHost: a\r\n\r\nGET /4 HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(client.response().text(), "/1");
    assert_eq!(client.response().text(), "/2");
    let head = client.head_response();
    assert_eq!(head.header("content-length"), Some("2"));
    assert_eq!(client.response().text(), "/4");
    assert_eq!(backend.recorded()[1].body, b"abc");
}

#[test]
fn a_pipeline_longer_than_one_read_is_answered_whole() {
    // About 100 KiB of requests in one write: more than one read takes, so
    // the rest waits in the socket with no new bytes to announce it.
    let backend = Backend::start(|req| response(200, &[], req.target.as_bytes()));
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    let pipeline: String = (0..3000)
        .map(|i| format!("GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n"))
        .collect();
    // Written beside the reading, so neither side's buffers fill and stall the other.
    let mut writer = client.stream.try_clone().unwrap();
    let writing = std::thread::spawn(move || writer.write_all(pipeline.as_bytes()).unwrap());
    for i in 0..3000 {
        assert_eq!(client.response().text(), format!("/{i}"));
    }
    writing.join().unwrap();
}

#[test]
fn a_request_sent_while_the_previous_waits_for_its_upstream_is_answered() {
    // The second request arrives while its connection is busy: its one
    // readiness event must not be lost.
    let backend = Backend::start(|req| {
        if req.target == "/slow" {
            std::thread::sleep(Duration::from_millis(300));
        }
        response(200, &[], req.target.as_bytes())
    });
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send("GET /slow HTTP/1.1\r\nHost: a\r\n\r\n");
    std::thread::sleep(Duration::from_millis(100));
    client.send("GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(client.response().text(), "/slow");
    assert_eq!(client.response().text(), "/next");
}

/// A proxy with one worker, which would hold a silent connection for 30 s.
fn patient_proxy(backend: &Backend) -> Proxy {
    Proxy::with(
        backend.addr,
        Conf {
            server: "workers = 1\nheader_timeout = \"30s\"\nkeepalive_timeout = \"30s\"",
            ..Conf::default()
        },
    )
}

/// Sends `bytes`, then the end of the stream, while the proxy is stopped:
/// both wait in the socket before any worker reads it. That is one
/// readiness event, and a read that empties the socket without saying the
/// end has come.
fn send_and_hang_up_unseen(proxy: &Proxy, client: &mut Client, bytes: &str) {
    std::thread::sleep(Duration::from_millis(100)); // accepted and parked
    proxy.stop();
    client.send(bytes);
    client.finish_writing();
    std::thread::sleep(Duration::from_millis(50));
    proxy.signal("CONT");
}

#[test]
fn a_client_that_hangs_up_after_part_of_a_head_is_let_go_at_once() {
    let backend = Backend::ok("hi");
    let proxy = patient_proxy(&backend);
    let mut client = Client::connect(proxy.addr);
    send_and_hang_up_unseen(&proxy, &mut client, "GET / HTTP/1.1\r\nHost: a\r\n");
    let started = std::time::Instant::now();
    assert!(client.is_closed());
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
}

#[test]
fn a_pipeline_followed_by_a_hang_up_is_answered_then_closed() {
    let backend = Backend::start(|req| response(200, &[], req.target.as_bytes()));
    let proxy = patient_proxy(&backend);
    let mut client = Client::connect(proxy.addr);
    let pipeline = "GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n";
    send_and_hang_up_unseen(&proxy, &mut client, pipeline);
    let started = std::time::Instant::now();
    assert_eq!(client.response().text(), "/1");
    assert_eq!(client.response().text(), "/2");
    assert!(client.is_closed());
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
}

#[test]
fn an_upstream_head_that_arrives_in_pieces_is_awaited_whole() {
    let backend = Backend::raw(|mut stream| {
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        while read_request(&mut reader).is_some() {
            for piece in ["HTTP/1.1 200 OK\r\nContent-Le", "ngth: 2\r\n\r", "\nok"] {
                stream.write_all(piece.as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    for _ in 0..2 {
        client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(client.response().text(), "ok");
    }
}

#[test]
fn http10_clients_get_keep_alive_only_when_asked() {
    let backend = Backend::ok("hi");
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send("GET / HTTP/1.0\r\n\r\n");
    let resp = client.response();
    assert_eq!(resp.text(), "hi");
    assert!(client.is_closed());

    let mut client = Client::connect(proxy.addr);
    client.send("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let resp = client.response();
    assert_eq!(resp.header("connection"), Some("keep-alive"));
    client.send("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(client.response().text(), "hi");
}

#[test]
fn connection_close_is_honoured() {
    let backend = Backend::ok("hi");
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert_eq!(client.response().header("connection"), Some("close"));
    assert!(client.is_closed());
}

#[test]
fn no_body_for_head_204_and_304() {
    let backend = Backend::start(|req| match req.target.as_str() {
        "/204" => b"HTTP/1.1 204 No Content\r\nX: 1\r\n\r\n".to_vec(),
        "/304" => b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n".to_vec(),
        _ if req.method == "HEAD" => b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n".to_vec(),
        _ => response(200, &[], b"body"),
    });
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n");
    let head = client.head_response();
    assert_eq!(head.header("content-length"), Some("1234"));
    for path in ["/204", "/304"] {
        client.send(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n"));
        let resp = client.response();
        assert_eq!(resp.header("content-length"), None, "{path}");
        assert_eq!(resp.header("transfer-encoding"), None, "{path}");
    }
    // Had any of them carried a body, this response would be misread.
    client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(client.response().text(), "body");
}

#[test]
fn interim_responses_are_passed_through() {
    let backend = Backend::start(|_| {
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
    });
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    let early = client.response();
    assert_eq!(early.status, 103);
    assert_eq!(early.header("link"), Some("</style.css>; rel=preload"));
    assert_eq!(client.response().text(), "ok");
}

#[test]
fn an_interim_response_before_the_body_is_all_sent_does_not_stop_the_upload() {
    // The backend sends 103 as soon as it has the head, then reads the
    // whole body: a 1xx is no answer, so the body must still go through.
    let backend = Backend::raw(|stream| {
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        let mut length = 0;
        let mut line = String::new();
        while line != "\r\n" {
            line.clear();
            std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        stream
            .write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
            .unwrap();
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).unwrap();
        let _ = stream.write_all(&response(200, &[], body.len().to_string().as_bytes()));
    });
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send("PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n");
    client.send([b'u'; 1000]);
    std::thread::sleep(Duration::from_millis(300));
    client.send([b'u'; 199_000]);
    assert_eq!(client.response().status, 103);
    assert_eq!(client.response().text(), "200000");
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let backend = Backend::start(|req| response(200, &[], &req.body));
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send("PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    let interim = client.response();
    assert_eq!(interim.status, 100);
    client.send("hello");
    let resp = client.response();
    assert_eq!(resp.text(), "hello");
    assert_eq!(backend.last().header("expect"), None);
}

#[test]
fn a_large_body_arrives_whole_and_the_request_pipelined_after_it_too() {
    // Past the piece read with the head, the body goes socket to socket by
    // splice: exactly its length, in order, and not a byte of what follows.
    let backend = Backend::start(|req| response(200, &[], req.body.len().to_string().as_bytes()));
    let proxy = Proxy::start(backend.addr);
    let body: Vec<u8> = (0..3_000_017u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut bytes = format!(
        "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
    let mut client = Client::connect(proxy.addr);
    for piece in bytes.chunks(100_003) {
        client.stream.write_all(piece).unwrap();
    }
    assert_eq!(client.response().text(), body.len().to_string());
    assert_eq!(client.response().text(), "0");
    let seen = backend.recorded();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].body == body, "the body upstream differs");
    assert_eq!(seen[1].target, "/next");
}

#[test]
fn chunked_bodies_stream_both_ways_with_trailers() {
    let backend = Backend::start(|req| {
        let mut out =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n".to_vec();
        out.extend_from_slice(format!("{:x};ext=1\r\n", req.body.len()).as_bytes());
        out.extend_from_slice(&req.body);
        out.extend_from_slice(b"\r\n3\r\nend\r\n0\r\nX-Sum: 42\r\n\r\n");
        out
    });
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4;a=b\r\nabcd\r\n2\r\nef\r\n0\r\nX-Client-Trailer: t\r\n\r\n");
    let resp = client.response();
    assert_eq!(resp.text(), "abcdefend");
    assert_eq!(resp.trailers, [("X-Sum".to_owned(), "42".to_owned())]);
    let seen = backend.last();
    assert_eq!(seen.body, b"abcdef");
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    assert_eq!(
        seen.trailers,
        [("X-Client-Trailer".to_owned(), "t".to_owned())]
    );
}

#[test]
fn a_close_delimited_upstream_body_is_chunked_for_11_and_closed_for_10() {
    let backend = Backend::raw(|mut stream| {
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        read_request(&mut reader).unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close body")
            .unwrap();
    });
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    let resp = client.response();
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(resp.text(), "until-close body");
    client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(
        client.response().text(),
        "until-close body",
        "the client connection stays usable"
    );

    let mut client = Client::connect(proxy.addr);
    client.send("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let mut raw = String::new();
    client.reader.read_to_string(&mut raw).unwrap();
    assert!(raw.contains("Connection: close"), "{raw}");
    assert!(raw.ends_with("\r\n\r\nuntil-close body"), "{raw}");
}

#[test]
fn upstream_connections_are_reused() {
    let backend = Backend::ok("x");
    let proxy = Proxy::start(backend.addr);
    for _ in 0..20 {
        assert_eq!(get(proxy.addr, "/").status, 200);
    }
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[test]
fn a_stale_pooled_connection_is_retried_once_for_idempotent_requests() {
    // Each connection answers one request, then reads the next and closes
    // without answering: the race between reuse and an upstream's idle close.
    let backend = Backend::raw(|stream| {
        let mut reader = answer_first_request(stream);
        read_request(&mut reader);
    });
    let connections = || {
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let mut proxy = Proxy::start(backend.addr);
    assert_eq!(get(proxy.addr, "/").text(), "GET");
    assert_eq!(
        get(proxy.addr, "/").text(),
        "GET",
        "retried on a fresh connection"
    );
    assert_eq!(connections(), 2);
    let post = request(
        proxy.addr,
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(post.status, 502, "POST is never retried");
    assert_eq!(connections(), 2);
    let id = post.header("x-request-id").unwrap().to_owned();
    let line = proxy.wait_for_log("upstream closed the connection");
    assert!(
        line.contains(&id),
        "the log line carries the request id: {line}"
    );
}

#[test]
fn an_idle_pooled_connection_closed_by_the_upstream_is_not_used() {
    let backend = Backend::raw(|stream| {
        answer_first_request(stream);
    });
    let proxy = Proxy::start(backend.addr);
    assert_eq!(get(proxy.addr, "/").text(), "GET");
    std::thread::sleep(Duration::from_millis(100));
    let post = request(
        proxy.addr,
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(
        post.text(),
        "POST",
        "the liveness check saw the close before handing it out"
    );
}

/// Answers the first request on `stream` with its method name; returns the
/// reader for whatever the proxy sends next.
fn answer_first_request(
    mut stream: std::net::TcpStream,
) -> std::io::BufReader<std::net::TcpStream> {
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    if let Some(req) = read_request(&mut reader) {
        stream
            .write_all(&response(200, &[], req.method.as_bytes()))
            .unwrap();
    }
    reader
}

/// Bodies of every size around the read buffer's come through byte for
/// byte on one keep-alive connection each way, whether they arrived with the
/// head or long after it.
#[test]
fn bodies_of_every_size_arrive_whole_and_the_upstream_connection_is_reused() {
    let sizes = [
        0usize,
        1,
        1000,
        65_535,
        65_536,
        65_537,
        300_000,
        (1 << 20) + 3,
    ];
    let body = |n: usize| -> Vec<u8> { (0..n).map(|i| (i * 31 % 251) as u8).collect() };
    let backend = Backend::start(move |req| {
        let n: usize = req.target[1..].parse().unwrap();
        // no-store: straight through, not stored.
        response(200, &[("Cache-Control", "no-store")], &body(n))
    });
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    for n in sizes {
        client.send(format!("GET /{n} HTTP/1.1\r\nHost: a\r\n\r\n"));
        let resp = client.response();
        assert_eq!(resp.header("content-length"), Some(n.to_string().as_str()));
        assert!(resp.body == body(n), "a body of {n} bytes differs");
    }
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the upstream connection served every request"
    );
}
