//! One leader term: controller, ingestion, the stream to the writer and its feedback, the CRD watch that
//! refreshes discovery and (with `--webhook-manage-configuration`) the webhook-configuration sync.
//!
//! ```text
//! controller ──Selection (watch)──▶ ingestion ──AgentEvent (bounded)──▶ stream ──▶ writer
//!  (CRs → resolve → /status)          ▲ watches relist on a                │
//!      ▲                              └─ stream reconnect ◀── Feedback ◀───┘
//!      └──── WriterView (watch): statuses, rejects, connection ◀──┘
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge, Registry};
use reverser_common::admin;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::commit_request;
use crate::conditions::WriterView;
use crate::config::Selection;
use crate::controller::{self, ControllerConfig, ControllerHandle};
use crate::events::{AgentEvent, Feedback};
use crate::ingest::{self, IngestConfig, IngestHandle, WatchKey, WatchStatus};
use crate::kube_events;
use crate::metrics::ScrapedFamilies;
use crate::rules::ResourceKey;
use crate::stream::{LeaderFence, StreamClient, StreamConfig, StreamStats};
use crate::webhook::registration::Registration;

/// What every leader term is built from (the components' counters inside are the process's, shared by every
/// term).
pub struct TermParts {
    pub client: kube::Client,
    pub stream: StreamConfig,
    pub controller: ControllerConfig,
    pub ingest: IngestConfig,
    /// The webhook configuration to keep in sync with the watched types while leading.
    pub registration: Option<Registration>,
    pub metrics: TermMetrics,
    pub readiness: admin::Readiness,
}

/// The ingestion of the term (none once the term ends).
#[derive(Default)]
pub(crate) struct CurrentIngest(Mutex<Option<IngestHandle>>);

impl CurrentIngest {
    fn with<T>(&self, read: impl FnOnce(&IngestHandle) -> T) -> Option<T> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(read)
    }

    fn set(&self, handle: Option<IngestHandle>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = handle;
    }

    fn restart_snapshots(&self) {
        self.with(IngestHandle::restart_snapshots);
    }

    fn refresh_discovery(&self) {
        self.with(IngestHandle::refresh_discovery);
    }

    /// The types ingestion watches now (`None` before its first plan).
    fn watched_types(&self) -> Option<BTreeSet<ResourceKey>> {
        self.with(IngestHandle::watched_types).flatten()
    }

    pub(crate) fn watch_status(&self) -> BTreeMap<WatchKey, WatchStatus> {
        self.with(IngestHandle::watch_status).unwrap_or_default()
    }
}

/// What `/metrics` reads from the running term (the gauges).
pub(crate) struct TermView {
    pub(crate) ingest: Arc<CurrentIngest>,
    pub(crate) stream: Arc<StreamStats>,
}

/// The leader's metrics: `leader`, `ingestion_restarts_total`, and the running term's gauges
/// (`active_watches`, `watch_snapshots_completed`, `stream_unacked`, `stream_connected`; 0 on a standby).
#[derive(Clone)]
pub struct TermMetrics {
    pub(super) leader: IntGauge,
    ingestion_restarts: IntCounter,
    term: Arc<Mutex<Option<Arc<TermView>>>>,
}

impl TermMetrics {
    /// Creates and registers the families.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let leader = IntGauge::new("leader", "1 while this process holds the leader lease")?;
        let ingestion_restarts = IntCounter::new(
            "ingestion_restarts_total",
            "Ingestion restarts (full relists) after a writer reconnect",
        )?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(ingestion_restarts.clone()))?;
        let term: Arc<Mutex<Option<Arc<TermView>>>> = Arc::default();
        let read = |value: fn(&TermView) -> i64| {
            let term = Arc::clone(&term);
            move || {
                let view = term.lock().unwrap_or_else(|p| p.into_inner()).clone();
                view.map_or(0, |view| value(&view))
            }
        };
        ScrapedFamilies::new()
            .gauge(
                "active_watches",
                "List+Watch loops running",
                read(|t| t.ingest.watch_status().len() as i64),
            )?
            .gauge(
                "watch_snapshots_completed",
                "Completed lists and relists of the running watches",
                read(|t| {
                    let status = t.ingest.watch_status();
                    status.values().map(|s| s.snapshots_completed as i64).sum()
                }),
            )?
            .gauge(
                "stream_unacked",
                "Messages sent to the writer and not yet acked",
                read(|t| t.stream.unacked() as i64),
            )?
            .gauge(
                "stream_connected",
                "1 while the stream to the writer is up",
                read(|t| i64::from(t.stream.connected())),
            )?
            .register(registry)?;
        Ok(Self {
            leader,
            ingestion_restarts,
            term,
        })
    }

    fn set_term(&self, view: Option<Arc<TermView>>) {
        *self.term.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }
}

