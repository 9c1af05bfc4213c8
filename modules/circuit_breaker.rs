//! Guards each upstream group that has a `[upstreams.<name>.circuit_breaker]`:
//! while its breaker is open, requests get 503 with Retry-After at once
//! instead of piling onto a failing service. Every response a request let
//! through gets counts: a 5xx (ours or the upstream's) is a failure.

use std::sync::Arc;

use serde::Deserialize;

use crate::http::Request;
use crate::pipeline::{BuildEnv, Context, Downstream, Flow, Module, Response};
use crate::upstream::breaker::{Admission, Permit};
use crate::upstream::{Group, Upstreams};

/// After the router has chosen the group, before a server is leased.
pub const PRIORITY: i32 = 850;

/// Breakers are set per group; this section takes only `enabled` and `priority`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

pub fn build(_: &Settings, env: &BuildEnv) -> Result<Box<dyn Module>, String> {
    Ok(Box::new(Breakers {
        upstreams: env.upstreams.clone(),
    }))
}

struct Breakers {
    upstreams: Arc<Upstreams>,
}

/// A request let through; if it ends with no response seen, it failed.
struct Admitted {
    group: Arc<Group>,
    permit: Option<Permit>,
}

impl Admitted {
    fn finish(&mut self, ok: bool) {
        if let (Some(permit), Some(breaker)) = (self.permit.take(), &self.group.breaker) {
            breaker.record(permit, ok);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl Module for Breakers {
    fn handle(&self, _: &mut Request, _: &mut Downstream, ctx: &mut Context) -> Flow {
        let group = self.upstreams.group_for(ctx);
        let Some(breaker) = &group.breaker else {
            return Flow::Continue;
        };
        match breaker.try_acquire() {
            Admission::Allowed(permit) => {
                ctx.put(Admitted {
                    permit: Some(permit),
                    group,
                });
                Flow::Continue
            }
            Admission::Rejected(wait) => {
                log::warn!("{} upstream {}: circuit breaker open → 503", ctx.request_id, group.name);
                let mut resp = Response::text(503, &format!("circuit breaker open for upstream {}", group.name));
                let seconds = wait.as_millis().div_ceil(1000).max(1);
                resp.head.headers.set("Retry-After", seconds.to_string());
                Flow::Respond(resp)
            }
        }
    }

    fn on_response(&self, _: &Request, resp: &mut Response, ctx: &mut Context) {
        if let Some(mut admitted) = ctx.take::<Admitted>() {
            admitted.finish(resp.head.status < 500);
        }
    }
}
