//! Leadership: the Lease (`reverser_common::lease`), the terms this process leads, the leader label on its Pod,
//! the attribution webhook that only the leader serves, and the cluster's identity.
//!
//! A term starts when this process acquires the Lease and is aborted the moment it loses it: the stream task is
//! dropped, so nothing more reaches the writer from a former leader. On shutdown the term stops gracefully
//! (ingestion first, then the stream waits briefly for acks), the Lease is released and the Pod's leader label
//! removed. Without leader election one term runs until shutdown.

mod term;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams};
use reverser_common::lease::{self, LeaseConfig};
use tracing::{info, warn};

pub use term::{Term, TermMetrics, TermParts};

use crate::stream::LeaderFence;
use crate::webhook::{self, FactStore, WebhookConfig, WebhookHandle};

/// Label the leader puts on its own Pod (removed when it steps down).
pub const LEADER_LABEL: &str = "configbutler.ai/leader";

/// How this process takes part in leadership.
pub enum Election {
    /// `--leader-election=false`: lead from the start.
    Off,
    On(LeaseConfig),
}

/// Leads terms until `shutdown` completes: at once without election, else whenever the Lease is ours.
pub async fn lead(
    parts: Arc<TermParts>,
    election: Election,
    webhook: Option<(WebhookConfig, FactStore)>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let client = parts.client.clone();
    let metrics = parts.metrics.clone();
    let mut webhook_handle = None;
    match election {
        Election::Off => {
            metrics.leader.set(1);
            webhook_handle = start_webhook(webhook.as_ref()).await;
            let term = Term::start(&parts, None);
            shutdown.await;
            term.stop().await;
        }
        Election::On(config) => {
            info!(lease = %config.name, namespace = %config.namespace, identity = %config.identity, "leader election on");
            let (mut lease_state, election) = lease::spawn(client.clone(), config.clone());
            loop {
                // The term this process leads in: every stream of the term names it, and sends only while the
                // Lease is provably still ours.
                let tenure = tokio::select! {
                    _ = &mut shutdown => break,
                    state = lease_state.wait_for(|state| state.tenure.is_some()) => match state {
                        Ok(state) => state.tenure.clone(),
                        Err(_) => bail!("leader election stopped"),
                    },
                };
                let fence = tenure.map(|term| LeaderFence {
                    term,
                    lease: lease_state.clone(),
                });
                metrics.leader.set(1);
                // Listening before the label: the Service routes to the labelled Pod at once.
                webhook_handle = start_webhook(webhook.as_ref()).await;
                label_own_pod(&client, true).await;
                let term = Term::start(&parts, fence);
                let stop = tokio::select! {
                    _ = &mut shutdown => true,
                    _ = lease_state.wait_for(|state| state.tenure.is_none()) => false,
                };
                metrics.leader.set(0);
                if stop {
                    term.stop().await;
                    election.abort();
                    if let Err(error) = lease::release(&client, &config).await {
                        warn!(%error, "could not release the leader lease; it expires on its own");
                    }
                    label_own_pod(&client, false).await;
                    break;
                }
                warn!("lost the leader lease: stopping at once");
                term.abort();
                label_own_pod(&client, false).await;
                if let Some(handle) = webhook_handle.take() {
                    handle.shutdown().await;
                }
            }
            election.abort();
        }
    }
    if let Some(handle) = webhook_handle.take() {
        handle.shutdown().await;
    }
    Ok(())
}

/// Starts the attribution webhook for a leader term (or the whole run without leader election). A failure (the
/// port still held, say) is logged and the term goes on without it: changes are then the bot's, never lost.
async fn start_webhook(parts: Option<&(WebhookConfig, FactStore)>) -> Option<WebhookHandle> {
    let (config, store) = parts?;
    match webhook::spawn(config.clone(), store.clone()).await {
        Ok(handle) => Some(handle),
        Err(error) => {
            warn!(%error, "the attribution webhook could not start; changes of this term are the bot's");
            None
        }
    }
}

