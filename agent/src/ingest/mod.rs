//! Ingestion: discovery → selection → one List+Watch per selected (type, scope) → canonical YAML
//! → [`AgentEvent`]s on a bounded channel.
//!
//! ```text
//!            ┌──────────── supervisor task (spawn) ─────────────┐
//! API server │ discover() every 5 min or on refresh_discovery()  │  Selection (watch channel,
//!  ─────────▶│   (backoff 1 s..60 s + jitter on failure,          │◀─ from the CRDs: resolve)
//!            │    a vanished type is kept for `vanish_grace`)      │
//!            │ desired_watches(discovered, selection, options)    │
//!            │ diff with running watches: start / stop / restart  │
//!            │ restart_snapshots(): every watch relists, anew     │
//!            └───────┬───────────────────────────────┬───────────┘
//!                    │ Destination decls              │ one task per WatchPlan
//!                    ▼                                ▼
//!              mpsc::Sender<AgentEvent>  ◀──  watch::run: kube watcher → WatchIndex
//!              (bounded: a slow writer         (snapshot epochs, upserts, deletes,
//!               slows the watches down)         per-(destination, path) content hashes)
//! ```
//!
//! Safety rules carried through every module (upstream lessons): deletions happen only at a
//! completed snapshot boundary, scoped to that snapshot's type and namespace; a failed list, a
//! 403 or a type that vanished from discovery never ends a snapshot; sensitive objects (core Secrets and the
//! `--sensitive-resources` types) are sent only SOPS-encrypted, and only to destinations with `spec.encryption`.
//!
//! - [`discovery`]: which types exist, and the pure planner of watches.
//! - [`crd_changes`]: a discovery run whenever a CRD is added, changed or deleted.
//! - [`watch`]: one watch task (the kube watcher, restarts, status).
//! - `shared`: the settings, counters and watch statuses the supervisor shares with its watch tasks.
//! - [`index`]: the pure event index of a watch ([`WatchIndex`]).
//! - [`raw`]: a watched object as the JSON the server sent (parsed once).
//! - [`backoff`]: exponential backoff with jitter (`reverser_common`'s, shared with the writer).

pub use reverser_common::backoff;
#[cfg(test)]
mod attribution_tests;
pub mod crd_changes;
mod discover;
/// Which types exist ([`discover`], over the network) and which watches to run (the pure planner of
/// `reverser_agent_core`).
pub mod discovery {
    pub use super::discover::{DiscoveryError, discover, from_discovery};
    pub use reverser_agent_core::ingest::discovery::*;
}
pub use reverser_agent_core::ingest::{WatchEvent, index};
pub mod limits;
mod metrics;
pub mod raw;
mod shared;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, watch as tokio_watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

pub use discovery::{
    DesiredWatches, DiscoveredResource, DiscoveryOptions, SkipReason, WatchKey, WatchPlan,
    desired_watches, desired_watches_with, discover,
};
pub use index::WatchIndex;
pub use limits::{ListPermits, RequestRate};
use shared::Shared;
pub use shared::{
    IngestConfig, IngestMetrics, InitialList, ResourceCounters, ResourceTotals, WatchStatus,
};

use crate::config::Selection;
use crate::events::{AgentEvent, DestinationDecl};
use crate::rules::ResourceKey;
use backoff::Backoff;

/// Handle to the running ingestion; dropping it stops every watch.
pub struct IngestHandle {
    refresh: Arc<Notify>,
    restart: Arc<Notify>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for IngestHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestHandle").finish_non_exhaustive()
    }
}

impl IngestHandle {
    /// Runs discovery now instead of at the next interval (e.g. after a CRD was created).
    pub fn refresh_discovery(&self) {
        self.refresh.notify_one();
    }

    /// Restarts every watch (each relists in a new snapshot epoch) and declares every destination again, without
    /// a new discovery: what a new connection to the writer needs, since the writer may have lost open snapshots.
    pub fn restart_snapshots(&self) {
        self.restart.notify_one();
    }

    pub fn metrics(&self) -> &IngestMetrics {
        &self.shared.metrics
    }

