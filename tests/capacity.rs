//! Idle keep-alive clients cost no thread; bodies stream with bounded memory.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const GIB: u64 = 1 << 30;

/// Tests that each hold thousands of sockets in this process take turns, so
/// together they stay under its descriptor limit.
static MANY_SOCKETS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn many_sockets() -> std::sync::MutexGuard<'static, ()> {
    MANY_SOCKETS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Samples the proxy's RSS until stopped; returns the peak in KiB.
fn watch_rss(pid: u32) -> (Arc<AtomicBool>, thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = thread::spawn(move || {
        let mut peak = 0;
        while !flag.load(Ordering::Relaxed) {
            peak = peak.max(rss_kb(pid));
            thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    (stop, handle)
}

#[test]
fn five_thousand_idle_keep_alive_clients_pin_no_worker() {
    let _turn = many_sockets();
    let backend = Backend::ok("fine");
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "workers = 8",
            ..Conf::default()
        },
    );
    let mut idle = Vec::with_capacity(5000);
    for _ in 0..5000 {
        let mut client = Client::connect(proxy.addr);
        client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        idle.push(client);
    }
    for client in &mut idle {
        assert_eq!(client.response().status, 200);
    }
    // All 5000 are now idle keep-alive connections, with 8 workers.
    thread::sleep(Duration::from_millis(200));
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(get(proxy.addr, "/").text(), "fine");
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(100),
        "a new client waited {slowest:?}"
    );
    let rss_mb = proxy.rss_kb() / 1024;
    assert!(rss_mb < 150, "RSS {rss_mb} MB with 5000 idle connections");
    // And they are still alive and usable.
    for client in idle.iter_mut().step_by(500) {
        client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(client.response().text(), "fine");
    }
}

#[test]
fn a_1_gib_download_streams_in_bounded_memory() {
    let backend = Backend::raw(|mut stream| {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        read_request(&mut reader).unwrap();
        stream
            .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {GIB}\r\n\r\n").as_bytes())
            .unwrap();
        let block = vec![b'x'; 256 * 1024];
        let mut left = GIB;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            if stream.write_all(&block[..n]).is_err() {
                return;
            }
            left -= n as u64;
        }
    });
    let proxy = Proxy::start(backend.addr);
    let before = proxy.rss_kb();
    let (stop, peak) = watch_rss(proxy.pid());
    let mut client = Client::connect(proxy.addr);
    client.send("GET /big HTTP/1.1\r\nHost: a\r\n\r\n");
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        let mut byte = [0u8];
        client.reader.read_exact(&mut byte).unwrap();
        head.push(byte[0] as char);
    }
    assert!(head.contains(&format!("Content-Length: {GIB}")), "{head}");
    // Counted as it comes, so a stall says how far the body got (it once
    // failed here on an overloaded machine, and did not say).
    let mut received = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    while received < GIB {
        let want = buf.len().min((GIB - received) as usize);
        match client.reader.read(&mut buf[..want]) {
            Ok(0) => panic!("closed after {received} bytes; log: {:?}", proxy.logs()),
            Ok(n) => received += n as u64,
            Err(e) => panic!(
                "{:?} after {received} bytes: {e}; log: {:?}",
                e.kind(),
                proxy.logs()
            ),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let growth_mb = peak.join().unwrap().saturating_sub(before) / 1024;
    assert!(growth_mb < 32, "RSS grew {growth_mb} MB");
}

#[test]
fn a_1_gib_upload_streams_in_bounded_memory() {
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let backend = Backend::raw(move |mut stream| {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while line != "\r\n" {
            line.clear();
            std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        }
        let n = std::io::copy(&mut (&mut reader).take(GIB), &mut std::io::sink()).unwrap();
        counter.store(n, Ordering::SeqCst);
        stream.write_all(&response(200, &[], b"stored")).unwrap();
    });
    let proxy = Proxy::start(backend.addr);
    let before = proxy.rss_kb();
    let (stop, peak) = watch_rss(proxy.pid());
    let mut client = Client::connect(proxy.addr);
    client.send(format!(
        "PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: {GIB}\r\n\r\n"
    ));
    let block = vec![b'y'; 256 * 1024];
    for _ in 0..GIB / block.len() as u64 {
        client.stream.write_all(&block).unwrap();
    }
    assert_eq!(client.response().text(), "stored");
    assert_eq!(received.load(Ordering::SeqCst), GIB);
    stop.store(true, Ordering::Relaxed);
    let growth_mb = peak.join().unwrap().saturating_sub(before) / 1024;
    assert!(growth_mb < 32, "RSS grew {growth_mb} MB");
}

#[test]
fn stalled_uploads_hold_no_worker() {
    // One worker and no helpers allowed: an upload waiting for its body must
    // wait like an idle connection does, not on the worker's thread.
    let backend = Backend::start(|req| response(200, &[], &req.body));
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "workers = 1\nmax_workers = 1\nbody_timeout = \"10s\"",
            ..Conf::default()
        },
    );
    let mut uploads: Vec<Client> = (0..4).map(|_| Client::connect(proxy.addr)).collect();
    for (i, upload) in uploads.iter_mut().enumerate() {
        let chunked = i % 2 == 1;
        upload.send(if chunked {
            "PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
        } else {
            "PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nfirst"
        });
    }
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(proxy.addr, "/").status, 200);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "20 requests took {took:?}");
    assert_eq!(worker_threads(proxy.pid()), 1);
    // Each upload goes on where it stopped, in pieces.
    for (i, upload) in uploads.iter_mut().enumerate() {
        let chunked = i % 2 == 1;
        upload.send(if chunked { "2\r\n-h\r\n" } else { "-h" });
        thread::sleep(Duration::from_millis(20));
        upload.send(if chunked {
            "3\r\nalf\r\n0\r\n\r\n"
        } else {
            "alf"
        });
        assert_eq!(upload.response().text(), "first-half");
    }
}

