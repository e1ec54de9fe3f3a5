//! The real client, kube-rs, against the in-process emulator. Each test names the Kubernetes
//! API concept it checks (https://kubernetes.io/docs/reference/using-api/api-concepts/).

mod common;

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind, PartialObjectMeta};
use kube::discovery::Discovery;
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher::{self, Event};
use serde_json::json;

fn configmap(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "data": {"key": "value"}
    }))
    .unwrap()
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;

// Discovery: https://kubernetes.io/docs/concepts/overview/kubernetes-api/#discovery-api
#[tokio::test]
async fn legacy_discovery_finds_builtin_groups_and_resources() {
    let emu = common::emulator().await;
    let discovery = Discovery::new(emu.client().await).run().await.unwrap();
    assert!(discovery.has_group("apps"));
    assert!(discovery.has_group("coordination.k8s.io"));
    let (ar, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("", "v1", "ConfigMap"))
        .expect("configmaps discovered");
    assert_eq!(ar.plural, "configmaps");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(caps.supports_operation(kube::discovery::verbs::WATCH));
}

// Aggregated discovery (apidiscovery.k8s.io/v2): run_aggregated silently finds nothing without it.
#[tokio::test]
async fn aggregated_discovery_finds_core_builtins_and_crds() {
    let emu = common::emulator().await;
    emu.apply_yaml(WIDGET_CRD).await.unwrap();
    let discovery = Discovery::new(emu.client().await)
        .run_aggregated()
        .await
        .unwrap();
    assert!(discovery.groups().count() > 5, "groups found");
    assert!(
        discovery
            .resolve_gvk(&GroupVersionKind::gvk("", "v1", "Namespace"))
            .is_some()
    );
    assert!(
        discovery
            .resolve_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"))
            .is_some()
    );
    let (ar, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("example.com", "v1", "Widget"))
        .expect("CRD served in aggregated discovery");
    assert_eq!(ar.plural, "widgets");
    assert!(
        caps.subresources
            .iter()
            .any(|(sub, _)| sub.plural == "status")
    );
}

// List filtering: https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/
#[tokio::test]
async fn list_filters_by_label_and_field_selectors() {
    let emu = common::emulator().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(emu.client().await);
    for (name, app, tier) in [
        ("a", "web", "front"),
        ("b", "web", "back"),
        ("c", "db", "back"),
    ] {
        cms.create(
            &PostParams::default(),
            &configmap(name, json!({"app": app, "tier": tier})),
        )
        .await
        .unwrap();
    }
    let names = |l: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        l.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect()
    };
    let q = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(cms.list(&q("app=web")).await.unwrap()), ["a", "b"]);
    assert_eq!(names(cms.list(&q("app!=web")).await.unwrap()), ["c"]);
    assert_eq!(names(cms.list(&q("tier in (front)")).await.unwrap()), ["a"]);
    assert_eq!(
        names(cms.list(&q("tier notin (front),app")).await.unwrap()),
        ["b", "c"]
    );
    assert_eq!(
        names(cms.list(&q("!app")).await.unwrap()),
        Vec::<String>::new()
    );
    let by_name = ListParams::default().fields("metadata.name=b");
    assert_eq!(names(cms.list(&by_name).await.unwrap()), ["b"]);
}

// Retrieving large results sets in chunks: limit/continue, remainingItemCount, consistent snapshot.
#[tokio::test]
async fn paginated_list_is_a_consistent_snapshot() {
    let emu = common::emulator().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(emu.client().await);
    for i in 0..25 {
        cms.create(
            &PostParams::default(),
            &configmap(&format!("cm-{i:02}"), json!({})),
        )
        .await
        .unwrap();
    }
    let first = cms.list(&ListParams::default().limit(10)).await.unwrap();
    assert_eq!(first.items.len(), 10);
    assert_eq!(first.metadata.remaining_item_count, Some(15));
    let list_rv = first.metadata.resource_version.clone().unwrap();
    // Changes after the first page do not leak into later pages.
    cms.delete("cm-15", &DeleteParams::default()).await.unwrap();
    cms.create(&PostParams::default(), &configmap("cm-99", json!({})))
        .await
        .unwrap();
    let mut names: Vec<String> = first
        .items
        .into_iter()
        .map(|c| c.metadata.name.unwrap())
        .collect();
    let mut token = first.metadata.continue_;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = cms
            .list(&ListParams::default().limit(10).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version.as_deref(),
            Some(list_rv.as_str())
        );
        names.extend(page.items.into_iter().map(|c| c.metadata.name.unwrap()));
        token = page.metadata.continue_;
    }
    let expected: Vec<String> = (0..25).map(|i| format!("cm-{i:02}")).collect();
    assert_eq!(names, expected);
}

