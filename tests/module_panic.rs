//! A module that panics costs its request a 500, and nothing else: the
//! worker lives on and no lock stays poisoned. Runs the real server loop
//! in-process so a deliberately broken stage can join the pipeline.

mod common;

use parking_lot::Mutex;

use proxycache::config::Config;
use proxycache::http::Request;
use proxycache::pipeline::{Context, Downstream, Flow, Module, Stage};
use proxycache::server::Server;

use common::*;

/// Counts requests under a lock, and panics while holding it on /boom.
struct Panicky(Mutex<u32>);

impl Module for Panicky {
    fn handle(&self, req: &mut Request, _: &mut Downstream, _: &mut Context) -> Flow {
        let mut seen = self.0.lock();
        *seen += 1;
        if req.target == "/boom" {
            panic!("boom requested");
        }
        Flow::Continue
    }
}

#[test]
fn a_panicking_module_answers_500_and_the_worker_lives_on() {
    let backend = Backend::ok("fine");
    let dir = TempDir::new();
    let log_path = dir.0.join("proxy.log");
    let mut config = Config::default();
    config.server.listen_addr = "127.0.0.1:0".parse().unwrap();
    config.server.backend_addr = backend.addr;
    config.server.workers = 1;
    config.log.output = log_path.display().to_string();
    proxycache::logging::init(&config.log).unwrap();
    let stage = Stage {
        name: "panicky".into(),
        priority: 500,
        module: Box::new(Panicky(Mutex::new(0))),
    };
    let server = Server::start(&config, vec![stage]).unwrap();

    let resp = get(server.local_addr(), "/boom");
    assert_eq!(resp.status, 500);
    assert!(
        resp.text().contains("module `panicky` failed"),
        "{}",
        resp.text()
    );
    for _ in 0..3 {
        // Same single worker, same lock: both survived.
        assert_eq!(get(server.local_addr(), "/").text(), "fine");
    }
    proxycache::logging::flush();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("module `panicky` panicked: boom requested"),
        "{log}"
    );
    server.shutdown(std::time::Duration::from_secs(1));
}
