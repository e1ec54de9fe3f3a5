//! The (repository, branch) worker: an async actor that owns one bare clone.
//!
//! Changes arrive on a bounded channel (the gRPC streams wait when it is full, which pushes back on the agents).
//! They are buffered ([`crate::batch::Buffer`]) until a cap or the wait timer fires; then the worker plans the
//! commits against the branch tip, creates them and pushes fast-forward only — all git work runs on the blocking
//! thread pool with the clone moved in and out. A rejected push means someone else pushed: fetch, plan again on
//! the new tip (the latest content per path is re-applied), push again, a bounded number of times. Only after a
//! successful push are the changes acked to their agents; on failure they stay buffered and the worker retries
//! with backoff, reporting `PushFailing`/`AuthFailed` to the destinations meanwhile.
//!
//! Two guards keep one fault from holding everything back: a batch whose commits git refuses to build is split
//! until the refused messages are alone ([`batch::quarantine`]; they get `Reject CommitRefused`, the rest is
//! pushed), and every fetch and push runs under a watchdog that abandons it at the operation deadline whatever the
//! remote sends (`watchdog`).

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

mod watchdog;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use reverser_common::backoff::Backoff;
use reverser_common::reasons::{ConditionReason, ConditionType, RejectReason};

use reverser_proto::v1 as pb;

use crate::{
    batch::{self, Accepted, Buffer, Limits, Plan, PlanContext, TreeView},
    git::{self, Clone, CommitMeta, GitCredentials, GitError, PushOutcome, RepoSpec},
    lease::LeaseState,
    metrics::Metrics,
    model::{Change, DestinationId, DestinationRef, Origin},
};

/// Settings shared by every worker.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub work_dir: PathBuf,
    pub limits: Limits,
    pub deletes_cap: usize,
    pub bot_name: String,
    pub bot_email: String,
    /// Non-fast-forward rejections answered by fetch + replay within one flush before giving up for now.
    pub push_max_retries: u32,
    /// Capacity of a worker's inbound channel.
    pub queue_capacity: usize,
    /// Backoff after a failed flush: first delay and cap.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Re-fetch before a flush when the last fetch is older than this (so no-op detection sees human edits).
    pub refetch_after: Duration,
    /// Extra CA for HTTPS remotes (`--git-ca-file`).
    pub ca_cert_file: Option<PathBuf>,
}

/// What admins see of a worker (`WriterAdmin.ListWorkers`).
#[derive(Clone, Debug, Default)]
pub struct WorkerStatus {
    pub pending_entries: usize,
    pub pending_files: usize,
    pub last_commit_sha: String,
    pub last_commit_time: Option<DateTime<Utc>>,
    pub last_error: String,
    pub lease_holder: String,
}

/// Outcome of an explicit flush.
#[derive(Clone, Debug, Default)]
pub struct FlushReport {
    pub commit_sha: String,
    pub files_changed: u64,
}

pub enum Command {
    Change(Box<Change>),
    Flush(oneshot::Sender<Result<FlushReport, String>>),
    /// Drop open snapshots of a destination that moved elsewhere or was redeclared.
    Forget(DestinationId),
    /// Push what is pending, then stop: later changes are refused (the agents re-send them elsewhere or later).
    Shutdown(oneshot::Sender<Result<FlushReport, String>>),
    /// The writer's credentials for this repository changed (a reload): use these from the next fetch or push.
    SetCredentials(Option<GitCredentials>),
}

/// Handle to a running worker.
#[derive(Clone)]
pub struct WorkerHandle {
    pub id: String,
    pub repo_url: String,
    pub branch: String,
    /// The key that signs the worker's commits (for `WriterAdmin.ListWorkers`).
    pub signing: git::SigningSource,
    sender: mpsc::Sender<Command>,
    status: Arc<Mutex<WorkerStatus>>,
}

impl WorkerHandle {
    /// Queues a change; waits while the worker's queue is full (backpressure).
    pub async fn send(&self, change: Change) -> Result<(), WorkerGone> {
        self.sender
            .send(Command::Change(Box::new(change)))
            .await
            .map_err(|_| WorkerGone)
    }

    pub async fn forget(&self, id: DestinationId) {
        let _ = self.sender.send(Command::Forget(id)).await;
    }

