//! What the ingestion supervisor shares with its watch tasks: the settings ([`IngestConfig`]), the counters
//! ([`IngestMetrics`]), each watch's status ([`WatchStatus`]) and the per-type clients. A child of `ingest` so
//! that the watch tasks ([`super::watch`]) and the supervisor (`ingest/mod.rs`) both import it and neither
//! imports the other back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use super::discovery::{DiscoveryOptions, WatchKey};
use super::limits::{self, ListPermits, RequestRate};
use crate::attribution::Attribution;
use crate::events::AgentEvent;
use crate::rules::{ResourceKey, SelectionOptions};

/// Ingestion settings (flags).
#[derive(Clone, Debug)]
pub struct IngestConfig {
    pub discovery: DiscoveryOptions,
    /// Opt-ins for derived objects (controller-owned, `kube-root-ca.crt`).
    pub selection_options: SelectionOptions,
    /// How often discovery runs to find new types (CRDs) and drop removed ones.
    pub discovery_refresh: Duration,
    /// How long a type missing from discovery keeps its watch: discovery of aggregated APIs
    /// blinks, and a restart would relist for nothing.
    pub vanish_grace: Duration,
    pub initial_list: InitialList,
    /// Watch restart backoff bounds.
    pub watch_backoff: (Duration, Duration),
    /// Discovery failure backoff bounds.
    pub discovery_backoff: (Duration, Duration),
    /// Admission facts to name the author of each change (`None`: every change is the bot's).
    pub attribution: Option<Arc<dyn Attribution>>,
    /// Requests per second (and burst) of each watched type towards the API server.
    pub request_rate: RequestRate,
    /// Lists in flight at once, over every watch.
    pub list_permits: ListPermits,
    /// Counters to add to (the process's, registered once); `None`: counters of this ingestion alone.
    pub metrics: Option<Arc<IngestMetrics>>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            discovery: DiscoveryOptions::default(),
            selection_options: SelectionOptions::default(),
            discovery_refresh: Duration::from_secs(300),
            vanish_grace: Duration::from_secs(60),
            initial_list: InitialList::default(),
            watch_backoff: (Duration::from_millis(500), Duration::from_secs(30)),
            discovery_backoff: (Duration::from_secs(1), Duration::from_secs(60)),
            attribution: None,
            request_rate: RequestRate::default(),
            list_permits: ListPermits::default(),
            metrics: None,
        }
    }
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// Completed discovery runs.
    pub discovery_runs: AtomicU64,
    /// Failed discovery runs (`discovery_errors_total`).
    pub discovery_errors: AtomicU64,
    /// Errors reported by any watch (each is retried with backoff).
    pub watch_errors: AtomicU64,
    /// Watches currently running.
    pub active_watches: AtomicU64,
    /// Sensitive objects not sent because encrypting them was refused (too large) or failed, per
    /// destination (`encryption_failures_total`).
    pub encryption_failures: AtomicU64,
    /// Snapshot ends not sent because an object of their scope could not be sent
    /// (`snapshots_withheld_total`): the writer deletes nothing in those scopes.
    pub snapshots_withheld: AtomicU64,
    /// Per resource (`plural` for the core group, else `plural.group`), over all its watches.
    per_resource: Mutex<BTreeMap<String, Arc<ResourceCounters>>>,
}

/// Counters of one resource type, summed over its watches (one per namespace or cluster-wide).
#[derive(Debug, Default)]
pub struct ResourceCounters {
    /// Objects seen by lists and watches (listed, added, modified, deleted), Secrets and
    /// derived objects included: what ingestion looked at, not what it sent.
    pub objects_scanned: AtomicU64,
    /// Watches re-established after an error or an ended stream (each is retried with backoff).
    pub watch_restarts: AtomicU64,
    /// Lists after a watch's first one: a 410 Gone, a desync, a streaming-list fallback.
    pub relists: AtomicU64,
}

/// Plain values of [`ResourceCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourceTotals {
    pub objects_scanned: u64,
    pub watch_restarts: u64,
    pub relists: u64,
}

