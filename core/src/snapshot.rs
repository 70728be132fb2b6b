//! Immutable flag snapshots, one per revision, with everything served often serialized once.
//!
//! A [`Snapshot`] is built when flag content changes and then only read: every poll of the
//! default context answers with [`Snapshot::flags_body`] and every SSE client receives the same
//! [`Snapshot::flags_frame`] bytes (`Bytes` clones are reference-count increments). Per-context
//! answers in rules mode evaluate the snapshot's [`CompiledRules`], whose regexes were compiled
//! once, when the snapshot was built.
//!
//! [`SnapshotStore`] hands out revisions: they only grow, and a new snapshot is made only when the
//! content hash changes, so "the ETag changes exactly when content changes".

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::encoding::Variants;
use crate::eval::CompiledRules;
use crate::model::{Context, EvaluatedFlags, ModelError, RulesPayload};
use crate::render;
use crate::time::Timestamp;

/// A snapshot's sequence number. Revisions only grow within one [`SnapshotStore`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Revision(u64);

impl Revision {
    /// A revision from its number.
    pub const fn new(revision: u64) -> Self {
        Self(revision)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The revision after this one.
    pub const fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a snapshot's flags come from.
#[derive(Clone, Debug)]
pub enum FlagSource {
    /// Values already evaluated upstream (for the anonymous context). Per-user values need an
    /// upstream request (`/api/v1/sdk/flags?user_id=`).
    Evaluated(EvaluatedFlags),
    /// Rules (from a `rules-full` event or a local file): any context is evaluated locally.
    Rules(CompiledRules),
}

impl FlagSource {
    /// Rules mode: a source that evaluates any context locally.
    pub fn rules(payload: &RulesPayload) -> Self {
        Self::Rules(CompiledRules::compile(payload))
    }

    /// Rules mode from a `rules-full` payload's bytes, parsed and compiled in one pass
    /// ([`CompiledRules::from_json`]: the typed payload is never held whole).
    ///
    /// # Errors
    /// [`ModelError`] when the bytes are not such a payload.
    pub fn rules_from_json(bytes: &[u8]) -> Result<Self, ModelError> {
        CompiledRules::from_json(bytes).map(Self::Rules)
    }

    /// The mode's name for health output and logs: `"evaluated"` or `"rules"`.
    pub const fn mode(&self) -> &'static str {
        match self {
            Self::Evaluated(_) => "evaluated",
            Self::Rules(_) => "rules",
        }
    }

    /// The hash of the content's canonical bytes, which goes into the ETag: a prefix that keeps
    /// a rule set and an evaluated set apart, then the JSON. Maps are ordered, so equal content
    /// always gives equal bytes. Rules give the hash their compilation took of that JSON.
    fn content_hash(&self) -> String {
        match self {
            Self::Evaluated(flags) => render::json_content_hash(b"evaluated:", flags),
            Self::Rules(rules) => rules.content_hash().to_owned(),
        }
    }
}

/// Flags for one context, or the news that only upstream can evaluate it.
#[derive(Debug)]
pub enum ContextFlags<'a> {
    /// The evaluated flags (borrowed for the anonymous context, computed in rules mode).
    Ready(Cow<'a, EvaluatedFlags>),
    /// Evaluated mode with a non-anonymous context: ask upstream with `user_id`.
    NeedsUpstream,
}

/// The anonymous answers a snapshot renders, in its `bodies` order.
#[derive(Clone, Copy, Debug)]
enum Body {
    Flags,
    Sdk,
    SdkWithReasons,
}

impl Body {
    fn sdk(with_reasons: bool) -> Self {
        if with_reasons {
            Self::SdkWithReasons
        } else {
            Self::Sdk
        }
    }
}

/// Where the `event: flags` and `event: init` frames (and their gzip segments) sit in a
/// snapshot's `frames` and `gzip_segments`.
const FLAGS_FRAME: usize = 0;
const INIT_FRAME: usize = 1;

/// One immutable revision of the flag set; its bodies and SSE frames are serialized once each.
#[derive(Debug)]
pub struct Snapshot {
    revision: Revision,
    cached_at: Timestamp,
    source: FlagSource,
    /// The anonymous context's values and reasons as owned maps, in rules mode, built on the
    /// first [`Snapshot::defaults`] (in evaluated mode they are the source's own). Lazily,
    /// because the frames and bodies render from a borrowed evaluation instead: a Worker relay
    /// that only publishes never holds this ~0.4 MB (2,000 flags) of small allocations, nor
    /// builds it while the snapshot it replaces is still held.
    evaluated_defaults: OnceLock<EvaluatedFlags>,
    hash: String,
    etag: String,
    event_id: String,
    /// The anonymous answers, each rendered once on first use, with its gzip/br variants
    /// (empty when small or without `compression`), in [`Body`] order. Lazily, because not
    /// every holder serves every answer: a Worker shard serves only stream frames, and
    /// rendering the polling bodies it never sends would hold ~575 KB more per snapshot of a
    /// 2,000-flag set, twice over while a change replaces one.
    bodies: [OnceLock<(Bytes, Variants)>; 3],
    /// The `event: flags` and `event: init` frames ([`FLAGS_FRAME`], [`INIT_FRAME`]), rendered
    /// once on first use (SSE frames are never compressed as bodies are; see `gzip_segments`).
    frames: [OnceLock<Bytes>; 2],
    ofrep_frame: Bytes,
    /// The flags and init frames in a gzip-coded stream, compressed on first use (most
    /// snapshots are never streamed to a client that accepts gzip).
    #[cfg(feature = "stream-gzip")]
    gzip_segments: [OnceLock<crate::sse::gzip::Segment>; 2],
}

impl Snapshot {
    /// Builds a snapshot; every shared body and frame is serialized once, when first asked for.
    pub fn build(revision: Revision, cached_at: Timestamp, source: FlagSource) -> Self {
        let hash = source.content_hash();
        Self::build_with_hash(revision, cached_at, source, hash)
    }