#[test]
fn a_large_upload_sent_in_pauses_arrives_whole() {
    // Spliced while it arrives: each pause leaves the splice part way.
    let backend = Backend::start(|req| {
        let sum: u64 = req.body.iter().map(|&b| u64::from(b)).sum();
        response(200, &[], format!("{} {sum}", req.body.len()).as_bytes())
    });
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "workers = 1\nmax_workers = 1",
            ..Conf::default()
        },
    );
    let piece: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let mut upload = Client::connect(proxy.addr);
    let total = piece.len() * 8;
    upload.send(format!(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {total}\r\n\r\n"
    ));
    for _ in 0..8 {
        upload.send(&piece);
        // Meanwhile the one worker serves others.
        assert_eq!(get(proxy.addr, "/").status, 200);
    }
    let sum: u64 = piece.iter().map(|&b| u64::from(b)).sum::<u64>() * 8;
    assert_eq!(upload.response().text(), format!("{total} {sum}"));
}

/// A proxy with one worker and no helpers allowed: whatever holds that
/// worker holds every request.
fn one_worker_proxy(backend: std::net::SocketAddr) -> Proxy {
    Proxy::with(
        backend,
        Conf {
            server: "workers = 1\nmax_workers = 1\nwrite_timeout = \"10s\"",
            ..Conf::default()
        },
    )
}

/// 20 requests for `/` (answered `fine`) take well under the 10 s a held
/// worker would make them wait.
fn assert_the_worker_is_free(addr: std::net::SocketAddr) {
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(addr, "/").text(), "fine");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "20 requests took {took:?}");
}

