//! The watch index joined to the webhook's fact store: who made a change reaches the events. These tests need
//! both halves (the index is in `reverser_agent_core`, the store in [`crate::webhook`]), so they live here.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use serde_json::{Value, json};

use crate::attribution::ObjectKey;
use crate::canonical;
use crate::crd::ResourceScope;
use crate::events::AgentEvent;
use crate::ingest::WatchEvent as Event;
use crate::ingest::discovery::{DestinationRoute, DiscoveredResource, WatchKey, WatchPlan};
use crate::ingest::index::WatchIndex;
use crate::rules::SelectionOptions;
use crate::rules::compiled::test_support::*;
use crate::rules::compiled::{CompiledRule, NamespaceLabels, RuleKind};
use crate::webhook::FactStore;

fn plan(routes: Vec<(&str, Vec<CompiledRule>, &[&str])>) -> Arc<WatchPlan> {
    Arc::new(WatchPlan {
        key: WatchKey {
            group: "".into(),
            version: "v1".into(),
            resource: "configmaps".into(),
            namespace: "".into(),
        },
        resource: DiscoveredResource::new("", "v1", "configmaps", "ConfigMap", true),
        routes: routes
            .into_iter()
            .map(|(d, rules, scopes)| DestinationRoute {
                destination: decl(d),
                rules,
                snapshot_namespaces: scopes
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect::<BTreeSet<_>>(),
            })
            .collect(),
        namespace_labels: NamespaceLabels::new(),
        sensitive: false,
    })
}

fn cm(ns: &str, name: &str, labels: Value, data: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "resourceVersion": rv, "uid": format!("uid-{name}")},
        "data": {"k": data}})
}

fn all_configmaps(dest: &str) -> Vec<(&str, Vec<CompiledRule>, &'static [&'static str])> {
    vec![(
        dest,
        vec![cluster_rule(
            dest,
            ResourceScope::Namespaced,
            &["configmaps"],
            None,
        )],
        &[""],
    )]
}

fn authors(events: &[AgentEvent]) -> Vec<(String, Option<String>)> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Upsert { path, author, .. } => {
                Some((format!("upsert {path}"), author.clone()))
            }
            AgentEvent::Delete { path, author, .. } => {
                Some((format!("delete {path}"), author.clone()))
            }
            _ => None,
        })
        .collect()
}

/// A rule selecting every ConfigMap that ignores `ignore`.
fn ignoring(mut rule: CompiledRule, ignore: Value) -> CompiledRule {
    let ignore = Some(serde_json::from_value(ignore).unwrap());
    match &mut rule.kind {
        RuleKind::Namespaced { spec, .. } => spec.ignore = ignore,
        RuleKind::Cluster { spec } => spec.ignore = ignore,
    }
    rule
}

fn flux_ignoring_plan(extra: Option<CompiledRule>) -> Arc<WatchPlan> {
    let mut rules = vec![ignoring(
        cluster_rule("d", ResourceScope::Namespaced, &["configmaps"], None),
        json!({"presets": ["Flux"], "users": ["bob"]}),
    )];
    rules.extend(extra);
    plan(vec![("d", rules, &[""])])
}

/// ConfigMap `name` holding `data`, written by `managers` as (manager, operation, time).
fn managed(name: &str, data: &str, rv: &str, managers: &[(&str, &str, &str)]) -> Value {
    let mut obj = cm("shop", name, json!({}), data, rv);
    obj["metadata"]["managedFields"] = managers
        .iter()
        .map(|(m, op, time)| {
            json!({"manager": m, "operation": op, "apiVersion": "v1", "time": time,
                   "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:k": {}}}})
        })
        .collect();
    obj
}

const CREATE: (&str, &str, &str) = ("kubectl-create", "Update", "2026-01-01T00:00:00Z");
const PATH_A: &str = "core/v1/configmaps/shop/a.yaml";

fn fact(op: crate::webhook::Operation, user: &str, obj: &Value) -> crate::webhook::Fact {
    let name = obj["metadata"]["name"].as_str().unwrap();
    crate::webhook::Fact {
        key: ObjectKey::new("", "configmaps", "shop", name),
        operation: op,
        username: user.to_owned(),
        groups: vec![],
        uid: Some(format!("uid-{name}")),
        content_hash: (op != crate::webhook::Operation::Delete)
            .then(|| canonical::content_hash(&canonical::to_canonical_yaml(obj).unwrap())),
        base_version: None,
        scale_replicas: None,
    }
}

