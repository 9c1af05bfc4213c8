//! Start-up, configuration errors, logging and graceful shutdown of the binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn check_config(text: &str) -> (bool, String) {
    let dir = TempDir::new();
    let path = dir.0.join("config.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_proxycache"))
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_the_shipped_file_and_names_key_and_line_of_mistakes() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
    let (ok, out) = check_config(&shipped);
    assert!(ok, "{out}");
    for (text, key, line) in [
        (
            "[server]\nworkers = 4\nmax_conections = 5\n",
            "max_conections",
            "line 3",
        ),
        ("[server]\nkeepalive_timeout = \"soon\"\n", "soon", "line 2"),
        ("[pool]\nmax_idle_per_host = -1\n", "-1", "line 2"),
        (
            "[modules.proxy_core]\nenabled = true\nviaa = \"x\"\n",
            "viaa",
            "line 3",
        ),
        ("[modules.no_such_module]\n", "no_such_module", "line 1"),
        ("[log]\nformat = \"xml\"\n", "xml", "line 2"),
    ] {
        let (ok, out) = check_config(text);
        assert!(!ok, "{text:?} passed");
        assert!(out.contains(key) && out.contains(line), "{text:?}: {out}");
    }
}

#[test]
fn a_module_that_fails_to_build_names_itself() {
    let text = refused_start(
        "[server]\nlisten_addr = \"127.0.0.1:0\"\n[modules.request_id]\nheader = \"bad header\"\n",
    );
    assert!(text.contains("module `request_id`"), "{text}");
}

#[test]
fn a_missing_config_starts_with_defaults_and_says_so() {
    let dir = TempDir::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxycache"))
        .arg("--config")
        .arg(dir.0.join("absent.toml"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        first.contains("absent.toml not found; starting with defaults"),
        "{first}"
    );
    let (ok, out) = {
        let out = Command::new(env!("CARGO_BIN_EXE_proxycache"))
            .args(["--check-config", "--config"])
            .arg(dir.0.join("absent.toml"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(!ok && out.contains("no such file"), "{out}");
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let backend = Backend::start(|req| {
        if req.target == "/slow" {
            std::thread::sleep(Duration::from_millis(800));
        }
        response(200, &[], b"done")
    });
    let mut proxy = Proxy::start(backend.addr);
    let mut idle = Client::connect(proxy.addr);
    idle.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(idle.response().status, 200);

    let mut slow = Client::connect(proxy.addr);
    slow.send("GET /slow HTTP/1.1\r\nHost: a\r\n\r\n");
    std::thread::sleep(Duration::from_millis(200));
    proxy.signal("TERM");
    let resp = slow.response();
    assert_eq!(resp.text(), "done", "the in-flight request finished");
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(idle.is_closed(), "idle keep-alive connections are closed");

    let started = Instant::now();
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < TIMEOUT, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    proxy.wait_for_log("shutdown complete");
    assert!(
        std::net::TcpStream::connect(proxy.addr).is_err(),
        "still accepting"
    );
}

#[test]
fn shutdown_timeout_bounds_the_wait_for_stuck_requests() {
    let backend = Backend::raw(|stream| {
        std::thread::sleep(Duration::from_secs(5));
        drop(stream);
    });
    let mut proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "shutdown_timeout = \"300ms\"",
            ..Conf::default()
        },
    );
    let mut stuck = Client::connect(proxy.addr);
    stuck.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    proxy.signal("INT");
    let status = proxy.child.wait().unwrap();
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    proxy.wait_for_log("shutdown_timeout passed with 1 connection(s) still busy");
}

#[test]
fn json_logs_and_access_log_lines_carry_every_field() {
    let backend = Backend::ok("12345");
    let mut proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[log]\nformat = \"json\"",
            ..Conf::default()
        },
    );
    let resp = request(
        proxy.addr,
        "GET /logged?x=1 HTTP/1.1\r\nHost: a\r\nX-Request-Id: rid-77\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    let line = proxy.wait_for_log("\"type\":\"access\"");
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["method"], "GET");
    assert_eq!(entry["target"], "/logged?x=1");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["bytes"], 5);
    assert_eq!(entry["request_id"], "rid-77");
    assert_eq!(entry["upstream"], backend.addr.to_string());
    assert!(entry["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(entry["duration_ms"].as_f64().unwrap() > 0.0);
    let ts = entry["ts"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
    let startup: serde_json::Value =
        serde_json::from_str(&proxy.wait_for_log("listening on")).unwrap();
    assert_eq!(startup["level"], "info");
}

#[test]
fn access_log_to_a_file_in_text_format() {
    let backend = Backend::ok("x");
    let dir = TempDir::new();
    let path = dir.0.join("access.log");
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: &format!("[log]\naccess_log = \"{}\"", path.display()),
            ..Conf::default()
        },
    );
    get(proxy.addr, "/to-file");
    let started = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("/to-file") || started.elapsed() > TIMEOUT {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(text.contains("\"GET /to-file\" 200 1 "), "{text}");
    assert!(
        proxy.logs().iter().all(|l| !l.contains("/to-file")),
        "access lines went to stdout too"
    );
}

#[test]
fn demo_runs_the_proxy_in_front_of_its_own_origin() {
    // The README's demo command uses the default 127.0.0.1:3000.
    assert!(
        std::net::TcpListener::bind("127.0.0.1:3000").is_ok(),
        "port 3000 is taken; the demo needs it"
    );
    let dir = TempDir::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxycache"))
        .arg("--config")
        .arg(dir.0.join("none.toml"))
        .arg("demo")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    while !seen.contains("Try, in another terminal") {
        seen.push_str(&lines.next().unwrap().unwrap());
        seen.push('\n');
    }
    let addr = "127.0.0.1:3000".parse().unwrap();
    let resp = get(addr, "/");
    assert!(resp.text().contains("demo origin"), "{}", resp.text());
    let echoed = request(
        addr,
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(echoed.text(), "hello");
    let first = get(addr, "/cached");
    let second = get(addr, "/cached");
    assert_eq!(
        second.text(),
        first.text(),
        "the demo's cacheable page comes from the cache"
    );
    assert!(
        second.header("cache-status").unwrap().contains("hit"),
        "{second:?}"
    );
    let headers = get(addr, "/headers").text();
    assert!(headers.contains("X-Forwarded-For: 127.0.0.1"), "{headers}");
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn idle_keep_alive_connections_close_after_keepalive_timeout() {
    let backend = Backend::ok("x");
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            server: "keepalive_timeout = \"300ms\"",
            ..Conf::default()
        },
    );
    let mut client = Client::connect(proxy.addr);
    client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(client.response().status, 200);
    client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(
        client.response().status,
        200,
        "still open within the timeout"
    );
    let started = Instant::now();
    assert!(client.is_closed());
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_secs(2),
        "closed after {idle:?}"
    );
}