    /// Hands the worker new credentials (see [`Command::SetCredentials`]).
    pub async fn set_credentials(&self, credentials: Option<GitCredentials>) {
        let _ = self.sender.send(Command::SetCredentials(credentials)).await;
    }

    pub async fn flush(&self) -> Result<FlushReport, String> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Command::Flush(reply))
            .await
            .map_err(|_| WorkerGone.to_string())?;
        answer.await.map_err(|_| WorkerGone.to_string())?
    }

    /// Pushes what is pending and stops the worker; returns once it has stopped accepting changes.
    pub async fn shutdown(&self) -> Result<FlushReport, String> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Command::Shutdown(reply))
            .await
            .map_err(|_| WorkerGone.to_string())?;
        answer.await.map_err(|_| WorkerGone.to_string())?
    }

    pub fn status(&self) -> WorkerStatus {
        let mut status = self.status.lock().expect("status lock").clone();
        status.pending_entries += self.sender.max_capacity() - self.sender.capacity();
        status
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the worker stopped")]
pub struct WorkerGone;

/// Starts a worker for `spec` and returns its handle.
pub fn spawn(
    spec: RepoSpec,
    settings: WorkerSettings,
    metrics: Metrics,
    lease: Option<watch::Receiver<LeaseState>>,
) -> WorkerHandle {
    let id = git::worker_id(&spec.url, &spec.branch);
    let (sender, receiver) = mpsc::channel(settings.queue_capacity);
    let status = Arc::new(Mutex::new(WorkerStatus::default()));
    let handle = WorkerHandle {
        id: id.clone(),
        repo_url: git::redact_url(&spec.url),
        branch: spec.branch.clone(),
        signing: spec.signing.clone(),
        sender,
        status: status.clone(),
    };
    let labels = [handle.repo_url.clone(), handle.branch.clone()];
    // `retry_initial * 2^(failures-1)`, capped at `retry_max`, ±20 %.
    let retry_backoff =
        Backoff::new(settings.retry_initial, settings.retry_max).with_jitter(0.8, 1.2);
    let worker = Worker {
        id,
        dir: settings.work_dir.join(&handle.id),
        spec,
        settings,
        metrics,
        labels,
        lease,
        status,
        clone: None,
        buffer: Buffer::default(),
        retry_at: None,
        retry_backoff,
        last_fetch: None,
        conditions: HashMap::new(),
        abandoned: watchdog::Abandoned::default(),
    };
    tokio::spawn(worker.run(receiver));
    handle
}

struct Worker {
    id: String,
    dir: PathBuf,
    spec: RepoSpec,
    settings: WorkerSettings,
    metrics: Metrics,
    labels: [String; 2],
    lease: Option<watch::Receiver<LeaseState>>,
    status: Arc<Mutex<WorkerStatus>>,
    /// `None` while the clone is being used on the blocking pool or could not be opened yet.
    clone: Option<Clone>,
    buffer: Buffer,
    retry_at: Option<Instant>,
    /// Delays between failed flushes, reset by a success.
    retry_backoff: Backoff,
    last_fetch: Option<Instant>,
    /// Last condition reported per destination (to report transitions, not every flush).
    conditions: HashMap<DestinationId, (String, bool)>,
    /// Fetches and pushes given up at their deadline that may still be running (see `watchdog`).
    abandoned: watchdog::Abandoned,
}

/// Why a flush could not push.
#[derive(Debug)]
enum FlushError {
    Git(GitError),
    LeaseNotHeld(String),
    TooManyRejections(u32),
}

impl std::fmt::Display for FlushError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlushError::Git(e) => write!(f, "{e}"),
            FlushError::LeaseNotHeld(holder) => {
                write!(f, "the worker's Lease is held by {holder:?}")
            }
            FlushError::TooManyRejections(n) => {
                write!(
                    f,
                    "push rejected {n} times in a row (the branch keeps moving); will retry"
                )
            }
        }
    }
}

struct FlushOutcome {
    plan: Plan,
    tip: Option<git2::Oid>,
    pushed: bool,
    rejections: u32,
    /// Entries whose changes git refuses to commit even alone (batch index, why): refused, the rest pushed.
    quarantined: Vec<(usize, String)>,
}

