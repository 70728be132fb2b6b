//! SSE benchmarks: encoding a flags frame and decoding a stream of them.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rollgate_proxy_core::sse::{Decoder, DecoderLimits, Event};

/// A `{"flags":{..}}` body of about `target` bytes, like a mid-sized environment's snapshot.
fn flags_json(target: usize) -> String {
    let mut json = String::from(r#"{"flags":{"#);
    let mut i = 0;
    while json.len() < target - 40 {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(r#""feature-flag-{i:04}":{}"#, i % 3 == 0));
        i += 1;
    }
    json.push_str("}}");
    json
}

fn encode(c: &mut Criterion) {
    let data = flags_json(2048);
    let mut group = c.benchmark_group("sse_encode");
    let frame_len = Event::new()
        .event("flags")
        .unwrap()
        .data(&data)
        .to_bytes()
        .len();
    group.throughput(Throughput::Bytes(frame_len as u64));
    group.bench_function("flags_frame_2k", |b| {
        b.iter(|| {
            Event::new()
                .event("flags")
                .unwrap()
                .id("rev-12345")
                .unwrap()
                .data(black_box(&data))
                .into_bytes()
        });
    });
    group.finish();
}

fn decode(c: &mut Criterion) {
    let frame = Event::new()
        .event("flags")
        .unwrap()
        .id("rev-12345")
        .unwrap()
        .data(&flags_json(2048))
        .to_bytes();
    let mut stream = Vec::new();
    while stream.len() < 1 << 20 {
        stream.extend_from_slice(&frame);
    }
    let frames = stream.len() / frame.len();
    let mut group = c.benchmark_group("sse_decode");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("flags_1MiB_4KiB_chunks", |b| {
        b.iter_batched_ref(
            || Decoder::new(DecoderLimits::default()),
            |decoder| {
                let mut events = 0;
                for chunk in stream.chunks(4096) {
                    decoder.push(chunk).unwrap();
                    while let Some(event) = decoder.next_event() {
                        black_box(&event);
                        events += 1;
                    }
                }
                assert_eq!(events, frames);
            },
            BatchSize::SmallInput,
        );
    });

    // One 256 KiB line fed a byte at a time: must stay linear (no rescanning the buffer).
    let big = Event::new().data(&"x".repeat(256 << 10)).to_bytes();
    group.throughput(Throughput::Bytes(big.len() as u64));
    group.bench_function("line_256KiB_1B_chunks", |b| {
        b.iter_batched_ref(
            || Decoder::new(DecoderLimits::default()),
            |decoder| {
                for chunk in big.chunks(1) {
                    decoder.push(chunk).unwrap();
                }
                assert!(decoder.next_event().is_some());
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
