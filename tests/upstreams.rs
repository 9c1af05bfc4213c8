//! Upstream groups through the real proxy, with several real backend
//! sockets: routing, each balancing algorithm, server states, active and
//! passive health, the circuit breaker, retries and queueing.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A backend that answers 200 with its name.
fn named(name: &'static str) -> Backend {
    Backend::start(move |_| response(200, &[], name.as_bytes()))
}

fn count(backend: &Backend) -> usize {
    backend.requests.lock().unwrap().len()
}

/// An address nothing listens on: connections are refused.
fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An address whose connections never open: its listener's queue (the
/// shortest there is) is full and never accepted from, so the kernel drops
/// further SYNs, as a firewall that drops them would. Keep what it returns.
fn unanswered() -> (SocketAddr, socket2::Socket, Vec<TcpStream>) {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    while let Ok(filler) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        fillers.push(filler);
        assert!(fillers.len() < 16, "the queue never filled");
    }
    (addr, listener, fillers)
}

/// A proxy whose `api` group has `servers` (TOML inline tables) and `extra`
/// keys, with every request routed to it.
fn proxy_for(group: &str, servers: &[String], extra: &str) -> Proxy {
    let fallback = closed_port();
    Proxy::with(
        fallback,
        Conf {
            server: "",
            rest: &format!(
                "[upstreams.api]\n{group}\nservers = [{}]\n{extra}\n[[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n",
                servers.join(", ")
            ),
        },
    )
}

fn server(addr: SocketAddr, more: &str) -> String {
    format!("{{ addr = \"{addr}\"{more} }}")
}

/// `n` GETs over one keep-alive connection; the response bodies.
fn bodies(proxy: &Proxy, n: usize, path: &str, headers: impl Fn(usize) -> String) -> Vec<String> {
    let mut client = Client::connect(proxy.addr);
    (0..n)
        .map(|i| {
            client.send(format!(
                "GET {path} HTTP/1.1\r\nHost: test\r\n{}\r\n",
                headers(i)
            ));
            let resp = client.response();
            assert_eq!(resp.status, 200, "{}", resp.text());
            resp.text()
        })
        .collect()
}

/// Each server's count is within five standard deviations of its weighted
/// share, taking every request as an independent draw: p2c draws at random
/// (the others come out exact). A fixed 5 % bound failed a correct p2c
/// about once in eighty runs; this one about once in a million, while a
/// spread that ignores the weights still misses by over thirty sigma.
fn assert_share(counts: &[usize], weights: &[usize]) {
    let total = counts.iter().sum::<usize>() as f64;
    let weight = weights.iter().sum::<usize>() as f64;
    for (&c, &w) in counts.iter().zip(weights) {
        let p = w as f64 / weight;
        let sigma = (total * p * (1.0 - p)).sqrt();
        let off = (c as f64 - total * p).abs();
        assert!(
            off <= 5.0 * sigma,
            "counts {counts:?} against weights {weights:?}: {c} is {off:.0} from its share, over 5 sigma of {sigma:.0}"
        );
    }
}

/// Spreads 10,000 requests with `algorithm` over servers of weights 5, 3, 2.
fn spread(algorithm: &str) -> Vec<usize> {
    let backends = [named("a"), named("b"), named("c")];
    let servers: Vec<String> = backends
        .iter()
        .zip([5, 3, 2])
        .map(|(b, w)| server(b.addr, &format!(", weight = {w}")))
        .collect();
    let proxy = proxy_for(&format!("algorithm = \"{algorithm}\""), &servers, "");
    bodies(&proxy, 10_000, "/", |_| String::new());
    backends.iter().map(count).collect()
}

#[test]
fn weighted_algorithms_follow_the_weights_over_10000_requests() {
    for algorithm in ["weighted_round_robin", "least_conn", "p2c"] {
        let counts = spread(algorithm);
        assert_share(&counts, &[5, 3, 2]);
    }
}

#[test]
fn round_robin_spreads_evenly() {
    let counts = spread("round_robin");
    assert_share(&counts, &[1, 1, 1]);
}

#[test]
fn least_conn_sends_new_requests_away_from_a_busy_server() {
    let slow = Backend::start(|req| {
        if req.target == "/slow" {
            thread::sleep(Duration::from_millis(1500));
        }
        response(200, &[], b"slow")
    });
    let fast = named("fast");
    let proxy = proxy_for(
        "algorithm = \"least_conn\"",
        &[server(slow.addr, ""), server(fast.addr, "")],
        "",
    );
    // A request in flight on the slow server (ties go to the first server).
    let addr = proxy.addr;
    let pending = thread::spawn(move || get(addr, "/slow").text());
    thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&slow), 1);
    let answered = bodies(&proxy, 20, "/", |_| String::new());
    assert!(answered.iter().all(|b| b == "fast"), "{answered:?}");
    assert_eq!(count(&slow), 1);
    assert_eq!(pending.join().unwrap(), "slow");
}

