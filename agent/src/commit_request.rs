//! CommitRequests: "commit what is pending for this GitDestination now, with this message".
//!
//! ```text
//!  CommitRequest created ──watch──▶ first sight: attribution (webhook fact of its CREATE), status Pending
//!        │                          └─ settle (changes made just before reach the stream first)
//!        ▼
//!  checks (pure `check_destination`): GitDestination exists, not suspended, declared to the writer
//!        │ fail: Completed=False + Warning Event
//!        ▼
//!  AgentEvent::Flush on ingestion's channel (sequenced after every change already sent for the destination)
//!        ▼
//!  writer: FlushResult (Completed=True, commitSHA, branch) or Reject (Completed=False, WriterRefused)
//! ```
//!
//! A request is handled once: a `Completed` condition that is `True` or `False` is final, and nothing is sent for
//! it again (a restarted agent skips it). One still `Unknown` (the agent stopped before the writer answered) is
//! sent again by the next leader, without an author (the admission fact lived in the old leader's memory): the
//! writer makes no second commit when its changes are already pushed (`NothingPending`, naming the tip that holds
//! them). A deleted request is dropped before anything is sent.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::attribution::{Attribution, ObjectKey};
use crate::config::Selection;
use crate::crd::{CommitRequest, CommitRequestStatus};
use crate::events::{AgentEvent, FlushAnswer};
use crate::kube_events::{EventSink, PlannedEvent};

/// The condition a CommitRequest's status carries.
pub const COMPLETED: &str = "Completed";
/// How long after first seeing a request the agent sends it: changes made just before it (the usual "edit, then
/// request a commit") come through other watches, and this lets their events reach the stream first.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(2);

/// The writer's answer to a request, from the stream's feedback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Flushed(FlushAnswer),
    Refused {
        request_uid: String,
        reason: String,
        message: String,
    },
}

/// What the handler works with.
pub struct Parts {
    pub client: Client,
    /// Ingestion's channel to the stream: a flush queued here follows every change already queued.
    pub events: mpsc::Sender<AgentEvent>,
    pub answers: mpsc::Receiver<Answer>,
    pub selection: watch::Receiver<Arc<Selection>>,
    /// `true` once the controller published a selection from complete lists.
    pub synced: watch::Receiver<bool>,
    pub attribution: Option<Arc<dyn Attribution>>,
    pub sink: Option<EventSink>,
    pub settle: Duration,
}

/// Where a request's destination stands when it is about to be sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestinationState {
    Missing,
    Suspended,
    /// The GitDestination exists but the agent does not declare it to the writer (no admitted rule writes to it,
    /// or its configuration is not Ready): its `Ready` message, if any.
    NotDeclared(Option<String>),
    Declared,
}

/// The final failure of a request (`Completed=False`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
}

/// Whether a request may be sent for its destination. Pure.
pub fn check_destination(name: &str, state: &DestinationState) -> Result<(), Failure> {
    match state {
        DestinationState::Declared => Ok(()),
        DestinationState::Missing => Err(Failure {
            reason: "DestinationNotFound",
            message: format!("GitDestination {name:?} does not exist in this namespace"),
        }),
        DestinationState::Suspended => Err(Failure {
            reason: "DestinationSuspended",
            message: format!(
                "GitDestination {name:?} is suspended (spec.suspend): nothing is pushed, so nothing was committed"
            ),
        }),
        DestinationState::NotDeclared(ready) => Err(Failure {
            reason: "DestinationNotReady",
            message: match ready {
                Some(why) => format!("GitDestination {name:?} is not Ready: {why}"),
                None => format!(
                    "GitDestination {name:?} is not in use: no admitted WatchRule or ClusterWatchRule writes to it"
                ),
            },
        }),
    }
}

/// Whether a status records a final outcome (then the request is never handled again).
pub fn is_handled(status: Option<&CommitRequestStatus>) -> bool {
    status
        .into_iter()
        .flat_map(|s| &s.conditions)
        .any(|c| c.type_ == COMPLETED && (c.status == "True" || c.status == "False"))
}

/// A request sent (or about to be) and not answered yet.
#[derive(Clone, Debug)]
struct InFlight {
    namespace: String,
    name: String,
    generation: Option<i64>,
    author: Option<String>,
}

