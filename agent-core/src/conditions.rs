//! The status conditions the controller writes: from the resolution of the custom resources and
//! from the writer's feedback. Pure; the controller (`reverser_agent::controller`) patches the result.
//!
//! ```text
//! resolve() ── config-level Ready per destination/rule, rules selecting Secrets ─┐
//!                                                                               ├─▶ desired conditions
//! stream Feedback ──▶ WriterView (latest condition per destination and type, ───┘   per object
//!  (Status, Rejected,  writer connection state)                                      │ next_status()
//!   Connected, …)                                                                    ▼
//!                                                                       merge patch on /status if changed
//! ```
//!
//! # GitDestination
//!
//! - Every writer `DestinationStatus` is kept as a condition of the same type, latest per type:
//!   `Accepted`, `PushFailing`, `AuthFailed`, `LeaseConflict`, `MarkerConflict`,
//!   `OwnershipConflict`, and any type a newer writer sends. The writer's own `Ready` is not
//!   copied verbatim: it is folded into the destination's `Ready` (below).
//! - A writer `Reject` naming the destination becomes `Rejected=True` with the writer's reason
//!   and message (and the rejected sequence number).
//! - `ObjectsSkipped=True` (reason `ObjectTooLarge`) while objects are not mirrored because they
//!   exceed the writer's limits (announced in its `Welcome`); the message names them (the first
//!   ten). Everything else is mirrored, so it does not make the destination not Ready. It turns
//!   `False` (reason `AllObjectsFit`) when each of them went out again within limits.
//! - The writer only reports recoveries as `Ready=True` (after a successful push) and
//!   `Accepted=True` (after a declaration). So `Ready=True` turns `PushFailing`, `AuthFailed`,
//!   `LeaseConflict` and `Rejected` to `False`, and `Accepted=True` turns `OwnershipConflict` to
//!   `False` (reason: the writer's reason for the recovery). A failure type that was never
//!   reported is not invented.
//! - `WriterConnected` is `True` (reason `Connected`) while the stream to the writer is up and
//!   `False` (reason `Disconnected`, message: the error) during an outage; it is written on the
//!   destinations the agent declares to the writer, once the stream reported its first state.
//! - `Ready` is, in order: the configuration verdict when that is not Ready (`RepoNotFound`,
//!   `AccessDenied`, …); else `False` with the writer's reason when the writer's latest `Ready`
//!   is `False`; else `False` with the reason of the first failure condition that is `True`
//!   (`OwnershipConflict`, `AuthFailed`, `PushFailing`, `LeaseConflict`, and `MarkerConflict`
//!   when `exclusiveMode` makes the writer refuse writes); else `True`.
//!
//! Writer conditions already in an object's status (written by an earlier leader) count until the
//! writer reports otherwise: the writer reports each condition only when it changes, so a new
//! leader would otherwise forget a push that is still failing.
//!
//! # WatchRule and ClusterWatchRule
//!
//! - `Ready` is the configuration verdict; when that is Ready but the rule's destination is not
//!   Ready because of the writer, the rule is `Ready=False` with the destination's reason and a
//!   message naming the destination.
//! - `SecretsSkipped=True` on every rule whose selection includes Secrets, explicitly or through
//!   the desired-state preset, while its destination does not encrypt: reason
//!   `EncryptionNotConfigured` (no `spec.encryption`), `InvalidRecipients` (a recipient is not an
//!   age public key, or there is none) or `RecipientsSecretNotFound` / `RecipientsSecretUnreadable`
//!   (the recipients Secret is missing or unreadable). Such a destination is never sent a Secret, so
//!   no plaintext Secret ever reaches Git. The condition is removed when the rule stops selecting
//!   Secrets or its destination encrypts them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use reverser_common::reasons::{
    AgentConditionReason as Reason, AgentConditionType, ConditionType, RejectReason,
};

use crate::config::resolve::ReadyCondition;
use crate::crd::ResourceStatus;
use crate::events::Feedback;