#[test]
fn consistent_hash_keeps_users_on_their_server_and_moves_only_those_of_a_server_that_left() {
    let backends = [named("a"), named("b"), named("c")];
    let all: Vec<String> = backends.iter().map(|b| server(b.addr, "")).collect();
    let user = |i: usize| format!("X-User: user-{}\r\n", i % 300);
    let group = "algorithm = \"consistent_hash\"\nhash_key = \"header:X-User\"";

    let proxy = proxy_for(group, &all, "");
    let first = bodies(&proxy, 600, "/", user);
    for i in 0..300 {
        assert_eq!(first[i], first[i + 300], "user-{i} moved between requests");
    }
    for name in ["a", "b", "c"] {
        let users = first[..300].iter().filter(|b| *b == name).count();
        assert!(
            (50..=150).contains(&users),
            "{name} has {users} of 300 users"
        );
    }
    drop(proxy);

    // b leaves: its users spread over a and c; nobody else moves.
    let proxy = proxy_for(group, &[all[0].clone(), all[2].clone()], "");
    let after = bodies(&proxy, 300, "/", user);
    for i in 0..300 {
        if first[i] == "b" {
            assert_ne!(after[i], "b");
        } else {
            assert_eq!(
                after[i], first[i],
                "user-{i} moved though its server stayed"
            );
        }
    }
}

#[test]
fn hashing_on_a_cookie_or_the_client_ip_is_sticky() {
    let backends = [named("a"), named("b"), named("c")];
    let all: Vec<String> = backends.iter().map(|b| server(b.addr, "")).collect();

    let proxy = proxy_for(
        "algorithm = \"consistent_hash\"\nhash_key = \"cookie:session\"",
        &all,
        "",
    );
    let by_cookie = bodies(&proxy, 200, "/", |i| {
        format!("Cookie: theme=dark; session=s{}\r\n", i % 50)
    });
    for i in 0..150 {
        assert_eq!(by_cookie[i], by_cookie[i + 50], "session s{} moved", i % 50);
    }
    assert!(
        ["a", "b", "c"]
            .iter()
            .all(|n| by_cookie.iter().any(|b| b == n)),
        "{by_cookie:?}"
    );

    let proxy = proxy_for("algorithm = \"ip_hash\"", &all, "");
    let by_ip = bodies(&proxy, 30, "/", |_| String::new());
    assert!(by_ip.iter().all(|b| *b == by_ip[0]), "{by_ip:?}");
}

