//! Per-worker Kubernetes Lease (seed Appendix K): a `coordination.k8s.io/v1` Lease named after the worker id
//! (hash of repository URL and branch) in the writer's namespace. A worker writes only while it holds its Lease,
//! so two writers pointed at the same branch never push concurrently.
//!
//! [`spawn`] runs a claim loop and publishes the state on a `watch` channel; [`try_claim`] is one
//! compare-and-swap step (create, renew, or take over an expired Lease, guarded by resourceVersion so a race
//! with another writer ends in a 409 and no double ownership).

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// What a worker knows about its Lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseState {
    pub held: bool,
    /// Current holder's identity ("" when unknown).
    pub holder: String,
}

/// Lease settings shared by all workers.
#[derive(Clone)]
pub struct LeaseSettings {
    pub client: Client,
    pub namespace: String,
    /// This writer's identity (Pod name or hostname plus a random suffix).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl std::fmt::Debug for LeaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseSettings")
            .field("namespace", &self.namespace)
            .field("identity", &self.identity)
            .field("lease_duration", &self.lease_duration)
            .field("renew_every", &self.renew_every)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// Result of one claim attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// We hold the Lease until at least the renewal we just wrote expires.
    Held,
    /// Someone else holds an unexpired Lease.
    HeldBy(String),
    /// Another writer changed the Lease between our read and our write; try again later.
    LostRace,
}

/// One claim step: create the Lease, renew ours, or take over an expired one.
pub async fn try_claim(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    duration: Duration,
) -> Result<Claim, LeaseError> {
    let now = Timestamp::now();
    let seconds = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
    match api.get_opt(name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity.to_owned()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Claim::Held),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Claim::LostRace),
                Err(error) => Err(error.into()),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let ours = holder == identity;
            let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
                (Some(MicroTime(renewed)), Some(secs)) => {
                    let age = now.duration_since(*renewed).as_secs_f64();
                    age > f64::from(secs)
                }
                _ => true,
            };
            if !ours && !holder.is_empty() && !expired {
                return Ok(Claim::HeldBy(holder));
            }
            if !ours {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.holder_identity = Some(identity.to_owned());
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(seconds);
            // `replace` sends our resourceVersion: a concurrent writer's update makes this a 409, never a silent
            // double claim.
            match api.replace(name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Claim::Held),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Claim::LostRace),
                Err(error) => Err(error.into()),
            }
        }
    }
}

/// Runs the claim loop for one worker's Lease; the receiver says whether we hold it. When a renewal fails the
/// state turns to "not held" once the last successful renewal could have expired — a writer never believes it
/// holds a Lease someone else may have taken over.
pub fn spawn(settings: LeaseSettings, name: String) -> watch::Receiver<LeaseState> {
    let (sender, receiver) = watch::channel(LeaseState::default());
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(settings.client.clone(), &settings.namespace);
        let mut last_success: Option<tokio::time::Instant> = None;
        loop {
            let state =
                match try_claim(&api, &name, &settings.identity, settings.lease_duration).await {
                    Ok(Claim::Held) => {
                        last_success = Some(tokio::time::Instant::now());
                        LeaseState {
                            held: true,
                            holder: settings.identity.clone(),
                        }
                    }
                    Ok(Claim::HeldBy(holder)) => {
                        debug!(lease = %name, %holder, "lease held by another writer");
                        LeaseState {
                            held: false,
                            holder,
                        }
                    }
                    Ok(Claim::LostRace) => {
                        debug!(lease = %name, "lost a lease race; retrying");
                        LeaseState {
                            held: false,
                            holder: sender.borrow().holder.clone(),
                        }
                    }
                    Err(error) => {
                        warn!(lease = %name, %error, "lease claim failed");
                        let still_valid =
                            last_success.is_some_and(|t| t.elapsed() < settings.lease_duration);
                        let mut state = sender.borrow().clone();
                        state.held &= still_valid;
                        state
                    }
                };
            if *sender.borrow() != state {
                info!(lease = %name, held = state.held, holder = %state.holder, "lease state changed");
            }
            sender.send_replace(state);
            if sender.is_closed() {
                return;
            }
            tokio::time::sleep(settings.renew_every).await;
        }
    });
    receiver
}

