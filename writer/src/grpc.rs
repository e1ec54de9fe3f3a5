//! gRPC edge: `reverser.v1.Writer` (the agent stream) and `reverser.v1.WriterAdmin` (for people with grpcurl).
//! Internal errors become `tonic::Status` here and nowhere else.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use reverser_proto::v1::{self as pb, writer_admin_server::WriterAdmin, writer_server::Writer};

use crate::{
    metrics::Metrics,
    registry::Registry,
    session::{Next, Session, SessionLimits},
};

#[derive(Clone)]
pub struct WriterService {
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    pub limits: SessionLimits,
    /// Turns true when the writer shuts down: every stream flushes and ends, so the server can drain.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::WriterMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Writer for WriterService {
    type SyncStream = ReplyStream;

    async fn sync(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let (replies, mut replies_rx) = mpsc::unbounded_channel::<pb::WriterMessage>();
        let (output, output_rx) = mpsc::unbounded_channel::<Result<pb::WriterMessage, Status>>();
        let (done, mut done_rx) = oneshot::channel::<Option<Status>>();
        let mut session = Session::new(
            self.registry.clone(),
            self.metrics.clone(),
            self.limits.clone(),
            replies,
        );
        let metrics = self.metrics.clone();
        let mut shutdown = self.shutdown.clone();
        metrics.connected_agents.inc();

        // Reads the agent's messages in order; each is validated and forwarded before the next is read, so a full
        // worker queue slows the stream down (HTTP/2 flow control does the rest).
        tokio::spawn(async move {
            let mut final_status = None;
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
                        session.flush_all().await;
                        final_status = Some(Status::unavailable("the writer is shutting down; reconnect and re-send unacked changes"));
                        break;
                    }
                };
                match next {
                    Ok(Some(message)) => {
                        if let Next::Close(reason) = session.handle(message).await {
                            final_status = Some(Status::failed_precondition(reason));
                            break;
                        }
                    }
                    Ok(None) => {
                        // The agent half-closed: push what it sent now, so it gets its acks before the stream ends.
                        debug!(?peer, "agent finished sending; flushing its destinations");
                        session.flush_all().await;
                        break;
                    }
                    Err(status) => {
                        debug!(?peer, %status, "agent stream ended with an error");
                        break;
                    }
                }
            }
            metrics.connected_agents.dec();
            info!(?peer, "agent stream closed");
            let _ = done.send(final_status);
        });

        // Copies replies to the response stream until the session is over, then drains what is left. Workers may
        // still hold the reply sender for buffered changes; those acks are not waited for once the stream ends.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    reply = replies_rx.recv() => match reply {
                        Some(reply) => { let _ = output.send(Ok(reply)); }
                        None => {
                            // Every reply sender is gone: the session ended; pass on how it ended.
                            if let Ok(Some(status)) = (&mut done_rx).await {
                                let _ = output.send(Err(status));
                            }
                            break;
                        }
                    },
                    finished = &mut done_rx => {
                        while let Ok(reply) = replies_rx.try_recv() {
                            let _ = output.send(Ok(reply));
                        }
                        if let Ok(Some(status)) = finished {
                            let _ = output.send(Err(status));
                        }
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            output_rx,
        ))))
    }
}

#[derive(Clone)]
pub struct AdminService {
    pub registry: Arc<Registry>,
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
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self
            .registry
            .workers()
            .into_iter()
            .map(|(worker, destinations)| {
                let status = worker.status();
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
                }
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn list_destinations(
        &self,
        _: Request<pb::ListDestinationsRequest>,
    ) -> Result<Response<pb::ListDestinationsResponse>, Status> {
        let destinations = self
            .registry
            .destinations()
            .into_iter()
            .map(|record| pb::DestinationInfo {
                cluster_uid: record.spec.id.cluster_uid.clone(),
                key: record.spec.id.key.clone(),
                repo_url: crate::git::redact_url(&record.spec.repo_url),
                branch: record.spec.branch.clone(),
                base_folder: record.spec.base_folder.clone(),
                exclusive_mode: record.spec.exclusive_mode,
                worker_id: record.worker_id.clone(),
                acked_sequence: record.acked_sequence(),
                conditions: record
                    .conditions
                    .lock()
                    .expect("conditions lock")
                    .values()
                    .cloned()
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListDestinationsResponse { destinations }))
    }

    async fn flush(
        &self,
        request: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        let request = request.into_inner();
        let worker = self
            .registry
            .worker_for(&request.repo_url, &request.branch)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no worker for {} {}; see WriterAdmin/ListWorkers",
                    crate::git::redact_url(&request.repo_url),
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
