//! gRPC edge: `reverser.v1.Writer` (the agent stream) and `reverser.v1.WriterAdmin` (for people with grpcurl).
//! Internal errors become `tonic::Status` here and nowhere else.
//!
//! With a writer configuration file ([`WriterService::policy`]) every stream belongs to the client identity of its
//! verified certificate ([`crate::tls::ConnInfo`]): unknown identities are refused, each identity has a cap on
//! concurrent streams, a message rate and a byte rate (token buckets shared by its streams: a flooding client is
//! slowed down, its reads wait, the others' are untouched), a stream must say `Hello` in time, and a client removed from the
//! configuration has its streams ended with `PermissionDenied` as soon as the new configuration is loaded.
//!
//! Protocol types stop here: [`convert`] turns each agent message into the session's domain [`Inbound`] and each
//! domain [`crate::reply::Reply`] into a `WriterMessage`. Replies reach the response stream on the stream's
//! bounded reply channel ([`crate::reply`]); the response stream takes them only as fast as the agent reads, and
//! a stream whose channel overflowed (an agent that stopped reading) is ended with `RESOURCE_EXHAUSTED`, so no
//! worker ever waits for one agent.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use reverser_proto::v1::{self as pb, writer_admin_server::WriterAdmin, writer_server::Writer};

use crate::{
    authz::{Access, Limits, Policy, TokenBucket},
    metrics::Metrics,
    names::redact_url,
    registry::Registry,
    reply::{REPLY_CAPACITY, Replies, Reply},
    session::{Inbound, Next, Session, SessionLimits},
    tls::ConnInfo,
};

pub mod convert;

use convert::WireEnum as _;

