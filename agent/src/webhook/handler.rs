//! `admission.k8s.io/v1` AdmissionReview in, a [`Fact`] and an always-allowing response out.
//!
//! ```text
//! body bytes ──parse──▶ AdmissionReview{request} ──▶ Reviewed{response: allowed, fact?, outcome}
//!     │ not JSON / wrong apiVersion or kind / no request / no uid
//!     ▼
//! ReviewError (the server answers 400; nothing is stored)
//! ```
//!
//! A well-formed review is always allowed: the webhook only observes, so it must never block
//! or change a request, even one it cannot make sense of (those produce no fact, outcome
//! `ignored`). Dry runs are allowed and leave no fact, because they never persist.
//!
//! The content hash is computed exactly as ingestion computes it for watch events: the
//! object goes through kube's `DynamicObject` (as the watcher decodes it), then
//! [`canonical::to_canonical_yaml`] and [`canonical::content_hash`]. The same bytes on both
//! sides are what makes the join exact.

use kube::api::DynamicObject;
use serde::Deserialize;
use serde_json::{Value, json};

use super::facts::{Fact, Operation};
use crate::attribution::{ContentHash, ObjectKey};
use crate::canonical;
use crate::rules::is_sensitive_resource;

/// The one path the webhook serves.
pub const PATH: &str = "/process-validating-webhook";

/// The AdmissionReview version spoken (and the only one accepted).
pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// Why a request body is not an AdmissionReview we can answer. Each maps to a 400.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("request body is not a JSON AdmissionReview: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "expected apiVersion {API_VERSION} kind {KIND}, got apiVersion {api_version:?} kind {kind:?}"
    )]
    WrongType { api_version: String, kind: String },
    #[error("AdmissionReview has no request")]
    MissingRequest,
    #[error("AdmissionReview request has no uid")]
    MissingUid,
}

/// What became of a well-formed review.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A fact was produced.
    Recorded,
    /// A dry run: never persisted, so no fact.
    DryRun,
    /// Nothing to attribute; the reason is for debug logs.
    Ignored(&'static str),
}

impl Outcome {
    /// The `outcome` label of `webhook_requests_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Recorded => "recorded",
            Outcome::DryRun => "dry_run",
            Outcome::Ignored(_) => "ignored",
        }
    }
}

/// The answer to one review.
#[derive(Debug)]
pub struct Reviewed {
    /// The AdmissionReview response body (always `allowed: true`).
    pub response: Vec<u8>,
    pub fact: Option<Fact>,
    pub outcome: Outcome,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    request: Option<Request>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    resource: Gvr,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    user_info: UserInfo,
    #[serde(default)]
    object: Option<Value>,
    /// Only the identity is read: a DELETE needs nothing else, and skipping the rest halves
    /// the parsing (and memory) of an UPDATE.
    #[serde(default)]
    old_object: Option<Identity>,
    #[serde(default)]
    dry_run: Option<bool>,
}

#[derive(Default, Deserialize)]
struct Gvr {
    #[serde(default)]
    group: String,
    #[serde(default)]
    resource: String,
}

#[derive(Default, Deserialize)]
struct Identity {
    #[serde(default)]
    metadata: IdentityMeta,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdentityMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
}