#[test]
fn slow_readers_hold_no_worker() {
    // A response waiting for a client that does not read must wait in the
    // event loop, not on the worker.
    let big: Vec<u8> = (0..16 << 20).map(|i: u32| (i % 251) as u8).collect();
    let expected = big.clone();
    let backend = Backend::start(move |req| match req.target.as_str() {
        "/big" => response(200, &[], &big),
        _ => response(200, &[], b"fine"),
    });
    let proxy = one_worker_proxy(backend.addr);
    let mut readers: Vec<Client> = (0..3).map(|_| Client::connect(proxy.addr)).collect();
    for reader in &mut readers {
        reader.send("GET /big HTTP/1.1\r\nHost: a\r\n\r\n");
    }
    thread::sleep(Duration::from_millis(300));
    assert_the_worker_is_free(proxy.addr);
    // Each reader then takes its response in small sips, with pauses.
    for reader in &mut readers {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            reader.reader.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let mut body = vec![0u8; expected.len()];
        for (i, sip) in body.chunks_mut(256 * 1024).enumerate() {
            reader.reader.read_exact(sip).unwrap();
            if i % 8 == 0 {
                thread::sleep(Duration::from_millis(5));
            }
        }
        assert!(body == expected, "the body arrived changed");
    }
}

#[test]
fn interim_responses_for_a_client_that_reads_nothing_hold_no_worker() {
    // 12 MB of 103s, more than the sockets between proxy and client hold:
    // those with no room wait (or, past the first, are dropped) in the event
    // loop, not on the one worker.
    let link = format!("</{}.css>; rel=preload", "s".repeat(2000));
    let hints = format!("HTTP/1.1 103 Early Hints\r\nLink: {link}\r\n\r\n").repeat(6000);
    let backend = Backend::start(move |req| match req.target.as_str() {
        "/hints" => [hints.as_bytes(), &response(200, &[], b"done")].concat(),
        _ => response(200, &[], b"fine"),
    });
    let proxy = one_worker_proxy(backend.addr);
    let mut reader = Client::connect(proxy.addr);
    reader.send("GET /hints HTTP/1.1\r\nHost: a\r\n\r\n");
    thread::sleep(Duration::from_millis(300));
    assert_the_worker_is_free(proxy.addr);
    // What it then reads is whole 103s, fewer than were sent, and the answer.
    let mut interims = 0;
    let last = loop {
        let resp = reader.response();
        if resp.status != 103 {
            break resp;
        }
        assert_eq!(resp.header("link"), Some(link.as_str()));
        interims += 1;
    };
    assert!(
        (1..6000).contains(&interims),
        "{interims} interim responses"
    );
    assert_eq!(last.text(), "done");
}

/// A backend that answers `fine`, except that `/stall` gets the first half
/// of its body at once and the rest only once `release` is set, and that it
/// reads nothing of a `PUT /stall`'s body until then (and then answers with
/// the body's length). `/refuse` gets a 413 at once (`/refuse-later`, 300 ms
/// on), and none of its body is read.
fn stalling_backend(release: Arc<AtomicBool>) -> Backend {
    stalling_backend_on(TcpListener::bind("127.0.0.1:0").unwrap(), release)
}

/// A stalling backend whose connections have little room for what it does
/// not read: a body sent to it fills the sockets between it and the proxy
/// with kilobytes, not megabytes.
fn narrow_stalling_backend(release: Arc<AtomicBool>) -> Backend {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // Set before listening, so connections start with a window that fits.
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    socket.listen(128).unwrap();
    stalling_backend_on(socket.into(), release)
}

