//! The cache module (RFC 9111) through the real proxy, against a backend that
//! counts what reaches it.

mod common;

use std::time::{Duration, SystemTime};

use common::*;

/// A backend answering every path with the headers `headers_for(path)` gives
/// and a body naming the path and how many requests reached the backend so far.
fn backend(headers_for: fn(&str) -> Vec<(String, String)>) -> Backend {
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Backend::start(move |req| {
        let n = hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let headers = headers_for(&req.target);
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        response(200, &pairs, format!("{} #{n}", req.target).as_bytes())
    })
}

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn seen(backend: &Backend, path: &str) -> usize {
    backend
        .recorded()
        .iter()
        .filter(|r| r.target == path)
        .count()
}

fn fetch(proxy: &Proxy, path: &str, extra: &str) -> Resp {
    request(
        proxy.addr,
        &format!("GET {path} HTTP/1.1\r\nHost: cache.test\r\n{extra}\r\n"),
    )
}

#[test]
fn a_fresh_response_is_served_from_cache_with_age_and_cache_status() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=60")]));
    let proxy = Proxy::start(backend.addr);
    let first = fetch(&proxy, "/fresh", "");
    assert_eq!(
        first.header("cache-status"),
        Some("proxycache; fwd=miss; stored")
    );
    let second = fetch(&proxy, "/fresh", "");
    assert_eq!(second.text(), first.text(), "same stored body");
    assert_eq!(seen(&backend, "/fresh"), 1);
    assert!(
        second
            .header("cache-status")
            .unwrap()
            .starts_with("proxycache; hit; ttl="),
        "{second:?}"
    );
    let age: u64 = second.header("age").unwrap().parse().unwrap();
    assert!(age <= 1);
    assert!(
        second.header("x-request-id").is_some(),
        "later stages still run on a hit"
    );
}

#[test]
fn an_expired_response_is_fetched_again() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=1")]));
    let proxy = Proxy::start(backend.addr);
    fetch(&proxy, "/short", "");
    fetch(&proxy, "/short", "");
    assert_eq!(seen(&backend, "/short"), 1);
    std::thread::sleep(Duration::from_millis(2100));
    let again = fetch(&proxy, "/short", "");
    assert_eq!(seen(&backend, "/short"), 2);
    assert_eq!(
        again.header("cache-status"),
        Some("proxycache; fwd=stale; stored")
    );
}

#[test]
fn what_a_shared_cache_must_not_store() {
    let backend = backend(|path| match path {
        "/no-store" => h(&[("Cache-Control", "max-age=60, no-store")]),
        "/private" => h(&[("Cache-Control", "private, max-age=60")]),
        "/no-freshness" => h(&[]),
        "/cookie" => h(&[("Cache-Control", "max-age=60"), ("Set-Cookie", "s=1")]),
        "/vary-star" => h(&[("Cache-Control", "max-age=60"), ("Vary", "*")]),
        "/no-cache" => h(&[("Cache-Control", "no-cache, max-age=60")]),
        "/expires-zero" => h(&[("Expires", "0")]),
        _ => h(&[("Cache-Control", "max-age=60")]),
    });
    let proxy = Proxy::start(backend.addr);
    for path in [
        "/no-store",
        "/private",
        "/no-freshness",
        "/cookie",
        "/vary-star",
        "/no-cache",
        "/expires-zero",
    ] {
        let first = fetch(&proxy, path, "");
        assert_eq!(
            first.header("cache-status"),
            Some("proxycache; fwd=miss"),
            "{path}"
        );
        fetch(&proxy, path, "");
        assert_eq!(seen(&backend, path), 2, "{path} was served from cache");
    }
    // Authorization: only with public, s-maxage or must-revalidate (§3.5).
    fetch(&proxy, "/authed", "Authorization: Basic eDp5\r\n");
    fetch(&proxy, "/authed", "Authorization: Basic eDp5\r\n");
    assert_eq!(seen(&backend, "/authed"), 2);
}

#[test]
fn authorization_with_public_s_maxage_expires_and_heuristics_are_stored() {
    let backend = backend(|path| {
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        let ten_days_ago =
            httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(10 * 86400));
        let now = httpdate::fmt_http_date(SystemTime::now());
        match path {
            "/public-authed" => h(&[("Cache-Control", "public, max-age=60")]),
            "/s-maxage" => h(&[("Cache-Control", "max-age=0, s-maxage=60")]),
            "/expires" => vec![("Date".into(), now), ("Expires".into(), in_a_minute)],
            _ => vec![("Date".into(), now), ("Last-Modified".into(), ten_days_ago)],
        }
    });
    let proxy = Proxy::start(backend.addr);
    for (path, extra) in [
        ("/public-authed", "Authorization: Basic eDp5\r\n"),
        ("/s-maxage", ""),
        ("/expires", ""),
        ("/heuristic", ""),
    ] {
        fetch(&proxy, path, extra);
        let second = fetch(&proxy, path, extra);
        assert_eq!(seen(&backend, path), 1, "{path} not stored");
        assert!(
            second.header("cache-status").unwrap().contains("hit"),
            "{path}"
        );
    }
}

#[test]
fn age_counts_what_the_upstream_said() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=600"), ("Age", "100")]));
    let proxy = Proxy::start(backend.addr);
    fetch(&proxy, "/aged", "");
    let hit = fetch(&proxy, "/aged", "");
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!((100..=102).contains(&age), "Age {age}");
    assert!(
        hit.header("cache-status").unwrap().contains("ttl=50"),
        "{hit:?}"
    );
}

