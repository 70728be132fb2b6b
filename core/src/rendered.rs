//! Per-context answers of rules mode, rendered once: body + ETag per (revision, context), bounded in bytes.
//!
//! In rules mode a context's answer is a pure function of the snapshot's rules and the
//! context, so a user polling again (a browser every 30 s) can be served the bytes rendered
//! for its first poll: one lookup instead of an evaluation, a serialization and a hash. The
//! cache holds one revision: the first lookup for a newer revision empties it.
//!
//! The ETag of a context's answer is derived without looking at the body: the first 64 bits
//! of SHA-256 over the snapshot's content hash and the canonical bytes of the context (a few
//! dozen bytes, where the body is kilobytes). The body is determined by exactly those two
//! (the rules are in the content hash), so the ETag changes whenever the body can change, and
//! it is the same on every replica and on both targets for the same data and context.

use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest, Sha256};

use crate::model::{AttributeValue, Context};
use crate::snapshot::{Revision, Snapshot};

/// Which rendering of a context's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `GET /api/flags`: `{"flags":{..},"_meta":{..}}`.
    Flags,
    /// `GET /api/v1/sdk/flags`: `{"flags":{..}}`.
    Sdk,
    /// `GET /api/v1/sdk/flags?withReasons=true`: `{"flags":{..},"reasons":{..}}`.
    SdkWithReasons,
}

impl BodyKind {
    const fn tag(self) -> u8 {
        match self {
            Self::Flags => 0,
            Self::Sdk => 1,
            Self::SdkWithReasons => 2,
        }
    }
}

/// The canonical bytes of a context: equal contexts give equal bytes, different contexts
/// different bytes (every field is tagged and length-prefixed).
pub fn context_key(context: &Context) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write_context_key(&mut out, context);
    out
}

/// The cache key of `kind` for `context`: [`RenderedCache::key`] of [`context_key`], built
/// in one buffer. [`context_part`] gives the context's bytes back.
pub fn cache_key(kind: BodyKind, context: &Context) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.push(kind.tag());
    write_context_key(&mut out, context);
    out
}

/// The [`context_key`] bytes inside a [`cache_key`].
pub fn context_part(cache_key: &[u8]) -> &[u8] {
    cache_key.get(1..).unwrap_or_default()
}

fn write_context_key(out: &mut Vec<u8>, context: &Context) {
    fn text(out: &mut Vec<u8>, value: &str) {
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    fn optional(out: &mut Vec<u8>, value: Option<&str>) {
        match value {
            None => out.push(0),
            Some(value) => {
                out.push(1);
                text(out, value);
            }
        }
    }
    optional(out, context.id.as_deref());
    optional(out, context.email.as_deref());
    out.extend_from_slice(&(context.attributes.len() as u64).to_le_bytes());
    for (name, value) in &context.attributes {
        text(out, name);
        match value {
            AttributeValue::String(s) => {
                out.push(b's');
                text(out, s);
            }
            AttributeValue::Number(n) => {
                out.push(b'n');
                out.extend_from_slice(&n.to_bits().to_le_bytes());
            }
            AttributeValue::Bool(b) => {
                out.push(b'b');
                out.push(u8::from(*b));
            }
        }
    }
}

/// The quoted ETag of `context_key`'s answers for `snapshot` (see the module docs).
pub fn context_etag(snapshot: &Snapshot, context_key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"context:")
        .chain_update(snapshot.content_hash().as_bytes())
        .chain_update(b":")
        .chain_update(context_key)
        .finalize();
    let mut etag = String::with_capacity(18);
    etag.push('"');
    for byte in &digest[..8] {
        etag.push(char::from(HEX[usize::from(byte >> 4)]));
        etag.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    etag.push('"');
    etag
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// One cached answer.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The body.
    pub body: Bytes,
    /// Its quoted ETag.
    pub etag: String,
}

/// Bookkeeping per entry beyond its key and body (the map node, the ETag, the `Bytes`).
const ENTRY_OVERHEAD: usize = 128;

/// What the cache did, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenderedStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to evaluate and render.
    pub misses: u64,
    /// Entries dropped to stay within the byte bound.
    pub evicted: u64,
}