fn stalling_backend_on(listener: TcpListener, release: Arc<AtomicBool>) -> Backend {
    Backend::on(listener, move |stream| {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        let released = || {
            while !release.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(10));
            }
        };
        loop {
            let mut head = Vec::new();
            let mut line = String::new();
            while line != "\r\n" {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                head.push(line.clone());
            }
            let length: usize = head
                .iter()
                .find_map(|l| {
                    let l = l.to_ascii_lowercase();
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let path = head[0].split(' ').nth(1);
            let stalls = path == Some("/stall");
            if stalls && length > 0 {
                released();
            }
            if path == Some("/refuse-later") {
                thread::sleep(Duration::from_millis(300));
            }
            if path.is_some_and(|p| p.starts_with("/refuse")) {
                // Answers at once (or 300 ms later) and reads none of the body.
                let _ = stream.write_all(&response(413, &[], b"too big for me"));
                released();
                return;
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let answer = if length > 0 {
                response(200, &[], length.to_string().as_bytes())
            } else if stalls {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst");
                released();
                b"-half".to_vec()
            } else {
                response(200, &[], b"fine")
            };
            if stream.write_all(&answer).is_err() {
                return;
            }
        }
    })
}

/// Two workers, and upstream timeouts long enough to hold one for the whole test.
/// Sends `GET /stall` and reads the response head and first half.
fn stalled_download(addr: std::net::SocketAddr) -> Client {
    let mut client = Client::connect(addr);
    client.send("GET /stall HTTP/1.1\r\nHost: a\r\n\r\n");
    let mut got = Vec::new();
    while !got.ends_with(b"first") {
        let mut byte = [0u8];
        client.reader.read_exact(&mut byte).unwrap();
        got.push(byte[0]);
    }
    client
}

/// Reads the rest of a stalled download once released.
fn finish_download(mut client: Client) {
    let mut rest = [0u8; 5];
    client.reader.read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"-half");
}

/// Uploads more to `PUT /stall` than the sockets between the proxy and the
/// stalling backend hold: the worker writing it upstream is held until the
/// backend reads. Returns the response, once there is one.
fn upload_to_a_stalled_upstream(mut client: Client) -> thread::JoinHandle<String> {
    const SIZE: usize = 48 << 20;
    client.send(format!(
        "PUT /stall HTTP/1.1\r\nHost: a\r\nContent-Length: {SIZE}\r\n\r\n"
    ));
    thread::spawn(move || {
        client.send(vec![b'u'; SIZE]);
        client.response().text()
    })
}

#[test]
fn stalled_upstream_bodies_hold_no_worker() {
    // Two workers and no helpers allowed: responses whose upstream body has
    // stopped half way wait like any other wait, not on the workers.
    let release = Arc::new(AtomicBool::new(false));
    let backend = stalling_backend(release.clone());
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "workers = 2\nmax_workers = 2",
            rest: "[upstream]\nread_timeout = \"10s\"",
        },
    );
    let stalled: Vec<Client> = (0..6).map(|_| stalled_download(proxy.addr)).collect();
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(proxy.addr, "/").text(), "fine");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "20 requests took {took:?}");
    release.store(true, Ordering::Relaxed);
    stalled.into_iter().for_each(finish_download);
}

#[test]
fn uploads_to_an_upstream_slow_to_read_hold_no_worker() {
    // One worker and no helpers allowed: what an upstream has no room for
    // waits with the exchange (in its pipe or outbox) while the worker
    // serves everyone else.
    let release = Arc::new(AtomicBool::new(false));
    let backend = narrow_stalling_backend(release.clone());
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "workers = 1\nmax_workers = 1",
            rest: "[upstream]\nwrite_timeout = \"10s\"",
        },
    );
    let uploads: Vec<_> = (0..2)
        .map(|_| upload_to_a_stalled_upstream(Client::connect(proxy.addr)))
        .collect();
    thread::sleep(Duration::from_millis(300)); // both stalled upstream
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(get(proxy.addr, "/").text(), "fine");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "10 requests took {took:?}");
    release.store(true, Ordering::Relaxed);
    for upload in uploads {
        assert_eq!(upload.join().unwrap(), (48 << 20).to_string());
    }
}

/// The response to a 48 MiB PUT to `path`, whose body goes on being sent
/// meanwhile: answered before all of it is taken, the rest may fail to send.
fn put_answered_early(addr: std::net::SocketAddr, path: &str) -> Resp {
    const SIZE: usize = 48 << 20;
    let mut client = Client::connect(addr);
    client.send(format!(
        "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {SIZE}\r\n\r\n"
    ));
    let mut body = client.stream.try_clone().unwrap();
    thread::spawn(move || {
        let _ = body.write_all(&vec![b'u'; SIZE]);
    });
    client.response()
}

