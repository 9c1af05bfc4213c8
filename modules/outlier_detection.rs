//! Passive health: the outcome of every attempt on a server (kept on the
//! request's lease by `proxy_core`) counts toward ejecting it. `max_fails`
//! 5xx or failed connections in a row take it out for a time that grows
//! with each ejection in a row (`[upstreams.<name>.outlier]`).

use serde::Deserialize;

use crate::http::Request;
use crate::pipeline::{BuildEnv, Context, Downstream, Flow, Module, Response};
use crate::upstream::Lease;

/// After the load balancer, so its lease is there when responses come back.
pub const PRIORITY: i32 = 950;

/// Thresholds are set per group; this section takes only `enabled` and `priority`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

pub fn build(_: &Settings, _: &BuildEnv) -> Result<Box<dyn Module>, String> {
    Ok(Box::new(OutlierDetection))
}

struct OutlierDetection;

impl Module for OutlierDetection {
    fn handle(&self, _: &mut Request, _: &mut Downstream, _: &mut Context) -> Flow {
        Flow::Continue
    }

    fn on_response(&self, _: &Request, _: &mut Response, ctx: &mut Context) {
        let Some(lease) = ctx.get_mut::<Lease>() else { return };
        let group = lease.group();
        if group.ejection.max_fails == 0 {
            return;
        }
        for &(i, outcome) in lease.outcomes() {
            let server = &group.servers[i];
            if let Some(length) = server.record(outcome.ok(), group.ejection) {
                log::warn!(
                    "upstream {} server {}: {} failures in a row; ejected for {length:?}",
                    group.name,
                    server.name,
                    group.ejection.max_fails
                );
            }
        }
    }
}
