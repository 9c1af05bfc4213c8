//! `config.toml`: every key, its default, and strict parsing.
//!
//! Every section denies unknown keys, so a typo is an error naming the key and
//! its line (toml reports the span) instead of a silently ignored setting.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::modules::ModulesConfig;
use crate::upstream::config::{GroupConfig, RouteConfig};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub pool: PoolConfig,
    pub log: LogConfig,
    pub modules: ModulesConfig,
    /// Named groups of servers that routes send requests to.
    pub upstreams: BTreeMap<String, GroupConfig>,
    /// First match wins; unmatched requests go to `server.backend_addr`.
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen_addr: SocketAddr,
    /// Where requests go until routes choose otherwise.
    pub backend_addr: SocketAddr,
    /// 0: one per CPU core.
    pub workers: u16,
    /// With one worker per CPU this process may use, each runs on its own.
    pub pin_workers: bool,
    /// Workers run as `SCHED_BATCH`: a worker that wakes does not preempt.
    pub batch_workers: bool,
    /// Helpers grow the workers up to this while module hooks hold them.
    pub max_workers: NonZeroUsize,
    pub max_connections: NonZeroUsize,
    /// Whole request head, from its first byte; a slow drip gets 408.
    pub header_timeout: Dur,
    /// Between two reads of a request body.
    pub body_timeout: Dur,
    /// One blocked write to a client.
    pub write_timeout: Dur,
    /// An idle keep-alive connection is closed after this.
    pub keepalive_timeout: Dur,
    pub shutdown_timeout: Dur,
    pub max_request_line: NonZeroUsize,
    pub max_header_size: NonZeroUsize,
    /// At most 255.
    pub max_headers: NonZeroU8,
    /// 0 means no limit.
    pub max_body_size: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen_addr: ([127, 0, 0, 1], 3000).into(),
            backend_addr: ([127, 0, 0, 1], 8080).into(),
            workers: 0,
            pin_workers: true,
            batch_workers: true,
            max_workers: nz(256),
            max_connections: nz(10_000),
            header_timeout: Dur::secs(10),
            body_timeout: Dur::secs(30),
            write_timeout: Dur::secs(30),
            keepalive_timeout: Dur::secs(60),
            shutdown_timeout: Dur::secs(30),
            max_request_line: nz(8 * 1024),
            max_header_size: nz(32 * 1024),
            max_headers: NonZeroU8::new(100).unwrap(),
            max_body_size: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub connect_timeout: Dur,
    /// Waiting for a response head, and between reads of its body; exceeded → 504.
    pub read_timeout: Dur,
    pub write_timeout: Dur,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Dur::secs(5),
            read_timeout: Dur::secs(60),
            write_timeout: Dur::secs(60),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Per worker (each keeps its own idle connections).
    pub max_idle_per_host: usize,
    /// 0 means no limit.
    pub max_conns_per_host: usize,
    pub idle_timeout: Dur,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_idle_per_host: 1024,
            max_conns_per_host: 0,
            idle_timeout: Dur::secs(60),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: LogLevel,
    pub format: LogFormat,
    /// `stdout`, `stderr` or a file path.
    pub output: String,
    /// `stdout`, `stderr`, `off` or a file path.
    pub access_log: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: LogLevel::Info,
            format: LogFormat::Text,
            output: "stdout".into(),
            access_log: "stdout".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A duration written as a string: "250ms", "2s", "1m".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match humantime::parse_duration(&text) {
            Ok(d) if !d.is_zero() => Ok(Dur(d)),
            Ok(_) => Err(serde::de::Error::custom(
                "duration must be greater than zero",
            )),
            Err(e) => Err(serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write e.g. \"250ms\", \"2s\", \"1m\""
            ))),
        }
    }
}

const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => panic!("zero"),
    }
}

/// A config that could not be loaded; the message names the file, key and line.
#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Where a loaded config came from, so start-up can say so.
pub enum Source {
    File(PathBuf),
    /// The file did not exist; every key has its default.
    Defaults(PathBuf),
}

impl Config {
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        crate::upstream::config::validate(&config.upstreams, &config.routes, text)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// Reads `path`; a missing file gives the defaults, any other problem is an error.
    pub fn load(path: &Path) -> Result<(Config, Source), ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((Config::parse(&text, path)?, Source::File(path.into()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((Config::default(), Source::Defaults(path.into())))
            }
            Err(e) => Err(ConfigError(format!("{}: {e}", path.display()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("test.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.server.listen_addr, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(config.server.header_timeout, Dur::secs(10));
    }

    #[test]
    fn durations_accept_units() {
        let config =
            parse("[server]\nheader_timeout = \"250ms\"\nkeepalive_timeout = \"1m\"\n").unwrap();
        assert_eq!(config.server.header_timeout.0, Duration::from_millis(250));
        assert_eq!(config.server.keepalive_timeout.0, Duration::from_secs(60));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse("[server]\nworkers = 4\nlisten_adr = \"1.2.3.4:5\"\n").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("listen_adr"), "{err}");
    }

    #[test]
    fn bad_values_name_line() {
        for (text, line) in [
            ("[server]\n\nworkers = -1\n", "line 3"),
            ("[server]\nheader_timeout = \"5 parsecs\"\n", "line 2"),
            ("[server]\nheader_timeout = \"0s\"\n", "line 2"),
            ("[log]\nlevel = \"loud\"\n", "line 2"),
            ("[server]\nlisten_addr = \"localhost\"\n", "line 2"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(line), "{text:?} gave {err}");
        }
    }

    #[test]
    fn unknown_module_and_module_keys_are_errors() {
        let err = parse("[modules.request_idd]\nenabled = true\n").unwrap_err();
        assert!(
            err.contains("request_idd") && err.contains("line 1"),
            "{err}"
        );
        let err = parse("[modules.request_id]\nenabled = true\nheadr = \"x\"\n").unwrap_err();
        assert!(err.contains("headr") && err.contains("line 3"), "{err}");
        let err = parse("[modules.request_id]\npriority = \"high\"\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn shipped_config_documents_the_defaults() {
        use crate::pipeline::{BuildEnv, Pipeline};
        let text = include_str!("../config.toml");
        let shipped = parse(text).unwrap();
        let default = Config::default();

        // The pipeline it builds: same modules, same priorities.
        let order = |config: &Config| {
            let pool = crate::pool::Pool::new(crate::pool::PoolLimits::from_config(config), 1);
            let upstreams = crate::upstream::Upstreams::from_config(config).unwrap();
            let stages = crate::modules::build_all(
                &config.modules,
                &BuildEnv {
                    config,
                    pool: &pool,
                    upstreams: &upstreams,
                    services: &Default::default(),
                },
            )
            .unwrap();
            let pipeline = Pipeline::new(stages);
            pipeline
                .stages()
                .iter()
                .map(|s| (s.name.clone(), s.priority))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&shipped), order(&default));

        // Every other value, once `enabled` and `priority` (checked above) are set aside.
        let mut table: toml::Table = text.parse().unwrap();
        let modules = table["modules"].as_table_mut().unwrap();
        for name in modules.keys().cloned().collect::<Vec<_>>() {
            let section = modules[&name].as_table_mut().unwrap();
            section.remove("enabled");
            section.remove("priority");
        }
        let rest = parse(&table.to_string()).unwrap();
        assert_eq!(format!("{rest:?}"), format!("{default:?}"));
    }
}
