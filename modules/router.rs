//! Sends each request to the upstream group of the first `[[routes]]` entry
//! it matches (host, path, method, headers), rewriting its path as that
//! route says. A request no route matches goes to `server.backend_addr`.

use std::sync::Arc;

use serde::Deserialize;

use crate::http::Request;
use crate::pipeline::{BuildEnv, Context, Downstream, Flow, Module};
use crate::upstream::{Routed, Upstreams};

/// Before the circuit breaker and the load balancer, which act on the group.
pub const PRIORITY: i32 = 800;

/// Routes are top-level `[[routes]]` tables; this section takes only
/// `enabled` and `priority`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

pub fn build(_: &Settings, env: &BuildEnv) -> Result<Box<dyn Module>, String> {
    Ok(Box::new(Router {
        upstreams: env.upstreams.clone(),
    }))
}

struct Router {
    upstreams: Arc<Upstreams>,
}

impl Module for Router {
    fn handle(&self, req: &mut Request, _: &mut Downstream, ctx: &mut Context) -> Flow {
        if let Some(route) = self.upstreams.route(req) {
            route.rewrite(req);
            ctx.put(Routed(route.group.clone()));
        }
        Flow::Continue
    }
}
