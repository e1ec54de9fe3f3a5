//! The attribution join over real kube-apiserver payloads (`tests/fixtures/apiserver-corpus`,
//! captured from k3s v1.36): AdmissionReview requests go through the webhook's handler into
//! the store, and the watch events of the same scenario are fed to the join exactly as
//! ingestion hashes them. Time is a manual clock; nothing here waits.

mod webhook_support;

use std::time::Duration;

use reverser_agent::attribution::ObjectKey;
use reverser_agent::webhook::handler::{self, Outcome};
use reverser_agent::webhook::{FactStore, FactsConfig};
use serde_json::{Value, json};
use webhook_support::{corpus, feed, manual_store, review_body, review_of, watched};

fn store() -> (FactStore, reverser_agent::webhook::ManualClock) {
    manual_store(FactsConfig::default())
}

/// Runs one corpus admission file through the handler and records its fact.
fn admit(store: &FactStore, rel: &str) -> Outcome {
    admit_body(store, &review_body(rel))
}

fn admit_body(store: &FactStore, body: &[u8]) -> Outcome {
    let reviewed = handler::review(body, &[]).unwrap();
    let response: Value = serde_json::from_slice(&reviewed.response).unwrap();
    assert_eq!(
        response["response"]["allowed"], true,
        "the webhook never blocks"
    );
    if let Some(fact) = reviewed.fact {
        store.record(fact);
    }
    reviewed.outcome
}

fn cm_event(rel: &str) -> Value {
    corpus(rel)
}

#[test]
fn a_create_is_attributed_to_its_admitted_user() {
    let (store, _) = store();
    assert_eq!(
        admit(&store, "configmap/create-succeeds/admission.create.yaml"),
        Outcome::Recorded
    );
    let event = cm_event("configmap/create-succeeds/watch.added.yaml");
    assert_eq!(
        feed(&store, "", "configmaps", &event),
        Some("system:admin".into())
    );
    assert!(store.is_empty());
    assert_eq!(store.metrics().matches.get(), 1);
}

#[test]
fn updates_and_server_side_applies_are_attributed() {
    for scenario in ["update", "server-side-apply"] {
        let (store, _) = store();
        admit(
            &store,
            &format!("configmap/{scenario}/admission.update.yaml"),
        );
        let event = cm_event(&format!("configmap/{scenario}/watch.modified.yaml"));
        assert_eq!(
            feed(&store, "", "configmaps", &event),
            Some("system:admin".into()),
            "{scenario}"
        );
    }
}

#[test]
fn a_generate_name_create_is_keyed_by_the_generated_name() {
    let (store, _) = store();
    admit(
        &store,
        "configmap/generate-name-create/admission.create.yaml",
    );
    let event = cm_event("configmap/generate-name-create/watch.added.yaml");
    assert_eq!(
        feed(&store, "", "configmaps", &event),
        Some("system:admin".into())
    );
}

#[test]
fn an_update_by_someone_else_is_not_attributed_to_the_creator() {
    let (store, _) = store();
    admit(&store, "configmap/create-succeeds/admission.create.yaml");
    // The watch shows content the creator never sent (somebody without a fact changed it).
    let mut event = cm_event("configmap/create-succeeds/watch.added.yaml");
    event["object"]["data"]["key"] = json!("changed by a controller");
    assert_eq!(feed(&store, "", "configmaps", &event), None);
}

#[test]
fn a_no_op_apply_still_matches_if_the_watch_fires() {
    let (store, _) = store();
    admit(&store, "configmap/no-op-apply/admission.update.yaml");
    // Only server-owned fields move (resourceVersion, managedFields time): same canonical bytes.
    let mut object =
        corpus("configmap/no-op-apply/admission.update.yaml")["request"]["object"].clone();
    object["metadata"]["resourceVersion"] = json!("2");
    object["metadata"]["managedFields"][0]["time"] = json!("2026-06-25T10:05:00Z");
    let event = json!({"type": "MODIFIED", "object": object});
    assert_eq!(
        feed(&store, "", "configmaps", &event),
        Some("system:admin".into())
    );
}

