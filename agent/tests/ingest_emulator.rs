//! Ingestion against an API server: discovery, List+Watch, snapshot epochs and the failure modes
//! that must never delete anything (403, compaction, discovery blinks).
//!
//! The scenarios without faults run on the backend `REVERSER_E2E_BACKEND` names (the real
//! kube-apiserver by default). The fault scenarios (forced compaction with closed watches, a
//! resource forbidden and allowed again at will, an API group hidden from discovery) run on the
//! emulator only: they need its fault injection, which a real API server does not offer.
//!
//! Every wait has a generous upper bound only to turn a hang into a failure; no test asserts
//! on how long something took.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube_emulator::Emulator;
use reverser_agent::canonical;
use reverser_agent::config::Selection;
use reverser_agent::crd::{
    ClusterResourceRule, ClusterWatchRuleSpec, DestinationRef, NamespacedName, ResourceRule,
    ResourceScope, WatchRuleSpec,
};
use reverser_agent::events::{AgentEvent, DestinationDecl};
use reverser_agent::ingest::{self, DiscoveredResource, IngestConfig, IngestHandle, WatchKey};
use reverser_agent::rules::compiled::{CompiledRule, RuleKind};
use serde_json::{Value, json};
use support::cluster::{Backend, TestCluster};
use tokio::sync::{mpsc, watch};

mod support;

const PATIENCE: Duration = Duration::from_secs(60);

