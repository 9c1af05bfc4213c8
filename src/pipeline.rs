//! The module pipeline: what a module is, what it sees, and the order it runs in.
//!
//! Every request passes through the enabled stages in ascending priority
//! (built-ins from `modules/`, and later `.pcmod` scripts and WASM plugins,
//! all as [`Stage`]s). The first stage that answers ends the request phase;
//! `proxy_core`, last by default, answers by forwarding upstream.

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::{DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::config::Config;
use crate::http::body::BodyError;
pub use crate::http::body::BodyPart;
use crate::http::{Request, ResponseHead};
use crate::memfile::MemFile;
use crate::pool::Pool;
pub use crate::server::Downstream;
use crate::upstream::Upstreams;
pub use crate::wait::{Signal, Timer};

/// One stage's behaviour. Hooks run on worker threads, concurrently for
/// different requests, so a module keeps shared state behind atomics or locks.
/// A panic in any hook is caught: the client gets 500 and the worker lives on.
pub trait Module: Send + Sync {
    /// Request phase, in ascending priority. Return [`Flow::Continue`] to pass
    /// the request on (after changing it or `ctx` if you like), or
    /// [`Flow::Respond`] to answer it: later stages never see the request.
    /// `downstream` is the client: its body (read lazily, so a module that
    /// answers early never pulls an upload) and interim 1xx responses.
    fn handle(&self, req: &mut Request, downstream: &mut Downstream, ctx: &mut Context) -> Flow;

    /// Response phase, in reverse order, for every stage whose `handle` ran:
    /// a stage sees the response produced by the stages after it and may
    /// change it or put another in its place (a cache answering a 304 or an
    /// error with what it stored).
    fn on_response(&self, _req: &Request, _resp: &mut Response, _ctx: &mut Context) {}

    /// Each piece of response body as it streams to the client, in stream
    /// order, for the stages that saw `on_response` (a cache tees here).
    fn on_body_chunk(&self, _chunk: &[u8], _ctx: &mut Context) {}

    /// Once, when the server listens (`listening` is the bound address): for
    /// work a module does outside requests, such as warming a cache.
    fn on_start(&self, _listening: SocketAddr) {}

    /// The whole body has been shown to `on_body_chunk` (never called for a
    /// body cut short). Runs before its last bytes go to the client, so what
    /// a module records here is in place for the client's next request.
    fn on_body_end(&self, _ctx: &mut Context) {}
}

pub enum Flow {
    Continue,
    Respond(Response),
    /// The response is on its way from an upstream: the server waits for it
    /// without holding a thread, then carries on as if it had been returned.
    Await(Box<dyn PendingResponse>),
}

/// A response still on its way, or a go-ahead awaited. The server parks the
/// exchange until what it waits on is readable, calls `poll`, and repeats
/// until it resumes; if no progress comes within `timeout` it calls
/// `timed_out`. Resuming with [`Resumed::Continue`] runs the request phase on
/// from the next stage, as if the awaiting stage had returned [`Flow::Continue`].
pub trait PendingResponse: Send {
    /// The socket (or [`Signal`], [`Timer`]) whose readability means progress.
    /// Asked after each `poll`, so it may change as the work moves on.
    fn wait_on(&self) -> WaitOn;
    /// Longest wait for the next progress.
    fn timeout(&self) -> Duration;
    /// Called when what it waits on has been reported readable. A pooled
    /// connection can be reported spuriously, so read it without waiting
    /// (`ReadBuf::read_ready`). `None`: not done yet; wait again.
    fn poll(
        &mut self,
        req: &Request,
        client: &mut Downstream,
        ctx: &mut Context,
    ) -> Option<Resumed>;
    /// What to do when the wait ran past `timeout`.
    fn timed_out(self: Box<Self>, req: &Request, ctx: &mut Context) -> Resumed;
}

/// What a pending response waits to become readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOn {
    /// A connection from the pool. The server watches those for their whole
    /// life (edge-triggered), so a wait costs no system call; in exchange an
    /// event that came before the wait wakes it at once, data or not.
    /// `home` is the worker event loop it is watched in.
    Pooled { fd: RawFd, home: usize },
    /// Any other descriptor (a [`Signal`], a [`Timer`]): watched for this wait.
    Fd(RawFd),
    /// The client's socket, for more of the request body (see
    /// [`Downstream::read_body`]). Watched for the connection's life, like
    /// a pooled connection, and woken at once the same way.
    Client,
    /// The client's socket as for `Client`, and a pooled connection as
    /// well: whichever is ready first ends the wait. For an upstream that
    /// may answer while the request body is still arriving.
    ClientOrPooled { fd: RawFd, home: usize },
}

