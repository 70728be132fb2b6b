//! One SSE connection's decisions, sans-IO: which frame (if any) a client gets for a snapshot.
//!
//! A [`Subscriber`] is created by the dispatcher for `/api/stream`, `/api/v1/sdk/stream` and
//! `/ofrep/v1/sse`. The adapter writes [`Subscriber::preamble`] first, then hands it every
//! snapshot the connection sees (the current one at connect, then each publish; a slow client
//! may skip to the newest). The rules live here once:
//! - anonymous and OFREP clients get the snapshot's pre-built frame (shared bytes, no per-client
//!   work);
//! - a client that reconnected with `Last-Event-ID` equal to the snapshot's id is not sent it again;
//! - a per-user client gets its own frame, and none when a new snapshot leaves its flags
//!   unchanged;
//! - keepalive period and the jittered maximum age;
//! - over the WebSocket transport, which frames go as a binary gzip member instead of text
//!   ([`Subscriber::socket_message`]).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use bytes::Bytes;

use crate::model::{Context, EvaluatedFlags};
use crate::render;
use crate::snapshot::Snapshot;
use crate::sse::encode::KEEPALIVE;
use crate::time::Timestamp;

/// How long clients wait before reconnecting (the `retry:` sent first), before jitter.
pub const RETRY: Duration = Duration::from_millis(2000);

/// The query parameter by which a WebSocket client asks for large frames gzip-coded
/// (`?coding=gzip`): a browser cannot set `Accept-Encoding` on a WebSocket, and a client must
/// opt in since each such frame arrives as a binary message it has to decompress. Other values
/// and other streams ignore it, as older proxies ignore the parameter altogether.
pub const SOCKET_CODING_PARAM: &str = "coding";

/// One frame as a WebSocket message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketMessage {
    /// The frame's bytes (UTF-8) as a text message.
    Text(Bytes),
    /// The frame alone as one whole gzip member (RFC 1952), as a binary message.
    Gzip(Bytes),
}

/// Which stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// `GET /api/stream`: `event: flags` with the bare map.
    Frontend,
    /// `GET /api/v1/sdk/stream`: `event: init` with `{"flags":..}`.
    Sdk,
    /// `GET /ofrep/v1/sse`: `refetchEvaluation` notifications.
    Ofrep,
}

impl StreamKind {
    /// Every kind, in metric order.
    pub const ALL: [Self; 3] = [Self::Frontend, Self::Sdk, Self::Ofrep];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Frontend => "frontend",
            Self::Sdk => "sdk",
            Self::Ofrep => "ofrep",
        }
    }

    /// Index in [`StreamKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::Frontend => 0,
            Self::Sdk => 1,
            Self::Ofrep => 2,
        }
    }
}

/// The headers of every SSE answer (status 200; the body is the frames).
pub const HEADERS: [(&str, &str); 3] = [
    ("content-type", crate::api::EVENT_STREAM),
    ("cache-control", crate::api::NO_CACHE),
    // nginx and friends must not buffer the stream.
    ("x-accel-buffering", "no"),
];

/// What a snapshot means for one client.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Write this frame.
    Frame(Bytes),
    /// Nothing new for this client.
    Nothing,
    /// A per-user client: resolve this context's flags for the snapshot (local evaluation, the
    /// per-user cache, or another object), then call [`Subscriber::on_flags`].
    Resolve(Context),
}

/// One SSE connection. See the module docs.
#[derive(Debug)]
pub struct Subscriber {
    kind: StreamKind,
    /// `None`: anonymous (the snapshot's own frames).
    context: Option<Context>,
    /// The id the client reconnected with, until the first snapshot is decided.
    last_event_id: Option<String>,
    /// Hash of the flag map last sent to a per-user client.
    last_sent: Option<u64>,
    keepalive: Duration,
    retry: Duration,
    close_at: Option<Timestamp>,
    /// A WebSocket client asked for gzip-coded frames ([`SOCKET_CODING_PARAM`]).
    socket_gzip: bool,
}

