//! Deterministic simulations of the upstream machine against a scripted Rollgate, on a virtual clock.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use proptest::prelude::*;

use super::*;
use crate::sse::encode::Event;

/// The virtual clock starts here (2026-01-01T00:00:00Z), far from zero so saturating arithmetic
/// is not what makes tests pass.
const T0: u64 = 1_767_225_600_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Up,
    Status(u16),
    Unreachable,
}

/// A scripted Rollgate: answers fetches and stream opens according to `health`.
#[derive(Debug)]
struct FakeRollgate {
    health: Health,
    flags: BTreeMap<String, bool>,
    version: u64,
    /// Keepalive comments every 15 s on an open stream (off to test idle detection).
    keepalives: bool,
}

impl FakeRollgate {
    fn body(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(&serde_json::json!({ "flags": self.flags })).unwrap())
    }

    fn etag(&self) -> String {
        format!("\"v{}\"", self.version)
    }

    fn init_frame(&self) -> Bytes {
        Event::new()
            .event("init")
            .unwrap()
            .data(std::str::from_utf8(&self.body()).unwrap())
            .into_bytes()
    }
}

/// The proxy side: the machine plus a record of everything it did.
struct Sim {
    now: Timestamp,
    machine: Upstream,
    rollgate: FakeRollgate,
    open_stream: Option<StreamId>,
    last_keepalive: Timestamp,
    published: Vec<Arc<Snapshot>>,
    persisted: Vec<Bytes>,
    fetches: usize,
    transcript: String,
}

impl Sim {
    fn new(config: UpstreamConfig) -> Self {
        let now = Timestamp::from_millis(T0);
        let mut sim = Self {
            now,
            machine: Upstream::new(config, now),
            rollgate: FakeRollgate {
                health: Health::Up,
                flags: BTreeMap::from([
                    ("checkout".to_owned(), false),
                    ("search".to_owned(), true),
                ]),
                version: 1,
                keepalives: true,
            },
            open_stream: None,
            last_keepalive: now,
            published: Vec::new(),
            persisted: Vec::new(),
            fetches: 0,
            transcript: String::new(),
        };
        sim.settle();
        sim
    }

    fn elapsed(&self) -> u64 {
        self.now.as_millis() - T0
    }

    fn log(&mut self, line: &str) {
        let elapsed = self.elapsed();
        writeln!(self.transcript, "{:>9.3}s {line}", elapsed as f64 / 1000.0).unwrap();
    }

    /// Logs a state line: breaker and stream.
    fn log_state(&mut self) {
        let line = format!(
            "state breaker={} stream={}",
            self.machine.breaker_state().as_str(),
            self.machine.stream_state().as_str()
        );
        self.log(&line);
    }

    /// Performs every queued action against the fake, until the machine has nothing to do.
    fn settle(&mut self) {
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::Fetch { id, if_none_match } => {
                    self.fetches += 1;
                    let result = match self.rollgate.health {
                        Health::Up if if_none_match.as_deref() == Some(&self.rollgate.etag()) => {
                            self.log("fetch (if-none-match) -> 304");
                            FetchResult::Response {
                                status: 304,
                                etag: None,
                                body: Bytes::new(),
                                retry_after: None,
                            }
                        }
                        Health::Up => {
                            let conditional = if if_none_match.is_some() {
                                " (if-none-match)"
                            } else {
                                ""
                            };
                            self.log(&format!("fetch{conditional} -> 200"));
                            FetchResult::Response {
                                status: 200,
                                etag: Some(self.rollgate.etag()),
                                body: self.rollgate.body(),
                                retry_after: None,
                            }
                        }
                        Health::Status(status) => {
                            self.log(&format!("fetch -> {status}"));
                            FetchResult::Response {
                                status,
                                etag: None,
                                body: Bytes::from_static(b"{\"error\":{}}"),
                                retry_after: None,
                            }
                        }
                        Health::Unreachable => {
                            self.log("fetch -> connection refused");
                            FetchResult::Transport("connection refused".to_owned())
                        }
                    };
                    self.machine.handle_fetch(self.now, id, result);
                }
                Action::OpenStream(id) => match self.rollgate.health {
                    Health::Up => {
                        self.log("stream open -> 200, init");
                        self.machine
                            .handle_stream_opened(self.now, id, 200, true, None);
                        self.open_stream = Some(id);
                        self.last_keepalive = self.now;
                        let init = self.rollgate.init_frame();
                        self.machine.handle_stream_bytes(self.now, id, &init);
                    }
                    Health::Status(status) => {
                        self.log(&format!("stream open -> {status}"));
                        self.machine
                            .handle_stream_opened(self.now, id, status, false, None);
                    }
                    Health::Unreachable => {
                        self.log("stream open -> connection refused");
                        self.machine.handle_stream_closed(
                            self.now,
                            id,
                            StreamEnd::Error("connection refused".to_owned()),
                        );
                    }
                },
                Action::CloseStream(id) => {
                    self.log("proxy closes stream");
                    if self.open_stream == Some(id) {
                        self.open_stream = None;
                    }
                }
                Action::Publish(snapshot) => {
                    let flags = serde_json::to_string(&snapshot.defaults().flags).unwrap();
                    self.log(&format!("publish r{} {flags}", snapshot.revision()));
                    self.published.push(snapshot);
                }
                Action::Persist { bytes, .. } => self.persisted.push(bytes),
            }
        }
    }

    /// Runs the clock to `until`, firing the machine's timers and the fake's keepalives.
    fn run_until(&mut self, until: Timestamp) {
        for _ in 0..100_000 {
            let keepalive_at = (self.rollgate.keepalives && self.open_stream.is_some())
                .then(|| self.last_keepalive.saturating_add(Duration::from_secs(15)));
            let next = [self.machine.poll_timeout(), keepalive_at]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = next.filter(|next| *next <= until) else {
                self.now = until;
                return;
            };
            self.now = self.now.max(next);
            if keepalive_at == Some(next) {
                self.last_keepalive = next;
                if let Some(id) = self.open_stream {
                    self.machine
                        .handle_stream_bytes(self.now, id, b": keepalive\n\n");
                }
            } else {
                self.machine.handle_timeout(self.now);
            }
            self.settle();
        }
        panic!("simulation did not reach its deadline: a timer loop");
    }

    fn advance(&mut self, duration: Duration) {
        self.run_until(self.now.saturating_add(duration));
    }

    /// Upstream changes a flag and notifies open streams with `flag-changed` (as the official
    /// mock does).
    fn change_flag(&mut self, key: &str, value: bool) {
        self.rollgate.flags.insert(key.to_owned(), value);
        self.rollgate.version += 1;
        self.log(&format!("upstream sets {key}={value}"));
        if let Some(id) = self.open_stream {
            let frame = Event::new()
                .event("flag-changed")
                .unwrap()
                .data(&format!("{{\"key\":\"{key}\",\"enabled\":{value}}}"))
                .into_bytes();
            self.machine.handle_stream_bytes(self.now, id, &frame);
            self.settle();
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        let id = self.open_stream.expect("a stream is open");
        self.machine.handle_stream_bytes(self.now, id, bytes);
        self.settle();
    }

    fn drop_stream(&mut self) {
        if let Some(id) = self.open_stream.take() {
            self.log("upstream drops stream");
            self.machine
                .handle_stream_closed(self.now, id, StreamEnd::Eof);
            self.settle();
        }
    }

    fn value(&self, key: &str) -> Option<bool> {
        self.machine
            .snapshot()
            .and_then(|s| s.defaults().flags.get(key).copied())
    }
}

