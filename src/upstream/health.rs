//! Active health checks: a thread per checked server probes it every
//! `interval` (HTTP, or a TCP connect when no path is set) and flips its
//! health after `fall` failures or `rise` passes in a row. Never on the
//! request path; the only shared state it touches is the server's atomic flag.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::Instant;

use super::config::HealthConfig;
use super::Group;

/// Starts the checks of `group`'s servers; they end when the group is dropped.
pub fn spawn_checks(group: &Arc<Group>) -> std::io::Result<()> {
    if group.health.is_none() {
        return Ok(());
    }
    for index in 0..group.servers.len() {
        let group = Arc::downgrade(group);
        thread::Builder::new()
            .name("health-check".into())
            .spawn(move || check_loop(&group, index))?;
    }
    Ok(())
}

fn check_loop(group: &Weak<Group>, index: usize) {
    let (mut passes, mut fails) = (0u32, 0u32);
    loop {
        let Some(g) = group.upgrade() else { return };
        let config = g.health.as_ref().expect("checked at spawn");
        let server = &g.servers[index];
        match probe(server.addr(), config) {
            Ok(()) => {
                (passes, fails) = (passes + 1, 0);
                if !server.is_healthy() && passes >= config.rise {
                    server.set_healthy(true);
                    log::info!(
                        "upstream {} server {}: health check passed {passes} times; back in",
                        g.name,
                        server.name
                    );
                }
            }
            Err(why) => {
                (passes, fails) = (0, fails + 1);
                if server.is_healthy() && fails >= config.fall {
                    server.set_healthy(false);
                    log::warn!("upstream {} server {}: health check failed {fails} times ({why}); taken out", g.name, server.name);
                }
            }
        }
        let interval = config.interval.0;
        drop(g);
        thread::sleep(interval);
    }
}

/// One check: Ok when the server answered as `config` expects.
pub fn probe(addr: SocketAddr, config: &HealthConfig) -> Result<(), String> {
    let timeout = config.timeout.0;
    let deadline = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    if config.path.is_empty() {
        return Ok(());
    }
    let host = if config.host.is_empty() {
        addr.to_string()
    } else {
        config.host.clone()
    };
    let request = format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: proxycache-health-check\r\nConnection: close\r\n\r\n",
        config.method, config.path
    );
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;

    let mut response = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(verdict) = judge(&response, config) {
            return verdict;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || response.len() > 64 * 1024 {
            return Err("no complete answer in time".into());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => {
                return judge(&response, config).unwrap_or_else(|| match response.is_empty() {
                    true => Err("closed without answering".into()),
                    false => Err(format!("answer ended without {:?}", config.body)),
                })
            }
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// The verdict once enough of the response is in: the status line, then
/// the body text if one is expected. `None`: read more.
fn judge(response: &[u8], config: &HealthConfig) -> Option<Result<(), String>> {
    let line_end = response.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&response[..line_end]).unwrap_or_default();
    let status = match line.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()) {
        Some(status) if line.starts_with("HTTP/1.") => status,
        _ => return Some(Err(format!("not an HTTP response: {line:?}"))),
    };
    if !config.status.0.contains(&status) {
        return Some(Err(format!("status {status}")));
    }
    if config.body.is_empty() {
        return Some(Ok(()));
    }
    let body_start = response.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let found = response[body_start..]
        .windows(config.body.len())
        .any(|w| w == config.body.as_bytes());
    found.then_some(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(body: &str) -> HealthConfig {
        HealthConfig {
            path: "/healthz".into(),
            body: body.into(),
            ..HealthConfig::default()
        }
    }

    #[test]
    fn judges_status_and_body() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhealthy";
        assert_eq!(judge(ok, &config("")), Some(Ok(())));
        assert_eq!(judge(ok, &config("healthy")), Some(Ok(())));
        assert_eq!(
            judge(ok, &config("ready")),
            None,
            "read on: the text may come later"
        );
        assert_eq!(
            judge(b"HTTP/1.1 200 OK\r\n", &config("")),
            Some(Ok(())),
            "status line is enough"
        );
        assert_eq!(
            judge(b"HTTP/1.1 503 Busy\r\n\r\n", &config("")),
            Some(Err("status 503".into()))
        );
        assert!(matches!(judge(b"SSH-2.0\r\n", &config("")), Some(Err(_))));
        assert_eq!(judge(b"HTTP/1.1 2", &config("")), None);
    }
}
