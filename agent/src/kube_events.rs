//! Kubernetes Events on the custom resources, for `kubectl describe`: every meaningful change of a condition the
//! controller writes (a push failing and recovering, authentication, lease, marker and ownership conflicts,
//! objects refused or skipped, sweeps held back by the delete cap, the first successful push) becomes one Event on
//! the GitDestination, WatchRule or ClusterWatchRule.
//!
//! ```text
//! controller: status patch written ──condition_events() (pure)──▶ EventSink (bounded, never blocks)
//!   ──▶ publisher task: per-object token bucket ──▶ kube Recorder (repeats become one Event's series) ──▶ API server
//! ```
//!
//! Aggregation and spam protection follow client-go's event recorder: an Event that repeats (same object, type,
//! action and reason) within minutes updates one Event's series instead of creating another, and each object may
//! emit a burst of [`BURST`] Events, then one per [`REFILL`]. Whatever is dropped (queue full, over the budget,
//! refused by the API server) is counted, never retried: Events are a courtesy, the conditions are the truth.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use prometheus::{IntCounterVec, Opts, Registry};
use reverser_common::rate::TokenBucket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use crate::conditions::{ACCEPTED, READY, SUSPENDED, WRITER_CONNECTED};

/// Events an object may emit at once.
pub const BURST: f64 = 25.0;
/// One more Event per object after this long (client-go's spam filter: 25, then one per 5 minutes).
pub const REFILL: Duration = Duration::from_secs(300);
/// Longest note the Events API accepts.
const MAX_NOTE_BYTES: usize = 1024;
/// Longest wait for the API server to take one Event.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Events waiting for the publisher; beyond this they are dropped (the controller never waits for Events).
const QUEUE: usize = 256;

/// One Event to publish about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    /// The condition's reason (`PushFailing`'s `RemoteUnreachable`, `Ready`'s `Pushed`).
    pub reason: String,
    /// The condition type the Event is about.
    pub action: String,
    /// `Type=Status: message`, at most 1 KiB.
    pub note: String,
}

/// Condition types whose `True` is the healthy state; for every other type `True` reports a problem.
fn healthy_when_true(type_: &str) -> bool {
    matches!(type_, READY | ACCEPTED | WRITER_CONNECTED)
}

/// The Events for a status change from `previous` to `next` conditions. Pure.
///
/// - A condition that changes status or reason gives one Event: Warning when it now reports a problem, Normal when
///   it reports health again.
/// - A condition seen for the first time gives an Event only when it reports a problem, or when it is `Ready=True`
///   (the first successful push); healthy defaults stay quiet.
/// - `Unknown` gives none (the agent does not know yet, e.g. while the writer is unreachable, which
///   `WriterConnected` reports itself).
pub fn condition_events(previous: &[Condition], next: &[Condition]) -> Vec<PlannedEvent> {
    let mut out = Vec::new();
    for condition in next {
        let healthy = match (
            condition.status.as_str(),
            healthy_when_true(&condition.type_),
        ) {
            ("True", good_when_true) => good_when_true,
            ("False", good_when_true) => !good_when_true,
            _ => continue,
        };
        let before = previous.iter().find(|c| c.type_ == condition.type_);
        let changed = match before {
            Some(old) => old.status != condition.status || old.reason != condition.reason,
            None => !healthy || condition.type_ == READY,
        };
        if !changed {
            continue;
        }
        let mut note = format!(
            "{}={}: {}",
            condition.type_, condition.status, condition.message
        );
        truncate_at_char_boundary(&mut note, MAX_NOTE_BYTES);
        out.push(PlannedEvent {
            // A suspension is what someone asked for: Normal `Suspended` and `Resumed` Events.
            warning: !healthy && condition.type_ != SUSPENDED,
            reason: condition.reason.clone(),
            action: condition.type_.clone(),
            note,
        });
    }
    out
}

/// The Event for snapshot sweeps that deleted orphan files in one push. Pure.
pub fn sweep_event(deleted: u64, left: u64, commit: &str) -> PlannedEvent {
    let short = commit.get(..12).unwrap_or(commit);
    let mut note = format!(
        "deleted {deleted} orphan file{} (objects no longer in the cluster) in commit {short}",
        if deleted == 1 { "" } else { "s" }
    );
    if left > 0 {
        note.push_str(&format!(
            "; {left} more wait for the next snapshot (--deletes-cap-per-cycle)"
        ));
    }
    truncate_at_char_boundary(&mut note, MAX_NOTE_BYTES);
    PlannedEvent {
        warning: false,
        reason: "OrphansDeleted".into(),
        action: "Sweep".into(),
        note,
    }
}