async fn wait_init_done<S>(stream: &mut S) -> Vec<String>
where
    S: futures::Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Unpin,
{
    let mut names = Vec::new();
    loop {
        match stream.try_next().await.unwrap().expect("stream continues") {
            Event::Init => names.clear(),
            Event::InitApply(cm) => names.push(cm.metadata.name.unwrap()),
            Event::InitDone => return names,
            Event::Apply(_) | Event::Delete(_) => {}
        }
    }
}

async fn next_apply<S>(stream: &mut S) -> ConfigMap
where
    S: futures::Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Unpin,
{
    loop {
        if let Event::Apply(cm) = stream.try_next().await.unwrap().expect("stream continues") {
            return cm;
        }
    }
}

// kube::runtime::watcher with a paginated initial LIST, then WATCH.
#[tokio::test]
async fn watcher_with_list_then_watch_reaches_init_done_and_sees_changes() {
    let emu = common::emulator().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(emu.client().await);
    for i in 0..5 {
        cms.create(
            &PostParams::default(),
            &configmap(&format!("pre-{i}"), json!({})),
        )
        .await
        .unwrap();
    }
    let mut stream = watcher::watcher(cms.clone(), watcher::Config::default().page_size(2)).boxed();
    assert_eq!(wait_init_done(&mut stream).await.len(), 5);
    cms.create(&PostParams::default(), &configmap("live", json!({})))
        .await
        .unwrap();
    assert_eq!(
        next_apply(&mut stream).await.metadata.name.as_deref(),
        Some("live")
    );
}

// Streaming lists: sendInitialEvents=true ends the initial events with the
// k8s.io/initial-events-end bookmark (https://kubernetes.io/docs/reference/using-api/api-concepts/#streaming-lists).
#[tokio::test]
async fn watcher_with_streaming_list_reaches_init_done_and_sees_changes() {
    let emu = common::emulator().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(emu.client().await);
    for i in 0..3 {
        cms.create(
            &PostParams::default(),
            &configmap(&format!("pre-{i}"), json!({"app": "x"})),
        )
        .await
        .unwrap();
    }
    let config = watcher::Config::default().streaming_lists().labels("app=x");
    let mut stream = watcher::watcher(cms.clone(), config).boxed();
    assert_eq!(
        wait_init_done(&mut stream).await,
        ["pre-0", "pre-1", "pre-2"]
    );
    cms.create(
        &PostParams::default(),
        &configmap("live", json!({"app": "x"})),
    )
    .await
    .unwrap();
    assert_eq!(
        next_apply(&mut stream).await.metadata.name.as_deref(),
        Some("live")
    );
}

// 410 Gone: after a compaction the watcher's resume fails and it relists.
#[tokio::test]
async fn watcher_relists_after_forced_compaction() {
    let emu = common::emulator().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(emu.client().await);
    cms.create(&PostParams::default(), &configmap("before", json!({})))
        .await
        .unwrap();
    let mut stream = watcher::watcher(cms.clone(), watcher::Config::default()).boxed();
    assert_eq!(wait_init_done(&mut stream).await, ["before"]);
    emu.faults().compact_history();
    emu.faults().close_watches();
    // The resume from the old resourceVersion is answered with 410; the watcher relists.
    cms.create(&PostParams::default(), &configmap("after", json!({})))
        .await
        .unwrap();
    let mut saw_expired = false;
    let mut relisted = Vec::new();
    loop {
        match stream.next().await.expect("stream continues") {
            Err(watcher::Error::WatchError(s)) if s.code == 410 => saw_expired = true,
            Err(e) => panic!("unexpected watcher error {e:?}"),
            Ok(Event::Init) => relisted.clear(),
            Ok(Event::InitApply(cm)) => relisted.push(cm.metadata.name.unwrap()),
            Ok(Event::InitDone) => break,
            Ok(_) => {}
        }
    }
    assert!(saw_expired, "the resume got 410 Expired");
    assert_eq!(relisted, ["after", "before"]);
}

