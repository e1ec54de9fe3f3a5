//! The agent's gRPC stream client: delivers [`AgentEvent`]s to the writer at least once.
//!
//! Data flow:
//!
//! ```text
//! ingestion ──AgentEvent──▶ bounded mpsc ──▶ Backlog (sequence numbers, unacked per destination)
//!     ▲                    (not read while       │ on Welcome: Destination*, then every unacked message
//!     │                     max_unacked are      ▼
//!     │                     outstanding)     Writer.Sync stream ──▶ writer
//!     │                                          │
//!     └──────── Feedback (mpsc) ◀──────── Ack / Reject / DestinationStatus, connection state
//! ```
//!
//! - Every change gets the next sequence number of its destination; numbers are never reused, not even after a
//!   reconnect. A message stays in the backlog until an `Ack` covers it or a `Reject` names it.
//! - With `max_unacked` messages outstanding the client stops reading the events channel: the channel fills up
//!   and ingestion waits (backpressure). Nothing is ever dropped for lack of room.
//! - When the stream fails or the writer ends it, the client reconnects with exponential backoff and jitter,
//!   says `Hello`, re-declares every destination and re-sends every unacked message in order with its original
//!   sequence number. The writer treats re-sent changes that are already pushed as no-ops.
//! - After every reconnect [`Feedback::Reconnected`] tells ingestion to start fresh snapshot epochs for every
//!   scope: the writer may have lost open snapshots. A `SnapshotEnd` whose epoch did not go out whole on the
//!   current connection is never sent ([`Feedback::SnapshotAbandoned`]), so the writer never deletes orphans on
//!   an incomplete seen-set; see [`backlog`] for the rules.
//! - Fencing: with leader election every stream names the leader term it speaks for (`Hello.leader_term`), and
//!   nothing is sent unless the Lease is provably still ours ([`LeaderFence`]: its validity deadline on the
//!   monotonic clock). A process that was frozen past that deadline sends nothing once it runs again, not even
//!   before its elector tries to renew. A `Reject` with reason `StaleLeaderTerm` (a newer leader said Hello to the
//!   writer) ends the client's sending for good: the term can never become current again.
//! - Limits: the writer announces its largest message in `Welcome`. Every message is measured before it goes out;
//!   an upsert that does not fit is not sent (it would end the stream and loop): it is dropped from the backlog,
//!   counted (`objects_too_large`, per destination), logged at WARN and reported as [`Feedback::ObjectsSkipped`]
//!   naming it, and the open snapshots of its scope lose their end (nothing of the scope is deleted, since the
//!   object still exists). Everything else flows.
//! - When the events channel closes, the client half-closes the stream once everything is sent (the writer
//!   then pushes at once) and returns when every message is acked. On shutdown it half-closes and waits at
//!   most `shutdown_grace` for the acks.

pub mod backlog;

use std::{
    collections::VecDeque,
    error::Error as _,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{debug, info, warn};

use reverser_proto::{
    PROTOCOL_VERSION,
    v1::{self as pb, writer_client::WriterClient, writer_message::Kind as Reply},
};

use crate::events::{
    AgentEvent, DestinationCondition, Feedback, FlushAnswer, Rejection, SuspendPreview,
};
use backlog::Backlog;
use reverser_common::backoff::Backoff;
use reverser_common::lease::{LeaseState, Tenure};

/// The leader term a stream speaks for, and the elector's view of the Lease to prove it is still current.
#[derive(Clone, Debug)]
pub struct LeaderFence {
    /// The term as acquired (named in every `Hello`).
    pub term: Tenure,
    /// The elector's view of the Lease (renewals move its tenure's deadline; no tenure or another term: not ours).
    pub lease: tokio::sync::watch::Receiver<LeaseState>,
}

impl LeaderFence {
    /// Whether the Lease is provably ours now (same term, renewal deadline not passed on the monotonic clock).
    pub fn is_current(&self) -> bool {
        self.lease
            .borrow()
            .tenure
            .as_ref()
            .is_some_and(|t| t.same_term(&self.term) && t.is_current())
    }

    fn hello_term(&self) -> pb::LeaderTerm {
        pb::LeaderTerm {
            lease_uid: self.term.lease_uid.clone(),
            transitions: self.term.transitions,
            holder: self.term.holder.clone(),
        }
    }
}

/// Encoded size the writer is assumed to accept when its `Welcome` does not say (tonic's default).
const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Objects named in an `ObjectsSkipped` condition message.
const SKIPPED_NAMED: usize = 10;

/// Who the agent is, sent in `Hello` and recorded in commit trailers and ownership markers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentIdentity {
    /// UID of the cluster's `kube-system` namespace.
    pub cluster_uid: String,
    pub cluster_name: String,
    /// This agent process, usually the Pod name.
    pub instance_id: String,
    pub controller_namespace: String,
    pub controller_name: String,
}