/// Runs until the term ends (the task is aborted).
pub async fn run(mut parts: Parts) {
    // A selection from half-listed stores would call a declared destination undeclared.
    while !*parts.synced.borrow_and_update() {
        if parts.synced.changed().await.is_err() {
            return;
        }
    }
    let api: Api<CommitRequest> = Api::all(parts.client.clone());
    let mut requests = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    let (done_tx, mut done_rx) = mpsc::channel::<(String, Sent)>(64);
    let mut in_flight: HashMap<String, InFlight> = HashMap::new();
    // Handled by this term (a watch re-list shows them again until their status is written).
    let mut finished: HashSet<String> = HashSet::new();
    let handler = Arc::new(Handler {
        client: parts.client.clone(),
        sink: parts.sink.clone(),
    });
    loop {
        tokio::select! {
            request = requests.try_next() => match request {
                Ok(Some(request)) => {
                    let Some(uid) = request.uid() else { continue };
                    if is_handled(request.status.as_ref()) {
                        // Its final status is visible now: no older event of it can come any more.
                        finished.remove(&uid);
                        continue;
                    }
                    if in_flight.contains_key(&uid) || finished.contains(&uid) {
                        continue;
                    }
                    let flight = handler.first_sight(&request, parts.attribution.as_deref()).await;
                    in_flight.insert(uid.clone(), flight.clone());
                    let (events, selection, done) = (parts.events.clone(), parts.selection.clone(), done_tx.clone());
                    let (handler, settle) = (Arc::clone(&handler), parts.settle);
                    tokio::spawn(async move {
                        tokio::time::sleep(settle).await;
                        let outcome = handler.send(&request, &flight, &uid, &selection, &events).await;
                        let _ = done.send((uid, outcome)).await;
                    });
                }
                Ok(None) => return,
                Err(error) => warn!(%error, "watching CommitRequests failed; retrying"),
            },
            Some((uid, sent)) = done_rx.recv() => match sent {
                // The writer's answer completes it.
                Sent::Queued => {}
                Sent::Deleted => {
                    in_flight.remove(&uid);
                    finished.insert(uid);
                }
                Sent::Failed(failure) => {
                    if let Some(flight) = in_flight.remove(&uid) {
                        handler.fail(&flight, &uid, &failure).await;
                    }
                    finished.insert(uid);
                }
            },
            Some(answer) = parts.answers.recv() => {
                let uid = match &answer {
                    Answer::Flushed(a) => a.request_uid.clone(),
                    Answer::Refused { request_uid, .. } => request_uid.clone(),
                };
                // An answer for a request this term did not send (a re-send of an older term's): ignored.
                let Some(flight) = in_flight.remove(&uid) else { continue };
                finished.insert(uid.clone());
                match answer {
                    Answer::Flushed(answer) => handler.complete(&flight, &uid, &answer).await,
                    Answer::Refused { reason, message, .. } => {
                        let failure = Failure { reason: "WriterRefused", message: format!("the writer refused the request ({reason}): {message}") };
                        handler.fail(&flight, &uid, &failure).await;
                    }
                }
            },
        }
    }
}

/// What became of a request after its settle time.
enum Sent {
    /// The flush is on its way to the writer.
    Queued,
    /// The request was deleted meanwhile: nothing was sent.
    Deleted,
    Failed(Failure),
}

struct Handler {
    client: Client,
    sink: Option<EventSink>,
}

impl Handler {
    /// Attribution (now, while the webhook's fact is fresh) and the `Pending` status.
    async fn first_sight(
        &self,
        request: &CommitRequest,
        attribution: Option<&dyn Attribution>,
    ) -> InFlight {
        let namespace = request.namespace().unwrap_or_default();
        let name = request.name_any();
        let author = attribution.and_then(|store| attributed_author(store, request));
        let flight = InFlight {
            namespace,
            name,
            generation: request.metadata.generation,
            author,
        };
        let message = match &flight.author {
            Some(user) => format!("waiting for the writer; the commit will be authored by {user}"),
            None => "waiting for the writer; no admission attribution for this request, so the writer's bot identity authors the commit".to_owned(),
        };
        self.patch(
            &flight,
            serde_json::json!({
                "conditions": [condition(&flight, "Unknown", "Pending", &message)],
                "author": flight.author,
                "observedGeneration": flight.generation,
            }),
        )
        .await;
        flight
    }