#[test]
fn an_upstream_that_reads_nothing_gets_504_after_the_write_timeout() {
    let release = Arc::new(AtomicBool::new(false));
    let backend = narrow_stalling_backend(release.clone());
    let mut proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[upstream]\nwrite_timeout = \"500ms\"",
            ..Conf::default()
        },
    );
    let started = Instant::now();
    let resp = put_answered_early(proxy.addr, "/stall");
    assert_eq!(resp.status, 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    proxy.wait_for_log("upstream write timed out");
    release.store(true, Ordering::Relaxed);
}

#[test]
fn an_upstream_that_answers_before_taking_the_body_is_heard_at_once() {
    let release = Arc::new(AtomicBool::new(false));
    let backend = narrow_stalling_backend(release.clone());
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[upstream]\nwrite_timeout = \"20s\"",
            ..Conf::default()
        },
    );
    let started = Instant::now();
    let resp = put_answered_early(proxy.addr, "/refuse");
    assert_eq!((resp.status, resp.text().as_str()), (413, "too big for me"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // That connection still expects the body: the next request opens another.
    assert_eq!(get(proxy.addr, "/").text(), "fine");
    assert_eq!(backend.connections.load(Ordering::Relaxed), 2);
    release.store(true, Ordering::Relaxed);
}

#[test]
fn an_upstream_that_answers_while_the_body_is_still_coming_is_heard_at_once() {
    // The client sends a little of its body, then waits: the upstream's
    // answer, which comes once the proxy waits for more body, goes to the
    // client now, not when the body or body_timeout is done.
    let release = Arc::new(AtomicBool::new(false));
    let backend = stalling_backend(release.clone());
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    let started = Instant::now();
    client.send("PUT /refuse-later HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n");
    client.send([b'u'; 1000]);
    let resp = client.response();
    assert_eq!((resp.status, resp.text().as_str()), (413, "too big for me"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        client.is_closed(),
        "the body was cut short: no next request"
    );
    release.store(true, Ordering::Relaxed);
}

#[test]
fn slow_heads_and_waiting_pipelines_hold_only_their_bytes() {
    let _turn = many_sockets();
    // A connection parked mid-head, or waiting upstream with its next request
    // already read, keeps those bytes and not a whole read buffer (64 KiB).
    let answer = Arc::new(AtomicBool::new(false));
    let go = answer.clone();
    let backend = Backend::raw(move |stream| {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        while let Some(_req) = read_request(&mut reader) {
            while !go.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(10));
            }
            if (&stream).write_all(&response(200, &[], b"late")).is_err() {
                return;
            }
        }
    });
    // The slow heads must outlast the whole test, however loaded the machine.
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "header_timeout = \"60s\"",
            ..Conf::default()
        },
    );
    let before = proxy.rss_kb();
    let mut slow = Vec::new();
    for _ in 0..1000 {
        let mut client = Client::connect(proxy.addr);
        client.send("GET / HTTP/1.1\r\nHost: a\r\nX-Part: ");
        slow.push(client);
    }
    let mut waiting = Vec::new();
    for _ in 0..300 {
        let mut client = Client::connect(proxy.addr);
        client.send("GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n");
        waiting.push(client);
    }
    // Until every upstream request has arrived, each connection has been read.
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.connections.load(Ordering::SeqCst) < 300 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(200));
    let growth_mb = proxy.rss_kb().saturating_sub(before) / 1024;
    // Whole buffers would be 1300 × 64 KiB, over 80 MB.
    assert!(growth_mb < 24, "RSS grew {growth_mb} MB");
    answer.store(true, Ordering::Relaxed);
    for client in &mut waiting {
        assert_eq!(client.response().text(), "late");
        assert_eq!(client.response().text(), "late");
    }
    for client in slow.iter_mut().step_by(100) {
        client.send("1\r\n\r\n");
        assert_eq!(client.response().text(), "late");
    }
}