/// Rendered answers per (body kind, context) for one revision, least recently used first out.
#[derive(Debug)]
pub struct RenderedCache {
    entries: LruCache<Vec<u8>, Rendered>,
    revision: Option<Revision>,
    bytes: usize,
    max_bytes: usize,
    stats: RenderedStats,
}

impl RenderedCache {
    /// An empty cache holding at most about `max_bytes` of keys and bodies.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            entries: LruCache::unbounded(),
            revision: None,
            bytes: 0,
            max_bytes,
            stats: RenderedStats::default(),
        }
    }

    /// The key of `kind` for a context whose [`context_key`] is `context`.
    pub fn key(kind: BodyKind, context: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(context.len() + 1);
        key.push(kind.tag());
        key.extend_from_slice(context);
        key
    }

    /// The answer cached under `key` for `revision`, if any. A newer revision empties the
    /// cache first.
    pub fn get(&mut self, revision: Revision, key: &[u8]) -> Option<Rendered> {
        self.advance(revision);
        let found = if self.revision == Some(revision) {
            self.entries.get(key).cloned()
        } else {
            None
        };
        match found {
            Some(_) => self.stats.hits += 1,
            None => self.stats.misses += 1,
        }
        found
    }

    /// Remembers `rendered` under `key` for `revision` (ignored for an older revision, or when
    /// it alone exceeds the bound), evicting the least recently used answers to stay within
    /// the byte bound.
    pub fn insert(&mut self, revision: Revision, key: Vec<u8>, rendered: Rendered) {
        self.advance(revision);
        if self.revision != Some(revision) {
            return;
        }
        let size = entry_size(&key, &rendered);
        if size > self.max_bytes {
            return;
        }
        if let Some(old) = self.entries.peek(&key) {
            self.bytes = self.bytes.saturating_sub(entry_size(&key, old));
        }
        self.bytes += size;
        self.entries.put(key, rendered);
        while self.bytes > self.max_bytes {
            let Some((key, old)) = self.entries.pop_lru() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(entry_size(&key, &old));
            self.stats.evicted += 1;
        }
    }

    /// Answers held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held (keys, bodies and bookkeeping, estimated).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Hits, misses and evictions so far.
    pub fn stats(&self) -> RenderedStats {
        self.stats
    }

    fn advance(&mut self, revision: Revision) {
        if self.revision.is_none_or(|current| revision > current) {
            // Answers of an older revision are never served again.
            self.entries.clear();
            self.bytes = 0;
            self.revision = Some(revision);
        }
    }
}