// Optimistic concurrency (https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-versions):
// a replace with a stale resourceVersion is a 409 Conflict.
#[tokio::test]
async fn lease_replace_with_stale_resource_version_conflicts() {
    let emu = common::emulator().await;
    let leases: Api<Lease> = Api::namespaced(emu.client().await, "kube-node-lease");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "writer"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut mine = created.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let updated = leases
        .replace("writer", &PostParams::default(), &mine)
        .await
        .unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );
    // Replaying the old object (stale resourceVersion) loses.
    let mut stale = created.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let err = leases
        .replace("writer", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert_eq!(s.reason, "Conflict");
        }
        other => panic!("expected 409, got {other:?}"),
    }
    let again = leases
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert!(matches!(again, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"));
}

// CustomResourceDefinitions: Established, then the custom resource is served; deleting the
// CRD stops serving it.
#[tokio::test]
async fn crd_becomes_established_and_its_resources_are_served() {
    let emu = common::emulator().await;
    let client = emu.client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_saphyr::from_str(WIDGET_CRD).unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let established = await_condition(
        crds.clone(),
        "widgets.example.com",
        conditions::is_crd_established(),
    );
    tokio::time::timeout(Duration::from_secs(10), established)
        .await
        .unwrap()
        .unwrap();

    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let w: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 1}, "status": {"ignored": true}
    }))
    .unwrap();
    let created = widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.data.get("status").is_none(),
        "status is dropped on create with a status subresource"
    );
    // Status only through /status, and it does not bump generation.
    let st = widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": true}})),
        )
        .await
        .unwrap();
    assert_eq!(st.data["status"]["ready"], true);
    assert_eq!(st.metadata.generation, Some(1));
    let spec = widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}, "status": {"ready": false}})),
        )
        .await
        .unwrap();
    assert_eq!(spec.metadata.generation, Some(2));
    assert_eq!(
        spec.data["status"]["ready"], true,
        "main resource writes keep status"
    );

    crds.delete("widgets.example.com", &DeleteParams::default())
        .await
        .unwrap();
    let gone = widgets.list(&ListParams::default()).await.unwrap_err();
    assert!(matches!(gone, kube::Error::Api(s) if s.code == 404));
}

// Finalizers: https://kubernetes.io/docs/concepts/overview/working-with-objects/finalizers/
#[tokio::test]
async fn delete_with_finalizers_marks_then_removes() {
    let emu = common::emulator().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(emu.client().await);
    let mut cm = configmap("held", json!({}));
    cm.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let pending = cms.delete("held", &DeleteParams::default()).await.unwrap();
    let marked = pending
        .left()
        .expect("object returned while finalizers remain");
    assert!(marked.metadata.deletion_timestamp.is_some());
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(cms.get_opt("held").await.unwrap().is_none());
}