/// The combined readiness condition type.
pub const READY: &str = ConditionType::Ready.as_str();
/// Whether the stream to the writer is up (on destinations).
pub const WRITER_CONNECTED: &str = AgentConditionType::WriterConnected.as_str();
/// The latest writer `Reject` for a destination.
pub const REJECTED: &str = AgentConditionType::Rejected.as_str();
/// Objects not sent because they exceed the writer's limits (`True`, reason `ObjectTooLarge`, naming them).
pub const OBJECTS_SKIPPED: &str = AgentConditionType::ObjectsSkipped.as_str();
/// The writer's acceptance of a destination declaration.
pub const ACCEPTED: &str = ConditionType::Accepted.as_str();
/// On rules that select Secrets while no encryption is configured.
pub const SECRETS_SKIPPED: &str = AgentConditionType::SecretsSkipped.as_str();
/// On a GitDestination with `spec.suspend` (`True`, reason `Suspended`); `False` (reason `Resumed`) once it is
/// set back, and absent on a destination that was never suspended.
pub const SUSPENDED: &str = AgentConditionType::Suspended.as_str();
/// Reason of [`SECRETS_SKIPPED`].
pub const ENCRYPTION_NOT_CONFIGURED: &str = Reason::EncryptionNotConfigured.as_str();

/// Writer condition types that keep a destination from being Ready while `True`, in the order
/// their reason is preferred.
const BLOCKING: &[&str] = &[
    ConditionType::OwnershipConflict.as_str(),
    ConditionType::AuthFailed.as_str(),
    ConditionType::PushFailing.as_str(),
    ConditionType::LeaseConflict.as_str(),
];
/// Blocking only with `exclusiveMode` (the writer then refuses the destination's writes).
const MARKER_CONFLICT: &str = ConditionType::MarkerConflict.as_str();
/// Failure types a writer `Ready=True` (a successful push) resolves.
const CLEARED_BY_PUSH: &[&str] = &[
    ConditionType::PushFailing.as_str(),
    ConditionType::AuthFailed.as_str(),
    ConditionType::LeaseConflict.as_str(),
    REJECTED,
];
/// Failure types a writer `Accepted=True` (a successful declaration) resolves.
const CLEARED_BY_ACCEPT: &[&str] = &[ConditionType::OwnershipConflict.as_str()];
/// Types the controller owns on every object; everything else on a destination is the writer's.
const OWN_TYPES: &[&str] = &[READY, WRITER_CONNECTED, SECRETS_SKIPPED, SUSPENDED];

/// One condition to write. `observedGeneration` and `lastTransitionTime` are added on writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl DesiredCondition {
    pub fn new(
        type_: impl Into<String>,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }

    fn ready(config: &ReadyCondition) -> Self {
        Self::new(
            READY,
            config.ready,
            config.reason.as_str(),
            config.message.clone(),
        )
    }

    fn status_text(&self) -> &'static str {
        if self.status { "True" } else { "False" }
    }
}

/// The conditions to set on one object, and the types to remove from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredConditions {
    pub set: Vec<DesiredCondition>,
    pub remove: Vec<&'static str>,
    /// GitDestination only: the reconcile request handed to ingestion (`status.lastHandledReconcileAt`); `None`
    /// keeps what the status has.
    pub handled_reconcile: Option<String>,
    /// GitDestination only: remove `status.suspendPreview` (the destination is not suspended).
    pub clear_suspend_preview: bool,
}

/// The `Suspended` condition of a GitDestination: `True` while `spec.suspend` is set, `False` (reason `Resumed`)
/// once it was and is no more; `None` for a destination that never was suspended.
pub fn suspended_condition(
    suspend: bool,
    persisted: Option<&ResourceStatus>,
) -> Option<DesiredCondition> {
    if suspend {
        return Some(DesiredCondition::new(
            SUSPENDED,
            true,
            Reason::Suspended.as_str(),
            "spec.suspend is true: changes are held by the writer and nothing is pushed; status.suspendPreview \
             shows what resuming would write",
        ));
    }
    let was = persisted.is_some_and(|s| s.conditions.iter().any(|c| c.type_ == SUSPENDED));
    was.then(|| {
        DesiredCondition::new(
            SUSPENDED,
            false,
            Reason::Resumed.as_str(),
            "spec.suspend is false: the held changes were handed to the writer's next flush",
        )
    })
}