/// TLS to the writer. Without a client certificate this is server-authenticated TLS only.
#[derive(Clone)]
pub struct TlsSettings {
    /// PEM CA bundle the writer's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// PEM client certificate chain for mTLS (with `client_key_pem`).
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
    /// Name to verify the writer's certificate against, when it differs from the URL's host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for TlsSettings {
    // Never print the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("client_cert", &self.client_cert_pem.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// How to reach the writer and how patient to be.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// `http://host:port`, or `https://host:port` with [`StreamConfig::tls`].
    pub writer_url: String,
    pub tls: Option<TlsSettings>,
    pub identity: AgentIdentity,
    /// Messages sent but not yet acked before the client stops reading events (at least 1).
    pub max_unacked: usize,
    /// First reconnect delay; doubles per failed attempt up to `backoff_max` (±20 % jitter).
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Limit for the TCP/TLS connect and for the writer's `Welcome`.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive pings: a dead writer is noticed after about interval + timeout.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// On shutdown, how long to wait for acks of what was already sent.
    pub shutdown_grace: Duration,
    /// The leader term of this client (None without leader election: nothing to prove).
    pub fence: Option<LeaderFence>,
    /// Counter of objects skipped as too large, labelled `destination` (the agent's `/metrics`).
    pub objects_too_large: Option<prometheus::IntCounterVec>,
    /// Counters to add to (the process's, registered once and shared by every leader term's client); `None`:
    /// counters of this client alone.
    pub stats: Option<Arc<StreamStats>>,
}

impl StreamConfig {
    /// Defaults: 1000 unacked messages, backoff 500 ms .. 30 s, keepalive 30 s / 20 s.
    pub fn new(writer_url: impl Into<String>, identity: AgentIdentity) -> Self {
        Self {
            writer_url: writer_url.into(),
            tls: None,
            identity,
            max_unacked: 1000,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(5),
            fence: None,
            objects_too_large: None,
            stats: None,
        }
    }
}

/// A configuration the client cannot work with (everything else is retried, never fatal).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("invalid writer URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid TLS settings: {0}")]
    Tls(String),
    #[error("invalid stream settings: {0}")]
    Settings(String),
}

/// The domain form of a writer `SuspendPreview`.
fn suspend_preview(preview: pb::SuspendPreview) -> SuspendPreview {
    SuspendPreview {
        destination: preview.destination,
        added: preview.added,
        changed: preview.changed,
        deleted: preview.deleted,
        added_paths: preview.added_paths,
        changed_paths: preview.changed_paths,
        deleted_paths: preview.deleted_paths,
        paths_cap: preview.paths_cap,
        base_commit: preview.base_commit,
        held_messages: preview.held_messages,
    }
}

/// Connection state and a CommitRequest's answer are never dropped from the feedback queue.
fn is_connection_state(feedback: &Feedback) -> bool {
    matches!(
        feedback,
        Feedback::Connected | Feedback::Reconnected | Feedback::Disconnected { .. }
            // A CommitRequest waits for its one answer: never dropped either.
            | Feedback::Flushed(_)
            | Feedback::FlushRefused { .. }
    )
}

/// Counters for the agent's `/metrics`, updated as the stream works.
#[derive(Debug, Default)]
pub struct StreamStats {
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    reconnects: AtomicU64,
    unacked: AtomicU64,
    snapshots_abandoned: AtomicU64,
    feedback_dropped: AtomicU64,
    objects_too_large: AtomicU64,
    connected: AtomicBool,
    /// Events taken from ingestion, by [`EVENT_KINDS`].
    events: [AtomicU64; EVENT_KINDS.len()],
}

/// `kind` label values of `events_total`.
const EVENT_KINDS: [&str; 6] = [
    "destination",
    "upsert",
    "delete",
    "snapshot_begin",
    "snapshot_end",
    "flush",
];

fn event_kind(event: &AgentEvent) -> usize {
    match event {
        AgentEvent::Destination(_) => 0,
        AgentEvent::Upsert { .. } => 1,
        AgentEvent::Delete { .. } => 2,
        AgentEvent::SnapshotBegin { .. } => 3,
        AgentEvent::SnapshotEnd { .. } => 4,
        AgentEvent::Flush { .. } => 5,
    }
}