/// A reference to the GitDestination `namespace/name` (the writer's destination key), for Events about it.
pub fn git_destination_reference(key: &str) -> Option<ObjectReference> {
    let (namespace, name) = key.split_once('/')?;
    if namespace.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some(ObjectReference {
        api_version: Some(format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION)),
        kind: Some("GitDestination".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    })
}

fn truncate_at_char_boundary(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// Counters of the Events the agent emitted and dropped.
#[derive(Clone)]
pub struct EventMetrics {
    /// `kube_events_total{type}`: Events published (a repeat that extends a series counts too).
    published: IntCounterVec,
    /// `kube_events_dropped_total{why}`: `queue_full`, `rate_limited`, `api_error`.
    dropped: IntCounterVec,
}

impl EventMetrics {
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            published: IntCounterVec::new(
                Opts::new(
                    "kube_events_total",
                    "Kubernetes Events published on the custom resources, by type (Normal, Warning)",
                ),
                &["type"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "kube_events_dropped_total",
                    "Kubernetes Events not published, by why (queue_full, rate_limited, api_error)",
                ),
                &["why"],
            )?,
        })
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.published.clone()))?;
        registry.register(Box::new(self.dropped.clone()))
    }
}

/// Where the controller hands its Events; cheap to clone, never blocks.
#[derive(Clone)]
pub struct EventSink {
    queue: mpsc::Sender<(ObjectReference, PlannedEvent)>,
    metrics: EventMetrics,
}

