//! A shared HTTP cache (RFC 9111) in memory, bounded in bytes.
//!
//! Request phase: a fresh (or acceptably stale) stored response answers the
//! request with its `Age`; otherwise the request goes on and the response
//! phase decides whether the answer is storable. A storable response is
//! captured as it streams to the client and stored once all of it has
//! arrived (a body cut short is never stored). Unsafe methods invalidate what they may have changed (§4.4).
//! Storage is moka's TinyLFU cache weighed in bytes.
//!
//! Concurrent misses for one key are coalesced: the first goes upstream, the
//! others wait (in epoll, not on a thread) for its response to be stored. A
//! key whose response was not storable is remembered for a while
//! (hit-for-miss), so its misses go upstream at once rather than queue.
//!
//! A stale entry with a validator is revalidated (If-None-Match /
//! If-Modified-Since); a 304 freshens it. stale-if-error serves it when the
//! upstream fails. Entries can be purged by key, prefix or tag (Surrogate-Key,
//! Cache-Tag), also with a PURGE method from trusted clients.
//! Single byte ranges are served from complete entries (206/416).
//! Configured URLs are fetched at start (warming); stale-while-revalidate
//! serves a stale entry while a request through the proxy refreshes it.
//! An optional disk tier (a directory bounded in bytes) keeps entries across
//! restarts: written through on store, read on a memory miss.
//! Client conditional requests are answered from fresh entries (304).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::Deserialize;

use crate::config::Dur;
use crate::disk_store::DiskStore;
use crate::memfile::MemFile;
use crate::http::cache_control::Directives;
use crate::http::conditional::{http_date, not_modified, requested_range};
use crate::http::{Headers, Request, ResponseHead};
use ipnet::IpNet;

use crate::pipeline::{Body, BuildEnv, Context, Downstream, Flow, Module, PendingResponse, Response, Resumed, Signal, WaitOn};

/// Keys are URLs, so the hasher is seeded per process (foldhash's
/// RandomState): a few instructions per key where SipHash takes hundreds.
type Store<K, V> = moka::sync::Cache<K, V, foldhash::fast::RandomState>;
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// After request_id (so hits carry an id), before proxy_core.
pub const PRIORITY: i32 = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Bytes of keys, headers and bodies held in memory.
    pub max_memory: u64,
    /// Larger responses pass through and are not stored.
    pub max_object_size: u64,
    /// Freshness of a response with Last-Modified but no explicit lifetime, as
    /// this fraction of its age when received (RFC 9111 §4.2.2); 0: never.
    pub heuristic_fraction: f64,
    /// Upper bound of that heuristic freshness.
    pub heuristic_max: Dur,
    /// A header saying HIT or MISS besides Cache-Status, e.g. "X-Cache"; "": none.
    pub x_cache_header: String,
    /// Concurrent misses for one key wait this long for the first one's
    /// response to be stored, then go upstream on their own.
    pub coalesce_wait: Dur,
    /// Decide freshness by CDN-Cache-Control (RFC 9213), else
    /// Surrogate-Control, when present, instead of Cache-Control; the latter
    /// is not passed on to clients.
    pub targeted_cache_control: bool,
    /// What a cache key is made of, in order: any of scheme, host, path, query.
    pub key: Vec<String>,
    /// Request headers whose values are part of the key too.
    pub key_headers: Vec<String>,
    /// Request methods the cache answers: GET (stored and served) and HEAD
    /// (served from a stored GET).
    pub methods: Vec<String>,
    /// Per-path rules, first match wins.
    pub rules: Vec<Rule>,
    /// A directory for a disk tier that survives restarts; "": memory only.
    pub disk_dir: String,
    /// Bytes the disk tier may hold; the oldest entries go first.
    pub disk_max_bytes: u64,
    /// Absolute URLs (http://host/path) fetched through the proxy itself at
    /// start, so they are cached before the first client asks.
    pub warm: Vec<String>,
    /// Clients (addresses or CIDR networks) allowed the PURGE method; empty:
    /// PURGE is not handled here and goes upstream like any method.
    pub purge_from: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_memory: 256 << 20,
            max_object_size: 8 << 20,
            heuristic_fraction: 0.1,
            heuristic_max: Dur(Duration::from_secs(24 * 3600)),
            x_cache_header: String::new(),
            coalesce_wait: Dur(Duration::from_secs(5)),
            targeted_cache_control: true,
            key: ["scheme", "host", "path", "query"].map(String::from).to_vec(),
            key_headers: Vec::new(),
            purge_from: Vec::new(),
            methods: vec!["GET".into(), "HEAD".into()],
            rules: Vec::new(),
            warm: Vec::new(),
            disk_dir: String::new(),
            disk_max_bytes: 1 << 30,
        }
    }
}

/// `[[modules.cache.rules]]`: requests to `host` (any if absent) whose path
/// starts with `path_prefix` either bypass the cache or get a fixed `ttl`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub host: Option<String>,
    pub path_prefix: String,
    /// Neither served from nor stored in the cache.
    #[serde(default)]
    pub bypass: bool,
    /// Freshness lifetime instead of the response's own (its no-store,
    /// private and Set-Cookie still keep it out).
    #[serde(default)]
    pub ttl: Option<Dur>,
}

impl Rule {
    fn matches(&self, host: &str, target: &str) -> bool {
        target.starts_with(&self.path_prefix) && self.host.as_ref().is_none_or(|h| h.eq_ignore_ascii_case(host))
    }
}

/// How long a key stays known as uncacheable (Varnish's hit-for-miss default).
const HIT_FOR_MISS: Duration = Duration::from_secs(120);