const SHOP: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: 'nginx:1.27'}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  replicas: 1
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec: {containers: [{name: api, image: 'api:1'}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: app, namespace: shop, labels: {mirror: 'yes'}}
data: {color: blue}
---
apiVersion: v1
kind: Secret
metadata: {name: db, namespace: shop}
stringData: {password: hunter2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {containers: [{name: web, image: 'nginx:1.27'}]}
---
apiVersion: v1
kind: Event
metadata: {name: web.1, namespace: shop}
involvedObject: {kind: Pod, name: web-1, namespace: shop}
reason: Started
";

/// What a real cluster publishes in every namespace (its controller manager does); the emulator
/// has no controllers, so the tests add it there.
const KUBE_ROOT_CA: &str = "
apiVersion: v1
kind: ConfigMap
metadata: {name: kube-root-ca.crt, namespace: shop}
data: {ca.crt: 'PEM'}
";

/// The backend `REVERSER_E2E_BACKEND` names, with [`SHOP`] applied.
async fn shop() -> TestCluster {
    let cluster = TestCluster::start().await;
    cluster.apply_yaml(SHOP).await;
    if cluster.backend() == Backend::Emulator {
        cluster.apply_yaml(KUBE_ROOT_CA).await;
    } else {
        // The ServiceAccount controller creates `shop`'s `default` a moment after the namespace: wait for it, so a
        // snapshot taken now lists it instead of meeting it later as a live change.
        let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
            kube::Api::namespaced(cluster.client().await, "shop");
        tokio::time::timeout(PATIENCE, async {
            while accounts.get_opt("default").await.ok().flatten().is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the ServiceAccount controller creates shop/default");
    }
    cluster
}

/// The emulator with [`SHOP`], for the scenarios that inject faults.
async fn emulator_shop() -> Emulator {
    let emu = emulator().await;
    emu.apply_yaml(SHOP).await.unwrap();
    emu.apply_yaml(KUBE_ROOT_CA).await.unwrap();
    emu
}

fn decl(key: &str) -> DestinationDecl {
    DestinationDecl {
        key: key.to_owned(),
        repo_url: "file:///srv/git/config.git".into(),
        branch: "main".into(),
        base_folder: format!("clusters/{}", key.replace('/', "-")),
        exclusive_mode: false,
        credentials_reference: None,
        credentials: None,
        encryption: None,
        prune: Default::default(),
        commit_message: None,
        suspend: false,
        placement: Default::default(),
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A ClusterWatchRule over namespaced types: `resources` empty means the desired-state preset.
fn cluster_rule(destination: &str, groups: &[&str], resources: &[&str]) -> CompiledRule {
    CompiledRule {
        id: format!("ClusterWatchRule/{resources:?}"),
        destination: destination.to_owned(),
        kind: RuleKind::Cluster {
            spec: ClusterWatchRuleSpec {
                destination_ref: NamespacedName {
                    name: "prod".into(),
                    namespace: "cfg".into(),
                },
                object_selector: None,
                rules: vec![ClusterResourceRule {
                    operations: vec![],
                    api_groups: strings(groups),
                    api_versions: vec![],
                    resources: strings(resources),
                    scope: ResourceScope::Namespaced,
                    namespace_selector: None,
                }],
                ignore: None,
                exclude_names: vec![],
            },
        },
    }
}

fn selection(rules: Vec<CompiledRule>) -> Selection {
    let mut destinations: Vec<DestinationDecl> =
        rules.iter().map(|r| decl(&r.destination)).collect();
    destinations.dedup();
    Selection {
        destinations,
        rules,
        namespace_labels: Default::default(),
        reconcile_requests: Default::default(),
    }
}

/// A named condition [`Harness::until_each`] waits for.
type Wanted<'a> = (&'a str, &'a dyn Fn(&AgentEvent) -> bool);

struct Harness {
    cluster: TestCluster,
    events: mpsc::Receiver<AgentEvent>,
    handle: IngestHandle,
    _selection: watch::Sender<Arc<Selection>>,
    /// Everything received so far, in order.
    log: Vec<AgentEvent>,
}

async fn emulator() -> Emulator {
    Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator starts")
}

async fn start(cluster: TestCluster, sel: Selection, config: IngestConfig) -> Harness {
    let (tx, rx) = mpsc::channel(64);
    let (sel_tx, sel_rx) = watch::channel(Arc::new(sel));
    let handle = ingest::spawn(cluster.client().await, config, sel_rx, tx);
    Harness {
        cluster,
        events: rx,
        handle,
        _selection: sel_tx,
        log: Vec::new(),
    }
}

impl Harness {
    /// Receives events until one satisfies `pred`; returns the events received meanwhile
    /// (including the match).
    async fn until(&mut self, what: &str, pred: impl Fn(&AgentEvent) -> bool) -> Vec<AgentEvent> {
        let mut got = Vec::new();
        loop {
            let event = tokio::time::timeout(PATIENCE, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no event for {what:?}; received {:#?}", got))
                .expect("ingestion stopped");
            self.log.push(event.clone());
            let done = pred(&event);
            got.push(event);
            if done {
                return got;
            }
        }
    }

    /// Receives events until each of `wanted` has matched some event, in whatever order they come;
    /// returns every event received meanwhile.
    async fn until_each(&mut self, wanted: &[Wanted<'_>]) -> Vec<AgentEvent> {
        let mut got = Vec::new();
        let mut pending: Vec<usize> = (0..wanted.len()).collect();
        while !pending.is_empty() {
            let names: Vec<&str> = pending.iter().map(|&i| wanted[i].0).collect();
            let batch = self
                .until(&names.join(" and "), |e| {
                    pending.iter().any(|&i| (wanted[i].1)(e))
                })
                .await;
            let last = batch.last().expect("until returns the matching event");
            pending.retain(|&i| !(wanted[i].1)(last));
            got.extend(batch);
        }
        got
    }

    /// Receives events until every scope in `resources` (all-namespace scopes) has ended.
    async fn until_ended(&mut self, resources: &[&str]) -> Vec<AgentEvent> {
        let mut got = Vec::new();
        let mut pending: Vec<String> = resources.iter().map(|r| (*r).to_owned()).collect();
        while !pending.is_empty() {
            let batch = self
                .until(&format!("SnapshotEnd for {pending:?}"), |e| {
                    matches!(e, AgentEvent::SnapshotEnd { scope, .. } if pending.contains(&scope.resource))
                })
                .await;
            if let Some(AgentEvent::SnapshotEnd { scope, .. }) = batch.last() {
                pending.retain(|r| *r != scope.resource);
            }
            got.extend(batch);
        }
        got
    }

    /// Everything already queued, without waiting.
    fn drain(&mut self) -> Vec<AgentEvent> {
        let mut got = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            self.log.push(event.clone());
            got.push(event);
        }
        got
    }

    /// Polls the ingestion until `cond` holds (hang-protected).
    async fn wait_for(&self, what: &str, cond: impl Fn(&IngestHandle) -> bool) {
        tokio::time::timeout(PATIENCE, async {
            while !cond(&self.handle) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    /// Triggers discovery and waits until it has run and the watches were reconciled.
    async fn refresh_discovery(&self) {
        let runs = self
            .handle
            .metrics()
            .discovery_runs
            .load(std::sync::atomic::Ordering::Relaxed);
        self.handle.refresh_discovery();
        self.wait_for("a discovery run", |h| {
            h.metrics()
                .discovery_runs
                .load(std::sync::atomic::Ordering::Relaxed)
                > runs
        })
        .await;
        // Reconciliation follows discovery in the same loop turn; one more run makes sure it
        // finished (discovery_runs is bumped before reconciling).
        let runs = runs + 1;
        self.handle.refresh_discovery();
        self.wait_for("a second discovery run", |h| {
            h.metrics()
                .discovery_runs
                .load(std::sync::atomic::Ordering::Relaxed)
                > runs
        })
        .await;
    }

    async fn json(&self, res: &DiscoveredResource, ns: &str, name: &str) -> Value {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.cluster.client().await, ns, &res.api_resource());
        let mut obj = api.get(name).await.expect("object exists");
        obj.types = Some(kube::api::TypeMeta {
            api_version: res.api_version(),
            kind: res.kind.clone(),
        });
        serde_json::to_value(obj).unwrap()
    }
}

fn watched(h: &IngestHandle) -> Vec<String> {
    h.watch_status().keys().map(WatchKey::to_string).collect()
}

fn upsert_paths(events: &[AgentEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Upsert { path, .. } => Some(path.as_str()),
            _ => None,
        })
        .collect()
}

fn is_upsert_of(e: &AgentEvent, want: &str) -> bool {
    matches!(e, AgentEvent::Upsert { path, .. } if path == want)
}

fn mentions(e: &AgentEvent, needle: &str) -> bool {
    match e {
        AgentEvent::Upsert { path, .. } | AgentEvent::Delete { path, .. } => path.contains(needle),
        AgentEvent::SnapshotBegin { scope, .. } | AgentEvent::SnapshotEnd { scope, .. } => {
            scope.resource == needle
        }
        AgentEvent::Destination(_) | AgentEvent::Flush { .. } => false,
    }
}

fn deployments() -> DiscoveredResource {
    DiscoveredResource::new("apps", "v1", "deployments", "Deployment", true)
}

fn configmaps() -> DiscoveredResource {
    DiscoveredResource::new("", "v1", "configmaps", "ConfigMap", true)
}

#[tokio::test]
async fn first_snapshot_mirrors_desired_state_and_skips_runtime_secret_and_generated_objects() {
    let cluster = shop().await;
    let sel = selection(vec![
        cluster_rule("cfg/prod", &[], &[]),
        // Explicitly asking for runtime types does not beat the always-on exclusions.
        cluster_rule("cfg/prod", &[], &["pods", "events", "secrets"]),
    ]);
    let real = cluster.backend() == Backend::Real;
    let mut h = start(cluster, sel, IngestConfig::default()).await;
    let mut ended = vec!["deployments", "services", "configmaps"];
    if real {
        ended.push("serviceaccounts");
    }
    let events = h.until_ended(&ended).await;

    assert_eq!(events[0], AgentEvent::Destination(decl("cfg/prod")));
    // Only the test's namespace: a real cluster has desired state of its own elsewhere (the
    // `kubernetes` Service in `default`, ConfigMaps in `kube-system`).
    let mut paths: Vec<&str> = upsert_paths(&events)
        .into_iter()
        .filter(|p| p.contains("/shop/"))
        .collect();
    paths.sort();
    let mut want = vec![
        "apps/v1/deployments/shop/api.yaml",
        "apps/v1/deployments/shop/web.yaml",
        "core/v1/configmaps/shop/app.yaml",
        "core/v1/services/shop/web.yaml",
    ];
    if h.cluster.backend() == Backend::Real {
        // A real cluster's ServiceAccount controller creates `default` in every namespace. It has
        // no controller ownerReference and ServiceAccounts are desired state (users edit it, e.g.
        // its imagePullSecrets), so it is mirrored. ReplicaSets, Pods, EndpointSlices, Events and
        // `kube-root-ca.crt`, which the real controllers also made, are not.
        want.insert(3, "core/v1/serviceaccounts/shop/default.yaml");
    }
    assert_eq!(paths, want);
    let watches = watched(&h.handle);
    for want in [
        "apps/v1/deployments",
        "core/v1/configmaps",
        "core/v1/services",
    ] {
        assert!(watches.iter().any(|w| w == want), "{want} in {watches:?}");
    }
    for never in ["pods", "events", "secrets", "leases", "endpoints"] {
        assert!(
            !watches.iter().any(|w| w.ends_with(&format!("/{never}"))),
            "{never} watched: {watches:?}"
        );
    }

    // Each upsert sits inside its type's epoch, and carries the canonical YAML.
    let web = "apps/v1/deployments/shop/web.yaml";
    let begin = events
        .iter()
        .position(|e| matches!(e, AgentEvent::SnapshotBegin { scope, .. } if scope.resource == "deployments"))
        .unwrap();
    let upsert = events.iter().position(|e| is_upsert_of(e, web)).unwrap();
    let end = events
        .iter()
        .position(|e| matches!(e, AgentEvent::SnapshotEnd { scope, .. } if scope.resource == "deployments"))
        .unwrap();
    assert!(begin < upsert && upsert < end);
    let (
        AgentEvent::SnapshotBegin {
            epoch: b,
            scope,
            destination,
        },
        AgentEvent::SnapshotEnd { epoch: e, .. },
    ) = (&events[begin], &events[end])
    else {
        unreachable!()
    };
    assert_eq!(b, e);
    assert_eq!(destination, "cfg/prod");
    assert_eq!(
        (
            scope.group.as_str(),
            scope.version.as_str(),
            scope.namespace.as_str()
        ),
        ("apps", "v1", "")
    );
    let AgentEvent::Upsert {
        yaml,
        object,
        created,
        destination,
        ..
    } = &events[upsert]
    else {
        unreachable!()
    };
    let live = h.json(&deployments(), "shop", "web").await;
    assert_eq!(yaml, &canonical::to_canonical_yaml(&live).unwrap());
    assert!(
        yaml.starts_with("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n"),
        "{yaml}"
    );
    assert!(
        yaml.contains("replicas: 2") && !yaml.contains("uid:") && !yaml.contains("resourceVersion")
    );
    assert_eq!(destination, "cfg/prod");
    assert!(*created);
    assert_eq!(
        (object.namespace.as_str(), object.name.as_str()),
        ("shop", "web")
    );
    assert!(!object.uid.is_empty() && !object.resource_version.is_empty());
}

#[tokio::test]
async fn live_changes_become_upserts_and_deletes_but_status_only_updates_send_nothing() {
    let cluster = shop().await;
    let sel = selection(vec![cluster_rule("cfg/prod", &[], &[])]);
    let mut h = start(cluster, sel, IngestConfig::default()).await;
    h.until_ended(&["deployments", "configmaps"]).await;

    // An edit of the data is an update.
    h.cluster.apply_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: app, namespace: shop, labels: {mirror: 'yes'}}\ndata: {color: green}\n",
    )
    .await;
    let got = h
        .until("configmap update", |e| {
            is_upsert_of(e, "core/v1/configmaps/shop/app.yaml")
        })
        .await;
    let Some(AgentEvent::Upsert { yaml, created, .. }) = got.last() else {
        unreachable!()
    };
    assert!(yaml.contains("color: green") && !created, "{yaml}");

    // A status-only write changes the resourceVersion, not the canonical YAML: nothing is sent.
    // The same watch then sees an edit of another Deployment, which must be the next thing
    // it reports.
    let deploys: Api<DynamicObject> = Api::namespaced_with(
        h.cluster.client().await,
        "shop",
        &deployments().api_resource(),
    );
    deploys
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 2, "readyReplicas": 2}})),
        )
        .await
        .unwrap();
    deploys
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    let got = h
        .until("api deployment update", |e| {
            is_upsert_of(e, "apps/v1/deployments/shop/api.yaml")
        })
        .await;
    assert!(
        !got.iter().any(|e| mentions(e, "deployments/shop/web")),
        "status-only update was sent: {got:#?}"
    );

    // Deleting removes the file.
    let cms: Api<DynamicObject> = Api::namespaced_with(
        h.cluster.client().await,
        "shop",
        &configmaps().api_resource(),
    );
    cms.delete("app", &Default::default()).await.unwrap();
    let got = h
        .until("configmap delete", |e| {
            matches!(e, AgentEvent::Delete { .. })
        })
        .await;
    let Some(AgentEvent::Delete {
        path,
        destination,
        object,
        ..
    }) = got.last()
    else {
        unreachable!()
    };
    assert_eq!(
        (path.as_str(), destination.as_str(), object.name.as_str()),
        ("core/v1/configmaps/shop/app.yaml", "cfg/prod", "app")
    );
}

#[tokio::test]
async fn removing_the_selected_label_deletes_and_adding_it_back_upserts() {
    let cluster = shop().await;
    let rule = CompiledRule {
        id: "WatchRule/shop/mirror".into(),
        destination: "shop/mirror".into(),
        kind: RuleKind::Namespaced {
            namespace: "shop".into(),
            spec: WatchRuleSpec {
                destination_ref: DestinationRef {
                    name: "mirror".into(),
                    namespace: None,
                },
                object_selector: Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                        match_labels: Some([("mirror".to_owned(), "yes".to_owned())].into()),
                        ..Default::default()
                    },
                ),
                rules: vec![ResourceRule {
                    resources: strings(&["configmaps"]),
                    ..Default::default()
                }],
                ignore: None,
                exclude_names: vec![],
            },
        },
    };
    let mut h = start(cluster, selection(vec![rule]), IngestConfig::default()).await;
    let first = h.until_ended(&["configmaps"]).await;
    assert_eq!(
        upsert_paths(&first),
        vec!["core/v1/configmaps/shop/app.yaml"]
    );
    assert_eq!(
        watched(&h.handle),
        vec!["core/v1/configmaps in shop"],
        "one namespaced watch"
    );
    let AgentEvent::SnapshotEnd { scope, .. } = first.last().unwrap() else {
        unreachable!()
    };
    assert_eq!(
        scope.namespace, "shop",
        "the snapshot covers only the rule's namespace"
    );

    h.cluster.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: app, namespace: shop}\ndata: {color: blue}\n")
        .await;
    let got = h
        .until("delete after unlabel", |e| {
            matches!(e, AgentEvent::Delete { .. })
        })
        .await;
    let Some(AgentEvent::Delete {
        path, destination, ..
    }) = got.last()
    else {
        unreachable!()
    };
    assert_eq!(
        (path.as_str(), destination.as_str()),
        ("core/v1/configmaps/shop/app.yaml", "shop/mirror")
    );

    h.cluster.apply_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: app, namespace: shop, labels: {mirror: 'yes'}}\ndata: {color: blue}\n",
    )
    .await;
    let got = h
        .until("upsert after relabel", |e| {
            is_upsert_of(e, "core/v1/configmaps/shop/app.yaml")
        })
        .await;
    let Some(AgentEvent::Upsert { created, .. }) = got.last() else {
        unreachable!()
    };
    assert!(*created);
}