fn frame(event: &str, data: &str) -> Bytes {
    Event::new().event(event).unwrap().data(data).into_bytes()
}

/// The full outage story, as a transcript: healthy stream → stream dies → reconnect backoff →
/// upstream returns 500s → breaker opens → polling through the outage → recovery.
#[test]
fn outage_and_recovery_transcript() {
    let mut sim = Sim::new(UpstreamConfig::default());
    sim.log_state();
    sim.advance(Duration::from_secs(10));
    sim.change_flag("checkout", true);
    sim.advance(Duration::from_secs(5));
    sim.drop_stream();
    sim.log_state();
    sim.advance(Duration::from_secs(5));
    sim.log_state();

    sim.rollgate.health = Health::Status(500);
    sim.log("upstream starts answering 500");
    sim.drop_stream();
    sim.advance(Duration::from_secs(120));
    sim.log_state();
    assert_eq!(sim.machine.breaker_state(), BreakerState::Open);
    // Still serving the last good data.
    assert_eq!(sim.value("checkout"), Some(true));
    sim.advance(Duration::from_secs(240));
    assert_eq!(
        sim.machine.freshness(sim.now),
        Freshness::Stale,
        "data unconfirmed for 5 min is stale"
    );

    sim.rollgate.health = Health::Up;
    sim.rollgate.flags.insert("search".to_owned(), false);
    sim.rollgate.version += 1;
    sim.log("upstream recovers (search=false meanwhile)");
    sim.advance(Duration::from_secs(60));
    sim.log_state();
    assert_eq!(sim.machine.breaker_state(), BreakerState::Closed);
    assert_eq!(sim.machine.stream_state(), StreamState::Connected);
    assert_eq!(sim.value("search"), Some(false));
    assert_eq!(sim.machine.freshness(sim.now), Freshness::Fresh);

    let expected = include_str!("../../tests/data/upstream-outage.transcript");
    if sim.transcript != expected {
        // Print the whole transcript so a deliberate behaviour change can be reviewed and the
        // golden file updated with it.
        panic!("transcript changed:\n{}", sim.transcript);
    }
}

#[test]
fn start_fetches_then_streams_and_publishes_once() {
    let sim = Sim::new(UpstreamConfig::default());
    assert_eq!(
        sim.published.len(),
        1,
        "the stream's init has the same content"
    );
    assert_eq!(sim.persisted.len(), 1);
    assert_eq!(sim.machine.stream_state(), StreamState::Connected);
    assert_eq!(sim.machine.poll_timeout().map(|t| t > sim.now), Some(true));
    let status = sim.machine.status(sim.now);
    assert_eq!(status.mode, Some("evaluated"));
    assert_eq!(status.counters.fetch_ok, 1);
    assert_eq!(status.counters.stream_connects, 1);
}

#[test]
fn no_polling_while_the_stream_delivers() {
    let mut sim = Sim::new(UpstreamConfig::default());
    let fetches = sim.fetches;
    sim.advance(Duration::from_secs(600));
    assert_eq!(sim.fetches, fetches, "keepalives keep the stream; no polls");
}

#[test]
fn polls_every_refresh_interval_without_streaming() {
    let mut sim = Sim::new(UpstreamConfig {
        streaming: false,
        ..UpstreamConfig::default()
    });
    assert_eq!(sim.machine.stream_state(), StreamState::Disabled);
    sim.advance(Duration::from_secs(95));
    assert_eq!(sim.fetches, 4, "initial + 3 polls at 30 s");
    sim.change_flag("checkout", true);
    assert_eq!(sim.value("checkout"), Some(false), "nothing streams");
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.value("checkout"), Some(true));
}

#[test]
fn flag_changed_bursts_cost_at_most_two_fetches() {
    let mut sim = Sim::new(UpstreamConfig::default());
    let fetches = sim.fetches;
    let id = sim.open_stream.unwrap();
    // Deliver three notifications in one chunk while the first refetch is in flight: the
    // machine answers fetches synchronously in this sim, so feed the bytes without settling.
    sim.rollgate.flags.insert("checkout".into(), true);
    sim.rollgate.version += 1;
    let mut bytes = Vec::new();
    for _ in 0..3 {
        bytes.extend_from_slice(&frame(
            "flag-changed",
            r#"{"key":"checkout","enabled":true}"#,
        ));
    }
    sim.machine.handle_stream_bytes(sim.now, id, &bytes);
    sim.settle();
    assert!(
        sim.fetches - fetches <= 2,
        "{} fetches",
        sim.fetches - fetches
    );
    assert_eq!(sim.value("checkout"), Some(true));
}

#[test]
fn flag_update_merges_one_flag() {
    let mut sim = Sim::new(UpstreamConfig::default());
    sim.send(&frame(
        "flag-update",
        r#"{"key":"new-flag","enabled":true}"#,
    ));
    assert_eq!(sim.value("new-flag"), Some(true));
    assert_eq!(sim.value("search"), Some(true));
    assert_eq!(sim.published.len(), 2);
}