    /// After the settle time: checks the request and its destination, then queues the flush.
    async fn send(
        &self,
        request: &CommitRequest,
        flight: &InFlight,
        uid: &str,
        selection: &watch::Receiver<Arc<Selection>>,
        events: &mpsc::Sender<AgentEvent>,
    ) -> Sent {
        let api: Api<CommitRequest> = Api::namespaced(self.client.clone(), &flight.namespace);
        match api.get_opt(&flight.name).await {
            Ok(Some(current)) if current.uid().as_deref() == Some(uid) => {}
            Ok(_) => {
                info!(namespace = %flight.namespace, name = %flight.name, "CommitRequest deleted before it was sent; nothing to do");
                return Sent::Deleted;
            }
            Err(error) => {
                return Sent::Failed(Failure {
                    reason: "InternalError",
                    message: format!("reading the CommitRequest failed: {error}"),
                });
            }
        }
        let message = match reverser_common::commit_message::validate(
            request.spec.message.as_deref().unwrap_or(""),
        ) {
            Ok(message) => message,
            Err(error) => {
                return Sent::Failed(Failure {
                    reason: "InvalidMessage",
                    message: error.to_string(),
                });
            }
        };
        let destination_name = &request.spec.destination_ref.name;
        let key = format!("{}/{destination_name}", flight.namespace);
        let state = match self
            .destination_state(&flight.namespace, destination_name)
            .await
        {
            Ok(DestinationState::Declared) | Ok(DestinationState::NotDeclared(_))
                if selection.borrow().destination(&key).is_some() =>
            {
                DestinationState::Declared
            }
            Ok(DestinationState::Declared) => DestinationState::NotDeclared(None),
            Ok(state) => state,
            Err(error) => {
                return Sent::Failed(Failure {
                    reason: "InternalError",
                    message: format!("reading GitDestination {destination_name:?} failed: {error}"),
                });
            }
        };
        if let Err(failure) = check_destination(destination_name, &state) {
            return Sent::Failed(failure);
        }
        let event = AgentEvent::Flush {
            destination: key.clone(),
            message,
            author: flight.author.clone(),
            request_name: format!("{}/{}", flight.namespace, flight.name),
            request_uid: uid.to_owned(),
        };
        if events.send(event).await.is_err() {
            return Sent::Failed(Failure {
                reason: "InternalError",
                message: "the agent is stopping; create the CommitRequest again".into(),
            });
        }
        info!(namespace = %flight.namespace, name = %flight.name, destination = %key, author = flight.author.as_deref().unwrap_or("-"), "CommitRequest sent to the writer");
        Sent::Queued
    }

