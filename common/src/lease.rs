//! One `coordination.k8s.io/v1` Lease, claimed and renewed: the agent's leader election and the writer's
//! per-(repository, branch) worker fence are both this module.
//!
//! ```text
//! every renew period:  GET Lease ──▶ decide() (pure) ──▶ create / replace (resourceVersion CAS)
//!                                                          │ 409 = someone else wrote first
//!                                                          ▼
//!                                   watch::Receiver<LeaseState> (holder, and our Tenure while we hold it)
//! ```
//!
//! Safety: a holder stops believing it holds the Lease `lease − renew` after the last renewal it sent (on the
//! monotonic clock), i.e. before anyone else may consider it expired (`renewTime + lease`), so there is no moment
//! with two holders as long as clocks agree to within `renew`. Every request is bounded by `renew`, so a hanging
//! API server cannot stretch that window. [`release`] vacates the Lease on a clean shutdown so a successor takes
//! over at its next attempt instead of after the expiry.
//!
//! Cleanup: with [`LeaseConfig::owner_role`] the Lease carries an ownerReference to that Role (the one granting the
//! Lease rights, in the Lease's namespace). Deleting the Role (`helm uninstall`) lets the garbage collector delete
//! the Lease; while the Role is missing no Lease is created.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::rbac::v1::Role;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Which Lease, who we are, how fast to renew, and what owns the Lease.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per process (two replicas on one host must differ).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// A Role in `namespace` that owns the Lease (ownerReference): the Lease goes when the Role goes.
    pub owner_role: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("lease request timed out")]
    Timeout,
    #[error(
        "the Role {0:?} that owns the Lease does not exist (uninstalled?): not creating the Lease"
    )]
    OwnerMissing(String),
}

/// What to do with the Lease as read.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// No Lease yet: create it holding it.
    Create(LeaseSpec),
    /// Ours, free or expired: write this spec (guarded by the resourceVersion we read).
    Update(LeaseSpec),
    /// Someone else holds an unexpired Lease.
    Standby { holder: String },
}

/// Decides from the Lease as read. Pure, so that every case is unit-tested.
pub fn decide(
    current: Option<&LeaseSpec>,
    identity: &str,
    duration: Duration,
    now: Timestamp,
) -> Decision {
    let seconds = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(spec) = current else {
        return Decision::Create(LeaseSpec {
            holder_identity: Some(identity.to_owned()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        });
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == identity;
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(MicroTime(renewed)), Some(secs)) => {
            now.duration_since(*renewed).as_secs_f64() > f64::from(secs)
        }
        _ => true,
    };
    if !ours && !holder.is_empty() && !expired {
        return Decision::Standby { holder };
    }
    let mut next = spec.clone();
    if !ours {
        next.acquire_time = Some(MicroTime(now));
        next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    next.holder_identity = Some(identity.to_owned());
    next.renew_time = Some(MicroTime(now));
    next.lease_duration_seconds = Some(seconds);
    Decision::Update(next)
}

/// The Lease we hold: its term, and until when we can prove we hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenure {
    pub lease_uid: String,
    /// `spec.leaseTransitions`: every takeover increases it.
    pub transitions: u64,
    /// Our `spec.holderIdentity`.
    pub holder: String,
    /// On the monotonic clock: the last successful renewal's send time plus `lease − renew`. Past it, someone else
    /// may hold the Lease (after a freeze, say).
    pub valid_until: Instant,
}

impl Tenure {
    /// Whether `other` is the same term (a renewal), whatever its deadline.
    pub fn same_term(&self, other: &Tenure) -> bool {
        self.lease_uid == other.lease_uid
            && self.transitions == other.transitions
            && self.holder == other.holder
    }

    /// Whether the Lease is provably still ours now.
    pub fn is_current(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

/// What the claim loop knows about the Lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseState {
    /// The current holder's identity as last read ("" when unknown or free).
    pub holder: String,
    /// Our term while we hold the Lease.
    pub tenure: Option<Tenure>,
}

impl LeaseState {
    /// Whether we hold the Lease, provably, right now.
    pub fn held(&self) -> bool {
        self.tenure.as_ref().is_some_and(Tenure::is_current)
    }
}

/// One attempt's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease (uid, transitions) as written.
    Held {
        lease_uid: String,
        transitions: u64,
    },
    HeldBy(String),
    /// Someone else wrote the Lease between our read and our write.
    LostRace,
}