fn entry_size(key: &[u8], rendered: &Rendered) -> usize {
    key.len() + rendered.body.len() + rendered.etag.len() + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::RulesPayload;
    use crate::snapshot::FlagSource;
    use crate::time::Timestamp;

    fn rendered(body: &str) -> Rendered {
        Rendered {
            body: Bytes::from(body.to_owned()),
            etag: "\"e\"".into(),
        }
    }

    fn user(id: &str, plan: &str) -> Context {
        Context {
            id: Some(id.into()),
            email: None,
            attributes: BTreeMap::from([("plan".into(), AttributeValue::String(plan.into()))]),
        }
    }

    #[test]
    fn context_keys_tell_contexts_apart() {
        let a = context_key(&user("u1", "pro"));
        assert_eq!(a, context_key(&user("u1", "pro")));
        assert_ne!(a, context_key(&user("u1", "team")));
        assert_ne!(a, context_key(&user("u2", "pro")));
        // Field boundaries are unambiguous: an id "ab" + email "c" is not id "a" + email "bc".
        let left = Context {
            id: Some("ab".into()),
            email: Some("c".into()),
            ..Context::default()
        };
        let right = Context {
            id: Some("a".into()),
            email: Some("bc".into()),
            ..Context::default()
        };
        assert_ne!(context_key(&left), context_key(&right));
        let number = Context {
            attributes: BTreeMap::from([("n".into(), AttributeValue::Number(1.0))]),
            ..Context::default()
        };
        let text = Context {
            attributes: BTreeMap::from([("n".into(), AttributeValue::String("1".into()))]),
            ..Context::default()
        };
        assert_ne!(context_key(&number), context_key(&text));
    }

    #[test]
    fn the_cache_key_is_the_kind_and_the_context_key() {
        let context = user("u1", "pro");
        let key = cache_key(BodyKind::Sdk, &context);
        assert_eq!(
            key,
            RenderedCache::key(BodyKind::Sdk, &context_key(&context))
        );
        assert_eq!(context_part(&key), context_key(&context).as_slice());
        assert_eq!(context_part(&[]), &[] as &[u8]);
    }

    #[test]
    fn the_etag_follows_the_content_and_the_context() {
        let rules = |rollout: u32| {
            RulesPayload::from_json(
                format!(r#"{{"flags":{{"a":{{"enabled":true,"rollout":{rollout}}}}}}}"#).as_bytes(),
            )
            .expect("valid rules")
        };
        let build = |revision, payload: &RulesPayload| {
            Snapshot::build(
                Revision::new(revision),
                Timestamp::ZERO,
                FlagSource::rules(payload),
            )
        };
        let one = build(1, &rules(50));
        let same = build(2, &rules(50));
        let other = build(3, &rules(60));
        let key = context_key(&user("u1", "pro"));
        let etag = context_etag(&one, &key);
        assert!(etag.len() == 18 && etag.starts_with('"') && etag.ends_with('"'));
        // Same content on another replica (another revision number): same tag.
        assert_eq!(etag, context_etag(&same, &key));
        assert_ne!(etag, context_etag(&other, &key));
        assert_ne!(etag, context_etag(&one, &context_key(&user("u2", "pro"))));
        assert_ne!(etag, one.etag());
    }

    #[test]
    fn hits_misses_revisions_and_the_byte_bound() {
        let mut cache = RenderedCache::new(3 * (ENTRY_OVERHEAD + 4 + 100 + 3));
        let key = |n: u8| RenderedCache::key(BodyKind::Flags, &[n, n, n]);
        let r1 = Revision::new(1);
        assert!(cache.get(r1, &key(1)).is_none());
        cache.insert(r1, key(1), rendered(&"x".repeat(100)));
        assert_eq!(cache.get(r1, &key(1)).map(|r| r.body.len()), Some(100));
        // Another kind of body for the same context is another entry.
        assert!(
            cache
                .get(r1, &RenderedCache::key(BodyKind::Sdk, &[1, 1, 1]))
                .is_none()
        );
        for n in 2..=4 {
            cache.insert(r1, key(n), rendered(&"x".repeat(100)));
        }
        // Four entries of the size of three: the least recently used one went.
        assert_eq!(cache.len(), 3);
        assert!(cache.bytes() <= 3 * (ENTRY_OVERHEAD + 4 + 100 + 3));
        assert!(cache.get(r1, &key(1)).is_none());
        assert!(cache.get(r1, &key(4)).is_some());
        assert_eq!(cache.stats().evicted, 1);
        // A body larger than the whole bound is not kept.
        cache.insert(r1, key(9), rendered(&"x".repeat(10_000)));
        assert!(cache.get(r1, &key(9)).is_none());
        // A newer revision empties the cache; an older one is neither served nor stored.
        let r2 = Revision::new(2);
        assert!(cache.get(r2, &key(4)).is_none());
        assert!(cache.is_empty());
        cache.insert(r1, key(5), rendered("old"));
        assert!(cache.is_empty());
        assert!(cache.get(r1, &key(5)).is_none());
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.evicted), (2, 1));
    }
}