/// Adds the writer's gRPC services to `server`: the agent stream, WriterAdmin, health (both reported serving) and
/// reflection (v1 and v1alpha, for grpcurl). Messages above `max_message_bytes` are refused while decoding; admin
/// requests are small.
pub async fn routes(
    server: &mut tonic::transport::Server,
    writer: WriterService,
    admin: AdminService,
    max_message_bytes: usize,
) -> Result<tonic::transport::server::Router, tonic_reflection::server::Error> {
    use reverser_proto::v1::{writer_admin_server::WriterAdminServer, writer_server::WriterServer};

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(reverser_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WriterServer<WriterService>>().await;
    health
        .set_serving::<WriterAdminServer<AdminService>>()
        .await;
    Ok(server
        .add_service(WriterServer::new(writer).max_decoding_message_size(max_message_bytes))
        .add_service(WriterAdminServer::new(admin).max_decoding_message_size(64 * 1024))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

#[derive(Clone)]
pub struct WriterService {
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    pub limits: SessionLimits,
    /// Turns true when the writer shuts down: every stream flushes and ends, so the server can drain.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// The configured clients (None without a configuration file: one trusted agent, no limits).
    pub policy: Option<watch::Receiver<Arc<Policy>>>,
    /// Open streams and rate budgets per client identity.
    pub clients: Arc<Clients>,
}

/// Per-identity bookkeeping: open streams and the shared rate budget.
#[derive(Debug, Default)]
pub struct Clients {
    inner: Mutex<HashMap<String, (usize, Budget)>>,
}

/// An identity's rate budget, shared by its streams: messages and bytes.
#[derive(Clone, Debug, Default)]
struct Budget {
    messages: Arc<TokenBucket>,
    bytes: Arc<TokenBucket>,
}

impl Budget {
    /// Waits until a message of `encoded_len` bytes fits both rates.
    async fn spend(&self, limits: &Limits, encoded_len: usize) {
        self.messages
            .take(limits.messages_per_second, limits.message_burst)
            .await;
        self.bytes
            .take_cost(
                limits.bytes_per_second,
                limits.byte_burst,
                encoded_len as f64,
            )
            .await;
    }
}

/// One open stream of an identity; closing it (drop) frees the slot.
struct StreamSlot {
    clients: Arc<Clients>,
    identity: String,
    budget: Budget,
}

impl Clients {
    fn open(self: &Arc<Self>, identity: &str, max: usize) -> Result<StreamSlot, Status> {
        let mut inner = self.inner.lock().expect("clients lock");
        let entry = inner
            .entry(identity.to_owned())
            .or_insert_with(|| (0, Budget::default()));
        if entry.0 >= max {
            return Err(Status::resource_exhausted(format!(
                "client {identity:?} already has {max} open streams (limits.maxStreamsPerClient)"
            )));
        }
        entry.0 += 1;
        Ok(StreamSlot {
            clients: self.clone(),
            identity: identity.to_owned(),
            budget: entry.1.clone(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(entry) = self
            .clients
            .inner
            .lock()
            .expect("clients lock")
            .get_mut(&self.identity)
        {
            entry.0 = entry.0.saturating_sub(1);
        }
    }
}

/// The identity of the request's verified client certificate, checked against the configuration; None when no
/// configuration file is in force.
fn access_of<T>(
    request: &Request<T>,
    policy: Option<&watch::Receiver<Arc<Policy>>>,
) -> Result<Access, Status> {
    let Some(policy) = policy else {
        return Ok(Access::Unrestricted);
    };
    let identity = request
        .extensions()
        .get::<ConnInfo>()
        .and_then(|c| c.identity.clone())
        .ok_or_else(|| {
            Status::unauthenticated(
                "a verified client certificate with an identity (URI SAN, DNS SAN or CN) is required",
            )
        })?;
    if policy.borrow().client(&identity).is_none() {
        warn!(client = %identity, "refused a client that is not in the configuration");
        return Err(Status::permission_denied(format!(
            "client {identity:?} is not in the writer's configuration"
        )));
    }
    Ok(Access::Client {
        identity,
        policy: policy.clone(),
    })
}

/// Resolves when the configuration changed (never without one).
async fn policy_changed(policy: &mut Option<watch::Receiver<Arc<Policy>>>) {
    if let Some(receiver) = policy
        && receiver.changed().await.is_ok()
    {
        return;
    }
    std::future::pending::<()>().await;
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::WriterMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Writer for WriterService {
    type SyncStream = ReplyStream;

    async fn sync(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let access = access_of(&request, self.policy.as_ref())?;
        let peer = request
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.remote_addr)
            .or_else(|| request.remote_addr());
        let limits: Option<Limits> = self.policy.as_ref().map(|p| p.borrow().limits.clone());
        let slot = match (access.identity(), &limits) {
            (Some(identity), Some(limits)) => {
                Some(self.clients.open(identity, limits.max_streams_per_client)?)
            }
            _ => None,
        };
        let client = access.identity().unwrap_or("-").to_owned();
        let mut policy = self.policy.clone();
        let mut inbound = check_ahead(request.into_inner(), self.limits.clone());
        let (replies, reply_receiver) = Replies::channel(REPLY_CAPACITY);
        let mut overflowed = reply_receiver.overflowed.clone();
        let (done, done_rx) = oneshot::channel::<Option<Status>>();
        let mut session = Session::new(
            self.registry.clone(),
            self.metrics.clone(),
            self.limits.clone(),
            replies,
        )
        .with_access(access.clone());
        let metrics = self.metrics.clone();
        let max_message = self.limits.max_message_bytes;
        let mut shutdown = self.shutdown.clone();
        metrics.connected_agents.inc();

        // Reads the agent's messages in order; each is validated and forwarded before the next is read, so a full
        // worker queue slows the stream down (HTTP/2 flow control does the rest).
        tokio::spawn(async move {
            let mut final_status = None;
            let mut first = true;
            // The stream's leader term, once its Hello named one: a newer term cuts it off at once.
            let mut fence: Option<crate::fencing::Fence> = None;
            loop {
                // The first message (Hello) must come within the hello timeout; later ones within the idle timeout.
                let timeout = limits.as_ref().and_then(|l| {
                    if first {
                        Some(l.hello_timeout)
                    } else {
                        l.idle_timeout
                    }
                });
                let next = tokio::select! {
                    next = read(&mut inbound, timeout) => next,
                    _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
                        session.flush_all().await;
                        final_status = Some(Status::unavailable("the writer is shutting down; reconnect and re-send unacked changes"));
                        break;
                    }
                    why = superseded(&mut fence) => {
                        warn!(?peer, %client, %why, "ending a stream of a superseded agent leader term");
                        session.supersede(&why);
                        final_status = Some(Status::failed_precondition(why));
                        break;
                    }
                    Ok(()) = async { overflowed.wait_for(|full| *full).await.map(|_| ()) } => {
                        final_status = Some(end_slow_stream(peer, &client, &metrics));
                        break;
                    }
                    _ = policy_changed(&mut policy) => {
                        if let Err(denied) = access.grant() {
                            warn!(?peer, %client, "client removed from the configuration; ending its stream");
                            final_status = Some(Status::permission_denied(denied.to_string()));
                            break;
                        }
                        continue;
                    }
                };
                first = false;
                let Some(next) = next else {
                    info!(?peer, %client, "stream timed out");
                    final_status = Some(Status::deadline_exceeded(
                        "no message within the hello/idle timeout; reconnect",
                    ));
                    break;
                };
                match next {
                    Ok(Some((message, encoded_len))) => {
                        if let (Some(slot), Some(limits)) = (&slot, &limits) {
                            slot.budget.spend(limits, encoded_len).await;
                        }
                        // Replies that overflowed end the stream before anything more of it is handled (its answers
                        // could not be sent).
                        if *overflowed.borrow() {
                            final_status = Some(end_slow_stream(peer, &client, &metrics));
                            break;
                        }
                        let next = session.handle(message).await;
                        if fence.is_none() {
                            fence = session.fence();
                        }
                        match next {
                            Next::Continue => {}
                            Next::Close(reason) => {
                                final_status = Some(Status::failed_precondition(reason));
                                break;
                            }
                            Next::Deny(reason) => {
                                final_status = Some(Status::permission_denied(reason));
                                break;
                            }
                        }
                    }
                    Ok(None) => {
                        // The agent half-closed: push what it sent now, so it gets its acks before the stream ends.
                        debug!(?peer, "agent finished sending; flushing its destinations");
                        session.flush_all().await;
                        break;
                    }
                    Err(status) if status.code() == tonic::Code::OutOfRange => {
                        // A message above the decoding limit (Welcome.max_message_bytes): the stream cannot go on
                        // (the message was not read), so say so clearly instead of ending quietly.
                        let message = format!(
                            "a message is larger than the writer's limit of {max_message} bytes (Welcome.max_message_bytes); \
                             the agent must skip such objects: {}",
                            status.message()
                        );
                        warn!(?peer, %client, %message, "oversize message: ending the stream");
                        session.reject_oversize(&message);
                        final_status = Some(Status::resource_exhausted(message));
                        break;
                    }
                    Err(status) => {
                        debug!(?peer, %status, "agent stream ended with an error");
                        break;
                    }
                }
            }
            metrics.connected_agents.dec();
            info!(?peer, %client, "agent stream closed");
            let _ = done.send(final_status);
        });

        Ok(Response::new(reply_stream(reply_receiver.replies, done_rx)))
    }
}

/// Logs and counts a stream ended because its agent did not read its replies; the status the agent gets.
fn end_slow_stream(peer: Option<std::net::SocketAddr>, client: &str, metrics: &Metrics) -> Status {
    warn!(?peer, %client, capacity = REPLY_CAPACITY, "the agent does not read its replies; ending its stream");
    metrics.slow_streams_ended.inc();
    Status::resource_exhausted(format!(
        "the agent did not read its replies ({REPLY_CAPACITY} waiting); reconnect and re-send unacked changes"
    ))
}

/// The response stream: the stream's replies as the agent reads them, then how the stream ended. Once the session
/// is over, what is queued is still sent, then the final status; replies that workers send later (for changes
/// they still buffer) are not waited for.
fn reply_stream(
    replies: mpsc::Receiver<Reply>,
    done: oneshot::Receiver<Option<Status>>,
) -> ReplyStream {
    struct State {
        replies: mpsc::Receiver<Reply>,
        /// Until the session is over.
        done: Option<oneshot::Receiver<Option<Status>>>,
        /// How the stream ended, sent after the queued replies.
        ending: Option<Status>,
        finished: bool,
    }
    let state = State {
        replies,
        done: Some(done),
        ending: None,
        finished: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        if state.finished {
            return None;
        }
        if let Some(done) = state.done.as_mut() {
            tokio::select! {
                reply = state.replies.recv() => match reply {
                    Some(reply) => return Some((Ok(pb::WriterMessage::from(reply)), state)),
                    None => {
                        // Every reply sender is gone: the session ended; pass on how it ended.
                        let ending = state.done.take().expect("still open").await.ok().flatten();
                        state.finished = true;
                        return ending.map(|status| (Err(status), state));
                    }
                },
                finished = done => {
                    state.done = None;
                    state.ending = finished.ok().flatten();
                }
            }
        }
        match state.replies.try_recv() {
            Ok(reply) => Some((Ok(pb::WriterMessage::from(reply)), state)),
            Err(_) => {
                state.finished = true;
                state.ending.take().map(|status| (Err(status), state))
            }
        }
    }))
}

/// Resolves with why once the stream's leader term was superseded (never without a term).
async fn superseded(fence: &mut Option<crate::fencing::Fence>) -> String {
    match fence {
        Some(fence) => fence.wait_superseded().await,
        None => std::future::pending().await,
    }
}

/// A message read, decoded and checked ahead of the session, with its encoded size (for the byte rate), or how the
/// stream ended.
type Checked = Result<Option<(Inbound, usize)>, Status>;

/// Runs of messages read and checked ahead of the session (bounded: a slow session slows the reading, and HTTP/2
/// flow control slows the agent).
const CHECK_AHEAD: usize = 8;

/// A run of messages checked by one blocking task: what was already received when the first arrived, up to these
/// bounds (a run always holds at least one message, whatever its size).
const RUN_MESSAGES: usize = 32;
const RUN_BYTES: usize = 256 * 1024;

/// Reads the stream on its own task, decodes and checks its messages on the blocking pool ([`convert::inbound`]),
/// several runs at a time, and hands them to the session in stream order: the YAML check is the costliest step of a
/// stream, so one agent's seed then uses every core instead of one. Messages that already wait when one is read are
/// checked with it in one blocking task: a task per message cost a thread wake-up each, measurable in a seed's CPU.
/// The returned receiver is cancel-safe (the session `select!`s on it).
fn check_ahead(
    mut inbound: Streaming<pb::AgentMessage>,
    limits: SessionLimits,
) -> mpsc::Receiver<Checked> {
    use futures::FutureExt as _;
    use prost::Message as _;

    let (checking, mut checking_rx) =
        mpsc::channel::<tokio::task::JoinHandle<Vec<Checked>>>(CHECK_AHEAD);
    let (checked, checked_rx) = mpsc::channel::<Checked>(1);
    // As many checks at once as there are cores: more would only add blocking-pool threads (and their allocator
    // arenas) without adding speed.
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let checkers = Arc::new(tokio::sync::Semaphore::new(cores));
    tokio::spawn(async move {
        loop {
            // When the session ends, the stream must be dropped at once (not at the agent's next message): an open
            // request stream would keep the connection, and a graceful shutdown, waiting.
            let next = tokio::select! {
                next = inbound.message() => next,
                _ = checking.closed() => break,
            };
            // The messages of the run with their encoded sizes, and the stream's end or error, which ends the run
            // and the reading.
            let mut run: Vec<(pb::AgentMessage, usize)> = Vec::new();
            let mut run_bytes = 0;
            let mut ending = None;
            let mut read = Some(next);
            while let Some(next) = read {
                match next {
                    Ok(Some(message)) => {
                        let encoded_len = message.encoded_len();
                        run_bytes += encoded_len;
                        run.push((message, encoded_len));
                    }
                    other => {
                        ending = Some(other.map(|_| None));
                        break;
                    }
                }
                // `message()` keeps its state in the stream, so polling it once and dropping it loses nothing.
                read = (run.len() < RUN_MESSAGES && run_bytes < RUN_BYTES)
                    .then(|| inbound.message().now_or_never())
                    .flatten();
            }
            let ends = ending.is_some();
            let handle = if run.is_empty() {
                tokio::spawn(async move { ending.into_iter().collect() })
            } else {
                let limits = limits.clone();
                let Ok(permit) = Arc::clone(&checkers).acquire_owned().await else {
                    break;
                };
                tokio::task::spawn_blocking(move || {
                    let mut results: Vec<Checked> = run
                        .into_iter()
                        .map(|(message, encoded_len)| {
                            Ok(Some((convert::inbound(message, &limits), encoded_len)))
                        })
                        .collect();
                    drop(permit);
                    results.extend(ending);
                    results
                })
            };
            // The session is gone (stream over): stop reading.
            if checking.send(handle).await.is_err() || ends {
                break;
            }
        }
    });
    tokio::spawn(async move {
        'runs: loop {
            let handle = tokio::select! {
                handle = checking_rx.recv() => match handle {
                    Some(handle) => handle,
                    None => break,
                },
                // The session ended: closing `checking_rx` (by returning) stops the reader.
                _ = checked.closed() => break,
            };
            let results = handle.await.unwrap_or_else(|e| {
                vec![Err(Status::internal(format!("message check failed: {e}")))]
            });
            for result in results {
                let last = !matches!(result, Ok(Some(_)));
                if checked.send(result).await.is_err() || last {
                    break 'runs;
                }
            }
        }
    });
    checked_rx
}

/// The next message read ahead, within `timeout` when there is one (None: timed out).
async fn read(inbound: &mut mpsc::Receiver<Checked>, timeout: Option<Duration>) -> Option<Checked> {
    // A closed channel: the reader ended after the end of the stream or an error it already passed on.
    let next = async { inbound.recv().await.unwrap_or(Ok(None)) };
    match timeout {
        Some(timeout) => tokio::time::timeout(timeout, next).await.ok(),
        None => Some(next.await),
    }
}

#[derive(Clone)]
pub struct AdminService {
    pub registry: Arc<Registry>,
    /// With a configuration file only clients with `admin: true` may call WriterAdmin.
    pub policy: Option<watch::Receiver<Arc<Policy>>>,
}

impl AdminService {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let access = access_of(request, self.policy.as_ref())?;
        match access.grant() {
            Ok(None) => Ok(()),
            Ok(Some(grant)) if grant.admin => Ok(()),
            Ok(Some(grant)) => Err(Status::permission_denied(format!(
                "client {:?} may not call WriterAdmin (admin: false)",
                grant.identity
            ))),
            Err(denied) => Err(Status::permission_denied(denied.to_string())),
        }
    }
}

fn timestamp(time: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

#[tonic::async_trait]
impl WriterAdmin for AdminService {
    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.authorize(&request)?;
        let workers = self
            .registry
            .workers()
            .into_iter()
            .map(|(worker, destinations)| {
                let status = worker.status();
                let signer = worker.signing.current();
                pb::WorkerInfo {
                    id: worker.id.clone(),
                    repo_url: worker.repo_url.clone(),
                    branch: worker.branch.clone(),
                    destinations,
                    queue_depth: status.pending_entries as u64,
                    pending_files: status.pending_files as u64,
                    last_commit_sha: status.last_commit_sha,
                    last_commit_time: status.last_commit_time.map(timestamp),
                    last_error: status.last_error,
                    lease_holder: status.lease_holder,
                    signing_key_fingerprint: signer
                        .as_ref()
                        .map(|s| s.fingerprint().to_owned())
                        .unwrap_or_default(),
                    signing_public_key: signer
                        .map(|s| s.public_key().to_owned())
                        .unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn list_destinations(
        &self,
        request: Request<pb::ListDestinationsRequest>,
    ) -> Result<Response<pb::ListDestinationsResponse>, Status> {
        self.authorize(&request)?;
        let destinations = self
            .registry
            .destinations()
            .into_iter()
            .map(|record| pb::DestinationInfo {
                cluster_uid: record.spec.id.cluster_uid.clone(),
                key: record.spec.id.key.clone(),
                repo_url: redact_url(&record.spec.repo_url),
                branch: record.spec.branch.clone(),
                base_folder: record.spec.base_folder.clone(),
                exclusive_mode: record.spec.exclusive_mode,
                prune: record.spec.prune.to_proto().into(),
                suspend: record.spec.suspend,
                kustomization: record.spec.placement.kustomization.to_proto().into(),
                omit_namespace: record.spec.placement.omit_namespace,
                worker_id: record.worker_id.clone(),
                acked_sequence: record.acked_sequence(),
                conditions: record
                    .conditions
                    .lock()
                    .expect("conditions lock")
                    .values()
                    .cloned()
                    .map(convert::destination_status)
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListDestinationsResponse { destinations }))
    }

    async fn flush(
        &self,
        request: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        let worker = self
            .registry
            .worker_for(&request.repo_url, &request.branch)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no worker for {} {}; see WriterAdmin/ListWorkers",
                    redact_url(&request.repo_url),
                    request.branch
                ))
            })?;
        let report = worker.flush().await.map_err(Status::unavailable)?;
        Ok(Response::new(pb::FlushResponse {
            commit_sha: report.commit_sha,
            files_changed: report.files_changed,
        }))
    }
}
