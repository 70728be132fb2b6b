//! Per-user state, sans-IO: the evaluated-mode flag cache and the `/identify` attribute store.
//!
//! [`UserCache`] decides, for a user id and the current revision, whether a cached answer is
//! fresh, whether this caller must fetch it from upstream (one fetch per user and revision
//! however many ask: the others wait), and what to serve when the fetch fails (the expired
//! answer, else nothing). The adapter performs the fetch and waits; it reports back with
//! [`UserCache::handle_fetch`]. An in-flight fetch has a deadline, so one that never reports
//! back (its task died) is forgotten rather than blocking the user forever.
//!
//! [`IdentityStore`] keeps the context each user last sent to `/identify` and merges it into
//! that user's later requests. Both are bounded: by entries and by bytes.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use lru::LruCache;

use crate::api::limits;
use crate::model::{AttributeValue, Context, EvaluatedFlags};
use crate::snapshot::Revision;
use crate::time::Timestamp;

/// Identifies one upstream fetch of a user's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FetchTicket(u64);

impl FetchTicket {
    /// The number (for logs and adapter maps).
    pub fn get(self) -> u64 {
        self.0
    }
}

/// What [`UserCache::lookup`] decided.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// A cached answer for this revision, younger than the TTL.
    Fresh(Arc<EvaluatedFlags>),
    /// Nobody is fetching: this caller fetches upstream and reports with
    /// [`UserCache::handle_fetch`] (within `deadline`).
    Fetch {
        /// The fetch's ticket.
        ticket: FetchTicket,
        /// When the cache forgets the fetch if it has not reported back.
        deadline: Timestamp,
    },
    /// Another caller's fetch is in flight: wait for it (at most until `deadline`), then ask
    /// [`UserCache::after_wait`].
    Wait {
        /// The fetch waited for.
        ticket: FetchTicket,
        /// When to stop waiting.
        deadline: Timestamp,
    },
}

/// The answer for a user after a fetch or a wait.
#[derive(Clone, Debug, PartialEq)]
pub enum UserFlags {
    /// Upstream's answer for the current revision.
    Fresh(Arc<EvaluatedFlags>),
    /// Upstream failed; an earlier answer is served.
    Stale(Arc<EvaluatedFlags>),
    /// Upstream failed and nothing is cached (502 `UPSTREAM_UNAVAILABLE`).
    Unavailable,
}

impl UserFlags {
    /// The flags, if any.
    pub fn flags(&self) -> Option<&Arc<EvaluatedFlags>> {
        match self {
            Self::Fresh(flags) | Self::Stale(flags) => Some(flags),
            Self::Unavailable => None,
        }
    }

    /// The metric label of this outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Fresh(_) => "miss",
            Self::Stale(_) => "stale",
            Self::Unavailable => "error",
        }
    }
}

#[derive(Debug)]
struct Cached {
    flags: Arc<EvaluatedFlags>,
    fetched: Timestamp,
    /// A change upstream makes every cached answer out of date, whatever its age.
    revision: Revision,
    /// The upstream change epoch when the fetch started: a later change makes it stale.
    epoch: u64,
    bytes: usize,
}

#[derive(Debug)]
struct InFlight {
    ticket: FetchTicket,
    revision: Revision,
    epoch: u64,
    deadline: Timestamp,
}

/// Limits of a [`UserCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserCacheLimits {
    /// Most users cached.
    pub max_users: usize,
    /// Most bytes of cached answers (an estimate of their size in memory).
    pub max_bytes: usize,
    /// How long an answer is fresh (the refresh interval).
    pub ttl: Duration,
    /// How long a fetch may stay in flight (the upstream timeout, plus slack).
    pub fetch_deadline: Duration,
}

/// Flags per user id, fetched from upstream in evaluated mode. See the module docs.
#[derive(Debug)]
pub struct UserCache {
    entries: LruCache<String, Cached>,
    inflight: HashMap<String, InFlight>,
    limits: UserCacheLimits,
    bytes: usize,
    next_ticket: u64,
    evicted: u64,
    /// Upstream's change epoch ([`UserCache::handle_change`]).
    epoch: u64,
}

impl UserCache {
    /// An empty cache.
    pub fn new(limits: UserCacheLimits) -> Self {
        Self {
            entries: LruCache::unbounded(),
            inflight: HashMap::new(),
            limits,
            bytes: 0,
            next_ticket: 0,
            evicted: 0,
            epoch: 0,
        }
    }

