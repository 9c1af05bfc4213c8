//! Idle keep-alive clients cost no thread; bodies stream with bounded memory.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
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
    let received =
        std::io::copy(&mut (&mut client.reader).take(GIB), &mut std::io::sink()).unwrap();
    assert_eq!(received, GIB);
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
fn stalled_uploads_beyond_the_worker_count_do_not_block_others() {
    // Each stalled upload holds a worker (until body_timeout); with 2 workers
    // and 6 of them, the pool must grow so everyone else is still served.
    let backend = Backend::ok("fine");
    let proxy = two_worker_proxy(&backend);
    let stalled: Vec<TcpStream> = (0..6).map(|_| stalled_upload(proxy.addr)).collect();
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(proxy.addr, "/").text(), "fine");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "20 requests took {took:?}");
    drop(stalled);
}

/// Two workers, and a body timeout long enough to hold one for the whole test.
fn two_worker_proxy(backend: &Backend) -> Proxy {
    Proxy::with(
        backend.addr,
        Conf {
            server: "workers = 2\nbody_timeout = \"10s\"",
            ..Conf::default()
        },
    )
}

/// Worker threads the proxy runs now.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|task| {
            let comm = task.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|name| name.starts_with("worker-"))
        })
        .count()
}

#[test]
fn a_worker_held_by_a_stalled_upload_is_replaced_while_the_others_keep_serving() {
    // One of two workers waits on a stalled body while the other stays busy
    // serving (so the server as a whole makes progress): the pool must still
    // grow until two workers are free again.
    let backend = Backend::ok("fine");
    let proxy = two_worker_proxy(&backend);
    assert_eq!(worker_threads(proxy.pid()), 2);
    let stalled = stalled_upload(proxy.addr);
    let until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < until {
        assert_eq!(get(proxy.addr, "/").text(), "fine");
    }
    // Three, or more if a busy machine held a worker on an ordinary request
    // over a tick too; the old rule kept two.
    let workers = worker_threads(proxy.pid());
    assert!(workers >= 3, "{workers} workers");
    drop(stalled);
}

#[test]
fn a_helper_ends_once_the_worker_it_stood_in_for_is_free() {
    // A helper shares its home's connections with that home's own worker
    // while it is held; after that, two threads would only take turns with
    // them. It must end at its next event, not after idling for two seconds
    // (which steady traffic would never let it do).
    let backend = Backend::start(|req| response(200, &[], &req.body));
    let proxy = two_worker_proxy(&backend);
    let mut upload = Client::connect(proxy.addr);
    upload.send("PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nfirst");
    let until = Instant::now() + Duration::from_secs(3);
    while worker_threads(proxy.pid()) < 3 {
        assert!(Instant::now() < until, "no helper started");
        thread::sleep(Duration::from_millis(10));
    }
    upload.send("-half");
    assert_eq!(upload.response().text(), "first-half");
    let until = Instant::now() + Duration::from_millis(1500);
    while worker_threads(proxy.pid()) > 2 {
        assert!(Instant::now() < until, "the helper stayed");
        // Connections take the homes in turn: these reach the helper's too.
        assert_eq!(get(proxy.addr, "/").status, 200);
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn events_taken_with_a_blocking_one_go_to_the_helper() {
    // A worker takes several events per wait. Stopped while a stalled
    // upload and a plain GET arrive, the single worker wakes to both at once
    // and blocks on the upload's body; the GET must not wait with it for the
    // body timeout, but go to the helper that takes over the worker's home.
    let backend = Backend::start(|req| response(200, &[], &req.body));
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "workers = 1\nbody_timeout = \"10s\"",
            ..Conf::default()
        },
    );
    let mut upload = Client::connect(proxy.addr);
    let mut plain = Client::connect(proxy.addr);
    thread::sleep(Duration::from_millis(200)); // both accepted and parked
    proxy.signal("STOP");
    upload.send("PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab");
    plain.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    proxy.signal("CONT");
    assert_eq!(plain.response().status, 200);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "the GET waited {took:?}");
    upload.send("cdefghij");
    assert_eq!(upload.response().text(), "abcdefghij");
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
    let proxy = Proxy::start(backend.addr);
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