impl IdentityMeta {
    fn of(object: &Value) -> Self {
        let text = |field: &str| {
            object
                .pointer(&format!("/metadata/{field}"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Self {
            name: text("name"),
            namespace: text("namespace"),
            uid: text("uid"),
            resource_version: text("resourceVersion"),
        }
    }
}

#[derive(Default, Deserialize)]
struct UserInfo {
    #[serde(default)]
    username: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// Parses one AdmissionReview body and answers it. Reviews of sensitive types (core `secrets` and the
/// `--sensitive-resources` entries in `sensitive`, matched as ingestion matches them) are allowed and leave no
/// fact: nothing of their content is hashed.
pub fn review(body: &[u8], sensitive: &[String]) -> Result<Reviewed, ReviewError> {
    let review: Review = serde_json::from_slice(body)?;
    if review.api_version != API_VERSION || review.kind != KIND {
        return Err(ReviewError::WrongType {
            api_version: review.api_version,
            kind: review.kind,
        });
    }
    let request = review.request.ok_or(ReviewError::MissingRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::MissingUid);
    }
    let response = allowed(&request.uid);
    let (fact, outcome) = match fact_of(request, sensitive) {
        Ok(fact) => (Some(fact), Outcome::Recorded),
        Err(outcome) => (None, outcome),
    };
    Ok(Reviewed {
        response,
        fact,
        outcome,
    })
}

/// `{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {"uid": …, "allowed": true}}`
pub fn allowed(uid: &str) -> Vec<u8> {
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "response": {"uid": uid, "allowed": true},
    })
    .to_string()
    .into_bytes()
}

fn fact_of(request: Request, sensitive: &[String]) -> Result<Fact, Outcome> {
    if request.dry_run == Some(true) {
        return Err(Outcome::DryRun);
    }
    // Sensitive types are mirrored only encrypted and never attributed: their content is not hashed here at
    // all (an unkeyed hash of plaintext would let anyone holding the fact store test guesses), whatever the
    // operation or subresource.
    if is_sensitive_resource(
        sensitive,
        &request.resource.group,
        &request.resource.resource,
    ) {
        return Err(Outcome::Ignored("sensitive"));
    }
    let operation = match request.operation.as_str() {
        "CREATE" => Operation::Create,
        "UPDATE" => Operation::Update,
        "DELETE" => Operation::Delete,
        _ => return Err(Outcome::Ignored("operation")),
    };
    // `/status` writes change nothing the mirror keeps; `/scale` carries a Scale, not the
    // object: it becomes a fact about the parent's replicas (see `scale_fact`).
    match request.sub_resource.as_deref() {
        None | Some("") => {}
        Some("scale") if operation == Operation::Update => return scale_fact(request),
        Some(_) => return Err(Outcome::Ignored("subresource")),
    }
    if request.user_info.username.is_empty() {
        return Err(Outcome::Ignored("no username"));
    }
    // DELETE carries only oldObject; CREATE/UPDATE the object as it will be stored.
    let base_version = request
        .old_object
        .as_ref()
        .and_then(|old| old.metadata.resource_version.as_deref())
        .and_then(|v| v.parse().ok());
    let (object, identity) = match operation {
        Operation::Delete => {
            let old = request.old_object.ok_or(Outcome::Ignored("no object"))?;
            (None, old.metadata)
        }
        _ => {
            let object = request
                .object
                .filter(Value::is_object)
                .ok_or(Outcome::Ignored("no object"))?;
            let identity = IdentityMeta::of(&object);
            (Some(object), identity)
        }
    };
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    // A deletecollection's per-object DELETE reviews have no request.name.
    let name = non_empty(request.name)
        .or_else(|| non_empty(identity.name))
        .ok_or(Outcome::Ignored("no name"))?;
    let namespace = non_empty(request.namespace)
        .or_else(|| non_empty(identity.namespace))
        .unwrap_or_default();
    let uid = non_empty(identity.uid);
    if operation == Operation::Delete && uid.is_none() {
        return Err(Outcome::Ignored("delete without uid"));
    }
    let content_hash = match object {
        None => None,
        Some(object) => Some(admitted_hash(object).ok_or(Outcome::Ignored("not renderable"))?),
    };
    Ok(Fact {
        key: ObjectKey {
            group: request.resource.group,
            resource: request.resource.resource,
            namespace,
            name,
        },
        operation,
        username: request.user_info.username,
        groups: request.user_info.groups,
        uid,
        content_hash,
        base_version,
        scale_replicas: None,
    })
}

/// Workloads whose `/scale` maps to their own `spec.replicas` (custom resources declare their
/// own replicas path, which the watch cannot know; their scales stay the bot's).
const SCALED_BY_SPEC_REPLICAS: [(&str, &str); 4] = [
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("apps", "replicasets"),
    ("", "replicationcontrollers"),
];

/// Whether a `/scale` of this resource is attributed (and so registered).
pub fn is_scaled_by_spec_replicas(group: &str, resource: &str) -> bool {
    SCALED_BY_SPEC_REPLICAS.contains(&(group, resource))
}

/// An UPDATE of `/scale` (`kubectl scale`, an HPA): the `autoscaling/v1` Scale names the
/// parent (name, namespace, uid, resourceVersion) and the replicas asked for. The fact is keyed
/// on the parent and joins its next version by `spec.replicas` (lineage required: without the
/// old resourceVersion and the uid there is no fact).
fn scale_fact(request: Request) -> Result<Fact, Outcome> {
    let group = request.resource.group.as_str();
    let resource = request.resource.resource.as_str();
    if !is_scaled_by_spec_replicas(group, resource) {
        return Err(Outcome::Ignored("subresource"));
    }
    if request.user_info.username.is_empty() {
        return Err(Outcome::Ignored("no username"));
    }
    let object = request
        .object
        .filter(Value::is_object)
        .ok_or(Outcome::Ignored("no object"))?;
    let replicas = object
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or(Outcome::Ignored("scale without replicas"))?;
    let identity = IdentityMeta::of(&object);
    let old = request.old_object.map(|o| o.metadata).unwrap_or_default();
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let name = non_empty(request.name)
        .or_else(|| non_empty(identity.name))
        .ok_or(Outcome::Ignored("no name"))?;
    let namespace = non_empty(request.namespace)
        .or_else(|| non_empty(identity.namespace))
        .unwrap_or_default();
    let uid = non_empty(identity.uid)
        .or_else(|| non_empty(old.uid))
        .ok_or(Outcome::Ignored("scale without lineage"))?;
    let base_version = old
        .resource_version
        .and_then(|v| v.parse().ok())
        .ok_or(Outcome::Ignored("scale without lineage"))?;
    Ok(Fact {
        key: ObjectKey {
            group: request.resource.group,
            resource: request.resource.resource,
            namespace,
            name,
        },
        operation: Operation::Update,
        username: request.user_info.username,
        groups: request.user_info.groups,
        uid: Some(uid),
        content_hash: None,
        base_version: Some(base_version),
        scale_replicas: Some(replicas),
    })
}

/// The content hash ingestion computes for the same object seen in a watch event.
pub fn admitted_hash(object: Value) -> Option<ContentHash> {
    let normalized = serde_json::from_value::<DynamicObject>(object)
        .and_then(serde_json::to_value)
        .ok()?;
    let yaml = canonical::to_canonical_yaml(&normalized).ok()?;
    Some(canonical::content_hash(&yaml))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no `--sensitive-resources` beyond the built-in core Secrets.
    fn review_default(body: &[u8]) -> Result<Reviewed, ReviewError> {
        review(body, &[])
    }

    fn body(request: Value) -> Vec<u8> {
        json!({"apiVersion": API_VERSION, "kind": KIND, "request": request})
            .to_string()
            .into_bytes()
    }

    fn create(extra: Value) -> Value {
        let mut request = json!({
            "uid": "req-1",
            "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
            "resource": {"group": "", "version": "v1", "resource": "configmaps"},
            "name": "a", "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "alice", "groups": ["devs", "system:authenticated"]},
            "object": {"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": "a", "namespace": "shop", "uid": "u1"},
                       "data": {"k": "v"}},
            "oldObject": null, "dryRun": false
        });
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        request
    }

