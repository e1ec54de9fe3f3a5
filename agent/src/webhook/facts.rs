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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::AttributionMetrics;

/// SHA-256 of an object's canonical YAML (see [`crate::canonical::content_hash`]).
pub type ContentHash = [u8; 32];

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

/// Which object a fact or watch event is about. `resource` is the plural as in the webhook's
/// `request.resource` and the watch's resource; `namespace` is empty for cluster-scoped objects.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(group: &str, resource: &str, namespace: &str, name: &str) -> Self {
        Self {
            group: group.to_owned(),
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{group}/{}/", self.resource)?;
        if !self.namespace.is_empty() {
            write!(f, "{}/", self.namespace)?;
        }
        f.write_str(&self.name)
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
    /// Hash of the sanitized canonical object as admitted; `None` for DELETE.
    pub content_hash: Option<ContentHash>,
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
    /// canonical content hashes to `hash`: the user of the CREATE/UPDATE facts of `key` with
    /// exactly this content (and this uid, when both know it). `None` when there is no such
    /// fact or they name different users.
    ///
    /// Call it once per watch event, whether or not the event changes the mirrored file: a
    /// matched no-op is consumed instead of lingering.
    pub fn attribute_upsert(
        &self,
        key: &ObjectKey,
        uid: Option<&str>,
        hash: &ContentHash,
    ) -> Option<String> {
        let now = self.clock.now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        let uid = uid.filter(|u| !u.is_empty());
        let candidates = inner.select(key, |f| {
            f.operation.is_upsert()
                && f.content_hash.as_ref() == Some(hash)
                && match (uid, f.uid.as_deref()) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        });
        let Some(&newest) = candidates.last() else {
            self.metrics.held.set(inner.facts.len() as i64);
            return None;
        };
        let author = self.decide(&inner, &candidates);
        for seq in &candidates {
            inner.remove(*seq);
        }
        // Upsert facts admitted before the newest match can no longer become state.
        for seq in inner.select(key, |f| f.operation.is_upsert()) {
            if seq < newest {
                inner.remove(seq);
                self.metrics.unmatched.inc();
            }
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

    #[test]
    fn displays_keys_like_mirrored_paths() {
        assert_eq!(cm("a").to_string(), "core/configmaps/shop/a");
        assert_eq!(
            ObjectKey::new("rbac.authorization.k8s.io", "clusterroles", "", "view").to_string(),
            "rbac.authorization.k8s.io/clusterroles/view"
        );
    }
}