#[test]
fn a_no_op_apply_without_a_watch_event_expires_unmatched() {
    let (store, clock) = store();
    admit(&store, "configmap/no-op-apply/admission.update.yaml");
    clock.advance(Duration::from_secs(599));
    store.sweep();
    assert_eq!(store.len(), 1, "kept until the TTL");
    clock.advance(Duration::from_secs(1));
    store.sweep();
    assert!(store.is_empty());
    assert_eq!(store.metrics().unmatched.get(), 1);
    // A later change to the same content by nobody we know stays with the bot.
    let object = corpus("configmap/no-op-apply/admission.update.yaml")["request"]["object"].clone();
    let event = json!({"type": "MODIFIED", "object": object});
    assert_eq!(feed(&store, "", "configmaps", &event), None);
}

#[test]
fn a_dry_run_leaves_no_fact() {
    let (store, _) = store();
    assert_eq!(
        admit(&store, "configmap/dry-run-create/admission.create.yaml"),
        Outcome::DryRun
    );
    assert!(store.is_empty());
    assert_eq!(store.metrics().facts.get(), 0);
    // Even if the same object were created for real later, the dry run names nobody.
    let object =
        corpus("configmap/dry-run-create/admission.create.yaml")["request"]["object"].clone();
    assert_eq!(
        feed(
            &store,
            "",
            "configmaps",
            &json!({"type": "ADDED", "object": object})
        ),
        None
    );
}

#[test]
fn every_object_of_a_deletecollection_is_attributed_by_uid() {
    let (store, _) = store();
    for cm in ["cm-a", "cm-b", "cm-c"] {
        assert_eq!(
            admit(
                &store,
                &format!("configmap/deletecollection/admission.delete.{cm}.yaml")
            ),
            Outcome::Recorded
        );
    }
    assert_eq!(store.len(), 3);
    for cm in ["cm-c", "cm-a", "cm-b"] {
        let event = cm_event(&format!(
            "configmap/deletecollection/watch.deleted.{cm}.yaml"
        ));
        assert_eq!(
            feed(&store, "", "configmaps", &event),
            Some("system:admin".into()),
            "{cm}"
        );
    }
    assert!(store.is_empty());
}

#[test]
fn an_aggregated_api_deletecollection_is_attributed_by_uid() {
    let (store, _) = store();
    let dir = "flunder/aggregated-api-deletecollection";
    for f in ["fl-dc-a", "fl-dc-b", "fl-dc-c"] {
        admit(&store, &format!("{dir}/admission.delete.{f}.yaml"));
    }
    for f in ["fl-dc-a", "fl-dc-b", "fl-dc-c"] {
        let event = corpus(&format!("{dir}/watch.deleted.{f}.yaml"));
        assert_eq!(
            feed(&store, "wardle.example.com", "flunders", &event),
            Some("system:admin".into())
        );
    }
}

#[test]
fn a_finalizer_held_delete_is_attributed_to_who_deleted_not_to_the_finalizer_controller() {
    let (store, _) = store();
    let dir = "configmap/deletion-intent-actor";
    // alice deletes; the object waits for its finalizer (MODIFIED with a deletionTimestamp);
    // the finalizer controller's service account removes the finalizer; the object goes.
    admit(&store, &format!("{dir}/admission.delete.yaml"));
    assert_eq!(
        feed(
            &store,
            "",
            "configmaps",
            &corpus(&format!("{dir}/watch.modified.yaml"))
        ),
        None,
        "a deletionTimestamp is not content: nobody authored a change"
    );
    admit(&store, &format!("{dir}/admission.update.yaml"));
    assert_eq!(store.len(), 2);
    assert_eq!(
        feed(
            &store,
            "",
            "configmaps",
            &corpus(&format!("{dir}/watch.deleted.yaml"))
        ),
        Some("alice@example.com".into())
    );
    assert!(
        store.is_empty(),
        "the finalizer update of the gone object is dropped too"
    );
}