    /// Upstream signalled a change (its change epoch is now `epoch`): every answer fetched, or
    /// fetch started, before it is out of date, whatever its revision and age. A rollout or
    /// targeting change can alter one user's answer and leave the anonymous flags (and so the
    /// revision) as they were.
    pub fn handle_change(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
    }

    /// `user_id`'s cached answer, whatever its age (for a per-user stream after a refresh).
    pub fn peek(&mut self, user_id: &str) -> Option<Arc<EvaluatedFlags>> {
        self.entries
            .get(user_id)
            .map(|entry| Arc::clone(&entry.flags))
    }

    /// Cached users.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no user is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held by cached answers (estimated).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Answers evicted to stay within the limits.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Fetches in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// What to do for `user_id` at `revision`.
    pub fn lookup(&mut self, now: Timestamp, user_id: &str, revision: Revision) -> Lookup {
        if let Some(entry) = self.entries.get(user_id)
            && entry.revision == revision
            && entry.epoch == self.epoch
            && now.saturating_since(entry.fetched) < self.limits.ttl
        {
            return Lookup::Fresh(Arc::clone(&entry.flags));
        }
        if let Some(inflight) = self.inflight.get(user_id)
            && inflight.revision == revision
            && inflight.epoch == self.epoch
            && now < inflight.deadline
        {
            return Lookup::Wait {
                ticket: inflight.ticket,
                deadline: inflight.deadline,
            };
        }
        // No fetch, an abandoned one (past its deadline), or one for an older revision: this
        // caller fetches (an older revision's answer will be stored but is not fresh now).
        self.next_ticket += 1;
        let ticket = FetchTicket(self.next_ticket);
        let deadline = now.saturating_add(self.limits.fetch_deadline);
        self.inflight.insert(
            user_id.to_owned(),
            InFlight {
                ticket,
                revision,
                epoch: self.epoch,
                deadline,
            },
        );
        Lookup::Fetch { ticket, deadline }
    }

    /// The result of fetch `ticket` for `user_id` (`None`: it failed). Returns what the fetching
    /// caller serves.
    pub fn handle_fetch(
        &mut self,
        now: Timestamp,
        user_id: &str,
        ticket: FetchTicket,
        result: Option<EvaluatedFlags>,
    ) -> UserFlags {
        let revision = match self.inflight.get(user_id) {
            Some(inflight) if inflight.ticket == ticket => {
                let revision = (inflight.revision, inflight.epoch);
                self.inflight.remove(user_id);
                Some(revision)
            }
            // Superseded by a newer fetch (or forgotten past its deadline): the answer is still
            // the best there is for this caller, but must not overwrite a newer one.
            _ => None,
        };
        match result {
            Some(flags) => {
                let flags = Arc::new(flags);
                if let Some((revision, epoch)) = revision {
                    self.insert(now, user_id, Arc::clone(&flags), revision, epoch);
                }
                UserFlags::Fresh(flags)
            }
            None => self.fallback(user_id),
        }
    }

    /// After waiting for another caller's fetch: its answer if it arrived, else the stale one.
    pub fn after_wait(&mut self, now: Timestamp, user_id: &str, revision: Revision) -> UserFlags {
        match self.entries.get(user_id) {
            Some(entry)
                if entry.revision == revision
                    && entry.epoch == self.epoch
                    && now.saturating_since(entry.fetched) < self.limits.ttl =>
            {
                UserFlags::Fresh(Arc::clone(&entry.flags))
            }
            _ => self.fallback(user_id),
        }
    }

    /// Forgets `user_id`'s answer (its `/identify` attributes changed), and any fetch in flight
    /// for it: that fetch started before the identify, so its late answer must not be stored.
    pub fn forget(&mut self, user_id: &str) {
        if let Some(entry) = self.entries.pop(user_id) {
            self.bytes = self.bytes.saturating_sub(entry.bytes);
        }
        self.inflight.remove(user_id);
    }

    fn fallback(&mut self, user_id: &str) -> UserFlags {
        match self.entries.get(user_id) {
            Some(entry) => UserFlags::Stale(Arc::clone(&entry.flags)),
            None => UserFlags::Unavailable,
        }
    }