fn store() -> FactStore {
    FactStore::new(
        crate::webhook::FactsConfig::default(),
        crate::webhook::AttributionMetrics::new().unwrap(),
    )
}

#[test]
fn changes_carry_the_author_whose_admitted_content_became_state() {
    use crate::webhook::Operation as Op;
    let store = store();
    let mut index = WatchIndex::new(plan(all_configmaps("d")), SelectionOptions::default())
        .with_attribution(Arc::new(store.clone()));
    let epochs = AtomicU64::new(0);
    let path = "core/v1/configmaps/shop/a.yaml";
    let v1 = cm("shop", "a", json!({}), "1", "1");
    let v2 = cm("shop", "a", json!({}), "2", "2");
    let v3 = cm("shop", "a", json!({}), "3", "3");
    store.record(fact(Op::Create, "alice", &v1));
    let out = index.apply(Event::Apply(v1.clone()), &epochs);
    assert_eq!(
        authors(&out),
        [(format!("upsert {path}"), Some("alice".into()))]
    );
    // A fact for other content (a conflict that never persisted) names nobody.
    store.record(fact(Op::Update, "mallory", &v3));
    let out = index.apply(Event::Apply(v2.clone()), &epochs);
    assert_eq!(authors(&out), [(format!("upsert {path}"), None)]);
    // A matched no-op (same file) is consumed even though nothing is sent.
    store.record(fact(Op::Update, "carol", &v2));
    assert!(index.apply(Event::Apply(v2.clone()), &epochs).is_empty());
    assert!(
        store.snapshot().iter().all(|f| f.username != "carol"),
        "the no-op's fact was consumed: {:?}",
        store.snapshot()
    );
    store.record(fact(Op::Delete, "bob", &v2));
    let out = index.apply(Event::Delete(v2), &epochs);
    assert_eq!(
        authors(&out),
        [(format!("delete {path}"), Some("bob".into()))]
    );
}

#[test]
fn an_ignored_user_seen_by_the_webhook_makes_no_commit_and_a_person_then_does() {
    use crate::webhook::Operation as Op;
    let store = store();
    let mut idx = WatchIndex::new(flux_ignoring_plan(None), SelectionOptions::default())
        .with_attribution(Arc::new(store.clone()));
    let epochs = AtomicU64::new(0);
    idx.apply(Event::Init, &epochs);
    idx.apply(
        Event::InitApply(managed("a", "person-0", "1", &[CREATE])),
        &epochs,
    );
    idx.apply(Event::InitDone, &epochs);
    let patch = ("kubectl-patch", "Update", "2026-01-01T00:00:40Z");
    let by_bob = managed("a", "bob-1", "2", &[CREATE, patch]);
    store.record(fact(Op::Update, "bob", &by_bob));
    assert!(idx.apply(Event::Apply(by_bob), &epochs).is_empty());
    // alice uses the very same manager name; the webhook names her, so it is mirrored.
    let patch_again = ("kubectl-patch", "Update", "2026-01-01T00:00:50Z");
    let by_alice = managed("a", "alice-2", "3", &[CREATE, patch_again]);
    store.record(fact(Op::Update, "alice", &by_alice));
    let out = idx.apply(Event::Apply(by_alice), &epochs);
    assert_eq!(
        authors(&out),
        [(format!("upsert {PATH_A}"), Some("alice".into()))]
    );
    // A group listed in `ignore.groups` is matched on the fact's groups.
    let mut grouped = flux_ignoring_plan(None).as_ref().clone();
    grouped.routes[0].rules[0] = ignoring(
        grouped.routes[0].rules[0].clone(),
        json!({"groups": ["robots"]}),
    );
    let mut idx = WatchIndex::new(Arc::new(grouped), SelectionOptions::default())
        .with_attribution(Arc::new(store.clone()));
    idx.apply(Event::Apply(managed("g", "x-0", "1", &[CREATE])), &epochs);
    let by_robot = managed("g", "robot-1", "2", &[CREATE, patch]);
    let mut robot_fact = fact(Op::Update, "carol", &by_robot);
    robot_fact.groups = vec!["robots".into()];
    store.record(robot_fact);
    assert!(idx.apply(Event::Apply(by_robot), &epochs).is_empty());
}