    fn build_with_hash(
        revision: Revision,
        cached_at: Timestamp,
        source: FlagSource,
        hash: String,
    ) -> Self {
        let etag = format!("\"{hash}\"");
        // The id carries the content hash as well as the revision: a client reconnecting to
        // another replica (whose revision numbers differ) is still recognised as up to date
        // exactly when the content it last saw is the content we have.
        let event_id = format!("{revision}-{hash}");
        Self {
            bodies: Default::default(),
            frames: Default::default(),
            ofrep_frame: render::ofrep_refetch_frame(&event_id, &etag, cached_at),
            #[cfg(feature = "stream-gzip")]
            gzip_segments: Default::default(),
            revision,
            cached_at,
            source,
            evaluated_defaults: OnceLock::new(),
            hash,
            etag,
            event_id,
        }
    }

    /// Anonymous answer `body`, rendered (and compressed) on first use.
    fn body(&self, body: Body) -> &(Bytes, Variants) {
        self.bodies[body as usize].get_or_init(|| {
            let bytes = match &self.source {
                FlagSource::Rules(rules) => {
                    let defaults = rules.evaluate_all(&Context::anonymous());
                    match body {
                        Body::Flags => render::evaluation_flags_body(&defaults, self.cached_at),
                        Body::Sdk => render::evaluation_sdk_flags_body(&defaults, false),
                        Body::SdkWithReasons => render::evaluation_sdk_flags_body(&defaults, true),
                    }
                }
                FlagSource::Evaluated(defaults) => match body {
                    Body::Flags => render::flags_body(defaults, self.cached_at),
                    Body::Sdk => render::sdk_flags_body(defaults, false),
                    Body::SdkWithReasons => render::sdk_flags_body(defaults, true),
                },
            };
            let variants = Variants::compress(&bytes);
            (bytes, variants)
        })
    }

    /// This snapshot's revision.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// When this content was first seen (served as `_meta.cachedAt`).
    pub fn cached_at(&self) -> Timestamp {
        self.cached_at
    }

    /// Where the flags come from.
    pub fn source(&self) -> &FlagSource {
        &self.source
    }

    /// The compiled rules, in rules mode.
    pub fn rules(&self) -> Option<&CompiledRules> {
        match &self.source {
            FlagSource::Rules(rules) => Some(rules),
            FlagSource::Evaluated(_) => None,
        }
    }

    /// Values and reasons for the anonymous context.
    pub fn defaults(&self) -> &EvaluatedFlags {
        match &self.source {
            FlagSource::Evaluated(flags) => flags,
            FlagSource::Rules(rules) => self
                .evaluated_defaults
                .get_or_init(|| rules.evaluate_all(&Context::anonymous()).to_flags()),
        }
    }

    /// The anonymous context's values, as the frames and the shards' envelope serialise them:
    /// the source's own map, or in rules mode a borrowed evaluation (one allocation, dropped
    /// once rendered) rather than [`Self::defaults`]' owned maps.
    fn anonymous_values(&self) -> AnonymousValues<'_> {
        match &self.source {
            FlagSource::Evaluated(flags) => AnonymousValues::Map(&flags.flags),
            FlagSource::Rules(rules) => {
                AnonymousValues::Evaluation(rules.evaluate_all(&Context::anonymous()))
            }
        }
    }