#[test]
fn log_level_filters_lines() {
    // Nothing listens upstream: each request logs a warning (502); a bad request logs at info.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = TempDir::new();
    let path = dir.0.join("config.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten_addr = \"{listen}\"\nbackend_addr = \"{upstream}\"\n[log]\nlevel = \"warn\"\naccess_log = \"off\"\n"),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_proxycache"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(listen).is_err() {
        assert!(started.elapsed() < TIMEOUT, "proxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(request(listen, "GET / HTTP/1.1\r\n\r\n").status, 400);
    assert_eq!(get(listen, "/").status, 502);
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("WARN") && text.contains("upstream refused"),
        "{text}"
    );
    assert!(
        !text.contains("INFO"),
        "info lines shown at level warn: {text}"
    );
}

/// Started under the common soft limit of open files (here 256), the daemon
/// raises it to the hard limit, so more clients than that are served.
#[test]
fn a_low_open_files_limit_is_raised_so_many_clients_fit() {
    let backend = Backend::ok("fine");
    let text = format!(
        "[server]\nlisten_addr = \"127.0.0.1:0\"\nbackend_addr = \"{}\"\n",
        backend.addr
    );
    let mut proxy = Proxy::launch(&text, |config| {
        let mut shell = std::process::Command::new("bash");
        shell
            .arg("-c")
            .arg("ulimit -Sn 256 && exec \"$0\" --config \"$1\"")
            .arg(env!("CARGO_BIN_EXE_proxycache"))
            .arg(config);
        shell
    });
    proxy.wait_for_log("open files limit raised from 256 to");
    let clients: Vec<Client> = (0..400)
        .map(|_| {
            let mut client = Client::connect(proxy.addr);
            client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            client
        })
        .collect();
    let mut clients = clients;
    // All stay open: each holds a descriptor in the daemon meanwhile.
    for client in &mut clients {
        assert_eq!(client.response().text(), "fine");
    }
}

#[test]
fn workers_run_as_sched_batch_unless_batch_workers_is_off() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    let backend = Backend::ok("served");
    for (server, policy) in [
        ("workers = 2", SCHED_BATCH),
        ("workers = 2\nbatch_workers = false", SCHED_OTHER),
    ] {
        let proxy = Proxy::with(backend.addr, Conf { server, rest: "" });
        assert_eq!(get(proxy.addr, "/").text(), "served");
        // Each worker sets its policy as it starts: allow the other a moment.
        let started = Instant::now();
        while worker_policies(proxy.pid()) != [policy; 2] {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{server}: {:?}",
                worker_policies(proxy.pid())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn one_worker_per_cpu_is_pinned_each_to_its_own_unless_pin_workers_is_off() {
    let backend = Backend::ok("pinned");
    let ours = cpus_allowed(std::path::Path::new("/proc/self/status"));
    let start = |server| Proxy::with(backend.addr, Conf { server, rest: "" });

    let pinned = start("workers = 0");
    let mut each: Vec<usize> = worker_cpus(pinned.pid())
        .into_iter()
        .map(|cpus| match cpus[..] {
            [cpu] => cpu,
            _ => panic!("a worker on CPUs {cpus:?}"),
        })
        .collect();
    each.sort();
    assert_eq!(each, ours, "one worker on each CPU");
    assert!(
        pinned.logs().iter().any(|l| l.contains("pinned to CPUs")),
        "{:?}",
        pinned.logs()
    );
    assert_eq!(get(pinned.addr, "/").text(), "pinned");

    for server in ["workers = 0\npin_workers = false", "workers = 16"] {
        let free = start(server);
        let cpus = worker_cpus(free.pid());
        assert!(!cpus.is_empty());
        assert!(cpus.iter().all(|c| *c == ours), "{server}: {cpus:?}");
    }
}