#[tokio::test]
async fn generate_name_dry_run_and_missing_namespace_behave_like_the_apiserver() {
    let emu = common::emulator().await;
    let client = emu.client().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let mut cm = configmap("", json!({}));
    cm.metadata.name = None;
    cm.metadata.generate_name = Some("gen-".into());
    let created = cms.create(&PostParams::default(), &cm).await.unwrap();
    let name = created.metadata.name.unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    cms.create(&dry, &configmap("dry", json!({})))
        .await
        .unwrap();
    assert!(
        cms.get_opt("dry").await.unwrap().is_none(),
        "dryRun=All persists nothing"
    );

    let missing: Api<ConfigMap> = Api::namespaced(client.clone(), "nowhere");
    let err = missing
        .create(&PostParams::default(), &configmap("x", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(s) if s.code == 404 && s.message.contains("namespaces \"nowhere\" not found"))
    );

    // Deleting a namespace takes its objects with it.
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap(),
    )
    .await
    .unwrap();
    let team: Api<ConfigMap> = Api::namespaced(client, "team");
    team.create(&PostParams::default(), &configmap("x", json!({})))
        .await
        .unwrap();
    nss.delete("team", &DeleteParams::default()).await.unwrap();
    assert!(team.get_opt("x").await.unwrap().is_none());
}

#[tokio::test]
async fn delete_collection_removes_only_selected_objects() {
    let emu = common::emulator().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(emu.client().await);
    for (n, l) in [("a", "x"), ("b", "x"), ("c", "y")] {
        cms.create(&PostParams::default(), &configmap(n, json!({"set": l})))
            .await
            .unwrap();
    }
    let out = cms
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("set=x"),
        )
        .await
        .unwrap();
    let deleted = out.left().expect("list of deleted objects");
    assert_eq!(deleted.items.len(), 2);
    let left: Vec<_> = cms.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(left.len(), 1);
}

#[tokio::test]
async fn json_patch_and_server_side_apply_change_objects() {
    let emu = common::emulator().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(emu.client().await);
    let applied = cms
        .patch(
            "ssa",
            &PatchParams::apply("test-manager"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "1"}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["a"], "1");
    let patched = cms
        .patch(
            "ssa",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([{"op": "add", "path": "/data/b", "value": "2"}]))
                    .unwrap(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap().len(), 2);
}

#[tokio::test]
async fn metadata_watcher_gets_partial_object_metadata() {
    let emu = common::emulator().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(emu.client().await);
    cms.create(&PostParams::default(), &configmap("m", json!({"k": "v"})))
        .await
        .unwrap();
    let metas: Api<PartialObjectMeta<ConfigMap>> = Api::default_namespaced(emu.client().await);
    let mut stream = watcher::watcher(metas, watcher::Config::default()).boxed();
    loop {
        match stream.try_next().await.unwrap().unwrap() {
            Event::InitApply(meta) => assert_eq!(meta.metadata.name.as_deref(), Some("m")),
            Event::InitDone => break,
            _ => {}
        }
    }
}

// Authentication: the kubeconfig's bearer token maps to the token file's user.
#[tokio::test]
async fn kubeconfig_token_authenticates_as_the_mapped_user() {
    let emu = common::emulator().await;
    emu.add_token("s3cret", "alice", &["devs"]);
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&emu.kubeconfig_yaml(Some("s3cret"))).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let review: serde_json::Value = client
        .request(
            http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
                .header("content-type", "application/json")
                .body(
                    br#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#
                        .to_vec(),
                )
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(review["status"]["userInfo"]["username"], "alice");
    let bad = kube::config::Kubeconfig::from_yaml(&emu.kubeconfig_yaml(Some("wrong"))).unwrap();
    let bad = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(bad, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(bad);
    let err = cms.list(&ListParams::default()).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 401));
}

/// Secrets: `stringData` is write-only; the server folds it into `data` (base64) on create and update.
#[tokio::test]
async fn secret_string_data_is_folded_into_data() {
    use k8s_openapi::api::core::v1::Secret;
    let emu = common::emulator().await;
    let secrets: Api<Secret> = Api::namespaced(emu.client().await, "default");
    let created = secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "db"},
                "data": {"user": "YWRtaW4="},
                "stringData": {"password": "hunter2"}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    assert!(created.string_data.is_none());
    let data = created.data.unwrap();
    assert_eq!(data["password"].0, b"hunter2");
    assert_eq!(data["user"].0, b"admin");
    let patched = secrets
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"user": "root"}})),
        )
        .await
        .unwrap();
    assert!(patched.string_data.is_none());
    assert_eq!(patched.data.unwrap()["user"].0, b"root");
}