#[test]
fn request_directives_are_honoured() {
    let backend = backend(|path| match path {
        "/stale" => h(&[("Cache-Control", "max-age=1")]),
        "/strict" => h(&[("Cache-Control", "max-age=1, must-revalidate")]),
        _ => h(&[("Cache-Control", "max-age=60")]),
    });
    let proxy = Proxy::start(backend.addr);
    fetch(&proxy, "/d", "");
    let reload = fetch(&proxy, "/d", "Cache-Control: no-cache\r\n");
    assert_eq!(
        reload.header("cache-status"),
        Some("proxycache; fwd=request; stored")
    );
    assert_eq!(seen(&backend, "/d"), 2);
    fetch(&proxy, "/d", "Pragma: no-cache\r\n");
    assert_eq!(seen(&backend, "/d"), 3, "HTTP/1.0 Pragma: no-cache");
    fetch(&proxy, "/d", "Cache-Control: min-fresh=120\r\n");
    assert_eq!(seen(&backend, "/d"), 4, "not fresh enough for min-fresh");
    fetch(&proxy, "/d", "Cache-Control: max-age=30\r\n");
    assert_eq!(seen(&backend, "/d"), 4, "young enough for max-age=30");
    let bypass = fetch(&proxy, "/d", "Cache-Control: no-store\r\n");
    assert_eq!(
        bypass.header("cache-status"),
        Some("proxycache; fwd=request")
    );
    assert_eq!(seen(&backend, "/d"), 5);

    assert_eq!(
        fetch(&proxy, "/absent", "Cache-Control: only-if-cached\r\n").status,
        504
    );
    assert_eq!(seen(&backend, "/absent"), 0);
    assert_eq!(
        fetch(&proxy, "/d", "Cache-Control: only-if-cached\r\n").status,
        200
    );

    fetch(&proxy, "/stale", "");
    fetch(&proxy, "/strict", "");
    std::thread::sleep(Duration::from_millis(2100));
    let stale = fetch(&proxy, "/stale", "Cache-Control: max-stale=60\r\n");
    assert!(
        stale.header("cache-status").unwrap().contains("hit"),
        "{stale:?}"
    );
    assert_eq!(
        seen(&backend, "/stale"),
        1,
        "max-stale accepts a stale entry"
    );
    fetch(&proxy, "/strict", "Cache-Control: max-stale=60\r\n");
    assert_eq!(
        seen(&backend, "/strict"),
        2,
        "must-revalidate forbids serving it stale"
    );
}

#[test]
fn vary_keys_on_the_named_request_headers() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")]));
    let proxy = Proxy::start(backend.addr);
    let en = fetch(&proxy, "/v", "Accept-Language: en\r\n");
    assert_eq!(
        fetch(&proxy, "/v", "Accept-Language: en\r\n").text(),
        en.text()
    );
    assert_eq!(seen(&backend, "/v"), 1);
    let fr = fetch(&proxy, "/v", "Accept-Language: fr\r\n");
    assert_eq!(
        fr.header("cache-status"),
        Some("proxycache; fwd=vary-miss; stored")
    );
    assert_eq!(seen(&backend, "/v"), 2);
}

#[test]
fn vary_normalises_accept_encoding_and_accept_language() {
    let backend = backend(|_| {
        h(&[
            ("Cache-Control", "max-age=60"),
            ("Vary", "Accept-Encoding, Accept-Language"),
        ])
    });
    let proxy = Proxy::start(backend.addr);
    fetch(
        &proxy,
        "/n",
        "Accept-Encoding: gzip, br\r\nAccept-Language: en-US, fr;q=0.5\r\n",
    );
    for same in [
        "Accept-Encoding: br,GZIP\r\nAccept-Language: en-us,fr;q=0.5\r\n",
        "Accept-Encoding: gzip;q=0.8, br, identity;q=0\r\nAccept-Language: EN-us, fr; q=0.5\r\n",
        "Accept-Encoding: br\r\nAccept-Encoding: gzip\r\nAccept-Language: en-US, fr;q=0.5\r\n",
    ] {
        let resp = fetch(&proxy, "/n", same);
        assert!(
            resp.header("cache-status").unwrap().contains("hit"),
            "{same:?}"
        );
    }
    assert_eq!(seen(&backend, "/n"), 1);
    let gzip = fetch(
        &proxy,
        "/n",
        "Accept-Encoding: gzip\r\nAccept-Language: en-US, fr;q=0.5\r\n",
    );
    assert_eq!(
        gzip.header("cache-status"),
        Some("proxycache; fwd=vary-miss; stored")
    );
    // A coding refused with q=0 is not accepted: this is the "gzip" variant.
    let refused = fetch(
        &proxy,
        "/n",
        "Accept-Encoding: gzip, br;q=0\r\nAccept-Language: en-US, fr;q=0.5\r\n",
    );
    assert!(refused.header("cache-status").unwrap().contains("hit"));
    let reordered = fetch(
        &proxy,
        "/n",
        "Accept-Encoding: gzip\r\nAccept-Language: fr, en-US\r\n",
    );
    assert_eq!(
        reordered.header("cache-status"),
        Some("proxycache; fwd=vary-miss; stored"),
        "language order matters"
    );
    assert_eq!(seen(&backend, "/n"), 3);
    // Every variant stays stored beside the others.
    for again in [
        "Accept-Encoding: br, gzip\r\nAccept-Language: en-US, fr;q=0.5\r\n",
        "Accept-Encoding: gzip\r\nAccept-Language: en-US, fr;q=0.5\r\n",
        "Accept-Encoding: gzip\r\nAccept-Language: fr, en-US\r\n",
    ] {
        let resp = fetch(&proxy, "/n", again);
        assert!(
            resp.header("cache-status").unwrap().contains("hit"),
            "{again:?}"
        );
    }
    assert_eq!(seen(&backend, "/n"), 3);
}

