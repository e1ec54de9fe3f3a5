//! Counts the API requests the emulator answers, so tests and benchmarks can say how many requests a
//! client made (discovery, lists, watches) and in which scope.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// One kind of resource request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKind {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verb: String,
    /// `plural` for the core group, else `plural.group`.
    pub resource: String,
    /// A namespaced resource requested across all namespaces (`/api/v1/configmaps`).
    pub all_namespaces: bool,
}

/// Request counters; every API request (not the `/_emulator/` ones) counts once in `total`, and resource
/// requests once more by kind (refused ones included).
#[derive(Debug, Default)]
pub struct RequestCounter {
    total: AtomicU64,
    by_kind: Mutex<BTreeMap<RequestKind, u64>>,
}

/// A copy of the counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// Every API request: discovery, OpenAPI, resources.
    pub total: u64,
    pub by_kind: BTreeMap<RequestKind, u64>,
}

impl RequestCounts {
    /// Requests with this verb, over every resource and scope.
    pub fn verb(&self, verb: &str) -> u64 {
        self.by_kind
            .iter()
            .filter(|(k, _)| k.verb == verb)
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests with this verb on `resource` (`configmaps`, `deployments.apps`), `(all namespaces, one namespace)`.
    pub fn scoped(&self, verb: &str, resource: &str) -> (u64, u64) {
        self.by_kind
            .iter()
            .filter(|(k, _)| k.verb == verb && k.resource == resource)
            .fold((0, 0), |(all, one), (k, n)| {
                if k.all_namespaces {
                    (all + n, one)
                } else {
                    (all, one + n)
                }
            })
    }
}

impl RequestCounter {
    pub(crate) fn any(&self) {
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn resource(&self, verb: &str, group: &str, plural: &str, all_namespaces: bool) {
        let resource = if group.is_empty() {
            plural.to_owned()
        } else {
            format!("{plural}.{group}")
        };
        let kind = RequestKind {
            verb: verb.to_owned(),
            resource,
            all_namespaces,
        };
        *self
            .by_kind
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    pub(crate) fn counts(&self) -> RequestCounts {
        RequestCounts {
            total: self.total.load(Ordering::Relaxed),
            by_kind: self
                .by_kind
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    pub(crate) fn reset(&self) {
        let mut by_kind = self.by_kind.lock().unwrap_or_else(|p| p.into_inner());
        by_kind.clear();
        self.total.store(0, Ordering::Relaxed);
    }
}
