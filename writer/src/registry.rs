//! Destinations and the workers serving them. One worker per (repository URL, branch); a destination is bound
//! to the worker of its repository and branch. Declarations that would overlap another destination's base folder
//! on the same branch, or exceed the worker caps, are refused.
//!
//! With a writer configuration file every declaration names its client identity (`owner`): a destination belongs
//! to the client that declared it first (another client cannot take it over by claiming the same cluster and key),
//! and a worker started with credentials an agent sent serves only that agent's client.

use reverser_common::reasons::{ConditionReason, ConditionType, RejectReason};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tracing::info;

use crate::{
    credentials::CredentialStore,
    fencing::Terms,
    git::{self, RepoSpec},
    lease::{self, LeaseSettings},
    metrics::Metrics,
    model::{DestinationId, DestinationRef, DestinationSpec, Origin},
    worker::{self, WorkerHandle, WorkerSettings},
};

/// Why a declaration was refused. `reason()` is the machine-readable reason sent to the agent.
#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    #[error(
        "base folder {base_folder:?} overlaps {other_base_folder:?} of destination {other} on the same branch"
    )]
    Overlap {
        base_folder: String,
        other: String,
        other_base_folder: String,
    },
    #[error("the writer already runs {0} workers (--workers-max-global)")]
    GlobalWorkerLimit(usize),
    #[error("the writer already runs {0} workers for this repository (--workers-max-per-repo)")]
    RepoWorkerLimit(usize),
    #[error("credentials reference {0:?} names no entry of the writer's --git-credentials file")]
    UnknownCredentials(String),
    #[error("{0}")]
    Forbidden(String),
}

impl DeclareError {
    pub fn reason(&self) -> RejectReason {
        match self {
            DeclareError::Overlap { .. } => RejectReason::OverlappingBaseFolder,
            DeclareError::GlobalWorkerLimit(_) | DeclareError::RepoWorkerLimit(_) => {
                RejectReason::WorkerLimitReached
            }
            DeclareError::UnknownCredentials(_) => RejectReason::UnknownCredentials,
            DeclareError::Forbidden(_) => RejectReason::Forbidden,
        }
    }

    /// How the refusal shows as a condition: an overlap is an ownership conflict, the rest make it not Ready.
    pub fn condition(&self) -> (ConditionType, ConditionReason) {
        match self {
            DeclareError::Overlap { .. } => (
                ConditionType::OwnershipConflict,
                ConditionReason::OverlappingBaseFolder,
            ),
            DeclareError::GlobalWorkerLimit(_) | DeclareError::RepoWorkerLimit(_) => {
                (ConditionType::Ready, ConditionReason::WorkerLimitReached)
            }
            DeclareError::UnknownCredentials(_) => {
                (ConditionType::Ready, ConditionReason::UnknownCredentials)
            }
            DeclareError::Forbidden(_) => (ConditionType::Ready, ConditionReason::Forbidden),
        }
    }
}

/// How an agent's declared credentials arrive before resolution.
#[derive(Clone, Debug)]
pub enum DeclaredCredentials {
    None,
    Reference(String),
    Inline(git::GitCredentials),
}

#[derive(Clone, Debug)]
pub struct DestinationRecord {
    pub spec: DestinationSpec,
    pub worker_id: String,
    /// Highest sequence acked (shared with the worker, which updates it).
    pub acked: Arc<AtomicU64>,
    /// Latest conditions (shared with the worker and the session, which report them).
    pub conditions: crate::model::Conditions,
    /// The client identity that declared it (None without a writer configuration file).
    pub owner: Option<String>,
}