#[test]
fn head_is_answered_from_a_cached_get() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=60")]));
    let proxy = Proxy::start(backend.addr);
    let get = fetch(&proxy, "/h", "");
    let mut client = Client::connect(proxy.addr);
    client.send("HEAD /h HTTP/1.1\r\nHost: cache.test\r\n\r\n");
    let head = client.head_response();
    assert!(head.header("cache-status").unwrap().contains("hit"));
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    client.send("GET /h HTTP/1.1\r\nHost: cache.test\r\n\r\n");
    assert_eq!(
        client.response().text(),
        get.text(),
        "no body was sent after the HEAD"
    );
    assert_eq!(seen(&backend, "/h"), 1);
}

#[test]
fn unsafe_methods_invalidate_the_target_and_location() {
    let backend = Backend::start(|req| match req.method.as_str() {
        "POST" => response(
            201,
            &[
                ("Location", "/created"),
                ("Content-Location", "http://cache.test/other"),
            ],
            b"",
        ),
        _ => response(
            200,
            &[("Cache-Control", "max-age=60")],
            req.target.as_bytes(),
        ),
    });
    let proxy = Proxy::start(backend.addr);
    let gets = |path: &str| {
        backend
            .recorded()
            .iter()
            .filter(|r| r.method == "GET" && r.target == path)
            .count()
    };
    for path in ["/inv", "/created", "/other", "/untouched"] {
        fetch(&proxy, path, "");
        fetch(&proxy, path, "");
        assert_eq!(gets(path), 1, "{path}");
    }
    let post = request(
        proxy.addr,
        "POST /inv HTTP/1.1\r\nHost: cache.test\r\nContent-Length: 1\r\n\r\nx",
    );
    assert_eq!(post.status, 201);
    for path in ["/inv", "/created", "/other", "/untouched"] {
        fetch(&proxy, path, "");
    }
    assert_eq!(
        (
            gets("/inv"),
            gets("/created"),
            gets("/other"),
            gets("/untouched")
        ),
        (2, 2, 2, 1)
    );
}

#[test]
fn objects_over_max_object_size_pass_through_and_memory_is_bounded_in_bytes() {
    let big = Backend::start(|req| {
        let size = if req.target == "/big" { 2000 } else { 10_000 };
        response(200, &[("Cache-Control", "max-age=60")], &vec![b'b'; size])
    });
    let proxy = Proxy::with(
        big.addr,
        Conf {
            rest: "[modules.cache]\nmax_object_size = 1500\nmax_memory = 60000",
            ..Conf::default()
        },
    );
    for _ in 0..2 {
        assert_eq!(fetch(&proxy, "/big", "").body.len(), 2000);
    }
    assert_eq!(seen(&big, "/big"), 2, "over max_object_size: not stored");

    let proxy = Proxy::with(
        big.addr,
        Conf {
            rest: "[modules.cache]\nmax_object_size = 20000\nmax_memory = 60000",
            ..Conf::default()
        },
    );
    let paths: Vec<String> = (0..20).map(|i| format!("/obj{i}")).collect();
    for _ in 0..3 {
        for path in &paths {
            fetch(&proxy, path, "");
        }
    }
    // 20 objects of 10 kB, 60 kB of room: at most 6 can be held at once.
    let hits = 3 * 20 - paths.iter().map(|p| seen(&big, p)).sum::<usize>();
    assert!(hits <= 2 * 6, "{hits} hits: more stored than 60 kB allows");
}

#[test]
fn a_truncated_response_is_not_stored() {
    let backend = Backend::raw(|mut stream| {
        use std::io::Write;
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        read_request(&mut reader);
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 100\r\n\r\nonly ten..");
    });
    let proxy = Proxy::start(backend.addr);
    for _ in 0..2 {
        let mut client = Client::connect(proxy.addr);
        client.send("GET /cut HTTP/1.1\r\nHost: cache.test\r\n\r\n");
        assert!(client.try_response().is_none());
    }
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[test]
fn an_x_cache_header_can_be_configured() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=60")]));
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[modules.cache]\nx_cache_header = \"X-Cache\"",
            ..Conf::default()
        },
    );
    assert_eq!(fetch(&proxy, "/x", "").header("x-cache"), Some("MISS"));
    assert_eq!(fetch(&proxy, "/x", "").header("x-cache"), Some("HIT"));
}

#[test]
fn conditional_requests_get_304_from_a_fresh_entry() {
    let backend = backend(|_| {
        h(&[
            ("Cache-Control", "max-age=60"),
            ("ETag", "W/\"v1\""),
            ("Last-Modified", "Sat, 01 Nov 2025 10:00:00 GMT"),
        ])
    });
    let proxy = Proxy::start(backend.addr);
    fetch(&proxy, "/c", "");
    for (conditional, status) in [
        ("If-None-Match: \"v1\"\r\n", 304),
        ("If-None-Match: \"v0\", W/\"v1\"\r\n", 304),
        ("If-None-Match: *\r\n", 304),
        ("If-None-Match: \"v2\"\r\n", 200),
        ("If-Modified-Since: Sun, 02 Nov 2025 10:00:00 GMT\r\n", 304),
        ("If-Modified-Since: Fri, 31 Oct 2025 10:00:00 GMT\r\n", 200),
        // If-None-Match wins over If-Modified-Since.
        (
            "If-None-Match: \"v2\"\r\nIf-Modified-Since: Sun, 02 Nov 2025 10:00:00 GMT\r\n",
            200,
        ),
    ] {
        let mut client = Client::connect(proxy.addr);
        client.send(format!(
            "GET /c HTTP/1.1\r\nHost: cache.test\r\n{conditional}\r\n"
        ));
        let resp = client.response();
        assert_eq!(resp.status, status, "{conditional}");
        if status == 304 {
            assert!(resp.body.is_empty());
            assert_eq!(resp.header("etag"), Some("W/\"v1\""));
        }
    }
    assert_eq!(seen(&backend, "/c"), 1);
}