#[test]
fn routes_match_host_path_method_and_header_first_match_wins() {
    let (api, canary, static_files, exact, regex, fallback) = (
        named("api"),
        named("canary"),
        named("static"),
        named("exact"),
        named("regex"),
        named("fallback"),
    );
    let group = |name: &str, b: &Backend| {
        format!("[upstreams.{name}]\nservers = [{}]\n", server(b.addr, ""))
    };
    let config = format!(
        "[server]\nlisten_addr = \"127.0.0.1:0\"\nbackend_addr = \"{}\"\n{}{}{}{}{}\
         [[routes]]\nhost = \"api.example.com\"\npath_prefix = \"/v1/\"\nheader = {{ \"X-Canary\" = \"1\" }}\nupstream = \"canary\"\n\
         [[routes]]\nhost = \"api.example.com\"\npath_prefix = \"/v1/\"\nupstream = \"api\"\nstrip_prefix = true\n\
         [[routes]]\npath_prefix = \"/assets/\"\nreplace_prefix = \"/static/\"\nmethod = \"GET\"\nupstream = \"static\"\n\
         [[routes]]\npath_exact = \"/health\"\nupstream = \"exact\"\n\
         [[routes]]\npath_regex = \"^/items/[0-9]+$\"\nupstream = \"regex\"\n",
        fallback.addr,
        group("api", &api),
        group("canary", &canary),
        group("static", &static_files),
        group("exact", &exact),
        group("regex", &regex),
    );
    let proxy = Proxy::from_config(&config);
    let send = |raw: &str| request(proxy.addr, raw).text();

    assert_eq!(
        send("GET /v1/users?page=2 HTTP/1.1\r\nHost: API.example.com:3000\r\n\r\n"),
        "api"
    );
    assert_eq!(api.last().target, "/users?page=2", "prefix stripped");
    assert_eq!(
        send("GET /v1/users HTTP/1.1\r\nHost: api.example.com\r\nX-Canary: 1\r\n\r\n"),
        "canary"
    );
    assert_eq!(
        canary.last().target,
        "/v1/users",
        "canary route does not strip"
    );
    assert_eq!(
        send("GET /v1/users HTTP/1.1\r\nHost: www.example.com\r\n\r\n"),
        "fallback",
        "host must match"
    );
    assert_eq!(
        send("GET /assets/app.js HTTP/1.1\r\nHost: x\r\n\r\n"),
        "static"
    );
    assert_eq!(
        static_files.last().target,
        "/static/app.js",
        "prefix replaced"
    );
    assert_eq!(
        send("POST /assets/app.js HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        "fallback",
        "method must match"
    );
    assert_eq!(send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"), "exact");
    assert_eq!(
        send("GET /health/deep HTTP/1.1\r\nHost: x\r\n\r\n"),
        "fallback",
        "exact is exact"
    );
    assert_eq!(send("GET /items/42 HTTP/1.1\r\nHost: x\r\n\r\n"), "regex");
    assert_eq!(
        send("GET /items/abc HTTP/1.1\r\nHost: x\r\n\r\n"),
        "fallback"
    );
}

#[test]
fn backups_serve_only_while_every_primary_is_out() {
    let (primary, backup) = (named("primary"), named("backup"));
    let proxy = proxy_for(
        "",
        &[
            server(primary.addr, ""),
            server(backup.addr, ", backup = true"),
        ],
        "",
    );
    assert!(bodies(&proxy, 10, "/", |_| String::new())
        .iter()
        .all(|b| b == "primary"));
    assert_eq!(count(&backup), 0);

    let proxy = proxy_for(
        "",
        &[
            server(primary.addr, ", state = \"down\""),
            server(backup.addr, ", backup = true"),
        ],
        "",
    );
    assert!(bodies(&proxy, 10, "/", |_| String::new())
        .iter()
        .all(|b| b == "backup"));
}

#[test]
fn an_empty_or_all_down_group_answers_503() {
    let down = named("down");
    for servers in [
        vec![],
        vec![
            server(down.addr, ", state = \"down\""),
            server(down.addr, ", state = \"draining\""),
        ],
    ] {
        let mut proxy = proxy_for("", &servers, "");
        let resp = get(proxy.addr, "/");
        assert_eq!(resp.status, 503);
        assert!(
            resp.text().contains("no server available in upstream api"),
            "{}",
            resp.text()
        );
        proxy.wait_for_log("upstream api: no server available → 503");
        // Still serving.
        assert_eq!(get(proxy.addr, "/").status, 503);
    }
    assert_eq!(count(&down), 0);
}

#[test]
fn active_health_checks_take_a_server_out_and_bring_it_back() {
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = healthy.clone();
    let checked = Backend::start(move |req| match req.target.as_str() {
        "/healthz" if flag.load(Ordering::SeqCst) => response(200, &[], b"ok"),
        "/healthz" => response(500, &[], b"sick"),
        _ => response(200, &[], b"checked"),
    });
    let other = Backend::start(|req| match req.target.as_str() {
        "/healthz" => response(200, &[], b"ok"),
        _ => response(200, &[], b"other"),
    });
    let mut proxy = proxy_for(
        "",
        &[server(checked.addr, ""), server(other.addr, "")],
        "[upstreams.api.health]\npath = \"/healthz\"\nhost = \"health.internal\"\nbody = \"ok\"\n\
         interval = \"100ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 3\n",
    );
    let serves_checked = |proxy: &Proxy| {
        bodies(proxy, 6, "/", |_| String::new())
            .iter()
            .any(|b| b == "checked")
    };
    assert!(serves_checked(&proxy));

    // fall × interval = 300ms; allow a probe in flight and scheduling slack.
    healthy.store(false, Ordering::SeqCst);
    let flipped = Instant::now();
    while serves_checked(&proxy) {
        assert!(
            flipped.elapsed() < Duration::from_millis(900),
            "still in after {:?}",
            flipped.elapsed()
        );
        thread::sleep(Duration::from_millis(20));
    }
    proxy.wait_for_log("health check failed 3 times (status 500); taken out");

    healthy.store(true, Ordering::SeqCst);
    let flipped = Instant::now();
    while !serves_checked(&proxy) {
        assert!(
            flipped.elapsed() < Duration::from_millis(800),
            "still out after {:?}",
            flipped.elapsed()
        );
        thread::sleep(Duration::from_millis(20));
    }
    proxy.wait_for_log("health check passed 2 times; back in");
    let probe = checked
        .recorded()
        .into_iter()
        .find(|r| r.target == "/healthz")
        .unwrap();
    assert_eq!(probe.method, "GET");
    assert_eq!(probe.header("host"), Some("health.internal"));
    assert_eq!(probe.header("user-agent"), Some("proxycache-health-check"));
}

#[test]
fn tcp_health_checks_notice_a_server_that_stopped_listening() {
    let live = named("live");
    let gone = closed_port();
    let mut proxy = proxy_for(
        "",
        &[server(live.addr, ""), server(gone, "")],
        "[upstreams.api.health]\ninterval = \"100ms\"\nfall = 2\n",
    );
    proxy.wait_for_log(&format!(
        "server {gone}: health check failed 2 times (connect: Connection refused"
    ));
}

#[test]
fn passive_health_ejects_a_failing_server_for_a_growing_time() {
    let failing = Backend::start(|_| response(500, &[], b"broken"));
    let good = named("good");
    let mut proxy = proxy_for(
        "",
        &[server(failing.addr, ""), server(good.addr, "")],
        "[upstreams.api.outlier]\nmax_fails = 3\nejection = \"1s\"\nmax_ejection = \"10s\"\n",
    );
    let mut client = Client::connect(proxy.addr);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        client.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        statuses.push(client.response().status);
    }
    assert_eq!(
        statuses,
        [500, 200, 500, 200, 500, 200],
        "round-robin until the third failure"
    );
    proxy.wait_for_log(&format!(
        "server {}: 3 failures in a row; ejected for 1s",
        failing.addr
    ));
    assert!(bodies(&proxy, 10, "/", |_| String::new())
        .iter()
        .all(|b| b == "good"));
    assert_eq!(count(&failing), 3);

    // Back after the ejection; three more failures eject it for longer.
    thread::sleep(Duration::from_millis(1100));
    for _ in 0..6 {
        client.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        client.response();
    }
    assert_eq!(count(&failing), 6);
    proxy.wait_for_log("3 failures in a row; ejected for 2s");
}

#[test]
fn bad_request_bodies_do_not_count_against_the_upstream() {
    // Passive health counts what the servers do, not what clients do: four
    // malformed bodies, two per server, must not eject either.
    let (a, b) = (named("a"), named("b"));
    let mut proxy = Proxy::with(
        closed_port(),
        Conf {
            server: "workers = 1",
            rest: &format!(
                "[upstreams.api]\nservers = [{}, {}]\n\
                 [upstreams.api.outlier]\nmax_fails = 2\nejection = \"10s\"\n\
                 [[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n",
                server(a.addr, ""),
                server(b.addr, "")
            ),
        },
    );
    for _ in 0..4 {
        let bad = "POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(request(proxy.addr, bad).status, 400);
    }
    assert_eq!(
        request(proxy.addr, "GET /after HTTP/1.1\r\nHost: test\r\n\r\n").status,
        200
    );
    // One worker logs in order: an ejection would come before this line.
    proxy.wait_for_log("\"GET /after\"");
    let logs = proxy.logs().join("\n");
    assert_eq!(logs.matches("malformed chunked body").count(), 4, "{logs}");
    assert!(!logs.contains("ejected"), "{logs}");
}

#[test]
fn the_circuit_breaker_opens_answers_503_then_probes_and_closes() {
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let backend = Backend::start(move |_| match flag.load(Ordering::SeqCst) {
        true => response(200, &[], b"fine"),
        false => response(503, &[], b"overloaded"),
    });
    let mut proxy = proxy_for(
        "",
        &[server(backend.addr, "")],
        "[upstreams.api.circuit_breaker]\nconsecutive_failures = 3\nfailure_ratio = 0.0\nopen_for = \"1s\"\nhalf_open_probes = 1\n",
    );
    let mut client = Client::connect(proxy.addr);
    let mut send = || {
        client.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        client.response()
    };
    for _ in 0..3 {
        assert_eq!(send().status, 503);
    }
    assert_eq!(count(&backend), 3);
    let rejected = send();
    assert_eq!(rejected.status, 503);
    assert!(rejected
        .text()
        .contains("circuit breaker open for upstream api"));
    assert_eq!(rejected.header("retry-after"), Some("1"));
    assert_eq!(count(&backend), 3, "an open breaker sends nothing upstream");
    proxy.wait_for_log("circuit breaker open");

    // After open_for, one probe goes through; it fails, so open again.
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(send().text(), "overloaded");
    assert!(send().text().contains("circuit breaker open"));
    assert_eq!(count(&backend), 4);

    healthy.store(true, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(send().text(), "fine", "the probe");
    for _ in 0..5 {
        assert_eq!(send().text(), "fine", "closed again");
    }
    proxy.wait_for_log("circuit breaker closed");
}

/// A proxy whose `api` group has `unopened`, where connections do not
/// open, then a good server. Round-robin sends the first GET (and, as the
/// retry takes a turn too, every later one) to `unopened` first: each must
/// be answered by the good server.
fn gets_move_on_from(unopened: SocketAddr, extra: &str) -> Proxy {
    let good = named("good");
    let proxy = proxy_for(
        "",
        &[server(unopened, ""), server(good.addr, "")],
        &format!("[upstreams.api.outlier]\nmax_fails = 0\n{extra}"),
    );
    assert!(bodies(&proxy, 6, "/", |_| String::new())
        .iter()
        .all(|b| b == "good"));
    assert_eq!(count(&good), 6);
    proxy
}

#[test]
fn a_refused_connection_is_retried_on_another_server_but_post_is_not() {
    let mut proxy = gets_move_on_from(closed_port(), "");

    let mut posts = Vec::new();
    for _ in 0..2 {
        let resp = request(
            proxy.addr,
            "POST /form HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi",
        );
        posts.push(resp.status);
    }
    posts.sort();
    assert_eq!(
        posts,
        [200, 502],
        "the POST that met the dead server is not retried"
    );
    proxy.wait_for_log("upstream refused the connection → 502");
}

#[test]
fn a_connect_timeout_moves_on_to_another_server() {
    let (dark, _listener, _fillers) = unanswered();
    let mut proxy = gets_move_on_from(dark, "[upstream]\nconnect_timeout = \"300ms\"\n");
    proxy.wait_for_log("connect timed out; retrying on");
}

/// One worker and no helpers: `/held/…` goes to `held`, the rest to a
/// server that answers `good` (the returned backend); `extra` adds keys.
fn one_worker_proxy(held: SocketAddr, extra: &str) -> (Proxy, Backend) {
    let good = named("good");
    let proxy = Proxy::with(
        closed_port(),
        Conf {
            server: "workers = 1\nmax_workers = 1",
            rest: &format!(
                "{extra}\n[upstreams.held]\nservers = [{}]\n[upstreams.api]\nservers = [{}]\n\
                 [[routes]]\npath_prefix = \"/held/\"\nupstream = \"held\"\n\
                 [[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n",
                server(held, ""),
                server(good.addr, "")
            ),
        },
    );
    (proxy, good)
}

/// Sends `GET /held/0`, `/held/1` and `/held/2`, in that order, on
/// connections of their own, then checks that ten more requests are
/// answered at once meanwhile: the waits hold no worker.
fn three_wait_without_holding_the_worker(proxy: &Proxy) -> Vec<Client> {
    let waiting = (0..3)
        .map(|i| {
            let mut client = Client::connect(proxy.addr);
            client.send(format!("GET /held/{i} HTTP/1.1\r\nHost: t\r\n\r\n"));
            thread::sleep(Duration::from_millis(50));
            client
        })
        .collect();
    let started = Instant::now();
    for i in 0..10 {
        assert_eq!(get(proxy.addr, &format!("/{i}")).text(), "good");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "10 requests took {took:?}"
    );
    waiting
}

#[test]
fn unanswered_connects_hold_no_worker() {
    let (dark, _listener, _fillers) = unanswered();
    let (mut proxy, _good) = one_worker_proxy(dark, "[upstream]\nconnect_timeout = \"2s\"");
    for mut client in three_wait_without_holding_the_worker(&proxy) {
        assert_eq!(client.response().status, 504);
    }
    proxy.wait_for_log("upstream connect timed out → 504");
}

#[test]
fn requests_in_line_for_a_connection_hold_no_worker() {
    // One connection allowed per server: two requests in line behind a
    // slow one take it in turn once it is free.
    let release = Arc::new(AtomicBool::new(false));
    let go = release.clone();
    let slow = Backend::raw(move |stream| {
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        while let Some(req) = read_request(&mut reader) {
            while !go.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(5));
            }
            let body = format!("slow {}", req.target);
            if (&stream)
                .write_all(&response(200, &[], body.as_bytes()))
                .is_err()
            {
                return;
            }
        }
    });
    let (proxy, _good) = one_worker_proxy(
        slow.addr,
        "[pool]\nmax_conns_per_host = 1\n[upstream]\nconnect_timeout = \"5s\"",
    );
    let waiting = three_wait_without_holding_the_worker(&proxy);
    release.store(true, Ordering::SeqCst);
    for (i, mut client) in waiting.into_iter().enumerate() {
        assert_eq!(client.response().text(), format!("slow /held/{i}"));
    }
    assert_eq!(
        slow.connections.load(Ordering::SeqCst),
        1,
        "one connection, in turn"
    );
}