    fn insert(
        &mut self,
        now: Timestamp,
        user_id: &str,
        flags: Arc<EvaluatedFlags>,
        revision: Revision,
        epoch: u64,
    ) {
        let bytes = user_id.len() + flags_bytes(&flags);
        if let Some(old) = self.entries.put(
            user_id.to_owned(),
            Cached {
                flags,
                fetched: now,
                revision,
                epoch,
                bytes,
            },
        ) {
            self.bytes = self.bytes.saturating_sub(old.bytes);
        }
        self.bytes += bytes;
        while self.entries.len() > self.limits.max_users.max(1)
            || (self.bytes > self.limits.max_bytes && self.entries.len() > 1)
        {
            let Some((_, evicted)) = self.entries.pop_lru() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(evicted.bytes);
            self.evicted += 1;
        }
    }
}

/// An estimate of a context's heap size.
fn context_bytes(context: &Context) -> usize {
    const PER_ENTRY: usize = 48;
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    PER_ENTRY
        + text(&context.id)
        + text(&context.email)
        + context
            .attributes
            .iter()
            .map(|(name, value)| {
                PER_ENTRY
                    + name.len()
                    + match value {
                        AttributeValue::String(s) => s.len(),
                        AttributeValue::Bool(_) | AttributeValue::Number(_) => 8,
                    }
            })
            .sum::<usize>()
}

/// An estimate of an answer's heap size: keys, reasons, map overhead.
pub fn flags_bytes(flags: &EvaluatedFlags) -> usize {
    const PER_ENTRY: usize = 64;
    flags
        .flags
        .keys()
        .map(|key| key.len() + PER_ENTRY)
        .sum::<usize>()
        + flags
            .reasons
            .keys()
            .map(|key| key.len() + PER_ENTRY * 2)
            .sum::<usize>()
}

/// Bytes of stored `/identify` contexts at most: 16 MiB (a context can reach ~75 KB at the
/// request limits, so the entry count alone would not bound memory).
pub const IDENTITY_STORE_MAX_BYTES: usize = 16 << 20;

/// Attributes per user id from `POST /api/v1/sdk/identify` (least recently used evicted),
/// bounded by users and by bytes.
#[derive(Debug)]
pub struct IdentityStore {
    users: LruCache<String, (Context, usize)>,
    bytes: usize,
    max_bytes: usize,
    evicted: u64,
}

impl IdentityStore {
    /// A store of at most `capacity` users and [`IDENTITY_STORE_MAX_BYTES`].
    pub fn new(capacity: usize) -> Self {
        Self::with_max_bytes(capacity, IDENTITY_STORE_MAX_BYTES)
    }

    /// A store of at most `capacity` users and `max_bytes`.
    pub fn with_max_bytes(capacity: usize, max_bytes: usize) -> Self {
        Self {
            users: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            bytes: 0,
            max_bytes,
            evicted: 0,
        }
    }

    /// Stores `context` under its id (an identify with no attributes clears them, as the SDKs'
    /// `reset()` intends). Contexts without an id are ignored.
    pub fn remember(&mut self, context: &Context) {
        let Some(id) = &context.id else { return };
        let bytes = context_bytes(context);
        if let Some((_, (_, old))) = self.users.push(id.clone(), (context.clone(), bytes)) {
            // The same user replaced, or the least recent one evicted by the entry bound.
            self.bytes = self.bytes.saturating_sub(old);
        }
        self.bytes += bytes;
        while self.bytes > self.max_bytes && self.users.len() > 1 {
            let Some((_, (_, old))) = self.users.pop_lru() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(old);
            self.evicted += 1;
        }
    }