/// Sends `n` GETs for `path` at once; returns their bodies.
fn concurrent_gets(proxy: &Proxy, path: &'static str, n: usize) -> Vec<String> {
    let addr = proxy.addr;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let clients: Vec<_> = (0..n)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                barrier.wait();
                client.send(format!("GET {path} HTTP/1.1\r\nHost: cache.test\r\n\r\n"));
                let resp = client.response();
                assert_eq!(resp.status, 200);
                resp.text()
            })
        })
        .collect();
    clients.into_iter().map(|c| c.join().unwrap()).collect()
}

/// A backend that takes `delay` to answer, with the given Cache-Control.
fn slow_backend(delay: Duration, cache_control: &'static str) -> Backend {
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Backend::start(move |req| {
        let n = hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        std::thread::sleep(delay);
        response(
            200,
            &[("Cache-Control", cache_control)],
            format!("{} #{n}", req.target).as_bytes(),
        )
    })
}

#[test]
fn a_hundred_concurrent_misses_send_one_request_upstream() {
    let backend = slow_backend(Duration::from_millis(300), "max-age=60");
    let proxy = Proxy::start(backend.addr);
    let bodies = concurrent_gets(&proxy, "/hot", 100);
    assert_eq!(seen(&backend, "/hot"), 1);
    assert!(bodies.iter().all(|b| b == "/hot #1"), "{bodies:?}");
}

#[test]
fn coalesced_misses_wait_a_bounded_time_then_go_on_their_own() {
    let backend = slow_backend(Duration::from_millis(800), "max-age=60");
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[modules.cache]\ncoalesce_wait = \"100ms\"",
            ..Conf::default()
        },
    );
    let bodies = concurrent_gets(&proxy, "/slow", 5);
    assert_eq!(bodies.len(), 5);
    assert!(
        seen(&backend, "/slow") > 1,
        "followers went upstream after 100ms"
    );
}

#[test]
fn when_the_first_response_is_not_storable_the_waiting_misses_go_upstream() {
    let backend = slow_backend(Duration::from_millis(200), "private");
    let proxy = Proxy::start(backend.addr);
    let started = std::time::Instant::now();
    let bodies = concurrent_gets(&proxy, "/mine", 10);
    assert_eq!(bodies.len(), 10);
    assert_eq!(seen(&backend, "/mine"), 10);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "followers waited the full coalesce_wait"
    );
}

/// A backend whose first answer is `first`; later ones are 304 when the
/// request carries `If-None-Match: "v1"`, else `later`.
fn revalidating_backend(first: &'static str, later_status: u16, later_cc: &'static str) -> Backend {
    Backend::start(move |req| {
        let conditional = req.header("if-none-match") == Some("\"v1\"");
        let n = req.header("x-n").unwrap_or("0");
        match (n, conditional) {
            ("0", _) => response(
                200,
                &[("Cache-Control", first), ("ETag", "\"v1\"")],
                b"version one",
            ),
            (_, true) => response(
                304,
                &[
                    ("Cache-Control", later_cc),
                    ("ETag", "\"v1\""),
                    ("X-Fresh", "yes"),
                ],
                b"",
            ),
            _ => response(later_status, &[("Cache-Control", later_cc)], b"later"),
        }
    })
}

#[test]
fn a_stale_entry_is_revalidated_and_a_304_freshens_it() {
    let backend = revalidating_backend("max-age=1", 200, "max-age=60");
    let proxy = Proxy::start(backend.addr);
    fetch(&proxy, "/r", "X-N: 0\r\n");
    std::thread::sleep(Duration::from_millis(2100));
    let revalidated = fetch(&proxy, "/r", "X-N: 1\r\n");
    assert_eq!(revalidated.status, 200);
    assert_eq!(
        revalidated.text(),
        "version one",
        "the stored body, not the 304's"
    );
    assert_eq!(
        revalidated.header("x-fresh"),
        Some("yes"),
        "fields updated from the 304"
    );
    assert_eq!(
        revalidated.header("cache-status"),
        Some("proxycache; fwd=stale; fwd-status=304; stored")
    );
    let last = backend.last();
    assert_eq!(
        last.header("if-none-match"),
        Some("\"v1\""),
        "the proxy asked with its validator"
    );
    // Fresh again for 60 s: no more upstream requests.
    let hit = fetch(&proxy, "/r", "X-N: 2\r\n");
    assert!(hit.header("cache-status").unwrap().contains("hit"));
    assert_eq!(seen(&backend, "/r"), 2);
}

#[test]
fn no_cache_responses_with_a_validator_are_revalidated_on_every_use() {
    let backend = revalidating_backend("no-cache", 200, "no-cache");
    let proxy = Proxy::start(backend.addr);
    fetch(&proxy, "/nc", "X-N: 0\r\n");
    for n in 1..=3 {
        let resp = fetch(&proxy, "/nc", &format!("X-N: {n}\r\n"));
        assert_eq!(resp.text(), "version one");
        assert_eq!(backend.last().header("if-none-match"), Some("\"v1\""));
    }
    assert_eq!(seen(&backend, "/nc"), 4);
}

#[test]
fn a_changed_response_replaces_the_stale_entry() {
    let backend = revalidating_backend("max-age=1", 200, "max-age=60");
    let proxy = Proxy::start(backend.addr);
    fetch(&proxy, "/changed", "X-N: 0\r\n");
    std::thread::sleep(Duration::from_millis(2100));
    // The client asks its own question: passed on, our copy is not freshened by it.
    let resp = fetch(&proxy, "/changed", "X-N: 1\r\nIf-None-Match: \"other\"\r\n");
    assert_eq!(resp.text(), "later");
    assert_eq!(
        fetch(&proxy, "/changed", "X-N: 2\r\n").text(),
        "later",
        "the new response was stored"
    );
}