#[test]
fn rules_full_switches_to_local_evaluation_and_later_init_is_ignored() {
    let mut sim = Sim::new(UpstreamConfig::default());
    sim.send(&frame(
        "rules-full",
        r#"{"version":"3","flags":{"beta":{"enabled":true,"rollout":0,"targetUsers":["u1"]}}}"#,
    ));
    let snapshot = sim.machine.snapshot().unwrap().clone();
    assert_eq!(snapshot.source().mode(), "rules");
    assert_eq!(sim.value("beta"), Some(false));
    assert_eq!(
        sim.value("search"),
        None,
        "flags missing from the rules disappear"
    );
    sim.send(&frame("init", r#"{"flags":{"search":true}}"#));
    assert_eq!(
        sim.machine.snapshot().unwrap().revision(),
        snapshot.revision()
    );
}

/// Drains the machine's actions: the last fetch and stream ids, and what was published.
fn drain(machine: &mut Upstream) -> (Option<RequestId>, Option<StreamId>, Vec<Arc<Snapshot>>) {
    let (mut fetch, mut stream, mut published) = (None, None, Vec::new());
    while let Some(action) = machine.poll_action() {
        match action {
            Action::Fetch { id, .. } => fetch = Some(id),
            Action::OpenStream(id) => stream = Some(id),
            Action::Publish(snapshot) => published.push(snapshot),
            Action::CloseStream(_) | Action::Persist { .. } => {}
        }
    }
    (fetch, stream, published)
}

fn ok(body: &'static [u8]) -> FetchResult {
    FetchResult::Response {
        status: 200,
        etag: Some("\"e1\"".into()),
        body: Bytes::from_static(body),
        retry_after: None,
    }
}

#[test]
fn a_late_fetch_does_not_undo_rules_from_a_live_stream() {
    let now = Timestamp::from_millis(T0);
    let mut machine = Upstream::new(UpstreamConfig::default(), now);
    let (fetch, stream, _) = drain(&mut machine);
    let stream = stream.unwrap();
    machine.handle_stream_opened(now, stream, 200, true, None);
    machine.handle_stream_bytes(
        now,
        stream,
        &frame(
            "rules-full",
            r#"{"flags":{"r":{"enabled":true,"rollout":100}}}"#,
        ),
    );
    // The start-up fetch, sent before the rules arrived, answers late.
    machine.handle_fetch(now, fetch.unwrap(), ok(br#"{"flags":{"r":false}}"#));
    let snapshot = machine.snapshot().unwrap();
    assert_eq!(snapshot.source().mode(), "rules");
    assert!(snapshot.defaults().flags["r"]);

    // Once the stream is gone, a poll's values are the newest information and win.
    machine.handle_stream_closed(now, stream, StreamEnd::Eof);
    let later = now.saturating_add(Duration::from_secs(31));
    machine.handle_timeout(later);
    let (fetch, _, _) = drain(&mut machine);
    machine.handle_fetch(later, fetch.unwrap(), ok(br#"{"flags":{"r":false}}"#));
    assert_eq!(machine.snapshot().unwrap().source().mode(), "evaluated");
}

#[test]
fn stream_snapshots_keep_reasons_and_refetch_them_for_changes() {
    let now = Timestamp::from_millis(T0);
    let mut machine = Upstream::new(UpstreamConfig::default(), now);
    let (fetch, stream, _) = drain(&mut machine);
    machine.handle_fetch(
        now,
        fetch.unwrap(),
        ok(br#"{"flags":{"a":true,"b":false},"reasons":{"a":{"kind":"FALLTHROUGH","inRollout":true},"b":{"kind":"OFF"}}}"#),
    );
    let (_, _, published) = drain(&mut machine);
    assert_eq!(published.len(), 1);
    let stream = stream.unwrap();
    machine.handle_stream_opened(now, stream, 200, true, None);

    // The same values without reasons: nothing changes, nothing is fetched.
    machine.handle_stream_bytes(
        now,
        stream,
        &frame("init", r#"{"flags":{"a":true,"b":false}}"#),
    );
    let (fetch, _, published) = drain(&mut machine);
    assert!(published.is_empty() && fetch.is_none());
    assert_eq!(machine.snapshot().unwrap().defaults().reasons.len(), 2);

    // `b` changes: the change waits for the refetch of its reasons, then is published once,
    // with them (one change, one revision).
    let revision = machine.snapshot().unwrap().revision();
    machine.handle_stream_bytes(
        now,
        stream,
        &frame("init", r#"{"flags":{"a":true,"b":true}}"#),
    );
    let (fetch, _, published) = drain(&mut machine);
    assert!(published.is_empty(), "held for its reasons");
    machine.handle_fetch(
        now,
        fetch.expect("a refetch for the new reasons"),
        ok(br#"{"flags":{"a":true,"b":true},"reasons":{"a":{"kind":"FALLTHROUGH","inRollout":true},"b":{"kind":"TARGET_MATCH"}}}"#),
    );
    let (_, _, published) = drain(&mut machine);
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].revision(), revision.next());
    let reasons = &published[0].defaults().reasons;
    assert_eq!(reasons["b"].kind, crate::model::ReasonKind::TargetMatch);
    assert_eq!(reasons["a"].kind, crate::model::ReasonKind::Fallthrough);

    // `a` changes and the refetch fails: the values go out at once, without `a`'s reason.
    machine.handle_stream_bytes(
        now,
        stream,
        &frame("init", r#"{"flags":{"a":false,"b":true}}"#),
    );
    let (fetch, _, published) = drain(&mut machine);
    assert!(published.is_empty());
    machine.handle_fetch(now, fetch.unwrap(), FetchResult::Transport("reset".into()));
    let (_, _, published) = drain(&mut machine);
    assert_eq!(published.len(), 1);
    assert!(!published[0].defaults().flags["a"]);
    assert!(!published[0].defaults().reasons.contains_key("a"));
    assert_eq!(
        published[0].defaults().reasons["b"].kind,
        crate::model::ReasonKind::TargetMatch
    );
}

#[test]
fn a_held_change_goes_out_by_the_deadline_when_the_refetch_hangs() {
    let now = Timestamp::from_millis(T0);
    let mut machine = Upstream::new(UpstreamConfig::default(), now);
    let (fetch, stream, _) = drain(&mut machine);
    machine.handle_fetch(
        now,
        fetch.unwrap(),
        ok(br#"{"flags":{"a":true},"reasons":{"a":{"kind":"OFF"}}}"#),
    );
    let _ = drain(&mut machine);
    let stream = stream.unwrap();
    machine.handle_stream_opened(now, stream, 200, true, None);
    machine.handle_stream_bytes(now, stream, &frame("init", r#"{"flags":{"a":false}}"#));
    let (fetch, _, published) = drain(&mut machine);
    assert!(fetch.is_some() && published.is_empty());
    assert_eq!(
        machine.poll_timeout(),
        Some(now.saturating_add(REASONS_WAIT))
    );
    // A second change while held is merged into the same pending publish.
    machine.handle_stream_bytes(
        now,
        stream,
        &frame("flag-update", r#"{"key":"c","enabled":true}"#),
    );
    let (_, _, published) = drain(&mut machine);
    assert!(published.is_empty());
    let deadline = now.saturating_add(REASONS_WAIT);
    machine.handle_timeout(deadline);
    let (_, _, published) = drain(&mut machine);
    assert_eq!(published.len(), 1, "one publish for both changes");
    assert!(!published[0].defaults().flags["a"]);
    assert!(published[0].defaults().flags["c"]);
}

#[test]
fn thirty_streamed_changes_are_thirty_revisions() {
    let mut sim = Sim::new(UpstreamConfig::default());
    let first = sim.machine.snapshot().unwrap().revision().get();
    let published = sim.published.len();
    for i in 0..30 {
        // Upstream changes a flag and pushes the whole set (values only) on the stream.
        sim.rollgate.flags.insert("search".to_owned(), i % 2 == 1);
        sim.rollgate.version += 1;
        let init = sim.rollgate.init_frame();
        sim.send(&init);
        sim.advance(Duration::from_millis(500));
    }
    let last = sim.machine.snapshot().unwrap().revision().get();
    assert_eq!(last - first, 30, "{}", sim.transcript);
    assert_eq!(sim.published.len() - published, 30, "{}", sim.transcript);
}

#[test]
fn a_change_that_leaves_the_anonymous_flags_alone_still_advances_the_change_epoch() {
    let mut sim = Sim::new(UpstreamConfig::default());
    let published = sim.published.len();
    let epoch = sim.machine.change_epoch();
    // A targeting change for one user: Rollgate says something changed, the anonymous answer
    // (what the refetch brings) is the same. While the refetch is in flight the epoch waits
    // (per-user answers refetched then would go out with the snapshot before the change).
    let id = sim.open_stream.unwrap();
    sim.machine.handle_stream_bytes(
        sim.now,
        id,
        &frame("flag-changed", r#"{"key":"checkout","enabled":false}"#),
    );
    assert_eq!(sim.machine.change_epoch(), epoch);
    sim.settle();
    assert_eq!(sim.published.len(), published, "{}", sim.transcript);
    assert!(sim.machine.change_epoch() > epoch);
    // Heartbeats are not changes.
    let epoch = sim.machine.change_epoch();
    sim.send(&frame("heartbeat", r#"{"timestamp":1}"#));
    assert_eq!(sim.machine.change_epoch(), epoch);
}

#[test]
fn heartbeats_and_unknown_events_change_nothing() {
    let mut sim = Sim::new(UpstreamConfig::default());
    let revision = sim.machine.snapshot().unwrap().revision();
    sim.send(&frame("heartbeat", r#"{"timestamp":1}"#));
    sim.send(&frame("something-new", r#"{"flags":{}}"#));
    sim.send(&frame("message", "hello"));
    assert_eq!(sim.machine.snapshot().unwrap().revision(), revision);
    assert_eq!(sim.machine.status(sim.now).counters.malformed, 0);
}

#[test]
fn malformed_events_keep_the_last_good_snapshot() {
    let mut sim = Sim::new(UpstreamConfig::default());
    let revision = sim.machine.snapshot().unwrap().revision();
    for (event, data) in [
        ("init", "{not json"),
        ("flags", r#"{"flags":{"a":"yes"}}"#),
        ("init", r#"{"nope":1}"#),
        ("flag-update", r#"{"key":1}"#),
        ("rules-full", r#"{"flags":[1]}"#),
    ] {
        sim.send(&frame(event, data));
    }
    assert_eq!(sim.machine.snapshot().unwrap().revision(), revision);
    assert_eq!(sim.value("search"), Some(true));
    let status = sim.machine.status(sim.now);
    assert_eq!(status.counters.malformed, 5);
    assert!(matches!(
        status.last_error,
        Some(UpstreamError::Malformed { .. })
    ));
    assert_eq!(sim.machine.stream_state(), StreamState::Connected);
}

#[test]
fn an_idle_stream_is_reconnected() {
    let mut sim = Sim::new(UpstreamConfig::default());
    sim.rollgate.keepalives = false;
    let connects = sim.machine.status(sim.now).counters.stream_connects;
    sim.advance(Duration::from_secs(91));
    assert!(sim.transcript.contains("proxy closes stream"));
    sim.advance(Duration::from_secs(3));
    let status = sim.machine.status(sim.now);
    assert_eq!(status.counters.stream_connects, connects + 1);
    assert_eq!(status.stream, StreamState::Connected);
}

#[test]
fn oversized_stream_lines_drop_the_stream() {
    let mut sim = Sim::new(UpstreamConfig {
        decoder_limits: DecoderLimits {
            max_line_bytes: 1024,
            max_event_bytes: 4096,
        },
        ..UpstreamConfig::default()
    });
    sim.send(&vec![b'x'; 2048]);
    assert!(sim.transcript.contains("proxy closes stream"));
    assert!(matches!(
        sim.machine.status(sim.now).last_error,
        Some(UpstreamError::Decode(_))
    ));
    assert_eq!(sim.value("search"), Some(true));
}

#[test]
fn fetch_retries_three_times_then_counts_one_breaker_failure() {
    let mut config = UpstreamConfig {
        streaming: false,
        ..UpstreamConfig::default()
    };
    config.retry.jitter = 0.0;
    let mut sim = Sim::new(config);
    sim.rollgate.health = Health::Status(503);
    sim.advance(Duration::from_secs(31));
    assert_eq!(sim.machine.status(sim.now).breaker.failures, 1);
    let lines: Vec<&str> = sim
        .transcript
        .lines()
        .filter(|l| l.contains("-> 503"))
        .collect();
    assert_eq!(
        lines,
        [
            "   30.000s fetch -> 503",
            "   30.100s fetch -> 503",
            "   30.300s fetch -> 503",
            "   30.700s fetch -> 503",
        ]
    );
}

#[test]
fn client_errors_are_not_retried() {
    let mut sim = Sim::new(UpstreamConfig {
        streaming: false,
        ..UpstreamConfig::default()
    });
    sim.rollgate.health = Health::Status(403);
    let fetches = sim.fetches;
    sim.advance(Duration::from_secs(31));
    assert_eq!(sim.fetches, fetches + 1);
    assert_eq!(
        sim.machine.status(sim.now).last_error,
        Some(UpstreamError::Status {
            what: "flags request",
            status: 403
        })
    );
}

#[test]
fn late_answers_to_abandoned_requests_are_ignored() {
    let now = Timestamp::from_millis(T0);
    let mut machine = Upstream::new(UpstreamConfig::default(), now);
    let mut fetch_id = None;
    let mut stream_id = None;
    while let Some(action) = machine.poll_action() {
        match action {
            Action::Fetch { id, .. } => fetch_id = Some(id),
            Action::OpenStream(id) => stream_id = Some(id),
            _ => {}
        }
    }
    let (fetch_id, stream_id) = (fetch_id.unwrap(), stream_id.unwrap());
    let ok = || FetchResult::Response {
        status: 200,
        etag: None,
        body: Bytes::from_static(br#"{"flags":{"a":true}}"#),
        retry_after: None,
    };
    machine.handle_fetch(now, RequestId(999), ok());
    machine.handle_stream_bytes(now, StreamId(999), b"event: init\ndata: {\"flags\":{}}\n\n");
    assert!(machine.snapshot().is_none());
    machine.handle_fetch(now, fetch_id, ok());
    assert!(machine.snapshot().is_some());
    // A second answer to the same request is a late duplicate.
    machine.handle_fetch(
        now,
        fetch_id,
        FetchResult::Response {
            status: 200,
            etag: None,
            body: Bytes::from_static(br#"{"flags":{"a":false}}"#),
            retry_after: None,
        },
    );
    assert!(machine.snapshot().unwrap().defaults().flags["a"]);
    // Bytes for a stream that never opened are ignored too.
    machine.handle_stream_bytes(now, stream_id, b"event: init\ndata: {\"flags\":{}}\n\n");
    assert_eq!(machine.snapshot().unwrap().defaults().flags.len(), 1);
}

#[test]
fn restored_snapshot_is_served_at_once_and_replaced_by_upstream() {
    let mut sim = Sim::new(UpstreamConfig::default());
    let persisted = sim.persisted.last().unwrap().clone();

    let now = Timestamp::from_millis(T0 + 3_600_000);
    let mut machine = Upstream::new(UpstreamConfig::default(), now);
    machine.restore(&persisted).unwrap();
    assert!(machine.restore(b"not a snapshot").is_err());
    let restored = machine.snapshot().unwrap().clone();
    assert!(restored.defaults().flags["search"]);
    assert_eq!(machine.freshness(now), Freshness::Stale);

    // The restored snapshot is published before upstream answers; upstream then confirms the
    // same content: no new revision, but the data is fresh again.
    sim.machine = machine;
    sim.now = now;
    sim.published.clear();
    sim.settle();
    assert_eq!(sim.published.len(), 1);
    assert_eq!(sim.published[0].revision(), restored.revision());
    assert_eq!(
        sim.machine.snapshot().unwrap().revision(),
        restored.revision()
    );
    assert_eq!(sim.machine.freshness(now), Freshness::Fresh);
}

#[test]
fn breaker_rejections_defer_requests_to_the_reopen_deadline() {
    let mut sim = Sim::new(UpstreamConfig::default());
    sim.rollgate.health = Health::Unreachable;
    sim.drop_stream();
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.machine.breaker_state(), BreakerState::Open);
    let reopen = sim.machine.status(sim.now).breaker;
    let fetches = sim.fetches;
    sim.advance(Duration::from_secs(20));
    assert_eq!(
        sim.fetches, fetches,
        "nothing reaches upstream while open: {reopen:?}"
    );
    assert!(sim.machine.status(sim.now).counters.breaker_rejections > 0);
}

#[test]
fn config_validation_names_the_setting() {
    let bad = UpstreamConfig {
        refresh_interval: Duration::ZERO,
        ..UpstreamConfig::default()
    };
    let error = bad.validate().unwrap_err().to_string();
    assert!(error.contains("refresh_interval"), "{error}");
    assert!(UpstreamConfig::default().validate().is_ok());
}

/// Any interleaving of inputs, at any (even decreasing) times, never panics, never reports a
/// deadline that cannot advance, and never publishes a smaller revision.
#[derive(Clone, Debug)]
enum Input {
    Timeout,
    Fetch(u16, bool),
    Opened(u16),
    Bytes(Vec<u8>),
    Event(u8),
    Closed,
    Advance(u32),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        Just(Input::Timeout),
        (
            prop_oneof![Just(200u16), Just(304), Just(500), Just(401), Just(429)],
            any::<bool>()
        )
            .prop_map(|(s, ok)| Input::Fetch(s, ok)),
        prop_oneof![Just(200u16), Just(500)].prop_map(Input::Opened),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Input::Bytes),
        (0u8..6).prop_map(Input::Event),
        Just(Input::Closed),
        (0u32..120_000).prop_map(Input::Advance),
    ]
}

proptest! {
    #[test]
    fn arbitrary_inputs_never_break_the_machine(inputs in proptest::collection::vec(input(), 1..80)) {
        let mut now = Timestamp::from_millis(T0);
        let mut machine = Upstream::new(UpstreamConfig::default(), now);
        let mut fetch = None;
        let mut stream = None;
        let mut last_revision = None;
        for input in inputs {
            while let Some(action) = machine.poll_action() {
                match action {
                    Action::Fetch { id, .. } => fetch = Some(id),
                    Action::OpenStream(id) => stream = Some(id),
                    Action::CloseStream(_) => stream = None,
                    Action::Publish(snapshot) => {
                        prop_assert!(Some(snapshot.revision()) > last_revision);
                        last_revision = Some(snapshot.revision());
                    }
                    Action::Persist { .. } => {}
                }
            }
            match input {
                Input::Timeout => {
                    if let Some(deadline) = machine.poll_timeout() {
                        now = now.max(deadline);
                    }
                    machine.handle_timeout(now);
                }
                Input::Fetch(status, valid) => {
                    if let Some(id) = fetch.take() {
                        let body: &'static [u8] = if valid { br#"{"flags":{"x":true}}"# } else { b"{" };
                        machine.handle_fetch(now, id, FetchResult::Response {
                            status, etag: Some("\"e\"".into()), body: Bytes::from_static(body),
                            retry_after: None,
                        });
                    }
                }
                Input::Opened(status) => {
                    if let Some(id) = stream {
                        machine.handle_stream_opened(now, id, status, true, None);
                    }
                }
                Input::Bytes(bytes) => {
                    if let Some(id) = stream {
                        machine.handle_stream_bytes(now, id, &bytes);
                    }
                }
                Input::Event(kind) => {
                    if let Some(id) = stream {
                        let bytes = match kind {
                            0 => frame("init", r#"{"flags":{"x":false}}"#),
                            1 => frame("flag-changed", r#"{"key":"x","enabled":true}"#),
                            2 => frame("flag-update", r#"{"key":"y","enabled":true}"#),
                            3 => frame("rules-full", r#"{"flags":{"x":{"enabled":true,"rollout":100}}}"#),
                            4 => frame("heartbeat", r#"{"timestamp":1}"#),
                            _ => frame("flags", r#"{"flags":{"z":true}}"#),
                        };
                        machine.handle_stream_bytes(now, id, &bytes);
                    }
                }
                Input::Closed => {
                    if let Some(id) = stream.take() {
                        machine.handle_stream_closed(now, id, StreamEnd::Eof);
                    }
                }
                // Time may also go backwards a little (Workers' clock only moves after I/O).
                Input::Advance(ms) => {
                    now = if ms % 7 == 0 {
                        Timestamp::from_millis(now.as_millis().saturating_sub(u64::from(ms)))
                    } else {
                        now.saturating_add(Duration::from_millis(u64::from(ms)))
                    };
                }
            }
            // The machine always has a way forward: a deadline, or a request in flight.
            let waiting_on_io = fetch.is_some() || stream.is_some();
            prop_assert!(machine.poll_timeout().is_some() || waiting_on_io);
        }
    }
}

fn answer(status: u16, retry_after: Option<&str>) -> FetchResult {
    FetchResult::Response {
        status,
        etag: None,
        body: Bytes::from_static(b"{}"),
        retry_after: retry_after.map(str::to_owned),
    }
}

#[test]
fn retry_after_parses_both_forms() {
    let now = Timestamp::from_millis(784_111_777_000); // Sun, 06 Nov 1994 08:49:37 GMT
    assert_eq!(parse_retry_after("60", now), Some(Duration::from_secs(60)));
    assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
    assert_eq!(
        parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
        Some(Duration::from_secs(60))
    );
    assert_eq!(
        parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
        Some(Duration::ZERO),
        "a past date is no wait"
    );
    assert_eq!(
        parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", Timestamp::from_millis(0)),
        Some(Duration::ZERO)
    );
    assert_eq!(
        parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", Timestamp::from_millis(0)),
        Some(Duration::from_secs(1_445_412_480))
    );
    for bad in [
        "",
        "-1",
        "1.5",
        "soon",
        "Sun, 06 Nov 1994 08:49:37",
        "Sun 06 Nov 1994 08:49:37 GMT",
    ] {
        assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
    }
    assert!(parse_retry_after("99999999999999999999999", now).is_some());
}

#[test]
fn a_429_retry_after_holds_every_request_until_it_passes() {
    let now = Timestamp::from_millis(T0);
    let config = UpstreamConfig {
        streaming: false,
        refresh_interval: Duration::from_secs(2),
        ..UpstreamConfig::default()
    };
    let mut machine = Upstream::new(config, now);
    let (fetch, _, _) = drain(&mut machine);
    machine.handle_fetch(now, fetch.unwrap(), answer(429, Some("60")));
    let status = machine.status(now);
    assert!(matches!(
        status.last_error,
        Some(UpstreamError::Throttled { status: 429, .. })
    ));
    assert_eq!(
        status.hold_until,
        Some(now.saturating_add(Duration::from_secs(60)))
    );
    // Side requests are refused too.
    assert!(!machine.admit_side_request(now.saturating_add(Duration::from_secs(59))));
    // Run the clock: no request before 60 s, then one.
    let mut t = now;
    let mut requests = Vec::new();
    for _ in 0..1000 {
        let Some(next) = machine.poll_timeout() else {
            break;
        };
        if next > now.saturating_add(Duration::from_secs(61)) {
            break;
        }
        t = t.max(next);
        machine.handle_timeout(t);
        let (fetch, _, _) = drain(&mut machine);
        if let Some(id) = fetch {
            requests.push(t);
            machine.handle_fetch(t, id, ok(br#"{"flags":{"a":true}}"#));
        }
    }
    assert_eq!(
        requests.first(),
        Some(&now.saturating_add(Duration::from_secs(60))),
        "{requests:?}"
    );
    assert!(machine.admit_side_request(t));
}

#[test]
fn a_503_retry_after_on_the_stream_delays_its_reconnect_and_the_polls() {
    let now = Timestamp::from_millis(T0);
    let mut machine = Upstream::new(UpstreamConfig::default(), now);
    let (fetch, stream, _) = drain(&mut machine);
    machine.handle_fetch(now, fetch.unwrap(), ok(br#"{"flags":{"a":true}}"#));
    let _ = drain(&mut machine);
    machine.handle_stream_opened(
        now,
        stream.unwrap(),
        503,
        false,
        Some("Sun, 06 Nov 1994 08:49:37 GMT"),
    );
    // A date in the past: no hold beyond the usual backoff.
    assert_eq!(machine.status(now).hold_until, None);
    let t = machine.poll_timeout().unwrap();
    machine.handle_timeout(t);
    let (_, stream, _) = drain(&mut machine);
    machine.handle_stream_opened(t, stream.unwrap(), 503, false, Some("120"));
    let until = t.saturating_add(Duration::from_secs(120));
    assert_eq!(machine.status(t).hold_until, Some(until));
    for _ in 0..100 {
        let at = machine.poll_timeout().unwrap();
        if at >= until {
            break;
        }
        machine.handle_timeout(at);
        let (fetch, stream, _) = drain(&mut machine);
        assert!(
            fetch.is_none() && stream.is_none(),
            "a request at {at:?} before {until:?}"
        );
    }
    machine.handle_timeout(until);
    let (fetch, stream, _) = drain(&mut machine);
    assert!(
        fetch.is_some() || stream.is_some(),
        "requests resume once the hold passed"
    );
}

#[test]
fn a_side_request_retry_after_holds_the_machine_too() {
    let now = Timestamp::from_millis(T0);
    let mut machine = Upstream::new(UpstreamConfig::default(), now);
    let _ = drain(&mut machine);
    assert!(machine.admit_side_request(now));
    machine.record_side_response(now, 429, Some("30"));
    assert!(!machine.admit_side_request(now.saturating_add(Duration::from_secs(29))));
    assert!(machine.admit_side_request(now.saturating_add(Duration::from_secs(30))));
    // Without Retry-After, a 429 holds nothing back (the breaker decides).
    machine.record_side_response(now, 429, None);
    assert!(machine.admit_side_request(now.saturating_add(Duration::from_secs(30))));
    // A Retry-After on another status means nothing.
    machine.record_side_response(now, 500, Some("30"));
    assert!(machine.admit_side_request(now.saturating_add(Duration::from_secs(30))));
}

#[test]
fn a_huge_retry_after_is_cut_to_an_hour() {
    let now = Timestamp::from_millis(T0);
    let mut machine = Upstream::new(UpstreamConfig::default(), now);
    let _ = drain(&mut machine);
    machine.record_side_response(now, 503, Some("999999999"));
    assert_eq!(
        machine.status(now).hold_until,
        Some(now.saturating_add(MAX_RETRY_AFTER))
    );
}

#[test]
fn a_rejected_key_is_reported_plainly_and_probed_slowly() {
    let mut sim = Sim::new(UpstreamConfig {
        refresh_interval: Duration::from_secs(30),
        ..UpstreamConfig::default()
    });
    sim.rollgate.health = Health::Status(401);
    sim.drop_stream();
    let fetches = sim.fetches;
    let opens = sim.transcript.matches("stream open ->").count();
    sim.advance(Duration::from_secs(125));
    let status = sim.machine.status(sim.now);
    assert!(status.key_rejected);
    let error = status.last_error.unwrap();
    assert!(
        matches!(error, UpstreamError::KeyRejected { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("rejected the server API key"),
        "{error}"
    );
    // About one stream probe and one poll per refresh interval: not the 1 s..30 s backoff
    // plus 3 retries per poll.
    let probes = (sim.fetches - fetches) + sim.transcript.matches("stream open ->").count() - opens;
    assert!(
        probes <= 10,
        "{probes} requests in 125 s:\n{}",
        sim.transcript
    );
    assert!(
        probes >= 3,
        "{probes} requests in 125 s:\n{}",
        sim.transcript
    );
    // The key works again: the next probe clears the flag.
    sim.rollgate.health = Health::Up;
    sim.advance(Duration::from_secs(61));
    let status = sim.machine.status(sim.now);
    assert!(!status.key_rejected, "{}", sim.transcript);
    assert_eq!(status.last_error, None);
}

#[test]
fn redirects_and_oversize_bodies_are_clear_failures() {
    let now = Timestamp::from_millis(T0);
    let config = UpstreamConfig {
        streaming: false,
        ..UpstreamConfig::default()
    };
    let mut machine = Upstream::new(config.clone(), now);
    let (fetch, _, _) = drain(&mut machine);
    machine.handle_fetch(now, fetch.unwrap(), answer(302, None));
    let error = machine.status(now).last_error.unwrap();
    assert!(
        matches!(error, UpstreamError::Redirected { status: 302, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("not followed"));

    let mut machine = Upstream::new(config, now);
    assert_eq!(machine.max_body_bytes(), DEFAULT_MAX_BODY_BYTES);
    let (fetch, _, _) = drain(&mut machine);
    machine.handle_fetch(
        now,
        fetch.unwrap(),
        FetchResult::TooLarge {
            status: 200,
            limit: DEFAULT_MAX_BODY_BYTES,
        },
    );
    let (retry, _, _) = drain(&mut machine);
    assert!(retry.is_none(), "no retry of an oversize body");
    let status = machine.status(now);
    assert_eq!(status.counters.malformed, 1);
    assert!(
        status
            .last_error
            .unwrap()
            .to_string()
            .contains("larger than")
    );
    assert!(
        UpstreamConfig {
            max_body_bytes: 10,
            ..UpstreamConfig::default()
        }
        .validate()
        .is_err()
    );
}

#[test]
fn invalid_utf8_or_bad_keys_on_the_stream_are_rejected_like_in_a_fetch() {
    let mut sim = Sim::new(UpstreamConfig::default());
    let revision = sim.machine.snapshot().unwrap().revision();
    sim.send(b"event: init\ndata: {\"flags\":{\"\xff\xfe-bad\":true}}\n\n");
    sim.send(b"event: flags\ndata: {\"flags\":{\"\\ufffd\\ufffd-bad\":true}}\n\n");
    sim.send(b"event: init\ndata: {\"flags\":{\"a\\r\\nb\":true}}\n\n");
    sim.send(b"event: flag-update\ndata: {\"key\":\"x y\",\"enabled\":true}\n\n");
    sim.send(b"event: rules-full\ndata: {\"flags\":{\"\xff\":{\"enabled\":true}}}\n\n");
    assert_eq!(sim.machine.snapshot().unwrap().revision(), revision);
    assert_eq!(sim.machine.status(sim.now).counters.malformed, 5);
    // The same bytes in a fetch body are rejected too.
    let now = Timestamp::from_millis(T0);
    let mut machine = Upstream::new(
        UpstreamConfig {
            streaming: false,
            ..UpstreamConfig::default()
        },
        now,
    );
    let (fetch, _, _) = drain(&mut machine);
    machine.handle_fetch(now, fetch.unwrap(), ok(b"{\"flags\":{\"a\\r\\nb\":true}}"));
    assert!(machine.snapshot().is_none());
    assert_eq!(machine.status(now).counters.malformed, 1);
}

#[test]
fn a_304_to_an_earlier_fetch_does_not_release_a_change_whose_refetch_is_queued() {
    let now = Timestamp::from_millis(T0);
    let mut machine = Upstream::new(UpstreamConfig::default(), now);
    let (fetch, stream, _) = drain(&mut machine);
    machine.handle_fetch(
        now,
        fetch.unwrap(),
        ok(br#"{"flags":{"a":true},"reasons":{"a":{"kind":"OFF"}}}"#),
    );
    let _ = drain(&mut machine);
    let stream = stream.unwrap();
    machine.handle_stream_opened(now, stream, 200, true, None);
    // A notification starts a fetch; the change itself arrives while it is in flight.
    machine.handle_stream_bytes(now, stream, &frame("flag-changed", r#"{"key":"a"}"#));
    let (early, _, _) = drain(&mut machine);
    machine.handle_stream_bytes(now, stream, &frame("init", r#"{"flags":{"a":false}}"#));
    let (none, _, published) = drain(&mut machine);
    assert!(none.is_none() && published.is_empty());
    machine.handle_fetch(now, early.unwrap(), answer(304, None));
    let (queued, _, published) = drain(&mut machine);
    assert!(published.is_empty(), "still waiting for the queued refetch");
    machine.handle_fetch(
        now,
        queued.expect("the queued refetch"),
        ok(br#"{"flags":{"a":false},"reasons":{"a":{"kind":"TARGET_MATCH"}}}"#),
    );
    let (_, _, published) = drain(&mut machine);
    assert_eq!(published.len(), 1);
    assert_eq!(
        published[0].defaults().reasons["a"].kind,
        crate::model::ReasonKind::TargetMatch
    );
}

#[test]
fn a_forward_retry_after_pauses_only_that_kind() {
    use crate::metrics::SideRequest;
    let mut machine = Upstream::new(UpstreamConfig::default(), Timestamp::ZERO);
    let now = Timestamp::from_millis(1_000);
    machine.record_forward_response(now, SideRequest::Events, 429, Some("60"));
    assert!(!machine.admit_forward(now, SideRequest::Events));
    assert!(!machine.admit_forward(Timestamp::from_millis(60_999), SideRequest::Events));
    assert_eq!(
        machine.forward_held_until(now, SideRequest::Events),
        Some(Timestamp::from_millis(61_000))
    );
    // Other kinds, per-user fetches and the machine's own requests go on.
    assert!(machine.admit_forward(now, SideRequest::Telemetry));
    assert!(machine.admit_forward(now, SideRequest::Identify));
    assert!(machine.admit_side_request(now));
    assert_eq!(machine.status(now).hold_until, None);
    assert!(machine.admit_forward(Timestamp::from_millis(61_000), SideRequest::Events));
    // A 503 with an HTTP date pauses identify; without Retry-After nothing is paused.
    machine.record_forward_response(now, SideRequest::Telemetry, 503, None);
    assert!(machine.admit_forward(now, SideRequest::Telemetry));
    machine.record_forward_response(
        Timestamp::from_millis(1_445_412_480_000),
        SideRequest::Identify,
        503,
        Some("Wed, 21 Oct 2015 07:28:30 GMT"),
    );
    assert!(!machine.admit_forward(
        Timestamp::from_millis(1_445_412_509_000),
        SideRequest::Identify
    ));
}

#[test]
fn the_forward_verdict_is_what_admit_forward_decides() {
    use crate::breaker::Outcome;
    use crate::metrics::SideRequest;
    let mut config = UpstreamConfig::default();
    config.breaker.failure_threshold = 2;
    let mut machine = Upstream::new(config, Timestamp::ZERO);
    let now = Timestamp::from_millis(1_000);
    assert_eq!(
        machine.forward_blocked_until(now, SideRequest::Events),
        None
    );
    // A Retry-After on one kind.
    machine.record_forward_response(now, SideRequest::Events, 429, Some("5"));
    assert_eq!(
        machine.forward_blocked_until(now, SideRequest::Events),
        Some(Timestamp::from_millis(6_000))
    );
    assert_eq!(
        machine.forward_blocked_until(now, SideRequest::Identify),
        None
    );
    // The open breaker holds every kind until it admits a probe; asking takes no probe.
    machine.record_side_request(now, Outcome::Failure);
    machine.record_side_request(now, Outcome::Failure);
    let open = machine.forward_blocked_until(now, SideRequest::Identify);
    assert!(open.is_some_and(|at| at > now), "{open:?}");
    assert!(!machine.admit_forward(now, SideRequest::Identify));
    let reopen = open.unwrap();
    assert_eq!(
        machine.forward_blocked_until(reopen, SideRequest::Identify),
        None
    );
    assert!(machine.admit_forward(reopen, SideRequest::Identify));
}

#[test]
fn a_403_is_an_ordinary_failure_not_a_rejected_key() {
    use crate::metrics::SideRequest;
    let mut machine = Upstream::new(UpstreamConfig::default(), Timestamp::ZERO);
    let now = Timestamp::from_millis(1_000);
    machine.record_forward_response(now, SideRequest::Events, 403, Some("60"));
    machine.record_side_response(now, 403, Some("60"));
    let status = machine.status(now);
    assert!(!status.key_rejected);
    assert_eq!(status.hold_until, None);
    assert!(machine.admit_forward(now, SideRequest::Events));
    assert!(machine.admit_side_request(now));
    // A 401 is the rejected key, on forwards too.
    machine.record_forward_response(now, SideRequest::Identify, 401, None);
    assert!(machine.status(now).key_rejected);
}