impl StreamStats {
    /// Sequenced messages written to a stream, re-sends included.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Messages an `Ack` covered.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
    /// Messages a `Reject` named.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
    /// Connections established after the first.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
    /// Messages waiting for an ack (gauge).
    pub fn unacked(&self) -> u64 {
        self.unacked.load(Ordering::Relaxed)
    }
    /// `SnapshotEnd`s dropped by the snapshot-safety rule.
    pub fn snapshots_abandoned(&self) -> u64 {
        self.snapshots_abandoned.load(Ordering::Relaxed)
    }
    /// Rejects and statuses dropped because the feedback receiver fell far behind.
    pub fn feedback_dropped(&self) -> u64 {
        self.feedback_dropped.load(Ordering::Relaxed)
    }
    /// Upserts not sent because they exceed the writer's limits.
    pub fn objects_too_large(&self) -> u64 {
        self.objects_too_large.load(Ordering::Relaxed)
    }
    /// Whether a welcomed connection is up (gauge).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Registers the stream's counters (`stream_*_total`, `events_total{kind}`) in `registry`. The gauges
    /// (`stream_connected`, `stream_unacked`) belong to the running term and are registered by it.
    pub fn register(
        self: &Arc<Self>,
        registry: &prometheus::Registry,
    ) -> Result<(), prometheus::Error> {
        let read = |value: fn(&StreamStats) -> u64| {
            let stats = Arc::clone(self);
            move || value(&stats)
        };
        let events = Arc::clone(self);
        crate::metrics::ScrapedFamilies::new()
            .counter(
                "stream_messages_sent_total",
                "Sequenced messages written to the writer stream, re-sends included",
                read(StreamStats::sent),
            )?
            .counter("stream_messages_acked_total", "Messages the writer acked", read(StreamStats::acked))?
            .counter(
                "stream_messages_rejected_total",
                "Messages the writer rejected",
                read(StreamStats::rejected),
            )?
            .counter(
                "stream_reconnects_total",
                "Writer stream connections after the first",
                read(StreamStats::reconnects),
            )?
            .counter(
                "stream_snapshots_abandoned_total",
                "Snapshot ends dropped because their epoch did not go out whole",
                read(StreamStats::snapshots_abandoned),
            )?
            .counter(
                "stream_feedback_dropped_total",
                "Writer rejects and statuses dropped because their receiver fell far behind",
                read(StreamStats::feedback_dropped),
            )?
            .counter_by(
                "events_total",
                "Events ingestion produced, by kind (upsert, delete, snapshot_begin, snapshot_end, destination)",
                "kind",
                move || {
                    EVENT_KINDS
                        .iter()
                        .zip(&events.events)
                        .filter(|(_, count)| count.load(Ordering::Relaxed) > 0)
                        .map(|(kind, count)| ((*kind).to_owned(), count.load(Ordering::Relaxed)))
                        .collect()
                },
            )?
            .register(registry)
    }
}

/// Rejects and statuses kept for a slow feedback receiver before the oldest are dropped.
const FEEDBACK_BACKLOG: usize = 1024;
/// Messages buffered between the client loop and tonic's request stream.
const SEND_BUFFER: usize = 16;

/// The stream client. Build it with [`StreamClient::new`], keep [`StreamClient::stats`], then
/// [`StreamClient::run`] or [`StreamClient::spawn`] it.
#[derive(Debug)]
pub struct StreamClient {
    config: StreamConfig,
    endpoint: Endpoint,
    stats: Arc<StreamStats>,
}