#[test]
fn a_connection_closed_before_the_response_is_retried_for_get_only() {
    let hangs_up = Backend::raw(drop);
    let good = named("good");
    let proxy = proxy_for(
        "",
        &[server(hangs_up.addr, ""), server(good.addr, "")],
        "[upstreams.api.outlier]\nmax_fails = 0\n",
    );
    assert!(bodies(&proxy, 6, "/", |_| String::new())
        .iter()
        .all(|b| b == "good"));
    assert_eq!(
        hangs_up.connections.load(Ordering::SeqCst),
        6,
        "each GET met it first"
    );

    let mut posts = Vec::new();
    for _ in 0..2 {
        posts.push(
            request(
                proxy.addr,
                "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi",
            )
            .status,
        );
    }
    posts.sort();
    assert_eq!(posts, [200, 502]);
}

#[test]
fn listed_statuses_are_retried_elsewhere_and_retry_after_is_respected() {
    let busy = Backend::start(|_| response(503, &[("Retry-After", "2")], b"busy"));
    let good = named("good");
    let proxy = proxy_for(
        "",
        &[server(busy.addr, ""), server(good.addr, "")],
        "[upstreams.api.retry]\nstatuses = [503]\n[upstreams.api.outlier]\nmax_fails = 0\n",
    );
    assert!(bodies(&proxy, 10, "/", |_| String::new())
        .iter()
        .all(|b| b == "good"));
    assert_eq!(count(&busy), 1, "held out for its Retry-After");

    // POST is not retried: the 503 goes to the client as it came.
    let post = |proxy: &Proxy| {
        request(
            proxy.addr,
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
        )
    };
    thread::sleep(Duration::from_millis(2100));
    let statuses: Vec<u16> = (0..2).map(|_| post(&proxy).status).collect();
    assert!(statuses.contains(&503), "{statuses:?}");
    assert_eq!(count(&busy), 2);
}