/// The cluster's identity: the uid of `kube-system` (stable for the cluster's life), else of `default` when
/// `kube-system` does not exist or may not be read. Retried until the API answers: without it the writer cannot
/// tell clusters apart.
///
/// Only a definite answer about `kube-system` (absent, or 403) moves on to `default`. A transport error or a
/// server error is retried on `kube-system` itself: falling back on a passing failure would give the same cluster
/// another identity, and the writer would then refuse this agent's destinations as another cluster's
/// (`OverlappingBaseFolder`).
pub async fn cluster_uid(client: &kube::Client) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut delay = Duration::from_secs(1);
    loop {
        for name in ["kube-system", "default"] {
            match api.get_opt(name).await {
                Ok(Some(ns)) => {
                    if let Some(uid) = ns.metadata.uid {
                        info!(namespace = name, %uid, "cluster UID");
                        return uid;
                    }
                }
                Ok(None) => {}
                Err(kube::Error::Api(status)) if status.code == 403 => {
                    warn!(namespace = name, "reading the cluster UID is forbidden");
                }
                Err(error) => {
                    warn!(%error, namespace = name, "reading the cluster UID failed; retrying");
                    break;
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Sets or removes the leader label on our own Pod, when running in one (`POD_NAME` and
/// `POD_NAMESPACE` from the downward API). Failures only cost the label.
async fn label_own_pod(client: &kube::Client, leader: bool) {
    let (Ok(name), Ok(namespace)) = (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE"))
    else {
        return;
    };
    if name.is_empty() || namespace.is_empty() {
        return;
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let value = if leader {
        serde_json::json!("true")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => info!(pod = %name, leader, "pod leader label updated"),
        Err(error) => warn!(pod = %name, %error, "could not update the pod's leader label"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace_response(name: &str, uid: &str) -> http::Response<kube::client::Body> {
        let body = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": uid},
        });
        http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    /// A passing failure reading `kube-system` (an API server behind a partition) must not make the cluster's
    /// identity the uid of `default`: the agent would present itself as another cluster.
    #[tokio::test(start_paused = true)]
    async fn a_failed_read_of_kube_system_is_retried_not_replaced_by_default() {
        let (mock, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(mock, "default");
        let server = tokio::spawn(async move {
            let mut kube_system_reads = 0;
            while let Some((request, send)) = handle.next_request().await {
                let path = request.uri().path().to_owned();
                if path.ends_with("/namespaces/kube-system") {
                    kube_system_reads += 1;
                    if kube_system_reads == 1 {
                        send.send_error(std::io::Error::other("connection timed out"));
                    } else {
                        send.send_response(namespace_response("kube-system", "uid-of-kube-system"));
                    }
                } else if path.ends_with("/namespaces/default") {
                    send.send_response(namespace_response("default", "uid-of-default"));
                } else {
                    panic!("unexpected request {path}");
                }
            }
        });
        assert_eq!(cluster_uid(&client).await, "uid-of-kube-system");
        server.abort();
    }

    /// Without `kube-system` (or without the right to read it) the uid of `default` is the identity.
    #[tokio::test(start_paused = true)]
    async fn a_forbidden_kube_system_falls_back_to_default() {
        let (mock, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(mock, "default");
        let server = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                if request.uri().path().ends_with("/namespaces/kube-system") {
                    let status = serde_json::json!({
                        "apiVersion": "v1", "kind": "Status", "status": "Failure",
                        "message": "forbidden", "reason": "Forbidden", "code": 403,
                    });
                    send.send_response(
                        http::Response::builder()
                            .status(403)
                            .header("content-type", "application/json")
                            .body(kube::client::Body::from(
                                serde_json::to_vec(&status).unwrap(),
                            ))
                            .unwrap(),
                    );
                } else {
                    send.send_response(namespace_response("default", "uid-of-default"));
                }
            }
        });
        assert_eq!(cluster_uid(&client).await, "uid-of-default");
        server.abort();
    }
}
