//! Criterion micro-benchmarks of the hot path: framing (scan, decode, encode), envelope
//! parsing and id splicing, and placement (HRW ranking and bounded-load placement).
//!
//! `cargo bench --bench micro` (add `-- --quick` for a short run).

use copilot_lb::balance::{self, Candidate};
use copilot_lb::codec::{self, FrameReader, Limits};
use copilot_lb::envelope;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const REQUEST: &[u8] = br#"{"jsonrpc":"2.0","id":42,"method":"session.send","params":{"sessionId":"team-a-7f3c2b1e-9d4a-4c1b-8e2f-0a1b2c3d4e5f","prompt":"Summarise the repository layout and list the build steps","attachments":[]}}"#;

fn event(size: usize) -> Vec<u8> {
    format!(
        r#"{{"jsonrpc":"2.0","method":"session.event","params":{{"sessionId":"team-a-7f3c2b1e","event":{{"id":"0b7d","timestamp":"2026-01-01T00:00:00.000Z","parentId":null,"type":"assistant.message_delta","ephemeral":true,"data":{{"messageId":"m","deltaContent":"{}"}}}}}}}}"#,
        "x".repeat(size)
    )
    .into_bytes()
}

fn codec_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    let frame = codec::encode_frame(REQUEST);
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("scan_header", |b| {
        b.iter(|| codec::scan_header(black_box(&frame), 8192).unwrap())
    });
    g.bench_function("encode_frame", |b| {
        b.iter(|| codec::encode_frame(black_box(REQUEST)))
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for (name, body) in [("request", REQUEST.to_vec()), ("event_64k", event(65_536))] {
        let mut wire = Vec::new();
        for _ in 0..64 {
            wire.extend(codec::encode_frame(&body));
        }
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_with_input(BenchmarkId::new("read_64_frames", name), &wire, |b, w| {
            b.iter(|| {
                rt.block_on(async {
                    let mut r = FrameReader::new(&w[..], Limits::default());
                    let mut n = 0;
                    while let Some(f) = r.read_frame().await.unwrap() {
                        n += f.len();
                    }
                    n
                })
            })
        });
    }
    g.finish();
}

fn envelope_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("envelope");
    let ev = event(200);
    let big = event(65_536);
    for (name, body) in [
        ("request", REQUEST.to_vec()),
        ("event_200b", ev),
        ("event_64k", big),
    ] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("parse", name), &body, |b, body| {
            b.iter(|| envelope::parse(black_box(body)).unwrap().kind)
        });
        // What a frame from a backend costs: the structural walk.
        g.bench_with_input(BenchmarkId::new("parse_backend", name), &body, |b, body| {
            b.iter(|| envelope::parse_backend(black_box(body)).unwrap().kind)
        });
    }
    // A streamed frame: its envelope from the head, then the check of every byte.
    let huge = event(1 << 20);
    g.throughput(Throughput::Bytes(huge.len() as u64));
    for (name, strict) in [("client", true), ("backend", false)] {
        g.bench_function(format!("stream_check_1mib_{name}"), |b| {
            b.iter(|| {
                let h = envelope::parse_head(&huge[..16 * 1024]).unwrap();
                let mut t = if strict {
                    envelope::Tail::new(h.cut, 128)
                } else {
                    envelope::Tail::structural(h.cut, 128)
                };
                for c in huge.chunks(64 * 1024) {
                    t.feed(black_box(c)).unwrap();
                }
                t.finish().unwrap();
            })
        });
    }
    let env = envelope::parse(REQUEST).unwrap();
    let span = env.id_span.unwrap();
    g.bench_function("splice_id", |b| {
        b.iter(|| envelope::splice(black_box(REQUEST), span, b"1234567"))
    });
    g.finish();
}

fn placement_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("placement");
    for n in [3usize, 16, 64] {
        let names: Vec<String> = (0..n).map(|i| format!("cli-{i}")).collect();
        g.bench_with_input(BenchmarkId::new("rank", n), &names, |b, names| {
            b.iter(|| {
                balance::rank(
                    black_box("team-a-7f3c2b1e-9d4a"),
                    names.iter().map(|s| (s.as_str(), 1.0)),
                )
            })
        });
        let cands: Vec<Candidate> = names
            .iter()
            .enumerate()
            .map(|(i, s)| Candidate {
                name: s,
                weight: 1.0,
                eligible: true,
                live: (i as u64 * 7) % 40,
                max_sessions: Some(500),
            })
            .collect();
        g.bench_with_input(BenchmarkId::new("place", n), &cands, |b, cands| {
            b.iter(|| balance::place(black_box("team-a-7f3c2b1e-9d4a"), cands, 1.25))
        });
    }
    g.finish();
}

criterion_group!(benches, codec_benches, envelope_benches, placement_benches);
criterion_main!(benches);