/// Builds a client from `config` and runs it until the events channel is closed and everything was acked, or
/// `shutdown` completes.
pub async fn run(
    config: StreamConfig,
    events: mpsc::Receiver<AgentEvent>,
    feedback: mpsc::Sender<Feedback>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StreamError> {
    StreamClient::new(config)?
        .run(events, feedback, shutdown)
        .await;
    Ok(())
}

impl StreamClient {
    /// Validates `config` and prepares the endpoint (no connection yet).
    pub fn new(config: StreamConfig) -> Result<Self, StreamError> {
        let endpoint = endpoint(&config)?;
        let stats = config.stats.clone().unwrap_or_default();
        Ok(Self {
            config,
            endpoint,
            stats,
        })
    }

    pub fn stats(&self) -> Arc<StreamStats> {
        self.stats.clone()
    }

    /// Runs the client on its own task.
    pub fn spawn(
        self,
        events: mpsc::Receiver<AgentEvent>,
        feedback: mpsc::Sender<Feedback>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        tokio::spawn(self.run(events, feedback, shutdown))
    }

    /// Connects, streams and reconnects until the events channel is closed and everything was acked, or
    /// `shutdown` completes (then it waits at most `shutdown_grace` for acks of what was sent).
    pub async fn run(
        self,
        events: mpsc::Receiver<AgentEvent>,
        feedback: mpsc::Sender<Feedback>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let mut runner = Runner {
            config: self.config,
            endpoint: self.endpoint,
            stats: self.stats,
            backlog: Backlog::new(),
            events,
            events_closed: false,
            feedback: Outbox {
                sender: feedback,
                queue: VecDeque::new(),
            },
            shutdown: Box::pin(shutdown),
            shutdown_requested: false,
            ever_connected: false,
            fenced: false,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_object_bytes: 0,
            skipped: std::collections::BTreeMap::new(),
        };
        runner.run().await;
        runner.feedback.flush_now(&runner.stats);
    }
}

fn endpoint(config: &StreamConfig) -> Result<Endpoint, StreamError> {
    let invalid = |reason: String| StreamError::InvalidUrl {
        url: config.writer_url.clone(),
        reason,
    };
    let identity = &config.identity;
    for (field, value) in [
        ("cluster_uid", &identity.cluster_uid),
        ("instance_id", &identity.instance_id),
        ("controller_namespace", &identity.controller_namespace),
        ("controller_name", &identity.controller_name),
    ] {
        // The writer refuses a Hello without them; better to fail at start than to retry forever.
        if value.trim().is_empty() {
            return Err(StreamError::Settings(format!(
                "identity.{field} is required"
            )));
        }
    }
    if config.max_unacked == 0 {
        return Err(StreamError::Settings(
            "max_unacked must be at least 1".into(),
        ));
    }
    if config.backoff_initial.is_zero() || config.backoff_max < config.backoff_initial {
        return Err(StreamError::Settings(
            "backoff_initial must be positive and at most backoff_max".into(),
        ));
    }
    let endpoint = Endpoint::from_shared(config.writer_url.clone())
        .map_err(|e| invalid(e.to_string()))?
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let https = match endpoint.uri().scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(invalid("the scheme must be http or https".into())),
    };
    match (&config.tls, https) {
        (None, false) => Ok(endpoint),
        (None, true) => Err(StreamError::Tls(
            "an https:// writer URL needs TLS settings (at least the CA)".into(),
        )),
        // tonic would silently speak plaintext to an http:// URL despite the TLS settings.
        (Some(_), false) => Err(StreamError::Tls(
            "TLS settings need an https:// writer URL".into(),
        )),
        (Some(tls), true) => {
            let mut client =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            match (&tls.client_cert_pem, &tls.client_key_pem) {
                (Some(cert), Some(key)) => {
                    client = client.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => {
                    return Err(StreamError::Tls(
                        "a client certificate needs its key and vice versa".into(),
                    ));
                }
            }
            if let Some(domain) = &tls.domain {
                client = client.domain_name(domain.clone());
            }
            endpoint
                .tls_config(client)
                .map_err(|e| StreamError::Tls(error_chain(&e)))
        }
    }
}

/// An error with its sources: tonic's top-level transport errors alone say little ("transport error").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Feedback that never blocks the stream: sent right away when the receiver has room, else queued and
/// delivered from the client loop. Connection-state changes are always kept (ingestion must not miss a
/// reconnect); rejects and statuses beyond [`FEEDBACK_BACKLOG`] are dropped and counted.
struct Outbox {
    sender: mpsc::Sender<Feedback>,
    queue: VecDeque<Feedback>,
}

impl Outbox {
    fn push(&mut self, feedback: Feedback, stats: &StreamStats) {
        if self.sender.is_closed() {
            return;
        }
        let feedback = if self.queue.is_empty() {
            match self.sender.try_send(feedback) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(feedback)) => feedback,
            }
        } else {
            feedback
        };
        if !is_connection_state(&feedback) && self.queue.len() >= FEEDBACK_BACKLOG {
            StreamStats::add(&stats.feedback_dropped, 1);
            warn!(
                ?feedback,
                "feedback receiver is far behind; dropping feedback"
            );
            return;
        }
        self.queue.push_back(feedback);
    }

    /// Best effort at the end of `run`.
    fn flush_now(&mut self, stats: &StreamStats) {
        while let Some(feedback) = self.queue.pop_front() {
            if self.sender.try_send(feedback).is_err() {
                StreamStats::add(&stats.feedback_dropped, 1 + self.queue.len() as u64);
                self.queue.clear();
            }
        }
    }
}