/// How a stream behaves: from the settings, plus the adapter's random inputs.
#[derive(Clone, Copy, Debug)]
pub struct StreamTiming {
    /// Keepalive of the frontend and OFREP streams.
    pub keepalive: Duration,
    /// Keepalive of the SDK stream.
    pub sdk_keepalive: Duration,
    /// Maximum connection age before jitter; `None`: unlimited.
    pub max_age: Option<Duration>,
}

impl Subscriber {
    /// A new connection of `kind` opened at `now`. `context` is the request's (ignored for
    /// OFREP, which is never per user); `jitter` is a uniform random sample in `[0, 1)` that
    /// spreads the `retry:` delay and the max age by ±10 %, so a deploy or a lost replica does
    /// not bring every client back at one instant.
    pub fn new(
        now: Timestamp,
        kind: StreamKind,
        context: Context,
        last_event_id: Option<&str>,
        timing: StreamTiming,
        jitter: f64,
    ) -> Self {
        let spread = 0.9 + 0.2 * jitter.clamp(0.0, 1.0);
        let context = (kind != StreamKind::Ofrep && !context.is_anonymous()).then_some(context);
        Self {
            kind,
            context,
            last_event_id: last_event_id.map(|id| id.chars().take(256).collect()),
            last_sent: None,
            keepalive: match kind {
                StreamKind::Sdk => timing.sdk_keepalive,
                StreamKind::Frontend | StreamKind::Ofrep => timing.keepalive,
            },
            retry: RETRY.mul_f64(spread),
            close_at: timing
                .max_age
                .map(|age| now.saturating_add(age.mul_f64(spread))),
            socket_gzip: false,
        }
    }

    /// Reads the request's `query` for [`SOCKET_CODING_PARAM`]: `coding=gzip` makes
    /// [`Subscriber::socket_message`] send large frames gzip-coded.
    #[must_use]
    pub fn with_socket_coding(mut self, query: &str) -> Self {
        self.socket_gzip = crate::api::query_pairs(query)
            .any(|(name, value)| name == SOCKET_CODING_PARAM && value == "gzip");
        self
    }

    /// `frame` (from [`Subscriber::on_snapshot`] or [`Subscriber::on_flags`] for `snapshot`)
    /// as a WebSocket message: a gzip member for a client that asked for it when the frame is
    /// large enough to gain (the snapshot's own frames are compressed once for every socket;
    /// a per-user frame for its client alone), text otherwise. Each message stands alone, so
    /// small frames stay text and a client decodes every binary message by itself.
    pub fn socket_message(&self, snapshot: &Snapshot, frame: Bytes) -> SocketMessage {
        #[cfg(feature = "stream-gzip")]
        if self.socket_gzip
            && self.kind != StreamKind::Ofrep
            && frame.len() >= crate::encoding::MIN_COMPRESS_BYTES
        {
            return SocketMessage::Gzip(snapshot.gzip_segment(&frame).member().clone());
        }
        let _ = snapshot;
        SocketMessage::Text(frame)
    }

    /// Which stream this is.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// The first bytes of the body: `retry: <ms>`.
    pub fn preamble(&self) -> Bytes {
        render::retry_frame(Duration::from_millis(
            u64::try_from(self.retry.as_millis()).unwrap_or(u64::MAX),
        ))
    }

    /// The content coding of this stream's body for a client that sent `accept_encoding`,
    /// given the `current` snapshot: gzip (frames compressed once each and shared, see
    /// [`crate::sse::gzip`]) unless the flag frames are too small to gain from it; identity
    /// otherwise. OFREP's notifications are always small.
    pub fn coding(
        &self,
        accept_encoding: Option<&str>,
        current: Option<&Snapshot>,
    ) -> crate::encoding::Encoding {
        #[cfg(feature = "stream-gzip")]
        if self.kind != StreamKind::Ofrep {
            let frame_len = current.map(|snapshot| snapshot.flags_frame().len());
            return crate::sse::gzip::stream_coding(accept_encoding, frame_len);
        }
        let _ = (accept_encoding, current);
        crate::encoding::Encoding::Identity
    }

