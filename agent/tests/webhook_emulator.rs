//! End to end with an API server: it calls the webhook over HTTPS (trusting only
//! the `caBundle` of the registered `ValidatingWebhookConfiguration`) for writes made by real
//! kube-rs clients as different users; a watch on the same objects is fed to the store the way
//! ingestion will feed it, and every change must come out with the right author.
//!
//! Runs on the backend `REVERSER_E2E_BACKEND` names (the real kube-apiserver by default). A real
//! API server applies a new or removed webhook configuration through its own informer, so it may
//! take effect a moment later; after registering or removing it the tests probe with dry-run
//! writes until the webhook is (or is no longer) called. The emulator applies it to the very
//! next request.
//!
//! Waits are bounded only to turn a hang into a failure; nothing asserts on durations.

mod support;
mod webhook_support;

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    TypeMeta, WatchEvent, WatchParams,
};
use reverser_agent::attribution::ObjectKey;
use reverser_agent::canonical;
use reverser_agent::rules::ResourceKey;
use reverser_agent::webhook::registration::{
    Registration, Target, validating_webhook_configuration,
};
use reverser_agent::webhook::{FactStore, Operation};
use serde_json::json;
use support::cluster::TestCluster;
use webhook_support::{PATIENCE, Server};

/// The impersonated users (group `devs`) and the token users (`bob`, group `developers`) may write
/// ConfigMaps in `default`: a real API server authorizes them (RBAC); the emulator allows all.
const RBAC: &str = "
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: configmap-writer, namespace: default}
rules: [{apiGroups: [''], resources: [configmaps], verbs: ['*']}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: users-write-configmaps, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-writer}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: devs}
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: developers}
";

async fn cluster() -> TestCluster {
    let cluster = TestCluster::start().await;
    cluster.apply_yaml(RBAC).await;
    cluster
}

/// A client that impersonates `user` (the `Impersonate-User`/`-Group` headers).
async fn impersonating(cluster: &TestCluster, user: &str, groups: &[&str]) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&cluster.kubeconfig_yaml(None)).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.default_namespace = "default".into();
    config.auth_info.impersonate = Some(user.to_owned());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    kube::Client::try_from(config).unwrap()
}

/// A dry-run create by the admin; it leaves no fact.
async fn probe(admin: &kube::Client) {
    configmaps(admin)
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &cm("probe", "v1"),
        )
        .await
        .unwrap();
}

/// Probes until the webhook sees a write; returns how many dry runs it saw meanwhile.
async fn until_called(admin: &kube::Client, server: &Server) -> u64 {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        probe(admin).await;
        let seen = server.store.metrics().requests_with("dry_run");
        if seen > 0 {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API server never called the registered webhook"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Probes until a write passes without the webhook seeing it.
async fn until_not_called(admin: &kube::Client, server: &Server) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let before = server.store.metrics().requests_with("dry_run");
        probe(admin).await;
        if server.store.metrics().requests_with("dry_run") == before {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API server kept calling the removed webhook"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn register(admin: &kube::Client, server: &Server) {
    let registration = Registration::new(
        "gitops-reverser-attribution",
        Target::Url(format!("https://{}", server.addr())),
        server.pki.ca_pem.clone().into_bytes(),
    );
    let vwc = validating_webhook_configuration(
        &registration,
        &[ResourceKey::new("", "v1", "configmaps", true)],
    );
    Api::<ValidatingWebhookConfiguration>::all(admin.clone())
        .create(&PostParams::default(), &vwc)
        .await
        .unwrap();
}

fn configmaps(client: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::erase::<ConfigMap>(&()),
    )
}

/// Opens a watch on ConfigMaps of `default` from now on.
async fn watch_from_now(
    admin: &kube::Client,
) -> futures::stream::BoxStream<'static, WatchEvent<DynamicObject>> {
    let api = configmaps(admin);
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    api.watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .boxed()
}

/// What ingestion does with one watch event: render the object as the watcher decoded it,
/// hash it, and ask the store for its author. Returns (type, name, author).
fn attribute(
    store: &FactStore,
    event: WatchEvent<DynamicObject>,
) -> (String, String, Option<String>) {
    let (kind, mut obj) = match event {
        WatchEvent::Added(o) => ("ADDED", o),
        WatchEvent::Modified(o) => ("MODIFIED", o),
        WatchEvent::Deleted(o) => ("DELETED", o),
        other => panic!("unexpected watch event {other:?}"),
    };
    obj.types = Some(TypeMeta {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
    });
    let name = obj.metadata.name.clone().unwrap();
    let uid = obj.metadata.uid.clone().unwrap();
    let key = ObjectKey::new("", "configmaps", "default", &name);
    let author = if kind == "DELETED" {
        store.attribute_delete(&key, &uid)
    } else {
        let yaml = canonical::to_canonical_yaml(&serde_json::to_value(&obj).unwrap()).unwrap();
        store.attribute_upsert(&key, Some(&uid), &canonical::content_hash(&yaml))
    };
    (kind.to_owned(), name, author)
}