#[tokio::test]
async fn a_cluster_rules_object_selector_mirrors_only_labelled_objects_in_every_namespace() {
    let cluster = shop().await;
    cluster
        .apply_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: picked, namespace: other, labels: {mirror: 'yes'}}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: left-out, namespace: other, labels: {mirror: 'no'}}\n",
        )
        .await;
    let mut rule = cluster_rule("cfg/prod", &[""], &["configmaps"]);
    let RuleKind::Cluster { spec } = &mut rule.kind else {
        unreachable!()
    };
    spec.object_selector = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some([("mirror".to_owned(), "yes".to_owned())].into()),
            ..Default::default()
        },
    );
    let mut h = start(cluster, selection(vec![rule]), IngestConfig::default()).await;
    let first = h.until_ended(&["configmaps"]).await;
    let mut mirrored = upsert_paths(&first);
    mirrored.sort();
    assert_eq!(
        mirrored,
        vec![
            "core/v1/configmaps/other/picked.yaml",
            "core/v1/configmaps/shop/app.yaml"
        ],
        "only the labelled ConfigMaps, of every namespace"
    );
    h.cluster.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: app, namespace: shop}\ndata: {color: blue}\n")
        .await;
    let got = h
        .until("delete after unlabel", |e| {
            matches!(e, AgentEvent::Delete { .. })
        })
        .await;
    let Some(AgentEvent::Delete { path, .. }) = got.last() else {
        unreachable!()
    };
    assert_eq!(path, "core/v1/configmaps/shop/app.yaml");
}

