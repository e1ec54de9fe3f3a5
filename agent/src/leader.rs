//! Leader election on a `coordination.k8s.io/v1` Lease: only the holder runs the controller,
//! ingestion and the stream, so two agent replicas never stream the same cluster twice.
//!
//! ```text
//! every renew period:  GET Lease ──▶ decide() (pure) ──▶ create / replace (resourceVersion CAS)
//!                                     │                    │ 409 = someone else wrote first
//!                                     ▼                    ▼
//!                           watch::Sender<bool> "we lead" ──▶ run.rs starts / cancels the work
//! ```
//!
//! Safety: the leader steps down by itself when it could not renew for `lease - renew`, i.e.
//! before a standby may consider the Lease expired (`renewTime + lease`), so there is no
//! moment with two leaders as long as clocks agree to within `renew`. Every request is bounded
//! by `renew`, so a hanging API server cannot stretch that window. On a clean shutdown the
//! leader vacates the Lease so that a standby takes over at its next attempt.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

/// Which Lease, who we are and how fast to renew.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per process (two replicas on one host must differ).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("lease request timed out")]
    Timeout,
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

/// The Lease we hold: the term every stream names (`Hello.leader_term`), and until when we can prove we hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenure {
    pub lease_uid: String,
    /// `spec.leaseTransitions`: every takeover increases it.
    pub transitions: u64,
    /// Our `spec.holderIdentity`.
    pub holder: String,
    /// On the monotonic clock: the last successful renewal's send time plus `lease - renew`. Past it, another
    /// replica may hold the Lease (after a freeze, say), so nothing may be sent to the writer.
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

/// One attempt's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease (uid, transitions) as written.
    Held {
        lease_uid: String,
        transitions: u64,
    },
    HeldBy(String),
    /// Another replica wrote the Lease between our read and our write.
    LostRace,
}

/// One claim-or-renew step.
pub async fn try_acquire(api: &Api<Lease>, config: &LeaderConfig) -> Result<Attempt, LeaderError> {
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
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(config.name.clone()),
                        namespace: Some(config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                api.create(&PostParams::default(), &lease).await
            }
            Decision::Update(spec) => {
                // `current` carries the resourceVersion we read: the write is a compare-and-swap.
                let mut lease = current.unwrap_or_default();
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
            Err(error) => Err(LeaderError::Api(error)),
        }
    };
    tokio::time::timeout(config.renew_every, step)
        .await
        .unwrap_or(Err(LeaderError::Timeout))
}

/// Gives the Lease up if we hold it, so a standby need not wait for it to expire.
pub async fn release(api: &Api<Lease>, config: &LeaderConfig) -> Result<(), LeaderError> {
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
        other => other.map(|_| ()).map_err(LeaderError::from),
    }
}

/// Runs the election loop; the first receiver says whether this process leads right now, the second which term
/// it holds and until when that is proven (updated before the first, so a new leader finds its term set).
pub fn spawn(
    client: Client,
    config: LeaderConfig,
) -> (
    watch::Receiver<bool>,
    watch::Receiver<Option<Tenure>>,
    JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(false);
    let (tenure_tx, tenure_rx) = watch::channel(None::<Tenure>);
    let task = tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        // Leadership ends on its own this long after the last renewal we sent, before anyone
        // else may take the Lease over.
        let step_down_after = config.lease_duration.saturating_sub(config.renew_every);
        let mut renewed_at: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let leading = match try_acquire(&api, &config).await {
                Ok(Attempt::Held {
                    lease_uid,
                    transitions,
                }) => {
                    // Counted from when the request was sent: the server's renewTime is no
                    // earlier than that.
                    renewed_at = Some(started);
                    tenure_tx.send_replace(Some(Tenure {
                        lease_uid,
                        transitions,
                        holder: config.identity.clone(),
                        valid_until: started + step_down_after,
                    }));
                    true
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if *tx.borrow() {
                        warn!(%holder, "lease taken over by another replica");
                    }
                    false
                }
                Ok(Attempt::LostRace) => false,
                Err(error) => {
                    let still = renewed_at.is_some_and(|t| t.elapsed() < step_down_after);
                    warn!(%error, still_leading = still && *tx.borrow(), "lease renewal failed");
                    still && *tx.borrow()
                }
            };
            if leading != *tx.borrow() {
                info!(lease = %config.name, identity = %config.identity, leading, "leadership changed");
            }
            if !leading {
                tenure_tx.send_replace(None);
            }
            tx.send_replace(leading);
            if tx.is_closed() {
                return;
            }
            // A standby polls at the renew period too: a released Lease is taken at its next
            // attempt, an expired one within one period after it expires.
            let delay = config.renew_every;
            // Never sleep past the point where leadership must end on its own.
            let deadline = renewed_at
                .filter(|_| leading)
                .map(|t| t + step_down_after)
                .unwrap_or(started + delay)
                .min(Instant::now() + delay);
            tokio::time::sleep_until(deadline).await;
        }
    });
    (rx, tenure_rx, task)
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
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_live_lease_of_another_replica_means_standby() {
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
}