#[test]
fn retries_stay_within_the_budget() {
    let a = Backend::start(|_| response(503, &[], b"a"));
    let b = Backend::start(|_| response(503, &[], b"b"));
    let proxy = proxy_for(
        "",
        &[server(a.addr, ""), server(b.addr, "")],
        "[upstreams.api.retry]\nstatuses = [503]\nbudget = 0.2\nbudget_burst = 2\nbackoff = \"1ms\"\n\
         [upstreams.api.outlier]\nmax_fails = 0\n",
    );
    let mut client = Client::connect(proxy.addr);
    for _ in 0..100 {
        client.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(client.response().status, 503);
    }
    let upstream = count(&a) + count(&b);
    // 100 first attempts, the burst of 2, and 20% of 100 earned on the way.
    assert!(
        (118..=122).contains(&upstream),
        "{upstream} upstream requests for 100"
    );
}

#[test]
fn max_conns_queues_requests_and_a_full_queue_answers_503() {
    let slow = Backend::start(|_| {
        thread::sleep(Duration::from_millis(400));
        response(200, &[], b"slow")
    });
    let proxy = proxy_for(
        "queue_size = 1\nqueue_timeout = \"3s\"",
        &[server(slow.addr, ", max_conns = 1")],
        "",
    );
    let addr = proxy.addr;
    let started = Instant::now();
    let first = thread::spawn(move || get(addr, "/1"));
    thread::sleep(Duration::from_millis(100));
    let second = thread::spawn(move || (get(addr, "/2"), started.elapsed()));
    thread::sleep(Duration::from_millis(100));
    let third = get(addr, "/3");
    assert_eq!(third.status, 503, "the queue holds one");
    assert!(
        third.text().contains("connection limit"),
        "{}",
        third.text()
    );
    assert_eq!(first.join().unwrap().status, 200);
    let (second, took) = second.join().unwrap();
    assert_eq!(second.status, 200, "queued, then served");
    assert!(
        took >= Duration::from_millis(750),
        "served after the first: {took:?}"
    );

    let proxy = proxy_for(
        "queue_size = 10\nqueue_timeout = \"200ms\"",
        &[server(slow.addr, ", max_conns = 1")],
        "",
    );
    let addr = proxy.addr;
    let first = thread::spawn(move || get(addr, "/1"));
    thread::sleep(Duration::from_millis(100));
    let waited = Instant::now();
    let late = get(addr, "/2");
    assert_eq!(late.status, 503);
    assert!(
        late.text().contains("free within the queue timeout"),
        "{}",
        late.text()
    );
    assert!(
        waited.elapsed() < Duration::from_millis(390),
        "{:?}",
        waited.elapsed()
    );
    assert_eq!(first.join().unwrap().status, 200);
}