#[tokio::test]
async fn forced_compaction_relists_in_a_new_epoch_without_deletes() {
    // No periodic bookmarks: a bookmark after the compaction would move the resume point
    // past it and hide the 410 this test is about.
    // Emulator only: this scenario injects faults (see the file header).
    let emu = Emulator::builder()
        .bookmark_interval(Duration::from_secs(3600))
        .start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    emu.apply_yaml(SHOP).await.unwrap();
    emu.apply_yaml(KUBE_ROOT_CA).await.unwrap();
    let sel = selection(vec![cluster_rule("cfg/prod", &[], &["configmaps"])]);
    let mut h = start(
        TestCluster::Emulator(emu.clone()),
        sel,
        IngestConfig::default(),
    )
    .await;
    let first = h.until_ended(&["configmaps"]).await;
    let Some(AgentEvent::SnapshotEnd {
        epoch: first_epoch, ..
    }) = first.last()
    else {
        unreachable!()
    };
    let first_epoch = *first_epoch;

    emu.faults().compact_history();
    emu.faults().close_watches();
    let second = h.until_ended(&["configmaps"]).await;
    let begin = second
        .iter()
        .find_map(|e| match e {
            AgentEvent::SnapshotBegin { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .expect("a relist opens a new snapshot");
    let Some(AgentEvent::SnapshotEnd { epoch: end, .. }) = second.last() else {
        unreachable!()
    };
    assert!(begin > first_epoch && begin == *end);
    assert_eq!(
        upsert_paths(&second),
        vec!["core/v1/configmaps/shop/app.yaml"],
        "the relist re-sends every object"
    );
    assert!(
        !second
            .iter()
            .any(|e| matches!(e, AgentEvent::Delete { .. }))
    );
    let status = &h.handle.watch_status()[&WatchKey {
        group: "".into(),
        version: "v1".into(),
        resource: "configmaps".into(),
        namespace: "".into(),
    }];
    assert_eq!(status.snapshots_completed, 2);
}

#[tokio::test]
async fn a_forbidden_resource_never_ends_its_snapshot_until_access_returns() {
    // Emulator only: this scenario injects faults (see the file header).
    let emu = emulator_shop().await;
    emu.faults().forbid("configmaps");
    let sel = selection(vec![cluster_rule(
        "cfg/prod",
        &[],
        &["configmaps", "services"],
    )]);
    let mut h = start(
        TestCluster::Emulator(emu.clone()),
        sel,
        IngestConfig::default(),
    )
    .await;
    let cm_key = WatchKey {
        group: "".into(),
        version: "v1".into(),
        resource: "configmaps".into(),
        namespace: "".into(),
    };
    let mut seen = h.until_ended(&["services"]).await;
    h.wait_for("a 403 on configmaps", |h| {
        h.watch_status().get(&cm_key).is_some_and(|s| s.forbidden)
    })
    .await;
    seen.extend(h.drain());
    assert!(
        !seen.iter().any(|e| mentions(e, "configmaps")),
        "a denied list must not open or end a snapshot: {seen:#?}"
    );
    assert!(
        h.handle
            .metrics()
            .watch_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    emu.faults().allow("configmaps");
    let after = h.until_ended(&["configmaps"]).await;
    assert_eq!(
        upsert_paths(&after),
        vec!["core/v1/configmaps/shop/app.yaml"]
    );
}

#[tokio::test]
async fn a_crd_created_at_runtime_is_watched_after_a_discovery_refresh() {
    let cluster = shop().await;
    let sel = selection(vec![cluster_rule("cfg/prod", &["example.com"], &["*"])]);
    let mut h = start(cluster, sel, IngestConfig::default()).await;
    h.wait_for("the first discovery", |h| {
        h.metrics()
            .discovery_runs
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    })
    .await;
    assert!(watched(&h.handle).is_empty());

    h.cluster
        .apply_yaml(
            "
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: w1, namespace: shop}
spec: {size: 3}
",
        )
        .await;
    h.handle.refresh_discovery();
    // The agent may start the watch on its own as soon as the CRD is Established, before the
    // Widget exists: then the snapshot ends empty and the Widget follows as a live upsert.
    let mut got = h.until_ended(&["widgets"]).await;
    if !got
        .iter()
        .any(|e| is_upsert_of(e, "example.com/v1/widgets/shop/w1.yaml"))
    {
        got = h
            .until("the widget's live upsert", |e| {
                is_upsert_of(e, "example.com/v1/widgets/shop/w1.yaml")
            })
            .await;
    }
    let upsert = got
        .iter()
        .find(|e| is_upsert_of(e, "example.com/v1/widgets/shop/w1.yaml"))
        .expect("the widget is mirrored");
    let AgentEvent::Upsert { yaml, .. } = upsert else {
        unreachable!()
    };
    assert!(
        yaml.starts_with("apiVersion: example.com/v1\nkind: Widget\n"),
        "{yaml}"
    );
    assert!(yaml.contains("size: 3"));
}

const WIDGETS_CRD_V1: &str = "
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
";

fn is_end_of(e: &AgentEvent, resource: &str, version: &str) -> bool {
    matches!(e, AgentEvent::SnapshotEnd { scope, .. } if scope.resource == resource && scope.version == version)
}

#[tokio::test]
async fn a_crd_whose_preferred_version_changes_clears_the_old_versions_scope_once_the_new_one_is_listed()
 {
    let cluster = shop().await;
    cluster
        .apply_yaml(&format!(
            "{WIDGETS_CRD_V1}---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {{name: w1, namespace: shop}}\nspec: {{size: 3}}\n"
        ))
        .await;
    let sel = selection(vec![cluster_rule("cfg/prod", &["example.com"], &["*"])]);
    let mut h = start(cluster, sel, IngestConfig::default()).await;
    // On the real server the first LIST may be served from a watch cache that has not seen the
    // Widget yet: then the snapshot ends empty and the Widget follows as a live upsert.
    let first = h
        .until_each(&[
            ("the v1 widget", &|e| {
                is_upsert_of(e, "example.com/v1/widgets/shop/w1.yaml")
            }),
            ("the v1 snapshot end", &|e| is_end_of(e, "widgets", "v1")),
        ])
        .await;
    assert!(
        !first
            .iter()
            .any(|e| matches!(e, AgentEvent::SnapshotBegin { scope, .. } if scope.version != "v1")),
        "only v1 is served: nothing else is cleared"
    );

    // v2 becomes the storage (preferred) version; v1 stays served.
    let both = WIDGETS_CRD_V1.replace("    storage: true\n", "    storage: false\n")
        + "  - name: v2\n    served: true\n    storage: true\n    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}\n";
    h.cluster.apply_yaml(&both).await;
    // Discovery may need a moment to publish v2 as preferred.
    let mut moved = Vec::new();
    for _ in 0..50 {
        h.refresh_discovery().await;
        if watched(&h.handle).contains(&"example.com/v2/widgets".to_owned()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(watched(&h.handle), vec!["example.com/v2/widgets"]);
    moved.extend(
        h.until("the v2 snapshot end", |e| is_end_of(e, "widgets", "v2"))
            .await,
    );
    let sweep = h
        .until("the v1 scope's sweep", |e| is_end_of(e, "widgets", "v1"))
        .await;
    assert!(
        moved
            .iter()
            .any(|e| is_upsert_of(e, "example.com/v2/widgets/shop/w1.yaml")),
        "{moved:#?}"
    );
    // Right after the v2 end: an empty, complete snapshot of the same scope at v1.
    let [
        AgentEvent::SnapshotBegin {
            scope: begin,
            epoch: begun,
            ..
        },
        AgentEvent::SnapshotEnd {
            scope: end,
            epoch: ended,
            ..
        },
    ] = sweep.as_slice()
    else {
        panic!("expected an empty v1 snapshot, got {sweep:#?}");
    };
    assert_eq!((begin, begun), (end, ended));
    assert_eq!(
        (
            begin.group.as_str(),
            begin.version.as_str(),
            begin.resource.as_str(),
            begin.namespace.as_str()
        ),
        ("example.com", "v1", "widgets", "")
    );
}

#[tokio::test]
async fn a_group_blinking_out_of_discovery_keeps_its_watch_during_the_grace_period() {
    // Emulator only: this scenario injects faults (see the file header).
    let emu = emulator_shop().await;
    let sel = selection(vec![cluster_rule("cfg/prod", &["apps"], &["deployments"])]);
    let mut h = start(
        TestCluster::Emulator(emu.clone()),
        sel,
        IngestConfig::default(),
    )
    .await;
    h.until_ended(&["deployments"]).await;

    emu.faults().hide_group("apps", Duration::from_secs(3600));
    h.refresh_discovery().await;
    assert_eq!(watched(&h.handle), vec!["apps/v1/deployments"]);
    emu.faults().unhide_group("apps");
    h.refresh_discovery().await;
    assert_eq!(watched(&h.handle), vec!["apps/v1/deployments"]);
    let later = h.drain();
    assert!(
        later.is_empty(),
        "a blink within the grace period changes nothing: {later:#?}"
    );
}

#[tokio::test]
async fn a_group_gone_from_discovery_past_the_grace_period_stops_its_watch_without_deleting() {
    // Emulator only: this scenario injects faults (see the file header).
    let emu = emulator_shop().await;
    let sel = selection(vec![cluster_rule("cfg/prod", &["apps"], &["deployments"])]);
    let config = IngestConfig {
        vanish_grace: Duration::ZERO,
        ..Default::default()
    };
    let mut h = start(TestCluster::Emulator(emu.clone()), sel, config).await;
    let first = h.until_ended(&["deployments"]).await;

    emu.faults().hide_group("apps", Duration::from_secs(3600));
    h.refresh_discovery().await;
    assert!(
        watched(&h.handle).is_empty(),
        "the vanished type is no longer watched"
    );
    emu.faults().unhide_group("apps");
    h.refresh_discovery().await;
    let second = h.until_ended(&["deployments"]).await;

    let all: Vec<&AgentEvent> = first.iter().chain(&second).collect();
    assert!(
        !all.iter().any(|e| matches!(e, AgentEvent::Delete { .. })),
        "{all:#?}"
    );
    let mut paths = upsert_paths(&second);
    paths.sort();
    assert_eq!(
        paths,
        vec![
            "apps/v1/deployments/shop/api.yaml",
            "apps/v1/deployments/shop/web.yaml"
        ],
        "the returning type is relisted in a new snapshot"
    );
}

#[tokio::test]
async fn with_one_list_permit_every_type_lists_in_turn_and_a_failing_list_blocks_nobody() {
    // Emulator only: this scenario injects faults (see the file header).
    let emu = emulator_shop().await;
    // configmaps keeps failing: its list must give the only permit back while it backs off.
    emu.faults().forbid("configmaps");
    let sel = selection(vec![cluster_rule(
        "cfg/prod",
        &[],
        &["configmaps", "services", "deployments"],
    )]);
    let permits = ingest::ListPermits::new(1);
    let config = IngestConfig {
        list_permits: permits.clone(),
        request_rate: ingest::RequestRate {
            qps: 50.0,
            burst: 2,
        },
        ..IngestConfig::default()
    };
    let mut h = start(TestCluster::Emulator(emu.clone()), sel, config).await;
    let seen = h.until_ended(&["services", "deployments"]).await;
    assert!(!seen.iter().any(|e| mentions(e, "configmaps")), "{seen:#?}");

    emu.faults().allow("configmaps");
    let after = h.until_ended(&["configmaps"]).await;
    assert_eq!(
        upsert_paths(&after),
        vec!["core/v1/configmaps/shop/app.yaml"]
    );
    assert_eq!(permits.in_flight(), 0, "every list gave its permit back");
}

#[tokio::test]
async fn restarting_the_snapshots_relists_every_scope_in_a_new_epoch_without_a_new_discovery() {
    let cluster = shop().await;
    let sel = selection(vec![cluster_rule("cfg/prod", &[], &["configmaps"])]);
    let mut h = start(cluster, sel, IngestConfig::default()).await;
    let first = h.until_ended(&["configmaps"]).await;
    assert!(
        first
            .iter()
            .any(|e| matches!(e, AgentEvent::Destination(d) if d.key == "cfg/prod"))
    );
    let first_epoch = first
        .iter()
        .find_map(|e| match e {
            AgentEvent::SnapshotEnd { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .expect("the first list ends its snapshot");
    let runs = h
        .handle
        .metrics()
        .discovery_runs
        .load(std::sync::atomic::Ordering::Relaxed);

    h.handle.restart_snapshots();
    let second = h.until_ended(&["configmaps"]).await;
    assert!(
        second
            .iter()
            .any(|e| matches!(e, AgentEvent::Destination(d) if d.key == "cfg/prod")),
        "every destination is declared again: {second:#?}"
    );
    let begin = second
        .iter()
        .find_map(|e| match e {
            AgentEvent::SnapshotBegin { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .expect("the relist opens a new snapshot");
    assert!(begin > first_epoch, "{begin} after {first_epoch}");
    assert!(
        upsert_paths(&second).contains(&"core/v1/configmaps/shop/app.yaml"),
        "the relist re-sends every object: {second:#?}"
    );
    assert!(
        !second
            .iter()
            .any(|e| matches!(e, AgentEvent::Delete { .. }))
    );
    assert_eq!(
        h.handle
            .metrics()
            .discovery_runs
            .load(std::sync::atomic::Ordering::Relaxed),
        runs,
        "the discovered types are kept: no new discovery"
    );
}

/// A `WatchRule` in `namespace` selecting configmaps for `destination`.
fn namespaced_configmaps_rule(namespace: &str, destination: &str) -> CompiledRule {
    CompiledRule {
        id: format!("WatchRule/{namespace}/configs"),
        destination: destination.to_owned(),
        kind: RuleKind::Namespaced {
            namespace: namespace.to_owned(),
            spec: WatchRuleSpec {
                destination_ref: DestinationRef {
                    name: "prod".into(),
                    namespace: None,
                },
                object_selector: None,
                rules: vec![ResourceRule {
                    resources: strings(&["configmaps"]),
                    ..Default::default()
                }],
                ignore: None,
                exclude_names: vec![],
            },
        },
    }
}

/// Namespaces `team-0`..`team-{n-1}`, each with a ConfigMap `app`.
fn teams_yaml(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: team-{i}}}\n---\napiVersion: v1\n\
                 kind: ConfigMap\nmetadata: {{name: app, namespace: team-{i}}}\ndata: {{v: '0'}}\n"
            )
        })
        .collect()
}

/// WatchRules for configmaps in `team-0`..`team-{n-1}`, all to one destination, with `threshold` as
/// --max-namespaced-watches-per-type.
fn team_rules(n: usize, threshold: usize) -> (Selection, IngestConfig) {
    let rules = (0..n)
        .map(|i| namespaced_configmaps_rule(&format!("team-{i}"), "cfg/prod"))
        .collect();
    let mut config = IngestConfig::default();
    config.discovery.max_namespaced_watches_per_type = threshold;
    (selection(rules), config)
}

/// Receives events until a SnapshotEnd of configmaps came for each of `namespaces`.
async fn until_namespaces_ended(h: &mut Harness, namespaces: &[String]) -> Vec<AgentEvent> {
    let mut got = Vec::new();
    let mut pending: Vec<String> = namespaces.to_vec();
    while !pending.is_empty() {
        let batch = h
            .until(&format!("SnapshotEnd of configmaps in {pending:?}"), |e| {
                matches!(e, AgentEvent::SnapshotEnd { scope, .. }
                    if scope.resource == "configmaps" && pending.contains(&scope.namespace))
            })
            .await;
        if let Some(AgentEvent::SnapshotEnd { scope, .. }) = batch.last() {
            pending.retain(|ns| *ns != scope.namespace);
        }
        got.extend(batch);
    }
    got
}

#[tokio::test]
async fn watch_rules_in_more_namespaces_than_the_threshold_share_one_cluster_wide_watch() {
    // Emulator only: it counts the requests the agent makes.
    let emu = emulator().await;
    emu.apply_yaml(&teams_yaml(6)).await.unwrap();
    // Rules in 4 of the 6 namespaces, threshold 2: one cluster-wide watch instead of four.
    let (sel, config) = team_rules(4, 2);
    let selected: Vec<String> = (0..4).map(|i| format!("team-{i}")).collect();
    emu.reset_requests();
    let mut h = start(TestCluster::Emulator(emu.clone()), sel, config).await;
    let seed = until_namespaces_ended(&mut h, &selected).await;

    assert_eq!(watched(&h.handle), vec!["core/v1/configmaps"]);
    let requests = emu.requests();
    let (all, one) = requests.scoped("watch", "configmaps");
    let (list_all, list_one) = requests.scoped("list", "configmaps");
    assert_eq!(
        (all + list_all, one + list_one),
        (1, 0),
        "one list+watch across all namespaces, none per namespace: {requests:#?}"
    );
    let mut paths = upsert_paths(&seed);
    paths.sort();
    assert_eq!(
        paths,
        vec![
            "core/v1/configmaps/team-0/app.yaml",
            "core/v1/configmaps/team-1/app.yaml",
            "core/v1/configmaps/team-2/app.yaml",
            "core/v1/configmaps/team-3/app.yaml",
        ]
    );
    // Snapshots open and close exactly the rules' namespaces (sweeps stay scoped).
    let mut scopes: Vec<(&str, &str)> = seed
        .iter()
        .filter_map(|e| match e {
            AgentEvent::SnapshotBegin { scope, .. } => Some(("begin", scope.namespace.as_str())),
            AgentEvent::SnapshotEnd { scope, .. } => Some(("end", scope.namespace.as_str())),
            _ => None,
        })
        .collect();
    scopes.sort();
    assert_eq!(
        scopes,
        vec![
            ("begin", "team-0"),
            ("begin", "team-1"),
            ("begin", "team-2"),
            ("begin", "team-3"),
            ("end", "team-0"),
            ("end", "team-1"),
            ("end", "team-2"),
            ("end", "team-3"),
        ]
    );

    // A change and a delete in a namespace without a rule send nothing; the change in team-0 after them (the
    // same watch stream, in resourceVersion order) shows they were seen and dropped.
    let client = emu.client().await;
    let other: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "team-5");
    other
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"v": "1"}})),
        )
        .await
        .unwrap();
    other.delete("app", &Default::default()).await.unwrap();
    let team0: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client, "team-0");
    team0
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"v": "1"}})),
        )
        .await
        .unwrap();
    let after = h
        .until("the change in team-0", |e| {
            is_upsert_of(e, "core/v1/configmaps/team-0/app.yaml")
        })
        .await;
    assert_eq!(
        upsert_paths(&after),
        vec!["core/v1/configmaps/team-0/app.yaml"],
        "{after:#?}"
    );
    assert!(
        !after.iter().any(|e| mentions(e, "team-5")),
        "nothing about a namespace without a rule: {after:#?}"
    );
}