/// One writer condition as kept by [`WriterView`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterCondition {
    pub status: bool,
    pub reason: String,
    pub message: String,
    /// Set by the agent (a recovery the writer implied), not reported for this type: written only
    /// over a condition that is already in the object's status.
    pub inferred: bool,
}

/// The state of the stream to the writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterConnection {
    pub up: bool,
    pub message: String,
}

/// What the writer told this leader term, folded from [`Feedback`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriterView {
    /// `None` until the stream reported its first connection state.
    pub connection: Option<WriterConnection>,
    /// Destination key (`namespace/name`) → condition type → latest condition. The writer's own
    /// `Ready` is kept under [`READY`].
    pub destinations: BTreeMap<String, BTreeMap<String, WriterCondition>>,
}

impl WriterView {
    /// Folds one feedback in; `true` when the view changed (so status may have to be written).
    pub fn apply(&mut self, feedback: &Feedback) -> bool {
        let before = self.clone();
        match feedback {
            Feedback::Connected | Feedback::Reconnected => {
                self.connection = Some(WriterConnection {
                    up: true,
                    message: "the stream to the writer is up".into(),
                });
            }
            Feedback::Disconnected { error } => {
                self.connection = Some(WriterConnection {
                    up: false,
                    message: format!("the stream to the writer is down: {error}"),
                });
            }
            Feedback::Rejected(r) => {
                if !r.destination.is_empty() {
                    let message = if r.sequence > 0 {
                        format!("{} (sequence {})", r.message, r.sequence)
                    } else {
                        r.message.clone()
                    };
                    self.set(&r.destination, REJECTED, true, &r.reason, message, false);
                }
            }
            Feedback::Status(s) => {
                if !s.destination.is_empty() && !s.condition_type.is_empty() {
                    let status = s.status.eq_ignore_ascii_case("true");
                    self.set(
                        &s.destination,
                        &s.condition_type,
                        status,
                        &s.reason,
                        s.message.clone(),
                        false,
                    );
                    let cleared: &[&str] = match (s.condition_type.as_str(), status) {
                        (READY, true) => CLEARED_BY_PUSH,
                        (ACCEPTED, true) => CLEARED_BY_ACCEPT,
                        _ => &[],
                    };
                    for type_ in cleared {
                        let message = format!(
                            "resolved: the writer reported {}=True ({})",
                            s.condition_type, s.reason
                        );
                        self.set(&s.destination, type_, false, &s.reason, message, true);
                    }
                }
            }
            Feedback::ObjectsSkipped {
                destination,
                objects,
                total,
            } => {
                if *total > 0 {
                    let more = total.saturating_sub(objects.len());
                    let mut message = format!(
                        "{total} object(s) exceed the writer's message or object size limit and are not mirrored (everything else is): {}",
                        objects.join("; ")
                    );
                    if more > 0 {
                        message.push_str(&format!("; and {more} more"));
                    }
                    self.set(
                        destination,
                        OBJECTS_SKIPPED,
                        true,
                        // The writer's word for it.
                        RejectReason::ObjectTooLarge.as_str(),
                        message,
                        false,
                    );
                } else if self
                    .destinations
                    .get(destination)
                    .is_some_and(|c| c.contains_key(OBJECTS_SKIPPED))
                {
                    self.set(
                        destination,
                        OBJECTS_SKIPPED,
                        false,
                        Reason::AllObjectsFit.as_str(),
                        "every object fits the writer's limits again".into(),
                        false,
                    );
                }
            }
            // Sweeps become Events (leader::term), not conditions.
            Feedback::SnapshotAbandoned { .. }
            | Feedback::Fenced { .. }
            | Feedback::Swept { .. }
            | Feedback::SuspendPreview(_)
            | Feedback::Flushed(_)
            | Feedback::FlushRefused { .. } => {}
        }
        *self != before
    }