async fn next_change(
    events: &mut futures::stream::BoxStream<'static, WatchEvent<DynamicObject>>,
) -> WatchEvent<DynamicObject> {
    loop {
        let event = tokio::time::timeout(PATIENCE, events.next())
            .await
            .expect("a watch event in time")
            .expect("the watch stays open");
        if !matches!(event, WatchEvent::Bookmark(_)) {
            return event;
        }
    }
}

fn cm(name: &str, value: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"team": "shop"}},
        "data": {"key": value}
    }))
    .unwrap()
}

#[tokio::test]
async fn attributes_create_and_update_to_alice_and_delete_to_bob() {
    let server = Server::start(|_| {}).await;
    let cluster = cluster().await;
    let admin = cluster.client().await;
    register(&admin, &server).await;
    let probes = until_called(&admin, &server).await;
    let mut events = watch_from_now(&admin).await;

    let alice = configmaps(&impersonating(&cluster, "alice", &["devs"]).await);
    let bob = configmaps(&cluster.client_for(Some("bob")).await);

    let created = alice
        .create(&PostParams::default(), &cm("settings", "v1"))
        .await
        .unwrap();
    // A dry run is admitted too, but must leave no fact (and the emulator persists nothing).
    let mut dry = created.clone();
    dry.data["data"]["key"] = json!("dry");
    alice
        .replace(
            "settings",
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &dry,
        )
        .await
        .unwrap();
    alice
        .patch(
            "settings",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"key": "v2"}})),
        )
        .await
        .unwrap();

    // The webhook answered before each write was committed: the facts are here already.
    let facts = server.store.snapshot();
    assert_eq!(facts.len(), 2, "{facts:?}");
    assert!(facts.iter().all(|f| f.username == "alice"));
    assert!(
        facts[0].groups.iter().any(|g| g == "devs"),
        "{:?}",
        facts[0].groups
    );
    assert_eq!(facts[0].operation, Operation::Create);
    assert_eq!(facts[0].uid, created.metadata.uid);
    assert_eq!(server.store.metrics().requests_with("dry_run"), probes + 1);

    bob.delete("settings", &DeleteParams::default())
        .await
        .unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(attribute(&server.store, next_change(&mut events).await));
    }
    assert_eq!(
        seen,
        [
            ("ADDED".into(), "settings".into(), Some("alice".into())),
            ("MODIFIED".into(), "settings".into(), Some("alice".into())),
            ("DELETED".into(), "settings".into(), Some("bob".into())),
        ]
    );
    assert!(server.store.is_empty());
    let metrics = server.store.metrics();
    assert_eq!(metrics.facts.get(), 3);
    assert_eq!(metrics.matches.get(), 3);
    assert_eq!(metrics.unmatched.get(), 0);
    cluster.shutdown().await;
}

#[tokio::test]
async fn attributes_each_object_of_a_deletecollection_and_leaves_unknown_writers_to_the_bot() {
    let server = Server::start(|_| {}).await;
    let cluster = cluster().await;
    let admin = cluster.client().await;
    // Written before the webhook exists: nobody is known for these.
    for name in ["a", "b"] {
        configmaps(&admin)
            .create(&PostParams::default(), &cm(name, "v1"))
            .await
            .unwrap();
    }
    register(&admin, &server).await;
    until_called(&admin, &server).await;
    let mut events = watch_from_now(&admin).await;

    let bob = configmaps(&cluster.client_for(Some("bob")).await);
    bob.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("team=shop"),
    )
    .await
    .unwrap();

    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(attribute(&server.store, next_change(&mut events).await));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("DELETED".into(), "a".into(), Some("bob".into())),
            ("DELETED".into(), "b".into(), Some("bob".into())),
        ]
    );

    // A change that bypassed the webhook (its configuration removed) has no fact: the bot.
    Api::<ValidatingWebhookConfiguration>::all(admin.clone())
        .delete("gitops-reverser-attribution", &DeleteParams::default())
        .await
        .unwrap();
    until_not_called(&admin, &server).await;
    configmaps(&admin)
        .create(&PostParams::default(), &cm("c", "v1"))
        .await
        .unwrap();
    assert_eq!(
        attribute(&server.store, next_change(&mut events).await),
        ("ADDED".into(), "c".into(), None)
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn writes_go_through_while_the_webhook_is_down_and_stay_with_the_bot() {
    let server = Server::start(|_| {}).await;
    let cluster = cluster().await;
    let admin = cluster.client().await;
    register(&admin, &server).await;
    until_called(&admin, &server).await;
    let mut events = watch_from_now(&admin).await;
    let Server {
        handle,
        store,
        pki: _pki,
    } = server;
    handle.shutdown().await;

    // failurePolicy: Ignore — attribution never blocks the cluster.
    let alice = configmaps(&impersonating(&cluster, "alice", &["devs"]).await);
    alice
        .create(&PostParams::default(), &cm("settings", "v1"))
        .await
        .unwrap();
    assert_eq!(
        attribute(&store, next_change(&mut events).await),
        ("ADDED".into(), "settings".into(), None)
    );
    let listed: Vec<_> = configmaps(&admin)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|o| o.metadata.name.unwrap())
        .collect();
    assert!(listed.contains(&"settings".to_owned()));
    cluster.shutdown().await;
}
