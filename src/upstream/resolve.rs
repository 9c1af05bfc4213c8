//! Servers given by name: looked up at start, then again every
//! `resolve_interval` on a thread of their own, so a moved service is
//! followed without a restart and the request path never waits on DNS.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Weak};
use std::thread;

use super::Group;

/// The first address `name` (host:port) resolves to, IPv4 first.
pub fn resolve(name: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = name
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {name:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{name:?} resolves to no address"))
}

/// Starts re-resolving `group`'s named servers; ends when the group is dropped.
pub fn spawn_resolver(group: &Arc<Group>) -> std::io::Result<()> {
    if !group.servers.iter().any(|s| s.is_named()) {
        return Ok(());
    }
    let group = Arc::downgrade(group);
    thread::Builder::new()
        .name("resolver".into())
        .spawn(move || resolve_loop(&group))?;
    Ok(())
}

fn resolve_loop(group: &Weak<Group>) {
    loop {
        let Some(interval) = group.upgrade().map(|g| g.resolve_interval) else {
            return;
        };
        thread::sleep(interval);
        let Some(g) = group.upgrade() else { return };
        for server in &g.servers {
            match server.refresh(resolve) {
                Ok(Some(addr)) => log::info!(
                    "upstream {} server {} now resolves to {addr}",
                    g.name,
                    server.name
                ),
                Ok(None) => {}
                Err(e) => log::warn!(
                    "upstream {} server {}: {e}; keeping {}",
                    g.name,
                    server.name,
                    server.addr()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_to_ipv4_first() {
        let addr = resolve("localhost:8080").unwrap();
        assert_eq!(addr.port(), 8080);
        assert!(addr.ip().is_loopback());
        assert!(resolve("no-such-host.invalid:80").is_err());
    }
}