    /// How often to send [`Subscriber::keepalive`] when nothing else was sent.
    pub fn keepalive_interval(&self) -> Duration {
        self.keepalive
    }

    /// The keepalive comment.
    pub fn keepalive(&self) -> Bytes {
        Bytes::from_static(KEEPALIVE)
    }

    /// When to end the connection cleanly (the client reconnects, maybe elsewhere).
    pub fn close_at(&self) -> Option<Timestamp> {
        self.close_at
    }

    /// The user id of a per-user client (its answer is refreshed on upstream changes).
    pub fn user_id(&self) -> Option<&str> {
        self.context
            .as_ref()
            .and_then(|context| context.id.as_deref())
    }

    /// Whether the client is per user (its frames are its own).
    pub fn is_per_user(&self) -> bool {
        self.context.is_some()
    }

    /// The hash of the per-user flags last sent: what a transport that keeps no `Subscriber`
    /// between snapshots (a hibernated WebSocket) stores to decide the next one as this one
    /// would. Stable within one build only.
    pub fn sent_flags(&self) -> Option<u64> {
        self.last_sent
    }

    /// Restores [`Subscriber::sent_flags`] on a subscriber re-created for the same client.
    pub fn resume_sent_flags(&mut self, hash: Option<u64>) {
        self.last_sent = hash;
    }

    /// What `snapshot` means for this client.
    pub fn on_snapshot(&mut self, snapshot: &Snapshot) -> Next {
        if self
            .last_event_id
            .take()
            .is_some_and(|id| snapshot.is_current_event_id(&id))
        {
            return Next::Nothing;
        }
        match &self.context {
            None => Next::Frame(
                match self.kind {
                    StreamKind::Frontend => snapshot.flags_frame(),
                    StreamKind::Sdk => snapshot.init_frame(),
                    StreamKind::Ofrep => snapshot.ofrep_frame(),
                }
                .clone(),
            ),
            Some(context) => Next::Resolve(context.clone()),
        }
    }