    fn set(
        &mut self,
        destination: &str,
        type_: &str,
        status: bool,
        reason: &str,
        message: String,
        inferred: bool,
    ) {
        let conditions = self.destinations.entry(destination.to_owned()).or_default();
        if inferred && conditions.get(type_).is_some_and(|c| !c.status) {
            // Already resolved: keep what the writer said.
            return;
        }
        // Resolving a failure reported in this term is as good as reported: it is on the object.
        let inferred = inferred && !conditions.contains_key(type_);
        conditions.insert(
            type_.to_owned(),
            WriterCondition {
                status,
                reason: if reason.is_empty() {
                    type_.to_owned()
                } else {
                    reason.to_owned()
                },
                message,
                inferred,
            },
        );
    }
}

/// A destination's `Ready`, as rules need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationReadiness {
    pub ready: bool,
    pub reason: String,
    pub message: String,
    /// Not Ready because of the writer (not because of the configuration).
    pub from_writer: bool,
}

/// The conditions of one GitDestination.
///
/// `config` is the resolution's verdict, `declared` whether the agent declares it to the writer
/// (some admitted rule uses it), `persisted` the object's current status.
pub fn destination_conditions(
    config: &ReadyCondition,
    declared: bool,
    exclusive_mode: bool,
    persisted: Option<&ResourceStatus>,
    view: &WriterView,
    key: &str,
) -> (DesiredConditions, DestinationReadiness) {
    let mut out = DesiredConditions::default();
    let persisted: &[Condition] = persisted.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let from_writer = view.destinations.get(key);

    // What the writer says now: persisted writer types, overlaid with this term's reports.
    let mut effective: BTreeMap<&str, (bool, &str, &str)> = persisted
        .iter()
        .filter(|c| !OWN_TYPES.contains(&c.type_.as_str()))
        .map(|c| {
            (
                c.type_.as_str(),
                (c.status == "True", c.reason.as_str(), c.message.as_str()),
            )
        })
        .collect();
    for (type_, c) in from_writer.into_iter().flatten() {
        if type_ == READY {
            continue;
        }
        let on_object = effective.contains_key(type_.as_str());
        if c.inferred && !on_object {
            continue;
        }
        effective.insert(type_, (c.status, &c.reason, &c.message));
        out.set.push(DesiredCondition::new(
            type_.clone(),
            c.status,
            c.reason.clone(),
            c.message.clone(),
        ));
    }

    if declared && let Some(connection) = &view.connection {
        out.set.push(DesiredCondition::new(
            WRITER_CONNECTED,
            connection.up,
            if connection.up {
                Reason::Connected.as_str()
            } else {
                Reason::Disconnected.as_str()
            },
            connection.message.clone(),
        ));
    }

    let writer_ready = from_writer.and_then(|m| m.get(READY));
    let blocking = BLOCKING
        .iter()
        .copied()
        .chain(exclusive_mode.then_some(MARKER_CONFLICT))
        .find_map(|t| {
            effective
                .get(t)
                .filter(|(status, _, _)| *status)
                .map(|(_, reason, message)| (t, *reason, *message))
        });
    let ready = if !config.ready {
        DesiredCondition::ready(config)
    } else if let Some(w) = writer_ready.filter(|w| !w.status) {
        DesiredCondition::new(
            READY,
            false,
            w.reason.clone(),
            format!("the writer reports: {}", w.message),
        )
    } else if let Some((type_, reason, message)) = blocking {
        DesiredCondition::new(
            READY,
            false,
            reason,
            format!("the writer reports {type_}: {message}"),
        )
    } else {
        DesiredCondition::ready(config)
    };
    let readiness = DestinationReadiness {
        ready: ready.status,
        reason: ready.reason.clone(),
        message: ready.message.clone(),
        from_writer: config.ready && !ready.status,
    };
    out.set.insert(0, ready);
    (out, readiness)
}

