//! Micro-benchmarks of the hot parsing paths: request heads and chunked bodies.
//! Run with `cargo bench --bench parse`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

use proxycache::http::chunked::{
    encode_chunk_header, encode_last_chunk, ChunkedDecoder, CHUNK_END,
};
use proxycache::http::{request, Limits};

const LIMITS: Limits = Limits {
    max_request_line: 8192,
    max_header_size: 32 * 1024,
    max_headers: 100,
    max_body_size: 0,
};

const CURL: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";

const BROWSER: &[u8] = b"GET /assets/app.js?v=3 HTTP/1.1\r\nHost: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.9\r\n\
Accept-Encoding: gzip, deflate, br\r\nReferer: https://shop.example.com/\r\nConnection: keep-alive\r\n\
Cookie: session=abcdef0123456789; theme=dark; cart=42\r\nSec-Fetch-Dest: script\r\nSec-Fetch-Mode: no-cors\r\n\
Sec-Fetch-Site: same-origin\r\nCache-Control: no-cache\r\nPragma: no-cache\r\n\r\n";

fn request_heads(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_head");
    for (name, head) in [("curl", CURL), ("browser", BROWSER)] {
        group.throughput(Throughput::Bytes(head.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), head, |b, head| {
            b.iter(|| request::parse(black_box(head), &LIMITS).unwrap().unwrap())
        });
    }
    group.finish();
}

fn chunked_body(chunk: usize) -> Vec<u8> {
    let data = vec![b'x'; chunk];
    let mut body = Vec::new();
    for _ in 0..(64 * 1024 / chunk) {
        encode_chunk_header(&mut body, chunk);
        body.extend_from_slice(&data);
        body.extend_from_slice(CHUNK_END);
    }
    encode_last_chunk(&mut body, b"");
    body
}

fn chunked_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("chunked_decode_64KiB");
    group.throughput(Throughput::Bytes(64 * 1024));
    for chunk in [256, 4096, 16384] {
        let body = chunked_body(chunk);
        group.bench_with_input(BenchmarkId::from_parameter(chunk), &body, |b, body| {
            b.iter(|| {
                let mut decoder = ChunkedDecoder::new(4096);
                let mut input = &body[..];
                let mut data = 0;
                while !decoder.is_done() {
                    let step = decoder.decode(input).unwrap();
                    data += step.data.map_or(0, |r| r.len());
                    input = &input[step.consumed..];
                }
                black_box(data)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, request_heads, chunked_decode);
criterion_main!(benches);
