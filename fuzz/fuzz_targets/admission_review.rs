//! The agent's AdmissionReview handling (`webhook::handler::review`, the parsing and decision function behind the
//! HTTP server): any body either gets an error (the server answers 400) or an `allowed: true` response for the
//! request's own uid; a sensitive type never leaves a fact or a hash; a fact exists exactly when the outcome is
//! `recorded`; and a CREATE/UPDATE fact's content hash is the one ingestion computes when the watch delivers
//! the same object (the join depends on it).
//!
//! Input: raw bytes half of the time (JSON review bodies from the corpus, mutated), otherwise a well-formed review
//! built around an arbitrary object, so the decision logic is reached often.
#![no_main]

use arbitrary::Unstructured;
use kube::api::{DynamicObject, TypeMeta};
use libfuzzer_sys::fuzz_target;
use reverser_agent::canonical;
use reverser_agent::webhook::handler::{self, Outcome};
use reverser_fuzz::value;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let sensitive = ["widgets".to_owned(), "gadgets.example.com".to_owned()];
    let body = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        built(rest)
    };
    let request: Option<Value> = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("request").cloned());
    let Ok(reviewed) = handler::review(&body, &sensitive) else {
        return;
    };
    let response: Value = serde_json::from_slice(&reviewed.response).expect("the response is JSON");
    assert_eq!(response["apiVersion"], handler::API_VERSION);
    assert_eq!(response["kind"], handler::KIND);
    assert_eq!(response["response"]["allowed"], true);
    assert!(
        response["response"]["uid"]
            .as_str()
            .is_some_and(|uid| !uid.is_empty())
    );
    assert_eq!(
        reviewed.fact.is_some(),
        reviewed.outcome == Outcome::Recorded
    );
    // The handler skips the parts it does not read without checking them (invalid UTF-8 in an ignored string
    // passes); the rest of the checks need the whole body as JSON.
    let Some(request) = request else {
        return;
    };
    assert_eq!(
        response["response"]["uid"], request["uid"],
        "the response answers another uid"
    );
    let group = request["resource"]["group"].as_str().unwrap_or("");
    let resource = request["resource"]["resource"].as_str().unwrap_or("");
    let is_sensitive = (group.is_empty() && resource == "secrets")
        || resource == "widgets"
        || (resource == "gadgets" && group == "example.com");
    if is_sensitive {
        assert!(reviewed.fact.is_none(), "a fact about a sensitive object");
    }
    if request["dryRun"] == true {
        assert_eq!(reviewed.outcome, Outcome::DryRun);
    }
    let Some(fact) = reviewed.fact else {
        return;
    };
    assert!(!fact.username.is_empty() && !fact.key.name.is_empty());
    if let Some(hash) = fact.content_hash {
        let object = request["object"].clone();
        if let Some(watched) = watch_hash(object) {
            assert_eq!(
                hash, watched,
                "admission and watch hash the same object differently"
            );
        }
    }
});

/// The hash ingestion computes for a watch event carrying `object` (`ingest::watch`: a `DynamicObject` with its
/// type filled in from discovery, back to JSON, canonical YAML).
fn watch_hash(object: Value) -> Option<[u8; 32]> {
    let mut dynamic: DynamicObject = serde_json::from_value(object).ok()?;
    // The API server sends whole objects (with their type) for admission; the watch sets the type from
    // discovery, which is the same.
    let types = dynamic.types.clone()?;
    dynamic.types = Some(TypeMeta {
        api_version: types.api_version,
        kind: types.kind,
    });
    let json = serde_json::to_value(dynamic).ok()?;
    let yaml = canonical::to_canonical_yaml(&json).ok()?;
    Some(canonical::content_hash(&yaml))
}

/// A well-formed review around an arbitrary object.
fn built(data: &[u8]) -> Vec<u8> {
    let mut u = Unstructured::new(data);
    let pick = |u: &mut Unstructured<'_>, pool: &[&str]| {
        u.choose(pool).map(|s| (*s).to_owned()).unwrap_or_default()
    };
    let operation = pick(&mut u, &["CREATE", "UPDATE", "DELETE", "CONNECT", ""]);
    let (group, resource) = match u.int_in_range(0..=5u8).unwrap_or(0) {
        0 => ("", "configmaps"),
        1 => ("apps", "deployments"),
        2 => ("", "secrets"),
        3 => ("example.com", "widgets"),
        4 => ("example.com", "gadgets"),
        _ => ("", "replicationcontrollers"),
    };
    let sub_resource = pick(&mut u, &["", "scale", "status"]);
    let username = pick(&mut u, &["alice", ""]);
    let dry_run: bool = u.arbitrary().unwrap_or(false);
    let uid = value::pick_string(&mut u).unwrap_or_default();
    let object = value::object_from(u.bytes(u.len()).unwrap_or_default()).map(Value::Object);
    let old = object.clone();
    json!({
        "apiVersion": handler::API_VERSION,
        "kind": handler::KIND,
        "request": {
            "uid": uid,
            "resource": {"group": group, "version": "v1", "resource": resource},
            "subResource": sub_resource,
            "name": "",
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": username, "groups": ["system:authenticated"]},
            "object": object,
            "oldObject": old,
            "dryRun": dry_run,
        }
    })
    .to_string()
    .into_bytes()
}