/// The conditions of one WatchRule or ClusterWatchRule.
///
/// `destination` is the readiness of the destination the rule references (when it exists).
pub fn rule_conditions(
    config: &ReadyCondition,
    destination_key: &str,
    destination: Option<&DestinationReadiness>,
    secrets_skipped: Option<DesiredCondition>,
) -> DesiredConditions {
    let ready = match destination {
        Some(d) if config.ready && d.from_writer => DesiredCondition::new(
            READY,
            false,
            d.reason.clone(),
            format!(
                "GitDestination {destination_key} is not ready: {}",
                d.message
            ),
        ),
        _ => DesiredCondition::ready(config),
    };
    let mut out = DesiredConditions {
        set: vec![ready],
        ..Default::default()
    };
    if let Some(skipped) = secrets_skipped {
        out.set.push(skipped);
    } else {
        out.remove.push(SECRETS_SKIPPED);
    }
    out
}

/// `SecretsSkipped=True`: the rule selects Secrets, which are not mirrored without encryption.
pub fn secrets_skipped() -> DesiredCondition {
    secrets_skipped_because(
        Reason::EncryptionNotConfigured,
        "this rule selects Secrets, but its GitDestination has no spec.encryption: Secrets are not \
         sent and no plaintext Secret ever reaches Git",
    )
}

/// `SecretsSkipped=True` with a specific reason (`EncryptionNotConfigured`, `InvalidRecipients`,
/// `RecipientsSecretNotFound`, …) and message.
pub fn secrets_skipped_because(reason: Reason, message: &str) -> DesiredCondition {
    DesiredCondition::new(SECRETS_SKIPPED, true, reason.as_str(), message)
}