    /// Flags for `context`: borrowed for the anonymous context, evaluated locally in rules mode,
    /// [`ContextFlags::NeedsUpstream`] otherwise.
    pub fn flags_for(&self, context: &Context) -> ContextFlags<'_> {
        if context.is_anonymous() {
            return ContextFlags::Ready(Cow::Borrowed(self.defaults()));
        }
        match &self.source {
            FlagSource::Rules(rules) => {
                ContextFlags::Ready(Cow::Owned(rules.evaluate_all(context).to_flags()))
            }
            FlagSource::Evaluated(_) => ContextFlags::NeedsUpstream,
        }
    }

    /// 16 hex digits identifying the content.
    pub fn content_hash(&self) -> &str {
        &self.hash
    }

    /// The quoted ETag of the content (and of every default-context body).
    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// The SSE `id` of this snapshot's frames: `<revision>-<content hash>`.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// Whether a client that last saw SSE id `last_event_id` already has this content.
    pub fn is_current_event_id(&self, last_event_id: &str) -> bool {
        last_event_id
            .split_once('-')
            .is_some_and(|(_, hash)| hash == self.hash)
    }

    /// `GET /api/flags` body for the anonymous context.
    pub fn flags_body(&self) -> &Bytes {
        &self.body(Body::Flags).0
    }

    /// `GET /api/v1/sdk/flags` body for the anonymous context, with or without reasons.
    pub fn sdk_body(&self, with_reasons: bool) -> &Bytes {
        &self.body(Body::sdk(with_reasons)).0
    }

    /// Compressed variants of [`Self::flags_body`].
    pub fn flags_body_variants(&self) -> &Variants {
        &self.body(Body::Flags).1
    }

    /// Compressed variants of [`Self::sdk_body`].
    pub fn sdk_body_variants(&self, with_reasons: bool) -> &Variants {
        &self.body(Body::sdk(with_reasons)).1
    }

    /// `event: flags` frame of `GET /api/stream` for the anonymous context.
    pub fn flags_frame(&self) -> &Bytes {
        self.frames[FLAGS_FRAME]
            .get_or_init(|| render::flags_frame_of(&self.anonymous_values(), &self.event_id))
    }

    /// `event: init` frame of `GET /api/v1/sdk/stream` for the anonymous context.
    pub fn init_frame(&self) -> &Bytes {
        self.frames[INIT_FRAME]
            .get_or_init(|| render::init_frame_of(&self.anonymous_values(), &self.event_id))
    }

    /// OFREP `refetchEvaluation` notification frame for this snapshot.
    pub fn ofrep_frame(&self) -> &Bytes {
        &self.ofrep_frame
    }

    /// `frame` as a gzip-coded stream sends it: this snapshot's own flags and init frames are
    /// compressed once, on first use, and shared by every client and connection; any other
    /// frame (a per-user one) is encoded for the caller, at the faster per-client level.
    #[cfg(feature = "stream-gzip")]
    pub fn gzip_segment(&self, frame: &Bytes) -> Cow<'_, crate::sse::gzip::Segment> {
        use crate::sse::gzip::Segment;
        // Only a frame already rendered can be the one asked about.
        let same = |own: &OnceLock<Bytes>| {
            own.get()
                .is_some_and(|own| own.as_ptr() == frame.as_ptr() && own.len() == frame.len())
        };
        // Each frame's segment sits at the frame's own index.
        match self
            .frames
            .iter()
            .zip(&self.gzip_segments)
            .find(|(own, _)| same(own))
        {
            Some((_, slot)) => Cow::Borrowed(slot.get_or_init(|| Segment::encode(frame))),
            None => Cow::Owned(Segment::encode_for_one(frame)),
        }
    }

    /// Serializes the snapshot for disk or Durable Object storage: a JSON envelope
    /// `{"format":1,"revision","cachedAt","upstreamEtag","kind":"evaluated"|"rules","data"}`.
    pub fn to_persisted(&self, upstream_etag: Option<&str>) -> Bytes {
        // The source is serialized straight into the envelope (no intermediate
        // `serde_json::Value`), into a buffer allocated once at its size: a 2,000-flag rules
        // set is ~0.5 MB, written on every change (grown by doubling, it held 1 MiB).
        fn envelope<'a, T: ?Sized>(
            snapshot: &Snapshot,
            upstream_etag: Option<&str>,
            kind: PersistedKind,
            data: &'a T,
        ) -> Persisted<&'a T, &'a str> {
            Persisted {
                format: PERSIST_FORMAT,
                revision: snapshot.revision,
                cached_at: snapshot.cached_at,
                upstream_etag: upstream_etag.map(str::to_owned),
                kind,
                hash: None,
                data,
            }
        }
        match &self.source {
            FlagSource::Evaluated(flags) => render::json_bytes(&envelope(
                self,
                upstream_etag,
                PersistedKind::Evaluated,
                flags,
            )),
            FlagSource::Rules(rules) => {
                // The rules' JSON is inflated straight into the envelope (it is kept deflated
                // when large): the envelope is written with `"data":null`, its last field, and
                // that `null}` replaced by the JSON and the closing brace.
                let head =
                    render::json_bytes(&envelope(self, upstream_etag, PersistedKind::Rules, &()));
                let Some(stem) = head.strip_suffix(b"null}") else {
                    // Cannot happen: `data` is the envelope's last field and `()` is `null`.
                    // Were it to, the envelope holds no rules and restores as an error.
                    return head;
                };
                let mut out = Vec::with_capacity(stem.len() + rules.payload_json_len() + 1);
                out.extend_from_slice(stem);
                rules.write_payload_json(&mut out);
                out.push(b'}');
                Bytes::from(out)
            }
        }
    }

    /// This snapshot as a reader that serves only anonymous stream frames needs it (an SSE
    /// or WebSocket shard fed by the relay): the persisted envelope of the anonymous values
    /// (kind `evaluated`, without reasons, which no stream frame carries: ~130 KB for a
    /// 2,000-flag set whose rules are ~600 KB) with this snapshot's content hash, so that
    /// [`Snapshot::from_shared_anonymous`] rebuilds the same frames, event id and ETag without
    /// parsing, compiling or hashing the rules.
    pub fn to_shared_anonymous(&self) -> Bytes {
        render::json_bytes(&self.shared_anonymous())
    }

    /// [`Snapshot::to_shared_anonymous`] as the data of one SSE event of type `event`, written
    /// straight into the frame (the internal stream from the Worker's relay to its shards: one
    /// buffer of the envelope's size per publish, no copies).
    pub fn shared_anonymous_frame(&self, event: &str) -> Bytes {
        render::json_frame(event, None, &self.shared_anonymous())
    }

    fn shared_anonymous(&self) -> Persisted<SharedValues<AnonymousValues<'_>>, &str> {
        Persisted {
            format: PERSIST_FORMAT,
            revision: self.revision,
            cached_at: self.cached_at,
            upstream_etag: None,
            kind: PersistedKind::Evaluated,
            hash: Some(self.hash.as_str()),
            data: SharedValues {
                flags: self.anonymous_values(),
            },
        }
    }

    /// Restores what [`Snapshot::to_shared_anonymous`] wrote. The content hash is taken as
    /// given: only for bytes from this deployment over an internal channel, never from disk.
    /// It serves the same stream frames and reason-free bodies as the original; per-user
    /// answers cannot be computed from it (it holds no rules), nor answers with reasons.
    ///
    /// # Errors
    /// [`SnapshotError`] when the bytes are not such an envelope or its flags are invalid.
    pub fn from_shared_anonymous(bytes: &[u8]) -> Result<Self, SnapshotError> {
        SharedEnvelope::parse(bytes)?.build()
    }

    /// Restores a snapshot written by [`Snapshot::to_persisted`], with the upstream ETag it
    /// was saved with.
    ///
    /// # Errors
    /// [`SnapshotError`] when the bytes are not a persisted snapshot of a known format or its
    /// flag data is invalid.
    pub fn from_persisted(bytes: &[u8]) -> Result<(Self, Option<String>), SnapshotError> {
        // `data` is borrowed as raw JSON and parsed once, into its model (not via a `Value`).
        let persisted: Persisted<&serde_json::value::RawValue, String> =
            serde_json::from_slice(bytes).map_err(SnapshotError::Format)?;
        if persisted.format != PERSIST_FORMAT {
            return Err(SnapshotError::UnknownFormat(persisted.format));
        }
        let data = persisted.data.get().as_bytes();
        let source = match persisted.kind {
            PersistedKind::Evaluated => FlagSource::Evaluated(EvaluatedFlags::from_json(data)?),
            PersistedKind::Rules => FlagSource::rules_from_json(data)?,
        };
        let snapshot = Self::build(persisted.revision, persisted.cached_at, source);
        Ok((snapshot, persisted.upstream_etag))
    }
}