impl DestinationRecord {
    pub fn acked_sequence(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
}

/// Worker caps.
#[derive(Clone, Debug)]
pub struct Caps {
    pub max_global: usize,
    pub max_per_repo: usize,
}

pub struct Registry {
    settings: WorkerSettings,
    caps: Caps,
    /// Shared with the workers' signing lookups, so a reloaded signing key applies at the next commit.
    credentials: Arc<RwLock<CredentialStore>>,
    leases: Option<LeaseSettings>,
    metrics: Metrics,
    /// The newest agent leader term per cluster (persisted under the work dir).
    terms: Terms,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    workers: BTreeMap<String, WorkerHandle>,
    destinations: BTreeMap<DestinationId, DestinationRecord>,
    /// Workers that push with credentials an agent sent, and the client identity that sent them.
    agent_credentials: HashMap<String, String>,
    /// The workers' Lease loops: each releases its Lease once its worker has ended.
    lease_loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Registry {
    pub fn new(
        settings: WorkerSettings,
        caps: Caps,
        credentials: CredentialStore,
        leases: Option<LeaseSettings>,
        metrics: Metrics,
    ) -> Arc<Self> {
        let terms = Terms::load(&settings.work_dir);
        Arc::new(Self {
            terms,
            settings,
            caps,
            credentials: Arc::new(RwLock::new(credentials)),
            leases,
            metrics,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The newest agent leader term per cluster ([`crate::fencing`]).
    pub fn terms(&self) -> &Terms {
        &self.terms
    }

    /// Swaps the writer's own credentials in (a reload) and hands running workers whose credentials changed the
    /// new ones: a rotated token applies at the next push, a removed one is no longer used.
    pub fn set_credentials(&self, credentials: CredentialStore) {
        let mut store = self.credentials.write().expect("credentials lock");
        let previous = std::mem::replace(&mut *store, credentials);
        let inner = self.inner.lock().expect("registry lock");
        let mut updated = std::collections::BTreeSet::new();
        for record in inner.destinations.values() {
            let url = &record.spec.repo_url;
            let (new, old) = (store.for_url(url), previous.for_url(url));
            if new == old || !updated.insert(record.worker_id.clone()) {
                continue;
            }
            if let Some(handle) = inner.workers.get(&record.worker_id) {
                let (handle, new) = (handle.clone(), new.cloned());
                tokio::spawn(async move { handle.set_credentials(new).await });
            }
        }
    }

    /// Whether the writer has credentials of its own for `repo_url` (then an agent's are never used).
    pub fn has_own_credentials(&self, repo_url: &str) -> bool {
        self.credentials
            .read()
            .expect("credentials lock")
            .for_url(repo_url)
            .is_some()
    }

    /// Resolves credentials: the writer's own configuration wins over anything an agent sends. Returns whether
    /// the credentials are the agent's (inline). With `restricted` (a writer configuration file), a reference
    /// must name an entry whose URL prefix fits the repository.
    fn resolve_credentials(
        &self,
        repo_url: &str,
        declared: DeclaredCredentials,
        restricted: bool,
    ) -> Result<(Option<git::GitCredentials>, bool), DeclareError> {
        let store = self.credentials.read().expect("credentials lock");
        if let Some(own) = store.for_url(repo_url) {
            return Ok((Some(own.clone()), false));
        }
        match declared {
            DeclaredCredentials::None => Ok((None, false)),
            DeclaredCredentials::Inline(credentials) => Ok((Some(credentials), true)),
            DeclaredCredentials::Reference(name) => {
                if restricted && store.prefix_of(&name).is_some() {
                    return Err(DeclareError::Forbidden(format!(
                        "credentials reference {name:?} is for other repositories than {}",
                        git::redact_url(repo_url)
                    )));
                }
                store
                    .by_name(&name)
                    .cloned()
                    .map(|c| (Some(c), false))
                    .ok_or(DeclareError::UnknownCredentials(name))
            }
        }
    }

    /// Declares or re-declares a destination and returns the worker that serves it plus what its changes carry.
    /// `owner` is the declaring client's identity when a writer configuration file is in force.
    pub fn declare(
        &self,
        mut spec: DestinationSpec,
        declared: DeclaredCredentials,
        origin: Arc<Origin>,
        owner: Option<&str>,
    ) -> Result<(WorkerHandle, DestinationRef, Option<WorkerHandle>), DeclareError> {
        let (credentials, from_agent) =
            self.resolve_credentials(&spec.repo_url, declared, owner.is_some())?;
        spec.credentials = credentials;
        let worker_id = git::worker_id(&spec.repo_url, &spec.branch);
        let mut inner = self.inner.lock().expect("registry lock");
        if let Some(owner) = owner {
            if let Some(existing) = inner.destinations.get(&spec.id)
                && existing.owner.as_deref() != Some(owner)
            {
                return Err(DeclareError::Forbidden(format!(
                    "destination {} belongs to another client",
                    spec.id
                )));
            }
            if let Some(holder) = inner.agent_credentials.get(&worker_id)
                && holder != owner
            {
                return Err(DeclareError::Forbidden(format!(
                    "the worker for {} branch {} pushes with another client's credentials",
                    git::redact_url(&spec.repo_url),
                    spec.branch
                )));
            }
        }
        for (other_id, other) in &inner.destinations {
            if *other_id != spec.id
                && other.worker_id == worker_id
                && reverser_common::paths::folders_overlap(
                    &other.spec.base_folder,
                    &spec.base_folder,
                )
            {
                return Err(DeclareError::Overlap {
                    base_folder: spec.base_folder.clone(),
                    other: other_id.to_string(),
                    other_base_folder: other.spec.base_folder.clone(),
                });
            }
        }
        let previous_worker = inner
            .destinations
            .get(&spec.id)
            .filter(|r| r.worker_id != worker_id)
            .and_then(|r| inner.workers.get(&r.worker_id).cloned());
        let handle = match inner.workers.get(&worker_id) {
            Some(handle) => {
                // A re-declared destination with other agent credentials (a rotated Secret) hands the running
                // worker the new ones; the writer's own credentials never change this way.
                let stale = from_agent
                    && inner.destinations.values().any(|r| {
                        r.worker_id == worker_id && r.spec.credentials != spec.credentials
                    });
                if stale {
                    let (handle, new) = (handle.clone(), spec.credentials.clone());
                    tokio::spawn(async move { handle.set_credentials(new).await });
                }
                handle.clone()
            }
            None => {
                if inner.workers.len() >= self.caps.max_global {
                    return Err(DeclareError::GlobalWorkerLimit(self.caps.max_global));
                }
                let redacted = git::redact_url(&spec.repo_url);
                let same_repo = inner
                    .workers
                    .values()
                    .filter(|w| w.repo_url == redacted)
                    .count();
                if same_repo >= self.caps.max_per_repo {
                    return Err(DeclareError::RepoWorkerLimit(self.caps.max_per_repo));
                }
                let mut repo = RepoSpec::new(spec.repo_url.clone(), spec.branch.clone());
                if let Some(credentials) = spec.credentials.clone() {
                    repo = repo.with_credentials(credentials);
                }
                if let Some(ca) = &self.settings.ca_cert_file {
                    repo = repo.with_ca_cert_file(ca.clone());
                }
                let (store, url) = (self.credentials.clone(), spec.repo_url.clone());
                repo = repo.with_signing(git::SigningSource::new(move || {
                    // Poisoned or not, the configured key is what signs: never fall back to unsigned.
                    store
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .signing_for(&url)
                }));
                let lease = self.leases.clone().map(|settings| {
                    let (state, claim_loop) = lease::spawn(settings, worker_id.clone());
                    inner.lease_loops.push(claim_loop);
                    state
                });
                let handle =
                    worker::spawn(repo, self.settings.clone(), self.metrics.clone(), lease);
                info!(worker = %handle.id, repo = %handle.repo_url, branch = %handle.branch, "started worker");
                inner.workers.insert(worker_id.clone(), handle.clone());
                if let (Some(owner), true) = (owner, from_agent) {
                    inner
                        .agent_credentials
                        .insert(worker_id.clone(), owner.to_owned());
                }
                handle
            }
        };
        // A new stream starts its own sequence numbers; the counter is only what admins see.
        let acked = Arc::new(AtomicU64::new(0));
        let conditions = inner
            .destinations
            .get(&spec.id)
            .map(|r| r.conditions.clone())
            .unwrap_or_default();
        let reference = DestinationRef {
            id: spec.id.clone(),
            base_folder: spec.base_folder.clone(),
            exclusive_mode: spec.exclusive_mode,
            age_recipients: spec.age_recipients.clone().into(),
            prune: spec.prune,
            commit_template: spec.commit_template.clone(),
            placement: spec.placement,
            origin,
            acked: acked.clone(),
            conditions: conditions.clone(),
        };
        inner.destinations.insert(
            spec.id.clone(),
            DestinationRecord {
                spec,
                worker_id,
                acked,
                conditions,
                owner: owner.map(str::to_owned),
            },
        );
        Ok((handle, reference, previous_worker))
    }

    pub fn workers(&self) -> Vec<(WorkerHandle, Vec<String>)> {
        let inner = self.inner.lock().expect("registry lock");
        let mut by_worker: HashMap<&str, Vec<String>> = HashMap::new();
        for (id, record) in &inner.destinations {
            by_worker
                .entry(record.worker_id.as_str())
                .or_default()
                .push(id.to_string());
        }
        inner
            .workers
            .values()
            .map(|w| {
                (
                    w.clone(),
                    by_worker.remove(w.id.as_str()).unwrap_or_default(),
                )
            })
            .collect()
    }

    pub fn destinations(&self) -> Vec<DestinationRecord> {
        self.inner
            .lock()
            .expect("registry lock")
            .destinations
            .values()
            .cloned()
            .collect()
    }

    pub fn worker_for(&self, repo_url: &str, branch: &str) -> Option<WorkerHandle> {
        let id = git::worker_id(repo_url, branch);
        let inner = self.inner.lock().expect("registry lock");
        inner.workers.get(&id).cloned().or_else(|| {
            // Admins may pass the redacted URL they see in ListWorkers.
            inner
                .workers
                .values()
                .find(|w| w.repo_url == repo_url && w.branch == branch)
                .cloned()
        })
    }

    /// Stops accepting work: dropping the handles lets each worker flush and exit. Returns the workers and their
    /// Lease loops, which end (releasing each Lease) once their worker has.
    pub fn shutdown(&self) -> (Vec<WorkerHandle>, Vec<tokio::task::JoinHandle<()>>) {
        let mut inner = self.inner.lock().expect("registry lock");
        let workers = std::mem::take(&mut inner.workers).into_values().collect();
        (workers, std::mem::take(&mut inner.lease_loops))
    }
}
