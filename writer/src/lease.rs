//! Per-worker Kubernetes Lease (seed Appendix K): a `coordination.k8s.io/v1` Lease named after the worker id
//! (hash of repository URL and branch) in the writer's namespace. A worker writes only while it holds its Lease,
//! so two writers pointed at the same branch never push concurrently.
//!
//! The claim loop, its safety margin and the release on shutdown are `reverser_common::lease` (shared with the
//! agent's leader election); this module only names the Lease per worker. When a worker ends it drops its
//! receiver and the loop releases the Lease, so a successor writer takes over at its next attempt.

use std::time::Duration;

use kube::Client;
use reverser_common::lease::{self, LeaseConfig};
use tokio::{sync::watch, task::JoinHandle};

pub use reverser_common::lease::LeaseState;

/// Lease settings shared by all workers.
#[derive(Clone)]
pub struct LeaseSettings {
    pub client: Client,
    pub namespace: String,
    /// This writer's identity (Pod name or hostname plus a random suffix).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// A Role in `namespace` that owns every worker Lease (`--lease-owner-role`).
    pub owner_role: Option<String>,
}

impl std::fmt::Debug for LeaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseSettings")
            .field("namespace", &self.namespace)
            .field("identity", &self.identity)
            .field("lease_duration", &self.lease_duration)
            .field("renew_every", &self.renew_every)
            .field("owner_role", &self.owner_role)
            .finish()
    }
}

/// Starts the claim loop of one worker's Lease. The task ends (releasing the Lease) once the receiver is dropped.
pub fn spawn(
    settings: LeaseSettings,
    worker_id: String,
) -> (watch::Receiver<LeaseState>, JoinHandle<()>) {
    lease::spawn(
        settings.client,
        LeaseConfig {
            namespace: settings.namespace,
            name: worker_id,
            identity: settings.identity,
            lease_duration: settings.lease_duration,
            renew_every: settings.renew_every,
            owner_role: settings.owner_role,
        },
    )
}