/// The head of a [`Snapshot::to_shared_anonymous`] envelope, its flags still unparsed.
struct SharedEnvelope<'a> {
    revision: Revision,
    cached_at: Timestamp,
    hash: String,
    flags: &'a [u8],
}

impl<'a> SharedEnvelope<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, SnapshotError> {
        let persisted: Persisted<&serde_json::value::RawValue, String> =
            serde_json::from_slice(bytes).map_err(SnapshotError::Format)?;
        if persisted.format != PERSIST_FORMAT {
            return Err(SnapshotError::UnknownFormat(persisted.format));
        }
        let (PersistedKind::Evaluated, Some(hash)) = (persisted.kind, persisted.hash) else {
            return Err(SnapshotError::NotShared);
        };
        Ok(Self {
            revision: persisted.revision,
            cached_at: persisted.cached_at,
            hash,
            flags: persisted.data.get().as_bytes(),
        })
    }

    /// Whether `snapshot` is what this envelope rebuilds. A relay stamps each publish with its
    /// revision, time and content hash; envelopes that agree on all three carry the values of
    /// the same content, so their snapshots serve the same frames, bodies, event id and ETag.
    fn describes(&self, snapshot: &Snapshot) -> bool {
        snapshot.revision == self.revision
            && snapshot.cached_at == self.cached_at
            && snapshot.hash == self.hash
    }

    fn build(self) -> Result<Snapshot, SnapshotError> {
        let flags = EvaluatedFlags::from_json(self.flags)?;
        Ok(Snapshot::build_with_hash(
            self.revision,
            self.cached_at,
            FlagSource::Evaluated(flags),
            self.hash,
        ))
    }
}

/// Rebuilds snapshots from shared envelopes ([`Snapshot::from_shared_anonymous`]), one copy per
/// publish for every holder of this value: readers that share a heap (several Durable Objects
/// that the platform placed in one isolate) hold one snapshot, with its frames and gzip
/// segments rendered once, instead of one each.
///
/// It remembers snapshots weakly: one lives while some reader holds it, never longer, and the
/// envelope's flags are parsed only when no live snapshot matches.
#[derive(Debug, Default)]
pub struct SharedSnapshots {
    /// Oldest first; entries whose snapshot was dropped are pruned on every restore.
    remembered: Vec<std::sync::Weak<Snapshot>>,
    /// Restores answered with a snapshot another reader had rebuilt.
    reused: u64,
}

impl SharedSnapshots {
    /// The most snapshots remembered at once. A reader holds one (two while a change replaces
    /// it) per environment, so more than this live at once only when more environments than
    /// this share one heap; the oldest are then forgotten (their readers keep them).
    pub const MAX_REMEMBERED: usize = 32;

    /// The snapshot in `bytes`: the live one another reader rebuilt from the same publish, or
    /// a new one.
    ///
    /// # Errors
    /// As [`Snapshot::from_shared_anonymous`].
    pub fn restore(&mut self, bytes: &[u8]) -> Result<Arc<Snapshot>, SnapshotError> {
        let envelope = SharedEnvelope::parse(bytes)?;
        self.remembered.retain(|weak| weak.strong_count() > 0);
        if let Some(live) = self
            .remembered
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|live| envelope.describes(live))
        {
            self.reused += 1;
            return Ok(live);
        }
        let snapshot = Arc::new(envelope.build()?);
        if self.remembered.len() >= Self::MAX_REMEMBERED {
            self.remembered.remove(0);
        }
        self.remembered.push(Arc::downgrade(&snapshot));
        Ok(snapshot)
    }

    /// How many restores were answered with a snapshot another reader had rebuilt.
    pub fn reused(&self) -> u64 {
        self.reused
    }

    /// How many snapshots are remembered (each one some reader still holds, or held at the
    /// last restore).
    pub fn remembered(&self) -> usize {
        self.remembered.len()
    }
}