#[test]
fn stale_if_error_serves_the_stale_entry_when_the_upstream_fails() {
    let backend = revalidating_backend("max-age=1, stale-if-error=60", 503, "no-store");
    let proxy = Proxy::start(backend.addr);
    fetch(&proxy, "/sie", "X-N: 0\r\n");
    std::thread::sleep(Duration::from_millis(2100));
    // The upstream answers 503 (our conditional is dropped here: it sends a different ETag check).
    let resp = fetch(&proxy, "/sie", "X-N: 1\r\nIf-None-Match: \"x\"\r\n");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "version one");
    assert_eq!(
        resp.header("cache-status"),
        Some("proxycache; fwd=stale; fwd-status=503")
    );

    // Without stale-if-error the error goes through.
    let plain = revalidating_backend("max-age=1", 503, "no-store");
    let proxy = Proxy::start(plain.addr);
    fetch(&proxy, "/e", "X-N: 0\r\n");
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        fetch(&proxy, "/e", "X-N: 1\r\nIf-None-Match: \"x\"\r\n").status,
        503
    );
    // ...unless the request allows it.
    let allowed = fetch(
        &proxy,
        "/e",
        "X-N: 1\r\nIf-None-Match: \"x\"\r\nCache-Control: stale-if-error=60\r\n",
    );
    assert_eq!(allowed.status, 200);
}

#[test]
fn stale_if_error_covers_an_unreachable_upstream() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let backend_thread = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        read_request(&mut reader).unwrap();
        let mut stream = stream;
        std::io::Write::write_all(
            &mut stream,
            &response(
                200,
                &[("Cache-Control", "max-age=1, stale-if-error=60")],
                b"kept",
            ),
        )
        .unwrap();
        // Then the upstream goes away: listener and connection close.
    });
    let proxy = Proxy::start(addr);
    assert_eq!(fetch(&proxy, "/down", "").text(), "kept");
    backend_thread.join().unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let resp = fetch(&proxy, "/down", "");
    assert_eq!(resp.text(), "kept");
    assert_eq!(
        resp.header("cache-status"),
        Some("proxycache; fwd=stale; fwd-status=502")
    );
}

fn purge(proxy: &Proxy, path: &str, extra: &str) -> Resp {
    request(
        proxy.addr,
        &format!("PURGE {path} HTTP/1.1\r\nHost: cache.test\r\n{extra}\r\n"),
    )
}

#[test]
fn purge_by_key_prefix_and_tag_from_trusted_clients() {
    let backend = backend(|path| {
        let tags = if path.starts_with("/shop/") {
            "product shop"
        } else {
            "other"
        };
        h(&[
            ("Cache-Control", "max-age=60"),
            ("Surrogate-Key", tags),
            ("Cache-Tag", "all, site"),
        ])
    });
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[modules.cache]\npurge_from = [\"127.0.0.0/8\"]",
            ..Conf::default()
        },
    );
    let paths = ["/a", "/shop/1", "/shop/2", "/b"];
    let warm = || {
        for path in paths {
            fetch(&proxy, path, "");
        }
    };
    let counts = || paths.map(|p| seen(&backend, p));
    warm();
    warm();
    assert_eq!(counts(), [1, 1, 1, 1]);

    let one = purge(&proxy, "/a", "");
    assert_eq!((one.status, one.header("x-purged")), (200, Some("1")));
    warm();
    assert_eq!(counts(), [2, 1, 1, 1], "by key");

    assert_eq!(
        purge(&proxy, "/shop/", "X-Purge: prefix\r\n").header("x-purged"),
        Some("2")
    );
    warm();
    assert_eq!(counts(), [2, 2, 2, 1], "by prefix");

    assert_eq!(
        purge(&proxy, "/", "X-Purge-Tag: product\r\n").header("x-purged"),
        Some("2")
    );
    warm();
    assert_eq!(counts(), [2, 3, 3, 1], "by Surrogate-Key tag");

    assert_eq!(
        purge(&proxy, "/", "X-Purge-Tag: site\r\n").header("x-purged"),
        Some("4")
    );
    warm();
    assert_eq!(counts(), [3, 4, 4, 2], "by Cache-Tag");
    assert!(
        backend.recorded().iter().all(|r| r.method == "GET"),
        "PURGE never went upstream"
    );
}

#[test]
fn purge_is_refused_to_untrusted_clients_and_forwarded_when_off() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=60")]));
    let mut proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[modules.cache]\npurge_from = [\"10.0.0.0/8\"]",
            ..Conf::default()
        },
    );
    fetch(&proxy, "/p", "");
    assert_eq!(purge(&proxy, "/p", "").status, 403);
    proxy.wait_for_log("PURGE from 127.0.0.1 refused");
    fetch(&proxy, "/p", "");
    assert_eq!(seen(&backend, "/p"), 1, "nothing was purged");

    let off = Proxy::start(backend.addr);
    purge(&off, "/p", "");
    assert_eq!(
        backend.last().method,
        "PURGE",
        "with purge_from empty, PURGE is just a method"
    );
}

#[test]
fn a_bad_purge_from_entry_names_the_module_and_key() {
    let text = refused_start(
        "[server]\nlisten_addr = \"127.0.0.1:0\"\n[modules.cache]\npurge_from = [\"not-a-net\"]\n",
    );
    assert!(
        text.contains("module `cache`: purge_from: \"not-a-net\""),
        "{text}"
    );
}

