//! Log lines: levels, RFC 3339 timestamps, text or JSON, plus the access log.
//!
//! Lines are buffered and flushed by the housekeeping thread every tick, and
//! at once for warnings and errors, so a busy proxy does not pay one write
//! per request.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;
use serde_json::json;

use crate::config::{LogConfig, LogFormat, LogLevel};

type Sink = Mutex<BufWriter<Box<dyn Write + Send>>>;

struct Logger {
    format: LogFormat,
    level: log::LevelFilter,
    output: Sink,
    /// `None`: access log off. `Some(None)`: same sink as `output`.
    access: Option<Option<Sink>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// One line of the access log.
pub struct AccessRecord<'a> {
    pub client: SocketAddr,
    pub method: &'a str,
    pub target: &'a str,
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// When the request began: its duration is read only if there is a log to write.
    pub started: Instant,
    pub upstream: Option<SocketAddr>,
    pub request_id: &'a str,
}

/// Installs the logger. The first call wins; later calls (tests) are ignored.
pub fn init(config: &LogConfig) -> Result<(), String> {
    let output =
        open_sink(&config.output).map_err(|e| format!("log.output {:?}: {e}", config.output))?;
    let access = match config.access_log.as_str() {
        "off" => None,
        same if same == config.output => Some(None),
        other => Some(Some(
            open_sink(other).map_err(|e| format!("log.access_log {other:?}: {e}"))?,
        )),
    };
    let level = match config.level {
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    };
    let logger = Logger {
        format: config.format,
        level,
        output,
        access,
    };
    if LOGGER.set(logger).is_ok() {
        log::set_logger(LOGGER.get().expect("just set")).map_err(|e| e.to_string())?;
        log::set_max_level(level);
    }
    Ok(())
}

fn open_sink(target: &str) -> io::Result<Sink> {
    let writer: Box<dyn Write + Send> = match target {
        "stdout" => Box::new(io::stdout()),
        "stderr" => Box::new(io::stderr()),
        path => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
    };
    Ok(Mutex::new(BufWriter::with_capacity(64 * 1024, writer)))
}

fn timestamp() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = record.level();
        let line = match self.format {
            LogFormat::Text => format!("{} {:<5} {}\n", timestamp(), level, record.args()),
            LogFormat::Json => format!(
                "{}\n",
                json!({"ts": timestamp(), "level": level.as_str().to_lowercase(), "msg": record.args().to_string()})
            ),
        };
        let mut out = self.output.lock();
        let _ = out.write_all(line.as_bytes());
        if level <= log::Level::Warn {
            let _ = out.flush();
        }
    }

    fn flush(&self) {
        let _ = self.output.lock().flush();
        if let Some(Some(access)) = &self.access {
            let _ = access.lock().flush();
        }
    }
}

/// Writes one access-log line (if the access log is on).
pub fn access(r: &AccessRecord) {
    let Some(logger) = LOGGER.get() else { return };
    let Some(access) = &logger.access else { return };
    let upstream = r.upstream.map(|u| u.to_string());
    let micros = r.started.elapsed().as_micros() as u64;
    let line = match logger.format {
        LogFormat::Text => format!(
            "{} access {} \"{} {}\" {} {} {}.{:03}ms upstream={} request_id={}\n",
            timestamp(),
            r.client,
            r.method,
            r.target,
            r.status,
            r.bytes,
            micros / 1000,
            micros % 1000,
            upstream.as_deref().unwrap_or("-"),
            if r.request_id.is_empty() {
                "-"
            } else {
                r.request_id
            },
        ),
        LogFormat::Json => format!(
            "{}\n",
            json!({
                "ts": timestamp(), "type": "access", "client": r.client.to_string(),
                "method": r.method, "target": r.target, "status": r.status, "bytes": r.bytes,
                "duration_ms": micros as f64 / 1000.0, "upstream": upstream, "request_id": r.request_id,
            })
        ),
    };
    let sink = access.as_ref().unwrap_or(&logger.output);
    let _ = sink.lock().write_all(line.as_bytes());
}

/// Flushes buffered lines; called every housekeeping tick and at exit.
pub fn flush() {
    if let Some(logger) = LOGGER.get() {
        log::Log::flush(logger);
    }
}