pub fn build(settings: &Settings, env: &BuildEnv) -> Result<Box<dyn Module>, String> {
    if !(0.0..=1.0).contains(&settings.heuristic_fraction) {
        return Err(format!("heuristic_fraction {} must be within 0..=1", settings.heuristic_fraction));
    }
    if let Some(method) = settings.methods.iter().find(|m| !matches!(m.as_str(), "GET" | "HEAD")) {
        return Err(format!("methods: {method:?} cannot be cached; only \"GET\" and \"HEAD\""));
    }
    if let Some(rule) = settings.rules.iter().find(|r| !r.path_prefix.starts_with('/')) {
        return Err(format!("rules: path_prefix {:?} must start with /", rule.path_prefix));
    }
    let warm = settings
        .warm
        .iter()
        .map(|url| {
            let rest = url.strip_prefix("http://").ok_or(format!("warm: {url:?} is not an http:// URL"))?;
            let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match (host.is_empty(), path.is_empty()) {
                (true, _) => Err(format!("warm: {url:?} has no host")),
                (false, true) => Ok((host.to_owned(), "/".to_owned())),
                (false, false) => Ok((host.to_owned(), path.to_owned())),
            }
        })
        .collect::<Result<Vec<_>, String>>()?;
    let key = settings
        .key
        .iter()
        .map(|part| match part.as_str() {
            "scheme" => Ok(KeyPart::Scheme),
            "host" => Ok(KeyPart::Host),
            "path" => Ok(KeyPart::Path),
            "query" => Ok(KeyPart::Query),
            other => Err(format!("key: {other:?} is not one of scheme, host, path, query")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let purge_from = settings
        .purge_from
        .iter()
        .map(|net| {
            net.parse::<IpNet>()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("purge_from: {net:?} is not an address or CIDR network"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let disk = match settings.disk_dir.as_str() {
        "" => None,
        dir => Some(
            DiskStore::open(std::path::Path::new(dir), settings.disk_max_bytes)
                .map_err(|e| format!("disk_dir {dir:?}: {e}"))?,
        ),
    };
    let store = moka::sync::Cache::builder()
        .max_capacity(settings.max_memory)
        .weigher(|key: &String, entry: &Arc<Entry>| (key.len() + entry.size()).try_into().unwrap_or(u32::MAX))
        .build_with_hasher(Default::default());
    let cache = Arc::new(Cache {
        store,
        inflight: Arc::default(),
        uncacheable: moka::sync::Cache::builder()
            .max_capacity(65_536)
            .time_to_live(HIT_FOR_MISS)
            .build_with_hasher(Default::default()),
        vary_index: moka::sync::Cache::builder().max_capacity(65_536).build_with_hasher(Default::default()),
        coalesce_wait: settings.coalesce_wait.0,
        targeted_cache_control: settings.targeted_cache_control,
        key,
        key_headers: settings.key_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
        methods: settings.methods.clone(),
        rules: settings.rules.clone(),
        warm,
        disk,
        listening: std::sync::OnceLock::new(),
        refreshing: Arc::default(),
        purge_from,
        max_object_size: settings.max_object_size,
        heuristic_fraction: settings.heuristic_fraction,
        heuristic_max: settings.heuristic_max.0,
        x_cache_header: (!settings.x_cache_header.is_empty()).then(|| settings.x_cache_header.clone()),
    });
    // For the admin API: purging by key, prefix and tag.
    env.services.provide(cache.clone());
    Ok(Box::new(cache))
}

/// The cache; its purge functions are for the admin API.
pub struct Cache {
    store: Store<String, Arc<Entry>>,
    /// Keys being fetched by a first miss, with the misses waiting for it.
    inflight: Arc<Mutex<Map<String, Flight>>>,
    /// Keys whose last response was not storable ("hit-for-miss"): their
    /// misses go upstream at once instead of queueing behind one another.
    uncacheable: Store<String, HitForMiss>,
    /// For URLs whose responses vary: the headers they vary on. Each
    /// variant is stored under a secondary key of its own.
    vary_index: Store<String, Arc<VaryIndex>>,
    coalesce_wait: Duration,
    targeted_cache_control: bool,
    key: Vec<KeyPart>,
    key_headers: Vec<String>,
    methods: Vec<String>,
    rules: Vec<Rule>,
    /// (host, target) to fetch at start.
    warm: Vec<(String, String)>,
    disk: Option<DiskStore>,
    /// Our own address, for warming and background refreshes.
    listening: std::sync::OnceLock<SocketAddr>,
    /// Keys being refreshed in the background (stale-while-revalidate).
    refreshing: Arc<Mutex<std::collections::HashSet<String>>>,
    purge_from: Vec<IpNet>,
    max_object_size: u64,
    heuristic_fraction: f64,
    heuristic_max: Duration,
    x_cache_header: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum KeyPart {
    Scheme,
    Host,
    Path,
    Query,
}

/// A stored response.
struct Entry {
    head: ResponseHead,
    body: Stored,
    /// The request headers named by Vary, with the values they had (§4.1).
    vary: Vec<(String, String)>,
    response_time: Instant,
    corrected_initial_age: Duration,
    freshness: Duration,
    must_revalidate: bool,
    /// Stored, but every use must be revalidated first (`no-cache`).
    no_cache: bool,
    /// Seconds past freshness it may still be served when the upstream fails.
    stale_if_error: Option<u64>,
    /// Seconds past freshness it may still be served while refreshed in the background.
    stale_while_revalidate: Option<u64>,
    /// Surrogate-Key / Cache-Tag values, for purging by tag.
    tags: Vec<String>,
}

impl Entry {
    fn validators(&self) -> bool {
        self.head.headers.contains("etag") || self.head.headers.contains("last-modified")
    }

    /// current_age (§4.2.3).
    fn age(&self, now: Instant) -> Duration {
        self.corrected_initial_age + now.saturating_duration_since(self.response_time)
    }

    fn size(&self) -> usize {
        let headers: usize = self.head.headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
        self.body.len() + headers + 128
    }

    fn vary_matches(&self, req: &Request) -> bool {
        self.vary.iter().all(|(name, value)| vary_value(req, name) == *value)
    }
}

/// A stored body: small ones as bytes; large ones in a memory file, which
/// the server sends with sendfile rather than copying it on every hit.
#[derive(Clone)]
enum Stored {
    Bytes(Arc<[u8]>),
    File(Arc<MemFile>),
}

/// Bodies from this size on go to a memory file.
const FILE_FROM: usize = 16 * 1024;

impl Stored {
    fn new(bytes: Vec<u8>) -> Stored {
        if bytes.len() >= FILE_FROM {
            match MemFile::new(&bytes) {
                Ok(file) => return Stored::File(Arc::new(file)),
                Err(e) => log::debug!("cache: body kept in memory: {e}"),
            }
        }
        Stored::Bytes(bytes.into())
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Stored::Bytes(bytes) => bytes,
            Stored::File(file) => file.as_slice(),
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn to_body(&self) -> Body {
        match self {
            Stored::Bytes(bytes) => Body::Bytes(bytes.clone()),
            Stored::File(file) => Body::File(file.clone()),
        }
    }
}

/// A key's hit-for-miss mark: whether anything was stored under it when
/// a response for it could not be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HitForMiss {
    /// Nothing stored under the key, and any store since clears the mark:
    /// its requests skip the lookup too.
    NothingStored,
    /// A response is kept (stale, for stale-if-error say, or another
    /// variant): still looked up.
    SomethingStored,
}

/// What the request phase decided, for the response phase.
enum State {
    /// Answered from the cache.
    Hit,
    /// Forwarded; the response may be stored under `key`. `stale`: what is
    /// stored but could not be used, kept for a 304 (`revalidating`: we asked
    /// the upstream with its validator) or an error (stale-if-error).
    Miss {
        key: String,
        status: &'static str,
        stale: Option<Arc<Entry>>,
        revalidating: bool,
        /// Already known as uncacheable (hit-for-miss): no need to record it again.
        known_uncacheable: bool,
    },
    /// Forwarded without using or storing anything: the client asked
    /// (`no-store`: "request") or a rule says so ("bypass").
    Bypass(&'static str),
    /// An unsafe method: a successful response invalidates these.
    Invalidate { host: String, key: String },
}

/// Misses waiting for the first miss of their key (request coalescing).
type Flight = Vec<Arc<Signal>>;

/// Held by the first miss of a key while it fetches; dropping it (once the
/// response is stored, found not storable, or the exchange ends) wakes the
/// misses that wait for it.
struct Leading {
    key: String,
    inflight: Arc<Mutex<Map<String, Flight>>>,
}

impl Drop for Leading {
    fn drop(&mut self) {
        let waiting = self.inflight.lock().remove(&self.key).unwrap_or_default();
        waiting.iter().for_each(|signal| signal.notify());
    }
}

/// A miss waiting for the first miss of its key to store the response.
struct Follower {
    cache: Arc<Cache>,
    key: String,
    signal: Arc<Signal>,
}

impl PendingResponse for Follower {
    fn wait_on(&self) -> WaitOn {
        WaitOn::Fd(self.signal.fd())
    }

    fn timeout(&self) -> Duration {
        self.cache.coalesce_wait
    }

    fn poll(&mut self, req: &Request, _client: &mut Downstream, ctx: &mut Context) -> Option<Resumed> {
        Some(self.cache.after_wait(&self.key, req, ctx))
    }

    fn timed_out(self: Box<Self>, req: &Request, ctx: &mut Context) -> Resumed {
        self.cache.after_wait(&self.key, req, ctx)
    }
}

/// A response being stored as it streams to the client.
struct Capture {
    key: String,
    entry: Entry,
    body: Vec<u8>,
}

/// The value of a request header named by Vary, normalised (§4.1) so that
/// requests that would get the same response share an entry: list members
/// trimmed and joined; Accept-Encoding reduced to the sorted set of codings
/// it accepts (q > 0) and Accept-Language lower-cased, since both are
/// case-insensitive and their spacing and order carry no meaning here.
fn vary_value(req: &Request, name: &str) -> String {
    let members = req.headers.list(name).map(|v| String::from_utf8_lossy(v).trim().to_owned());
    match name {
        "accept-encoding" => {
            let mut codings: Vec<String> = members
                .filter_map(|member| {
                    let mut parts = member.split(';').map(str::trim);
                    let coding = parts.next()?.to_ascii_lowercase();
                    let refused = parts.any(|p| {
                        p.split_once('=')
                            .is_some_and(|(k, q)| k.trim().eq_ignore_ascii_case("q") && q.trim().parse::<f32>() == Ok(0.0))
                    });
                    (!coding.is_empty() && !refused).then_some(coding)
                })
                .collect();
            codings.sort_unstable();
            codings.dedup();
            codings.join(",")
        }
        "accept-language" => members.map(|m| m.to_ascii_lowercase().replace(' ', "")).collect::<Vec<_>>().join(","),
        _ => members.collect::<Vec<_>>().join(", "),
    }
}

/// The request headers a URL's responses vary on, and the keys its
/// variants are stored under, so invalidating the URL removes them all
/// without a scan. The id makes those keys: a new index (the URL's Vary
/// changed) can never reach the variants of an old one.
struct VaryIndex {
    id: u64,
    names: Vec<String>,
    variants: Mutex<Vec<String>>,
}

/// Starts the disk-tier record of a VaryIndex, kept under the URL's key.
const VARY_MARKER: &[u8] = b"VARY\n";

impl VaryIndex {
    /// Where the variant with these header values is stored.
    fn key_of(&self, key: &str, vary: &[(String, String)]) -> String {
        let mut out = format!("{key}\u{0}{:016x}", self.id);
        for (name, value) in vary {
            out.push('\u{0}');
            out.push_str(name);
            out.push('=');
            out.push_str(value);
        }
        out
    }

    /// The marker, then the id, the names (one line) and a line per variant key.
    fn to_disk(&self) -> Vec<u8> {
        let mut out = VARY_MARKER.to_vec();
        out.extend_from_slice(format!("{:016x}\n{}", self.id, self.names.join(" ")).as_bytes());
        for variant in self.variants.lock().iter() {
            out.push(b'\n');
            out.extend_from_slice(variant.as_bytes());
        }
        out
    }

    fn from_disk(bytes: &[u8]) -> Option<VaryIndex> {
        let text = std::str::from_utf8(bytes.strip_prefix(VARY_MARKER)?).ok()?;
        let mut lines = text.split('\n');
        let id = u64::from_str_radix(lines.next()?, 16).ok()?;
        let names = lines.next()?.split(' ').map(str::to_owned).collect();
        Some(VaryIndex {
            id,
            names,
            variants: Mutex::new(lines.map(str::to_owned).collect()),
        })
    }
}

/// Responses cacheable by default, i.e. with heuristic freshness (RFC 9110 §15.1).
fn heuristically_cacheable(status: u16) -> bool {
    matches!(status, 200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501)
}


impl Module for Arc<Cache> {
    fn handle(&self, req: &mut Request, _downstream: &mut Downstream, ctx: &mut Context) -> Flow {
        let host = req.host().unwrap_or_default();
        let key = self.key_for(host, &req.target, &req.headers);
        if req.method == "PURGE" && !self.purge_from.is_empty() {
            ctx.put(State::Hit);
            return Flow::Respond(self.purge_request(req, &key, ctx));
        }
        if matches!(req.method.as_str(), "POST" | "PUT" | "DELETE" | "PATCH") {
            ctx.put(State::Invalidate { host: host.to_owned(), key });
            return Flow::Continue;
        }
        if !self.methods.contains(&req.method) {
            return Flow::Continue;
        }
        if self.rule(host, &req.target).is_some_and(|rule| rule.bypass) {
            ctx.put(State::Bypass("bypass"));
            return Flow::Continue;
        }
        let asked = Directives::parse(&req.headers);
        if asked.no_store {
            ctx.put(State::Bypass("request"));
            return Flow::Continue;
        }
        let hit_for_miss = self.uncacheable.get(&key);
        let (stored, absent) = match hit_for_miss {
            Some(HitForMiss::NothingStored) => (None, "miss"),
            _ => match self.lookup_variant(&key, req) {
                Ok(entry) => (Some(entry), "miss"),
                Err(absent) => (None, absent),
            },
        };
        let status = match &stored {
            _ if asked.no_cache => "request",
            None => absent,
            Some(entry) => {
                // The clock is read only when there is an entry to judge.
                let now = Instant::now();
                if servable(entry, &asked, now) {
                    return Flow::Respond(self.hit(entry, req, now, ctx));
                }
                if within_stale_while_revalidate(entry, now) {
                    self.refresh_in_background(&key, host, &req.target, entry);
                    ctx.put(State::Hit);
                    return Flow::Respond(self.serve(entry, Some(req), now, "hit; fwd=stale; detail=stale-while-revalidate", true));
                }
                "stale"
            }
        };
        if asked.only_if_cached {
            ctx.put(State::Hit);
            return Flow::Respond(Response::text(504, "not in cache (only-if-cached)"));
        }
        let known_uncacheable = hit_for_miss.is_some();
        if req.method == "GET" && status != "request" && !known_uncacheable {
            if let Some(follower) = self.coalesce(&key, ctx) {
                return Flow::Await(Box::new(follower));
            }
        }
        let stale = stored.filter(|_| matches!(status, "stale" | "request"));
        // Revalidate with our validator (§4.3.1), unless the client asks its own
        // question: then a 304 would be about the client's copy, not ours.
        let own_conditional = req.headers.contains("if-none-match") || req.headers.contains("if-modified-since");
        let revalidating = !own_conditional && stale.as_ref().is_some_and(|entry| entry.validators());
        if let Some(entry) = stale.as_ref().filter(|_| revalidating) {
            if let Some(etag) = entry.head.headers.get("etag") {
                req.headers.set("If-None-Match", etag);
            } else if let Some(modified) = entry.head.headers.get("last-modified") {
                req.headers.set("If-Modified-Since", modified);
            }
        }
        ctx.put(State::Miss {
            key,
            status,
            stale,
            revalidating,
            known_uncacheable,
        });
        Flow::Continue
    }

    fn on_response(&self, req: &Request, resp: &mut Response, ctx: &mut Context) {
        match ctx.take::<State>() {
            None | Some(State::Hit) => {}
            Some(State::Bypass(why)) => self.mark(&mut resp.head, &["fwd=", why], false),
            Some(State::Invalidate { host, key }) => {
                if resp.head.status < 400 {
                    self.forget(&key);
                    for name in ["location", "content-location"] {
                        if let Some(target) = resp.head.headers.get_str(name).and_then(|uri| same_host_target(&host, uri)) {
                            self.forget(&self.key_for(&host, target, &req.headers));
                        }
                    }
                }
            }
            Some(State::Miss {
                key,
                status,
                stale,
                revalidating,
                known_uncacheable,
            }) => {
                if let Some(stale) = stale {
                    if let Some(answer) = self.answer_from_stale(&key, &stale, revalidating, req, resp, ctx) {
                        ctx.take::<Leading>(); // stored or served: wake the misses waiting
                        *resp = answer;
                        return;
                    }
                }
                match self.storable(req, &resp.head, ctx.started) {
                    Some(entry) => {
                        ctx.put(Capture {
                            key,
                            entry,
                            body: Vec::new(),
                        });
                        self.mark(&mut resp.head, &["fwd=", status, "; stored"], false);
                    }
                    None => {
                        ctx.take::<Leading>(); // nothing to wait for: let the others go
                        if req.method == "GET" && !known_uncacheable {
                            self.mark_hit_for_miss(key);
                        }
                        self.mark(&mut resp.head, &["fwd=", status], false);
                    }
                }
            }
        }
    }

    fn on_start(&self, listening: SocketAddr) {
        let _ = self.listening.set(listening);
        if self.warm.is_empty() {
            return;
        }
        let urls = self.warm.clone();
        let spawned = std::thread::Builder::new().name("cache-warm".into()).spawn(move || {
            let fetched = urls.iter().filter(|(host, target)| warm_one(listening, host, target)).count();
            log::info!("cache warming: {fetched} of {} URLs fetched", urls.len());
        });
        if let Err(e) = spawned {
            log::error!("cache warming not started: {e}");
        }
    }

    fn on_body_chunk(&self, chunk: &[u8], ctx: &mut Context) {
        let Some(capture) = ctx.get_mut::<Capture>() else { return };
        if (capture.body.len() + chunk.len()) as u64 > self.max_object_size {
            ctx.take::<Capture>(); // too big after all: pass through only
            return;
        }
        capture.body.extend_from_slice(chunk);
    }

    fn on_body_end(&self, ctx: &mut Context) {
        let Some(Capture { key, mut entry, body }) = ctx.take::<Capture>() else { return };
        entry.head.headers.set("Content-Length", body.len().to_string());
        entry.body = Stored::new(body);
        self.save(key, Arc::new(entry));
        ctx.take::<Leading>(); // stored: wake the misses waiting for it
    }
}

/// May a stored response answer a request with these directives now (§4.2, §5.2.1)?
fn servable(entry: &Entry, asked: &Directives, now: Instant) -> bool {
    if entry.no_cache {
        return false;
    }
    let age = entry.age(now);
    if asked.max_age.is_some_and(|max| age > Duration::from_secs(max)) {
        return false;
    }
    if asked.min_fresh.is_some_and(|min| entry.freshness < age + Duration::from_secs(min)) {
        return false;
    }
    if age <= entry.freshness {
        return true;
    }
    let staleness = age - entry.freshness;
    !entry.must_revalidate
        && match asked.max_stale {
            Some(None) => true,
            Some(Some(max)) => staleness <= Duration::from_secs(max),
            None => false,
        }
}

/// The target of a Location / Content-Location URI on the same host (§4.4).
fn same_host_target<'u>(host: &str, uri: &'u str) -> Option<&'u str> {
    if uri.starts_with('/') {
        return Some(uri);
    }
    let rest = uri.strip_prefix("http://")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    authority
        .eq_ignore_ascii_case(host)
        .then_some(if path.is_empty() { "/" } else { path })
}

/// What an entry keeps on disk besides its head and body: its age in
/// wall-clock terms, so it stays right across a restart.
#[derive(serde::Serialize, Deserialize)]
struct DiskMeta {
    /// When the entry's age was `initial_age_ms`, in ms since the epoch.
    stored_at_ms: u64,
    initial_age_ms: u64,
    freshness_ms: u64,
    must_revalidate: bool,
    no_cache: bool,
    stale_if_error: Option<u64>,
    stale_while_revalidate: Option<u64>,
    vary: Vec<(String, String)>,
    tags: Vec<String>,
}

/// Disk form: u32 meta length, meta (JSON), the head as on the wire, the body.
fn to_disk(entry: &Entry) -> Vec<u8> {
    let now = SystemTime::now();
    let age = entry.age(Instant::now());
    let meta = DiskMeta {
        stored_at_ms: now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
        initial_age_ms: age.as_millis() as u64,
        freshness_ms: entry.freshness.as_millis() as u64,
        must_revalidate: entry.must_revalidate,
        no_cache: entry.no_cache,
        stale_if_error: entry.stale_if_error,
        stale_while_revalidate: entry.stale_while_revalidate,
        vary: entry.vary.clone(),
        tags: entry.tags.clone(),
    };
    let meta = serde_json::to_vec(&meta).expect("plain data serialises");
    let mut out = Vec::with_capacity(4 + meta.len() + 512 + entry.body.len());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    entry.head.write_to(&mut out);
    out.extend_from_slice(entry.body.as_slice());
    out
}

fn from_disk(bytes: &[u8]) -> Option<Entry> {
    let meta_len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let meta: DiskMeta = serde_json::from_slice(bytes.get(4..4 + meta_len)?).ok()?;
    let rest = &bytes[4 + meta_len..];
    let (head, head_len) = crate::http::response::parse(rest, rest.len()).ok()??;
    let stored_at = SystemTime::UNIX_EPOCH + Duration::from_millis(meta.stored_at_ms);
    let since = SystemTime::now().duration_since(stored_at).unwrap_or_default();
    Some(Entry {
        head,
        body: Stored::new(rest[head_len..].to_vec()),
        vary: meta.vary,
        response_time: Instant::now().checked_sub(since)?,
        corrected_initial_age: Duration::from_millis(meta.initial_age_ms),
        freshness: Duration::from_millis(meta.freshness_ms),
        must_revalidate: meta.must_revalidate,
        no_cache: meta.no_cache,
        stale_if_error: meta.stale_if_error,
        stale_while_revalidate: meta.stale_while_revalidate,
        tags: meta.tags,
    })
}

/// May a stale entry be served while it is refreshed (RFC 5861 §3)?
fn within_stale_while_revalidate(entry: &Entry, now: Instant) -> bool {
    let staleness = entry.age(now).saturating_sub(entry.freshness);
    !entry.must_revalidate
        && !entry.no_cache
        && entry
            .stale_while_revalidate
            .is_some_and(|window| staleness <= Duration::from_secs(window))
}

/// One GET through the proxy's own listener, so it passes the whole pipeline
/// (routes, this cache) like a client's. True if it was answered 200.
fn warm_one(listening: SocketAddr, host: &str, target: &str) -> bool {
    fetch_through(listening, host, target, "")
}

/// A GET through the proxy's own listener with `extra` header lines; true if answered 200.
fn fetch_through(listening: SocketAddr, host: &str, target: &str, extra: &str) -> bool {
    let fetch = || -> std::io::Result<bool> {
        let mut stream = std::net::TcpStream::connect_timeout(&listening, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}User-Agent: proxycache\r\nConnection: close\r\n\r\n"
        );
        std::io::Write::write_all(&mut stream, request.as_bytes())?;
        let mut response = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut response)?;
        Ok(response.starts_with(b"HTTP/1.1 200 "))
    };
    match fetch() {
        Ok(ok) => ok,
        Err(e) => {
            log::warn!("cache: fetching http://{host}{target} through the proxy: {e}");
            false
        }
    }
}

/// Surrogate-Key (space-separated) and Cache-Tag (comma-separated) values.
fn tags(resp: &ResponseHead) -> Vec<String> {
    let surrogate = resp.headers.get_all("surrogate-key").flat_map(|v| v.split(|b| b.is_ascii_whitespace()));
    surrogate
        .chain(resp.headers.list("cache-tag"))
        .filter(|tag| !tag.is_empty())
        .map(|tag| String::from_utf8_lossy(tag).into_owned())
        .collect()
}

impl Cache {
    /// The cache key: the configured parts (by default `http://host/path?query`),
    /// then the values of the configured request headers.
    fn key_for(&self, host: &str, target: &str, headers: &Headers) -> String {
        let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
        let mut key = String::with_capacity(host.len() + target.len() + 8);
        for part in &self.key {
            match part {
                KeyPart::Scheme => key.push_str("http://"),
                KeyPart::Host => {
                    let from = key.len();
                    key.push_str(host);
                    key[from..].make_ascii_lowercase();
                }
                KeyPart::Path => key.push_str(path),
                KeyPart::Query => {
                    if let Some(query) = query {
                        key.push('?');
                        key.push_str(query);
                    }
                }
            }
        }
        for name in &self.key_headers {
            let values: Vec<_> = headers.get_all(name).map(String::from_utf8_lossy).collect();
            key.push_str(&format!("\n{name}: {}", values.join(", ")));
        }
        key
    }

    /// §4.2.1: s-maxage, max-age, Expires, else a heuristic for responses
    /// cacheable by default. `None`: not storable without explicit freshness.
    fn freshness_lifetime(&self, resp: &ResponseHead, said: &Directives, date: SystemTime) -> Option<Duration> {
        Some(match (said.s_maxage.or(said.max_age), resp.headers.get("expires")) {
            (Some(seconds), _) => Duration::from_secs(seconds),
            // An Expires that does not parse (such as "0") means already expired.
            (None, Some(_)) => http_date(&resp.headers, "expires")
                .and_then(|expires| expires.duration_since(date).ok())
                .unwrap_or_default(),
            (None, None) if heuristically_cacheable(resp.status) => http_date(&resp.headers, "last-modified")
                .and_then(|modified| date.duration_since(modified).ok())
                .map(|age| age.mul_f64(self.heuristic_fraction).min(self.heuristic_max))
                .unwrap_or_default(),
            (None, None) => return None,
        })
    }

    /// Refreshes a stale entry with a request through the proxy itself
    /// (`no-cache`: revalidate), once per key at a time, on its own thread.
    fn refresh_in_background(&self, key: &str, host: &str, target: &str, entry: &Entry) {
        let Some(&listening) = self.listening.get() else { return };
        if !self.refreshing.lock().insert(key.to_owned()) {
            return; // already on its way
        }
        // The same variant: the request headers the stored response varies on.
        let mut extra = String::from("Cache-Control: no-cache\r\n");
        for (name, value) in entry.vary.iter().filter(|(_, v)| !v.is_empty()) {
            extra.push_str(&format!("{name}: {value}\r\n"));
        }
        let owned = (key.to_owned(), host.to_owned(), target.to_owned());
        let refreshing = self.refreshing.clone();
        let spawned = std::thread::Builder::new().name("cache-refresh".into()).spawn(move || {
            let (key, host, target) = owned;
            fetch_through(listening, &host, &target, &extra);
            refreshing.lock().remove(&key);
        });
        if spawned.is_err() {
            self.refreshing.lock().remove(key);
        }
    }

    fn rule(&self, host: &str, target: &str) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.matches(host, target))
    }

    /// What the response says to this cache: its targeted field if honoured
    /// and present (CDN-Cache-Control, then Surrogate-Control), else Cache-Control.
    fn response_directives(&self, headers: &Headers) -> Directives {
        let targeted = ["cdn-cache-control", "surrogate-control"]
            .into_iter()
            .find(|field| self.targeted_cache_control && headers.contains(field));
        Directives::parse_field(headers, targeted.unwrap_or("cache-control"))
    }

    /// Removes the entry stored under `key` (by default `http://host/path?query`),
    /// every variant of it included.
    pub fn purge_key(&self, key: &str) -> usize {
        let variants = format!("{key}\u{0}");
        let purged = self.purge_if(|k, _| k == key || k.starts_with(&variants));
        self.forget(key); // and the record of how it varies
        purged
    }

    /// Removes every entry whose key starts with `prefix`.
    pub fn purge_prefix(&self, prefix: &str) -> usize {
        self.purge_if(|k, _| k.starts_with(prefix))
    }

    /// Removes every entry tagged `tag` by Surrogate-Key or Cache-Tag.
    pub fn purge_tag(&self, tag: &str) -> usize {
        self.purge_if(|_, entry| entry.tags.iter().any(|t| t == tag))
    }

    fn purge_if(&self, doomed: impl Fn(&str, &Entry) -> bool) -> usize {
        let mut purged: std::collections::HashSet<String> = self
            .store
            .iter()
            .filter(|(k, e)| doomed(k, e))
            .map(|(k, _)| k.to_string())
            .collect();
        for key in &purged {
            self.store.invalidate(key);
        }
        self.store.run_pending_tasks();
        if let Some(disk) = &self.disk {
            disk.retain(|key, bytes| {
                let gone = from_disk(bytes).is_some_and(|entry| doomed(key, &entry));
                if gone {
                    purged.insert(key.to_owned());
                }
                !gone
            });
        }
        purged.len()
    }

    /// The entry for `key`: from memory, else from the disk tier (then kept in memory).
    fn lookup(&self, key: &str) -> Option<Arc<Entry>> {
        if let Some(entry) = self.store.get(key) {
            return Some(entry);
        }
        let bytes = self.disk.as_ref()?.get(key)?;
        if let Some(index) = VaryIndex::from_disk(&bytes) {
            self.vary_index.insert(key.to_owned(), Arc::new(index));
            return None;
        }
        let entry = Arc::new(from_disk(&bytes)?);
        self.store.insert(key.to_owned(), entry.clone());
        Some(entry)
    }

    /// The stored variant of `key` that fits `req`'s headers (§4.1), or why
    /// there is none: "miss", or "vary-miss" when other variants are stored.
    fn lookup_variant(&self, key: &str, req: &Request) -> Result<Arc<Entry>, &'static str> {
        let index = match self.vary_index.get(key) {
            Some(index) => index,
            // Not known to vary: the entry itself (looking on disk may
            // find that it varies after all, and learn its index).
            None => match self.lookup(key) {
                Some(entry) => return Ok(entry),
                None if self.disk.is_some() => self.vary_index.get(key).ok_or("miss")?,
                None => return Err("miss"),
            },
        };
        let values: Vec<(String, String)> = index.names.iter().map(|n| (n.clone(), vary_value(req, n))).collect();
        self.lookup(&index.key_of(key, &values))
            .filter(|entry| entry.vary_matches(req))
            .ok_or("vary-miss")
    }

    /// Stores an entry in memory, and on disk if there is a disk tier. A
    /// response that varies goes under its variant's key, beside the others.
    fn save(&self, key: String, entry: Arc<Entry>) {
        // Storable after all: a hit-for-miss mark would hide it.
        self.uncacheable.invalidate(&key);
        let names: Vec<String> = entry.vary.iter().map(|(name, _)| name.clone()).collect();
        let index = match self.index_of(&key) {
            Some(index) if index.names == names => Some(index),
            // Whether or how the URL varies changed: what was stored is void.
            known => {
                if known.is_some() || !names.is_empty() {
                    self.forget(&key);
                }
                (!names.is_empty()).then(|| {
                    let index = Arc::new(VaryIndex {
                        id: fastrand::u64(..),
                        names,
                        variants: Mutex::default(),
                    });
                    self.vary_index.insert(key.clone(), index.clone());
                    index
                })
            }
        };
        let stored_under = match &index {
            Some(index) => {
                let variant = index.key_of(&key, &entry.vary);
                let mut variants = index.variants.lock();
                if !variants.contains(&variant) {
                    variants.push(variant.clone());
                    drop(variants);
                    self.write_disk(&key, &index.to_disk());
                }
                variant
            }
            None => key,
        };
        self.write_disk(&stored_under, &to_disk(&entry));
        self.store.insert(stored_under, entry);
        // moka applies evictions lazily; keep the byte bound exact on every insert.
        self.store.run_pending_tasks();
    }

    /// Marks `key` hit-for-miss, saying whether anything is stored under
    /// it now (not when this request looked: another may have stored since).
    fn mark_hit_for_miss(&self, key: String) {
        let stored = self.vary_index.contains_key(&key)
            || self.store.contains_key(&key)
            || self.disk.as_ref().is_some_and(|disk| disk.holds(&key));
        let mark = match stored {
            true => HitForMiss::SomethingStored,
            false => HitForMiss::NothingStored,
        };
        self.uncacheable.insert(key, mark);
    }

    /// How `key`'s responses vary, if they do: from memory, else from the
    /// disk tier's marker.
    fn index_of(&self, key: &str) -> Option<Arc<VaryIndex>> {
        if let Some(index) = self.vary_index.get(key) {
            return Some(index);
        }
        let index = Arc::new(VaryIndex::from_disk(&self.disk.as_ref()?.get(key)?)?);
        self.vary_index.insert(key.to_owned(), index.clone());
        Some(index)
    }

    fn write_disk(&self, key: &str, bytes: &[u8]) {
        if let Some(disk) = &self.disk {
            if let Err(e) = disk.put(key, bytes) {
                log::warn!("cache: cannot write {key} to the disk tier: {e}");
            }
        }
    }

    /// Drops what is stored for `key`, every variant included.
    fn forget(&self, key: &str) {
        if let Some(index) = self.index_of(key) {
            for variant in index.variants.lock().iter() {
                self.store.invalidate(variant);
                if let Some(disk) = &self.disk {
                    disk.remove(variant);
                }
            }
            self.vary_index.invalidate(key);
        }
        self.store.invalidate(key);
        if let Some(disk) = &self.disk {
            disk.remove(key);
        }
    }

    /// PURGE from a trusted client: the target's entry; with `X-Purge: prefix`
    /// every entry under it; with `X-Purge-Tag` every entry with those tags.
    fn purge_request(&self, req: &Request, key: &str, ctx: &Context) -> Response {
        let client = ctx.client_addr.ip();
        if !self.purge_from.iter().any(|net| net.contains(&client)) {
            log::warn!("{} PURGE from {client} refused: not in cache.purge_from", ctx.request_id);
            return Response::text(403, "PURGE not allowed from this address");
        }
        let purged = if let Some(tags) = req.headers.get_str("x-purge-tag") {
            tags.split([' ', ',']).filter(|t| !t.is_empty()).map(|tag| self.purge_tag(tag)).sum()
        } else if req.headers.get("x-purge").is_some_and(|v| v.eq_ignore_ascii_case(b"prefix")) {
            self.purge_prefix(key)
        } else {
            self.purge_key(key)
        };
        log::info!("{} PURGE {} from {client}: {purged} entries", ctx.request_id, req.target);
        let mut resp = Response::text(200, &format!("purged {purged}"));
        resp.head.headers.append("X-Purged", purged.to_string());
        resp
    }

    /// The first miss of a key leads (fetches); later ones follow: they wait
    /// for it without a thread, woken by a signal. `None`: this one leads.
    fn coalesce(self: &Arc<Self>, key: &str, ctx: &mut Context) -> Option<Follower> {
        let mut inflight = self.inflight.lock();
        match inflight.get_mut(key) {
            Some(waiting) => {
                let signal = Arc::new(Signal::new().ok()?);
                waiting.push(signal.clone());
                Some(Follower {
                    cache: self.clone(),
                    key: key.to_owned(),
                    signal,
                })
            }
            None => {
                inflight.insert(key.to_owned(), Flight::new());
                ctx.put(Leading {
                    key: key.to_owned(),
                    inflight: self.inflight.clone(),
                });
                None
            }
        }
    }

    /// After waiting for the leader: its stored response if it fits, else
    /// on to the upstream (and perhaps into the cache) like any miss.
    fn after_wait(&self, key: &str, req: &Request, ctx: &mut Context) -> Resumed {
        let now = Instant::now();
        let asked = Directives::parse(&req.headers);
        match self.lookup_variant(key, req) {
            Ok(entry) if servable(&entry, &asked, now) => {
                Resumed::Respond(self.hit(&entry, req, now, ctx))
            }
            _ => {
                ctx.put(State::Miss {
                    key: key.to_owned(),
                    status: "miss",
                    stale: None,
                    revalidating: false,
                    known_uncacheable: false,
                });
                Resumed::Continue
            }
        }
    }

    fn hit(&self, entry: &Entry, req: &Request, now: Instant, ctx: &mut Context) -> Response {
        let ttl = entry.freshness.as_secs() as i64 - entry.age(now).as_secs() as i64;
        ctx.put(State::Hit);
        self.serve(entry, Some(req), now, &format!("hit; ttl={ttl}"), true)
    }

    /// A stored response as the client gets it: with its Age, or as 304 when
    /// the client's conditional request (if any) finds its copy current (§4.3.2).
    fn serve(&self, entry: &Entry, client: Option<&Request>, now: Instant, status: &str, hit: bool) -> Response {
        let mut head = entry.head.clone();
        head.headers.set("Age", entry.age(now).as_secs().to_string());
        self.mark(&mut head, &[status], hit);
        if client.is_some_and(|req| not_modified(&entry.head, req)) {
            head.status = 304;
            head.reason = None;
            head.headers.remove("content-length");
            return Response { head, body: Body::Empty };
        }
        let total = entry.body.len();
        match client.and_then(|req| requested_range(&entry.head, entry.body.len(), req)) {
            Some(Some((first, last))) => {
                head.status = 206;
                head.reason = None;
                head.headers.set("Content-Range", format!("bytes {first}-{last}/{total}"));
                Response {
                    head,
                    body: Body::Bytes(entry.body.as_slice()[first..=last].into()),
                }
            }
            Some(None) => {
                let mut resp = Response::text(416, "range not satisfiable");
                resp.head.headers.append("Content-Range", format!("bytes */{total}"));
                resp
            }
            None => Response {
                head,
                body: entry.body.to_body(),
            },
        }
    }

    /// A forwarded request that had a stale entry behind it: a 304 to our
    /// revalidation freshens and serves the entry (§4.3.4); a server error
    /// serves it stale if stale-if-error allows. `None`: use the response.
    fn answer_from_stale(
        &self,
        key: &str,
        stale: &Entry,
        revalidating: bool,
        req: &Request,
        resp: &Response,
        ctx: &Context,
    ) -> Option<Response> {
        let now = Instant::now();
        let upstream = resp.head.status;
        // When revalidating, the conditional in `req` is ours, not the client's.
        let client = (!revalidating).then_some(req);
        if upstream == 304 && revalidating {
            let fresh = Arc::new(self.freshen(stale, &resp.head, ctx.started)?);
            self.save(key.to_owned(), fresh.clone());
            return Some(self.serve(&fresh, client, now, "fwd=stale; fwd-status=304; stored", false));
        }
        let window = stale.stale_if_error.or(Directives::parse(&req.headers).stale_if_error)?;
        let staleness = stale.age(now).saturating_sub(stale.freshness);
        (upstream >= 500 && staleness <= Duration::from_secs(window))
            .then(|| self.serve(stale, client, now, &format!("fwd=stale; fwd-status={upstream}"), true))
    }

    /// The stored response updated with a 304's fields (§4.3.4): new
    /// freshness, same body.
    fn freshen(&self, stale: &Entry, not_modified: &ResponseHead, request_time: Instant) -> Option<Entry> {
        let mut head = stale.head.clone();
        let updated: Vec<(Vec<u8>, Vec<u8>)> = not_modified
            .headers
            .iter()
            .filter(|(name, _)| !name.eq_ignore_ascii_case(b"content-length"))
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        head.headers.retain(|name, _| !updated.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)));
        for (name, value) in &updated {
            head.headers.append(name, value);
        }
        let said = self.response_directives(&head.headers);
        let mut entry = self.entry_for(&head, &said, request_time, None)?;
        entry.body = stale.body.clone();
        entry.vary = stale.vary.clone();
        entry.head.headers.set("Content-Length", entry.body.len().to_string());
        Some(entry)
    }

    /// Cache-Status (RFC 9211), and the X-Cache-style header if configured.
    /// `status` is the Cache-Status parameters, in pieces joined in place.
    fn mark(&self, head: &mut ResponseHead, status: &[&str], hit: bool) {
        if self.targeted_cache_control {
            head.headers.remove("surrogate-control"); // meant for us, not for clients
        }
        debug_assert!(status.len() <= 3, "Cache-Status takes at most three pieces");
        let mut value: [&[u8]; 4] = [b"proxycache; ", b"", b"", b""];
        for (slot, part) in value[1..].iter_mut().zip(status) {
            *slot = part.as_bytes();
        }
        head.headers.append_joined("Cache-Status", &value);
        if let Some(name) = &self.x_cache_header {
            head.headers.set(name, if hit { "HIT" } else { "MISS" });
        }
    }

    /// The entry to store this response as, if a shared cache may (§3), with
    /// its freshness lifetime (§4.2.1) and age bookkeeping (§4.2.3).
    fn storable(&self, req: &Request, resp: &ResponseHead, request_time: Instant) -> Option<Entry> {
        if req.method != "GET" || resp.status < 200 || resp.status == 206 {
            return None;
        }
        let said = self.response_directives(&resp.headers);
        // (A request's own no-store never gets here: handle() bypasses it.)
        if said.no_store || said.private {
            return None;
        }
        if resp.headers.contains("set-cookie") || resp.headers.list("vary").any(|v| v == b"*") {
            return None;
        }
        if req.headers.contains("authorization") && !(said.public || said.s_maxage.is_some() || said.must_revalidate) {
            return None;
        }
        // Rules are few or none: the host is looked up only to match them.
        let ttl = if self.rules.is_empty() {
            None
        } else {
            self.rule(req.host().unwrap_or_default(), &req.target).and_then(|rule| rule.ttl)
        };
        // First what most uncacheable responses fail (nothing says how long they keep).
        let mut entry = self.entry_for(resp, &said, request_time, ttl.map(|t| t.0))?;
        let declared_length = resp.headers.get_str("content-length").and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|n| n > self.max_object_size) {
            return None;
        }
        entry.vary = resp
            .headers
            .list("vary")
            .map(|name| {
                let name = String::from_utf8_lossy(name).to_ascii_lowercase();
                let value = vary_value(req, &name);
                (name, value)
            })
            .collect();
        Some(entry)
    }

    /// A response as an entry: its freshness lifetime (§4.2.1) and age
    /// bookkeeping (§4.2.3). `None` when it would be stale at once and has no
    /// validator to revalidate it with, so storing it is useless.
    fn entry_for(&self, resp: &ResponseHead, said: &Directives, request_time: Instant, ttl: Option<Duration>) -> Option<Entry> {
        let validators = resp.headers.contains("etag") || resp.headers.contains("last-modified");
        // Without explicit freshness, Expires or a validator (Last-Modified is
        // also what heuristic freshness needs) nothing here could be stored:
        // the common uncacheable response stops before any date is parsed.
        let explicit = ttl.is_some() || said.s_maxage.or(said.max_age).is_some() || resp.headers.contains("expires");
        if !explicit && !validators {
            return None;
        }
        let now_wall = SystemTime::now();
        let date = http_date(&resp.headers, "date").unwrap_or(now_wall);
        let freshness = match ttl {
            Some(ttl) => ttl,
            None => self.freshness_lifetime(resp, said, date)?,
        };
        if (freshness.is_zero() || said.no_cache) && !validators {
            return None;
        }

        // How old the response already was when it reached us.
        let response_time = Instant::now();
        let apparent_age = now_wall.duration_since(date).unwrap_or_default();
        let age_value = resp.headers.get_str("age").and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
        let response_delay = response_time.saturating_duration_since(request_time);
        let corrected_initial_age = apparent_age.max(Duration::from_secs(age_value) + response_delay);

        let mut head = resp.clone();
        head.headers.remove("age");
        head.headers.remove("cache-status");
        Some(Entry {
            head,
            body: Stored::Bytes(Arc::from([])),
            vary: Vec::new(),
            response_time,
            corrected_initial_age,
            freshness,
            must_revalidate: said.must_revalidate,
            no_cache: said.no_cache,
            stale_if_error: said.stale_if_error,
            stale_while_revalidate: said.stale_while_revalidate,
            tags: tags(resp),
        })
    }
}