#[test]
fn byte_ranges_are_served_from_a_complete_entry() {
    let backend = Backend::start(|_| {
        response(
            200,
            &[("Cache-Control", "max-age=60"), ("ETag", "\"r1\"")],
            b"0123456789",
        )
    });
    let proxy = Proxy::start(backend.addr);
    fetch(&proxy, "/range", "");
    for (range, status, body, content_range) in [
        ("bytes=2-5", 206, "2345", Some("bytes 2-5/10")),
        ("bytes=7-", 206, "789", Some("bytes 7-9/10")),
        ("bytes=-3", 206, "789", Some("bytes 7-9/10")),
        ("bytes=8-100", 206, "89", Some("bytes 8-9/10")),
        ("bytes=0-1,4-5", 200, "0123456789", None),
        ("items=0-1", 200, "0123456789", None),
    ] {
        let resp = fetch(&proxy, "/range", &format!("Range: {range}\r\n"));
        assert_eq!(resp.status, status, "{range}");
        assert_eq!(resp.text(), body, "{range}");
        assert_eq!(resp.header("content-range"), content_range, "{range}");
    }
    let unsatisfiable = fetch(&proxy, "/range", "Range: bytes=10-\r\n");
    assert_eq!(unsatisfiable.status, 416);
    assert_eq!(unsatisfiable.header("content-range"), Some("bytes */10"));
    let current = fetch(&proxy, "/range", "Range: bytes=0-0\r\nIf-Range: \"r1\"\r\n");
    assert_eq!((current.status, current.text().as_str()), (206, "0"));
    let changed = fetch(&proxy, "/range", "Range: bytes=0-0\r\nIf-Range: \"r0\"\r\n");
    assert_eq!(
        (changed.status, changed.text().as_str()),
        (200, "0123456789")
    );
    assert_eq!(seen(&backend, "/range"), 1);
}

#[test]
fn cdn_cache_control_and_surrogate_control_speak_to_this_cache() {
    let backend = backend(|path| match path {
        "/cdn" => h(&[
            ("Cache-Control", "no-store"),
            ("CDN-Cache-Control", "max-age=60"),
        ]),
        _ => h(&[
            ("Cache-Control", "private"),
            ("Surrogate-Control", "max-age=60"),
        ]),
    });
    let proxy = Proxy::start(backend.addr);
    for path in ["/cdn", "/surrogate"] {
        fetch(&proxy, path, "");
        let hit = fetch(&proxy, path, "");
        assert_eq!(seen(&backend, path), 1, "{path}");
        assert_eq!(
            hit.header("surrogate-control"),
            None,
            "{path}: Surrogate-Control reached the client"
        );
    }
    let off = Proxy::with(
        backend.addr,
        Conf {
            rest: "[modules.cache]\ntargeted_cache_control = false",
            ..Conf::default()
        },
    );
    fetch(&off, "/cdn", "");
    fetch(&off, "/cdn", "");
    assert_eq!(
        seen(&backend, "/cdn"),
        3,
        "Cache-Control: no-store applies when targeted fields are ignored"
    );
}

#[test]
fn the_cache_key_is_configurable() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=60")]));
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[modules.cache]\nkey = [\"host\", \"path\"]\nkey_headers = [\"X-Tenant\"]",
            ..Conf::default()
        },
    );
    let first = fetch(&proxy, "/k?a=1", "X-Tenant: red\r\n");
    assert_eq!(
        fetch(&proxy, "/k?a=2", "X-Tenant: red\r\n").text(),
        first.text(),
        "query is not in the key"
    );
    assert_eq!(backend.recorded().len(), 1);
    fetch(&proxy, "/k?a=1", "X-Tenant: blue\r\n");
    assert_eq!(
        backend.recorded().len(),
        2,
        "the tenant header is in the key"
    );

    let text = refused_start("[server]\nlisten_addr = \"127.0.0.1:0\"\n[modules.cache]\nkey = [\"host\", \"fragment\"]\n");
    assert!(text.contains("module `cache`: key: \"fragment\""), "{text}");
}

#[test]
fn rules_bypass_the_cache_or_fix_the_ttl_per_path() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=60")]));
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[[modules.cache.rules]]\npath_prefix = \"/api/\"\nbypass = true\n\
                   [[modules.cache.rules]]\nhost = \"cache.test\"\npath_prefix = \"/static/\"\nttl = \"1h\"\n",
            ..Conf::default()
        },
    );
    fetch(&proxy, "/api/x", "");
    let bypassed = fetch(&proxy, "/api/x", "");
    assert_eq!(
        bypassed.header("cache-status"),
        Some("proxycache; fwd=bypass")
    );
    assert_eq!(seen(&backend, "/api/x"), 2);

    // The backend says nothing about freshness here; the rule stores it for an hour.
    let quiet = Backend::start(|req| response(200, &[], req.target.as_bytes()));
    let proxy = Proxy::with(
        quiet.addr,
        Conf {
            rest: "[[modules.cache.rules]]\npath_prefix = \"/static/\"\nttl = \"1h\"\n",
            ..Conf::default()
        },
    );
    fetch(&proxy, "/static/app.js", "");
    let hit = fetch(&proxy, "/static/app.js", "");
    assert!(
        hit.header("cache-status").unwrap().contains("ttl=3599")
            || hit.header("cache-status").unwrap().contains("ttl=3600")
    );
    fetch(&proxy, "/other", "");
    fetch(&proxy, "/other", "");
    assert_eq!(
        (seen(&quiet, "/static/app.js"), seen(&quiet, "/other")),
        (1, 2)
    );
}

#[test]
fn configured_urls_are_warmed_at_start() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=60")]));
    let mut proxy = Proxy::with(
        backend.addr,
        Conf {
            rest:
                "[modules.cache]\nwarm = [\"http://cache.test/w1\", \"http://cache.test/w2?x=1\"]",
            ..Conf::default()
        },
    );
    proxy.wait_for_log("cache warming: 2 of 2 URLs fetched");
    assert_eq!((seen(&backend, "/w1"), seen(&backend, "/w2?x=1")), (1, 1));
    assert_eq!(backend.last().header("host"), Some("cache.test"));
    let hit = fetch(&proxy, "/w1", "");
    assert!(
        hit.header("cache-status").unwrap().contains("hit"),
        "{hit:?}"
    );
    assert_eq!(seen(&backend, "/w1"), 1);
}