#[tokio::test]
async fn a_forbidden_cluster_wide_list_falls_back_to_one_watch_per_rule_namespace() {
    // Emulator only: namespaced RBAC is its fault injection.
    let emu = emulator().await;
    emu.apply_yaml(&teams_yaml(4)).await.unwrap();
    emu.faults().forbid_in_all_namespaces("configmaps");
    let (sel, config) = team_rules(3, 2);
    let selected: Vec<String> = (0..3).map(|i| format!("team-{i}")).collect();
    emu.reset_requests();
    let mut h = start(TestCluster::Emulator(emu.clone()), sel, config).await;
    let seed = until_namespaces_ended(&mut h, &selected).await;

    assert_eq!(
        watched(&h.handle),
        vec![
            "core/v1/configmaps in team-0",
            "core/v1/configmaps in team-1",
            "core/v1/configmaps in team-2",
        ]
    );
    let requests = emu.requests();
    let (all, one) = requests.scoped("watch", "configmaps");
    let (list_all, list_one) = requests.scoped("list", "configmaps");
    assert!(
        all + list_all >= 1 && one + list_one >= 3,
        "a refused cluster-wide attempt, then one per namespace: {requests:#?}"
    );
    let mut paths = upsert_paths(&seed);
    paths.sort();
    assert_eq!(
        paths,
        vec![
            "core/v1/configmaps/team-0/app.yaml",
            "core/v1/configmaps/team-1/app.yaml",
            "core/v1/configmaps/team-2/app.yaml",
        ]
    );
    assert!(!seed.iter().any(|e| mentions(e, "team-3")), "{seed:#?}");
}