/// Why a persisted snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Not the JSON envelope [`Snapshot::to_persisted`] writes.
    #[error("not a persisted snapshot: {0}")]
    Format(#[source] serde_json::Error),
    /// Written by a newer (or unknown) version of the proxy.
    #[error("persisted snapshot has unknown format {0}")]
    UnknownFormat(u32),
    /// Not the envelope [`Snapshot::to_shared_anonymous`] writes (no hash, or not evaluated).
    #[error("not a shared anonymous snapshot")]
    NotShared,
    /// The envelope is fine but the flag data inside is not.
    #[error("persisted snapshot holds invalid flag data: {0}")]
    Data(#[from] ModelError),
}

/// The on-disk (and Durable Object storage) form of a snapshot.
///
/// `{"format":1,"revision":7,"cachedAt":1764016857123,"upstreamEtag":"\"ab..\"",
///   "kind":"evaluated"|"rules","data":{...}}` where `data` is the wire JSON of the source.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Persisted<D, H> {
    format: u32,
    revision: Revision,
    cached_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upstream_etag: Option<String>,
    kind: PersistedKind,
    /// The content hash, in [`Snapshot::to_shared_anonymous`]'s envelope only (ignored by
    /// [`Snapshot::from_persisted`], which recomputes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<H>,
    data: D,
}

/// The data of [`Snapshot::to_shared_anonymous`]'s envelope.
#[derive(Serialize)]
struct SharedValues<F> {
    flags: F,
}

/// The anonymous context's flag values (key → value), from whichever form the snapshot has;
/// both serialise to the same bytes.
enum AnonymousValues<'a> {
    /// An evaluated source's own map.
    Map(&'a std::collections::BTreeMap<String, bool>),
    /// Rules evaluated for the anonymous context, borrowing from the compiled rules.
    Evaluation(crate::eval::Evaluation<'a>),
}

impl Serialize for AnonymousValues<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Map(flags) => flags.serialize(serializer),
            Self::Evaluation(evaluation) => evaluation.values().serialize(serializer),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PersistedKind {
    Evaluated,
    Rules,
}

/// Holds the current snapshot and hands out revisions.
#[derive(Debug, Default)]
pub struct SnapshotStore {
    current: Option<Arc<Snapshot>>,
}

impl SnapshotStore {
    /// An empty store: no data yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current snapshot, if any data has arrived.
    pub fn current(&self) -> Option<&Arc<Snapshot>> {
        self.current.as_ref()
    }

    /// Makes `source` current if its content differs from the current snapshot's, returning the
    /// new snapshot (with the next revision), or `None` when nothing changed.
    pub fn replace(&mut self, now: Timestamp, source: FlagSource) -> Option<Arc<Snapshot>> {
        let hash = source.content_hash();
        if self
            .current
            .as_ref()
            .is_some_and(|current| current.hash == hash)
        {
            return None;
        }
        let revision = self
            .current
            .as_ref()
            .map_or(Revision::new(1), |current| current.revision.next());
        let snapshot = Arc::new(Snapshot::build_with_hash(revision, now, source, hash));
        self.current = Some(Arc::clone(&snapshot));
        Some(snapshot)
    }

    /// Installs a restored snapshot when the store is empty or older, keeping revisions growing.
    /// Returns whether it was installed.
    pub fn restore(&mut self, snapshot: Snapshot) -> Option<Arc<Snapshot>> {
        if self
            .current
            .as_ref()
            .is_some_and(|current| current.revision >= snapshot.revision)
        {
            return None;
        }
        let snapshot = Arc::new(snapshot);
        self.current = Some(Arc::clone(&snapshot));
        Some(snapshot)
    }
}

/// Cache statistics in the shape the SDKs report (`getCacheStats()`: hits, misses, staleHits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheStats {
    /// Requests answered from data upstream confirmed recently.
    pub hits: u64,
    /// Requests that found no data at all.
    pub misses: u64,
    /// Requests answered from data upstream has not confirmed for a while.
    pub stale_hits: u64,
}

impl CacheStats {
    /// Counts one lookup.
    pub fn record(&mut self, freshness: Freshness) {
        match freshness {
            Freshness::Fresh => self.hits += 1,
            Freshness::Missing => self.misses += 1,
            Freshness::Stale => self.stale_hits += 1,
        }
    }
}

/// How fresh the data behind an answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Freshness {
    /// Upstream confirmed the data within the staleness threshold (or the data is local).
    Fresh,
    /// There is no data yet.
    Missing,
    /// The data is older than the staleness threshold: served anyway, counted apart.
    Stale,
}

impl Freshness {
    /// Classifies data last confirmed at `confirmed` (`None`: never, i.e. no data).
    pub fn classify(now: Timestamp, confirmed: Option<Timestamp>, stale_after: Duration) -> Self {
        match confirmed {
            None => Self::Missing,
            Some(at) if now.saturating_since(at) <= stale_after => Self::Fresh,
            Some(_) => Self::Stale,
        }
    }
}

