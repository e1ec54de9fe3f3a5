//! The (repository, branch) worker: an async actor that owns one bare clone.
//!
//! Changes arrive on a bounded channel (the gRPC streams wait when it is full, which pushes back on the agents). They
//! are buffered ([`crate::batch::Buffer`]) until a cap or the wait timer fires; then the worker plans the commits
//! against its tip and creates them in the clone (a *batch*) — all git work runs on the blocking thread pool with the
//! clone moved in and out. While more changes already wait in the queue, committed batches are held unpushed and the
//! next batch is built on top of them; one fast-forward push then carries them all, once the queue is empty after a
//! commit, `push_max_batches` are held or the oldest has waited `push_max_delay` (a seed over a network transport pays
//! a push's fixed price once per many batches instead of once per batch). That push runs in the background, through a
//! second handle of the clone ([`InFlight`]), while the worker goes on committing the next batches on top of it (up to
//! the same bounds, its packs unmerged meanwhile); when it ends, the batches held after it go next. Explicit flushes,
//! shutdown and the recovery after a rejection wait for it, then push in the foreground. A rejected push means someone
//! else pushed: fetch, plan every held batch again in order on the new tip (the latest content per path is re-applied),
//! push again, a bounded number of times. Only after a successful push are a batch's changes acked to their agents
//! (a [`Reply`] on each stream's bounded reply channel, which never makes the worker wait: see [`crate::reply`]); on
//! failure the batches stay held (and the buffer keeps its changes) and the worker retries with backoff, reporting
//! `PushFailing`/`AuthFailed` to the destinations meanwhile. Nothing held is written anywhere but the clone: after a
//! crash the agents re-send what was not acked.
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

mod suspend;
mod watchdog;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use reverser_common::backoff::Backoff;
use reverser_common::reasons::{ConditionReason, ConditionType, RejectReason};

