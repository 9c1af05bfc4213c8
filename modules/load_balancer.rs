//! Leases a server of the request's upstream group (the router's choice, or
//! `server.backend_addr`) by the group's algorithm. The lease holds one of
//! the server's `max_conns` slots until the response is done; when every
//! server is at its limit the request queues, without a thread, until a
//! slot frees or `queue_timeout` passes (503). No server available: 503.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::http::Request;
use crate::pipeline::{BuildEnv, Context, Downstream, Flow, Module, PendingResponse, Response, Resumed, WaitOn};
use crate::upstream::{resolve, Choice, Group, Lease, Upstreams};
use crate::wait::Place;

/// After the router and the circuit breaker, before `proxy_core`.
pub const PRIORITY: i32 = 900;

/// Algorithms are set per group; this section takes only `enabled` and `priority`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

pub fn build(_: &Settings, env: &BuildEnv) -> Result<Box<dyn Module>, String> {
    Ok(Box::new(LoadBalancer {
        upstreams: env.upstreams.clone(),
    }))
}

struct LoadBalancer {
    upstreams: Arc<Upstreams>,
}

impl Module for LoadBalancer {
    fn handle(&self, req: &mut Request, _: &mut Downstream, ctx: &mut Context) -> Flow {
        let group = self.upstreams.group_for(ctx);
        let hash = group.hash(req, ctx.client_addr.ip());
        match lease(&group, hash, ctx) {
            Some(Choice::Full) => queue(group, hash, ctx),
            Some(_) => Flow::Respond(unavailable(&group, ctx)),
            None => Flow::Continue,
        }
    }

    fn on_start(&self, _: SocketAddr) {
        for group in self.upstreams.groups() {
            if let Err(e) = resolve::spawn_resolver(group) {
                log::error!("module `load_balancer`: cannot start resolving upstream {}: {e}", group.name);
            }
        }
    }
}

/// Leases a server into `ctx`; otherwise says why not.
fn lease(group: &Arc<Group>, hash: Option<u64>, ctx: &mut Context) -> Option<Choice> {
    match group.choose(hash, &[]) {
        Choice::Server(i) => {
            let lease = Lease::new(group.clone(), i, hash);
            ctx.upstream = Some(lease.addr());
            ctx.put(lease);
            None
        }
        other => Some(other),
    }
}

fn unavailable(group: &Group, ctx: &Context) -> Response {
    log::warn!("{} upstream {}: no server available → 503", ctx.request_id, group.name);
    Response::text(503, &format!("no server available in upstream {}", group.name))
}

fn queue(group: Arc<Group>, hash: Option<u64>, ctx: &mut Context) -> Flow {
    let place = match group.enqueue() {
        Ok(Some(place)) => place,
        Ok(None) => {
            log::warn!("{} upstream {}: every server busy and the queue full → 503", ctx.request_id, group.name);
            return Flow::Respond(Response::text(503, &format!("upstream {} is at its connection limit", group.name)));
        }
        Err(e) => {
            log::error!("{} cannot queue: {e}", ctx.request_id);
            return Flow::Respond(Response::text(503, "cannot queue the request"));
        }
    };
    let deadline = Instant::now() + group.queue_timeout;
    let mut queued = Queued {
        group,
        hash,
        place,
        deadline,
    };
    // A slot freed between choosing and queueing would wake nobody: look once more.
    match queued.poll_slot(ctx) {
        Some(Resumed::Respond(resp)) => Flow::Respond(resp),
        Some(Resumed::Continue) => Flow::Continue,
        Some(Resumed::Await(pending)) => Flow::Await(pending),
        None => Flow::Await(Box::new(queued)),
    }
}

/// A request waiting in its group's queue for a server slot.
struct Queued {
    group: Arc<Group>,
    hash: Option<u64>,
    place: Place,
    deadline: Instant,
}

impl Queued {
    fn poll_slot(&mut self, ctx: &mut Context) -> Option<Resumed> {
        match lease(&self.group, self.hash, ctx) {
            None => {
                self.place.served();
                Some(Resumed::Continue)
            }
            Some(Choice::Full) => {
                self.place.wait_again();
                None
            }
            Some(_) => Some(Resumed::Respond(unavailable(&self.group, ctx))),
        }
    }
}

impl PendingResponse for Queued {
    fn wait_on(&self) -> WaitOn {
        WaitOn::Fd(self.place.fd())
    }

    fn timeout(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
    }

    fn poll(&mut self, _: &Request, _: &mut Downstream, ctx: &mut Context) -> Option<Resumed> {
        self.poll_slot(ctx)
    }

    fn timed_out(self: Box<Self>, _: &Request, ctx: &mut Context) -> Resumed {
        log::warn!(
            "{} upstream {}: no server slot within {:?} → 503",
            ctx.request_id,
            self.group.name,
            self.group.queue_timeout
        );
        Resumed::Respond(Response::text(
            503,
            &format!("no server of upstream {} free within the queue timeout", self.group.name),
        ))
    }
}