const PERSIST_FORMAT: u32 = 1;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn evaluated(pairs: &[(&str, bool)]) -> FlagSource {
        FlagSource::Evaluated(EvaluatedFlags {
            flags: pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            reasons: BTreeMap::new(),
        })
    }

    #[test]
    fn bodies_and_frames_are_serialized_once_and_exactly() {
        let snapshot = Snapshot::build(
            Revision::new(3),
            Timestamp::from_millis(1_764_016_857_123),
            evaluated(&[("b", false), ("a", true)]),
        );
        let hash = snapshot.content_hash().to_owned();
        assert_eq!(hash.len(), 16);
        assert_eq!(snapshot.etag(), format!("\"{hash}\""));
        assert_eq!(snapshot.event_id(), format!("3-{hash}"));
        assert_eq!(
            &snapshot.flags_body()[..],
            br#"{"flags":{"a":true,"b":false},"_meta":{"cachedAt":"2025-11-24T20:40:57.123Z"}}"#
        );
        assert_eq!(
            &snapshot.sdk_body(false)[..],
            br#"{"flags":{"a":true,"b":false}}"#
        );
        assert_eq!(
            snapshot.flags_frame(),
            &Bytes::from(format!(
                "event: flags\nid: 3-{hash}\ndata: {{\"a\":true,\"b\":false}}\n\n"
            ))
        );
        assert_eq!(
            snapshot.init_frame(),
            &Bytes::from(format!(
                "event: init\nid: 3-{hash}\ndata: {{\"flags\":{{\"a\":true,\"b\":false}}}}\n\n"
            ))
        );
        assert!(snapshot.is_current_event_id(&format!("99-{hash}")));
        assert!(!snapshot.is_current_event_id("3"));
        assert!(!snapshot.is_current_event_id("3-0000000000000000"));
    }

    #[test]
    fn stream_frames_are_gzip_coded_once_and_shared() {
        use std::io::Read;
        let s = Snapshot::build(
            Revision::new(1),
            Timestamp::ZERO,
            evaluated(&[("a", true), ("b", false)]),
        );
        let first = s.gzip_segment(s.flags_frame());
        let again = s.gzip_segment(&s.flags_frame().clone());
        assert!(matches!(first, Cow::Borrowed(_)) && matches!(again, Cow::Borrowed(_)));
        // The same bytes (one compression), not merely equal ones.
        assert_eq!(first.bytes().as_ptr(), again.bytes().as_ptr());
        assert!(matches!(s.gzip_segment(s.init_frame()), Cow::Borrowed(_)));
        // An equal frame that is not the snapshot's own (a per-user one) is coded for the caller.
        let copy = Bytes::copy_from_slice(s.flags_frame());
        assert!(matches!(s.gzip_segment(&copy), Cow::Owned(_)));
        let mut body = crate::sse::gzip::HEADER.to_vec();
        body.extend_from_slice(first.bytes());
        let mut trailer = crate::sse::gzip::Trailer::default();
        trailer.add(&first);
        body.extend_from_slice(&trailer.finish());
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut decoded)
            .expect("valid gzip");
        assert_eq!(decoded, s.flags_frame().as_ref());
    }

    #[test]
    fn store_publishes_only_changes_and_revisions_grow() {
        let mut store = SnapshotStore::new();
        let t = Timestamp::from_millis(1000);
        let first = store.replace(t, evaluated(&[("a", true)])).unwrap();
        assert_eq!(first.revision(), Revision::new(1));
        assert!(store.replace(t, evaluated(&[("a", true)])).is_none());
        let second = store.replace(t, evaluated(&[("a", false)])).unwrap();
        assert_eq!(second.revision(), Revision::new(2));
        assert_ne!(first.etag(), second.etag());
        // An older persisted snapshot never replaces a newer one.
        let old = Snapshot::build(Revision::new(1), t, evaluated(&[("z", true)]));
        assert!(store.restore(old).is_none());
        assert_eq!(store.current().unwrap().revision(), Revision::new(2));
    }

    #[test]
    fn rules_and_evaluated_content_with_same_values_have_different_etags() {
        let rules =
            RulesPayload::from_json(br#"{"flags":{"a":{"enabled":true,"rollout":100}}}"#).unwrap();
        let by_rules =
            Snapshot::build(Revision::new(1), Timestamp::ZERO, FlagSource::rules(&rules));
        let by_values =
            Snapshot::build(Revision::new(1), Timestamp::ZERO, evaluated(&[("a", true)]));
        assert_eq!(by_rules.defaults().flags, by_values.defaults().flags);
        assert_ne!(by_rules.etag(), by_values.etag());
    }

    #[test]
    fn flags_for_a_user_need_upstream_only_in_evaluated_mode() {
        let user = Context::with_id("u1");
        let values = Snapshot::build(Revision::new(1), Timestamp::ZERO, evaluated(&[("a", true)]));
        assert!(matches!(
            values.flags_for(&user),
            ContextFlags::NeedsUpstream
        ));
        assert!(matches!(
            values.flags_for(&Context::anonymous()),
            ContextFlags::Ready(Cow::Borrowed(_))
        ));
        let rules = RulesPayload::from_json(
            br#"{"flags":{"a":{"enabled":true,"rollout":0,"targetUsers":["u1"]}}}"#,
        )
        .unwrap();
        let local = Snapshot::build(Revision::new(1), Timestamp::ZERO, FlagSource::rules(&rules));
        let ContextFlags::Ready(flags) = local.flags_for(&user) else {
            panic!("rules mode evaluates locally");
        };
        assert!(flags.flags["a"]);
        assert!(!local.defaults().flags["a"]);
    }

    #[test]
    fn rules_render_from_an_evaluation_without_building_the_owned_defaults() {
        let rules = RulesPayload::from_json(
            br#"{"flags":{"a":{"enabled":true,"rollout":100},"b":{"enabled":false},
                "c":{"enabled":true,"rollout":40,"targetUsers":["u1"]},
                "d":{"enabled":true,"rollout":0,"rules":[{"id":"r","enabled":true,"rollout":100,
                    "conditions":[{"attribute":"plan","operator":"equals","value":"pro"}]}]}}}"#,
        )
        .unwrap();
        let s = Snapshot::build(
            Revision::new(3),
            Timestamp::from_millis(42),
            FlagSource::rules(&rules),
        );
        let (flags_body, sdk_body, sdk_reasons_body) = (
            s.flags_body().clone(),
            s.sdk_body(false).clone(),
            s.sdk_body(true).clone(),
        );
        let (flags_frame, init_frame) = (s.flags_frame().clone(), s.init_frame().clone());
        let shared = s.to_shared_anonymous();
        // Everything a publish renders, and no owned maps built for it.
        assert!(s.evaluated_defaults.get().is_none());
        // The same bytes the owned maps give.
        let defaults = s.defaults();
        assert!(s.evaluated_defaults.get().is_some());
        assert_eq!(flags_body, render::flags_body(defaults, s.cached_at()));
        assert_eq!(sdk_body, render::sdk_flags_body(defaults, false));
        assert_eq!(sdk_reasons_body, render::sdk_flags_body(defaults, true));
        assert_eq!(flags_frame, render::flags_frame(defaults, s.event_id()));
        assert_eq!(init_frame, render::init_frame(defaults, s.event_id()));
        let copy = Snapshot::from_shared_anonymous(&shared).unwrap();
        assert_eq!(copy.defaults().flags, defaults.flags);
        assert_eq!(copy.flags_frame(), &flags_frame);
    }

    #[test]
    fn shared_anonymous_snapshot_has_the_original_frames_and_ids() {
        let rules = RulesPayload::from_json(
            br#"{"flags":{"a":{"enabled":true,"rollout":100},"b":{"enabled":false},
                "c":{"enabled":true,"rollout":0,"targetUsers":["u1"]}}}"#,
        )
        .unwrap();
        let original = Snapshot::build(
            Revision::new(7),
            Timestamp::from_millis(42),
            FlagSource::rules(&rules),
        );
        let shared = original.to_shared_anonymous();
        assert!(shared.len() < original.to_persisted(None).len());
        let copy = Snapshot::from_shared_anonymous(&shared).unwrap();
        assert_eq!(copy.revision(), original.revision());
        assert_eq!(copy.content_hash(), original.content_hash());
        assert_eq!(copy.event_id(), original.event_id());
        assert_eq!(copy.etag(), original.etag());
        assert_eq!(copy.flags_frame(), original.flags_frame());
        assert_eq!(copy.init_frame(), original.init_frame());
        assert_eq!(copy.ofrep_frame(), original.ofrep_frame());
        assert_eq!(copy.flags_body(), original.flags_body());
        assert_eq!(copy.sdk_body(false), original.sdk_body(false));
        // Values only: no stream frame carries reasons.
        assert!(!original.defaults().reasons.is_empty());
        assert!(copy.defaults().reasons.is_empty());
        assert!(!String::from_utf8_lossy(&shared).contains("reasons"));
        // It is not a persisted snapshot, nor is a persisted snapshot a shared one.
        assert!(matches!(
            Snapshot::from_shared_anonymous(&original.to_persisted(None)),
            Err(SnapshotError::NotShared)
        ));
    }

    #[test]
    fn shared_snapshots_keep_one_copy_per_publish_while_someone_holds_it() {
        let rules = RulesPayload::from_json(
            br#"{"flags":{"a":{"enabled":true,"rollout":100},"b":{"enabled":false}}}"#,
        )
        .unwrap();
        let publish = |revision: u64, cached_at: u64| {
            Snapshot::build(
                Revision::new(revision),
                Timestamp::from_millis(cached_at),
                FlagSource::rules(&rules),
            )
            .to_shared_anonymous()
        };
        let mut shared = SharedSnapshots::default();
        let first = shared.restore(&publish(3, 10)).unwrap();
        let second = shared.restore(&publish(3, 10)).unwrap();
        assert!(Arc::ptr_eq(&first, &second), "one copy for both readers");
        assert_eq!(shared.reused(), 1);
        assert_eq!(
            first.flags_frame(),
            Snapshot::from_shared_anonymous(&publish(3, 10))
                .unwrap()
                .flags_frame()
        );

        // Another publish of the same content is another snapshot: its event id differs.
        let later = shared.restore(&publish(4, 10)).unwrap();
        assert!(!Arc::ptr_eq(&first, &later));
        assert_eq!(shared.remembered(), 2);

        // Nobody holds revision 3 any more: it is forgotten and rebuilt when asked again.
        drop((first, second));
        let again = shared.restore(&publish(3, 10)).unwrap();
        assert_eq!(shared.reused(), 1);
        assert_eq!(shared.remembered(), 2);
        drop(again);

        // Bad input changes nothing.
        assert!(shared.restore(b"{}").is_err());
        assert!(shared.restore(&later.to_persisted(None)).is_err());
        assert_eq!(shared.remembered(), 2);
    }

    #[test]
    fn shared_snapshots_remember_a_bounded_number() {
        let mut shared = SharedSnapshots::default();
        let held: Vec<_> = (0..SharedSnapshots::MAX_REMEMBERED as u64 + 5)
            .map(|revision| {
                let bytes = Snapshot::build(
                    Revision::new(revision),
                    Timestamp::ZERO,
                    evaluated(&[("a", true)]),
                )
                .to_shared_anonymous();
                shared.restore(&bytes).unwrap()
            })
            .collect();
        assert_eq!(held.len(), SharedSnapshots::MAX_REMEMBERED + 5);
        assert_eq!(shared.remembered(), SharedSnapshots::MAX_REMEMBERED);
    }

    #[test]
    fn persisted_snapshots_round_trip() {
        let snapshot = Snapshot::build(
            Revision::new(42),
            Timestamp::from_millis(5),
            evaluated(&[("a", true), ("b", false)]),
        );
        let bytes = snapshot.to_persisted(Some("\"up\""));
        let (restored, etag) = Snapshot::from_persisted(&bytes).unwrap();
        assert_eq!(etag.as_deref(), Some("\"up\""));
        assert_eq!(restored.revision(), Revision::new(42));
        assert_eq!(restored.etag(), snapshot.etag());
        assert_eq!(restored.flags_body(), snapshot.flags_body());

        let rules =
            RulesPayload::from_json(br#"{"version":"v9","flags":{"a":{"enabled":true}}}"#).unwrap();
        let snapshot =
            Snapshot::build(Revision::new(2), Timestamp::ZERO, FlagSource::rules(&rules));
        let (restored, etag) = Snapshot::from_persisted(&snapshot.to_persisted(None)).unwrap();
        assert_eq!(etag, None);
        assert_eq!(restored.etag(), snapshot.etag());
        assert_eq!(restored.rules().unwrap().version(), "v9");
    }

    #[test]
    fn a_rule_sets_hash_and_persisted_data_are_its_payloads_canonical_json() {
        // What ETags and persisted snapshots of earlier versions were made from: both must stay
        // the same for the same rules, or an upgrade would look like a change to every client.
        // A small set keeps its JSON as text, a large one deflated (`eval/canonical.rs`); both
        // compiles (typed and one-pass) must give the same bytes either way.
        let small = br#"{"version":"v2","flags":{"b":{"enabled":true,"rules":[{"id":"r","conditions":[{"attribute":"plan","operator":"in","value":"a, b"}]}]},"a":{"enabled":false,"targetUsers":["u"]}}}"#.to_vec();
        let large_flags: Vec<String> = (0..600)
            .map(|i| {
                format!(
                    r#""flag-{i:04}":{{"enabled":true,"rollout":{},"rules":[{{"id":"r{i}","conditions":[{{"attribute":"plan","operator":"equals","value":"p{i}"}}]}}]}}"#,
                    i % 100
                )
            })
            .collect();
        let large = format!(
            r#"{{"version":"v3","flags":{{{}}}}}"#,
            large_flags.join(",")
        )
        .into_bytes();
        for text in [small, large] {
            let rules = RulesPayload::from_json(&text).unwrap();
            let canonical = serde_json::to_vec(&rules).unwrap();
            let mut prefixed = b"rules:".to_vec();
            prefixed.extend(&canonical);
            for source in [
                FlagSource::rules(&rules),
                FlagSource::rules_from_json(&text).unwrap(),
            ] {
                let snapshot = Snapshot::build(Revision::new(1), Timestamp::ZERO, source);
                assert_eq!(snapshot.content_hash(), render::content_hash(&prefixed));
                let bytes = snapshot.to_persisted(Some("\"up\""));
                let persisted: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let data: serde_json::Value = serde_json::from_slice(&canonical).unwrap();
                assert_eq!(persisted["data"], data);
                assert_eq!(persisted["kind"], "rules");
                assert_eq!(persisted["upstreamEtag"], "\"up\"");
                let (restored, etag) = Snapshot::from_persisted(&bytes).unwrap();
                assert_eq!(restored.content_hash(), snapshot.content_hash());
                assert_eq!(etag.as_deref(), Some("\"up\""));
            }
        }
    }

    #[test]
    fn corrupt_persisted_snapshots_are_typed_errors() {
        assert!(matches!(
            Snapshot::from_persisted(b"garbage"),
            Err(SnapshotError::Format(_))
        ));
        assert!(matches!(
            Snapshot::from_persisted(
                br#"{"format":9,"revision":1,"cachedAt":0,"kind":"rules","data":{}}"#
            ),
            Err(SnapshotError::UnknownFormat(9))
        ));
        assert!(matches!(
            Snapshot::from_persisted(
                br#"{"format":1,"revision":1,"cachedAt":0,"kind":"evaluated","data":{"flags":{"a":1}}}"#
            ),
            Err(SnapshotError::Data(_))
        ));
    }

    #[test]
    fn freshness_classification() {
        let now = Timestamp::from_millis(100_000);
        let limit = Duration::from_secs(60);
        assert_eq!(Freshness::classify(now, None, limit), Freshness::Missing);
        assert_eq!(
            Freshness::classify(now, Some(Timestamp::from_millis(40_000)), limit),
            Freshness::Fresh
        );
        assert_eq!(
            Freshness::classify(now, Some(Timestamp::from_millis(39_999)), limit),
            Freshness::Stale
        );
        let mut stats = CacheStats::default();
        stats.record(Freshness::Fresh);
        stats.record(Freshness::Stale);
        stats.record(Freshness::Missing);
        assert_eq!(
            serde_json::to_string(&stats).unwrap(),
            r#"{"hits":1,"misses":1,"staleHits":1}"#
        );
    }

    proptest! {
        /// The ETag changes exactly when the content changes, and revisions only grow.
        #[test]
        fn etag_tracks_content_and_revisions_grow(
            steps in proptest::collection::vec(
                proptest::collection::btree_map("[a-c]", any::<bool>(), 0..3), 1..20)
        ) {
            let mut store = SnapshotStore::new();
            let mut last: Option<(BTreeMap<String, bool>, String, Revision)> = None;
            for flags in steps {
                let source = FlagSource::Evaluated(EvaluatedFlags {
                    flags: flags.clone(),
                    reasons: BTreeMap::new(),
                });
                let published = store.replace(Timestamp::ZERO, source);
                match (&last, published) {
                    (Some((prev, _, _)), None) => prop_assert_eq!(prev, &flags),
                    (Some((prev, etag, revision)), Some(snapshot)) => {
                        prop_assert_ne!(prev, &flags);
                        prop_assert_ne!(etag.as_str(), snapshot.etag());
                        prop_assert!(snapshot.revision() > *revision);
                        last = Some((flags, snapshot.etag().to_owned(), snapshot.revision()));
                    }
                    (None, Some(snapshot)) => {
                        last = Some((flags, snapshot.etag().to_owned(), snapshot.revision()));
                    }
                    (None, None) => prop_assert!(false, "first content must publish"),
                }
            }
        }
    }
}