impl Worker {
    fn labels(&self) -> [&str; 2] {
        [self.labels[0].as_str(), self.labels[1].as_str()]
    }

    async fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        self.metrics
            .active_workers
            .with_label_values(&self.labels())
            .set(1);
        info!(worker = %self.id, repo = %self.labels[0], branch = %self.spec.branch, "worker started");
        // A failure is reported by the first flush, which retries the fetch.
        let _ = self.open().await;
        loop {
            let deadline = match (self.buffer.deadline(&self.settings.limits), self.retry_at) {
                (Some(d), Some(r)) => Some(d.max(r)),
                (d, None) => d,
                (None, Some(r)) => Some(r),
            };
            // While backing off with a full buffer, stop reading: the agents' streams wait (backpressure) instead
            // of the buffer growing without bound.
            let backing_off = self.retry_at.is_some_and(|r| r > Instant::now());
            if backing_off && self.buffer.over_hard_cap(&self.settings.limits) {
                if let Some(deadline) = deadline {
                    tokio::time::sleep_until(deadline.into()).await;
                }
                self.flush_now(None).await;
                continue;
            }
            let command = match deadline {
                Some(deadline) => tokio::select! {
                    command = receiver.recv() => command,
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        self.flush_now(None).await;
                        continue;
                    }
                },
                None => receiver.recv().await,
            };
            let Some(command) = command else { break };
            if let Command::Shutdown(reply) = command {
                self.flush_now(Some(reply)).await;
                receiver.close();
                break;
            }
            match command {
                Command::Change(change) => {
                    self.accept(*change);
                    // Keep draining what already waits, so one flush covers it (cheap batching under load).
                    while !self.buffer.flush_due(&self.settings.limits, Instant::now()) {
                        match receiver.try_recv() {
                            Ok(Command::Change(change)) => self.accept(*change),
                            Ok(Command::Shutdown(reply)) => {
                                self.flush_now(Some(reply)).await;
                                receiver.close();
                                self.metrics
                                    .active_workers
                                    .with_label_values(&self.labels())
                                    .set(0);
                                info!(worker = %self.id, "worker stopped");
                                return;
                            }
                            Ok(other) => {
                                self.handle_other(other).await;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let backing_off = self.retry_at.is_some_and(|r| r > Instant::now());
                    if self.buffer.flush_due(&self.settings.limits, Instant::now()) && !backing_off
                    {
                        self.flush_now(None).await;
                    }
                }
                other => self.handle_other(other).await,
            }
            self.publish_status();
        }
        // All senders are gone (shutdown): push what is pending, once.
        if !self.buffer.is_empty() {
            self.flush_now(None).await;
        }
        self.metrics
            .active_workers
            .with_label_values(&self.labels())
            .set(0);
        info!(worker = %self.id, "worker stopped");
    }

    async fn handle_other(&mut self, command: Command) {
        match command {
            Command::Change(change) => self.accept(*change),
            Command::Flush(reply) => self.flush_now(Some(reply)).await,
            Command::Forget(id) => self.buffer.forget_destination(&id),
            Command::SetCredentials(credentials) => {
                info!(worker = %self.id, "credentials changed; retrying with the new ones");
                self.spec.credentials = credentials.clone();
                if let Some(clone) = &mut self.clone {
                    clone.set_credentials(credentials);
                }
                // A push that failed for want of valid credentials is retried at once, not after the backoff.
                self.retry_at = None;
                self.retry_backoff.reset();
            }
            // Handled by the run loop, which stops after it.
            Command::Shutdown(reply) => self.flush_now(Some(reply)).await,
        }
    }

    fn accept(&mut self, change: Change) {
        let destination = change.destination.clone();
        let sequence = change.sequence;
        if let Accepted::SnapshotMismatch(message) = self.buffer.push(change, Instant::now()) {
            warn!(worker = %self.id, destination = %destination.id, sequence, %message, "snapshot mismatch");
            self.metrics
                .messages_rejected
                .with_label_values(&[RejectReason::SnapshotMismatch.as_str()])
                .inc();
            destination.origin.reject(
                &destination.id.key,
                sequence,
                RejectReason::SnapshotMismatch,
                message,
            );
        }
        self.metrics
            .queue_depth
            .with_label_values(&self.labels())
            .set(self.buffer.len() as i64);
    }

    /// Opens (or initialises) the clone and fetches the branch. A failed fetch keeps the clone (the next flush
    /// fetches again); the error is returned so the caller can report it.
    async fn open(&mut self) -> Result<(), GitError> {
        self.refuse_while_abandoned_run()?;
        let dir = self.dir.clone();
        let spec = self.spec.clone();
        // An abandoned task may still write a ref of this clone (under its lock file) when its call returns.
        let clean_locks = self.abandoned.running() == 0;
        let ran = watchdog::run(network_deadline(), &self.abandoned, move |watch| {
            if clean_locks {
                remove_stale_locks(&dir);
            }
            let mut clone = match Clone::open_or_init(&dir, spec) {
                Ok(clone) => clone,
                Err(error) => return (None, Err(error)),
            };
            let fetched = watch.network(|| clone.fetch());
            (Some(clone), fetched)
        })
        .await;
        let (clone, fetched) = ran.unwrap_or_else(|| (None, Err(self.abandoned_error())));
        self.clone = clone;
        match fetched {
            Ok(tip) => {
                info!(worker = %self.id, tip = ?tip.map(|t| t.to_string()), "clone ready");
                self.last_fetch = Some(Instant::now());
                Ok(())
            }
            Err(error) => {
                warn!(worker = %self.id, %error, "opening or fetching the clone failed; will retry");
                self.status.lock().expect("status lock").last_error = error.to_string();
                Err(error)
            }
        }
    }

    /// The error of a fetch or push the watchdog gave up on.
    fn abandoned_error(&self) -> GitError {
        self.metrics
            .git_operations_abandoned
            .with_label_values(&self.labels())
            .inc();
        warn!(worker = %self.id, deadline_sec = git::operation_timeout().as_secs(), "a fetch or push did not finish by its deadline; abandoned it and will reconnect");
        GitError::Unreachable(format!(
            "{}: no fetch or push result within {} s (--git-operation-timeout-sec); the connection was abandoned",
            self.labels[0],
            git::operation_timeout().as_secs()
        ))
    }

    /// Starts no new connection while too many abandoned ones may still be running against this remote.
    fn refuse_while_abandoned_run(&self) -> Result<(), GitError> {
        let running = self.abandoned.running();
        if running >= watchdog::MAX_ABANDONED {
            return Err(GitError::Unreachable(format!(
                "{}: {running} earlier fetches or pushes past their deadline have not ended; waiting for them before connecting again",
                self.labels[0]
            )));
        }
        Ok(())
    }

    async fn flush_now(&mut self, reply: Option<oneshot::Sender<Result<FlushReport, String>>>) {
        if self.buffer.is_empty() {
            self.retry_at = None;
            if let Some(reply) = reply {
                let sha = self
                    .status
                    .lock()
                    .expect("status lock")
                    .last_commit_sha
                    .clone();
                let _ = reply.send(Ok(FlushReport {
                    commit_sha: sha,
                    files_changed: 0,
                }));
            }
            return;
        }
        let result = self.flush().await;
        let report = match result {
            Ok(outcome) => {
                self.retry_backoff.reset();
                self.retry_at = None;
                Ok(self.finish(outcome))
            }
            Err(error) => {
                let delay = self.retry_backoff.next_delay();
                self.retry_at = Some(Instant::now() + delay);
                self.report_failure(&error);
                self.metrics
                    .push_retries
                    .with_label_values(&self.labels())
                    .inc();
                warn!(worker = %self.id, %error, retry_in = ?delay, pending = self.buffer.len(), "flush failed; changes stay pending");
                Err(error.to_string())
            }
        };
        self.publish_status();
        if let Some(reply) = reply {
            let _ = reply.send(report);
        }
    }

    async fn flush(&mut self) -> Result<FlushOutcome, FlushError> {
        if let Some(lease) = &self.lease {
            let state = lease.borrow().clone();
            if !state.held() {
                self.metrics
                    .lease_acquire_failures
                    .with_label_values(&[self.id.as_str()])
                    .inc();
                return Err(FlushError::LeaseNotHeld(state.holder));
            }
        }
        self.refuse_while_abandoned_run().map_err(FlushError::Git)?;
        if self.clone.is_none() {
            self.open().await.map_err(FlushError::Git)?;
        }
        let Some(mut clone) = self.clone.take() else {
            return Err(FlushError::Git(GitError::Other(
                "the clone is not available".into(),
            )));
        };
        let entries = self.buffer.entries().to_vec();
        let refetch = self
            .last_fetch
            .is_none_or(|t| t.elapsed() >= self.settings.refetch_after);
        let context = PlanContext {
            bot_name: self.settings.bot_name.clone(),
            bot_email: self.settings.bot_email.clone(),
            deletes_cap: self.settings.deletes_cap,
            now_rfc3339: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        };
        let max_retries = self.settings.push_max_retries;
        let ran = watchdog::run(network_deadline(), &self.abandoned, move |watch| {
            let result =
                flush_blocking(&mut clone, &entries, &context, refetch, max_retries, watch);
            (clone, result)
        })
        .await;
        let (clone, result) = match ran {
            Some((clone, result)) => (Some(clone), result),
            // The clone stays with the abandoned task; the next flush opens it afresh.
            None => (None, Err(FlushError::Git(self.abandoned_error()))),
        };
        self.clone = clone;
        if refetch {
            self.last_fetch = Some(Instant::now());
        }
        let outcome = result?;
        if outcome.rejections > 0 {
            self.metrics
                .rebase_retries
                .with_label_values(&self.labels())
                .inc_by(u64::from(outcome.rejections));
        }
        Ok(outcome)
    }

    /// Book-keeping after a successful flush: metrics, statuses, acks.
    fn finish(&mut self, outcome: FlushOutcome) -> FlushReport {
        let entries = self.buffer.take();
        self.metrics
            .queue_depth
            .with_label_values(&self.labels())
            .set(0);
        let plan = &outcome.plan;
        let sha = outcome.tip.map(|t| t.to_string()).unwrap_or_default();
        if outcome.pushed {
            self.metrics
                .commit_batches
                .with_label_values(&self.labels())
                .inc();
            self.metrics
                .commits
                .with_label_values(&self.labels())
                .inc_by(plan.commits.len() as u64);
            self.metrics
                .commit_bytes
                .with_label_values(&self.labels())
                .inc_by(plan.stats.bytes as u64);
            self.metrics
                .objects_written
                .with_label_values(&self.labels())
                .inc_by(plan.stats.written as u64);
            for commit in &plan.commits {
                let deleted = commit
                    .changes
                    .iter()
                    .filter(|c| c.content.is_none())
                    .count() as u64;
                if deleted > 0 {
                    for destination in &commit.destinations {
                        self.metrics
                            .files_deleted
                            .with_label_values(&[destination.key.as_str()])
                            .inc_by(deleted);
                    }
                }
            }
            let mut status = self.status.lock().expect("status lock");
            status.last_commit_sha = sha.clone();
            status.last_commit_time = Some(Utc::now());
            info!(
                worker = %self.id,
                commit = %sha,
                commits = plan.commits.len(),
                written = plan.stats.written,
                deleted = plan.stats.deleted,
                orphans = plan.stats.orphans_deleted,
                noops = plan.stats.noops,
                rejections = outcome.rejections,
                "pushed"
            );
        } else {
            debug!(worker = %self.id, noops = plan.stats.noops, "flush had no effective change; no commit");
        }
        self.status.lock().expect("status lock").last_error.clear();

        for conflict in &plan.marker_conflicts {
            let key = conflict.destination.id.key.as_str();
            self.metrics
                .marker_conflicts
                .with_label_values(&[key])
                .inc();
            self.metrics
                .ownership_conflicts
                .with_label_values(&[key])
                .inc();
            let message = format!(
                "{}/.configbutler/owner.yaml names {} as owner{}",
                conflict.destination.base_folder,
                conflict.found_owner,
                if conflict.exclusive {
                    "; exclusiveMode refuses writes"
                } else {
                    "; continuing (exclusiveMode=false)"
                }
            );
            warn!(worker = %self.id, destination = %conflict.destination.id, %message, "ownership marker conflict");
            conflict.destination.report(
                ConditionType::MarkerConflict,
                true,
                ConditionReason::MarkerOwnedByOther,
                message.clone(),
            );
            self.conditions.insert(
                conflict.destination.id.clone(),
                (ConditionType::MarkerConflict.as_str().to_owned(), true),
            );
        }
        for (index, message) in &plan.path_conflicts {
            let entry = &entries[*index];
            warn!(worker = %self.id, destination = %entry.destination.id, sequence = entry.sequence, %message, "path conflict; write refused");
            self.metrics
                .messages_rejected
                .with_label_values(&[RejectReason::PathConflict.as_str()])
                .inc();
            entry.destination.origin.reject(
                &entry.destination.id.key,
                entry.sequence,
                RejectReason::PathConflict,
                message.clone(),
            );
        }
        for (index, why) in &outcome.quarantined {
            let entry = &entries[*index];
            warn!(worker = %self.id, destination = %entry.destination.id, sequence = entry.sequence, error = %why, "the change cannot be committed; refused alone, the rest of the batch goes on");
            self.metrics
                .messages_rejected
                .with_label_values(&[RejectReason::CommitRefused.as_str()])
                .inc();
            entry.destination.origin.reject(
                &entry.destination.id.key,
                entry.sequence,
                RejectReason::CommitRefused,
                format!("git refuses to commit this change: {why}"),
            );
        }
        for &(index, left) in &plan.truncated_sweeps {
            let destination = &entries[index].destination;
            let key = destination.id.key.as_str();
            info!(worker = %self.id, destination = %destination.id, orphans_left = left, cap = self.settings.deletes_cap, "sweep stopped at the delete cap; the next snapshot deletes more");
            self.metrics
                .orphans_pending
                .with_label_values(&[key])
                .set(left as i64);
            self.metrics
                .sweeps_truncated
                .with_label_values(&[key])
                .inc();
            destination.report(
                ConditionType::SweepIncomplete,
                true,
                ConditionReason::DeleteCapReached,
                format!(
                    "{left} orphan files left after deleting {} (--deletes-cap-per-cycle); the next snapshot continues",
                    self.settings.deletes_cap
                ),
            );
        }
        for &index in &plan.completed_sweeps {
            let destination = &entries[index].destination;
            if plan
                .truncated_sweeps
                .iter()
                .any(|&(i, _)| entries[i].destination.id == destination.id)
            {
                continue;
            }
            self.metrics
                .orphans_pending
                .with_label_values(&[destination.id.key.as_str()])
                .set(0);
            let incomplete = destination
                .conditions
                .lock()
                .expect("conditions lock")
                .get(ConditionType::SweepIncomplete.as_str())
                .is_some_and(|c| c.status == "True");
            if incomplete {
                info!(worker = %self.id, destination = %destination.id, "sweep complete");
                destination.report(
                    ConditionType::SweepIncomplete,
                    false,
                    ConditionReason::SweepComplete,
                    "the last snapshot deleted every orphan",
                );
            }
        }
        for &index in &plan.refused_entries {
            let entry = &entries[index];
            entry.destination.origin.reject(
                &entry.destination.id.key,
                entry.sequence,
                RejectReason::MarkerConflict,
                "the destination's ownership marker names another owner and exclusiveMode is on",
            );
        }

        // Ack the highest sequence per (stream, destination): every earlier one is in this push too.
        let mut highest: BTreeMap<(u64, DestinationId), (u64, Arc<Origin>, DestinationRef)> =
            BTreeMap::new();
        for entry in &entries {
            let key = (
                entry.destination.origin.session_id,
                entry.destination.id.clone(),
            );
            let slot = highest.entry(key).or_insert((
                0,
                entry.destination.origin.clone(),
                entry.destination.clone(),
            ));
            slot.0 = slot.0.max(entry.sequence);
        }
        for ((_, id), (sequence, origin, destination)) in highest {
            destination
                .acked
                .fetch_max(sequence, std::sync::atomic::Ordering::Relaxed);
            origin.send(pb::writer_message::Kind::Ack(pb::Ack {
                destination: id.key.clone(),
                sequence,
                commit_sha: sha.clone(),
            }));
            let conflicted = plan
                .marker_conflicts
                .iter()
                .any(|c| c.destination.id == id && c.exclusive);
            if !conflicted {
                self.set_condition(
                    &destination,
                    ConditionType::Ready,
                    true,
                    ConditionReason::Pushed,
                    format!("up to date at {sha}"),
                );
            }
        }
        let files_changed = plan.commits.iter().map(|c| c.changes.len() as u64).sum();
        FlushReport {
            commit_sha: sha,
            files_changed,
        }
    }

    /// Reports a condition to a destination's agent when it changed since the last report.
    fn set_condition(
        &mut self,
        destination: &DestinationRef,
        kind: ConditionType,
        status: bool,
        reason: ConditionReason,
        message: String,
    ) {
        let current = (kind.as_str().to_owned(), status);
        if self.conditions.get(&destination.id) == Some(&current) {
            return;
        }
        destination.report(kind, status, reason, message);
        self.conditions.insert(destination.id.clone(), current);
    }

    fn report_failure(&mut self, error: &FlushError) {
        let (kind, reason, metric_kind) = match error {
            FlushError::Git(GitError::Auth(_)) => (
                ConditionType::AuthFailed,
                ConditionReason::AuthenticationFailed,
                "auth",
            ),
            FlushError::Git(GitError::HostKey(_)) => (
                ConditionType::AuthFailed,
                ConditionReason::HostKeyMismatch,
                "host_key",
            ),
            FlushError::Git(GitError::Unreachable(_)) => (
                ConditionType::PushFailing,
                ConditionReason::RemoteUnreachable,
                "unreachable",
            ),
            FlushError::Git(_) => (
                ConditionType::PushFailing,
                ConditionReason::GitError,
                "other",
            ),
            FlushError::LeaseNotHeld(_) => (
                ConditionType::LeaseConflict,
                ConditionReason::LeaseHeldByOther,
                "lease",
            ),
            FlushError::TooManyRejections(_) => (
                ConditionType::PushFailing,
                ConditionReason::BranchKeepsMoving,
                "rejected",
            ),
        };
        self.metrics
            .push_failures
            .with_label_values(&[
                self.labels[0].as_str(),
                self.labels[1].as_str(),
                metric_kind,
            ])
            .inc();
        let message = error.to_string();
        self.status.lock().expect("status lock").last_error = message.clone();
        let destinations: Vec<DestinationRef> = {
            let mut seen = HashMap::new();
            for entry in self.buffer.entries() {
                seen.entry(entry.destination.id.clone())
                    .or_insert_with(|| entry.destination.clone());
            }
            seen.into_values().collect()
        };
        for destination in destinations {
            self.set_condition(&destination, kind, true, reason, message.clone());
            self.set_condition(
                &destination,
                ConditionType::Ready,
                false,
                reason,
                message.clone(),
            );
        }
    }

    fn publish_status(&self) {
        let mut status = self.status.lock().expect("status lock");
        status.pending_entries = self.buffer.len();
        status.pending_files = self.buffer.pending_files();
        if let Some(lease) = &self.lease {
            status.lease_holder = lease.borrow().holder.clone();
        }
    }
}

/// Removes `*.lock` files a killed writer may have left in its clone (libgit2 refuses to update a ref, the
/// config or packed-refs while one exists). Safe: the writer holds an exclusive lock on its work dir (see
/// `Args::start`), and each clone belongs to exactly one worker of this process.
fn remove_stale_locks(dir: &std::path::Path) {
    fn walk(dir: &std::path::Path, depth: usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() && depth < 8 && (depth > 0 || entry.file_name() == "refs") {
                walk(&path, depth + 1);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "lock") {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        warn!(path = %path.display(), "removed a stale git lock file left by an earlier run")
                    }
                    Err(error) => {
                        warn!(path = %path.display(), %error, "could not remove a stale git lock file")
                    }
                }
            }
        }
    }
    walk(dir, 0);
}