/// Waits for room on `sender`; never completes when there is no sender (a disabled select branch).
async fn reserve<T>(sender: &Option<mpsc::Sender<T>>) -> Option<mpsc::Permit<'_, T>> {
    match sender {
        Some(sender) => sender.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

/// Why a connection ended.
enum Ended {
    /// The events channel is closed and every message was acked.
    Finished,
    Shutdown,
    /// Reconnect. `welcomed`: the connection had been up.
    Lost {
        error: String,
        welcomed: bool,
    },
    /// The writer refused our leader term: never send again.
    Fenced(String),
}

struct Runner {
    config: StreamConfig,
    endpoint: Endpoint,
    stats: Arc<StreamStats>,
    backlog: Backlog,
    events: mpsc::Receiver<AgentEvent>,
    events_closed: bool,
    feedback: Outbox,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    shutdown_requested: bool,
    ever_connected: bool,
    /// The writer refused our leader term.
    fenced: bool,
    /// The writer's limits from its `Welcome`.
    max_message_bytes: usize,
    max_object_bytes: usize,
    /// Objects not sent for their size: destination → path → description.
    skipped: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
}

type Replies = tonic::Streaming<pb::WriterMessage>;

impl Drop for Runner {
    // The stats may outlive this client (one set for every leader term): a stopped client is not connected and
    // waits for no acks.
    fn drop(&mut self) {
        self.stats.connected.store(false, Ordering::Relaxed);
        self.stats.unacked.store(0, Ordering::Relaxed);
    }
}

impl Runner {
    async fn run(&mut self) {
        // `backoff_initial * 2^(attempt-1)`, capped at `backoff_max`, ±20 %.
        let mut reconnect = Backoff::new(self.config.backoff_initial, self.config.backoff_max)
            .with_jitter(0.8, 1.2);
        // Whether the current outage was reported (once per outage, not per attempt).
        let mut outage_reported = false;
        loop {
            if self.finished() {
                return;
            }
            match self.connection().await {
                Ended::Finished => {
                    info!("every event was delivered and acked; stream client done");
                    return;
                }
                Ended::Shutdown => {
                    info!(
                        unacked = self.backlog.unacked(),
                        "stream client stopped (shutdown)"
                    );
                    return;
                }
                Ended::Fenced(message) => {
                    self.backlog.end_connection();
                    self.stats.connected.store(false, Ordering::Relaxed);
                    self.fenced = true;
                    warn!(%message, "the writer refused this leader term: sending nothing more");
                    self.feedback.push(
                        Feedback::Disconnected {
                            error: format!("superseded leader term: {message}"),
                        },
                        &self.stats,
                    );
                    self.feedback
                        .push(Feedback::Fenced { message }, &self.stats);
                    // Wait for the end of the term (the elector notices, or shutdown) without sending.
                    while self.idle(Instant::now() + Duration::from_secs(3600)).await {}
                    return;
                }
                Ended::Lost { error, welcomed } => {
                    self.backlog.end_connection();
                    self.stats.connected.store(false, Ordering::Relaxed);
                    if welcomed {
                        reconnect.reset();
                        outage_reported = false;
                    }
                    let delay = reconnect.next_delay();
                    warn!(%error, retry_in = ?delay, unacked = self.backlog.unacked(), "writer stream lost; reconnecting");
                    if !outage_reported {
                        outage_reported = true;
                        self.feedback
                            .push(Feedback::Disconnected { error }, &self.stats);
                    }
                    if !self.idle(Instant::now() + delay).await {
                        return;
                    }
                }
            }
        }
    }

    fn finished(&self) -> bool {
        self.events_closed && self.backlog.unacked() == 0
    }

    fn set_unacked(&self) {
        self.stats
            .unacked
            .store(self.backlog.unacked() as u64, Ordering::Relaxed);
    }

    fn room(&self) -> bool {
        !self.events_closed
            && !self.shutdown_requested
            && self.backlog.unacked() < self.config.max_unacked
    }

    fn on_event(&mut self, event: Option<AgentEvent>) {
        match event {
            Some(event) => {
                StreamStats::add(&self.stats.events[event_kind(&event)], 1);
                if let Some(abandoned) = self.backlog.accept(event, SystemTime::now()) {
                    self.abandon(abandoned);
                }
                self.set_unacked();
            }
            None => {
                debug!("events channel closed; finishing once everything is acked");
                self.events_closed = true;
            }
        }
    }

    fn abandon(&mut self, abandoned: backlog::Abandoned) {
        warn!(destination = %abandoned.destination, sequence = abandoned.sequence, scope = ?abandoned.scope,
            epoch = abandoned.epoch, "SnapshotEnd dropped: its epoch did not go out whole on this connection, so nothing is deleted");
        StreamStats::add(&self.stats.snapshots_abandoned, 1);
        self.feedback.push(
            Feedback::SnapshotAbandoned {
                destination: abandoned.destination,
                scope: abandoned.scope,
                epoch: abandoned.epoch,
            },
            &self.stats,
        );
    }

    /// Waits out a backoff delay while still buffering events (up to `max_unacked`). `false`: stop running.
    async fn idle(&mut self, until: Instant) -> bool {
        loop {
            if self.finished() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                _ = self.shutdown.as_mut(), if !self.shutdown_requested => {
                    self.shutdown_requested = true;
                    return false;
                }
                event = self.events.recv(), if self.room() => self.on_event(event),
                permit = self.feedback.sender.clone().reserve_owned(), if !self.feedback.queue.is_empty() => {
                    match permit {
                        Ok(permit) => if let Some(f) = self.feedback.queue.pop_front() { permit.send(f); },
                        Err(_) => self.feedback.queue.clear(),
                    }
                }
            }
        }
    }

    async fn open(
        endpoint: &Endpoint,
        identity: &AgentIdentity,
        leader_term: Option<pb::LeaderTerm>,
    ) -> Result<(mpsc::Sender<pb::AgentMessage>, Replies), String> {
        let channel = endpoint.connect().await.map_err(|e| error_chain(&e))?;
        let (sender, receiver) = mpsc::channel(SEND_BUFFER);
        let hello = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                cluster_uid: identity.cluster_uid.clone(),
                cluster_name: identity.cluster_name.clone(),
                instance_id: identity.instance_id.clone(),
                controller_namespace: identity.controller_namespace.clone(),
                controller_name: identity.controller_name.clone(),
                protocol_version: PROTOCOL_VERSION,
                leader_term,
            })),
        };
        sender
            .try_send(hello)
            .map_err(|_| "the request stream refused the Hello".to_owned())?;
        let response = WriterClient::new(channel)
            .sync(ReceiverStream::new(receiver))
            .await
            .map_err(|status| status_text(&status))?;
        Ok((sender, response.into_inner()))
    }

    /// One connection, from connect to loss (or to the end of the run).
    async fn connection(&mut self) -> Ended {
        let opened = tokio::select! {
            _ = self.shutdown.as_mut(), if !self.shutdown_requested => {
                self.shutdown_requested = true;
                return Ended::Shutdown;
            }
            opened = tokio::time::timeout(self.config.connect_timeout, Self::open(&self.endpoint, &self.config.identity,
                self.config.fence.as_ref().map(LeaderFence::hello_term))) => opened,
        };
        let (sender, mut replies) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(error)) => {
                return Ended::Lost {
                    error,
                    welcomed: false,
                };
            }
            Err(_) => {
                return Ended::Lost {
                    error: format!(
                        "no stream within {:?} (connect timeout)",
                        self.config.connect_timeout
                    ),
                    welcomed: false,
                };
            }
        };
        let mut sender = Some(sender);
        let mut welcomed = false;
        let welcome_by = Instant::now() + self.config.connect_timeout;
        let mut grace_until: Option<Instant> = None;
        // The elector's view of the Lease: a renewal re-enables sending after the deadline passed.
        let mut tenure = self.config.fence.as_ref().map(|f| f.lease.clone());
        loop {
            if self.finished() {
                return Ended::Finished;
            }
            // Half-close once nothing more will be sent: the writer then pushes at once and acks.
            let done_sending =
                self.shutdown_requested || (self.events_closed && !self.backlog.has_outgoing());
            if welcomed && done_sending && sender.is_some() {
                debug!("half-closing the stream");
                sender = None;
            }
            // The shutdown grace, or the wait for the Welcome; none once connected.
            let deadline = grace_until.or((!welcomed).then_some(welcome_by));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.unwrap_or(welcome_by)), if deadline.is_some() => {
                    if self.shutdown_requested {
                        return Ended::Shutdown;
                    }
                    if !welcomed {
                        return Ended::Lost {
                            error: format!("no Welcome within {:?}", self.config.connect_timeout),
                            welcomed,
                        };
                    }
                }
                _ = self.shutdown.as_mut(), if !self.shutdown_requested => {
                    self.shutdown_requested = true;
                    if !welcomed {
                        return Ended::Shutdown;
                    }
                    grace_until = Some(Instant::now() + self.config.shutdown_grace);
                }
                reply = replies.next() => match reply {
                    Some(Ok(message)) => {
                        if let Some(ended) = self.on_reply(message, &mut welcomed) {
                            return ended;
                        }
                    }
                    Some(Err(status)) => {
                        return Ended::Lost { error: status_text(&status), welcomed };
                    }
                    None => {
                        if self.shutdown_requested {
                            return Ended::Shutdown;
                        }
                        if self.finished() {
                            return Ended::Finished;
                        }
                        return Ended::Lost { error: "the writer ended the stream".into(), welcomed };
                    }
                },
                _ = tenure_changed(&mut tenure), if welcomed && self.backlog.has_outgoing() && !self.lease_current() => {}
                permit = reserve(&sender), if welcomed && !self.shutdown_requested && self.backlog.has_outgoing() && self.lease_current() => {
                    if let Some(permit) = permit {
                        // Checked again at the moment of sending: time passes (or the process was frozen)
                        // between the loop's start and here.
                        if !self.lease_current() {
                            continue;
                        }
                        if let Some((message, sequenced)) = self.backlog.next_message() {
                            if let Some(why) = self.too_large(&message) {
                                drop(permit);
                                self.skip(&message, why);
                                continue;
                            }
                            self.sent_within_limits(&message);
                            permit.send(message);
                            if sequenced {
                                StreamStats::add(&self.stats.sent, 1);
                            }
                        }
                    } else {
                        return Ended::Lost { error: "the request stream closed".into(), welcomed };
                    }
                }
                event = self.events.recv(), if self.room() => self.on_event(event),
                permit = self.feedback.sender.clone().reserve_owned(), if !self.feedback.queue.is_empty() => {
                    match permit {
                        Ok(permit) => if let Some(f) = self.feedback.queue.pop_front() { permit.send(f); },
                        Err(_) => self.feedback.queue.clear(),
                    }
                }
            }
        }
    }

    /// Handles one writer message; `Some` ends the connection.
    fn on_reply(&mut self, message: pb::WriterMessage, welcomed: &mut bool) -> Option<Ended> {
        match message.kind? {
            Reply::Welcome(welcome) => {
                if *welcomed {
                    return None;
                }
                *welcomed = true;
                self.max_message_bytes = usize::try_from(welcome.max_message_bytes)
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
                self.max_object_bytes = usize::try_from(welcome.max_object_bytes).unwrap_or(0);
                info!(writer_version = %welcome.writer_version, unacked = self.backlog.unacked(),
                    max_message_bytes = self.max_message_bytes, "connected to the writer");
                for abandoned in self.backlog.begin_connection() {
                    self.abandon(abandoned);
                }
                self.set_unacked();
                self.stats.connected.store(true, Ordering::Relaxed);
                let state = if self.ever_connected {
                    StreamStats::add(&self.stats.reconnects, 1);
                    Feedback::Reconnected
                } else {
                    Feedback::Connected
                };
                self.ever_connected = true;
                self.feedback.push(state, &self.stats);
            }
            Reply::Ack(ack) => {
                let dropped = self.backlog.ack(&ack.destination, ack.sequence);
                debug!(destination = %ack.destination, sequence = ack.sequence, commit = %ack.commit_sha, dropped, "acked");
                StreamStats::add(&self.stats.acked, dropped as u64);
                self.set_unacked();
            }
            Reply::Reject(reject) if reject.reason == "StaleLeaderTerm" => {
                return Some(Ended::Fenced(reject.message));
            }
            Reply::Reject(reject) => {
                // The one transient reason: the message was not applied and the writer asks for a re-send,
                // which a later cumulative ack on this stream would otherwise wrongly cover.
                if reject.reason == "Unavailable" {
                    return Some(Ended::Lost {
                        error: format!("writer unavailable: {}", reject.message),
                        welcomed: *welcomed,
                    });
                }
                warn!(destination = %reject.destination, sequence = reject.sequence, reason = %reject.reason,
                    message = %reject.message, "the writer rejected a message");
                if let Some(request_uid) = self
                    .backlog
                    .flush_request(&reject.destination, reject.sequence)
                {
                    self.feedback.push(
                        Feedback::FlushRefused {
                            request_uid,
                            reason: reject.reason.clone(),
                            message: reject.message.clone(),
                        },
                        &self.stats,
                    );
                }
                if reject.sequence > 0 && self.backlog.reject(&reject.destination, reject.sequence)
                {
                    StreamStats::add(&self.stats.rejected, 1);
                    self.set_unacked();
                }
                self.feedback.push(
                    Feedback::Rejected(Rejection {
                        destination: reject.destination,
                        sequence: reject.sequence,
                        reason: reject.reason,
                        message: reject.message,
                    }),
                    &self.stats,
                );
            }
            Reply::SuspendPreview(preview) => {
                self.feedback.push(
                    Feedback::SuspendPreview(suspend_preview(preview)),
                    &self.stats,
                );
            }
            Reply::FlushResult(result) => {
                self.feedback.push(
                    Feedback::Flushed(FlushAnswer {
                        committed: result.outcome() == pb::FlushOutcome::Committed,
                        destination: result.destination,
                        request_uid: result.request_uid,
                        commit: result.commit_sha,
                        branch: result.branch,
                        message: result.message,
                    }),
                    &self.stats,
                );
            }
            Reply::SweepReport(report) => {
                self.feedback.push(
                    Feedback::Swept {
                        destination: report.destination,
                        deleted: report.deleted,
                        left: report.left,
                        commit: report.commit_sha,
                    },
                    &self.stats,
                );
            }
            Reply::DestinationStatus(status) => {
                debug!(destination = %status.destination, condition = %status.r#type, status = %status.status,
                    reason = %status.reason, "destination status");
                self.feedback.push(
                    Feedback::Status(DestinationCondition {
                        destination: status.destination,
                        condition_type: status.r#type,
                        status: status.status,
                        reason: status.reason,
                        message: status.message,
                    }),
                    &self.stats,
                );
            }
        }
        None
    }
}

