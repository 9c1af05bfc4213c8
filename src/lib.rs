//! Proxycache: a threaded HTTP/1.1 reverse proxy with a module pipeline.
//!
//! A request's path through the code: [`server`] accepts and parks the
//! connection until bytes arrive; [`http::request`] parses the head;
//! [`pipeline`] runs the [`modules`] in priority order, ending in
//! `proxy_core`, which forwards over a [`pool`] connection; the connection
//! loop streams the response back and writes the access log ([`logging`]).

pub mod config;
pub mod demo;
pub mod disk_store;
pub mod http;
pub mod logging;
pub mod memfile;
pub mod modules;
pub mod outbox;
pub mod pipeline;
pub mod pool;
pub mod server;
pub mod spare;
pub mod splice;
pub mod upstream;
pub mod wait;
