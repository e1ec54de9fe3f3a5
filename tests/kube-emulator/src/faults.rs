//! Fault hooks: ways for a test to make the emulator misbehave like a real, busy or
//! misconfigured API server. Each is also reachable over HTTP under `/_emulator/`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::store::Store;

/// Which resource a fault targets: `configmaps` (core) or `deployments.apps`.
fn parse_resource(resource: &str) -> (String, String) {
    match resource.split_once('.') {
        Some((plural, group)) => (group.to_string(), plural.to_string()),
        None => (String::new(), resource.to_string()),
    }
}

#[derive(Debug, Default)]
struct FaultState {
    /// (group, plural) → (remaining failures, HTTP code).
    fail_next: HashMap<(String, String), (u32, u16)>,
    forbidden: Vec<(String, String)>,
    /// Forbidden across all namespaces only (namespaced RBAC): requests in one namespace pass.
    forbidden_in_all_namespaces: Vec<(String, String)>,
    delay: Option<Duration>,
    hidden_groups: HashMap<String, Instant>,
}

/// Fault hooks; cheap to share, effective immediately for every later request.
#[derive(Debug, Clone)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
    store: Arc<Store>,
    close_watches: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Faults {
    pub(crate) fn new(store: Arc<Store>) -> Self {
        Faults {
            state: Arc::default(),
            store,
            close_watches: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the whole watch history (bumping the resourceVersion), so any watch or
    /// consistent list resumed from an earlier resourceVersion gets 410 Expired. Open watches
    /// that had seen everything keep going, as on etcd.
    pub fn compact_history(&self) {
        self.store.write(|s| s.compact());
    }

    /// Ends every open watch stream cleanly (clients reconnect with their last resourceVersion).
    pub fn close_watches(&self) {
        self.close_watches.send_modify(|g| *g += 1);
    }

    pub(crate) fn watch_closer(&self) -> tokio::sync::watch::Receiver<u64> {
        self.close_watches.subscribe()
    }

    /// The next `count` requests for `resource` (`configmaps`, `leases.coordination.k8s.io`)
    /// fail with `code` (500 or 429; 429 carries `Retry-After: 1`).
    pub fn fail_next(&self, resource: &str, count: u32, code: u16) {
        let key = parse_resource(resource);
        let mut s = self.lock();
        if count == 0 {
            s.fail_next.remove(&key);
        } else {
            s.fail_next.insert(key, (count, code));
        }
    }

    /// Delays every API response (not the `/_emulator/` ones) by `delay`; `Duration::ZERO` stops.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = (!delay.is_zero()).then_some(delay);
    }

    /// Answers 403 Forbidden for every request on `resource`, as RBAC would.
    pub fn forbid(&self, resource: &str) {
        let r = parse_resource(resource);
        let mut s = self.lock();
        if !s.forbidden.contains(&r) {
            s.forbidden.push(r);
        }
    }

    /// Answers 403 Forbidden for requests on `resource` across all namespaces (`/api/v1/configmaps`), as RBAC
    /// would for an identity bound to Roles in some namespaces only; requests in one namespace pass.
    pub fn forbid_in_all_namespaces(&self, resource: &str) {
        let r = parse_resource(resource);
        let mut s = self.lock();
        if !s.forbidden_in_all_namespaces.contains(&r) {
            s.forbidden_in_all_namespaces.push(r);
        }
    }

    /// Lifts [`Faults::forbid`] and [`Faults::forbid_in_all_namespaces`] for `resource`.
    pub fn allow(&self, resource: &str) {
        let r = parse_resource(resource);
        let mut s = self.lock();
        s.forbidden.retain(|f| *f != r);
        s.forbidden_in_all_namespaces.retain(|f| *f != r);
    }

    pub(crate) fn is_forbidden_in_all_namespaces(&self, group: &str, plural: &str) -> bool {
        self.lock()
            .forbidden_in_all_namespaces
            .iter()
            .any(|(g, p)| g == group && p == plural)
    }

    /// Leaves `group` out of discovery (legacy and aggregated) for `duration`; its resources
    /// are still served. `group` is `""` for the core group.
    pub fn hide_group(&self, group: &str, duration: Duration) {
        self.lock()
            .hidden_groups
            .insert(group.to_string(), Instant::now() + duration);
    }

    pub fn unhide_group(&self, group: &str) {
        self.lock().hidden_groups.remove(group);
    }

    /// Clears every fault (delays, pending failures, denials, hidden groups).
    pub fn reset(&self) {
        *self.lock() = FaultState::default();
    }

    pub(crate) fn is_hidden(&self, group: &str) -> bool {
        let mut s = self.lock();
        match s.hidden_groups.get(group) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                s.hidden_groups.remove(group);
                false
            }
            None => false,
        }
    }

    pub(crate) fn delay(&self) -> Option<Duration> {
        self.lock().delay
    }

    pub(crate) fn is_forbidden(&self, group: &str, plural: &str) -> bool {
        self.lock()
            .forbidden
            .iter()
            .any(|(g, p)| g == group && p == plural)
    }

    /// Consumes one pending failure for the resource, if any.
    pub(crate) fn take_failure(&self, group: &str, plural: &str) -> Option<u16> {
        let mut s = self.lock();
        let key = (group.to_string(), plural.to_string());
        let (left, code) = s.fail_next.get_mut(&key)?;
        let code = *code;
        *left -= 1;
        if *left == 0 {
            s.fail_next.remove(&key);
        }
        Some(code)
    }
}