#[test]
fn servers_given_by_name_are_resolved() {
    let backend = named("by-name");
    let proxy = proxy_for(
        "",
        &[format!(
            "{{ addr = \"localhost:{}\" }}",
            backend.addr.port()
        )],
        "",
    );
    assert_eq!(get(proxy.addr, "/").text(), "by-name");
}

#[test]
fn upstream_config_mistakes_name_the_key_and_line() {
    let base = "[server]\nlisten_addr = \"127.0.0.1:0\"\n";
    for (rest, needles) in [
        (
            "[upstreams.api]\nservers = []\n\n[[routes]]\npath_prefix = \"/\"\nupstream = \"apj\"\n",
            &["line 8", "routes[0].upstream", "[upstreams.apj]"][..],
        ),
        ("[upstreams.api]\nalgorithm = \"fastest\"\nservers = []\n", &["line 4", "fastest"]),
        ("[upstreams.api]\nalgorithm = \"consistent_hash\"\nservers = []\n", &["upstreams.api", "needs hash_key"]),
        (
            "[upstreams.api]\nservers = [{ addr = \"no-such-host.invalid:80\" }]\n",
            &["line 4", "upstreams.api.servers[0].addr", "cannot resolve"],
        ),
        ("[upstreams.api]\nservers = [{ addr = \"127.0.0.1:80\", weight = 0 }]\n", &["line 4", "weight 0"]),
        ("[[routes]]\npath_regex = \"([a-\"\nupstream = \"x\"\n", &["line 4", "path_regex"]),
        (
            "[upstreams.api]\nservers = []\n[[routes]]\npath_exact = \"/\"\nstrip_prefix = true\nupstream = \"api\"\n",
            &["routes[0]", "need path_prefix"],
        ),
        ("[upstreams.api]\nservers = []\n[upstreams.api.health]\nrise = 2\nintervall = \"1s\"\n", &["line 7", "intervall"]),
    ] {
        let out = refused_start(&format!("{base}{rest}"));
        for needle in needles {
            assert!(out.contains(needle), "{rest:?}: {needle:?} not in {out}");
        }
    }
}