#[cfg(test)]
mod tests {
    //! Request/response tests of the claim step over tower-test's mock API server. The kube-emulator tests
    //! (writer/tests/lease_emulator.rs) run the same logic against a real HTTP API server.
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    fn lease_json(holder: &str, renew: &str, rv: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "w", "namespace": "ns", "resourceVersion": rv},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 24, "renewTime": renew, "leaseTransitions": 0}
        })
    }

    fn respond(status: u16, body: serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    fn not_found() -> serde_json::Value {
        serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"leases \"w\" not found"})
    }

    async fn run_claim(
        script: impl FnOnce(
            tower_test::mock::Handle<Request<Body>, Response<Body>>,
        ) -> tokio::task::JoinHandle<()>,
        identity: &str,
    ) -> Claim {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = script(handle);
        let client = Client::new(service, "ns");
        let api: Api<Lease> = Api::namespaced(client, "ns");
        let claim = try_claim(&api, "w", identity, Duration::from_secs(24))
            .await
            .unwrap();
        server.await.unwrap();
        claim
    }

    #[tokio::test]
    async fn creates_a_missing_lease() {
        let claim = run_claim(
            |mut handle| {
                tokio::spawn(async move {
                    let (request, send) = handle.next_request().await.unwrap();
                    assert_eq!(request.method(), http::Method::GET);
                    send.send_response(respond(404, not_found()));
                    let (request, send) = handle.next_request().await.unwrap();
                    assert_eq!(request.method(), http::Method::POST);
                    assert_eq!(
                        request.uri().path(),
                        "/apis/coordination.k8s.io/v1/namespaces/ns/leases"
                    );
                    send.send_response(respond(
                        201,
                        lease_json("me", "2026-01-01T00:00:00.000000Z", "2"),
                    ));
                })
            },
            "me",
        )
        .await;
        assert_eq!(claim, Claim::Held);
    }

    #[tokio::test]
    async fn respects_an_unexpired_lease_of_another_writer() {
        let fresh = Timestamp::now().to_string();
        let claim = run_claim(
            move |mut handle| {
                tokio::spawn(async move {
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(200, lease_json("other", &fresh, "5")));
                })
            },
            "me",
        )
        .await;
        assert_eq!(claim, Claim::HeldBy("other".into()));
    }

    #[tokio::test]
    async fn takes_over_an_expired_lease_with_its_resource_version() {
        let claim = run_claim(
            |mut handle| {
                tokio::spawn(async move {
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(
                        200,
                        lease_json("other", "2020-01-01T00:00:00.000000Z", "5"),
                    ));
                    let (request, send) = handle.next_request().await.unwrap();
                    assert_eq!(request.method(), http::Method::PUT);
                    let body = http_body_util::BodyExt::collect(request.into_body())
                        .await
                        .unwrap()
                        .to_bytes();
                    let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(sent["metadata"]["resourceVersion"], "5");
                    assert_eq!(sent["spec"]["holderIdentity"], "me");
                    assert_eq!(sent["spec"]["leaseTransitions"], 1);
                    send.send_response(respond(200, sent));
                })
            },
            "me",
        )
        .await;
        assert_eq!(claim, Claim::Held);
    }

    #[tokio::test]
    async fn a_conflicting_update_is_a_lost_race_not_a_claim() {
        let claim = run_claim(
            |mut handle| {
                tokio::spawn(async move {
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(200, lease_json("", "2020-01-01T00:00:00.000000Z", "5")));
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(
                        409,
                        serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Conflict","code":409,"message":"the object has been modified"}),
                    ));
                })
            },
            "me",
        )
        .await;
        assert_eq!(claim, Claim::LostRace);
    }
}