#[test]
fn a_finalizer_delete_and_a_graceful_pod_delete_are_attributed() {
    for (dir, resource) in [
        ("configmap/finalizer-delete", "configmaps"),
        ("pod/graceful-delete", "pods"),
    ] {
        let (store, _) = store();
        admit(&store, &format!("{dir}/admission.delete.yaml"));
        if webhook_support::corpus_dir()
            .join(dir)
            .join("admission.update.yaml")
            .exists()
        {
            admit(&store, &format!("{dir}/admission.update.yaml"));
        }
        assert_eq!(
            feed(
                &store,
                "",
                resource,
                &corpus(&format!("{dir}/watch.modified.yaml"))
            ),
            None,
            "{dir}"
        );
        assert_eq!(
            feed(
                &store,
                "",
                resource,
                &corpus(&format!("{dir}/watch.deleted.yaml"))
            ),
            Some("system:admin".into()),
            "{dir}"
        );
    }
}

#[test]
fn a_conflicting_attempt_that_never_persists_authors_nothing() {
    let (store, clock) = store();
    // The loser's update reached admission, then failed with 409 (audit.update.yaml).
    let audit = corpus("configmap/conflict-update/audit.update.yaml");
    let attempt = |user: &str, object: &Value| {
        review_of(json!({
            "uid": format!("req-{user}"),
            "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
            "resource": {"group": "", "version": "v1", "resource": "configmaps"},
            "name": "cm-conflict", "namespace": audit["objectRef"]["namespace"],
            "operation": "UPDATE",
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            "object": object, "oldObject": object, "dryRun": false
        }))
    };
    let loser = audit["requestObject"].clone();
    let mut winner = loser.clone();
    winner["data"]["key"] = json!("winner");
    admit_body(&store, &attempt("alice", &loser));
    admit_body(&store, &attempt("bob", &winner));
    let mut persisted = winner.clone();
    persisted["metadata"]["resourceVersion"] = json!("2");
    assert_eq!(
        feed(
            &store,
            "",
            "configmaps",
            &json!({"type": "MODIFIED", "object": persisted})
        ),
        Some("bob".into())
    );
    assert!(store.is_empty(), "the loser's older attempt is retired");

    // Without the winner's fact, the persisted change is nobody's: never the loser's.
    admit_body(&store, &attempt("alice", &loser));
    assert_eq!(
        feed(
            &store,
            "",
            "configmaps",
            &json!({"type": "MODIFIED", "object": persisted})
        ),
        None
    );
    clock.advance(Duration::from_secs(600));
    store.sweep();
    assert!(store.is_empty());
    assert_eq!(store.metrics().unmatched.get(), 2);
}

#[test]
fn a_rejected_create_never_appears_and_expires() {
    let (store, clock) = store();
    // Another webhook denied it after ours allowed it (record-and-reject).
    admit(&store, "configmap/record-and-reject/admission.create.yaml");
    clock.advance(Duration::from_secs(601));
    store.sweep();
    assert!(store.is_empty());
    assert_eq!(store.metrics().unmatched.get(), 1);
}

#[test]
fn garbage_collected_objects_without_a_fact_keep_the_bot() {
    let (store, _) = store();
    for child in ["cm-child", "cm-parent"] {
        let event = corpus(&format!(
            "configmap/owner-ref-cascade/watch.deleted.{child}.yaml"
        ));
        assert_eq!(feed(&store, "", "configmaps", &event), None);
    }
}

#[test]
fn a_watch_in_another_version_than_admitted_is_not_attributed() {
    let (store, _) = store();
    // Admitted as v1 (spec.sizeBytes), watched as v2 (spec.size): different bytes, no author.
    admit(&store, "widget/crd-conversion/admission.create.yaml");
    let event = corpus("widget/crd-conversion/watch.added.yaml");
    assert_eq!(
        feed(&store, "mutationlab.configbutler.ai", "widgets", &event),
        None
    );
}

