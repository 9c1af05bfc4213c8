//! Active health checks for every group with a `[upstreams.<name>.health]`
//! section: started when the server listens, one thread per checked server,
//! never on the request path (see `upstream::health`).

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;

use crate::http::Request;
use crate::pipeline::{BuildEnv, Context, Downstream, Flow, Module};
use crate::upstream::{health, Upstreams};

/// Its place hardly matters: it does nothing per request.
pub const PRIORITY: i32 = 960;

/// Checks are set per group; this section takes only `enabled` and `priority`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

pub fn build(_: &Settings, env: &BuildEnv) -> Result<Box<dyn Module>, String> {
    Ok(Box::new(ActiveHealth {
        upstreams: env.upstreams.clone(),
    }))
}

struct ActiveHealth {
    upstreams: Arc<Upstreams>,
}

impl Module for ActiveHealth {
    fn handle(&self, _: &mut Request, _: &mut Downstream, _: &mut Context) -> Flow {
        Flow::Continue
    }

    fn on_start(&self, _: SocketAddr) {
        for group in self.upstreams.groups() {
            if let Err(e) = health::spawn_checks(group) {
                log::error!("module `active_health`: cannot start checks of upstream {}: {e}", group.name);
            }
        }
    }
}