impl EventSink {
    /// Starts the publisher. `instance` tells replicas apart (`reportingInstance`).
    pub fn spawn(client: Client, instance: String, metrics: EventMetrics) -> Self {
        let (queue, mut planned) = mpsc::channel::<(ObjectReference, PlannedEvent)>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "gitops-reverser-agent".into(),
                instance: Some(instance),
            },
        );
        let publisher_metrics = metrics.clone();
        tokio::spawn(async move {
            let mut budgets: HashMap<String, TokenBucket> = HashMap::new();
            while let Some((reference, event)) = planned.recv().await {
                let key = format!(
                    "{}/{}/{}/{}",
                    reference.kind.as_deref().unwrap_or_default(),
                    reference.namespace.as_deref().unwrap_or_default(),
                    reference.name.as_deref().unwrap_or_default(),
                    reference.uid.as_deref().unwrap_or_default()
                );
                let budget = budgets.entry(key).or_default();
                if !budget
                    .take_at(1.0 / REFILL.as_secs_f64(), BURST, Instant::now())
                    .is_zero()
                {
                    publisher_metrics
                        .dropped
                        .with_label_values(&["rate_limited"])
                        .inc();
                    debug!(object = ?reference.name, reason = %event.reason, "event over the object's budget; dropped");
                    continue;
                }
                let kind = if event.warning { "Warning" } else { "Normal" };
                // Bounded: a hanging API server fills the queue (counted) instead of holding Events forever.
                let published = tokio::time::timeout(
                    PUBLISH_TIMEOUT,
                    recorder.publish(
                        &Event {
                            type_: if event.warning {
                                EventType::Warning
                            } else {
                                EventType::Normal
                            },
                            reason: event.reason.clone(),
                            note: Some(event.note.clone()),
                            action: event.action.clone(),
                            secondary: None,
                        },
                        &reference,
                    ),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(kube::Error::Service(
                        "publishing the event timed out".into(),
                    ))
                });
                match published {
                    Ok(()) => publisher_metrics.published.with_label_values(&[kind]).inc(),
                    Err(error) => {
                        publisher_metrics
                            .dropped
                            .with_label_values(&["api_error"])
                            .inc();
                        debug!(object = ?reference.name, reason = %event.reason, %error, "event not published");
                    }
                }
            }
        });
        Self { queue, metrics }
    }

    /// Queues `events` about `reference`; drops (and counts) what does not fit.
    pub fn emit(&self, reference: &ObjectReference, events: Vec<PlannedEvent>) {
        for event in events {
            if self.queue.try_send((reference.clone(), event)).is_err() {
                self.metrics
                    .dropped
                    .with_label_values(&["queue_full"])
                    .inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn c(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn a_failing_push_is_a_warning_and_its_recovery_a_normal_event() {
        let healthy = [c("PushFailing", "False", "Pushed", "")];
        let failing = [c("PushFailing", "True", "RemoteUnreachable", "timed out")];
        assert_eq!(
            condition_events(&healthy, &failing),
            vec![PlannedEvent {
                warning: true,
                reason: "RemoteUnreachable".into(),
                action: "PushFailing".into(),
                note: "PushFailing=True: timed out".into(),
            }]
        );
        let recovered = condition_events(&failing, &healthy);
        assert_eq!(recovered.len(), 1);
        assert!(!recovered[0].warning);
        assert_eq!(recovered[0].reason, "Pushed");
    }

    #[test]
    fn the_first_ready_and_first_problems_are_events_but_healthy_defaults_are_not() {
        let first = [
            c("Ready", "True", "Pushed", "pushed abc"),
            c("PushFailing", "False", "Pushed", ""),
            c("WriterConnected", "True", "Connected", ""),
            c("ObjectsSkipped", "True", "ObjectTooLarge", "shop/huge"),
        ];
        let events = condition_events(&[], &first);
        let summary: Vec<(&str, bool)> = events
            .iter()
            .map(|e| (e.action.as_str(), e.warning))
            .collect();
        assert_eq!(summary, vec![("Ready", false), ("ObjectsSkipped", true)]);
    }

    #[test]
    fn an_unchanged_condition_or_a_new_message_alone_gives_nothing() {
        let before = [c("PushFailing", "True", "RemoteUnreachable", "attempt 1")];
        let after = [c("PushFailing", "True", "RemoteUnreachable", "attempt 2")];
        assert!(condition_events(&before, &after).is_empty());
        assert!(condition_events(&before, &before).is_empty());
    }

    #[test]
    fn a_changed_reason_is_an_event_and_unknown_is_never_one() {
        let before = [c("Ready", "False", "RemoteUnreachable", "")];
        let after = [c("Ready", "False", "AuthenticationFailed", "")];
        let events = condition_events(&before, &after);
        assert_eq!(events.len(), 1);
        assert!(events[0].warning);
        assert!(
            condition_events(&before, &[c("Ready", "Unknown", "WriterUnreachable", "")]).is_empty()
        );
    }

    #[test]
    fn a_sweep_is_a_normal_event_with_its_counts_and_commit() {
        let event = sweep_event(3, 0, "0123456789abcdef0123456789abcdef01234567");
        assert!(!event.warning);
        assert_eq!(
            (event.reason.as_str(), event.action.as_str()),
            ("OrphansDeleted", "Sweep")
        );
        assert_eq!(
            event.note,
            "deleted 3 orphan files (objects no longer in the cluster) in commit 0123456789ab"
        );
        let capped = sweep_event(1, 7, "abc");
        assert!(
            capped.note.starts_with("deleted 1 orphan file (objects"),
            "{}",
            capped.note
        );
        assert!(capped.note.ends_with(
            "in commit abc; 7 more wait for the next snapshot (--deletes-cap-per-cycle)"
        ));
    }

    #[test]
    fn suspending_and_resuming_are_normal_events() {
        let suspended = [c("Suspended", "True", "Suspended", "")];
        let events = condition_events(&[], &suspended);
        assert_eq!(events.len(), 1);
        assert!(!events[0].warning);
        assert_eq!(events[0].reason, "Suspended");
        let resumed = [c("Suspended", "False", "Resumed", "")];
        let events = condition_events(&suspended, &resumed);
        assert_eq!(events.len(), 1);
        assert!(!events[0].warning);
        assert_eq!(events[0].reason, "Resumed");
    }

    #[test]
    fn only_a_namespaced_destination_key_names_a_git_destination() {
        let reference = git_destination_reference("gitops/prod").unwrap();
        assert_eq!(
            reference.api_version.as_deref(),
            Some("configbutler.ai/v1alpha1")
        );
        assert_eq!(reference.kind.as_deref(), Some("GitDestination"));
        assert_eq!(
            (reference.namespace.as_deref(), reference.name.as_deref()),
            (Some("gitops"), Some("prod"))
        );
        for bad in ["", "prod", "/prod", "gitops/", "a/b/c"] {
            assert!(git_destination_reference(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn notes_are_cut_at_one_kibibyte_on_a_character_boundary() {
        let long = "é".repeat(1000);
        let events = condition_events(&[], &[c("Rejected", "True", "InvalidYaml", &long)]);
        assert!(events[0].note.len() <= 1024);
        assert!(events[0].note.starts_with("Rejected=True: é"));
    }
}