    /// The frame for this per-user client given its `flags` for `snapshot`, or `None` when
    /// they are what it was last sent.
    pub fn on_flags(&mut self, snapshot: &Snapshot, flags: &EvaluatedFlags) -> Option<Bytes> {
        let mut hasher = DefaultHasher::new();
        flags.flags.hash(&mut hasher);
        let hash = hasher.finish();
        if self.last_sent == Some(hash) {
            return None;
        }
        self.last_sent = Some(hash);
        Some(match self.kind {
            StreamKind::Sdk => render::init_frame(flags, snapshot.event_id()),
            StreamKind::Frontend | StreamKind::Ofrep => {
                render::flags_frame(flags, snapshot.event_id())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RulesPayload;
    use crate::snapshot::{FlagSource, Revision};

    const TIMING: StreamTiming = StreamTiming {
        keepalive: Duration::from_secs(15),
        sdk_keepalive: Duration::from_secs(4),
        max_age: Some(Duration::from_secs(3600)),
    };

    fn snapshot(revision: u64, json: &str) -> Snapshot {
        let flags = EvaluatedFlags::from_json(json.as_bytes()).unwrap();
        Snapshot::build(
            Revision::new(revision),
            Timestamp::ZERO,
            FlagSource::Evaluated(flags),
        )
    }

    /// A new anonymous subscriber of `kind` (no `Last-Event-ID`).
    fn anonymous(kind: StreamKind) -> Subscriber {
        Subscriber::new(
            Timestamp::ZERO,
            kind,
            Context::anonymous(),
            None,
            TIMING,
            0.5,
        )
    }

    /// 101 flags: frames well over the size worth compressing.
    fn large_flags_json() -> String {
        let mut map = String::from(r#"{"flags":{"#);
        for i in 0..100 {
            map.push_str(&format!(r#""checkout-experiment-{i:05}":true,"#));
        }
        map.push_str(r#""last":false}}"#);
        map
    }

    #[test]
    fn large_flag_frames_are_gzip_coded_for_clients_that_accept_it() {
        use crate::encoding::Encoding;
        let map = large_flags_json();
        let large = snapshot(1, &map);
        let small = snapshot(1, r#"{"flags":{"a":true}}"#);
        let gzip = Some("gzip, deflate, br");
        let cases = [
            (StreamKind::Frontend, gzip, Some(&large), Encoding::Gzip),
            (StreamKind::Sdk, gzip, Some(&large), Encoding::Gzip),
            // OFREP's notifications are small whatever the set; small sets gain nothing.
            (StreamKind::Ofrep, gzip, Some(&large), Encoding::Identity),
            (StreamKind::Frontend, gzip, Some(&small), Encoding::Identity),
            (StreamKind::Frontend, None, Some(&large), Encoding::Identity),
            // No snapshot yet: the size is unknown; small frames would be stored, not deflated.
            (StreamKind::Frontend, gzip, None, Encoding::Gzip),
        ];
        for (kind, accept, snapshot, expected) in cases {
            assert_eq!(
                anonymous(kind).coding(accept, snapshot),
                expected,
                "{kind:?} {accept:?}"
            );
        }
    }

    #[cfg(feature = "stream-gzip")]
    #[test]
    fn sockets_that_ask_get_large_frames_as_one_shared_gzip_member_each() {
        use std::io::Read;
        let gunzip = |member: &[u8]| {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(member)
                .read_to_end(&mut out)
                .expect("a whole gzip member");
            out
        };
        let map = large_flags_json();
        let large = snapshot(1, &map);
        let small = snapshot(1, r#"{"flags":{"a":true}}"#);
        let asking = |kind, query: &str| anonymous(kind).with_socket_coding(query);

        let frame = large.flags_frame().clone();
        let SocketMessage::Gzip(member) =
            asking(StreamKind::Frontend, "coding=gzip").socket_message(&large, frame.clone())
        else {
            panic!("a large frame is gzip-coded for a socket that asked");
        };
        assert_eq!(gunzip(&member), frame);
        assert!(member.len() * 5 < frame.len());
        // Compressed once for every socket: the same bytes again.
        let SocketMessage::Gzip(again) = asking(StreamKind::Frontend, "user_id=&coding=gzip")
            .socket_message(&large, frame.clone())
        else {
            panic!("gzip");
        };
        assert_eq!(again.as_ptr(), member.as_ptr());

        // Not asked, asked for something else, a small frame, OFREP: text, the frame itself.
        let sdk_frame = large.init_frame().clone();
        for (kind, query, snapshot, frame) in [
            (StreamKind::Frontend, "", &large, frame.clone()),
            (StreamKind::Frontend, "coding=br", &large, frame.clone()),
            (StreamKind::Frontend, "codings=gzip", &large, frame),
            (
                StreamKind::Sdk,
                "coding=gzip",
                &small,
                small.init_frame().clone(),
            ),
            (
                StreamKind::Ofrep,
                "coding=gzip",
                &large,
                large.ofrep_frame().clone(),
            ),
        ] {
            assert_eq!(
                asking(kind, query).socket_message(snapshot, frame.clone()),
                SocketMessage::Text(frame),
                "{kind:?} {query:?}"
            );
        }

        // A per-user frame is coded for its client alone.
        let mut user = sdk_subscriber_for_u1().with_socket_coding("user_id=u1&coding=gzip");
        let flags = EvaluatedFlags::from_json(map.as_bytes()).unwrap();
        let own = user.on_flags(&large, &flags).expect("a first frame");
        // Its own rendering, not the snapshot's frame (even with the same bytes).
        assert_ne!(own.as_ptr(), sdk_frame.as_ptr());
        let SocketMessage::Gzip(member) = user.socket_message(&large, own.clone()) else {
            panic!("gzip");
        };
        assert_eq!(gunzip(&member), own);
    }

    #[test]
    fn anonymous_clients_get_the_shared_frames() {
        let s = snapshot(1, r#"{"flags":{"a":true}}"#);
        for (kind, frame) in [
            (StreamKind::Frontend, s.flags_frame()),
            (StreamKind::Sdk, s.init_frame()),
            (StreamKind::Ofrep, s.ofrep_frame()),
        ] {
            assert_eq!(anonymous(kind).on_snapshot(&s), Next::Frame(frame.clone()));
        }
        // OFREP is never per user.
        let sub = Subscriber::new(
            Timestamp::ZERO,
            StreamKind::Ofrep,
            Context::with_id("u1"),
            None,
            TIMING,
            0.5,
        );
        assert!(!sub.is_per_user());
    }

    #[test]
    fn last_event_id_skips_only_the_current_snapshot() {
        let s1 = snapshot(1, r#"{"flags":{"a":true}}"#);
        let s2 = snapshot(2, r#"{"flags":{"a":false}}"#);
        let mut sub = Subscriber::new(
            Timestamp::ZERO,
            StreamKind::Frontend,
            Context::anonymous(),
            Some(s1.event_id()),
            TIMING,
            0.0,
        );
        assert_eq!(sub.on_snapshot(&s1), Next::Nothing);
        assert!(matches!(sub.on_snapshot(&s1), Next::Frame(_)));
        let mut stale = Subscriber::new(
            Timestamp::ZERO,
            StreamKind::Frontend,
            Context::anonymous(),
            Some(s1.event_id()),
            TIMING,
            0.0,
        );
        assert_eq!(
            stale.on_snapshot(&s2),
            Next::Frame(s2.flags_frame().clone())
        );
    }

    /// An SDK stream subscriber for user `u1`, as a client (or a woken WebSocket) opens it.
    fn sdk_subscriber_for_u1() -> Subscriber {
        Subscriber::new(
            Timestamp::ZERO,
            StreamKind::Sdk,
            Context::with_id("u1"),
            None,
            TIMING,
            0.5,
        )
    }

    #[test]
    fn per_user_frames_skip_unchanged_flags() {
        let payload = RulesPayload::from_json(
            br#"{"version":"1","flags":{"a":{"enabled":true,"rollout":100}}}"#,
        )
        .unwrap();
        let s1 = Snapshot::build(
            Revision::new(1),
            Timestamp::ZERO,
            FlagSource::rules(&payload),
        );
        let s2 = Snapshot::build(
            Revision::new(2),
            Timestamp::ZERO,
            FlagSource::rules(&payload),
        );
        let mut sub = sdk_subscriber_for_u1();
        let Next::Resolve(context) = sub.on_snapshot(&s1) else {
            panic!("per-user clients resolve their flags");
        };
        assert_eq!(context.id.as_deref(), Some("u1"));
        let flags = s1.rules().unwrap().evaluate_all(&context).to_flags();
        let frame = sub.on_flags(&s1, &flags).unwrap();
        assert!(frame.starts_with(b"event: init\nid: 1-"));
        assert_eq!(sub.on_flags(&s2, &flags), None);
        // A subscriber re-created for the same client (a woken WebSocket) decides the same.
        let mut resumed = sdk_subscriber_for_u1();
        resumed.resume_sent_flags(sub.sent_flags());
        assert_eq!(resumed.on_flags(&s2, &flags), None);
        let mut changed = flags.clone();
        changed.flags.insert("a".into(), false);
        assert!(sub.on_flags(&s2, &changed).is_some());
    }

    #[test]
    fn retry_and_max_age_are_jittered_and_keepalives_per_kind() {
        let low = Subscriber::new(
            Timestamp::ZERO,
            StreamKind::Sdk,
            Context::anonymous(),
            None,
            TIMING,
            0.0,
        );
        let high = Subscriber::new(
            Timestamp::ZERO,
            StreamKind::Frontend,
            Context::anonymous(),
            None,
            TIMING,
            1.0,
        );
        assert_eq!(&low.preamble()[..], b"retry: 1800\n\n");
        assert_eq!(&high.preamble()[..], b"retry: 2200\n\n");
        assert_eq!(low.close_at(), Some(Timestamp::from_millis(3_240_000)));
        assert_eq!(high.close_at(), Some(Timestamp::from_millis(3_960_000)));
        assert_eq!(low.keepalive_interval(), Duration::from_secs(4));
        assert_eq!(high.keepalive_interval(), Duration::from_secs(15));
    }
}