pub enum Resumed {
    Respond(Response),
    Continue,
    /// Wait again, on what this now waits on: a timed-out wait that moved
    /// on to something else (another server, after a connect timeout).
    Await(Box<dyn PendingResponse>),
}

/// What the request phase produced.
pub enum Handled {
    Respond(Response),
    Await(Box<dyn PendingResponse>),
}

/// Per-request state shared by the stages.
pub struct Context {
    /// Set by `request_id`; empty if that module is disabled.
    pub request_id: String,
    pub client_addr: SocketAddr,
    /// Where `proxy_core` sends the request; a routing stage may choose it,
    /// otherwise `server.backend_addr`. Read by the access log.
    pub upstream: Option<SocketAddr>,
    pub started: Instant,
    /// Per-request state of modules, one value per type (see [`Context::put`]).
    state: Vec<Box<dyn Any + Send>>,
}

impl Context {
    pub fn new(client_addr: SocketAddr) -> Context {
        Context {
            request_id: String::new(),
            client_addr,
            upstream: None,
            started: Instant::now(),
            state: Vec::new(),
        }
    }

    /// Keeps `value` for the later phases of this request, replacing any
    /// earlier value of its type. A module uses a type of its own.
    pub fn put<T: Any + Send>(&mut self, value: T) {
        self.take::<T>();
        self.state.push(Box::new(value));
    }

    pub fn get_mut<T: Any + Send>(&mut self) -> Option<&mut T> {
        self.state.iter_mut().find_map(|v| v.downcast_mut())
    }

    pub fn take<T: Any + Send>(&mut self) -> Option<T> {
        let i = self.state.iter().position(|v| v.is::<T>())?;
        self.state.swap_remove(i).downcast().ok().map(|v| *v)
    }
}

pub struct Response {
    pub head: ResponseHead,
    pub body: Body,
}

pub enum Body {
    Empty,
    /// Shared, so a cached body goes out without being copied.
    Bytes(Arc<[u8]>),
    /// Bytes in a memory file: shown to modules as a slice, sent to the
    /// client by `sendfile` without passing through a user-space buffer.
    File(Arc<MemFile>),
    Stream(Box<dyn BodyStream>),
}

/// A response body produced piece by piece (an upstream's, typically).
/// The server pulls pieces as the client takes them, and never waits in
/// `next_chunk`: on `NotYet` it parks the exchange until `wait_on` is
/// readable (for at most `timeout`), holding no thread meanwhile.
pub trait BodyStream: Send {
    /// The total length, when the framing tells it in advance.
    fn length(&self) -> Option<u64>;
    /// The next piece that has arrived, `End`, or `NotYet`.
    fn next_chunk(&mut self) -> Result<BodyPart<'_>, BodyError>;
    /// What becomes readable when more of the body arrives.
    fn wait_on(&self) -> WaitOn;
    /// Longest wait for the next piece.
    fn timeout(&self) -> Duration;
    /// Raw trailer lines (each ending in CRLF), valid at the end.
    fn trailers(&self) -> &[u8];
}

impl Response {
    /// A short plain-text answer, such as an error naming its reason.
    pub fn text(status: u16, text: &str) -> Response {
        let mut head = ResponseHead::new(status);
        head.headers
            .append("Content-Type", "text/plain; charset=utf-8");
        let body = format!("{status} {}: {text}\n", crate::http::reason_phrase(status));
        Response {
            head,
            body: Body::Bytes(body.into_bytes().into()),
        }
    }
}

/// A module in its place in the pipeline.
pub struct Stage {
    /// The file stem for built-ins and scripts, the plugin's name for WASM.
    pub name: String,
    pub priority: i32,
    pub module: Box<dyn Module>,
}

pub struct Pipeline {
    stages: Vec<Stage>,
}