    /// Bytes held (estimated).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether any user identified.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// `context` with the stored email and attributes filled in where the request gave none:
    /// the request's own attributes first, then stored ones while fewer than
    /// [`limits::MAX_ATTRIBUTES`].
    pub fn merge(&mut self, mut context: Context) -> Context {
        let Some(id) = &context.id else {
            return context;
        };
        let Some((stored, _)) = self.users.get(id) else {
            return context;
        };
        if context.email.is_none() {
            context.email.clone_from(&stored.email);
        }
        for (name, value) in &stored.attributes {
            if context.attributes.len() >= limits::MAX_ATTRIBUTES {
                break;
            }
            context
                .attributes
                .entry(name.clone())
                .or_insert_with(|| AttributeValue::clone(value));
        }
        context
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn cache() -> UserCache {
        UserCache::new(UserCacheLimits {
            max_users: 3,
            max_bytes: 1 << 20,
            ttl: TTL,
            fetch_deadline: Duration::from_secs(10),
        })
    }

    fn flags(value: bool) -> EvaluatedFlags {
        let mut flags = EvaluatedFlags::default();
        flags.flags.insert("a".into(), value);
        flags
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn ticket(lookup: Lookup) -> FetchTicket {
        match lookup {
            Lookup::Fetch { ticket, .. } => ticket,
            other => panic!("expected a fetch, got {other:?}"),
        }
    }

    #[test]
    fn one_fetch_per_user_and_revision_others_wait() {
        let mut cache = cache();
        let r1 = Revision::new(1);
        let t = ticket(cache.lookup(at(0), "u1", r1));
        assert!(
            matches!(cache.lookup(at(5), "u1", r1), Lookup::Wait { ticket, .. } if ticket == t)
        );
        // Another user fetches on its own.
        ticket(cache.lookup(at(5), "u2", r1));
        let answer = cache.handle_fetch(at(10), "u1", t, Some(flags(true)));
        assert!(matches!(answer, UserFlags::Fresh(_)));
        assert!(matches!(
            cache.after_wait(at(11), "u1", r1),
            UserFlags::Fresh(_)
        ));
        assert!(matches!(cache.lookup(at(20), "u1", r1), Lookup::Fresh(_)));
        assert_eq!(cache.inflight(), 1);
    }

    #[test]
    fn ttl_and_revision_expire_answers_and_failures_serve_stale() {
        let mut cache = cache();
        let r1 = Revision::new(1);
        let t = ticket(cache.lookup(at(0), "u1", r1));
        cache.handle_fetch(at(0), "u1", t, Some(flags(true)));
        // Older than the TTL: fetch again; upstream fails: the old answer, marked stale.
        let t = ticket(cache.lookup(at(30_000), "u1", r1));
        let answer = cache.handle_fetch(at(30_001), "u1", t, None);
        assert!(matches!(answer, UserFlags::Stale(_)));
        assert!(matches!(
            cache.after_wait(at(30_002), "u1", r1),
            UserFlags::Stale(_)
        ));
        // A new revision makes even a young answer out of date.
        let t = ticket(cache.lookup(at(30_003), "u1", Revision::new(2)));
        cache.handle_fetch(at(30_004), "u1", t, Some(flags(false)));
        assert!(matches!(
            cache.lookup(at(30_005), "u1", Revision::new(2)),
            Lookup::Fresh(f) if !f.flags["a"]
        ));
        // Nothing cached and upstream fails: unavailable.
        let t = ticket(cache.lookup(at(0), "u9", r1));
        assert_eq!(
            cache.handle_fetch(at(1), "u9", t, None),
            UserFlags::Unavailable
        );
    }

    #[test]
    fn an_upstream_change_makes_answers_and_fetches_stale_at_the_same_revision() {
        let mut cache = cache();
        let r1 = Revision::new(1);
        let t = ticket(cache.lookup(at(0), "u1", r1));
        cache.handle_fetch(at(1), "u1", t, Some(flags(true)));
        // A fetch started before the change is not waited for after it.
        let before = ticket(cache.lookup(at(2), "u2", r1));
        cache.handle_change(1);
        let t = ticket(cache.lookup(at(3), "u1", r1));
        assert!(matches!(
            cache.lookup(at(3), "u2", r1),
            Lookup::Fetch { .. }
        ));
        // Until the refetch lands, the old answer is what a stream can peek at.
        assert!(cache.peek("u1").unwrap().flags["a"]);
        cache.handle_fetch(at(4), "u1", t, Some(flags(false)));
        assert!(matches!(cache.lookup(at(5), "u1", r1), Lookup::Fresh(f) if !f.flags["a"]));
        // The pre-change fetch's late answer is served to its caller but never cached.
        cache.handle_fetch(at(6), "u2", before, Some(flags(true)));
        assert!(matches!(cache.lookup(at(7), "u2", r1), Lookup::Wait { .. }));
        // Epochs only move forward.
        cache.handle_change(0);
        assert!(matches!(cache.lookup(at(8), "u1", r1), Lookup::Fresh(_)));
    }

    #[test]
    fn an_abandoned_fetch_is_forgotten_at_its_deadline() {
        let mut cache = cache();
        let r1 = Revision::new(1);
        let first = ticket(cache.lookup(at(0), "u1", r1));
        assert!(matches!(
            cache.lookup(at(9_999), "u1", r1),
            Lookup::Wait { .. }
        ));
        // The fetching task died without reporting: after the deadline a new fetch starts.
        let second = ticket(cache.lookup(at(10_000), "u1", r1));
        assert_ne!(first, second);
        // A late report of the first ticket does not overwrite the second's slot.
        cache.handle_fetch(at(10_001), "u1", first, Some(flags(false)));
        assert_eq!(cache.inflight(), 1);
        cache.handle_fetch(at(10_002), "u1", second, Some(flags(true)));
        assert_eq!(cache.inflight(), 0);
        assert!(matches!(cache.lookup(at(10_003), "u1", r1), Lookup::Fresh(f) if f.flags["a"]));
    }

    #[test]
    fn bounded_by_users_and_bytes() {
        let mut cache = cache();
        let r1 = Revision::new(1);
        for (i, user) in ["u1", "u2", "u3", "u4"].iter().enumerate() {
            let t = ticket(cache.lookup(at(i as u64), user, r1));
            cache.handle_fetch(at(i as u64), user, t, Some(flags(true)));
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.evicted(), 1);
        assert!(matches!(
            cache.lookup(at(10), "u1", r1),
            Lookup::Fetch { .. }
        ));
        let mut tiny = UserCache::new(UserCacheLimits {
            max_users: 100,
            max_bytes: 200,
            ttl: TTL,
            fetch_deadline: Duration::from_secs(1),
        });
        for user in ["a", "b", "c", "d"] {
            let t = ticket(tiny.lookup(at(0), user, r1));
            tiny.handle_fetch(at(0), user, t, Some(flags(true)));
        }
        assert!(tiny.bytes() <= 200);
        assert!(tiny.len() < 4);
        cache.forget("u4");
        assert!(matches!(
            cache.lookup(at(10), "u4", r1),
            Lookup::Fetch { .. }
        ));
    }

    #[test]
    fn identity_store_merges_caps_and_evicts() {
        let mut store = IdentityStore::new(2);
        let mut ctx = Context::with_id("u1");
        ctx.email = Some("a@example.com".into());
        ctx.attributes
            .insert("plan".into(), AttributeValue::String("pro".into()));
        store.remember(&ctx);
        let merged = store.merge(Context::with_id("u1"));
        assert_eq!(merged.email.as_deref(), Some("a@example.com"));
        assert_eq!(merged.attribute("plan").as_deref(), Some("pro"));
        // The request's own values win.
        let mut own = Context::with_id("u1");
        own.attributes
            .insert("plan".into(), AttributeValue::String("free".into()));
        assert_eq!(store.merge(own).attribute("plan").as_deref(), Some("free"));
        // At most 64 attributes: the request's first.
        let mut full = Context::with_id("u1");
        for i in 0..limits::MAX_ATTRIBUTES {
            full.attributes
                .insert(format!("a{i:02}"), AttributeValue::Bool(true));
        }
        let merged = store.merge(full);
        assert_eq!(merged.attributes.len(), limits::MAX_ATTRIBUTES);
        assert_eq!(merged.attribute("plan"), None);
        store.remember(&Context::with_id("u2"));
        store.remember(&Context::with_id("u3"));
        assert_eq!(store.merge(Context::with_id("u1")).email, None);
        assert!(store.merge(Context::anonymous()).is_anonymous());

        // Bounded in bytes too: big contexts evict the least recently used.
        let mut small = IdentityStore::with_max_bytes(100, 600);
        for user in ["a", "b", "c"] {
            let mut ctx = Context::with_id(user);
            ctx.attributes
                .insert("x".into(), AttributeValue::String("v".repeat(200)));
            small.remember(&ctx);
        }
        assert!(small.bytes() <= 600);
        assert_eq!(small.merge(Context::with_id("a")).attribute("x"), None);
        assert!(small.merge(Context::with_id("c")).attribute("x").is_some());
    }
}
