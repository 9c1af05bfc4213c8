//! Helper workers: one starts on a home whose worker is held, and ends once
//! that worker is free. No built-in stage holds a worker (every wait is on
//! the event loop), but a module hook can: these tests run the real server
//! loop with a stage that holds its worker on `/hold` until a `/release`
//! arrives, in a child process (this test binary, run again as
//! `child_server`), so that it can be stopped and continued with signals
//! and its worker threads counted.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use proxycache::config::Config;
use proxycache::http::Request;
use proxycache::pipeline::{Context, Downstream, Flow, Module, Response, Stage};
use proxycache::server::Server;

use common::*;

/// Where the child finds its config.
const CHILD_CONFIG: &str = "PROXYCACHE_HELPERS_CHILD_CONFIG";

/// How long a released `/hold` keeps its worker: a helper that serves the
/// `/release` finds that worker still held, and stays.
const LINGER: Duration = Duration::from_millis(100);

/// Holds its worker on `/hold` until a `/release` arrives (one each, in
/// either order), and `LINGER` after it.
struct Holding {
    releases: AtomicUsize,
}

impl Module for Holding {
    fn handle(&self, req: &mut Request, _: &mut Downstream, _: &mut Context) -> Flow {
        match req.target.as_str() {
            "/hold" => {
                let take_one = |n: usize| n.checked_sub(1);
                while self
                    .releases
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, take_one)
                    .is_err()
                {
                    thread::sleep(Duration::from_millis(5));
                }
                thread::sleep(LINGER);
                Flow::Respond(Response::text(200, "held"))
            }
            "/release" => {
                self.releases.fetch_add(1, Ordering::SeqCst);
                Flow::Respond(Response::text(200, "released"))
            }
            _ => Flow::Continue,
        }
    }
}

#[test]
#[ignore = "the server the other tests here start in a child process"]
fn child_server() {
    let path = std::env::var(CHILD_CONFIG).expect("run by the tests in this file");
    let (config, _) = Config::load(path.as_ref()).unwrap();
    proxycache::logging::init(&config.log).unwrap();
    let stage = Stage {
        name: "holding".into(),
        priority: 100,
        module: Box::new(Holding {
            releases: AtomicUsize::new(0),
        }),
    };
    let _server = Server::start(&config, vec![stage]).unwrap();
    proxycache::logging::flush();
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// The server with the holding stage, in front of `backend`.
fn holding_proxy(backend: &Backend, server: &str) -> Proxy {
    let text = Proxy::config_text(
        backend.addr,
        Conf {
            server,
            ..Conf::default()
        },
    );
    Proxy::launch(&text, |config| {
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command
            .args(["child_server", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_CONFIG, config);
        command
    })
}

/// Sends `GET /hold` on `client`; the thread returns the answer's body.
fn hold(mut client: Client) -> thread::JoinHandle<String> {
    client.send("GET /hold HTTP/1.1\r\nHost: a\r\n\r\n");
    thread::spawn(move || client.response().text())
}

/// Waits for `n` worker threads in all (helpers start within two
/// housekeeping ticks of being needed).
fn wait_for_workers(proxy: &Proxy, n: usize) {
    let until = Instant::now() + Duration::from_secs(5);
    while worker_threads(proxy.pid()) < n {
        assert!(Instant::now() < until, "no helper started");
        thread::sleep(Duration::from_millis(10));
    }
}

fn release(proxy: &Proxy) {
    assert!(get(proxy.addr, "/release").text().contains("released"));
}

#[test]
fn a_held_worker_is_replaced_while_the_others_keep_serving() {
    // One of two workers is held while the other stays busy serving (so
    // the server as a whole makes progress): the pool must still grow
    // until two workers are free again.
    let backend = Backend::ok("fine");
    let proxy = holding_proxy(&backend, "workers = 2");
    assert_eq!(worker_threads(proxy.pid()), 2);
    let held = hold(Client::connect(proxy.addr));
    let until = Instant::now() + Duration::from_secs(5);
    while worker_threads(proxy.pid()) < 3 {
        assert!(Instant::now() < until, "no helper started");
        assert_eq!(get(proxy.addr, "/").text(), "fine");
    }
    release(&proxy);
    assert!(held.join().unwrap().contains("held"));
}

#[test]
fn a_helper_ends_once_the_worker_it_stood_in_for_is_free() {
    // A helper shares its home's connections with that home's own worker
    // while it is held; after that, two threads would only take turns with
    // them. It must end at its next event, not after idling for two seconds
    // (which steady traffic would never let it do).
    let backend = Backend::ok("fine");
    let proxy = holding_proxy(&backend, "workers = 2");
    let held = hold(Client::connect(proxy.addr));
    wait_for_workers(&proxy, 3);
    release(&proxy);
    assert!(held.join().unwrap().contains("held"));
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
    // A worker takes several events per wait. Stopped while a request that
    // holds it and then a bad request arrive, the single worker wakes to
    // both events at once, in that order, and is held by the first. The
    // bad request must not wait with it, but go to the helper that takes
    // over the worker's home.
    let backend = Backend::ok("fine");
    let proxy = holding_proxy(&backend, "workers = 1");
    let holder = Client::connect(proxy.addr);
    let mut bad = Client::connect(proxy.addr);
    thread::sleep(Duration::from_millis(200)); // both accepted and parked
    proxy.stop();
    let held = hold(holder);
    thread::sleep(Duration::from_millis(50));
    bad.send("BAD\r\n\r\n");
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    proxy.signal("CONT");
    assert_eq!(bad.response().status, 400);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the bad request waited {took:?}"
    );
    release(&proxy);
    assert!(held.join().unwrap().contains("held"));
}

#[test]
fn events_left_by_a_held_worker_reach_a_helper_while_the_others_sleep() {
    // A worker takes every event ready in one wait and serves them in turn.
    // If the first holds it, the rest wait in the home's backlog, and a
    // worker asleep in its wait is not woken for them: housekeeping must
    // start a helper, though not every worker of the home is held.
    let backend = Backend::ok("fine");
    let proxy = holding_proxy(&backend, "workers = 1");
    let mut holder = Client::connect(proxy.addr);
    let mut other = Client::connect(proxy.addr);
    for client in [&mut holder, &mut other] {
        client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(client.response().text(), "fine");
    }
    // The worker and a helper, both free and asleep in their wait. These
    // clients stay connected: a hang-up is an event, which would end the
    // helper.
    let mut first = Client::connect(proxy.addr);
    first.send("GET /hold HTTP/1.1\r\nHost: a\r\n\r\n");
    wait_for_workers(&proxy, 2);
    let mut releaser = Client::connect(proxy.addr);
    releaser.send("GET /release HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(releaser.response().text().contains("released"));
    assert!(first.response().text().contains("held"));
    thread::sleep(Duration::from_millis(100));
    assert_eq!(worker_threads(proxy.pid()), 2, "the helper left");
    // Stopped, so that both requests are ready when one of them wakes.
    proxy.stop();
    let held = hold(holder);
    other.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    proxy.signal("CONT");
    assert_eq!(other.response().text(), "fine");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "the request waited {took:?}");
    release(&proxy);
    assert!(held.join().unwrap().contains("held"));
}