/// How long one fetch or push may run before the worker abandons it: the operation deadline, plus a moment so that
/// libgit2's own deadline check (which ends the connection cleanly) wins whenever progress is reported.
fn network_deadline() -> Duration {
    git::operation_timeout() + Duration::from_secs(2)
}

/// A commit's tree, read through the clone.
struct CommitTree<'a> {
    clone: &'a Clone,
    commit: Option<git2::Oid>,
}

impl TreeView for CommitTree<'_> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, GitError> {
        self.clone.read_file(self.commit, path)
    }
    fn list(&self, folder: &str) -> Result<Vec<String>, GitError> {
        self.clone.list_files(self.commit, folder)
    }
}

/// Plan, commit and push on the blocking pool; replays on the new tip when the push is rejected.
fn flush_blocking(
    clone: &mut Clone,
    entries: &[batch::Entry],
    context: &PlanContext,
    refetch: bool,
    max_retries: u32,
    watch: &watchdog::NetworkWatch,
) -> Result<FlushOutcome, FlushError> {
    if refetch {
        watch.network(|| clone.fetch()).map_err(FlushError::Git)?;
    }
    let mut rejections = 0;
    // Messages whose changes cannot be committed: found once per flush, left out of the replays.
    let mut quarantined: Vec<(usize, String)> = Vec::new();
    loop {
        let base = clone.base();
        let candidates: Vec<usize> = (0..entries.len())
            .filter(|i| !quarantined.iter().any(|(q, _)| q == i))
            .collect();
        let isolated = batch::quarantine::isolate(&candidates, base, &mut |subset, parent| {
            build_commits(clone, entries, subset, *parent, context)
        })?;
        quarantined.extend(isolated.refused);
        quarantined.sort_by_key(|(i, _)| *i);
        let mut pieces = isolated.built.into_iter();
        let mut plan = pieces.next().unwrap_or_default();
        pieces.for_each(|piece| plan.absorb(piece));
        let tip = isolated.end;
        if plan.commits.is_empty() {
            return Ok(FlushOutcome {
                plan,
                tip: base,
                pushed: false,
                rejections,
                quarantined,
            });
        }
        let tip = tip.expect("at least one commit");
        match watch.network(|| clone.push(tip)).map_err(FlushError::Git)? {
            PushOutcome::Pushed => {
                return Ok(FlushOutcome {
                    plan,
                    tip: Some(tip),
                    pushed: true,
                    rejections,
                    quarantined,
                });
            }
            PushOutcome::Rejected => {
                rejections += 1;
                if rejections > max_retries {
                    // Re-fetch so the next attempt starts from the newest tip.
                    let _ = watch.network(|| clone.fetch());
                    return Err(FlushError::TooManyRejections(rejections));
                }
                info!(
                    attempt = rejections,
                    "push rejected (non-fast-forward); fetching and replaying"
                );
                watch.network(|| clone.fetch()).map_err(FlushError::Git)?;
                std::thread::sleep(Duration::from_millis(50u64 << rejections.min(6)));
            }
        }
    }
}