/// The ownerReference to `role` (not blocking its deletion: that needs more RBAC, and a Lease is worthless once
/// the right to hold it is gone).
fn owner_reference(role: &Role) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "rbac.authorization.k8s.io/v1".to_owned(),
        kind: "Role".to_owned(),
        name: role.metadata.name.clone()?,
        uid: role.metadata.uid.clone()?,
        block_owner_deletion: None,
        controller: None,
    })
}

/// The owner Role's reference, read now: `Ok(None)` without an owner, [`LeaseError::OwnerMissing`] when it is gone.
async fn current_owner(
    client: &Client,
    config: &LeaseConfig,
) -> Result<Option<OwnerReference>, LeaseError> {
    let Some(role_name) = config.owner_role.as_deref() else {
        return Ok(None);
    };
    let roles: Api<Role> = Api::namespaced(client.clone(), &config.namespace);
    match roles.get_opt(role_name).await? {
        Some(role) => Ok(owner_reference(&role)),
        None => Err(LeaseError::OwnerMissing(role_name.to_owned())),
    }
}

fn owned_by_role(lease: &Lease, role_name: &str) -> bool {
    lease
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.kind == "Role" && owner.name == role_name)
}

/// One claim-or-renew step, bounded by `renew_every`.
pub async fn try_acquire(client: &Client, config: &LeaseConfig) -> Result<Attempt, LeaseError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let step = async {
        let current = api.get_opt(&config.name).await?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &config.identity,
            config.lease_duration,
            Timestamp::now(),
        );
        let written = match decision {
            Decision::Standby { holder } => return Ok(Attempt::HeldBy(holder)),
            Decision::Create(spec) => {
                let owner = current_owner(client, config).await?;
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(config.name.clone()),
                        namespace: Some(config.namespace.clone()),
                        owner_references: owner.map(|owner| vec![owner]),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                api.create(&PostParams::default(), &lease).await
            }
            Decision::Update(spec) => {
                // `current` carries the resourceVersion we read: the write is a compare-and-swap.
                let mut lease = current.unwrap_or_default();
                // A Lease from before the owner was configured (an upgrade) gets it on its next renewal.
                if let Some(role_name) = config.owner_role.as_deref()
                    && !owned_by_role(&lease, role_name)
                    && let Some(owner) = current_owner(client, config).await?
                {
                    lease
                        .metadata
                        .owner_references
                        .get_or_insert_with(Vec::new)
                        .push(owner);
                }
                lease.spec = Some(spec);
                api.replace(&config.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(lease) => Ok(Attempt::Held {
                // Without a uid (an API server that sets none) the Lease's name stands in.
                lease_uid: lease
                    .metadata
                    .uid
                    .filter(|uid| !uid.is_empty())
                    .unwrap_or_else(|| format!("{}/{}", config.namespace, config.name)),
                transitions: lease
                    .spec
                    .and_then(|s| s.lease_transitions)
                    .map_or(0, |t| u64::try_from(t).unwrap_or(0)),
            }),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::LostRace),
            Err(error) => Err(LeaseError::Api(error)),
        }
    };
    tokio::time::timeout(config.renew_every, step)
        .await
        .unwrap_or(Err(LeaseError::Timeout))
}

/// Gives the Lease up if we hold it, so a successor need not wait for it to expire.
pub async fn release(client: &Client, config: &LeaseConfig) -> Result<(), LeaseError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let step = async {
        let Some(mut lease) = api.get_opt(&config.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(1);
        match api
            .replace(&config.name, &PostParams::default(), &lease)
            .await
        {
            // Someone else already took it: nothing of ours to release.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            other => other.map(|_| ()).map_err(LeaseError::from),
        }
    };
    tokio::time::timeout(config.renew_every, step)
        .await
        .unwrap_or(Err(LeaseError::Timeout))
}