use crate::{
    batch::{self, Accepted, Buffer, Limits, Plan, PlanContext, TreeView},
    git::{self, Clone, CommitMeta, GitCredentials, GitError, PushOutcome, RepoSpec},
    lease::LeaseState,
    metrics::Metrics,
    model::{Change, DestinationId, DestinationRef, Origin},
    reply::{self, FlushResult, Reply},
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
    /// Committed batches held unpushed (while more changes wait) before a push is forced.
    pub push_max_batches: usize,
    /// Longest the oldest held batch waits for its push while more changes keep arriving.
    pub push_max_delay: Duration,
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
    /// A declaration of the destination says whether it is suspended (see `worker::suspend`).
    SetSuspended(DestinationRef, bool),
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

    /// Suspends or resumes a destination (from its declaration, before any change under it).
    pub async fn set_suspended(&self, destination: DestinationRef, suspend: bool) {
        let _ = self
            .sender
            .send(Command::SetSuspended(destination, suspend))
            .await;
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
    let queue = QueueProbe(sender.downgrade());
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
        queue,
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
        linger_until: None,
        unpushed: Vec::new(),
        unpushed_stale: false,
        retry_at: None,
        retry_backoff,
        last_fetch: None,
        conditions: HashMap::new(),
        abandoned: watchdog::Abandoned::default(),
        held: BTreeMap::new(),
        pushing: None,
        refetch_before_push: false,
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
    /// After a batch that filled up to a cap was held: wait until then for more changes before pushing.
    linger_until: Option<Instant>,
    /// Batches committed in the clone but not pushed yet, oldest first; acked once a push carries them.
    unpushed: Vec<Committed>,
    /// The held batches' commits may not be in the clone (a clone abandoned by the watchdog): rebuild them.
    unpushed_stale: bool,
    retry_at: Option<Instant>,
    /// Delays between failed flushes, reset by a success.
    retry_backoff: Backoff,
    last_fetch: Option<Instant>,
    /// Last condition reported per destination (to report transitions, not every flush).
    conditions: HashMap<DestinationId, (String, bool)>,
    /// Fetches and pushes given up at their deadline that may still be running (see `watchdog`).
    abandoned: watchdog::Abandoned,
    /// The held changes of suspended destinations (see `suspend`).
    held: BTreeMap<DestinationId, suspend::Held>,
    /// This worker's own queue, for the push decision (see [`PushRule`]).
    queue: QueueProbe,
    /// The push running in the background, carrying the oldest held batches.
    pushing: Option<InFlight>,
    /// A background push was rejected (someone else pushed): the next flush fetches, rebuilds the held batches on
    /// the new tip and pushes them itself.
    refetch_before_push: bool,
}

/// A push in the background, on a second handle of the clone (see [`Clone::open_for_push`]), while the worker
/// goes on committing on top of it.
struct InFlight {
    /// How many of the oldest held batches it carries.
    batches: usize,
    /// The commit pushed: the last of those batches.
    tip: git2::Oid,
    task: tokio::task::JoinHandle<Option<Result<PushOutcome, GitError>>>,
}

/// While a push runs in the background, new commits go to packs that are not merged (see
/// [`Clone::pause_pack_merges`]): past this many packs in the clone, commits wait for the push.
const MAX_PACKS_WHILE_PUSHING: usize = 128;

/// What a background push came to: None when the watchdog abandoned it.
type Joined = Result<Option<Result<PushOutcome, GitError>>, tokio::task::JoinError>;

/// The outcome of the push in flight, if there is one (never ready otherwise).
async fn push_result(pushing: &mut Option<InFlight>) -> Joined {
    match pushing {
        Some(flight) => (&mut flight.task).await,
        None => std::future::pending().await,
    }
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

/// One batch committed in the clone: its entries stay until a push carries it (to ack them, or to plan them
/// again on a new tip when a push is rejected).
#[derive(Clone)]
struct Committed {
    entries: Arc<Vec<batch::Entry>>,
    plan: Arc<Plan>,
    /// The commit the batch was built on, and its last commit (`parent` when it changed nothing).
    parent: Option<git2::Oid>,
    tip: Option<git2::Oid>,
    /// Entries whose changes git refuses to commit even alone (batch index, why): refused, the rest pushed.
    quarantined: Vec<(usize, String)>,
    committed_at: Instant,
}

/// How the blocking part of a flush pushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PushMode {
    /// Push when due, here, with fetch and replay on a rejection (explicit flushes, shutdown, recovery).
    Serial,
    /// When due, report [`Step::PushDue`]: the worker pushes in the background while it goes on committing.
    Background,
    /// A push runs in the background: only commit.
    Hold,
}

/// When a flush pushes what it holds.
#[derive(Clone, Copy, Debug)]
enum PushWhen {
    /// An explicit flush, a shutdown: push now.
    Now,
    /// Push unless more changes wait in the queue and no bound of the held batches is reached.
    Due { more_waiting: bool },
}

/// The held batches and the bounds that force their push.
struct PushRule {
    when: PushWhen,
    /// The worker's queue, looked at again when the decision is made, after the batch was committed: changes
    /// that arrived meanwhile show a stream still going (the queue is often empty when a flush starts, because the
    /// worker drained it), while a stream that waits for its acks (the agents' `--max-unacked`) sends none.
    queue: Option<QueueProbe>,
    max_batches: usize,
    max_delay: Duration,
    max_bytes: usize,
}

impl PushRule {
    fn due(&self, held: &[Committed], now: Instant) -> bool {
        let more_waiting = match self.when {
            PushWhen::Now => return true,
            PushWhen::Due { more_waiting } => {
                more_waiting || self.queue.as_ref().is_some_and(QueueProbe::more_waiting)
            }
        };
        !more_waiting || self.bound_reached(held, now)
    }

    /// Whether `held` reached a bound that forces its push whatever waits in the queue.
    fn bound_reached(&self, held: &[Committed], now: Instant) -> bool {
        let bytes: usize = held.iter().map(|c| c.plan.stats.bytes).sum();
        held.len() >= self.max_batches
            || bytes >= self.max_bytes
            || held
                .first()
                .is_some_and(|c| now.duration_since(c.committed_at) >= self.max_delay)
    }
}

/// Looks at a worker's queue from the blocking pool without keeping the channel open.
#[derive(Clone)]
struct QueueProbe(mpsc::WeakSender<Command>);

impl QueueProbe {
    fn more_waiting(&self) -> bool {
        self.0
            .upgrade()
            .is_some_and(|queue| queue.capacity() < queue.max_capacity())
    }
}

/// What the blocking part of a flush did; the held batches come back whatever happened.
struct FlushOutcome {
    held: Vec<Committed>,
    /// The held batches may still not be in the clone (a rebuild they needed failed).
    stale: bool,
    /// Whether the buffer's entries were committed (they are now the last held batch).
    committed_buffer: bool,
    result: Result<Step, FlushError>,
}

enum Step {
    /// The batches stay held: more changes wait and no bound is reached (or a push in the background carries the
    /// oldest of them).
    Held,
    /// The held batches are due: the worker pushes them in the background.
    PushDue,
    /// The held batches are in the remote: pushed (`pushed`), or they changed nothing there.
    Out { pushed: bool, rejections: u32 },
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
            if self.preview_due(Instant::now(), receiver.is_empty()) {
                self.preview_held(false).await;
            }
            let pushing = self.pushing.is_some();
            // Batches held beyond the push in flight wait for it to end (their push starts then).
            let waiting_batches = !pushing && !self.unpushed.is_empty();
            let linger = self.linger_until.filter(|_| waiting_batches);
            let commits_wait = self.commits_wait_for_push();
            let pending = [
                // While changes wait, reading them comes first (a preview waits for a pause).
                self.preview_deadline().filter(|_| receiver.is_empty()),
                self.buffer
                    .deadline(&self.settings.limits)
                    .filter(|_| !commits_wait),
                self.unpushed
                    .first()
                    .filter(|_| waiting_batches)
                    .map(|c| c.committed_at + self.settings.push_max_delay),
                linger,
            ]
            .into_iter()
            .flatten()
            .min();
            let deadline = match (pending, self.retry_at) {
                (Some(d), Some(r)) => Some(d.max(r)),
                (d, None) => d,
                (None, Some(r)) => Some(r),
            };
            // While backing off with a full buffer, stop reading: the agents' streams wait (backpressure) instead
            // of the buffer growing without bound.
            let backing_off = self.retry_at.is_some_and(|r| r > Instant::now());
            if backing_off && self.buffer.over_hard_cap(&self.settings.limits) {
                tokio::select! {
                    joined = push_result(&mut self.pushing) => {
                        self.push_finished(joined, &receiver).await;
                        continue;
                    }
                    _ = sleep_until(deadline) => {}
                }
                self.flush_now(None, waiting(&receiver)).await;
                continue;
            }
            // The buffer is due but cannot be committed before the push in flight ends: stop reading (backpressure).
            if commits_wait && self.buffer.flush_due(&self.settings.limits, Instant::now()) {
                let joined = push_result(&mut self.pushing).await;
                self.push_finished(joined, &receiver).await;
                continue;
            }
            // A due buffer is committed before more is read into it (it may have waited for the push that just
            // ended).
            if !backing_off
                && !commits_wait
                && self.buffer.flush_due(&self.settings.limits, Instant::now())
            {
                self.flush_now(None, waiting(&receiver)).await;
                continue;
            }
            // Held batches go out as soon as nothing more waits to be committed on top of them (after the linger
            // of a batch that filled up: a stream of changes has short gaps).
            if waiting_batches
                && !backing_off
                && receiver.is_empty()
                && linger.is_none_or(|t| t <= Instant::now())
            {
                self.flush_now(None, waiting(&receiver)).await;
                self.publish_status();
                continue;
            }
            let command = tokio::select! {
                command = receiver.recv() => command,
                joined = push_result(&mut self.pushing) => {
                    self.push_finished(joined, &receiver).await;
                    continue;
                }
                _ = sleep_until(deadline) => {
                    self.flush_now(None, waiting(&receiver)).await;
                    continue;
                }
            };
            let Some(command) = command else { break };
            if let Command::Shutdown(reply) = command {
                self.flush_now(Some(reply), PushWhen::Now).await;
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
                                self.flush_now(Some(reply), PushWhen::Now).await;
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
                        self.flush_now(None, waiting(&receiver)).await;
                    }
                }
                other => self.handle_other(other).await,
            }
            self.ack_held();
            self.publish_status();
        }
        // All senders are gone (shutdown): push what is pending, once.
        if !self.buffer.is_empty() || !self.unpushed.is_empty() {
            self.flush_now(None, PushWhen::Now).await;
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
            Command::Flush(reply) => {
                self.preview_held(true).await;
                self.flush_now(Some(reply), PushWhen::Now).await
            }
            Command::Forget(id) => {
                self.buffer.forget_destination(&id);
                self.forget_held(&id);
            }
            Command::SetSuspended(destination, suspend) => {
                self.set_suspended(destination, suspend).await
            }
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
            Command::Shutdown(reply) => self.flush_now(Some(reply), PushWhen::Now).await,
        }
    }

    fn accept(&mut self, change: Change) {
        let Some(change) = self.hold(change) else {
            return;
        };
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
        // So may the push in the background (the tracking ref).
        let clean_locks = self.abandoned.running() == 0 && self.pushing.is_none();
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

    async fn flush_now(
        &mut self,
        reply: Option<oneshot::Sender<Result<FlushReport, String>>>,
        when: PushWhen,
    ) {
        // A CommitRequest is waiting for its commit: push now, not after more changes.
        let when = if self.buffer.flush_requested() {
            PushWhen::Now
        } else {
            when
        };
        // The push in the background first: this flush pushes what is held after it.
        let settled = match when {
            PushWhen::Now => self.settle_push().await,
            PushWhen::Due { .. } => None,
        };
        if self.buffer.is_empty() && self.unpushed.is_empty() {
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
                    files_changed: settled.map_or(0, |r| r.files_changed),
                }));
            }
            return;
        }
        let full = self.buffer.full(&self.settings.limits);
        let result = self.flush(when).await;
        self.linger_until = None;
        let report = match result {
            Ok(Step::Held) => {
                // Nothing failed: the next flush (or an empty queue) pushes them.
                self.retry_at = None;
                if full {
                    self.linger_until =
                        Some(Instant::now() + LINGER.min(self.settings.push_max_delay));
                }
                Ok(FlushReport::default())
            }
            Ok(Step::PushDue) => {
                self.retry_at = None;
                self.start_push();
                Ok(FlushReport::default())
            }
            Ok(Step::Out { pushed, rejections }) => {
                self.retry_backoff.reset();
                self.retry_at = None;
                let mut report = self.finish(pushed, rejections, self.unpushed.len());
                if let Some(settled) = settled {
                    report.files_changed += settled.files_changed;
                    if report.commit_sha.is_empty() {
                        report.commit_sha = settled.commit_sha;
                    }
                }
                Ok(report)
            }
            Err(error) => Err(self.flush_failed(&error)),
        };
        self.metrics
            .unpushed_batches
            .with_label_values(&self.labels())
            .set(self.unpushed.len() as i64);
        self.ack_held();
        self.publish_status();
        if let Some(reply) = reply {
            let _ = reply.send(report);
        }
    }

    /// After a failed flush or push: back off, report, keep everything pending.
    fn flush_failed(&mut self, error: &FlushError) -> String {
        let delay = self.retry_backoff.next_delay();
        self.retry_at = Some(Instant::now() + delay);
        self.report_failure(error);
        self.metrics
            .push_retries
            .with_label_values(&self.labels())
            .inc();
        warn!(worker = %self.id, %error, retry_in = ?delay, pending = self.buffer.len(), unpushed_batches = self.unpushed.len(), "flush failed; changes stay pending");
        error.to_string()
    }

    /// The held batches the push in the background carries (the oldest ones).
    fn in_flight(&self) -> usize {
        self.pushing.as_ref().map_or(0, |p| p.batches)
    }

    fn push_rule(&self, when: PushWhen) -> PushRule {
        PushRule {
            when,
            queue: Some(self.queue.clone()),
            max_batches: self.settings.push_max_batches,
            max_delay: self.settings.push_max_delay,
            max_bytes: self.settings.limits.max_bytes.saturating_mul(4),
        }
    }

    /// A push runs in the background and no more batches may be committed on top of it: those held beyond it
    /// reached a push bound (they go as soon as it ends), or its packs pile up unmerged.
    fn commits_wait_for_push(&self) -> bool {
        if self.pushing.is_none() {
            return false;
        }
        let beyond = &self.unpushed[self.in_flight().min(self.unpushed.len())..];
        let rule = self.push_rule(PushWhen::Due { more_waiting: true });
        rule.bound_reached(beyond, Instant::now())
            || self
                .clone
                .as_ref()
                .is_some_and(|c| c.pack_count() >= MAX_PACKS_WHILE_PUSHING)
    }

    /// Starts pushing every held batch in the background: on the blocking pool, under the watchdog, through a
    /// second handle of the clone, while the worker commits the next batches on top of them.
    fn start_push(&mut self) {
        let Some(tip) = self.unpushed.last().and_then(|c| c.tip) else {
            return;
        };
        let dir = self.dir.clone();
        let spec = self.spec.clone();
        let abandoned = self.abandoned.clone();
        let push_duration = self.metrics.push_duration.with_label_values(&self.labels());
        let batches = self.unpushed.len();
        debug!(worker = %self.id, commit = %tip, batches, "push started");
        let task = tokio::spawn(async move {
            watchdog::run(network_deadline(), &abandoned, move |watch| {
                let mut handle = Clone::open_for_push(&dir, spec)?;
                let timer = push_duration.start_timer();
                let pushed = watch.network(|| handle.push(tip));
                timer.observe_duration();
                pushed
            })
            .await
        });
        self.pushing = Some(InFlight { batches, tip, task });
    }

    /// Waits for the push in the background, if one runs, and books its outcome: what it pushed, if it did.
    async fn settle_push(&mut self) -> Option<FlushReport> {
        self.pushing.as_ref()?;
        let joined = push_result(&mut self.pushing).await;
        self.book_push(joined)
    }

    /// The push in the background ended: book it, then push what is held after it when that is due already.
    async fn push_finished(&mut self, joined: Joined, receiver: &mpsc::Receiver<Command>) {
        let pushed = self.book_push(joined).is_some();
        self.publish_status();
        let more_due = pushed
            && !self.unpushed.is_empty()
            && (self.buffer.flush_due(&self.settings.limits, Instant::now())
                || self
                    .push_rule(waiting(receiver))
                    .bound_reached(&self.unpushed, Instant::now()));
        if more_due {
            self.flush_now(None, waiting(receiver)).await;
        }
    }

    /// Books the outcome of the push in the background: acks on success; on a rejection the next flush fetches
    /// and replays; on a failure the worker backs off. Returns what it pushed, if it did.
    fn book_push(&mut self, joined: Joined) -> Option<FlushReport> {
        let flight = self.pushing.take()?;
        let outcome = match joined {
            Ok(Some(outcome)) => outcome,
            Ok(None) => Err(self.abandoned_error()),
            Err(error) => Err(GitError::Other(format!("the push task failed: {error}"))),
        };
        let pushed = match outcome {
            Ok(PushOutcome::Pushed) => {
                if let Some(clone) = &mut self.clone {
                    clone.advance_base(flight.tip);
                }
                self.retry_backoff.reset();
                self.retry_at = None;
                let report = self.finish(true, 0, flight.batches);
                // Its acks just went out: an agent that waited for them sends more within moments, to be committed
                // on the batches held after it rather than pushed in a push of their own.
                if !self.unpushed.is_empty() {
                    self.linger_until =
                        Some(Instant::now() + LINGER.min(self.settings.push_max_delay));
                }
                Some(report)
            }
            Ok(PushOutcome::Rejected) => {
                info!(worker = %self.id, commit = %flight.tip, batches = self.unpushed.len(), "push rejected (non-fast-forward); the next flush fetches and replays");
                self.metrics
                    .rebase_retries
                    .with_label_values(&self.labels())
                    .inc();
                self.refetch_before_push = true;
                None
            }
            Err(error) => {
                self.flush_failed(&FlushError::Git(error));
                None
            }
        };
        self.metrics
            .unpushed_batches
            .with_label_values(&self.labels())
            .set(self.unpushed.len() as i64);
        self.ack_held();
        pushed
    }

    async fn flush(&mut self, when: PushWhen) -> Result<Step, FlushError> {
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
        let in_flight = self.in_flight();
        if in_flight > 0 && (self.buffer.is_empty() || self.commits_wait_for_push()) {
            // Nothing to commit on top of the push in flight: its end decides what comes next.
            return Ok(Step::Held);
        }
        if self.clone.is_none() {
            self.open().await.map_err(FlushError::Git)?;
        }
        let Some(mut clone) = self.clone.take() else {
            return Err(FlushError::Git(GitError::Other(
                "the clone is not available".into(),
            )));
        };
        // The buffer becomes a new held batch unless enough are held already (a failing remote): then it keeps
        // filling up to its hard cap, and the queue pushes back on the agents.
        // Nor when the batches held beyond the push in flight reached a push bound already: they go first (and the
        // buffer is committed while they are pushed), unless everything is to be pushed now.
        let held_beyond = &self.unpushed[in_flight.min(self.unpushed.len())..];
        let bound_reached = self
            .push_rule(when)
            .bound_reached(held_beyond, Instant::now());
        let entries = (!self.buffer.is_empty()
            && held_beyond.len() < self.settings.push_max_batches
            && (matches!(when, PushWhen::Now) || !bound_reached))
            .then(|| Arc::new(self.buffer.entries().to_vec()));
        // A fetch moves the base: only when nothing is held on top of the old one (a push finds the new tip), or
        // after a rejected push (the held batches are then rebuilt on the new tip).
        let refetch = in_flight == 0
            && (self.refetch_before_push
                || self.unpushed.is_empty()
                    && self
                        .last_fetch
                        .is_none_or(|t| t.elapsed() >= self.settings.refetch_after));
        let mode = if in_flight > 0 {
            PushMode::Hold
        } else if matches!(when, PushWhen::Now) || self.refetch_before_push || self.unpushed_stale {
            PushMode::Serial
        } else {
            PushMode::Background
        };
        clone.pause_pack_merges(in_flight > 0);
        let context = PlanContext {
            bot_name: self.settings.bot_name.clone(),
            bot_email: self.settings.bot_email.clone(),
            deletes_cap: self.settings.deletes_cap,
            now_rfc3339: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        };
        let rule = self.push_rule(when);
        let max_retries = self.settings.push_max_retries;
        let push_duration = self.metrics.push_duration.with_label_values(&self.labels());
        let held = self.unpushed.clone();
        let stale = self.unpushed_stale;
        let ran = watchdog::run(network_deadline(), &self.abandoned, move |watch| {
            let outcome = flush_blocking(
                &mut clone,
                held,
                stale,
                entries,
                &context,
                refetch,
                &rule,
                mode,
                max_retries,
                &push_duration,
                watch,
            );
            (clone, outcome)
        })
        .await;
        if refetch {
            self.last_fetch = Some(Instant::now());
        }
        if ran.as_ref().is_some_and(|(_, o)| o.result.is_ok()) {
            self.refetch_before_push = false;
        }
        let outcome = match ran {
            Some((clone, outcome)) => {
                self.clone = Some(clone);
                outcome
            }
            None => {
                // The clone stays with the abandoned task; the next flush opens it afresh and rebuilds the held
                // batches (kept here) on whatever tip it finds. The buffer still holds its entries.
                self.clone = None;
                self.unpushed_stale = !self.unpushed.is_empty();
                return Err(FlushError::Git(self.abandoned_error()));
            }
        };
        self.unpushed = outcome.held;
        self.unpushed_stale = outcome.stale;
        if outcome.committed_buffer {
            // Its entries are the last held batch now.
            self.buffer.take();
            self.metrics
                .queue_depth
                .with_label_values(&self.labels())
                .set(0);
        }
        let step = outcome.result?;
        if let Step::Out { rejections, .. } = step
            && rejections > 0
        {
            self.metrics
                .rebase_retries
                .with_label_values(&self.labels())
                .inc_by(u64::from(rejections));
        }
        Ok(step)
    }

    /// Book-keeping after the oldest `count` held batches went out: metrics, statuses, acks, batch by batch in
    /// order.
    fn finish(&mut self, pushed: bool, rejections: u32, count: usize) -> FlushReport {
        let batches: Vec<Committed> = self
            .unpushed
            .drain(..count.min(self.unpushed.len()))
            .collect();
        if pushed {
            self.metrics.pushes.with_label_values(&self.labels()).inc();
            let tip = batches
                .last()
                .and_then(|b| b.tip)
                .map(|t| t.to_string())
                .unwrap_or_default();
            let commits: usize = batches.iter().map(|b| b.plan.commits.len()).sum();
            let mut status = self.status.lock().expect("status lock");
            status.last_commit_sha = tip.clone();
            status.last_commit_time = Some(Utc::now());
            drop(status);
            info!(
                worker = %self.id,
                commit = %tip,
                batches = batches.len(),
                commits,
                rejections,
                "pushed"
            );
        }
        self.status.lock().expect("status lock").last_error.clear();
        let mut report = FlushReport::default();
        for batch in batches {
            let batch_report = self.finish_batch(batch);
            report.files_changed += batch_report.files_changed;
            report.commit_sha = batch_report.commit_sha;
        }
        report
    }

    /// One batch of a push (or one that changed nothing): metrics, refusals, statuses and acks.
    fn finish_batch(&mut self, batch: Committed) -> FlushReport {
        let entries = &batch.entries;
        let plan = &batch.plan;
        let sha = batch.tip.map(|t| t.to_string()).unwrap_or_default();
        if !plan.commits.is_empty() {
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
            debug!(
                worker = %self.id,
                commit = %sha,
                commits = plan.commits.len(),
                written = plan.stats.written,
                deleted = plan.stats.deleted,
                orphans = plan.stats.orphans_deleted,
                noops = plan.stats.noops,
                "batch pushed"
            );
        } else {
            debug!(worker = %self.id, noops = plan.stats.noops, "batch had no effective change; no commit");
        }

        for fallback in &plan.edit_fallbacks {
            let [repo, branch] = self.labels();
            self.metrics
                .yaml_edit_fallbacks
                .with_label_values(&[repo, branch, fallback.reason])
                .inc();
            debug!(
                worker = %self.id,
                commit = %sha,
                path = %fallback.path,
                reason = fallback.reason,
                "the file's comments and layout could not be kept; rewritten whole"
            );
        }

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
        for (index, message) in &plan.namespace_clashes {
            let entry = &entries[*index];
            warn!(worker = %self.id, destination = %entry.destination.id, sequence = entry.sequence, %message, "namespace clash; write refused");
            self.metrics
                .messages_rejected
                .with_label_values(&[RejectReason::NamespaceClash.as_str()])
                .inc();
            entry.destination.origin.reject(
                &entry.destination.id.key,
                entry.sequence,
                RejectReason::NamespaceClash,
                message.clone(),
            );
        }
        self.report_kustomizations(entries, plan);
        for (index, why) in &batch.quarantined {
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
                .is_some_and(|c| c.status);
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
        // Sweeps that deleted something, per destination, once the commit holding the deletions is pushed.
        let mut swept: BTreeMap<&DestinationId, (&DestinationRef, usize, usize)> = BTreeMap::new();
        for &(index, deleted) in &plan.sweep_deletions {
            let destination = &entries[index].destination;
            swept
                .entry(&destination.id)
                .or_insert((destination, 0, 0))
                .1 += deleted;
        }
        for &(index, left) in &plan.truncated_sweeps {
            if let Some(found) = swept.get_mut(&entries[index].destination.id) {
                found.2 += left;
            }
        }
        for (destination, deleted, left) in swept.into_values() {
            destination.sweep_report(deleted, left, &sha);
        }
        self.answer_flushes(entries, plan, &sha);
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
        for entry in entries.iter() {
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
            origin.send(Reply::Ack {
                destination: id.key.clone(),
                sequence,
                commit_sha: sha.clone(),
            });
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

    /// Tells each CommitRequest of a pushed batch which commit holds it: its own commit, or (nothing of its
    /// destination was pending) the pushed tip that already holds every earlier change.
    fn answer_flushes(&self, entries: &[batch::Entry], plan: &Plan, tip: &str) {
        for (index, entry) in entries.iter().enumerate() {
            let batch::EntryOp::Flush(order) = &entry.op else {
                continue;
            };
            if plan.refused_entries.contains(&index) {
                continue;
            }
            let commit = plan
                .commits
                .iter()
                .find(|c| c.flush == Some(index))
                .and_then(|c| c.id.clone());
            let (outcome, sha, message) = match commit {
                Some(sha) => (
                    reply::FlushOutcome::Committed,
                    sha,
                    "committed the destination's pending changes".to_owned(),
                ),
                None if tip.is_empty() => (
                    reply::FlushOutcome::NothingPending,
                    String::new(),
                    "nothing was pending and the branch has no commit yet; no commit was made".to_owned(),
                ),
                None => (
                    reply::FlushOutcome::NothingPending,
                    tip.to_owned(),
                    "nothing of the destination was pending; the branch tip already holds every earlier change, no commit was made".to_owned(),
                ),
            };
            info!(worker = %self.id, destination = %entry.destination.id, request = %order.request_name, commit = %sha, outcome = outcome.as_str(), "commit request answered");
            entry
                .destination
                .origin
                .send(Reply::FlushResult(FlushResult {
                    destination: entry.destination.id.key.clone(),
                    request_uid: order.request_uid.clone(),
                    commit_sha: sha,
                    outcome,
                    branch: self.spec.branch.clone(),
                    message,
                }));
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

    /// Kustomizations left alone: condition, metric and log per destination; cleared once they edit again.
    fn report_kustomizations(&self, entries: &[batch::Entry], plan: &Plan) {
        let mut problems: BTreeMap<&DestinationId, (&DestinationRef, Vec<&str>)> = BTreeMap::new();
        for (index, problem) in &plan.kustomization_problems {
            let destination = &entries[*index].destination;
            problems
                .entry(&destination.id)
                .or_insert((destination, Vec::new()))
                .1
                .push(problem);
        }
        for (destination, found) in problems.values() {
            warn!(worker = %self.id, destination = %destination.id, problems = ?found, "kustomization left as it is");
            self.metrics
                .kustomization_problems
                .with_label_values(&[destination.id.key.as_str()])
                .inc_by(found.len() as u64);
            destination.report(
                ConditionType::KustomizationUnreadable,
                true,
                ConditionReason::KustomizationInvalid,
                format!(
                    "left as it is (its files are written but not listed): {}",
                    found.join("; ")
                ),
            );
        }
        for &index in &plan.kustomization_checked {
            let destination = &entries[index].destination;
            if problems.contains_key(&destination.id) {
                continue;
            }
            let unreadable = destination
                .conditions
                .lock()
                .expect("conditions lock")
                .get(ConditionType::KustomizationUnreadable.as_str())
                .is_some_and(|c| c.status);
            if unreadable {
                destination.report(
                    ConditionType::KustomizationUnreadable,
                    false,
                    ConditionReason::KustomizationUpdated,
                    "every kustomization the last batch touched was edited",
                );
            }
        }
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
            let held = self.unpushed.iter().flat_map(|c| c.entries.iter());
            for entry in held.chain(self.buffer.entries()) {
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
        // Held batches are not acked yet: still pending for the agents.
        status.pending_entries =
            self.buffer.len() + self.unpushed.iter().map(|c| c.entries.len()).sum::<usize>();
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

/// The git work of a flush, on the blocking pool: commit the buffer's entries (if given) on top of the held
/// batches, then push them all if the rule says so. A rejected push fetches and plans every held batch again, in
/// order, on the new tip, then pushes again. The held batches come back in every case.
#[allow(clippy::too_many_arguments)]
fn flush_blocking(
    clone: &mut Clone,
    mut held: Vec<Committed>,
    stale: bool,
    entries: Option<Arc<Vec<batch::Entry>>>,
    context: &PlanContext,
    refetch: bool,
    rule: &PushRule,
    mode: PushMode,
    max_retries: u32,
    push_duration: &prometheus::Histogram,
    watch: &watchdog::NetworkWatch,
) -> FlushOutcome {
    let mut committed_buffer = false;
    let mut stale = stale;
    let result = (|| {
        if refetch {
            watch.network(|| clone.fetch()).map_err(FlushError::Git)?;
        }
        // Held batches built on another commit than the base (or maybe lost with an abandoned clone): rebuild.
        if stale || held.first().is_some_and(|c| c.parent != clone.base()) {
            rebuild(clone, &mut held, context)?;
            stale = false;
        }
        if let Some(entries) = entries {
            let parent = held.last().map_or(clone.base(), |c| c.tip);
            held.push(commit_batch(clone, entries, parent, Vec::new(), context)?);
            committed_buffer = true;
        }
        if mode == PushMode::Hold || !rule.due(&held, Instant::now()) {
            return Ok(Step::Held);
        }
        if mode == PushMode::Background {
            return Ok(if held.iter().all(|c| c.plan.commits.is_empty()) {
                Step::Out {
                    pushed: false,
                    rejections: 0,
                }
            } else {
                Step::PushDue
            });
        }
        push_held(clone, &mut held, context, max_retries, push_duration, watch)
    })();
    FlushOutcome {
        held,
        stale,
        committed_buffer,
        result,
    }
}

/// Pushes the last held batch's tip (which carries every held batch); on a rejection fetches, rebuilds them all on
/// the new tip and pushes again, up to `max_retries` times.
fn push_held(
    clone: &mut Clone,
    held: &mut Vec<Committed>,
    context: &PlanContext,
    max_retries: u32,
    push_duration: &prometheus::Histogram,
    watch: &watchdog::NetworkWatch,
) -> Result<Step, FlushError> {
    let mut rejections = 0;
    loop {
        if held.iter().all(|c| c.plan.commits.is_empty()) {
            return Ok(Step::Out {
                pushed: false,
                rejections,
            });
        }
        let tip = held
            .last()
            .and_then(|c| c.tip)
            .expect("a held batch with commits has a tip");
        let timer = push_duration.start_timer();
        let pushed = watch.network(|| clone.push(tip));
        timer.observe_duration();
        match pushed.map_err(FlushError::Git)? {
            PushOutcome::Pushed => {
                return Ok(Step::Out {
                    pushed: true,
                    rejections,
                });
            }
            PushOutcome::Rejected => {
                rejections += 1;
                if rejections > max_retries {
                    // Re-fetch so the next attempt starts from the newest tip (it rebuilds the held batches).
                    let _ = watch.network(|| clone.fetch());
                    return Err(FlushError::TooManyRejections(rejections));
                }
                info!(
                    attempt = rejections,
                    batches = held.len(),
                    "push rejected (non-fast-forward); fetching and replaying"
                );
                watch.network(|| clone.fetch()).map_err(FlushError::Git)?;
                std::thread::sleep(Duration::from_millis(50u64 << rejections.min(6)));
                rebuild(clone, held, context)?;
            }
        }
    }
}

/// Plans and commits every held batch again, in order, on the clone's base (the remote tip).
/// All or nothing: on an error `held` keeps its former chain (built on an older base, so rebuilt next time).
fn rebuild(
    clone: &mut Clone,
    held: &mut Vec<Committed>,
    context: &PlanContext,
) -> Result<(), FlushError> {
    let mut parent = clone.base();
    let mut rebuilt = Vec::with_capacity(held.len());
    for batch in held.iter() {
        let again = commit_batch(
            clone,
            batch.entries.clone(),
            parent,
            batch.quarantined.clone(),
            context,
        )?;
        parent = again.tip;
        rebuilt.push(Committed {
            committed_at: batch.committed_at,
            ..again
        });
    }
    *held = rebuilt;
    Ok(())
}

/// Plans `entries` on top of `parent` and creates their commits, leaving out the messages in `quarantined` and any
/// others git refuses even alone (see [`batch::quarantine`]).
fn commit_batch(
    clone: &mut Clone,
    entries: Arc<Vec<batch::Entry>>,
    parent: Option<git2::Oid>,
    mut quarantined: Vec<(usize, String)>,
    context: &PlanContext,
) -> Result<Committed, FlushError> {
    let candidates: Vec<usize> = (0..entries.len())
        .filter(|i| !quarantined.iter().any(|(q, _)| q == i))
        .collect();
    let isolated = batch::quarantine::isolate(&candidates, parent, &mut |subset, parent| {
        build_commits(clone, &entries, subset, *parent, context)
    })?;
    quarantined.extend(isolated.refused);
    quarantined.sort_by_key(|(i, _)| *i);
    let mut pieces = isolated.built.into_iter();
    let mut plan = pieces.next().unwrap_or_default();
    pieces.for_each(|piece| plan.absorb(piece));
    let tip = if plan.commits.is_empty() {
        parent
    } else {
        isolated.end
    };
    Ok(Committed {
        entries,
        plan: Arc::new(plan),
        parent,
        tip,
        quarantined,
        committed_at: Instant::now(),
    })
}

/// How long a worker that just held a full batch waits for the next change before it pushes: a seed streams
/// changes with short gaps (flow control, the agents' checks), and a push in each gap would undo the coalescing.
const LINGER: Duration = Duration::from_millis(50);

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Whether more changes wait in a worker's queue (then a committed batch may wait for the next ones).
fn waiting(receiver: &mpsc::Receiver<Command>) -> PushWhen {
    PushWhen::Due {
        more_waiting: !receiver.is_empty(),
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
    let mut plan = plan;
    let mut tip = parent;
    for commit in plan.commits.iter_mut() {
        let meta = CommitMeta {
            author_name: commit.author_name.clone(),
            author_email: commit.author_email.clone(),
            committer_name: context.bot_name.clone(),
            committer_email: context.bot_email.clone(),
            message: commit.message.clone(),
        };
        match clone.commit(tip, &commit.changes, &meta) {
            Ok(id) => {
                tip = Some(id);
                commit.id = Some(id.to_string());
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn held(ages: &[Duration], bytes: usize, now: Instant) -> Vec<Committed> {
        ages.iter()
            .map(|age| {
                let mut plan = Plan::default();
                plan.stats.bytes = bytes;
                Committed {
                    entries: Arc::new(Vec::new()),
                    plan: Arc::new(plan),
                    parent: None,
                    tip: None,
                    quarantined: Vec::new(),
                    committed_at: now - *age,
                }
            })
            .collect()
    }

    fn rule(more_waiting: bool) -> PushRule {
        PushRule {
            when: PushWhen::Due { more_waiting },
            queue: None,
            max_batches: 3,
            max_delay: Duration::from_secs(10),
            max_bytes: 1000,
        }
    }

    #[test]
    fn held_batches_wait_only_while_more_changes_wait_and_no_bound_is_reached() {
        let now = Instant::now();
        let young = [Duration::from_secs(1), Duration::ZERO];
        assert!(!rule(true).due(&held(&young, 10, now), now));
        // The queue is empty: push.
        assert!(rule(false).due(&held(&young, 10, now), now));
        // An explicit flush or a shutdown: push.
        let now_rule = PushRule {
            when: PushWhen::Now,
            ..rule(true)
        };
        assert!(now_rule.due(&held(&young, 10, now), now));
        // Each bound alone.
        let three = [Duration::ZERO; 3];
        assert!(rule(true).due(&held(&three, 10, now), now), "max batches");
        let old = [Duration::from_secs(10)];
        assert!(rule(true).due(&held(&old, 10, now), now), "max delay");
        assert!(rule(true).due(&held(&young, 500, now), now), "max bytes");
        assert!(!rule(true).due(&held(&young, 499, now), now));
    }

    #[test]
    fn the_queue_is_looked_at_again_when_the_push_is_decided() {
        let now = Instant::now();
        let young = held(&[Duration::ZERO], 10, now);
        let (sender, mut receiver) = mpsc::channel(4);
        let probed = PushRule {
            queue: Some(QueueProbe(sender.downgrade())),
            ..rule(false)
        };
        // Empty when the flush started and still empty: push.
        assert!(probed.due(&young, now));
        // A change arrived while the batch was being committed: the stream goes on, hold.
        sender
            .try_send(Command::SetCredentials(None))
            .expect("room in the queue");
        assert!(!probed.due(&young, now));
        // The bounds still force the push.
        let bounded = PushRule {
            queue: Some(QueueProbe(sender.downgrade())),
            ..rule(false)
        };
        assert!(bounded.due(&held(&[Duration::ZERO; 3], 10, now), now));
        // Drained again: push.
        assert!(receiver.try_recv().is_ok());
        assert!(probed.due(&young, now));
        // No sender left (the worker is stopping): nothing more can arrive, push.
        sender
            .try_send(Command::SetCredentials(None))
            .expect("room in the queue");
        drop(sender);
        assert!(probed.due(&young, now), "a closed queue is not looked into");
    }
}