/// A running term. Dropping it without [`Term::stop`] or [`Term::abort`] leaves its tasks running.
pub struct Term {
    view: Arc<TermView>,
    controller: ControllerHandle,
    /// Refreshes discovery as soon as a CRD appears, changes or goes (instead of waiting for the timer).
    crd_watch: JoinHandle<()>,
    /// Keeps the webhook configuration listing the watched types (`--webhook-manage-configuration`).
    webhook_sync: Option<JoinHandle<()>>,
    /// Follows the controller's first selection into `/readyz`.
    readiness: JoinHandle<()>,
    feedback: JoinHandle<()>,
    /// Sends CommitRequests to the writer and records their outcome.
    commit_requests: JoinHandle<()>,
    stream: JoinHandle<()>,
    stop_stream: oneshot::Sender<()>,
    grace: Duration,
    parts: Arc<TermParts>,
}

impl Term {
    pub fn start(parts: &Arc<TermParts>, fence: Option<LeaderFence>) -> Term {
        let (selection_tx, selection_rx) = watch::channel(Arc::new(Selection::default()));
        // What the writer reports in this term; the controller turns it into status conditions.
        let (writer_view_tx, writer_view_rx) = watch::channel(WriterView::default());
        let controller = controller::spawn_with_writer(
            parts.client.clone(),
            parts.controller.clone(),
            selection_tx,
            writer_view_rx,
        );
        // Bounded: a slow writer slows the watches down.
        let (events_tx, events_rx) = mpsc::channel::<AgentEvent>(1024);
        let (feedback_tx, mut feedback_rx) = mpsc::channel::<Feedback>(256);
        let mut stream_config = parts.stream.clone();
        stream_config.fence = fence;
        let client = StreamClient::new(stream_config).expect("validated at start");
        let ingest = Arc::new(CurrentIngest::default());
        // CommitRequests share ingestion's channel: a flush follows every change already queued.
        let (answers_tx, answers_rx) = mpsc::channel::<commit_request::Answer>(256);
        let commit_requests = tokio::spawn(commit_request::run(commit_request::Parts {
            client: parts.client.clone(),
            events: events_tx.clone(),
            answers: answers_rx,
            selection: selection_rx.clone(),
            synced: controller.synced(),
            attribution: parts.ingest.attribution.clone(),
            sink: parts.controller.events.clone(),
            settle: commit_request::DEFAULT_SETTLE,
        }));
        ingest.set(Some(ingest::spawn(
            parts.client.clone(),
            parts.ingest.clone(),
            selection_rx,
            events_tx,
        )));
        let view = Arc::new(TermView {
            ingest: Arc::clone(&ingest),
            stream: client.stats(),
        });
        parts.metrics.set_term(Some(Arc::clone(&view)));
        let refresh = Arc::clone(&ingest);
        let crd_watch = tokio::spawn(ingest::crd_changes::refresh_discovery_on_crd_changes(
            parts.client.clone(),
            Arc::new(move || refresh.refresh_discovery()),
        ));
        let webhook_sync = parts.registration.clone().map(|registration| {
            let (client, synced, types) = (
                parts.client.clone(),
                controller.synced(),
                Arc::clone(&ingest),
            );
            tokio::spawn(crate::webhook::sync::keep_configuration_in_sync(
                client,
                registration,
                synced,
                move || types.watched_types(),
            ))
        });
        let readiness = {
            let (readiness, mut synced) = (parts.readiness.clone(), controller.synced());
            tokio::spawn(async move {
                loop {
                    readiness.set(*synced.borrow_and_update());
                    if synced.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        let (stop_stream, stop_rx) = oneshot::channel::<()>();
        let stream = client.spawn(events_rx, feedback_tx, async move {
            let _ = stop_rx.await;
        });
        let feedback = {
            let (ingest, restarts, events) = (
                Arc::clone(&ingest),
                parts.metrics.ingestion_restarts.clone(),
                parts.controller.events.clone(),
            );
            // Ends with this task (it holds the only handle).
            let previews = crate::suspend::Previews::spawn(parts.client.clone());
            tokio::spawn(async move {
                while let Some(feedback) = feedback_rx.recv().await {
                    writer_view_tx.send_if_modified(|view| view.apply(&feedback));
                    let answer = match &feedback {
                        Feedback::Flushed(answer) => {
                            Some(commit_request::Answer::Flushed(answer.clone()))
                        }
                        Feedback::FlushRefused {
                            request_uid,
                            reason,
                            message,
                        } => Some(commit_request::Answer::Refused {
                            request_uid: request_uid.clone(),
                            reason: reason.clone(),
                            message: message.clone(),
                        }),
                        _ => None,
                    };
                    if let Some(answer) = answer {
                        let _ = answers_tx.send(answer).await;
                    }
                    log_feedback(&feedback);
                    if let Feedback::SuspendPreview(preview) = &feedback {
                        previews.offer(preview.clone());
                    }
                    if let (
                        Feedback::Swept {
                            destination,
                            deleted,
                            left,
                            commit,
                        },
                        Some(sink),
                    ) = (&feedback, &events)
                        && let Some(reference) = kube_events::git_destination_reference(destination)
                    {
                        sink.emit(
                            &reference,
                            vec![kube_events::sweep_event(*deleted, *left, commit)],
                        );
                    }
                    if let Feedback::Reconnected = feedback {
                        // The writer may have lost the open snapshots: relist everything so that orphans are
                        // still found (the types discovered stay).
                        restarts.inc();
                        ingest.restart_snapshots();
                    }
                }
            })
        };
        Term {
            view,
            controller,
            crd_watch,
            webhook_sync,
            readiness,
            feedback,
            commit_requests,
            stream,
            stop_stream,
            grace: parts.stream.shutdown_grace,
            parts: Arc::clone(parts),
        }
    }

    /// Graceful end (shutdown): stop producing, then give the stream a moment for acks.
    pub async fn stop(self) {
        let Term {
            view,
            controller,
            crd_watch,
            webhook_sync,
            readiness,
            feedback,
            commit_requests,
            mut stream,
            stop_stream,
            grace,
            parts,
        } = self;
        drop(controller);
        crd_watch.abort();
        if let Some(sync) = webhook_sync {
            sync.abort();
        }
        readiness.abort();
        feedback.abort();
        commit_requests.abort();
        view.ingest.set(None);
        let _ = stop_stream.send(());
        if tokio::time::timeout(grace + Duration::from_secs(2), &mut stream)
            .await
            .is_err()
        {
            stream.abort();
        }
        parts.metrics.set_term(None);
        parts.readiness.set(true);
    }

    /// Immediate end (lost the lease): nothing more may reach the writer from this process.
    pub fn abort(self) {
        self.stream.abort();
        self.crd_watch.abort();
        if let Some(sync) = &self.webhook_sync {
            sync.abort();
        }
        self.readiness.abort();
        self.feedback.abort();
        self.commit_requests.abort();
        self.view.ingest.set(None);
        self.parts.metrics.set_term(None);
        // A standby is ready.
        self.parts.readiness.set(true);
    }
}

fn log_feedback(feedback: &Feedback) {
    match feedback {
        Feedback::Connected => info!("connected to the writer"),
        Feedback::Reconnected => {
            info!("reconnected to the writer; restarting ingestion for fresh snapshots")
        }
        Feedback::Disconnected { error } => warn!(%error, "writer connection lost"),
        Feedback::Rejected(r) => warn!(
            destination = %r.destination, sequence = r.sequence, reason = %r.reason,
            message = %r.message, "writer rejected a message"
        ),
        Feedback::Status(s) => info!(
            destination = %s.destination, condition = %s.condition_type, status = %s.status,
            reason = %s.reason, message = %s.message, "destination status"
        ),
        Feedback::ObjectsSkipped {
            destination,
            objects,
            total,
        } => info!(%destination, total, ?objects, "objects not mirrored for their size"),
        Feedback::Fenced { message } => warn!(
            %message,
            "the writer refused this leader term; waiting for the elector to step down"
        ),
        Feedback::Swept {
            destination,
            deleted,
            left,
            commit,
        } => info!(%destination, deleted, left, %commit, "the writer deleted orphan files"),
        Feedback::SuspendPreview(p) => info!(
            destination = %p.destination, added = p.added, changed = p.changed, deleted = p.deleted,
            base = %p.base_commit, "suspend preview"
        ),
        Feedback::Flushed(answer) => info!(
            destination = %answer.destination, request = %answer.request_uid, commit = %answer.commit,
            committed = answer.committed, "the writer answered a CommitRequest"
        ),
        Feedback::FlushRefused {
            request_uid,
            reason,
            message,
        } => warn!(request = %request_uid, %reason, %message, "the writer refused a CommitRequest"),
        Feedback::SnapshotAbandoned {
            destination,
            scope,
            epoch,
        } => info!(
            %destination, resource = %scope.resource, namespace = %scope.namespace, epoch,
            "snapshot abandoned; orphans of this scope wait for the next relist"
        ),
    }
}
