//! Test harness: the real `proxycache` binary on an ephemeral port, real
//! backend sockets, and a small HTTP/1.1 reader written independently of the
//! proxy's own parser (so the proxy is not judged by its own code).
#![allow(dead_code)] // each test binary uses part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Header or trailer fields in order: (name, value).
pub type Fields = Vec<(String, String)>;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "proxycache-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon, started from the real binary with a config file.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    /// The threads copying stdout and stderr into `logs`; they end at EOF.
    collectors: Vec<thread::JoinHandle<()>>,
    pub dir: TempDir,
}

/// Keys added to `[server]` and further sections for one test.
#[derive(Default)]
pub struct Conf<'a> {
    pub server: &'a str,
    pub rest: &'a str,
}

impl Proxy {
    pub fn start(backend: SocketAddr) -> Proxy {
        Proxy::with(backend, Conf::default())
    }

    pub fn with(backend: SocketAddr, conf: Conf) -> Proxy {
        Proxy::from_config(&Proxy::config_text(backend, conf))
    }

    /// The config `with` starts the daemon with.
    pub fn config_text(backend: SocketAddr, conf: Conf) -> String {
        let workers = if conf.server.contains("workers") {
            ""
        } else {
            "workers = 16"
        };
        format!(
            "[server]\nlisten_addr = \"127.0.0.1:0\"\nbackend_addr = \"{backend}\"\n{workers}\n{}\n{}\n",
            conf.server, conf.rest
        )
    }

    pub fn from_config(text: &str) -> Proxy {
        Proxy::launch(text, |config| {
            let mut command = Command::new(env!("CARGO_BIN_EXE_proxycache"));
            command.arg("--config").arg(config);
            command
        })
    }

    /// Starts the daemon by the command `command(config path)` builds (a
    /// shell that sets limits first, say).
    pub fn launch(text: &str, command: impl FnOnce(&std::path::Path) -> Command) -> Proxy {
        let dir = TempDir::new();
        let path = dir.0.join("config.toml");
        std::fs::write(&path, text).unwrap();
        let mut child = command(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start proxycache");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let collectors = vec![
            collect_lines(child.stdout.take().unwrap(), logs.clone()),
            collect_lines(child.stderr.take().unwrap(), logs.clone()),
        ];
        let mut proxy = Proxy {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            logs,
            collectors,
            dir,
        };
        let line = proxy.wait_for_log("listening on ");
        let addr = line
            .split("listening on ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap();
        proxy.addr = addr.parse().unwrap();
        proxy
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Exited: once its output is fully read, look one last time.
                self.collectors.drain(..).for_each(|c| c.join().unwrap());
                if let Some(line) = self.logs().into_iter().find(|l| l.contains(needle)) {
                    return line;
                }
                panic!(
                    "proxy exited ({status}) before logging {needle:?}; logs: {:#?}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} in {:#?}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.pid())
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Stops the proxy (SIGSTOP) and waits until each of its threads has: a
    /// thread woken by an event and the signal at once would otherwise take
    /// the event before it stops.
    pub fn stop(&self) {
        self.signal("STOP");
        let tasks = format!("/proc/{}/task", self.pid());
        let until = Instant::now() + TIMEOUT;
        let stopped = |task: std::fs::DirEntry| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            matches!(state, Some("T" | "t") | None)
        };
        while !std::fs::read_dir(&tasks)
            .unwrap()
            .all(|task| stopped(task.unwrap()))
        {
            assert!(Instant::now() < until, "the proxy did not stop");
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Runs the binary with `config`, expecting it to refuse to start; returns what it printed.
pub fn refused_start(config: &str) -> String {
    let dir = TempDir::new();
    let path = dir.0.join("config.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_proxycache"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "started with {config:?}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect_lines(
    pipe: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            match line {
                Ok(line) => into.lock().unwrap().push(line),
                Err(_) => return,
            }
        }
    })
}

/// The /proc directories of a process's worker threads.
fn worker_tasks(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| task.unwrap().path())
        .filter(|task| {
            std::fs::read_to_string(task.join("comm")).is_ok_and(|name| name.starts_with("worker-"))
        })
        .collect()
}

/// Worker threads process `pid` runs now.
pub fn worker_threads(pid: u32) -> usize {
    worker_tasks(pid).len()
}

/// The CPUs each worker thread of `pid` may run on.
pub fn worker_cpus(pid: u32) -> Vec<Vec<usize>> {
    worker_tasks(pid)
        .iter()
        .map(|task| cpus_allowed(&task.join("status")))
        .collect()
}

/// The scheduling policy of each worker thread of `pid` (`SCHED_OTHER` 0,
/// `SCHED_BATCH` 3): field 41 of its /proc stat line.
pub fn worker_policies(pid: u32) -> Vec<u32> {
    worker_tasks(pid)
        .iter()
        .map(|task| {
            let stat = std::fs::read_to_string(task.join("stat")).unwrap();
            // Fields from the third on follow the parenthesised name.
            let after_name = &stat[stat.rfind(')').unwrap() + 1..];
            after_name
                .split_whitespace()
                .nth(41 - 3)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

/// The CPUs of the `Cpus_allowed_list` line ("0-3,6") of a /proc status file.
pub fn cpus_allowed(status: &std::path::Path) -> Vec<usize> {
    let status = std::fs::read_to_string(status).unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    list.trim()
        .split(',')
        .flat_map(|range| {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            first.parse::<usize>().unwrap()..=last.parse().unwrap()
        })
        .collect()
}

pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A request as the backend received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Fields,
    pub body: Vec<u8>,
    pub trailers: Fields,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A real backend socket that records every request.
pub struct Backend {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    pub connections: Arc<AtomicUsize>,
}

impl Backend {
    /// Answers each request with the raw bytes `respond` returns, on a keep-alive connection.
    pub fn start(respond: impl Fn(&Recorded) -> Vec<u8> + Send + Sync + 'static) -> Backend {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let respond = Arc::new(respond);
        let recorded = requests.clone();
        let mut backend = Backend::raw(move |stream| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut stream = stream;
            while let Some(req) = read_request(&mut reader) {
                recorded.lock().unwrap().push(req.clone());
                if stream.write_all(&respond(&req)).is_err() {
                    return;
                }
                if req
                    .header("connection")
                    .is_some_and(|c| c.eq_ignore_ascii_case("close"))
                {
                    return;
                }
            }
        });
        backend.requests = requests;
        backend
    }

    /// 200 with `body` for every request.
    pub fn ok(body: &'static str) -> Backend {
        Backend::start(move |_| response(200, &[], body.as_bytes()))
    }

    /// Hands each accepted connection to `handle`, on its own thread.
    pub fn raw(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> Backend {
        Backend::on(TcpListener::bind("127.0.0.1:0").unwrap(), handle)
    }

    /// Like [`Backend::raw`], on a listener set up by the caller.
    pub fn on(
        listener: TcpListener,
        handle: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Backend {
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let handle = Arc::new(handle);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let handle = handle.clone();
                thread::spawn(move || handle(stream));
            }
        });
        Backend {
            addr,
            requests: Arc::new(Mutex::new(Vec::new())),
            connections,
        }
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.recorded().pop().expect("backend saw a request")
    }
}

/// A complete response with a Content-Length body.
pub fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn read_line(reader: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_owned()),
    }
}

fn read_fields(reader: &mut impl BufRead) -> Option<Fields> {
    let mut fields = Vec::new();
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            return Some(fields);
        }
        let (name, value) = line.split_once(':')?;
        fields.push((name.to_owned(), value.trim().to_owned()));
    }
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads a body framed by `fields`; `None` framing means until EOF.
fn read_body(
    reader: &mut impl BufRead,
    fields: &[(String, String)],
    until_eof: bool,
) -> Option<(Vec<u8>, Fields)> {
    let mut body = Vec::new();
    if field(fields, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().ends_with("chunked"))
    {
        loop {
            let size_line = read_line(reader)?;
            let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                let trailers = read_fields(reader)?;
                return Some((body, trailers));
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).ok()?;
            read_line(reader)?;
        }
    }
    if let Some(len) = field(fields, "content-length") {
        body.resize(len.parse().ok()?, 0);
        reader.read_exact(&mut body).ok()?;
    } else if until_eof {
        reader.read_to_end(&mut body).ok()?;
    }
    Some((body, Vec::new()))
}