impl Pipeline {
    /// Orders stages by priority, then name, so the order never depends on load order.
    pub fn new(mut stages: Vec<Stage>) -> Pipeline {
        stages.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        Pipeline { stages }
    }

    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// Runs the request phase from stage `from` (0 for a new request).
    /// Returns its outcome and how many stages have run.
    pub fn handle(
        &self,
        from: usize,
        req: &mut Request,
        downstream: &mut Downstream,
        ctx: &mut Context,
    ) -> (Handled, usize) {
        for (i, stage) in self.stages.iter().enumerate().skip(from) {
            let flow = guarded(stage, ctx, |ctx| stage.module.handle(req, downstream, ctx));
            match flow {
                Ok(Flow::Continue) => {}
                Ok(Flow::Respond(resp)) => return (Handled::Respond(resp), i + 1),
                Ok(Flow::Await(pending)) => return (Handled::Await(pending), i + 1),
                Err(failed) => return (Handled::Respond(failed.into()), i + 1),
            }
        }
        let resp = Response::text(500, "no module answered the request");
        log::error!(
            "{} no module answered {} {}",
            ctx.request_id,
            req.method,
            req.target
        );
        (Handled::Respond(resp), self.stages.len())
    }

    /// Polls the pending response of the stage that awaited it (the last of
    /// the `ran`), guarding it like every other hook.
    pub fn poll(
        &self,
        ran: usize,
        pending: &mut dyn PendingResponse,
        req: &Request,
        downstream: &mut Downstream,
        ctx: &mut Context,
    ) -> Option<Resumed> {
        let stage = &self.stages[ran - 1];
        guarded(stage, ctx, |ctx| pending.poll(req, downstream, ctx))
            .unwrap_or_else(|failed| Some(Resumed::Respond(failed.into())))
    }

    /// Runs the response phase over the first `ran` stages, last first.
    pub fn on_response(&self, ran: usize, req: &Request, resp: &mut Response, ctx: &mut Context) {
        for stage in self.stages[..ran].iter().rev() {
            if let Err(failed) = guarded(stage, ctx, |ctx| stage.module.on_response(req, resp, ctx))
            {
                *resp = failed.into();
                return;
            }
        }
    }

    /// Shows a piece of response body to the first `ran` stages. A failure
    /// here cannot become a 500 (the head is already sent): the caller must
    /// end the connection.
    pub fn on_body_chunk(
        &self,
        ran: usize,
        chunk: &[u8],
        ctx: &mut Context,
    ) -> Result<(), ModuleFailed> {
        for stage in &self.stages[..ran] {
            guarded(stage, ctx, |ctx| stage.module.on_body_chunk(chunk, ctx))?;
        }
        Ok(())
    }

    /// Tells every stage that the server listens on `addr`.
    pub fn on_start(&self, addr: SocketAddr) {
        for stage in &self.stages {
            if catch_unwind(AssertUnwindSafe(|| stage.module.on_start(addr))).is_err() {
                log::error!("module `{}` panicked at start", stage.name);
            }
        }
    }

    /// Tells the first `ran` stages that the body is complete.
    pub fn on_body_end(&self, ran: usize, ctx: &mut Context) -> Result<(), ModuleFailed> {
        for stage in &self.stages[..ran] {
            guarded(stage, ctx, |ctx| stage.module.on_body_end(ctx))?;
        }
        Ok(())
    }
}

/// A module hook panicked (already logged, naming the module).
#[derive(Debug)]
pub struct ModuleFailed {
    pub module: String,
}

impl From<ModuleFailed> for Response {
    fn from(failed: ModuleFailed) -> Response {
        Response::text(500, &format!("module `{}` failed", failed.module))
    }
}

/// Runs one hook, catching a panic and logging it with the module's name.
fn guarded<T>(
    stage: &Stage,
    ctx: &mut Context,
    hook: impl FnOnce(&mut Context) -> T,
) -> Result<T, ModuleFailed> {
    catch_unwind(AssertUnwindSafe(|| hook(ctx))).map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        log::error!(
            "{} module `{}` panicked: {message}",
            ctx.request_id,
            stage.name
        );
        ModuleFailed {
            module: stage.name.clone(),
        }
    })
}

