//! The attribution store: admission facts in, authors out. Pure: no I/O, and time comes from
//! an injectable [`Clock`].
//!
//! Admission sees *attempts*, not persisted changes: a request can still fail after every
//! webhook allowed it (a 409 conflict, a later webhook's denial, a precondition), a no-op apply
//! persists nothing, and a dry run never persists. So a fact only names an author once a watch
//! event proves the attempt became the cluster's state:
//!
//! ```text
//! webhook: admitted CREATE/UPDATE ──▶ Fact{key, user, uid, hash of the sanitized canonical object}
//!          admitted DELETE        ──▶ Fact{key, user, uid}
//!                                         │ held until matched, superseded, expired (TTL) or
//!                                         │ evicted (oldest first once `max_facts` are held)
//! watch:   ADDED/MODIFIED(key, uid, hash) ── attribute_upsert ──▶ the user whose fact has this
//!                                                                 exact content for this object
//!          DELETED(key, uid)              ── attribute_delete ──▶ the user whose DELETE named
//!                                                                 this uid
//! ```
//!
//! The join never guesses: no fact, or facts of *different* users for the same content, give
//! `None` and the change keeps the bot as its author. Why content rather than time: the watch
//! may lag the webhook by seconds, and controllers write the same object in between; equal
//! canonical bytes are the only evidence that the persisted state is the one a user sent.
//!
//! A match also retires the older upsert facts of the same object: a fact admitted before the
//! one that just became state either persisted earlier (and was matched then) or never will
//! (conflict, no-op). The API server runs validating admission inside its optimistic-update
//! retry loop, so a write that commits after a conflict is admitted again, newer.
//!
//! Lineage: an UPDATE (or DELETE) is computed against the stored version it read — the
//! `oldObject`'s resourceVersion, kept as the fact's `base_version` — and can only commit as
//! the next version of the object (the API server's compare-and-swap). So once a watch event
//! *newer* than that base arrives, the fact is decided: it produced this event (same content)
//! or it never will (another webhook denied it, a precondition failed, it was a no-op) and is
//! dropped. Without this, an attempt denied by another webhook would linger until the TTL and
//! author a later identical change made without attribution. An event that is not newer than
//! the base (the watch lagging behind the webhook) can never be the fact's result. The same
//! lineage lets a `/scale` fact (which carries a `Scale`, not the object) match its parent's
//! next version by `spec.replicas`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::AttributionMetrics;
use crate::attribution::{AttributedUser, Attribution, ContentHash, ObjectKey};

/// Where "now" comes from; tests inject a [`ManualClock`].
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<Instant>>);

impl Default for ManualClock {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The admission operation a fact records (CONNECT never makes a fact).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    fn is_upsert(self) -> bool {
        matches!(self, Operation::Create | Operation::Update)
    }
}

/// What one admitted request tells us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    pub key: ObjectKey,
    pub operation: Operation,
    pub username: String,
    pub groups: Vec<String>,
    /// `metadata.uid` of the object (for DELETE: of the object being deleted). The API server
    /// assigns it before admission, so even a CREATE's fact knows it.
    pub uid: Option<String>,
    /// Hash of the sanitized canonical object as admitted; `None` for DELETE and `/scale`.
    pub content_hash: Option<ContentHash>,
    /// `metadata.resourceVersion` of the object the request changed (UPDATE and DELETE: the
    /// `oldObject`), when it is a number (comparable since Kubernetes 1.35, KEP-5504; in
    /// practice always). The request can only become the object's *next* version, so once a
    /// watch event newer than this arrives, the fact has either produced it or never will.
    pub base_version: Option<u64>,
    /// For a `/scale` UPDATE of a built-in workload: the `spec.replicas` asked for. The fact
    /// is keyed on the parent object; `content_hash` is `None`.
    pub scale_replicas: Option<i64>,
}

/// What a watch event (or a relisted object) shows of an object, for the join.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// `metadata.uid`.
    pub uid: Option<&'a str>,
    /// `metadata.resourceVersion` as a number; `None` turns the lineage checks off.
    pub version: Option<u64>,
    /// Hash of the sanitized canonical object.
    pub hash: &'a ContentHash,
    /// `spec.replicas`, for `/scale` facts.
    pub replicas: Option<i64>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