#[test]
fn stale_while_revalidate_serves_stale_and_refreshes_in_the_background() {
    let backend = backend(|_| {
        h(&[
            ("Cache-Control", "max-age=1, stale-while-revalidate=60"),
            ("Vary", "Accept"),
        ])
    });
    let proxy = Proxy::start(backend.addr);
    assert_eq!(
        fetch(&proxy, "/swr", "Accept: text/plain\r\n").text(),
        "/swr #1"
    );
    std::thread::sleep(Duration::from_millis(2100));
    let stale = fetch(&proxy, "/swr", "Accept: text/plain\r\n");
    assert_eq!(stale.text(), "/swr #1", "served stale at once");
    assert!(
        stale.header("cache-status").unwrap().contains("fwd=stale"),
        "{stale:?}"
    );
    // The refresh arrives in the background, for the same variant.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while seen(&backend, "/swr") < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background refresh"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(backend.last().header("accept"), Some("text/plain"));
    std::thread::sleep(Duration::from_millis(200));
    let fresh = fetch(&proxy, "/swr", "Accept: text/plain\r\n");
    assert_eq!(fresh.text(), "/swr #2");
    assert!(
        fresh.header("cache-status").unwrap().contains("hit; ttl="),
        "{fresh:?}"
    );
    assert_eq!(seen(&backend, "/swr"), 2);
}

#[test]
fn the_disk_tier_keeps_a_warm_cache_across_a_restart() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=600"), ("Surrogate-Key", "kept")]));
    let dir = TempDir::new();
    let conf = format!(
        "[modules.cache]\ndisk_dir = \"{}\"\npurge_from = [\"127.0.0.1\"]",
        dir.0.join("cache").display()
    );
    let mut first = Proxy::with(
        backend.addr,
        Conf {
            rest: &conf,
            ..Conf::default()
        },
    );
    let original = fetch(&first, "/persist", "");
    fetch(&first, "/gone", "");
    first.signal("TERM");
    first.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(1100));

    let second = Proxy::with(
        backend.addr,
        Conf {
            rest: &conf,
            ..Conf::default()
        },
    );
    let hit = fetch(&second, "/persist", "");
    assert_eq!(hit.text(), original.text());
    assert!(
        hit.header("cache-status").unwrap().contains("hit"),
        "{hit:?}"
    );
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!(age >= 1, "the age kept counting across the restart: {age}");
    assert_eq!(seen(&backend, "/persist"), 1);

    // A purge reaches entries that are only on disk.
    assert_eq!(purge(&second, "/gone", "").header("x-purged"), Some("1"));
    fetch(&second, "/gone", "");
    assert_eq!(seen(&backend, "/gone"), 2);
}

#[test]
fn a_streamed_response_that_turns_out_too_big_passes_through_unstored() {
    // Chunked: no Content-Length to judge by until the body has streamed past the limit.
    let backend = Backend::start(|_| {
        let mut out =
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        for _ in 0..4 {
            out.extend_from_slice(b"400\r\n");
            out.extend_from_slice(&[b'z'; 0x400]);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    });
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[modules.cache]\nmax_object_size = 3000",
            ..Conf::default()
        },
    );
    for _ in 0..2 {
        assert_eq!(
            fetch(&proxy, "/stream", "").body.len(),
            4096,
            "the client gets it all"
        );
    }
    assert_eq!(seen(&backend, "/stream"), 2, "not stored");
}

#[test]
fn the_cached_methods_are_configurable() {
    let backend = backend(|_| h(&[("Cache-Control", "max-age=60")]));
    let proxy = Proxy::with(
        backend.addr,
        Conf {
            rest: "[modules.cache]\nmethods = [\"GET\"]",
            ..Conf::default()
        },
    );
    fetch(&proxy, "/m", "");
    let mut client = Client::connect(proxy.addr);
    client.send("HEAD /m HTTP/1.1\r\nHost: cache.test\r\n\r\n");
    assert_eq!(client.head_response().status, 200);
    assert_eq!(
        backend.last().method,
        "HEAD",
        "HEAD is not answered from the cache"
    );
    let text = refused_start(
        "[server]\nlisten_addr = \"127.0.0.1:0\"\n[modules.cache]\nmethods = [\"GET\", \"POST\"]\n",
    );
    assert!(
        text.contains("module `cache`: methods: \"POST\" cannot be cached"),
        "{text}"
    );
}

#[test]
fn a_key_found_uncacheable_is_not_coalesced_again() {
    // Hit-for-miss: once a URL's response proved not storable, concurrent
    // misses for it go upstream together instead of queueing behind one.
    let backend = slow_backend(Duration::from_millis(400), "private");
    let proxy = Proxy::start(backend.addr);
    fetch(&proxy, "/dynamic", "");
    let started = std::time::Instant::now();
    concurrent_gets(&proxy, "/dynamic", 10);
    let took = started.elapsed();
    assert_eq!(seen(&backend, "/dynamic"), 11);
    assert!(
        took < Duration::from_millis(750),
        "queued behind a leader: {took:?}"
    );
}

#[test]
fn a_hit_for_miss_mark_hides_nothing_stored() {
    let backend = Backend::start(|req| match req.header("x-mode") {
        Some("private") => response(200, &[("Cache-Control", "private")], b"mine"),
        Some("fail") => response(503, &[], b"down"),
        _ => response(
            200,
            &[("Cache-Control", "max-age=1, stale-if-error=60")],
            b"kept",
        ),
    });
    let proxy = Proxy::start(backend.addr);
    // Marked when nothing was stored: a storable response is still stored, and then used.
    fetch(&proxy, "/later", "X-Mode: private\r\n");
    let stored = fetch(&proxy, "/later", "");
    assert_eq!(
        stored.header("cache-status"),
        Some("proxycache; fwd=miss; stored")
    );
    let hit = fetch(&proxy, "/later", "");
    assert!(
        hit.header("cache-status").unwrap().contains("hit"),
        "{hit:?}"
    );

    // Marked beside a stale entry: the entry is still found when the upstream fails.
    fetch(&proxy, "/kept", "");
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(fetch(&proxy, "/kept", "X-Mode: private\r\n").text(), "mine");
    let rescued = fetch(&proxy, "/kept", "X-Mode: fail\r\n");
    assert_eq!((rescued.status, rescued.text().as_str()), (200, "kept"));
    assert_eq!(seen(&backend, "/kept"), 3);
}