    /// Status of every running watch.
    pub fn watch_status(&self) -> BTreeMap<WatchKey, WatchStatus> {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The types watched now (any scope); `None` until ingestion planned its first watches.
    pub fn watched_types(&self) -> Option<BTreeSet<ResourceKey>> {
        self.shared
            .watched_types
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops discovery and every watch.
    pub async fn shutdown(mut self) {
        self.task.abort();
        // Waiting for the aborted supervisor means its watch tasks were aborted too.
        let _ = (&mut self.task).await;
    }
}

impl Drop for IngestHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts ingestion: discovery at once, then watches per the current selection. Events go to
/// `tx`; a full channel blocks the watches (backpressure), a closed one stops them.
pub fn spawn(
    client: kube::Client,
    config: IngestConfig,
    selection: tokio_watch::Receiver<Arc<Selection>>,
    tx: mpsc::Sender<AgentEvent>,
) -> IngestHandle {
    let metrics = config.metrics.clone().unwrap_or_default();
    let shared = Arc::new(Shared {
        config,
        tx,
        epochs: AtomicU64::new(0),
        metrics,
        status: Mutex::new(BTreeMap::new()),
        watched_types: Mutex::new(None),
        clients_per_type: Mutex::new(BTreeMap::new()),
        cluster_list_forbidden: Mutex::new(BTreeSet::new()),
        replan: Notify::new(),
    });
    let refresh = Arc::new(Notify::new());
    let restart = Arc::new(Notify::new());
    let task = tokio::spawn(supervise(
        client,
        Arc::clone(&shared),
        selection,
        Arc::clone(&refresh),
        Arc::clone(&restart),
    ));
    IngestHandle {
        refresh,
        restart,
        shared,
        task,
    }
}

/// Aborts the task when dropped, so that dropping the supervisor stops every watch.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Running {
    plan: Arc<WatchPlan>,
    _task: AbortOnDrop,
}

#[derive(Default)]
struct Supervisor {
    /// (group, resource) → the type and when discovery last listed it.
    known: HashMap<(String, String), (DiscoveredResource, Instant)>,
    /// (group, resource) → every version discovery listed it under while it was known: a version this
    /// process mirrored before stays superseded (and swept) after the server stops serving it.
    versions: HashMap<(String, String), BTreeSet<String>>,
    running: BTreeMap<WatchKey, Running>,
    declared: BTreeMap<String, DestinationDecl>,
    last_skipped: Vec<(crate::rules::ResourceKey, SkipReason)>,
    /// The last reconcile request handled per destination.
    reconcile_handled: BTreeMap<String, String>,
}

impl Supervisor {
    /// Records the versions discovery lists `res` under, and marks every other one seen so far superseded.
    fn with_versions_seen(&mut self, res: DiscoveredResource) -> DiscoveredResource {
        let seen = self.versions.entry(res.group_resource()).or_default();
        seen.insert(res.key.version.clone());
        seen.extend(res.superseded.iter().cloned());
        let seen = seen.clone();
        res.with_superseded(seen)
    }
}

async fn supervise(
    client: kube::Client,
    shared: Arc<Shared>,
    mut selection_rx: tokio_watch::Receiver<Arc<Selection>>,
    refresh: Arc<Notify>,
    restart: Arc<Notify>,
) {
    let config = shared.config.clone();
    let mut state = Supervisor::default();
    let mut backoff = Backoff::new(config.discovery_backoff.0, config.discovery_backoff.1);
    let mut next_discovery = Instant::now();
    let mut selection_open = true;
    loop {
        if Instant::now() >= next_discovery {
            match discover(&client).await {
                Ok(found) => {
                    let now = Instant::now();
                    for res in found {
                        let res = state.with_versions_seen(res);
                        state.known.insert(res.group_resource(), (res, now));
                    }
                    // Keep a vanished type for the grace period: a blink must not stop (and
                    // later relist) its watch, and must never delete anything.
                    state.known.retain(|_, (res, seen)| {
                        let keep = now.duration_since(*seen) < config.vanish_grace || *seen == now;
                        if !keep {
                            info!(group = %res.key.group, resource = %res.key.resource, "type left discovery; stopping its watch (files are kept)");
                        }
                        keep
                    });
                    let known = &state.known;
                    state.versions.retain(|gr, _| known.contains_key(gr));
                    shared
                        .metrics
                        .discovery_runs
                        .fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                    next_discovery = now + config.discovery_refresh;
                }
                Err(e) => {
                    shared
                        .metrics
                        .discovery_errors
                        .fetch_add(1, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in = ?delay, "discovery failed; keeping the known types");
                    next_discovery = Instant::now() + delay;
                }
            }
        }
        let selection = Arc::clone(&selection_rx.borrow_and_update());
        if reconcile(&client, &shared, &mut state, &selection)
            .await
            .is_err()
        {
            info!("event channel closed; stopping ingestion");
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_discovery) => {}
            _ = refresh.notified() => next_discovery = Instant::now(),
            _ = shared.replan.notified() => {}
            _ = restart.notified() => {
                // Dropping the running watches aborts them; the next reconcile starts them all again (new lists,
                // new epochs) and declares every destination again.
                info!(watches = state.running.len(), "restarting every watch for fresh snapshots");
                state.running.clear();
                state.declared.clear();
            }
            changed = selection_rx.changed(), if selection_open => {
                // Without a sender the last selection stays in force.
                selection_open = changed.is_ok();
            }
        }
    }
}

