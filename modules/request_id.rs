//! Gives every request an id (UUID v7: time-ordered, so ids sort by arrival)
//! carried upstream, back to the client and into every log line. A valid id
//! from the client (or a proxy in front of us) is kept, so one id follows the
//! request across hops.

use serde::Deserialize;

use crate::http::Request;
use crate::pipeline::{BuildEnv, Context, Downstream, Flow, Module, Response};

/// First, so every later stage and log line has the id.
pub const PRIORITY: i32 = 0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The header that carries the id, both ways.
    pub header: String,
    /// Keep a well-formed incoming id instead of minting a new one.
    pub trust_incoming: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            header: "X-Request-Id".into(),
            trust_incoming: true,
        }
    }
}

pub fn build(settings: &Settings, _env: &BuildEnv) -> Result<Box<dyn Module>, String> {
    if settings.header.is_empty() || !settings.header.bytes().all(is_token_char) {
        return Err(format!("header {:?} is not a valid header name", settings.header));
    }
    Ok(Box::new(RequestId {
        header: settings.header.clone(),
        trust_incoming: settings.trust_incoming,
    }))
}

struct RequestId {
    header: String,
    trust_incoming: bool,
}

/// Printable, no spaces or separators that would break log lines, bounded length.
fn is_valid_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'+' | b'/' | b'='))
}

thread_local! {
    /// Each thread counts within a millisecond on its own: `Uuid::now_v7`
    /// shares one mutex-guarded counter, a lock every request would take.
    /// Ids stay time-ordered to the millisecond across threads.
    static V7: uuid::ContextV7 = const { uuid::ContextV7::new() };
}

fn new_id() -> String {
    let id = V7.with(|context| uuid::Uuid::new_v7(uuid::Timestamp::now(context)));
    id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).to_owned()
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Module for RequestId {
    fn handle(&self, req: &mut Request, _downstream: &mut Downstream, ctx: &mut Context) -> Flow {
        let incoming = req
            .headers
            .get(&self.header)
            .filter(|id| self.trust_incoming && is_valid_id(id));
        ctx.request_id = match incoming {
            // is_valid_id admits ASCII only.
            Some(id) => String::from_utf8_lossy(id).into_owned(),
            None => new_id(),
        };
        req.headers.set(&self.header, &ctx.request_id);
        Flow::Continue
    }

    fn on_response(&self, _req: &Request, resp: &mut Response, ctx: &mut Context) {
        resp.head.headers.set(&self.header, &ctx.request_id);
    }
}