/// Runs the real server loop in-process to change a server's state live.
#[test]
fn a_draining_server_finishes_its_requests_and_takes_no_new_ones() {
    use proxycache::config::Config;
    use proxycache::server::Server;
    use proxycache::upstream::config::AdminState;

    let draining = Backend::start(|req| {
        if req.target == "/slow" {
            thread::sleep(Duration::from_millis(800));
        }
        response(200, &[], b"draining")
    });
    let other = named("other");
    let text = format!(
        "[server]\nlisten_addr = \"127.0.0.1:0\"\nworkers = 4\n[log]\naccess_log = \"off\"\n\
         [upstreams.api]\nservers = [{}, {}]\n[[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n",
        server(draining.addr, ""),
        server(other.addr, "")
    );
    let config = Config::parse(&text, std::path::Path::new("test.toml")).unwrap();
    let proxy = Server::start(&config, Vec::new()).unwrap();
    let addr = proxy.local_addr();

    // Round-robin starts with the first server.
    let in_flight = thread::spawn(move || get(addr, "/slow"));
    thread::sleep(Duration::from_millis(200));
    let name = draining.addr.to_string();
    proxy
        .upstreams()
        .set_state("api", &name, AdminState::Draining)
        .unwrap();
    for _ in 0..10 {
        assert_eq!(get(addr, "/").text(), "other");
    }
    let finished = in_flight.join().unwrap();
    assert_eq!(
        (finished.status, finished.text().as_str()),
        (200, "draining")
    );
    assert_eq!(count(&draining), 1);

    proxy
        .upstreams()
        .set_state("api", &name, AdminState::Up)
        .unwrap();
    let answered: Vec<String> = (0..4).map(|_| get(addr, "/").text()).collect();
    assert!(answered.iter().any(|b| b == "draining"), "{answered:?}");
    assert!(proxy
        .upstreams()
        .set_state("api", "10.9.9.9:1", AdminState::Down)
        .is_err());
    proxy.shutdown(Duration::from_secs(1));
}