/// Runs the claim loop. The receiver holds the latest [`LeaseState`]. When every receiver is gone the loop releases
/// the Lease (if held) and ends; a caller that aborts the task instead calls [`release`] itself.
pub fn spawn(client: Client, config: LeaseConfig) -> (watch::Receiver<LeaseState>, JoinHandle<()>) {
    let (state_tx, state_rx) = watch::channel(LeaseState::default());
    let task = tokio::spawn(async move {
        // We stop holding the Lease on our own this long after the last renewal we sent, before anyone else may
        // take it over.
        let step_down_after = config.lease_duration.saturating_sub(config.renew_every);
        let mut renewed_at: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let previous = state_tx.borrow().clone();
            let next = match try_acquire(&client, &config).await {
                Ok(Attempt::Held {
                    lease_uid,
                    transitions,
                }) => {
                    // Counted from when the request was sent: the server's renewTime is no earlier than that.
                    renewed_at = Some(started);
                    LeaseState {
                        holder: config.identity.clone(),
                        tenure: Some(Tenure {
                            lease_uid,
                            transitions,
                            holder: config.identity.clone(),
                            valid_until: started + step_down_after,
                        }),
                    }
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if previous.tenure.is_some() {
                        warn!(lease = %config.name, %holder, "lease taken over by another holder");
                    }
                    LeaseState {
                        holder,
                        tenure: None,
                    }
                }
                Ok(Attempt::LostRace) => {
                    debug!(lease = %config.name, "lost a lease race; retrying");
                    LeaseState {
                        holder: previous.holder.clone(),
                        tenure: None,
                    }
                }
                Err(error) => {
                    // The tenure keeps its deadline: it lapses on its own when the renewal cannot be proven.
                    let still = previous.tenure.as_ref().is_some_and(Tenure::is_current);
                    warn!(lease = %config.name, %error, still_holding = still, "lease renewal failed");
                    if still {
                        previous.clone()
                    } else {
                        LeaseState {
                            tenure: None,
                            ..previous.clone()
                        }
                    }
                }
            };
            if next.tenure.is_some() != previous.tenure.is_some() {
                info!(lease = %config.name, identity = %config.identity, holding = next.tenure.is_some(), holder = %next.holder, "lease state changed");
            }
            state_tx.send_replace(next);
            // A waiting claimant polls at the renew period too: a released Lease is taken at its next attempt, an
            // expired one within one period after it expires. A holder never sleeps past its own step-down.
            let holding = state_tx.borrow().tenure.is_some();
            let deadline = renewed_at
                .filter(|_| holding)
                .map(|t| t + step_down_after)
                .unwrap_or(started + config.renew_every)
                .min(Instant::now() + config.renew_every);
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                // Nobody needs the Lease any more (its user stopped): hand it over at once.
                () = state_tx.closed() => {
                    if state_tx.borrow().tenure.is_some() {
                        match release(&client, &config).await {
                            Ok(()) => info!(lease = %config.name, "lease released"),
                            Err(error) => warn!(lease = %config.name, %error, "could not release the lease; it expires on its own"),
                        }
                    }
                    return;
                }
            }
            // Past the deadline without a renewal: say so before the next attempt (which may hang for `renew`).
            let lapsed = state_tx
                .borrow()
                .tenure
                .as_ref()
                .is_some_and(|t| !t.is_current());
            if lapsed {
                state_tx.send_modify(|state| state.tenure = None);
                warn!(lease = %config.name, "lease renewal not proven in time: no longer holding it");
            }
        }
    });
    (state_rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(24);

    fn t(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn held(by: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.to_owned()),
            lease_duration_seconds: Some(24),
            renew_time: Some(MicroTime(t(renewed))),
            acquire_time: Some(MicroTime(t(0))),
            lease_transitions: Some(2),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_missing_lease_is_created_holding_it() {
        match decide(None, "me", D, t(0)) {
            Decision::Create(spec) => {
                assert_eq!(spec.holder_identity.as_deref(), Some("me"));
                assert_eq!(spec.lease_duration_seconds, Some(24));
                assert_eq!(spec.lease_transitions, Some(0));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_live_lease_of_another_holder_means_standby() {
        assert_eq!(
            decide(Some(&held("other", 0)), "me", D, t(20)),
            Decision::Standby {
                holder: "other".into()
            }
        );
    }

    #[test]
    fn an_expired_lease_is_taken_over_and_counts_a_transition() {
        let Decision::Update(spec) = decide(Some(&held("other", 0)), "me", D, t(25)) else {
            panic!("expected a takeover");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(3));
        assert_eq!(spec.acquire_time, Some(MicroTime(t(25))));
    }

    #[test]
    fn renewing_our_own_lease_keeps_acquire_time_and_transitions() {
        let Decision::Update(spec) = decide(Some(&held("me", 0)), "me", D, t(8)) else {
            panic!("expected a renewal");
        };
        assert_eq!(spec.renew_time, Some(MicroTime(t(8))));
        assert_eq!(spec.acquire_time, Some(MicroTime(t(0))));
        assert_eq!(spec.lease_transitions, Some(2));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut spec = held("other", 0);
        spec.holder_identity = None;
        assert!(matches!(
            decide(Some(&spec), "me", D, t(1)),
            Decision::Update(_)
        ));
    }

    #[test]
    fn a_lease_without_renew_time_counts_as_expired() {
        let mut spec = held("other", 0);
        spec.renew_time = None;
        assert!(matches!(
            decide(Some(&spec), "me", D, t(1)),
            Decision::Update(_)
        ));
    }

    #[test]
    fn a_tenure_past_its_deadline_is_not_held() {
        let tenure = Tenure {
            lease_uid: "u".into(),
            transitions: 0,
            holder: "me".into(),
            valid_until: Instant::now() - Duration::from_millis(1),
        };
        let state = LeaseState {
            holder: "me".into(),
            tenure: Some(tenure.clone()),
        };
        assert!(!state.held());
        let renewed = Tenure {
            valid_until: Instant::now() + Duration::from_secs(5),
            ..tenure
        };
        assert!(
            LeaseState {
                holder: "me".into(),
                tenure: Some(renewed)
            }
            .held()
        );
    }

    // Request/response tests of the claim step over tower-test's mock API server (the writer's
    // tests/lease_emulator.rs runs the same logic against a real HTTP API server, the agent's fencing e2e against
    // the real kube-apiserver).
    mod requests {
        use super::super::*;
        use http::{Method, Request, Response};
        use kube::client::Body;
        use tower_test::mock::Handle;

        type ApiHandle = Handle<Request<Body>, Response<Body>>;

        fn config(owner_role: Option<&str>) -> LeaseConfig {
            LeaseConfig {
                namespace: "ns".into(),
                name: "w".into(),
                identity: "me".into(),
                lease_duration: Duration::from_secs(24),
                renew_every: Duration::from_secs(8),
                owner_role: owner_role.map(str::to_owned),
            }
        }

        fn lease_json(holder: &str, renew: &str, rv: &str) -> serde_json::Value {
            serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "w", "namespace": "ns", "resourceVersion": rv, "uid": "lease-uid"},
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": 24, "renewTime": renew, "leaseTransitions": 0}
            })
        }

        fn role_json() -> serde_json::Value {
            serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "owner", "namespace": "ns", "uid": "role-uid"}, "rules": []
            })
        }

        fn respond(status: u16, body: serde_json::Value) -> Response<Body> {
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap()
        }

        fn not_found(what: &str) -> serde_json::Value {
            serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":format!("{what} not found")})
        }

        async fn body_json(request: Request<Body>) -> serde_json::Value {
            let body = http_body_util::BodyExt::collect(request.into_body())
                .await
                .unwrap()
                .to_bytes();
            serde_json::from_slice(&body).unwrap()
        }

        async fn attempt(
            config: LeaseConfig,
            script: impl FnOnce(ApiHandle) -> tokio::task::JoinHandle<()>,
        ) -> Result<Attempt, LeaseError> {
            let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let server = script(handle);
            let client = Client::new(service, "ns");
            let result = try_acquire(&client, &config).await;
            server.await.unwrap();
            result
        }

        #[tokio::test]
        async fn creates_a_missing_lease() {
            let result = attempt(config(None), |mut handle| {
                tokio::spawn(async move {
                    let (request, send) = handle.next_request().await.unwrap();
                    assert_eq!(request.method(), Method::GET);
                    send.send_response(respond(404, not_found("lease")));
                    let (request, send) = handle.next_request().await.unwrap();
                    assert_eq!(request.method(), Method::POST);
                    assert_eq!(
                        request.uri().path(),
                        "/apis/coordination.k8s.io/v1/namespaces/ns/leases"
                    );
                    let sent = body_json(request).await;
                    assert!(sent["metadata"].get("ownerReferences").is_none(), "{sent}");
                    send.send_response(respond(
                        201,
                        lease_json("me", "2026-01-01T00:00:00.000000Z", "2"),
                    ));
                })
            })
            .await;
            assert_eq!(
                result.unwrap(),
                Attempt::Held {
                    lease_uid: "lease-uid".into(),
                    transitions: 0
                }
            );
        }

        #[tokio::test]
        async fn a_created_lease_is_owned_by_the_configured_role() {
            let result = attempt(config(Some("owner")), |mut handle| {
                tokio::spawn(async move {
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(404, not_found("lease")));
                    let (request, send) = handle.next_request().await.unwrap();
                    assert_eq!(request.method(), Method::GET);
                    assert_eq!(
                        request.uri().path(),
                        "/apis/rbac.authorization.k8s.io/v1/namespaces/ns/roles/owner"
                    );
                    send.send_response(respond(200, role_json()));
                    let (request, send) = handle.next_request().await.unwrap();
                    assert_eq!(request.method(), Method::POST);
                    let sent = body_json(request).await;
                    assert_eq!(
                        sent["metadata"]["ownerReferences"],
                        serde_json::json!([{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "name": "owner", "uid": "role-uid"}])
                    );
                    send.send_response(respond(201, sent));
                })
            })
            .await;
            assert!(matches!(result, Ok(Attempt::Held { .. })), "{result:?}");
        }

        #[tokio::test]
        async fn no_lease_is_created_while_the_owner_role_is_missing() {
            let result = attempt(config(Some("owner")), |mut handle| {
                tokio::spawn(async move {
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(404, not_found("lease")));
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(404, not_found("role")));
                    // No third request: the mock would hang the test if a POST followed.
                })
            })
            .await;
            assert!(
                matches!(&result, Err(LeaseError::OwnerMissing(role)) if role == "owner"),
                "{result:?}"
            );
        }

        #[tokio::test]
        async fn a_lease_from_before_the_owner_was_configured_gets_it_on_renewal() {
            let fresh = Timestamp::now().to_string();
            let result = attempt(config(Some("owner")), move |mut handle| {
                tokio::spawn(async move {
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(200, lease_json("me", &fresh, "5")));
                    let (request, send) = handle.next_request().await.unwrap();
                    assert_eq!(
                        request.uri().path(),
                        "/apis/rbac.authorization.k8s.io/v1/namespaces/ns/roles/owner"
                    );
                    send.send_response(respond(200, role_json()));
                    let (request, send) = handle.next_request().await.unwrap();
                    assert_eq!(request.method(), Method::PUT);
                    let sent = body_json(request).await;
                    assert_eq!(sent["metadata"]["resourceVersion"], "5");
                    assert_eq!(sent["metadata"]["ownerReferences"][0]["uid"], "role-uid");
                    send.send_response(respond(200, sent));
                })
            })
            .await;
            assert!(matches!(result, Ok(Attempt::Held { .. })), "{result:?}");
        }

        #[tokio::test]
        async fn respects_an_unexpired_lease_of_another_holder() {
            let fresh = Timestamp::now().to_string();
            let result = attempt(config(None), move |mut handle| {
                tokio::spawn(async move {
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(200, lease_json("other", &fresh, "5")));
                })
            })
            .await;
            assert_eq!(result.unwrap(), Attempt::HeldBy("other".into()));
        }

        #[tokio::test]
        async fn takes_over_an_expired_lease_with_its_resource_version() {
            let result = attempt(config(None), |mut handle| {
                tokio::spawn(async move {
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(
                        200,
                        lease_json("other", "2020-01-01T00:00:00.000000Z", "5"),
                    ));
                    let (request, send) = handle.next_request().await.unwrap();
                    assert_eq!(request.method(), Method::PUT);
                    let sent = body_json(request).await;
                    assert_eq!(sent["metadata"]["resourceVersion"], "5");
                    assert_eq!(sent["spec"]["holderIdentity"], "me");
                    assert_eq!(sent["spec"]["leaseTransitions"], 1);
                    send.send_response(respond(200, sent));
                })
            })
            .await;
            assert_eq!(
                result.unwrap(),
                Attempt::Held {
                    lease_uid: "lease-uid".into(),
                    transitions: 1
                }
            );
        }

        #[tokio::test]
        async fn a_conflicting_update_is_a_lost_race_not_a_claim() {
            let result = attempt(config(None), |mut handle| {
                tokio::spawn(async move {
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(200, lease_json("", "2020-01-01T00:00:00.000000Z", "5")));
                    let (_, send) = handle.next_request().await.unwrap();
                    send.send_response(respond(
                        409,
                        serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Conflict","code":409,"message":"the object has been modified"}),
                    ));
                })
            })
            .await;
            assert_eq!(result.unwrap(), Attempt::LostRace);
        }

        #[tokio::test(start_paused = true)]
        async fn a_hanging_api_server_is_a_timeout_within_the_renew_period() {
            let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            // Take the request and never answer it.
            let _server = tokio::spawn(async move {
                let (_request, _send) = handle.next_request().await.unwrap();
                std::future::pending::<()>().await;
            });
            let client = Client::new(service, "ns");
            let result = try_acquire(&client, &config(None)).await;
            assert!(matches!(result, Err(LeaseError::Timeout)), "{result:?}");
        }
    }
}
