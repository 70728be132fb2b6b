//! Heap bytes of one `rules-full` change, step by step, as the Worker's Relay (and the native
//! upstream task) takes it: what a snapshot keeps, and the peak a change reaches above it.
//!
//! `cargo run --release -p rollgate-proxy-core --example change_memory`
//!
//! The Worker's wasm memory only grows: a change's peak above what the previous snapshot
//! keeps is what its first change adds to the isolate (`BENCHMARKS.md`). The figures here are
//! the native allocator's requests, not wasm pages, so read them as proportions.

use rollgate_proxy_core::snapshot::{FlagSource, SnapshotStore};
use rollgate_proxy_core::sse::decode::Decoder;
use rollgate_proxy_core::time::Timestamp;

#[path = "../benches/fixtures/mod.rs"]
mod fixtures;

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

/// Bytes allocated since the current profiler started and still live.
fn live() -> usize {
    dhat::HeapStats::get().curr_bytes
}

fn kib(bytes: usize) -> String {
    format!("{:>8.1} KiB", bytes as f64 / 1024.0)
}

/// One change as the Relay takes it: the event through the stream's SSE decoder in 16 KiB
/// reads, parsed and compiled into a snapshot that replaces the current one, its persisted form,
/// the shards' frame and a stream's flags frame made, then what the change does not keep
/// dropped. Prints each step's live bytes above `base` (a decoder that already read a change
/// reuses its buffer).
fn change(
    store: &mut SnapshotStore,
    decoder: &mut Decoder,
    at: u64,
    text: &str,
    base: usize,
    print: bool,
) {
    let step = |name: &str| {
        if print {
            let stats = dhat::HeapStats::get();
            println!(
                "  {name:<40} live {}   peak so far {}",
                kib(stats.curr_bytes.saturating_sub(base)),
                kib(stats.max_bytes.saturating_sub(base))
            );
        }
    };
    decoder
        .push(b"event: rules-full\ndata: ")
        .expect("a valid stream");
    for read in text.as_bytes().chunks(16 * 1024) {
        decoder.push(read).expect("a valid stream");
    }
    decoder.push(b"\n\n").expect("a valid stream");
    let event = decoder.next_event().expect("one event");
    step("decoded event");
    let source = FlagSource::rules_from_json(event.data.as_bytes()).expect("valid rules");
    // Handed back as the Relay's upstream machine does: its buffer reads the next change.
    decoder.recycle(event);
    step("parsed and compiled (event recycled)");
    let snapshot = store
        .replace(Timestamp::from_millis(at), source)
        .expect("new content");
    step("snapshot current (the old one dropped)");
    let persisted = snapshot.to_persisted(None);
    step("persisted form");
    let shared = snapshot.shared_anonymous_frame("snapshot");
    step("shards' frame (the envelope as an SSE event)");
    let frame = snapshot.flags_frame().clone();
    step("a stream's flags frame");
    drop((persisted, shared, frame, snapshot));
    step("after the change");
}

/// Measures the second of two changes of `first` (one flag switched, as
/// `scripts/bench-edge.sh` does) under its own profiler.
fn measure(label: &str, first: &str) {
    let second = first.replacen("\"enabled\":true", "\"enabled\":false", 1);
    // dhat counts what is allocated while its profiler runs (`testing`: no file written).
    let _profiler = dhat::Profiler::builder().testing().build();
    let mut store = SnapshotStore::new();
    // One upstream stream's decoder for both changes, as the Relay has.
    let mut decoder = Decoder::default();
    change(&mut store, &mut decoder, 1, first, 0, false);
    let kept = live();
    println!(
        "{label}: rules-full event of {} bytes, 2,000 flags",
        first.len()
    );
    println!(
        "kept between changes (the snapshot, the stream decoder's line buffer) {}",
        kib(kept)
    );
    println!("the next change, live bytes above that, after each step:");
    change(&mut store, &mut decoder, 2, &second, kept, true);
    // The first change held no previous snapshot: the run's peak is the second's.
    let peak = dhat::HeapStats::get().max_bytes;
    println!(
        "peak of the change above what was kept {}",
        kib(peak - kept)
    );
    println!("peak in all {}\n", kib(peak));
}

fn main() {
    let shared = fixtures::rules_full();
    measure(
        "one condition shared by every flag (the bench's set)",
        &shared,
    );
    // Compiled rules keep one copy of each distinct condition: the same set with a value of
    // its own in every flag's condition shows the layout without that saving.
    let mut distinct = String::with_capacity(shared.len() + 16 * 2000);
    for (i, part) in shared.split(r#""value":"pro""#).enumerate() {
        if i > 0 {
            distinct.push_str(&format!(r#""value":"pro-{i}""#));
        }
        distinct.push_str(part);
    }
    measure("a distinct condition in every flag", &distinct);
}
