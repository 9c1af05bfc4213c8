use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use proxycache::config::{Config, Source};
use proxycache::server::Server;
use proxycache::{demo, logging};

/// A worker has dozens of requests in flight at once, each allocating the same
/// few sizes: more than glibc's per-thread cache holds, so they fell through
/// to its slower shared bins (docs/PERFORMANCE.md, step 40).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A high-performance HTTP/1.1 reverse proxy.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path to the configuration file.
    #[arg(long, default_value = "config.toml")]
    config: PathBuf,
    /// Validate the configuration and exit (non-zero with the error if invalid).
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run in front of a small built-in demo origin and print requests to try.
    Demo,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (mut config, source) = match Config::load(&args.config) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        return match source {
            Source::File(path) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Source::Defaults(path) => {
                eprintln!("error: {}: no such file", path.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = logging::init(&config.log) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match &source {
        Source::File(path) => log::info!("config loaded from {}", path.display()),
        Source::Defaults(path) => {
            log::warn!("{} not found; starting with defaults", path.display())
        }
    }
    if matches!(args.command, Some(Command::Demo)) {
        match demo::start_origin() {
            Ok(addr) => config.server.backend_addr = addr,
            Err(e) => {
                log::error!("cannot start the demo origin: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    run(&config, matches!(args.command, Some(Command::Demo)))
}

fn run(config: &Config, demo: bool) -> ExitCode {
    raise_open_files_limit(config.server.max_connections.get());
    // Registered before the workers start, so no thread sees a signal's default action.
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start(config, Vec::new()) {
        Ok(server) => server,
        Err(e) => {
            log::error!("{e}");
            logging::flush();
            return ExitCode::FAILURE;
        }
    };
    if demo {
        demo::print_tryouts(server.local_addr());
    }
    let signal = signals.forever().next();
    log::info!(
        "signal {} received; shutting down",
        signal.unwrap_or(SIGTERM)
    );
    server.shutdown(config.server.shutdown_timeout.0);
    logging::flush();
    ExitCode::SUCCESS
}

/// Each client takes a descriptor and usually an upstream connection
/// another, so `max_connections` needs about twice as many open files as
/// the common soft limit of 1024 allows: raise it to the hard limit (as
/// HAProxy does), and say so if even that is short.
fn raise_open_files_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a valid rlimit of our own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let was = limit.rlim_cur;
        if was < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                log::info!("open files limit raised from {was} to {}", limit.rlim_max);
            } else {
                limit.rlim_cur = was;
            }
        }
    }
    let needed = 2 * max_connections as libc::rlim_t + 64;
    if limit.rlim_cur < needed {
        log::warn!(
            "open files limit {} is below the {needed} that max_connections {max_connections} may need",
            limit.rlim_cur
        );
    }
}