impl<'a> Observed<'a> {
    /// Reads uid, resourceVersion, `spec.replicas` and `deletionTimestamp` from `object`.
    pub fn of(object: &'a serde_json::Value, hash: &'a ContentHash) -> Self {
        let meta = &object["metadata"];
        Self {
            uid: meta["uid"].as_str(),
            version: resource_version(&meta["resourceVersion"]),
            hash,
            replicas: object["spec"]["replicas"].as_i64(),
            deleting: !meta["deletionTimestamp"].is_null(),
        }
    }
}

/// A resourceVersion as a number, `None` when absent or not a number.
pub fn resource_version(value: &serde_json::Value) -> Option<u64> {
    value.as_str().and_then(|v| v.parse().ok())
}

/// Limits of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FactsConfig {
    /// How long an unmatched fact is kept (`--attribution-ttl`).
    pub ttl: Duration,
    /// Most facts held; the oldest is evicted beyond it (`--attribution-max-facts`).
    pub max_facts: usize,
}

impl Default for FactsConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(600),
            max_facts: 50_000,
        }
    }
}

#[derive(Debug)]
struct Held {
    fact: Fact,
    admitted_at: Instant,
}

/// Facts in admission order (`seq`), indexed by object.
#[derive(Debug, Default)]
struct Inner {
    next_seq: u64,
    facts: BTreeMap<u64, Held>,
    by_key: HashMap<ObjectKey, BTreeSet<u64>>,
}

impl Inner {
    fn remove(&mut self, seq: u64) -> Option<Held> {
        let held = self.facts.remove(&seq)?;
        if let Some(seqs) = self.by_key.get_mut(&held.fact.key) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.by_key.remove(&held.fact.key);
            }
        }
        Some(held)
    }

    /// Facts of `key` accepted by `keep`, oldest first.
    fn select(&self, key: &ObjectKey, keep: impl Fn(&Fact) -> bool) -> Vec<u64> {
        self.by_key
            .get(key)
            .into_iter()
            .flatten()
            .copied()
            .filter(|seq| self.facts.get(seq).is_some_and(|h| keep(&h.fact)))
            .collect()
    }
}

/// The shared, bounded store of admission facts. Clones share the same facts; every method
/// takes the lock briefly and never awaits.
#[derive(Clone, Debug)]
pub struct FactStore {
    inner: Arc<Mutex<Inner>>,
    clock: Arc<dyn Clock>,
    config: FactsConfig,
    metrics: AttributionMetrics,
}

impl FactStore {
    /// A store on the system clock.
    pub fn new(config: FactsConfig, metrics: AttributionMetrics) -> Self {
        Self::with_clock(config, metrics, Arc::new(SystemClock))
    }