#[test]
fn variants_outlive_a_restart_and_go_together_when_invalidated_or_purged() {
    let backend = backend(|_| {
        h(&[
            ("Cache-Control", "max-age=600"),
            ("Vary", "Accept-Encoding"),
        ])
    });
    let dir = TempDir::new();
    let conf = format!(
        "[modules.cache]\ndisk_dir = \"{}\"\npurge_from = [\"127.0.0.1\"]",
        dir.0.join("cache").display()
    );
    let start = || {
        Proxy::with(
            backend.addr,
            Conf {
                rest: &conf,
                ..Conf::default()
            },
        )
    };
    let variants = ["Accept-Encoding: gzip\r\n", "Accept-Encoding: br\r\n", ""];
    let mut first = start();
    let bodies: Vec<String> = variants
        .iter()
        .map(|v| fetch(&first, "/v", v).text())
        .collect();
    first.signal("TERM");
    first.child.wait().unwrap();

    let second = start();
    for (variant, body) in variants.iter().zip(&bodies) {
        let hit = fetch(&second, "/v", variant);
        assert!(
            hit.header("cache-status").unwrap().contains("hit"),
            "{variant:?}: {hit:?}"
        );
        assert_eq!(&hit.text(), body);
    }
    assert_eq!(seen(&backend, "/v"), 3);

    // A POST to the URL invalidates every variant.
    request(
        second.addr,
        "POST /v HTTP/1.1\r\nHost: cache.test\r\nContent-Length: 0\r\n\r\n",
    );
    for variant in variants {
        let status = fetch(&second, "/v", variant)
            .header("cache-status")
            .unwrap()
            .to_owned();
        assert!(status.contains("miss; stored"), "{variant:?}: {status}");
    }
    assert_eq!(seen(&backend, "/v"), 7, "three GETs and the POST");

    // So does purging the URL's key: all three variants.
    assert_eq!(purge(&second, "/v", "").header("x-purged"), Some("3"));
    for variant in variants {
        assert!(fetch(&second, "/v", variant)
            .header("cache-status")
            .unwrap()
            .contains("miss"));
    }
    assert_eq!(seen(&backend, "/v"), 10);
}

/// The purge functions as the admin API reaches them: through the handle
/// the cache publishes, on the real server loop run in-process.
#[test]
fn the_cache_publishes_its_purge_functions() {
    use proxycache::config::Config;
    use proxycache::modules::cache::Cache;
    use proxycache::server::Server;

    let backend = backend(|path| {
        let tag = if path.starts_with("/a/") {
            "alpha"
        } else {
            "beta"
        };
        h(&[("Cache-Control", "max-age=600"), ("Surrogate-Key", tag)])
    });
    let text = format!(
        "[server]\nlisten_addr = \"127.0.0.1:0\"\nbackend_addr = \"{}\"\nworkers = 2\n[log]\naccess_log = \"off\"\n",
        backend.addr
    );
    let config = Config::parse(&text, std::path::Path::new("test.toml")).unwrap();
    let server = Server::start(&config, Vec::new()).unwrap();
    let get = |path: &str| {
        request(
            server.local_addr(),
            &format!("GET {path} HTTP/1.1\r\nHost: cache.test\r\n\r\n"),
        )
        .header("cache-status")
        .unwrap()
        .to_owned()
    };
    let paths = ["/a/1", "/a/2", "/b/1", "/b/2"];
    for path in paths {
        get(path);
        assert!(get(path).contains("hit"), "{path}");
    }
    let cache = server
        .service::<Cache>()
        .expect("the cache publishes itself");
    assert_eq!(cache.purge_key("http://cache.test/a/1"), 1);
    assert_eq!(cache.purge_prefix("http://cache.test/b/"), 2);
    assert_eq!(
        cache.purge_tag("alpha"),
        1,
        "/a/2 is the one left tagged alpha"
    );
    for path in paths {
        assert!(get(path).contains("miss"), "{path} was purged");
    }
    assert_eq!(backend.recorded().len(), 8);
    server.shutdown(Duration::from_secs(1));
}

/// Bodies of 16 KiB and more are kept in a memory file and sent with
/// sendfile: they must come out byte for byte, framed right on a
/// keep-alive connection, and serve HEAD and ranges like any other.
#[test]
fn large_cached_bodies_go_out_byte_for_byte() {
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sent = body.clone();
    let backend =
        Backend::start(move |_| response(200, &[("Cache-Control", "max-age=600")], &sent));
    let proxy = Proxy::start(backend.addr);
    let mut client = Client::connect(proxy.addr);
    for expect in ["fwd=miss; stored", "hit", "hit"] {
        client.send("GET /large HTTP/1.1\r\nHost: cache.test\r\n\r\n");
        let resp = client.response();
        assert!(
            resp.header("cache-status").unwrap().contains(expect),
            "{:?}",
            resp.header("cache-status")
        );
        assert!(resp.body == body, "body differs after {expect}");
    }
    client.send("HEAD /large HTTP/1.1\r\nHost: cache.test\r\n\r\n");
    let head = client.head_response();
    assert_eq!(head.header("content-length"), Some("300000"));
    client.send("GET /large HTTP/1.1\r\nHost: cache.test\r\nRange: bytes=100000-100009\r\n\r\n");
    let range = client.response();
    assert_eq!(range.status, 206);
    assert_eq!(range.body, body[100_000..100_010]);
    assert_eq!(seen(&backend, "/large"), 1);
}