/// Plans the entries `subset` (batch indexes, in order) on top of `parent` and creates their commits. A commit
/// that git's rules refuse is [`Attempt::Refused`](batch::quarantine::Attempt::Refused), for the quarantine to
/// narrow down; any other failure (reading the clone, writing a pack) is an error of the whole flush.
fn build_commits(
    clone: &mut Clone,
    entries: &[batch::Entry],
    subset: &[usize],
    parent: Option<git2::Oid>,
    context: &PlanContext,
) -> Result<batch::quarantine::Attempt<Option<git2::Oid>, Plan>, FlushError> {
    use batch::quarantine::Attempt;
    let whole = subset.len() == entries.len();
    let picked: Vec<batch::Entry>;
    let slice = if whole {
        entries
    } else {
        picked = subset.iter().map(|&i| entries[i].clone()).collect();
        &picked
    };
    let plan = batch::plan(
        slice,
        &CommitTree {
            clone,
            commit: parent,
        },
        context,
    )
    .map_err(FlushError::Git)?;
    let mut tip = parent;
    for commit in &plan.commits {
        let meta = CommitMeta {
            author_name: commit.author_name.clone(),
            author_email: commit.author_email.clone(),
            committer_name: context.bot_name.clone(),
            committer_email: context.bot_email.clone(),
            message: commit.message.clone(),
        };
        match clone.commit(tip, &commit.changes, &meta) {
            Ok(id) => tip = Some(id),
            Err(error) if error.is_caused_by_the_changes() => {
                debug!(messages = subset.len(), %error, "the commits of these messages cannot be built; narrowing down");
                return Ok(Attempt::Refused(error.to_string()));
            }
            Err(error) => return Err(FlushError::Git(error)),
        }
    }
    let plan = if whole { plan } else { plan.remapped(subset) };
    Ok(Attempt::Built(tip, plan))
}