impl ResourceTotals {
    pub fn add(&mut self, other: &ResourceTotals) {
        self.objects_scanned += other.objects_scanned;
        self.watch_restarts += other.watch_restarts;
        self.relists += other.relists;
    }
}

impl IngestMetrics {
    /// The counters of one resource label (created on first use).
    pub fn resource(&self, label: &str) -> Arc<ResourceCounters> {
        let mut map = self.per_resource.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(label.to_owned()).or_default())
    }

    /// Current values per resource label.
    pub fn per_resource(&self) -> BTreeMap<String, ResourceTotals> {
        let map = self.per_resource.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(label, c)| {
                (
                    label.clone(),
                    ResourceTotals {
                        objects_scanned: c.objects_scanned.load(Ordering::Relaxed),
                        watch_restarts: c.watch_restarts.load(Ordering::Relaxed),
                        relists: c.relists.load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }
}

/// State shared by the supervisor and the watch tasks.
pub(crate) struct Shared {
    pub(crate) config: IngestConfig,
    pub(crate) tx: mpsc::Sender<AgentEvent>,
    /// Epoch numbers, shared by all watches so they only grow on a stream.
    pub(crate) epochs: AtomicU64,
    pub(crate) metrics: Arc<IngestMetrics>,
    pub(crate) status: Mutex<BTreeMap<WatchKey, WatchStatus>>,
    /// The types with a running watch; `None` until the first reconcile.
    pub(crate) watched_types: Mutex<Option<BTreeSet<ResourceKey>>>,
    /// One rate-limited client per watched type (its watches in several namespaces share the budget).
    pub(crate) clients_per_type: Mutex<BTreeMap<String, kube::Client>>,
    /// `(group, resource)` whose cluster-wide list was forbidden: planned per namespace from then on.
    pub(crate) cluster_list_forbidden: Mutex<BTreeSet<(String, String)>>,
    /// Wakes the supervisor to plan again (a type's cluster-wide list was forbidden).
    pub(crate) replan: Notify,
}

impl Shared {
    /// The client of a watched type: `base` behind the type's own request budget.
    pub(crate) fn client_for(&self, base: &kube::Client, type_label: &str) -> kube::Client {
        let mut clients = self
            .clients_per_type
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        clients
            .entry(type_label.to_owned())
            .or_insert_with(|| limits::rate_limited_client(base, self.config.request_rate))
            .clone()
    }

    /// Records that a type's cluster-wide list is forbidden and has the supervisor plan it per namespace; `false`
    /// when it was already known.
    pub(crate) fn cluster_list_forbidden(&self, group_resource: (String, String)) -> bool {
        let added = self
            .cluster_list_forbidden
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group_resource);
        if added {
            self.replan.notify_one();
        }
        added
    }

    pub(crate) fn update_status(&self, key: &WatchKey, f: impl FnOnce(&mut WatchStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = status.get_mut(key) {
            f(s);
        }
    }
}

/// How the initial list is fetched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitialList {
    /// A streaming list (`sendInitialEvents=true`), falling back to a paged list when the server
    /// refuses it (400/422: the WatchList feature is off or unknown).
    #[default]
    StreamingWithFallback,
    /// Always a paged list followed by a watch.
    Paged,
}

/// What a watch reports about itself (readiness, debugging, tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchStatus {
    /// Completed snapshots (list or relist reached its end).
    pub snapshots_completed: u64,
    /// The last error since the last success, if any.
    pub last_error: Option<String>,
    /// The last error was a 403 (RBAC denies list or watch).
    pub forbidden: bool,
    /// Errors seen in total.
    pub errors: u64,
    /// Whether the initial list is streamed.
    pub streaming: bool,
    /// Sensitive objects that could not be encrypted (too large, or encryption failed), per destination.
    pub encryption_failures: u64,
    /// Snapshot ends withheld because an object of their scope could not be sent.
    pub snapshots_withheld: u64,
    /// The last object that could not be sent: its path, destination, plaintext size and why (never content).
    pub last_unsent: Option<String>,
}