#[test]
fn a_webhook_registered_for_the_watched_version_sees_the_converted_object_and_matches() {
    let (store, _) = store();
    // With `matchPolicy: Equivalent` and a rule naming v2, the API server converts the object
    // to v2 before calling the webhook: the admitted object is the watch's, minus server fields.
    let mut request = corpus("widget/crd-conversion/admission.create.yaml")["request"].clone();
    let watched_object = corpus("widget/crd-conversion/watch.added.yaml")["object"].clone();
    let mut admitted = watched_object.clone();
    admitted["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    request["object"] = admitted;
    request["resource"]["version"] = json!("v2");
    admit_body(&store, &review_of(request));
    assert_eq!(
        feed(
            &store,
            "mutationlab.configbutler.ai",
            "widgets",
            &json!({"type": "ADDED", "object": watched_object})
        ),
        Some("system:admin".into())
    );
}

#[test]
fn admitted_and_watched_hashes_agree_for_every_corpus_create_and_update() {
    // The join rests on this: the handler's hash of an admitted object equals ingestion's hash
    // of the persisted one whenever only server-owned fields differ.
    for (admission, event, group, resource) in [
        (
            "configmap/create-succeeds/admission.create.yaml",
            "configmap/create-succeeds/watch.added.yaml",
            "",
            "configmaps",
        ),
        (
            "configmap/update/admission.update.yaml",
            "configmap/update/watch.modified.yaml",
            "",
            "configmaps",
        ),
        (
            "configmap/server-side-apply/admission.update.yaml",
            "configmap/server-side-apply/watch.modified.yaml",
            "",
            "configmaps",
        ),
        (
            "configmap/generate-name-create/admission.create.yaml",
            "configmap/generate-name-create/watch.added.yaml",
            "",
            "configmaps",
        ),
    ] {
        let fact = handler::review(&review_body(admission), &[])
            .unwrap()
            .fact
            .unwrap();
        let w = watched(group, resource, &corpus(event)["object"]);
        assert_eq!(fact.content_hash, Some(w.hash), "{admission}");
        assert_eq!(fact.uid.as_deref(), Some(w.uid.as_str()), "{admission}");
        assert_eq!(fact.key, w.key, "{admission}");
        assert_eq!(
            fact.key,
            ObjectKey::new(group, resource, "ns-1", &w.key.name)
        );
    }
}

#[test]
fn a_kubectl_scale_is_attributed_to_the_deployments_next_version() {
    let (store, _) = store();
    // The corpus holds the audit of `PATCH .../deployments/d1/scale` (its response is the
    // Scale as persisted, at the version the first watch event carries) but not the
    // AdmissionReview: build it as the API server does, from the Scale before and after.
    let audit = corpus("deployment/scale-patch/audit.patch.yaml");
    let after = audit["responseObject"].clone();
    let mut before = after.clone();
    before["metadata"]["resourceVersion"] = json!("0");
    before["spec"]["replicas"] = json!(1);
    let mut admitted = after.clone();
    admitted["metadata"]["resourceVersion"] = json!("0");
    let review = |user: &str| {
        review_of(json!({
            "uid": format!("req-{user}"),
            "kind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "subResource": "scale",
            "requestKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
            "requestResource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "requestSubResource": "scale",
            "name": "d1", "namespace": audit["objectRef"]["namespace"],
            "operation": "UPDATE",
            "userInfo": audit["user"].clone(),
            "object": admitted, "oldObject": before, "dryRun": false
        }))
    };
    assert_eq!(admit_body(&store, &review("admin")), Outcome::Recorded);
    let fact = &store.snapshot()[0];
    assert_eq!(fact.key.resource, "deployments");
    assert_eq!(fact.scale_replicas, Some(2));
    // The Deployment's next version (the scale) is the admin's; the controller's status
    // write after it (same spec) is nobody's.
    let scaled = corpus("deployment/scale-patch/watch.modified.1.yaml");
    assert_eq!(
        feed(&store, "apps", "deployments", &scaled),
        Some("system:admin".into())
    );
    let status = corpus("deployment/scale-patch/watch.modified.2.yaml");
    assert_eq!(feed(&store, "apps", "deployments", &status), None);
    assert!(store.is_empty());

    // The same scale denied after admission: the next version keeps the old replicas, and
    // the fact is gone before a later, unseen scale to 2 could claim it.
    assert_eq!(admit_body(&store, &review("admin")), Outcome::Recorded);
    let mut unscaled = scaled.clone();
    unscaled["object"]["spec"]["replicas"] = json!(1);
    assert_eq!(feed(&store, "apps", "deployments", &unscaled), None);
    assert!(store.is_empty());
    assert_eq!(feed(&store, "apps", "deployments", &status), None);
}