    fn response(reviewed: &Reviewed) -> Value {
        serde_json::from_slice(&reviewed.response).unwrap()
    }

    #[test]
    fn allows_and_records_a_create_with_user_uid_and_content_hash() {
        let reviewed = review_default(&body(create(json!({})))).unwrap();
        assert_eq!(
            response(&reviewed),
            json!({"apiVersion": API_VERSION, "kind": KIND,
                   "response": {"uid": "req-1", "allowed": true}})
        );
        let fact = reviewed.fact.unwrap();
        assert_eq!(fact.key, ObjectKey::new("", "configmaps", "shop", "a"));
        assert_eq!(fact.operation, Operation::Create);
        assert_eq!(fact.username, "alice");
        assert_eq!(fact.groups, ["devs", "system:authenticated"]);
        assert_eq!(fact.uid.as_deref(), Some("u1"));
        let watched = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "a", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                         "managedFields": [{"manager": "kubectl"}]},
            "data": {"k": "v"}});
        let expected = canonical::content_hash(&canonical::to_canonical_yaml(&watched).unwrap());
        assert_eq!(fact.content_hash, Some(expected));
    }

    #[test]
    fn dry_runs_are_allowed_and_leave_no_fact() {
        let reviewed = review_default(&body(create(json!({"dryRun": true})))).unwrap();
        assert_eq!(response(&reviewed)["response"]["allowed"], true);
        assert_eq!(reviewed.outcome, Outcome::DryRun);
        assert!(reviewed.fact.is_none());
    }

    #[test]
    fn deletes_take_name_and_uid_from_the_old_object() {
        let request = create(json!({
            "operation": "DELETE", "name": "",
            "object": null,
            "oldObject": {"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": "b", "namespace": "shop", "uid": "u2"}}
        }));
        let fact = review_default(&body(request)).unwrap().fact.unwrap();
        assert_eq!(fact.operation, Operation::Delete);
        assert_eq!(fact.key.name, "b");
        assert_eq!(fact.uid.as_deref(), Some("u2"));
        assert_eq!(fact.content_hash, None);
    }

    fn scale_request(resource: &str, old_rv: Value) -> Value {
        let scale = |replicas: i64, rv: Value| {
            json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                   "metadata": {"name": "web", "namespace": "shop", "uid": "u7",
                                "resourceVersion": rv},
                   "spec": {"replicas": replicas}, "status": {"replicas": 2, "selector": "app=web"}})
        };
        create(json!({
            "kind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
            "resource": {"group": "apps", "version": "v1", "resource": resource},
            "subResource": "scale", "requestSubResource": "scale",
            "name": "web", "operation": "UPDATE",
            "object": scale(5, json!("41")),
            "oldObject": scale(2, old_rv),
        }))
    }

    #[test]
    fn a_scale_of_a_workload_is_a_fact_about_the_parents_replicas() {
        let reviewed = review_default(&body(scale_request("deployments", json!("41")))).unwrap();
        assert_eq!(response(&reviewed)["response"]["allowed"], true);
        let fact = reviewed.fact.unwrap();
        assert_eq!(
            fact.key,
            ObjectKey::new("apps", "deployments", "shop", "web")
        );
        assert_eq!(fact.operation, Operation::Update);
        assert_eq!(fact.uid.as_deref(), Some("u7"));
        assert_eq!(fact.content_hash, None);
        assert_eq!(fact.scale_replicas, Some(5));
        assert_eq!(fact.base_version, Some(41));
        // Lineage is required; custom resources' replicas paths are unknown.
        for (resource, old_rv) in [("deployments", Value::Null), ("widgets", json!("41"))] {
            let reviewed = review_default(&body(scale_request(resource, old_rv))).unwrap();
            assert!(reviewed.fact.is_none(), "{resource}");
            assert_eq!(response(&reviewed)["response"]["allowed"], true);
        }
    }

    #[test]
    fn an_update_remembers_the_version_it_was_based_on() {
        let request = create(json!({
            "operation": "UPDATE",
            "oldObject": {"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": "a", "namespace": "shop", "uid": "u1",
                                       "resourceVersion": "17"}}
        }));
        let fact = review_default(&body(request)).unwrap().fact.unwrap();
        assert_eq!(fact.base_version, Some(17));
        assert_eq!(fact.scale_replicas, None);
        let fact = review_default(&body(create(json!({}))))
            .unwrap()
            .fact
            .unwrap();
        assert_eq!(fact.base_version, None, "a CREATE has no base");
    }

    #[test]
    fn ignores_what_cannot_be_attributed_but_still_allows_it() {
        for (extra, reason) in [
            (json!({"subResource": "status"}), "subresource"),
            (json!({"operation": "CONNECT"}), "operation"),
            (json!({"userInfo": {}}), "no username"),
            (json!({"object": null}), "no object"),
            (
                json!({"resource": {"group": "", "version": "v1", "resource": "secrets"}}),
                "sensitive",
            ),
            (
                json!({"operation": "DELETE", "object": null,
                        "oldObject": {"metadata": {"name": "a"}}}),
                "delete without uid",
            ),
        ] {
            let reviewed = review_default(&body(create(extra.clone()))).unwrap();
            assert_eq!(reviewed.outcome, Outcome::Ignored(reason), "{extra}");
            assert!(reviewed.fact.is_none());
            assert_eq!(response(&reviewed)["response"]["allowed"], true);
        }
    }

    #[test]
    fn sensitive_types_are_allowed_but_leave_no_fact_and_are_not_hashed() {
        let sealed = |operation: &str| {
            let object = json!({"apiVersion": "bitnami.com/v1alpha1", "kind": "SealedSecret",
                "metadata": {"name": "db", "namespace": "shop", "uid": "u9", "resourceVersion": "3"},
                "spec": {"encryptedData": {"password": "AgBy3i4OJSWK+PiTySYZZA=="}}});
            let (object, old) = match operation {
                "DELETE" => (Value::Null, object),
                "UPDATE" => (object.clone(), object),
                _ => (object, Value::Null),
            };
            body(create(json!({
                "kind": {"group": "bitnami.com", "version": "v1alpha1", "kind": "SealedSecret"},
                "resource": {"group": "bitnami.com", "version": "v1alpha1", "resource": "sealedsecrets"},
                "name": "db", "operation": operation, "object": object, "oldObject": old,
            })))
        };
        let sensitive = ["secrets".to_owned(), "sealedsecrets.bitnami.com".to_owned()];
        for operation in ["CREATE", "UPDATE", "DELETE"] {
            // Not marked sensitive: an ordinary custom resource, attributed.
            let plain = review(&sealed(operation), &["secrets".to_owned()]).unwrap();
            assert_eq!(plain.outcome, Outcome::Recorded, "{operation}");
            // Marked sensitive: allowed as always, no fact, nothing hashed.
            let reviewed = review(&sealed(operation), &sensitive).unwrap();
            assert_eq!(
                reviewed.outcome,
                Outcome::Ignored("sensitive"),
                "{operation}"
            );
            assert!(reviewed.fact.is_none(), "{operation}");
            assert_eq!(response(&reviewed)["response"]["allowed"], true);
        }
        // A bare plural is sensitive in any group, core included (configmaps marked sensitive).
        let reviewed = review(&body(create(json!({}))), &["configmaps".to_owned()]).unwrap();
        assert_eq!(reviewed.outcome, Outcome::Ignored("sensitive"));
        assert!(reviewed.fact.is_none());
        assert_eq!(response(&reviewed)["response"]["allowed"], true);
        // `plural.group` names that group only.
        let other_group = review(&sealed("CREATE"), &["sealedsecrets.other.io".to_owned()]);
        assert_eq!(other_group.unwrap().outcome, Outcome::Recorded);
        // Even a /scale of a sensitive workload type leaves no fact.
        let scale = review(
            &body(scale_request("deployments", json!("41"))),
            &["deployments.apps".to_owned()],
        )
        .unwrap();
        assert_eq!(scale.outcome, Outcome::Ignored("sensitive"));
        assert!(scale.fact.is_none());
    }

    #[test]
    fn rejects_bodies_that_are_not_a_v1_admission_review() {
        assert!(matches!(
            review_default(b"{nope"),
            Err(ReviewError::Malformed(_))
        ));
        assert!(matches!(
            review_default(b"[1, 2]"),
            Err(ReviewError::Malformed(_))
        ));
        let v1beta1 = json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": KIND,
                             "request": create(json!({}))});
        assert!(matches!(
            review_default(v1beta1.to_string().as_bytes()),
            Err(ReviewError::WrongType { .. })
        ));
        let wrong_kind = json!({"apiVersion": API_VERSION, "kind": "ConfigMap"});
        assert!(matches!(
            review_default(wrong_kind.to_string().as_bytes()),
            Err(ReviewError::WrongType { .. })
        ));
        let no_request = json!({"apiVersion": API_VERSION, "kind": KIND});
        assert!(matches!(
            review_default(no_request.to_string().as_bytes()),
            Err(ReviewError::MissingRequest)
        ));
        assert!(matches!(
            review_default(&body(create(json!({"uid": ""})))),
            Err(ReviewError::MissingUid)
        ));
    }
}