/// What a module gets to build itself.
pub struct BuildEnv<'a> {
    pub config: &'a Config,
    pub pool: &'a Arc<Pool>,
    /// Upstream groups and routes, shared by the stages that act on them.
    pub upstreams: &'a Arc<Upstreams>,
    /// Where a module publishes a handle for the rest of the daemon.
    pub services: &'a Services,
}

/// Handles modules publish, one per type, for the rest of the daemon: the
/// admin API reaches the cache's purge functions through here.
#[derive(Default)]
pub struct Services(parking_lot::Mutex<Vec<Arc<dyn Any + Send + Sync>>>);

impl Services {
    /// Publishes `service`, replacing an earlier one of its type.
    pub fn provide<T: Any + Send + Sync>(&self, service: Arc<T>) {
        let mut all = self.0.lock();
        all.retain(|s| !s.is::<T>());
        all.push(service);
    }

    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.0
            .lock()
            .iter()
            .find_map(|s| s.clone().downcast::<T>().ok())
    }
}

/// A module that could not be built; names the module.
#[derive(Debug)]
pub struct ModuleError {
    pub module: String,
    pub message: String,
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "module `{}`: {}", self.module, self.message)
    }
}

impl std::error::Error for ModuleError {}

/// A `[modules.<name>]` section: `enabled` and `priority` for every module,
/// then the module's own keys, which `T` checks (unknown ones are errors).
#[derive(Debug, Default)]
pub struct ModuleSection<T> {
    pub enabled: Option<bool>,
    pub priority: Option<i32>,
    pub settings: T,
}

pub type BuildFn<T> = fn(&T, &BuildEnv) -> Result<Box<dyn Module>, String>;

impl<T> ModuleSection<T> {
    /// The stage for this module, or `None` if disabled.
    pub fn build(
        &self,
        name: &str,
        default_priority: i32,
        env: &BuildEnv,
        build: BuildFn<T>,
    ) -> Result<Option<Stage>, ModuleError> {
        if self.enabled == Some(false) {
            return Ok(None);
        }
        let module = build(&self.settings, env).map_err(|message| ModuleError {
            module: name.to_owned(),
            message,
        })?;
        Ok(Some(Stage {
            name: name.to_owned(),
            priority: self.priority.unwrap_or(default_priority),
            module,
        }))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ModuleSection<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SectionVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for SectionVisitor<T> {
            type Value = ModuleSection<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a module section")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let mut common = CommonKeys {
                    map,
                    enabled: None,
                    priority: None,
                };
                let settings =
                    T::deserialize(serde::de::value::MapAccessDeserializer::new(&mut common))?;
                Ok(ModuleSection {
                    enabled: common.enabled,
                    priority: common.priority,
                    settings,
                })
            }
        }

        d.deserialize_map(SectionVisitor(PhantomData))
    }
}

/// Takes `enabled` and `priority` out of a section and hands every other key
/// to the module's settings, inside the toml deserializer so errors keep
/// their line.
struct CommonKeys<A> {
    map: A,
    enabled: Option<bool>,
    priority: Option<i32>,
}

enum Key<K> {
    Enabled,
    Priority,
    Module(K),
}

struct KeySeed<K>(K);

impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for KeySeed<K> {
    type Value = Key<K::Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let key = String::deserialize(d)?;
        Ok(match key.as_str() {
            "enabled" => Key::Enabled,
            "priority" => Key::Priority,
            _ => Key::Module(self.0.deserialize(key.into_deserializer())?),
        })
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for &mut CommonKeys<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = Some(seed);
        loop {
            // Each round either returns or consumes a common key; the seed is
            // only used once.
            let key_seed = KeySeed(PeekSeed(&mut seed));
            match self.map.next_key_seed(key_seed)? {
                None => return Ok(None),
                Some(Key::Enabled) => self.enabled = Some(self.map.next_value()?),
                Some(Key::Priority) => self.priority = Some(self.map.next_value()?),
                Some(Key::Module(value)) => return Ok(Some(value)),
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// Lends an owned seed to one deserialization, leaving `None` behind once used.
struct PeekSeed<'s, K>(&'s mut Option<K>);

impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for PeekSeed<'_, K> {
    type Value = K::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let seed = self.0.take().expect("key seed used once");
        seed.deserialize(d)
    }
}