/// Declares destinations and brings the running watches in line with the plan.
async fn reconcile(
    client: &kube::Client,
    shared: &Arc<Shared>,
    state: &mut Supervisor,
    selection: &Selection,
) -> Result<(), mpsc::error::SendError<AgentEvent>> {
    let discovered: Vec<DiscoveredResource> =
        state.known.values().map(|(r, _)| r.clone()).collect();
    let forbidden = shared
        .cluster_list_forbidden
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let desired =
        desired_watches_with(&discovered, selection, &shared.config.discovery, &forbidden);
    if desired.skipped != state.last_skipped {
        discovery::log_skipped(&desired.skipped);
        state.last_skipped = desired.skipped.clone();
    }

    // Destinations first: the stream must know a destination before any change for it.
    for decl in &selection.destinations {
        if state.declared.get(&decl.key) != Some(decl) {
            shared
                .tx
                .send(AgentEvent::Destination(decl.clone()))
                .await?;
            state.declared.insert(decl.key.clone(), decl.clone());
        }
    }
    state
        .declared
        .retain(|key, _| selection.destination(key).is_some());

    // A new reconcile request restarts every watch feeding its destination (a fresh snapshot now).
    let requested: BTreeSet<&str> = selection
        .reconcile_requests
        .iter()
        .filter(|(dest, token)| state.reconcile_handled.get(*dest) != Some(*token))
        .map(|(dest, _)| dest.as_str())
        .collect();
    for dest in &requested {
        info!(destination = %dest, "reconcile requested; relisting the watches that feed it");
    }
    state.reconcile_handled = selection.reconcile_requests.clone();

    // A watch whose plan changed restarts: its relist opens new epochs for the new routes.
    let before = state.running.len();
    state.running.retain(|key, running| {
        let keep = desired.plans.get(key) == Some(&*running.plan)
            && !running
                .plan
                .routes
                .iter()
                .any(|route| requested.contains(route.destination.key.as_str()));
        if !keep {
            info!(watch = %key, "stopping watch");
        }
        keep
    });
    let stopped = before - state.running.len();
    {
        let mut status = shared.status.lock().unwrap_or_else(|p| p.into_inner());
        status.retain(|key, _| state.running.contains_key(key));
    }
    let mut started = 0;
    for (key, plan) in desired.plans {
        if state.running.contains_key(&key) {
            continue;
        }
        let plan = Arc::new(plan);
        shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), WatchStatus::default());
        let task = tokio::spawn(watch::run(
            client.clone(),
            Arc::clone(&plan),
            Arc::clone(shared),
        ));
        state.running.insert(
            key,
            Running {
                plan,
                _task: AbortOnDrop(task),
            },
        );
        started += 1;
    }
    if started > 0 || stopped > 0 {
        info!(
            started,
            stopped,
            running = state.running.len(),
            "watches reconciled"
        );
    }
    shared
        .metrics
        .active_watches
        .store(state.running.len() as u64, Ordering::Relaxed);
    let types: BTreeSet<ResourceKey> = state
        .running
        .values()
        .map(|r| r.plan.resource.key.clone())
        .collect();
    *shared
        .watched_types
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(types);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gizmos(version: &str) -> DiscoveredResource {
        DiscoveredResource::new("demo.example.com", version, "gizmos", "Gizmo", true)
    }

    #[test]
    fn a_version_mirrored_before_stays_superseded_after_the_server_stops_serving_it() {
        let mut state = Supervisor::default();
        let v1 = state.with_versions_seen(gizmos("v1"));
        assert!(v1.superseded.is_empty(), "{v1:?}");
        // v2 becomes preferred while v1 is still served.
        let v2 = state.with_versions_seen(gizmos("v2").with_superseded(["v1"]));
        assert_eq!(v2.superseded, BTreeSet::from(["v1".to_owned()]));
        // v1 is removed from the CRD: the files this process mirrored at v1 still get cleared.
        let v2 = state.with_versions_seen(gizmos("v2"));
        assert_eq!(v2.superseded, BTreeSet::from(["v1".to_owned()]));
        // Another resource of the group is not affected.
        let widgets = state.with_versions_seen(DiscoveredResource::new(
            "demo.example.com",
            "v2",
            "widgets",
            "Widget",
            true,
        ));
        assert!(widgets.superseded.is_empty());
        // Rolled back to v1: now v2's folder is the stale one.
        let back = state.with_versions_seen(gizmos("v1"));
        assert_eq!(back.superseded, BTreeSet::from(["v2".to_owned()]));
    }
}