#[test]
fn a_server_back_in_rotation_ramps_up_over_slow_start() {
    use proxycache::config::Config;
    use proxycache::server::Server;
    use proxycache::upstream::config::AdminState;

    let (back, steady) = (named("back"), named("steady"));
    let text = format!(
        "[server]\nlisten_addr = \"127.0.0.1:0\"\nworkers = 2\n[log]\naccess_log = \"off\"\n\
         [upstreams.api]\nalgorithm = \"weighted_round_robin\"\nslow_start = \"3s\"\nservers = [{}, {}]\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n",
        server(back.addr, ""),
        server(steady.addr, "")
    );
    let config = Config::parse(&text, std::path::Path::new("test.toml")).unwrap();
    let proxy = Server::start(&config, Vec::new()).unwrap();
    let mut client = Client::connect(proxy.local_addr());
    let mut share_of_back = |n: usize| {
        let before = count(&back);
        for _ in 0..n {
            client.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n");
            assert_eq!(client.response().status, 200);
        }
        (count(&back) - before) as f64 / n as f64
    };
    assert!(
        (0.45..=0.55).contains(&share_of_back(100)),
        "equal weights at start"
    );

    let name = back.addr.to_string();
    proxy
        .upstreams()
        .set_state("api", &name, AdminState::Down)
        .unwrap();
    assert_eq!(share_of_back(20), 0.0);
    proxy
        .upstreams()
        .set_state("api", &name, AdminState::Up)
        .unwrap();
    let first = share_of_back(50);
    assert!(first < 0.15, "just back: {first}");
    thread::sleep(Duration::from_millis(3000));
    let later = share_of_back(100);
    assert!((0.45..=0.55).contains(&later), "ramped up: {later}");
    proxy.shutdown(Duration::from_secs(1));
}

#[test]
fn the_documented_example_config_is_accepted() {
    let example = r#"
[server]
listen_addr = "127.0.0.1:0"

[upstreams.api]
algorithm = "weighted_round_robin"  # round_robin | weighted_round_robin | least_conn | p2c | ip_hash | consistent_hash
hash_key = "header:X-User"            # for consistent_hash: header:NAME | cookie:NAME | ip
servers = [
  { addr = "127.0.0.1:8081", weight = 3 },
  { addr = "127.0.0.1:8082", weight = 1 },
  { addr = "127.0.0.1:8083", backup = true },
]
[upstreams.api.health]
path = "/healthz"
interval = "2s"
timeout = "1s"
rise = 2
fall = 3

[[routes]]
host = "api.example.com"   # optional
path_prefix = "/v1/"        # or path_exact / path_regex
header = { "X-Canary" = "1" }  # optional
upstream = "api"
strip_prefix = false
"#;
    let mut proxy = Proxy::from_config(example);
    proxy.wait_for_log("upstreams.api.hash_key is used only by algorithm consistent_hash; ignored");
    // Its servers are not running: the request gets a precise 502.
    let resp = request(
        proxy.addr,
        "GET /v1/x HTTP/1.1\r\nHost: api.example.com\r\nX-Canary: 1\r\n\r\n",
    );
    assert_eq!(resp.status, 502);
}

#[test]
fn our_own_pool_limit_does_not_count_against_a_server() {
    let slow = Backend::start(|_| {
        thread::sleep(Duration::from_millis(600));
        response(200, &[], b"slow")
    });
    let fast = named("fast");
    let fallback = closed_port();
    let proxy = Proxy::with(
        fallback,
        Conf {
            server: "",
            rest: &format!(
                "[pool]\nmax_conns_per_host = 1\n[upstream]\nconnect_timeout = \"100ms\"\n\
                 [upstreams.api]\nservers = [{}, {}]\n[upstreams.api.retry]\nretries = 0\n\
                 [upstreams.api.outlier]\nmax_fails = 1\nejection = \"10s\"\n\
                 [[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n",
                server(slow.addr, ""),
                server(fast.addr, "")
            ),
        },
    );
    let addr = proxy.addr;
    // Round-robin: slow, fast, slow (its one connection busy: 503), fast,
    // slow. Distinct paths, so the cache does not coalesce them.
    let first = thread::spawn(move || get(addr, "/1"));
    thread::sleep(Duration::from_millis(100));
    assert_eq!(get(addr, "/2").text(), "fast");
    let exhausted = get(addr, "/3");
    assert_eq!(exhausted.status, 503);
    assert!(
        exhausted.text().contains("connection limit"),
        "{}",
        exhausted.text()
    );
    assert_eq!(first.join().unwrap().text(), "slow");
    assert_eq!(get(addr, "/4").text(), "fast");
    assert_eq!(
        get(addr, "/5").text(),
        "slow",
        "not ejected for our own limit"
    );
}