pub fn read_request(reader: &mut impl BufRead) -> Option<Recorded> {
    let line = read_line(reader)?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let headers = read_fields(reader)?;
    let (body, trailers) = read_body(reader, &headers, false)?;
    Some(Recorded {
        method: method.into(),
        target: target.into(),
        version: version.into(),
        headers,
        body,
        trailers,
    })
}

/// A response as the client received it.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Fields,
    pub body: Vec<u8>,
    pub trailers: Fields,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        field(&self.headers, name)
    }

    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response (a 1xx too). `head_request`: the body is absent whatever the fields say.
pub fn read_response(reader: &mut impl BufRead, head_request: bool) -> Option<Resp> {
    let line = read_line(reader)?;
    let status: u16 = line.split(' ').nth(1)?.parse().ok()?;
    let headers = read_fields(reader)?;
    let bodyless = head_request || status < 200 || status == 204 || status == 304;
    let (body, trailers) = if bodyless {
        (Vec::new(), Vec::new())
    } else {
        read_body(reader, &headers, true)?
    };
    Some(Resp {
        status,
        headers,
        body,
        trailers,
    })
}

/// A client connection with a buffered reader.
pub struct Client {
    pub stream: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).unwrap();
    }

    pub fn response(&mut self) -> Resp {
        self.try_response().expect("a complete response")
    }

    pub fn try_response(&mut self) -> Option<Resp> {
        read_response(&mut self.reader, false)
    }

    pub fn head_response(&mut self) -> Resp {
        read_response(&mut self.reader, true).expect("a complete response")
    }

    /// True if the proxy closed the connection (EOF with nothing more).
    pub fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.reader.read(&mut byte), Ok(0) | Err(_))
    }

    pub fn finish_writing(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// One request on a new connection; returns the response.
pub fn request(addr: SocketAddr, raw: &str) -> Resp {
    let mut client = Client::connect(addr);
    client.send(raw);
    client.response()
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
}

/// Runs curl with `args`; returns (stdout, stderr).
pub fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl installed");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