impl Runner {
    /// Whether this client may send now: always without leader election, else only while the Lease is provably
    /// ours (and never again once the writer refused our term).
    fn lease_current(&self) -> bool {
        !self.fenced
            && self
                .config
                .fence
                .as_ref()
                .is_none_or(LeaderFence::is_current)
    }

    /// Why `message` cannot go to the writer (too large for its limits), if so.
    fn too_large(&self, message: &pb::AgentMessage) -> Option<String> {
        use prost::Message as _;
        let encoded = message.encoded_len();
        // The gRPC frame adds 5 bytes to the encoded message.
        if encoded.saturating_add(5) > self.max_message_bytes {
            return Some(format!(
                "{encoded} bytes encoded, more than the writer's limit of {} bytes per message",
                self.max_message_bytes
            ));
        }
        match &message.kind {
            Some(pb::agent_message::Kind::Upsert(upsert))
                if self.max_object_bytes > 0 && upsert.content.len() > self.max_object_bytes =>
            {
                Some(format!(
                    "{} bytes of YAML, more than the writer's limit of {} bytes per object",
                    upsert.content.len(),
                    self.max_object_bytes
                ))
            }
            _ => None,
        }
    }

    /// Drops a message that cannot go to the writer, and reports the object.
    fn skip(&mut self, message: &pb::AgentMessage, why: String) {
        use pb::agent_message::Kind;
        let (destination, sequence, path, object) = match &message.kind {
            Some(Kind::Upsert(u)) => (&u.destination, u.sequence, &u.path, u.object.as_ref()),
            Some(Kind::Delete(d)) => (&d.destination, d.sequence, &d.path, d.object.as_ref()),
            // A declaration or snapshot marker is small; should one ever not fit, it is dropped the same way.
            _ => {
                warn!(%why, "a protocol message exceeds the writer's limit; dropped");
                return;
            }
        };
        let (destination, path) = (destination.clone(), path.clone());
        let name = object.map_or_else(
            || path.clone(),
            |o| {
                let kind = if o.group.is_empty() {
                    o.resource.clone()
                } else {
                    format!("{}.{}", o.resource, o.group)
                };
                if o.namespace.is_empty() {
                    format!("{kind}/{}", o.name)
                } else {
                    format!("{kind} {}/{}", o.namespace, o.name)
                }
            },
        );
        warn!(destination = %destination, object = %name, %path, %why, "object too large for the writer: not mirrored");
        StreamStats::add(&self.stats.objects_too_large, 1);
        if let Some(counter) = &self.config.objects_too_large {
            counter.with_label_values(&[destination.as_str()]).inc();
        }
        for abandoned in self.backlog.skip(&destination, sequence) {
            self.abandon(abandoned);
        }
        self.set_unacked();
        self.skipped
            .entry(destination.clone())
            .or_default()
            .insert(path, format!("{name}: {why}"));
        self.report_skipped(&destination);
    }

