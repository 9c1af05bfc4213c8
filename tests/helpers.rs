//! Helper workers: one starts on a home whose worker is held, and ends once
//! that worker is free. No built-in stage holds a worker (every wait is on
//! the event loop), but a module hook can: these tests run the real server
//! loop with a stage that holds its worker on `/hold` until a `/release`
//! arrives, in a child process (this test binary, run again as
//! `child_server`), so that it can be stopped and continued with signals
//! and its worker threads counted.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use proxycache::config::Config;
use proxycache::http::Request;
use proxycache::pipeline::{Context, Downstream, Flow, Module, Response, Stage};
use proxycache::server::Server;

use common::*;

/// Where the child finds its config.
const CHILD_CONFIG: &str = "PROXYCACHE_HELPERS_CHILD_CONFIG";

/// Holds its worker on `/hold` until `/release`.
struct Holding(AtomicBool);

impl Module for Holding {
    fn handle(&self, req: &mut Request, _: &mut Downstream, _: &mut Context) -> Flow {
        match req.target.as_str() {
            "/hold" => {
                while !self.0.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
                Flow::Respond(Response::text(200, "held"))
            }
            "/release" => {
                self.0.store(true, Ordering::SeqCst);
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
        module: Box::new(Holding(AtomicBool::new(false))),
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
    let until = Instant::now() + Duration::from_secs(5);
    while worker_threads(proxy.pid()) < 3 {
        assert!(Instant::now() < until, "no helper started");
        thread::sleep(Duration::from_millis(10));
    }
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