    /// The GitDestination as the API server has it now (suspend is read from the raw object).
    async fn destination_state(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<DestinationState, kube::Error> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            crate::crd::GROUP,
            crate::crd::VERSION,
            "GitDestination",
        ));
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource);
        let Some(destination) = api.get_opt(name).await? else {
            return Ok(DestinationState::Missing);
        };
        if destination.data["spec"]["suspend"].as_bool() == Some(true) {
            return Ok(DestinationState::Suspended);
        }
        let ready = destination.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready" && c["status"] == "False")
            .and_then(|c| c["message"].as_str().map(str::to_owned));
        Ok(match ready {
            Some(why) => DestinationState::NotDeclared(Some(why)),
            None => DestinationState::Declared,
        })
    }

    async fn complete(&self, flight: &InFlight, uid: &str, answer: &FlushAnswer) {
        let short = answer.commit.get(..12).unwrap_or(&answer.commit);
        let (reason, message) = if answer.committed {
            (
                "Committed",
                format!(
                    "commit {} on branch {} holds the destination's changes; authored by {}",
                    answer.commit,
                    answer.branch,
                    flight
                        .author
                        .as_deref()
                        .unwrap_or("the writer's bot identity (no admission attribution)")
                ),
            )
        } else {
            (
                "NothingPending",
                if answer.commit.is_empty() {
                    "nothing was pending and the branch has no commit yet; no commit was made"
                        .to_owned()
                } else {
                    format!(
                        "nothing was pending, so no commit was made: commit {} on branch {} already holds every earlier change",
                        answer.commit, answer.branch
                    )
                },
            )
        };
        info!(namespace = %flight.namespace, name = %flight.name, commit = %answer.commit, reason, "CommitRequest completed");
        self.patch(
            flight,
            serde_json::json!({
                "conditions": [condition(flight, "True", reason, &message)],
                "commitSHA": (!answer.commit.is_empty()).then_some(&answer.commit),
                "branch": answer.branch,
                "author": flight.author,
                "observedGeneration": flight.generation,
            }),
        )
        .await;
        self.event(
            flight,
            uid,
            PlannedEvent {
                warning: false,
                reason: reason.into(),
                action: "Commit".into(),
                note: if answer.committed {
                    format!("committed {short} on {}", answer.branch)
                } else {
                    "nothing was pending; no commit made".into()
                },
            },
        );
    }

    async fn fail(&self, flight: &InFlight, uid: &str, failure: &Failure) {
        warn!(namespace = %flight.namespace, name = %flight.name, reason = failure.reason, message = %failure.message, "CommitRequest failed");
        self.patch(
            flight,
            serde_json::json!({
                "conditions": [condition(flight, "False", failure.reason, &failure.message)],
                "author": flight.author,
                "observedGeneration": flight.generation,
            }),
        )
        .await;
        let mut note = failure.message.clone();
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        self.event(
            flight,
            uid,
            PlannedEvent {
                warning: true,
                reason: failure.reason.into(),
                action: "Commit".into(),
                note,
            },
        );
    }

    async fn patch(&self, flight: &InFlight, status: serde_json::Value) {
        let api: Api<CommitRequest> = Api::namespaced(self.client.clone(), &flight.namespace);
        let patch = serde_json::json!({ "status": status });
        if let Err(error) = api
            .patch_status(&flight.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(namespace = %flight.namespace, name = %flight.name, %error, "CommitRequest status update failed");
        }
    }

    fn event(&self, flight: &InFlight, uid: &str, event: PlannedEvent) {
        if let Some(sink) = &self.sink {
            let reference = ObjectReference {
                api_version: Some(format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION)),
                kind: Some("CommitRequest".into()),
                namespace: Some(flight.namespace.clone()),
                name: Some(flight.name.clone()),
                uid: Some(uid.to_owned()),
                ..Default::default()
            };
            sink.emit(&reference, vec![event]);
        }
    }
}

fn condition(flight: &InFlight, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: COMPLETED.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: flight.generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// The user the webhook saw create `request`: its CREATE fact with the same content (never a name from the spec).
fn attributed_author(attribution: &dyn Attribution, request: &CommitRequest) -> Option<String> {
    let value = serde_json::to_value(request).ok()?;
    let hash = crate::webhook::handler::admitted_hash(value.clone())?;
    let key = ObjectKey::new(
        crate::crd::GROUP,
        "commitrequests",
        &request.namespace().unwrap_or_default(),
        &request.name_any(),
    );
    attribution
        .author_of_upsert(&key, &value, &hash)
        .map(|user| user.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed(status: &str) -> CommitRequestStatus {
        CommitRequestStatus {
            conditions: vec![Condition {
                type_: COMPLETED.into(),
                status: status.into(),
                reason: "x".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(Timestamp::now()),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn only_a_final_outcome_marks_a_request_handled() {
        assert!(!is_handled(None));
        assert!(!is_handled(Some(&CommitRequestStatus::default())));
        assert!(
            !is_handled(Some(&completed("Unknown"))),
            "pending: sent again by a new leader"
        );
        assert!(is_handled(Some(&completed("True"))));
        assert!(is_handled(Some(&completed("False"))));
    }

    #[test]
    fn only_a_declared_destination_is_flushed_and_each_refusal_says_why() {
        assert_eq!(
            check_destination("prod", &DestinationState::Declared),
            Ok(())
        );
        let reason = |state| check_destination("prod", &state).unwrap_err().reason;
        assert_eq!(reason(DestinationState::Missing), "DestinationNotFound");
        assert_eq!(reason(DestinationState::Suspended), "DestinationSuspended");
        assert_eq!(
            reason(DestinationState::NotDeclared(None)),
            "DestinationNotReady"
        );
        let message = check_destination(
            "prod",
            &DestinationState::NotDeclared(Some("repository not found".into())),
        )
        .unwrap_err()
        .message;
        assert!(message.contains("repository not found"), "{message}");
    }
}