    pub fn with_clock(
        config: FactsConfig,
        metrics: AttributionMetrics,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            inner: Arc::default(),
            clock,
            config: FactsConfig {
                max_facts: config.max_facts.max(1),
                ..config
            },
            metrics,
        }
    }

    pub fn config(&self) -> FactsConfig {
        self.config
    }

    pub fn metrics(&self) -> &AttributionMetrics {
        &self.metrics
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Facts held now.
    pub fn len(&self) -> usize {
        self.lock().facts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The facts held, oldest first (debugging and tests).
    pub fn snapshot(&self) -> Vec<Fact> {
        self.lock().facts.values().map(|h| h.fact.clone()).collect()
    }

    /// Stores a fact from an admitted, non-dry-run request.
    pub fn record(&self, fact: Fact) {
        let now = self.clock.now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner
            .by_key
            .entry(fact.key.clone())
            .or_default()
            .insert(seq);
        inner.facts.insert(
            seq,
            Held {
                fact,
                admitted_at: now,
            },
        );
        self.metrics.facts.inc();
        while inner.facts.len() > self.config.max_facts {
            let Some(&oldest) = inner.facts.keys().next() else {
                break;
            };
            inner.remove(oldest);
            self.metrics.evictions.inc();
        }
        self.metrics.held.set(inner.facts.len() as i64);
    }

    /// Drops facts older than the TTL, counting them as unmatched. [`record`](Self::record)
    /// and the joins do this too; a periodic call keeps the metric current when idle.
    pub fn sweep(&self) {
        let now = self.clock.now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        self.metrics.held.set(inner.facts.len() as i64);
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        // Admission order is time order, so the expired facts are a prefix.
        while let Some((&seq, held)) = inner.facts.first_key_value() {
            if now.saturating_duration_since(held.admitted_at) < self.config.ttl {
                break;
            }
            inner.remove(seq);
            self.metrics.unmatched.inc();
        }
    }

    /// The author of an ADDED or MODIFIED watch event (or a relisted object) whose sanitized
    /// canonical content hashes to `hash`, without the lineage checks of
    /// [`attribute_watched`](Self::attribute_watched) (the event's resourceVersion unknown).
    pub fn attribute_upsert(
        &self,
        key: &ObjectKey,
        uid: Option<&str>,
        hash: &ContentHash,
    ) -> Option<String> {
        self.attribute(
            key,
            &Observed {
                uid,
                version: None,
                hash,
                replicas: None,
                deleting: false,
            },
        )
    }

    /// The author of an ADDED or MODIFIED watch event (or a relisted object): `object` as
    /// watched, `hash` its sanitized canonical content hash. See [`attribute`](Self::attribute).
    pub fn attribute_watched(
        &self,
        key: &ObjectKey,
        object: &serde_json::Value,
        hash: &ContentHash,
    ) -> Option<String> {
        self.attribute(key, &Observed::of(object, hash))
    }

    /// The author of an ADDED or MODIFIED watch event (or a relisted object): the user of the
    /// CREATE/UPDATE facts of `key` with exactly this content (and this uid, when both know
    /// it), or of the `/scale` facts asking for exactly these replicas. `None` when there is
    /// no such fact or they name different users.
    ///
    /// Lineage, when both resourceVersions are known: a fact based on version `B` can only
    /// produce the object's next version, so it is a candidate only for an event newer than
    /// `B`, and once such an event arrived it has either produced it or never will — it is
    /// dropped either way. That is what keeps an attempt a later webhook denied (or a
    /// precondition failed) from authoring a later, identical change made by someone else.
    /// A `/scale` fact needs the lineage (replicas alone are weak evidence).
    ///
    /// Call it once per watch event, whether or not the event changes the mirrored file: a
    /// matched no-op is consumed instead of lingering.
    pub fn attribute(&self, key: &ObjectKey, seen: &Observed<'_>) -> Option<String> {
        self.attribute_user(key, seen).map(|user| user.name)
    }

    /// [`attribute_watched`](Self::attribute_watched), with the user's groups (for `ignore`).
    pub fn attribute_watched_user(
        &self,
        key: &ObjectKey,
        object: &serde_json::Value,
        hash: &ContentHash,
    ) -> Option<AttributedUser> {
        self.attribute_user(key, &Observed::of(object, hash))
    }

    /// [`attribute`](Self::attribute), with the user's groups (those of its newest matching fact).
    pub fn attribute_user(&self, key: &ObjectKey, seen: &Observed<'_>) -> Option<AttributedUser> {
        let now = self.clock.now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        let uid = seen.uid.filter(|u| !u.is_empty());
        let same_uid = |f: &Fact| match (uid, f.uid.as_deref()) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        // Based on a version older than this event's: decided by this event.
        let decided =
            |f: &Fact| matches!((f.base_version, seen.version), (Some(b), Some(v)) if b < v);
        // Could have produced this event (unknown versions: no lineage, content alone decides).
        let could_produce = |f: &Fact| match (f.base_version, seen.version) {
            (Some(b), Some(v)) => b < v,
            _ => true,
        };
        let candidates = inner.select(key, |f| {
            f.operation.is_upsert()
                && same_uid(f)
                && could_produce(f)
                && match f.scale_replicas {
                    Some(replicas) => {
                        decided(f)
                            && uid.is_some()
                            && f.uid.is_some()
                            && seen.replicas == Some(replicas)
                    }
                    None => f.content_hash.as_ref() == Some(seen.hash),
                }
        });
        let author = if candidates.is_empty() {
            None
        } else {
            self.decide(&inner, &candidates).map(|name| AttributedUser {
                groups: candidates
                    .last()
                    .and_then(|seq| inner.facts.get(seq))
                    .map(|h| h.fact.groups.clone())
                    .unwrap_or_default(),
                name,
            })
        };
        for seq in &candidates {
            inner.remove(*seq);
        }
        // Upsert facts admitted before the newest match can no longer become state.
        if let Some(&newest) = candidates.last() {
            for seq in inner.select(key, |f| f.operation.is_upsert()) {
                if seq < newest {
                    inner.remove(seq);
                    self.metrics.unmatched.inc();
                }
            }
        }
        // Facts this event's version outdated: an upsert that did not produce it never will; a
        // DELETE did not happen when the newer version is not being deleted.
        for seq in inner.select(key, |f| {
            same_uid(f) && decided(f) && (f.operation.is_upsert() || !seen.deleting)
        }) {
            inner.remove(seq);
            self.metrics.unmatched.inc();
        }
        self.metrics.held.set(inner.facts.len() as i64);
        author
    }

    /// The author of a DELETED watch event: the user of the DELETE facts of `key` naming `uid`
    /// (a deletecollection is admitted as one DELETE per object). `None` when there is no such
    /// fact or they name different users. Every other fact of this uid is dropped with it: the
    /// object is gone, so none of them can become state any more.
    pub fn attribute_delete(&self, key: &ObjectKey, uid: &str) -> Option<String> {
        let now = self.clock.now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        if uid.is_empty() {
            self.metrics.held.set(inner.facts.len() as i64);
            return None;
        }
        let same_uid = |f: &Fact| f.uid.as_deref() == Some(uid);
        let candidates = inner.select(key, |f| f.operation == Operation::Delete && same_uid(f));
        let author = if candidates.is_empty() {
            None
        } else {
            self.decide(&inner, &candidates)
        };
        for seq in inner.select(key, same_uid) {
            inner.remove(seq);
            if !candidates.contains(&seq) {
                self.metrics.unmatched.inc();
            }
        }
        self.metrics.held.set(inner.facts.len() as i64);
        author
    }

    /// One user among the candidates → that user; several → nobody (never guess).
    fn decide(&self, inner: &Inner, candidates: &[u64]) -> Option<String> {
        let mut users = candidates
            .iter()
            .filter_map(|seq| inner.facts.get(seq))
            .map(|h| h.fact.username.as_str());
        let first = users.next()?;
        if users.all(|u| u == first) {
            self.metrics.matches.inc();
            Some(first.to_owned())
        } else {
            self.metrics.ambiguous.inc();
            None
        }
    }
}

impl Attribution for FactStore {
    fn author_of_upsert(
        &self,
        key: &ObjectKey,
        object: &serde_json::Value,
        hash: &ContentHash,
    ) -> Option<AttributedUser> {
        self.attribute_watched_user(key, object, hash)
    }

    fn author_of_delete(&self, key: &ObjectKey, uid: &str) -> Option<String> {
        self.attribute_delete(key, uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(config: FactsConfig) -> (FactStore, ManualClock) {
        let clock = ManualClock::default();
        let store = FactStore::with_clock(
            config,
            AttributionMetrics::new().unwrap(),
            Arc::new(clock.clone()),
        );
        (store, clock)
    }

    fn cm(name: &str) -> ObjectKey {
        ObjectKey::new("", "configmaps", "shop", name)
    }

    fn upsert(name: &str, user: &str, uid: &str, hash: u8) -> Fact {
        Fact {
            key: cm(name),
            operation: Operation::Update,
            username: user.into(),
            groups: vec!["system:authenticated".into()],
            uid: Some(uid.into()),
            content_hash: Some([hash; 32]),
            base_version: None,
            scale_replicas: None,
        }
    }

    fn delete(name: &str, user: &str, uid: &str) -> Fact {
        Fact {
            operation: Operation::Delete,
            content_hash: None,
            ..upsert(name, user, uid, 0)
        }
    }

    #[test]
    fn matches_an_upsert_by_identity_and_content() {
        let (store, _) = store(FactsConfig::default());
        store.record(upsert("a", "alice", "u1", 1));
        assert_eq!(store.attribute_upsert(&cm("b"), Some("u1"), &[1; 32]), None);
        assert_eq!(store.attribute_upsert(&cm("a"), Some("u1"), &[2; 32]), None);
        assert_eq!(
            store.attribute_upsert(&cm("a"), Some("u1"), &[1; 32]),
            Some("alice".into())
        );
        assert!(store.is_empty(), "a matched fact is consumed");
        assert_eq!(store.metrics().matches.get(), 1);
    }

    #[test]
    fn a_fact_matches_only_once() {
        let (store, _) = store(FactsConfig::default());
        store.record(upsert("a", "alice", "u1", 1));
        assert!(store.attribute_upsert(&cm("a"), None, &[1; 32]).is_some());
        assert_eq!(store.attribute_upsert(&cm("a"), None, &[1; 32]), None);
    }

    #[test]
    fn does_not_match_another_incarnation_of_the_same_name() {
        let (store, _) = store(FactsConfig::default());
        store.record(upsert("a", "alice", "old-uid", 1));
        assert_eq!(
            store.attribute_upsert(&cm("a"), Some("new-uid"), &[1; 32]),
            None
        );
    }

    #[test]
    fn different_users_with_the_same_content_are_left_to_the_bot() {
        let (store, _) = store(FactsConfig::default());
        store.record(upsert("a", "alice", "u1", 1));
        store.record(upsert("a", "bob", "u1", 1));
        assert_eq!(store.attribute_upsert(&cm("a"), Some("u1"), &[1; 32]), None);
        assert_eq!(store.metrics().ambiguous.get(), 1);
        assert!(store.is_empty());
    }

    #[test]
    fn repeated_attempts_of_one_user_still_match() {
        let (store, _) = store(FactsConfig::default());
        store.record(upsert("a", "alice", "u1", 1));
        store.record(upsert("a", "alice", "u1", 1));
        assert_eq!(
            store.attribute_upsert(&cm("a"), Some("u1"), &[1; 32]),
            Some("alice".into())
        );
        assert!(store.is_empty());
    }

    #[test]
    fn a_match_retires_older_upsert_facts_of_the_object_but_not_newer_ones() {
        let (store, _) = store(FactsConfig::default());
        store.record(upsert("a", "alice", "u1", 1)); // a no-op that never fired
        store.record(upsert("a", "carol", "u1", 2)); // became state
        store.record(upsert("a", "bob", "u1", 1)); // admitted after, not yet seen
        assert_eq!(
            store.attribute_upsert(&cm("a"), Some("u1"), &[2; 32]),
            Some("carol".into())
        );
        assert_eq!(store.metrics().unmatched.get(), 1);
        // Without the retirement alice and bob would be ambiguous here.
        assert_eq!(
            store.attribute_upsert(&cm("a"), Some("u1"), &[1; 32]),
            Some("bob".into())
        );
    }

    #[test]
    fn a_match_keeps_pending_delete_facts() {
        let (store, _) = store(FactsConfig::default());
        store.record(delete("a", "alice", "u1")); // held by a finalizer
        store.record(upsert("a", "bob", "u1", 2));
        assert!(
            store
                .attribute_upsert(&cm("a"), Some("u1"), &[2; 32])
                .is_some()
        );
        assert_eq!(store.attribute_delete(&cm("a"), "u1"), Some("alice".into()));
    }

    #[test]
    fn deletes_join_on_uid_and_drop_the_dead_objects_other_facts() {
        let (store, _) = store(FactsConfig::default());
        store.record(delete("a", "alice", "u1"));
        store.record(upsert("a", "finalizer-bot", "u1", 3));
        store.record(upsert("a", "carol", "u2", 3)); // a re-create under a new uid
        assert_eq!(store.attribute_delete(&cm("a"), "u0"), None);
        assert_eq!(store.attribute_delete(&cm("a"), "u1"), Some("alice".into()));
        assert_eq!(store.len(), 1);
        assert_eq!(store.metrics().unmatched.get(), 1);
        assert_eq!(
            store.attribute_upsert(&cm("a"), Some("u2"), &[3; 32]),
            Some("carol".into())
        );
    }

    #[test]
    fn upsert_facts_never_author_a_delete() {
        let (store, _) = store(FactsConfig::default());
        store.record(upsert("a", "alice", "u1", 1));
        assert_eq!(store.attribute_delete(&cm("a"), "u1"), None);
    }

    #[test]
    fn unmatched_facts_expire_after_the_ttl() {
        let (store, clock) = store(FactsConfig {
            ttl: Duration::from_secs(600),
            max_facts: 10,
        });
        store.record(upsert("a", "alice", "u1", 1));
        clock.advance(Duration::from_secs(599));
        store.record(upsert("b", "bob", "u2", 1));
        clock.advance(Duration::from_secs(1));
        store.sweep();
        assert_eq!(store.len(), 1);
        assert_eq!(store.metrics().unmatched.get(), 1);
        assert_eq!(store.attribute_upsert(&cm("a"), Some("u1"), &[1; 32]), None);
        assert_eq!(
            store.attribute_upsert(&cm("b"), Some("u2"), &[1; 32]),
            Some("bob".into())
        );
    }

    #[test]
    fn a_full_store_evicts_the_oldest_fact_and_counts_it() {
        let (store, _) = store(FactsConfig {
            ttl: Duration::from_secs(600),
            max_facts: 2,
        });
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            store.record(upsert(name, "alice", &format!("u{i}"), 1));
        }
        assert_eq!(store.len(), 2);
        assert_eq!(store.metrics().evictions.get(), 1);
        assert_eq!(store.metrics().held.get(), 2);
        assert_eq!(store.attribute_upsert(&cm("a"), None, &[1; 32]), None);
        assert!(store.attribute_upsert(&cm("c"), None, &[1; 32]).is_some());
    }

    fn based_on(fact: Fact, version: u64) -> Fact {
        Fact {
            base_version: Some(version),
            ..fact
        }
    }

    fn scale(name: &str, user: &str, uid: &str, base: u64, replicas: i64) -> Fact {
        Fact {
            content_hash: None,
            scale_replicas: Some(replicas),
            ..based_on(upsert(name, user, uid, 0), base)
        }
    }

    /// A watched object: uid, resourceVersion, `spec.replicas`, optionally being deleted.
    fn object(uid: &str, rv: u64, replicas: i64, deleting: bool) -> serde_json::Value {
        let mut o = serde_json::json!({
            "metadata": {"uid": uid, "resourceVersion": rv.to_string()},
            "spec": {"replicas": replicas}
        });
        if deleting {
            o["metadata"]["deletionTimestamp"] = "2026-06-25T10:00:00Z".into();
        }
        o
    }

    #[test]
    fn an_attempt_outdated_by_a_newer_version_never_authors_an_identical_change() {
        let (store, _) = store(FactsConfig::default());
        // Alice's update of version 5 to content 1 is denied by a later webhook.
        store.record(based_on(upsert("a", "alice", "u1", 1), 5));
        // Someone the webhook did not see writes content 2 (version 6): alice's attempt can
        // no longer become state, whatever comes next.
        let v6 = object("u1", 6, 1, false);
        assert_eq!(store.attribute_watched(&cm("a"), &v6, &[2; 32]), None);
        assert!(store.is_empty(), "{:?}", store.snapshot());
        assert_eq!(store.metrics().unmatched.get(), 1);
        // ... and then content 1 again (version 7), still unseen by the webhook: the bot's.
        let v7 = object("u1", 7, 1, false);
        assert_eq!(store.attribute_watched(&cm("a"), &v7, &[1; 32]), None);
        // Without lineage (the old join) alice's fact would have survived and matched here.
        store.record(upsert("a", "alice", "u1", 1));
        store.attribute_upsert(&cm("a"), Some("u1"), &[2; 32]);
        assert_eq!(
            store.attribute_upsert(&cm("a"), Some("u1"), &[1; 32]),
            Some("alice".into())
        );
    }

    #[test]
    fn an_outdated_attempt_does_not_make_a_later_users_identical_change_ambiguous() {
        let (store, _) = store(FactsConfig::default());
        store.record(based_on(upsert("a", "alice", "u1", 1), 5)); // denied
        let v6 = object("u1", 6, 1, false);
        assert_eq!(store.attribute_watched(&cm("a"), &v6, &[2; 32]), None);
        store.record(based_on(upsert("a", "bob", "u1", 1), 6));
        let v7 = object("u1", 7, 1, false);
        assert_eq!(
            store.attribute_watched(&cm("a"), &v7, &[1; 32]),
            Some("bob".into())
        );
    }

    #[test]
    fn an_event_not_newer_than_the_base_is_never_the_facts_result() {
        let (store, _) = store(FactsConfig::default());
        // A no-op-looking attempt on version 5 while the watch still delivers version 5.
        store.record(based_on(upsert("a", "alice", "u1", 1), 5));
        let v5 = object("u1", 5, 1, false);
        assert_eq!(store.attribute_watched(&cm("a"), &v5, &[1; 32]), None);
        assert_eq!(store.len(), 1, "kept: its result may still come");
        let v6 = object("u1", 6, 1, false);
        assert_eq!(
            store.attribute_watched(&cm("a"), &v6, &[1; 32]),
            Some("alice".into())
        );
    }

    #[test]
    fn a_delete_is_dropped_once_a_newer_version_is_not_being_deleted() {
        let (store, _) = store(FactsConfig::default());
        store.record(based_on(delete("a", "alice", "u1"), 5));
        // Held by a finalizer: the next version carries a deletionTimestamp; keep the fact.
        let v6 = object("u1", 6, 1, true);
        store.attribute_watched(&cm("a"), &v6, &[1; 32]);
        assert_eq!(store.len(), 1);
        assert_eq!(store.attribute_delete(&cm("a"), "u1"), Some("alice".into()));

        // Denied by another webhook: the next version is not being deleted.
        store.record(based_on(delete("b", "alice", "u2"), 5));
        let v6 = object("u2", 6, 1, false);
        store.attribute_watched(&cm("b"), &v6, &[1; 32]);
        assert!(store.is_empty());
        assert_eq!(store.attribute_delete(&cm("b"), "u2"), None);
    }

    #[test]
    fn a_scale_matches_the_parents_next_version_with_those_replicas() {
        let (store, _) = store(FactsConfig::default());
        store.record(scale("web", "alice", "u1", 5, 4));
        // The watch lagging: version 5 (the base) with 4 replicas already is not the result.
        let v5 = object("u1", 5, 4, false);
        assert_eq!(store.attribute_watched(&cm("web"), &v5, &[1; 32]), None);
        // Another incarnation of the name is not either.
        let other = object("u9", 6, 4, false);
        assert_eq!(store.attribute_watched(&cm("web"), &other, &[1; 32]), None);
        let v6 = object("u1", 6, 4, false);
        assert_eq!(
            store.attribute_watched(&cm("web"), &v6, &[2; 32]),
            Some("alice".into())
        );
        assert!(store.is_empty());
    }

    #[test]
    fn a_scale_that_did_not_become_the_next_version_authors_nothing() {
        let (store, _) = store(FactsConfig::default());
        store.record(scale("web", "alice", "u1", 5, 4));
        // The next version kept 2 replicas (the scale was denied): dropped at once.
        let v6 = object("u1", 6, 2, false);
        assert_eq!(store.attribute_watched(&cm("web"), &v6, &[1; 32]), None);
        assert!(store.is_empty());
        // A later version with 4 replicas written by someone unseen stays the bot's.
        let v7 = object("u1", 7, 4, false);
        assert_eq!(store.attribute_watched(&cm("web"), &v7, &[1; 32]), None);
        // Without a resourceVersion there is no lineage, and replicas alone prove nothing.
        store.record(scale("web", "alice", "u1", 7, 4));
        assert_eq!(
            store.attribute_upsert(&cm("web"), Some("u1"), &[1; 32]),
            None
        );
        let mut unversioned = object("u1", 8, 4, false);
        unversioned["metadata"]["resourceVersion"] = "not-a-number".into();
        assert_eq!(
            store.attribute_watched(&cm("web"), &unversioned, &[1; 32]),
            None
        );
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn displays_keys_like_mirrored_paths() {
        assert_eq!(cm("a").to_string(), "core/configmaps/shop/a");
        assert_eq!(
            ObjectKey::new("rbac.authorization.k8s.io", "clusterroles", "", "view").to_string(),
            "rbac.authorization.k8s.io/clusterroles/view"
        );
    }
}
