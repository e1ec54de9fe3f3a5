//! The object store: every object as a JSON value keyed by (group, resource, namespace,
//! name), one global monotonically increasing resourceVersion, and a bounded history of
//! change events that watches replay and consistent (paginated or `Exact`) lists roll back.
//!
//! Everything here is synchronous and runs under one `RwLock`; async callers never hold the
//! lock across an await. Watchers learn about new events through a `tokio::sync::watch`
//! channel carrying the latest resourceVersion.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use serde_json::Value;

use crate::resources::Registry;

/// Objects of one resource are contiguous in the map, ordered by namespace then name,
/// like etcd keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(group: &str, plural: &str, namespace: &str, name: &str) -> Self {
        Key {
            group: group.to_string(),
            plural: plural.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn same_resource(&self, group: &str, plural: &str) -> bool {
        self.group == group && self.plural == plural
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change. `prev` is the object before the change (for rollbacks and for
/// selector transitions in watches).
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    pub key: Key,
    pub object: Arc<Value>,
    pub prev: Option<Arc<Value>>,
    json: OnceLock<Bytes>,
}

impl Event {
    /// The object serialized once and shared by every watcher.
    pub fn object_json(&self) -> Bytes {
        self.json
            .get_or_init(|| Bytes::from(serde_json::to_vec(&*self.object).unwrap_or_default()))
            .clone()
    }
}

/// Asked for a resourceVersion older than the retained history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too old resource version: {requested} ({oldest})")]
pub struct TooOld {
    pub requested: u64,
    pub oldest: u64,
}

#[derive(Debug)]
pub struct State {
    objects: BTreeMap<Key, Arc<Value>>,
    pub registry: Registry,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    /// A watch or list may start from any rv >= this one.
    history_start: u64,
    /// The rv a forced compaction jumped to; open watches that had seen everything before it
    /// continue (as they would on etcd), resumes from older rvs get 410.
    compaction_floor: u64,
    history_limit: usize,
}

impl State {
    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn history_start(&self) -> u64 {
        self.history_start
    }

    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    pub fn object_count(&self) -> usize {
        self.objects.len()
    }

    pub fn get(&self, key: &Key) -> Option<&Arc<Value>> {
        self.objects.get(key)
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, kind: EventType, key: Key, object: Arc<Value>, prev: Option<Arc<Value>>) {
        let ev = Arc::new(Event {
            rv: self.rv,
            kind,
            key,
            object,
            prev,
            json: OnceLock::new(),
        });
        self.history.push_back(ev);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.history_start = old.rv;
            }
        }
    }

    /// Stores `obj` under `key` with a fresh resourceVersion and records ADDED/MODIFIED.
    pub fn put(&mut self, key: Key, mut obj: Value) -> Arc<Value> {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let obj = Arc::new(obj);
        let prev = self.objects.insert(key.clone(), obj.clone());
        let kind = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(kind, key, obj.clone(), prev);
        obj
    }

    /// Removes `key`; the DELETED event carries the object at the deletion's resourceVersion.
    pub fn remove(&mut self, key: &Key) -> Option<Arc<Value>> {
        let prev = self.objects.remove(key)?;
        let rv = self.next_rv();
        let mut gone = (*prev).clone();
        gone["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let gone = Arc::new(gone);
        self.record(EventType::Deleted, key.clone(), gone.clone(), Some(prev));
        Some(gone)
    }

    /// Forgets all history: every resume from an rv seen so far gets 410 Expired.
    pub fn compact(&mut self) {
        let rv = self.next_rv();
        self.history.clear();
        self.history_start = rv;
        self.compaction_floor = rv;
    }

    /// Events after `last` (all resources), at most `max`. `established` watches that were
    /// fully caught up at a forced compaction may continue across it.
    pub fn events_after(
        &self,
        last: u64,
        max: usize,
        established: bool,
    ) -> Result<(Vec<Arc<Event>>, u64), TooOld> {
        let mut last = last;
        if last < self.history_start {
            let caught_up_at_compaction = established
                && self.history_start == self.compaction_floor
                && last + 1 == self.compaction_floor;
            if !caught_up_at_compaction {
                return Err(TooOld {
                    requested: last,
                    oldest: self.history_start,
                });
            }
            last = self.compaction_floor;
        }
        let i = self.history.partition_point(|e| e.rv <= last);
        let evs: Vec<_> = self.history.range(i..).take(max).cloned().collect();
        // Unless truncated, the caller has now seen everything up to the current rv.
        let progressed = match evs.last() {
            Some(e) if evs.len() == max => e.rv,
            _ => self.rv.max(last),
        };
        Ok((evs, progressed))
    }

    pub fn check_rv(&self, rv: u64) -> Result<(), TooOld> {
        if rv < self.history_start {
            Err(TooOld {
                requested: rv,
                oldest: self.history_start,
            })
        } else {
            Ok(())
        }
    }

    /// Visits the objects of `group/plural` (in `namespace`, if given) in key order, starting
    /// after `after`, as they were at resourceVersion `at` (rolled back through the history),
    /// until `f` returns false.
    pub fn scan(
        &self,
        group: &str,
        plural: &str,
        namespace: Option<&str>,
        after: Option<(&str, &str)>,
        at: u64,
        mut f: impl FnMut(&Key, &Arc<Value>) -> bool,
    ) -> Result<(), TooOld> {
        let start = Key::new(
            group,
            plural,
            after.map(|a| a.0).or(namespace).unwrap_or(""),
            after.map(|a| a.1).unwrap_or(""),
        );
        let lower = if after.is_some() {
            Bound::Excluded(start)
        } else {
            Bound::Included(start)
        };
        let in_scope = |k: &Key| {
            k.same_resource(group, plural) && namespace.is_none_or(|ns| k.namespace == ns)
        };

        // Rolling back: the state at `at` of every key changed since then.
        let mut overrides: BTreeMap<Key, Option<Arc<Value>>> = BTreeMap::new();
        if at < self.rv {
            self.check_rv(at)?;
            let i = self.history.partition_point(|e| e.rv <= at);
            for ev in self.history.range(i..).rev() {
                if !in_scope(&ev.key) {
                    continue;
                }
                let before = match ev.kind {
                    EventType::Added => None,
                    EventType::Modified | EventType::Deleted => ev.prev.clone(),
                };
                overrides.insert(ev.key.clone(), before);
            }
        }

        let mut current = self
            .objects
            .range((lower.clone(), Bound::Unbounded))
            .take_while(|(k, _)| in_scope(k))
            .peekable();
        let mut past = overrides
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| in_scope(k))
            .peekable();
        loop {
            let next = match (current.peek(), past.peek()) {
                (None, None) => return Ok(()),
                (Some(_), None) => {
                    let (k, v) = current.next().expect("peeked");
                    Some((k, v))
                }
                (None, Some(_)) => {
                    let (k, v) = past.next().expect("peeked");
                    v.as_ref().map(|v| (k, v))
                }
                (Some((ck, _)), Some((pk, _))) => {
                    if ck < pk {
                        current.next()
                    } else {
                        if ck == pk {
                            current.next();
                        }
                        let (k, v) = past.next().expect("peeked");
                        v.as_ref().map(|v| (k, v))
                    }
                }
            };
            if let Some((k, v)) = next
                && !f(k, v)
            {
                return Ok(());
            }
        }
    }

    /// How many objects of `group/plural` (in `namespace`, if given) come after `after` in
    /// the current state; a tight count for `remainingItemCount`.
    pub fn count_after(
        &self,
        group: &str,
        plural: &str,
        namespace: Option<&str>,
        after: (&str, &str),
    ) -> u64 {
        let start = Key::new(group, plural, after.0, after.1);
        self.objects
            .range((Bound::Excluded(start), Bound::Unbounded))
            .take_while(|(k, _)| {
                k.same_resource(group, plural) && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .count() as u64
    }

    /// All keys in `namespace`, of any resource (for namespace deletion).
    pub fn keys_in_namespace(&self, namespace: &str) -> Vec<Key> {
        self.objects
            .keys()
            .filter(|k| k.namespace == namespace)
            .cloned()
            .collect()
    }

    /// All keys of a resource.
    pub fn keys_of(&self, group: &str, plural: &str) -> Vec<Key> {
        let start = Key::new(group, plural, "", "");
        self.objects
            .range(start..)
            .take_while(|(k, _)| k.same_resource(group, plural))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// The shared store handle.
#[derive(Debug)]
pub struct Store {
    state: RwLock<State>,
    latest: tokio::sync::watch::Sender<u64>,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Store {
            state: RwLock::new(State {
                objects: BTreeMap::new(),
                registry: Registry::default(),
                rv: 0,
                history: VecDeque::new(),
                history_start: 0,
                compaction_floor: 0,
                history_limit: history_limit.max(1),
            }),
            latest: tokio::sync::watch::channel(0).0,
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (writes are single inserts).
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` under the write lock and wakes watchers if it committed anything.
    pub fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, rv) = {
            let mut guard: RwLockWriteGuard<'_, State> =
                self.state.write().unwrap_or_else(|p| p.into_inner());
            let out = f(&mut guard);
            (out, guard.rv)
        };
        self.latest.send_if_modified(|cur| {
            let changed = *cur != rv;
            *cur = rv;
            changed
        });
        out
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cm(name: &str, v: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns"}, "data": {"v": v}})
    }

    fn names_at(s: &State, at: u64) -> Vec<String> {
        let mut out = Vec::new();
        s.scan("", "configmaps", Some("ns"), None, at, |k, v| {
            out.push(format!("{}={}", k.name, v["data"]["v"].as_str().unwrap()));
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn resource_version_increases_on_every_write() {
        let store = Store::new(100);
        let a = store.write(|s| s.put(Key::new("", "configmaps", "ns", "a"), cm("a", "1")));
        let b = store.write(|s| s.put(Key::new("", "configmaps", "ns", "b"), cm("b", "1")));
        assert_eq!(a["metadata"]["resourceVersion"], "1");
        assert_eq!(b["metadata"]["resourceVersion"], "2");
        assert_eq!(*store.subscribe().borrow(), 2);
    }

    #[test]
    fn scan_at_an_old_resource_version_rolls_back_later_changes() {
        let store = Store::new(100);
        let k = |n: &str| Key::new("", "configmaps", "ns", n);
        store.write(|s| {
            s.put(k("a"), cm("a", "1"));
            s.put(k("b"), cm("b", "1"));
            s.put(k("c"), cm("c", "1"));
        });
        let at = store.read().rv();
        store.write(|s| {
            s.put(k("a"), cm("a", "2"));
            s.remove(&k("b"));
            s.put(k("d"), cm("d", "1"));
        });
        let s = store.read();
        assert_eq!(names_at(&s, at), ["a=1", "b=1", "c=1"]);
        assert_eq!(names_at(&s, s.rv()), ["a=2", "c=1", "d=1"]);
    }

    #[test]
    fn bounded_history_makes_old_resource_versions_too_old() {
        let store = Store::new(2);
        for i in 0..5 {
            store.write(|s| {
                s.put(
                    Key::new("", "configmaps", "ns", "a"),
                    cm("a", &i.to_string()),
                )
            });
        }
        let s = store.read();
        assert_eq!(s.history_len(), 2);
        assert!(s.events_after(1, 10, false).is_err());
        assert_eq!(s.events_after(3, 10, false).unwrap().0.len(), 2);
    }

    #[test]
    fn compaction_expires_resumes_but_not_caught_up_watches() {
        let store = Store::new(100);
        store.write(|s| s.put(Key::new("", "configmaps", "ns", "a"), cm("a", "1")));
        store.write(|s| s.compact());
        let s = store.read();
        assert!(
            s.events_after(1, 10, false).is_err(),
            "a resume from rv 1 expires"
        );
        assert!(
            s.events_after(1, 10, true).is_ok(),
            "an open, caught-up watch continues"
        );
        assert!(
            s.events_after(0, 10, true).is_err(),
            "a lagging watch expires"
        );
    }
}