    /// A change of a path that was skipped went out within limits: it is mirrored again.
    fn sent_within_limits(&mut self, message: &pb::AgentMessage) {
        use pb::agent_message::Kind;
        let (destination, path) = match &message.kind {
            Some(Kind::Upsert(u)) => (&u.destination, &u.path),
            Some(Kind::Delete(d)) => (&d.destination, &d.path),
            _ => return,
        };
        let removed = self
            .skipped
            .get_mut(destination)
            .is_some_and(|paths| paths.remove(path).is_some());
        if removed {
            let destination = destination.clone();
            self.report_skipped(&destination);
        }
    }

    fn report_skipped(&mut self, destination: &str) {
        let paths = self.skipped.get(destination);
        let total = paths.map_or(0, |p| p.len());
        let objects = paths
            .map(|p| p.values().take(SKIPPED_NAMED).cloned().collect())
            .unwrap_or_default();
        if total == 0 {
            self.skipped.remove(destination);
        }
        self.feedback.push(
            Feedback::ObjectsSkipped {
                destination: destination.to_owned(),
                objects,
                total,
            },
            &self.stats,
        );
    }
}

/// Resolves when the elector's tenure changes; never without leader election (or once the elector is gone).
async fn tenure_changed(tenure: &mut Option<tokio::sync::watch::Receiver<LeaseState>>) {
    match tenure {
        Some(receiver) => {
            if receiver.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

fn status_text(status: &tonic::Status) -> String {
    match status.source() {
        Some(source) => format!(
            "{}: {}: {}",
            status.code(),
            status.message(),
            error_chain(source)
        ),
        None => format!("{}: {}", status.code(), status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> StreamConfig {
        let identity = AgentIdentity {
            cluster_uid: "uid".into(),
            cluster_name: String::new(),
            instance_id: "agent-0".into(),
            controller_namespace: "ns".into(),
            controller_name: "reverser".into(),
        };
        StreamConfig::new(url, identity)
    }

    fn tls() -> TlsSettings {
        TlsSettings {
            ca_pem: b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".to_vec(),
            client_cert_pem: None,
            client_key_pem: None,
            domain: None,
        }
    }

    #[test]
    fn plaintext_and_tls_settings_must_match_the_url_scheme() {
        assert!(StreamClient::new(config("http://127.0.0.1:9443")).is_ok());
        let mut https_without_tls = config("https://writer:9443");
        assert!(matches!(
            StreamClient::new(https_without_tls.clone()),
            Err(StreamError::Tls(_))
        ));
        https_without_tls.tls = Some(tls());
        let mut http_with_tls = https_without_tls.clone();
        http_with_tls.writer_url = "http://writer:9443".into();
        assert!(
            matches!(StreamClient::new(http_with_tls), Err(StreamError::Tls(_))),
            "TLS settings must never be silently ignored"
        );
        assert!(matches!(
            StreamClient::new(config("ftp://writer")),
            Err(StreamError::InvalidUrl { .. })
        ));
        assert!(matches!(
            StreamClient::new(config("not a url")),
            Err(StreamError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let mut half = config("https://writer:9443");
        half.tls = Some(TlsSettings {
            client_cert_pem: Some(b"cert".to_vec()),
            ..tls()
        });
        assert!(matches!(StreamClient::new(half), Err(StreamError::Tls(_))));
    }

    #[test]
    fn the_hello_identity_must_be_complete() {
        let mut anonymous = config("http://127.0.0.1:1");
        anonymous.identity.cluster_uid = " ".into();
        assert!(matches!(
            StreamClient::new(anonymous),
            Err(StreamError::Settings(_))
        ));
    }

    #[test]
    fn the_backlog_limit_and_backoff_must_be_usable() {
        let mut zero = config("http://127.0.0.1:1");
        zero.max_unacked = 0;
        assert!(matches!(
            StreamClient::new(zero),
            Err(StreamError::Settings(_))
        ));
        let mut inverted = config("http://127.0.0.1:1");
        inverted.backoff_max = Duration::from_millis(1);
        assert!(matches!(
            StreamClient::new(inverted),
            Err(StreamError::Settings(_))
        ));
    }

    #[test]
    fn tls_settings_never_print_the_key() {
        let settings = TlsSettings {
            client_cert_pem: Some(b"cert".to_vec()),
            client_key_pem: Some(b"SECRET KEY".to_vec()),
            ..tls()
        };
        assert!(!format!("{settings:?}").contains("SECRET"));
    }
}