/// The status to write so that it holds `desired` for `generation`, or `None` when it already
/// does. Other condition types are kept; `lastTransitionTime` only moves when a status flips.
pub fn next_status(
    current: Option<&ResourceStatus>,
    desired: &DesiredConditions,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<ResourceStatus> {
    let existing: &[Condition] = current.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let find = |t: &str| existing.iter().find(|c| c.type_ == t);
    let last_handled_reconcile_at = desired
        .handled_reconcile
        .clone()
        .or_else(|| current.and_then(|s| s.last_handled_reconcile_at.clone()));
    let mut changed = current.and_then(|s| s.observed_generation) != generation
        || current.and_then(|s| s.last_handled_reconcile_at.as_ref())
            != last_handled_reconcile_at.as_ref()
        || (desired.clear_suspend_preview && current.is_some_and(|s| s.suspend_preview.is_some()));
    let mut written: Vec<Condition> = Vec::with_capacity(desired.set.len());
    for want in &desired.set {
        let status = want.status_text();
        let old = find(&want.type_);
        let same = old.is_some_and(|c| {
            c.status == status
                && c.reason == want.reason
                && c.message == want.message
                && c.observed_generation == generation
        });
        changed |= !same;
        let last_transition_time = match old {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(now),
        };
        written.push(Condition {
            type_: want.type_.clone(),
            status: status.to_owned(),
            reason: want.reason.clone(),
            message: want.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    changed |= desired
        .remove
        .iter()
        .any(|t| existing.iter().any(|c| c.type_ == *t));
    if !changed {
        return None;
    }
    // A merge patch replaces the whole list, so it carries the conditions others wrote too, in
    // their place; new types go after them, except that Ready always comes first.
    let mut conditions: Vec<Condition> = Vec::with_capacity(existing.len() + written.len());
    for c in existing {
        if desired.remove.contains(&c.type_.as_str()) {
            continue;
        }
        match written.iter().position(|w| w.type_ == c.type_) {
            Some(i) => conditions.push(written.remove(i)),
            None => conditions.push(c.clone()),
        }
    }
    conditions.extend(written);
    if let Some(i) = conditions.iter().position(|c| c.type_ == READY) {
        let ready = conditions.remove(i);
        conditions.insert(0, ready);
    }
    Some(ResourceStatus {
        conditions,
        observed_generation: generation,
        last_handled_reconcile_at,
        // A merge patch leaves the preview alone (the controller adds an explicit null to clear it).
        suspend_preview: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{DestinationCondition, Rejection};

    const KEY: &str = "gitops/prod";

    fn status(type_: &str, status: &str, reason: &str) -> Feedback {
        Feedback::Status(DestinationCondition {
            destination: KEY.into(),
            condition_type: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{type_} {reason}"),
        })
    }

    fn resolved() -> ReadyCondition {
        ReadyCondition {
            ready: true,
            reason: Reason::Ready,
            message: "destination resolved".into(),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn find<'a>(set: &'a DesiredConditions, t: &str) -> Option<&'a DesiredCondition> {
        set.set.iter().find(|c| c.type_ == t)
    }

    fn written(
        view: &WriterView,
        persisted: Option<&ResourceStatus>,
    ) -> (DesiredConditions, DestinationReadiness) {
        destination_conditions(&resolved(), true, false, persisted, view, KEY)
    }

    #[test]
    fn a_writer_push_failure_makes_the_destination_not_ready_with_the_writers_reason() {
        let mut view = WriterView::default();
        assert!(view.apply(&status("PushFailing", "True", "RemoteUnreachable")));
        assert!(view.apply(&status("Ready", "False", "RemoteUnreachable")));
        let (set, readiness) = written(&view, None);
        let ready = &set.set[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status, ready.reason.as_str()),
            ("Ready", false, "RemoteUnreachable")
        );
        assert!(readiness.from_writer);
        let failing = find(&set, "PushFailing").expect("PushFailing is written");
        assert!(failing.status);
        assert!(find(&set, "Ready").is_some_and(|c| c.message.contains("Ready RemoteUnreachable")));
    }

    #[test]
    fn a_successful_push_resolves_the_failure_conditions_it_implies() {
        let mut view = WriterView::default();
        view.apply(&status("PushFailing", "True", "RemoteUnreachable"));
        view.apply(&status("Ready", "False", "RemoteUnreachable"));
        view.apply(&status("Ready", "True", "Pushed"));
        let (set, readiness) = written(&view, None);
        assert!(set.set[0].status);
        assert_eq!(set.set[0].reason, "Ready");
        assert!(!readiness.from_writer);
        let failing = find(&set, "PushFailing").unwrap();
        assert!(!failing.status);
        assert_eq!(failing.reason, "Pushed");
        assert!(
            find(&set, "AuthFailed").is_none(),
            "a failure that was never reported is not invented"
        );
    }

    #[test]
    fn a_failure_persisted_by_an_earlier_leader_counts_until_the_writer_says_otherwise() {
        let mut view = WriterView::default();
        view.apply(&status("PushFailing", "True", "AuthenticationFailed"));
        let first = next_status(None, &written(&view, None).0, Some(1), at(1)).unwrap();

        let fresh = WriterView::default();
        let (set, readiness) = written(&fresh, Some(&first));
        assert!(!set.set[0].status, "still failing after a leader change");
        assert_eq!(readiness.reason, "AuthenticationFailed");
        assert_eq!(next_status(Some(&first), &set, Some(1), at(2)), None);

        let mut recovered = WriterView::default();
        recovered.apply(&status("Ready", "True", "Pushed"));
        let (set, _) = written(&recovered, Some(&first));
        assert!(set.set[0].status);
        assert!(!find(&set, "PushFailing").unwrap().status);
    }

    #[test]
    fn configuration_problems_win_over_the_writer() {
        let mut view = WriterView::default();
        view.apply(&status("Ready", "False", "RemoteUnreachable"));
        let config = ReadyCondition {
            ready: false,
            reason: Reason::RepoNotFound,
            message: "GitRepoConfig gitops/repo not found".into(),
        };
        let (set, readiness) = destination_conditions(&config, false, false, None, &view, KEY);
        assert_eq!(set.set[0].reason, "RepoNotFound");
        assert!(!readiness.from_writer);
    }

    #[test]
    fn the_writer_connection_is_a_condition_on_declared_destinations() {
        let mut view = WriterView::default();
        let (set, _) = written(&view, None);
        assert!(find(&set, WRITER_CONNECTED).is_none(), "unknown yet");
        assert!(view.apply(&Feedback::Disconnected {
            error: "connection refused".into()
        }));
        let (set, readiness) = written(&view, None);
        let c = find(&set, WRITER_CONNECTED).unwrap();
        assert!(!c.status && c.reason == "Disconnected" && c.message.contains("refused"));
        assert!(
            readiness.ready,
            "an outage alone does not make it not Ready"
        );
        view.apply(&Feedback::Reconnected);
        assert!(
            find(&written(&view, None).0, WRITER_CONNECTED)
                .unwrap()
                .status
        );
        let (undeclared, _) = destination_conditions(&resolved(), false, false, None, &view, KEY);
        assert!(find(&undeclared, WRITER_CONNECTED).is_none());
    }

    #[test]
    fn rejects_and_ownership_conflicts_become_conditions() {
        let mut view = WriterView::default();
        view.apply(&Feedback::Rejected(Rejection {
            destination: KEY.into(),
            sequence: 7,
            reason: "InvalidPath".into(),
            message: "bad path".into(),
        }));
        view.apply(&status(
            "OwnershipConflict",
            "True",
            "OverlappingBaseFolder",
        ));
        let (set, readiness) = written(&view, None);
        let rejected = find(&set, REJECTED).unwrap();
        assert!(rejected.status && rejected.reason == "InvalidPath");
        assert!(rejected.message.contains("sequence 7"));
        assert_eq!(readiness.reason, "OverlappingBaseFolder");
        view.apply(&status("Accepted", "True", "Declared"));
        let (set, readiness) = written(&view, None);
        assert!(readiness.ready);
        assert!(!find(&set, "OwnershipConflict").unwrap().status);
        assert!(
            find(&set, REJECTED).unwrap().status,
            "a declaration does not resolve a reject"
        );
    }

    #[test]
    fn skipped_objects_are_named_survive_pushes_and_clear_when_they_fit() {
        let mut view = WriterView::default();
        assert!(
            !view.apply(&Feedback::ObjectsSkipped {
                destination: KEY.into(),
                objects: vec![],
                total: 0,
            }),
            "nothing skipped, nothing to say"
        );
        view.apply(&Feedback::ObjectsSkipped {
            destination: KEY.into(),
            objects: vec!["configmaps shop/huge: 200000 bytes".into()],
            total: 3,
        });
        view.apply(&status("Ready", "True", "Pushed"));
        let (set, readiness) = written(&view, None);
        let skipped = find(&set, OBJECTS_SKIPPED).unwrap();
        assert!(skipped.status && skipped.reason == "ObjectTooLarge");
        assert!(skipped.message.contains("shop/huge") && skipped.message.contains("2 more"));
        assert!(readiness.ready, "everything else is mirrored");
        view.apply(&Feedback::ObjectsSkipped {
            destination: KEY.into(),
            objects: vec![],
            total: 0,
        });
        let (set, _) = written(&view, None);
        let cleared = find(&set, OBJECTS_SKIPPED).unwrap();
        assert!(!cleared.status && cleared.reason == "AllObjectsFit");
    }

    #[test]
    fn a_marker_conflict_blocks_only_in_exclusive_mode() {
        let mut view = WriterView::default();
        view.apply(&status("MarkerConflict", "True", "MarkerOwnedByOther"));
        let (_, shared) = destination_conditions(&resolved(), true, false, None, &view, KEY);
        assert!(shared.ready);
        let (_, exclusive) = destination_conditions(&resolved(), true, true, None, &view, KEY);
        assert!(!exclusive.ready);
        assert_eq!(exclusive.reason, "MarkerOwnedByOther");
    }

    #[test]
    fn feedback_that_changes_nothing_is_reported_as_unchanged() {
        let mut view = WriterView::default();
        assert!(view.apply(&status("Ready", "True", "Pushed")));
        assert!(!view.apply(&status("Ready", "True", "Pushed")));
        assert!(!view.apply(&Feedback::SnapshotAbandoned {
            destination: KEY.into(),
            scope: crate::events::ScopeRef {
                group: String::new(),
                version: "v1".into(),
                resource: "configmaps".into(),
                namespace: String::new(),
            },
            epoch: 1,
        }));
    }

    #[test]
    fn rules_follow_a_destination_the_writer_reports_as_failing() {
        let failing = DestinationReadiness {
            ready: false,
            reason: "RemoteUnreachable".into(),
            message: "the writer reports: no such repository".into(),
            from_writer: true,
        };
        let set = rule_conditions(&resolved(), KEY, Some(&failing), None);
        assert!(!set.set[0].status);
        assert_eq!(set.set[0].reason, "RemoteUnreachable");
        assert!(set.set[0].message.contains("GitDestination gitops/prod"));
        assert_eq!(set.remove, vec![SECRETS_SKIPPED]);
        let fine = DestinationReadiness {
            ready: true,
            reason: "Ready".into(),
            message: String::new(),
            from_writer: false,
        };
        let set = rule_conditions(&resolved(), KEY, Some(&fine), Some(secrets_skipped()));
        assert!(set.set[0].status);
        let secrets = find(&set, SECRETS_SKIPPED).unwrap();
        assert!(secrets.status && secrets.reason == ENCRYPTION_NOT_CONFIGURED);
        assert!(
            secrets
                .message
                .contains("no plaintext Secret ever reaches Git")
        );
    }

    #[test]
    fn next_status_writes_only_changes_and_keeps_transition_times() {
        let ready = |ok: bool, reason: &str| DesiredConditions {
            set: vec![DesiredCondition::new(READY, ok, reason, "m")],
            remove: vec![],
            ..Default::default()
        };
        let first = next_status(None, &ready(true, "Ready"), Some(1), at(1)).unwrap();
        assert_eq!(first.conditions[0].last_transition_time, Time(at(1)));
        assert_eq!(
            next_status(Some(&first), &ready(true, "Ready"), Some(1), at(2)),
            None
        );
        let bumped = next_status(Some(&first), &ready(true, "Ready"), Some(2), at(3)).unwrap();
        assert_eq!(bumped.conditions[0].last_transition_time, Time(at(1)));
        let flipped = next_status(Some(&bumped), &ready(false, "X"), Some(2), at(4)).unwrap();
        assert_eq!(flipped.conditions[0].last_transition_time, Time(at(4)));
    }

    #[test]
    fn next_status_keeps_foreign_conditions_removes_retired_ones_and_puts_ready_first() {
        let mut current = next_status(
            None,
            &DesiredConditions {
                set: vec![
                    DesiredCondition::new(READY, true, "Ready", "ok"),
                    secrets_skipped(),
                ],
                remove: vec![],
                ..Default::default()
            },
            Some(1),
            at(1),
        )
        .unwrap();
        current.conditions.insert(
            0,
            Condition {
                type_: "Custom".into(),
                status: "True".into(),
                reason: "Other".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(at(0)),
            },
        );
        let next = next_status(
            Some(&current),
            &DesiredConditions {
                set: vec![DesiredCondition::new(READY, true, "Ready", "ok")],
                remove: vec![SECRETS_SKIPPED],
                ..Default::default()
            },
            Some(1),
            at(5),
        )
        .unwrap();
        let types: Vec<&str> = next.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Custom"]);
        assert_eq!(
            next_status(
                Some(&next),
                &DesiredConditions {
                    set: vec![DesiredCondition::new(READY, true, "Ready", "ok")],
                    remove: vec![SECRETS_SKIPPED],
                    ..Default::default()
                },
                Some(1),
                at(6),
            ),
            None
        );
    }
}
