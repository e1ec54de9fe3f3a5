//! End to end, as users run it: the `reverser-agent` binary (a child process, flags only) against
//! an API server (the real kube-apiserver v1.37.2 by default, or the in-process kube-emulator with
//! `REVERSER_E2E_BACKEND=emulator`; see `support/cluster.rs`) streaming to the real writer
//! (in-process, real gRPC) that pushes to a bare Git repository over `file://`.
//!
//! ```text
//! test ──apply/patch/delete──▶ API server ◀──List+Watch── reverser-agent ──gRPC──▶ writer ──push──▶ BareRepo
//!   ▲                                                            │ /metrics                              │
//!   └──────────────── asserts on files, commits, conditions, Lease, Pod labels ◀─────────────────────────┘
//! ```
//!
//! With `--webhook-addr` the agent also serves the attribution webhook, which the API server calls
//! (over TLS, trusting the registered `caBundle`) for writes made by impersonated users.
//!
//! Every wait has a generous upper bound only to turn a hang into a failure; no test asserts on
//! how long something took.

use std::process::Stdio;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use testkit::BareRepo;
use tokio::process::Command;

mod support;
mod webhook_support;

use support::cluster::TestCluster;
use support::world::{self, Agent, KubeconfigFile, start_writer};

use support::{
    condition, configbutler_object, free_port, metric, wait, wait_async, wait_for_condition,
};

const BRANCH: &str = "main";
const BASE: &str = "clusters/prod";

/// The cluster users have: namespaces, workloads, config, RBAC, and noise that must not land.
const CLUSTER: &str = "
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
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: app, namespace: shop}
data: {color: blue}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: flags, namespace: shop}
data: {beta: 'on'}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: shop-reader}
rules: [{apiGroups: [''], resources: [configmaps], verbs: [get, list]}]
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

/// The agent's own configuration: one repo, one destination, a WatchRule for `shop` and a
/// ClusterWatchRule for cluster-scoped RBAC.
fn config(repo_url: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: gitops-reverser}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitRepoConfig
metadata: {{name: repo, namespace: gitops-reverser}}
spec:
  repoUrl: '{repo_url}'
  allowedBranches: [{BRANCH}]
  accessPolicy: {{allowClusterRules: true, namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: prod, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: {BRANCH}
  baseFolder: {BASE}
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {{name: shop, namespace: shop}}
spec:
  destinationRef: {{name: prod, namespace: gitops-reverser}}
  rules: [{{}}]
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: rbac}}
spec:
  destinationRef: {{name: prod, namespace: gitops-reverser}}
  rules: [{{scope: Cluster, apiGroups: [rbac.authorization.k8s.io], resources: [clusterroles]}}]
"
    )
}

const DEPLOYMENT: &str = "clusters/prod/apps/v1/deployments/shop/web.yaml";
const SERVICE: &str = "clusters/prod/core/v1/services/shop/web.yaml";
const CONFIGMAP_APP: &str = "clusters/prod/core/v1/configmaps/shop/app.yaml";
const CONFIGMAP_FLAGS: &str = "clusters/prod/core/v1/configmaps/shop/flags.yaml";
const CLUSTERROLE: &str =
    "clusters/prod/rbac.authorization.k8s.io/v1/clusterroles/shop-reader.yaml";

struct World {
    cluster: TestCluster,
    repo: BareRepo,
    writer: Option<reverser_writer::RunningWriter>,
    /// Work dirs of the writers started so far.
    writer_dirs: Vec<tempfile::TempDir>,
    kubeconfig: KubeconfigFile,
}

impl World {
    async fn start() -> World {
        world::init();
        let cluster = TestCluster::start().await;
        cluster.apply_dir(&world::crds_dir()).await;
        cluster.apply_yaml(CLUSTER).await;
        let repo = BareRepo::new();
        cluster.apply_yaml(&config(&repo.file_url())).await;

        let writer_dir = tempfile::tempdir().unwrap();
        let writer = start_writer("127.0.0.1:0", writer_dir.path(), &[]).await;
        let kubeconfig = KubeconfigFile::write(&cluster, None);
        World {
            cluster,
            repo,
            writer: Some(writer),
            writer_dirs: vec![writer_dir],
            kubeconfig,
        }
    }

    /// Stops the writer (the agent loses its stream) and returns its gRPC address.
    async fn stop_writer(&mut self) -> std::net::SocketAddr {
        let writer = self.writer.take().expect("a running writer");
        let addr = writer.grpc_addr;
        writer.stop().await.expect("the writer stops cleanly");
        addr
    }

    /// Starts a new writer (fresh work dir) on `addr`, where the agent reconnects.
    async fn restart_writer(&mut self, addr: std::net::SocketAddr) {
        let dir = tempfile::tempdir().unwrap();
        self.writer = Some(start_writer(&addr.to_string(), dir.path(), &[]).await);
        self.writer_dirs.push(dir);
    }

    fn writer_url(&self) -> String {
        format!("http://{}", self.writer.as_ref().unwrap().grpc_addr)
    }

    /// Starts the agent binary; `extra` are more flags, `env` more environment.
    fn agent(&self, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = Agent::command(&self.writer_url(), &self.kubeconfig.path, &admin);
        cmd.args(["--cluster-name", "e2e"])
            // Short Lease timings keep failover tests quick; the logic is the same.
            .args([
                "--leader-election-lease-sec",
                "3",
                "--leader-election-renew-sec",
                "1",
            ])
            .args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Agent::spawn(&mut cmd, &admin)
    }

    async fn wait_for_file(&self, path: &str, contains: &str) -> String {
        wait(&format!("{path} containing {contains:?}"), || {
            self.repo
                .read(BRANCH, path)
                .filter(|text| text.contains(contains))
        })
        .await
    }

    async fn wait_until_gone(&self, path: &str) {
        wait(&format!("{path} to be removed"), || {
            (self.repo.rev_parse(BRANCH).is_some() && self.repo.read(BRANCH, path).is_none())
                .then_some(())
        })
        .await
    }

    fn files(&self) -> Vec<String> {
        self.repo.ls_tree(BRANCH)
    }

    async fn stop(mut self) {
        if let Some(w) = self.writer.take() {
            w.stop().await.unwrap();
        }
        self.cluster.shutdown().await;
        drop(self.writer_dirs);
    }
}

/// `(status, reason)` of the `Ready` condition of a configbutler object.
async fn ready_condition(
    client: &kube::Client,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
) -> Option<(String, String, i64)> {
    let obj = configbutler_object(client, kind, namespace, name).await?;
    let conditions = obj.data.pointer("/status/conditions")?.as_array()?.clone();
    let ready = conditions.iter().find(|c| c["type"] == "Ready")?;
    Some((
        ready["status"].as_str()?.to_owned(),
        ready["reason"].as_str()?.to_owned(),
        ready["observedGeneration"].as_i64().unwrap_or(-1),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_a_cluster_into_git_and_follows_updates_and_deletes() {
    let world = World::start().await;
    let agent = world.agent(&["--controller-namespace", "gitops-reverser"], &[]);

    for path in [
        DEPLOYMENT,
        SERVICE,
        CONFIGMAP_APP,
        CONFIGMAP_FLAGS,
        CLUSTERROLE,
    ] {
        world.wait_for_file(path, "metadata").await;
    }
    agent.settle().await;
    let files = world.files();
    assert!(
        !files
            .iter()
            .any(|f| f.contains("/pods/") || f.contains("/events/")),
        "Pods and Events are not desired state: {files:#?}"
    );
    let deployment = world.repo.read(BRANCH, DEPLOYMENT).unwrap();
    assert!(
        deployment.starts_with("apiVersion: apps/v1\nkind: Deployment\nmetadata:"),
        "{deployment}"
    );
    assert!(
        !deployment.contains("uid:") && !deployment.contains("resourceVersion"),
        "{deployment}"
    );
    let flags = world.repo.read(BRANCH, CONFIGMAP_FLAGS).unwrap();
    assert!(
        flags.contains("beta: 'on'") || flags.contains("beta: \"on\""),
        "on stays a string: {flags}"
    );
    let commits_after_snapshot = world.repo.commit_count(BRANCH);

    // An update lands as a new commit.
    let client = world.cluster.client().await;
    let deployments: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "shop",
        &ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment")),
    );
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    world.wait_for_file(DEPLOYMENT, "replicas: 5").await;
    assert!(world.repo.commit_count(BRANCH) > commits_after_snapshot);
    assert!(
        world
            .repo
            .tip_message(BRANCH)
            .contains("apps/v1/deployments/shop/web"),
        "{}",
        world.repo.tip_message(BRANCH)
    );

    // A delete lands as a commit removing the file.
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    configmaps
        .delete("app", &DeleteParams::default())
        .await
        .unwrap();
    world.wait_until_gone(CONFIGMAP_APP).await;
    assert!(
        world.repo.read(BRANCH, CONFIGMAP_FLAGS).is_some(),
        "other files stay"
    );

    // Pods and Events created later are not mirrored either.
    world
        .cluster
        .apply_yaml(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: late, namespace: shop}\ndata: {a: b}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-2, namespace: shop}\nspec: {containers: [{name: web, image: x}]}\n",
        )
        .await;
    world
        .wait_for_file("clusters/prod/core/v1/configmaps/shop/late.yaml", "a: b")
        .await;
    assert!(!world.files().iter().any(|f| f.contains("/pods/")));

    agent.terminate().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_over_an_unchanged_cluster_commits_nothing_and_removes_what_was_deleted_meanwhile()
 {
    let world = World::start().await;
    let flags = ["--controller-namespace", "gitops-reverser"];
    let agent = world.agent(&flags, &[]);
    world.wait_for_file(CLUSTERROLE, "shop-reader").await;
    world.wait_for_file(CONFIGMAP_FLAGS, "beta").await;
    agent.settle().await;
    agent.terminate().await;
    let commits = world.repo.commit_count(BRANCH);
    let tip = world.repo.rev_parse(BRANCH);

    // Same cluster: the full re-snapshot is a no-op for the writer.
    let again = world.agent(&flags, &[]);
    again.settle().await;
    assert_eq!(
        world.repo.rev_parse(BRANCH),
        tip,
        "no commit for an unchanged cluster"
    );
    assert_eq!(world.repo.commit_count(BRANCH), commits);
    again.terminate().await;

    // Deleted while no agent ran: no watch saw it, the next snapshot finds the orphan.
    let client = world.cluster.client().await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client, "shop");
    configmaps
        .delete("flags", &DeleteParams::default())
        .await
        .unwrap();
    let third = world.agent(&flags, &[]);
    world.wait_until_gone(CONFIGMAP_FLAGS).await;
    assert!(
        world.repo.read(BRANCH, CONFIGMAP_APP).is_some(),
        "only the orphan goes"
    );
    assert!(
        world.repo.read(BRANCH, DEPLOYMENT).is_some(),
        "only the orphan goes"
    );
    third.terminate().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_custom_resources_get_ready_false_and_valid_ones_keep_mirroring() {
    let world = World::start().await;
    world
        .cluster
        .apply_yaml(
            "
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {name: feature, namespace: gitops-reverser}
spec:
  repoRef: {namespace: gitops-reverser, name: repo}
  branch: feature
  baseFolder: clusters/feature
  accessPolicy: {namespacedRules: {mode: AllNamespaces}}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: to-feature, namespace: shop}
spec:
  destinationRef: {name: feature, namespace: gitops-reverser}
  rules: [{}]
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: ghost, namespace: shop}
spec:
  destinationRef: {name: nowhere}
  rules: [{}]
",
        )
        .await;
    let mut agent = world.agent(&["--controller-namespace", "gitops-reverser"], &[]);
    let client = world.cluster.client().await;
    let expect = [
        (
            "GitDestination",
            Some("gitops-reverser"),
            "feature",
            "False",
            "BranchNotAllowed",
        ),
        (
            "WatchRule",
            Some("shop"),
            "to-feature",
            "False",
            "BranchNotAllowed",
        ),
        (
            "WatchRule",
            Some("shop"),
            "ghost",
            "False",
            "DestinationNotFound",
        ),
        (
            "GitDestination",
            Some("gitops-reverser"),
            "prod",
            "True",
            "Ready",
        ),
        ("WatchRule", Some("shop"), "shop", "True", "Ready"),
        ("ClusterWatchRule", None, "rbac", "True", "Ready"),
    ];
    for (kind, ns, name, status, reason) in expect {
        let got = wait_async(&format!("{kind} {name} Ready={status}"), || {
            let client = client.clone();
            async move {
                ready_condition(&client, kind, ns, name)
                    .await
                    .filter(|(s, r, _)| s == status && r == reason)
            }
        })
        .await;
        assert_eq!(got.2, 1, "observedGeneration of {kind} {name}");
    }
    world.wait_for_file(DEPLOYMENT, "web").await;
    assert!(
        !world
            .files()
            .iter()
            .any(|f| f.starts_with("clusters/feature")),
        "nothing reaches a destination that is not Ready"
    );

    // Fixing the repo's allowed branches makes the destination usable, and the status follows.
    let repos: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "gitops-reverser",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("configbutler.ai", "v1alpha1", "GitRepoConfig"),
            "gitrepoconfigs",
        ),
    );
    repos
        .patch(
            "repo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"allowedBranches": ["main", "feature"]}})),
        )
        .await
        .unwrap();
    wait_async("the feature destination to become Ready", || {
        let client = client.clone();
        async move {
            ready_condition(
                &client,
                "GitDestination",
                Some("gitops-reverser"),
                "feature",
            )
            .await
            .filter(|(s, _, _)| s == "True")
        }
    })
    .await;
    wait("the feature branch to be written", || {
        world
            .repo
            .branches()
            .iter()
            .any(|b| b == "feature")
            .then_some(())
    })
    .await;
    assert!(
        agent.is_running(),
        "invalid configuration never stops the agent"
    );
    agent.terminate().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_that_labels_its_pod_and_the_other_takes_over_when_it_dies() {
    let world = World::start().await;
    world
        .cluster
        .apply_yaml(
            "
apiVersion: v1
kind: Pod
metadata: {name: agent-a, namespace: gitops-reverser}
spec: {containers: [{name: agent, image: reverser-agent}]}
---
apiVersion: v1
kind: Pod
metadata: {name: agent-b, namespace: gitops-reverser}
spec: {containers: [{name: agent, image: reverser-agent}]}
",
        )
        .await;
    let flags = ["--controller-namespace", "gitops-reverser"];
    let mut a = world.agent(
        &flags,
        &[
            ("POD_NAME", "agent-a"),
            ("POD_NAMESPACE", "gitops-reverser"),
        ],
    );
    let mut b = world.agent(
        &flags,
        &[
            ("POD_NAME", "agent-b"),
            ("POD_NAMESPACE", "gitops-reverser"),
        ],
    );
    world.wait_for_file(DEPLOYMENT, "web").await;

    let client = world.cluster.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "gitops-reverser");
    let leaders = || {
        let pods = pods.clone();
        async move {
            let mut out = Vec::new();
            for name in ["agent-a", "agent-b"] {
                let pod = pods.get(name).await.ok()?;
                if pod
                    .metadata
                    .labels
                    .unwrap_or_default()
                    .get("configbutler.ai/leader")
                    .map(String::as_str)
                    == Some("true")
                {
                    out.push(name);
                }
            }
            Some(out)
        }
    };
    let first = wait_async("exactly one leader label", || async {
        leaders().await.filter(|l| l.len() == 1).map(|l| l[0])
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "gitops-reverser");
    let lease = leases.get("gitops-reverser-agent").await.unwrap();
    let holder = lease.spec.unwrap().holder_identity.unwrap();
    assert!(
        holder.starts_with(first),
        "the Lease holder {holder} is the labelled pod {first}"
    );
    let standby_metrics = if first == "agent-a" {
        b.metrics().await
    } else {
        a.metrics().await
    }
    .unwrap();
    assert_eq!(
        metric(&standby_metrics, "gitops_reverser_agent_leader"),
        0.0
    );
    assert_eq!(
        metric(
            &standby_metrics,
            "gitops_reverser_agent_events_total{kind=\"upsert\"}"
        ),
        0.0,
        "a standby mirrors nothing"
    );

    // Kill the leader without a chance to release anything: the standby waits for the Lease to
    // expire, then takes over and keeps mirroring.
    let (survivor_name, mut survivor) = if first == "agent-a" {
        a.kill().await;
        ("agent-b", b)
    } else {
        b.kill().await;
        ("agent-a", a)
    };
    wait_async("the standby to take over", || async {
        leaders().await.filter(|l| l.contains(&survivor_name))
    })
    .await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    configmaps
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"color": "green"}})),
        )
        .await
        .unwrap();
    world.wait_for_file(CONFIGMAP_APP, "color: green").await;
    assert!(survivor.is_running());
    survivor.terminate().await;
    // A clean shutdown gives the Lease and the label back.
    let pod = pods.get(survivor_name).await.unwrap();
    assert!(
        !pod.metadata
            .labels
            .unwrap_or_default()
            .contains_key("configbutler.ai/leader"),
        "the label goes with the leadership"
    );
    let lease = leases.get("gitops-reverser-agent").await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity,
        None,
        "the Lease is released"
    );
    world.stop().await;
}

/// A second repository whose directory does not exist yet (the writer cannot reach it), a
/// destination on it and a WatchRule for the `shop` ConfigMaps.
fn unreachable_destination(repo_url: &str) -> String {
    format!(
        "
apiVersion: configbutler.ai/v1alpha1
kind: GitRepoConfig
metadata: {{name: later, namespace: gitops-reverser}}
spec:
  repoUrl: '{repo_url}'
  allowedBranches: [{BRANCH}]
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: later, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: later}}
  branch: {BRANCH}
  baseFolder: clusters/later
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {{name: to-later, namespace: shop}}
spec:
  destinationRef: {{name: later, namespace: gitops-reverser}}
  rules: [{{resources: [configmaps]}}]
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_push_failures_and_disconnections_become_conditions_on_destinations_and_rules() {
    let mut world = World::start().await;
    let later = BareRepo::named("later.git");
    let hidden = later.root().join("not-yet");
    std::fs::rename(later.path(), &hidden).unwrap();
    world
        .cluster
        .apply_yaml(&unreachable_destination(&later.file_url()))
        .await;
    let agent = world.agent(&["--controller-namespace", "gitops-reverser"], &[]);
    let client = world.cluster.client().await;
    let ns = Some("gitops-reverser");

    // The writer cannot push to a repository that does not exist: PushFailing, and Ready=False
    // with the writer's reason on the destination and on the rule that uses it.
    let (failing_reason, failing_message) = wait_for_condition(
        &client,
        "GitDestination",
        ns,
        "later",
        "PushFailing",
        "True",
    )
    .await;
    let (reason, message) =
        wait_for_condition(&client, "GitDestination", ns, "later", "Ready", "False").await;
    assert_eq!(
        reason, failing_reason,
        "Ready=False carries the writer's reason"
    );
    assert!(message.contains("writer"), "{message}");
    assert!(!failing_message.is_empty());
    let (rule_reason, rule_message) = wait_for_condition(
        &client,
        "WatchRule",
        Some("shop"),
        "to-later",
        "Ready",
        "False",
    )
    .await;
    assert_eq!(rule_reason, failing_reason);
    assert!(
        rule_message.contains("gitops-reverser/later"),
        "{rule_message}"
    );
    // The healthy destination and its rules are unaffected.
    world.wait_for_file(CONFIGMAP_APP, "color").await;
    wait_for_condition(&client, "GitDestination", ns, "prod", "Ready", "True").await;
    wait_for_condition(&client, "WatchRule", Some("shop"), "shop", "Ready", "True").await;
    let (connected, _) = wait_for_condition(
        &client,
        "GitDestination",
        ns,
        "prod",
        "WriterConnected",
        "True",
    )
    .await;
    assert_eq!(connected, "Connected");

    // The repository appears: the writer's retry pushes, and everything turns Ready.
    std::fs::rename(&hidden, later.path()).unwrap();
    let (reason, _) =
        wait_for_condition(&client, "GitDestination", ns, "later", "Ready", "True").await;
    assert_eq!(reason, "Ready");
    wait_for_condition(
        &client,
        "GitDestination",
        ns,
        "later",
        "PushFailing",
        "False",
    )
    .await;
    wait_for_condition(
        &client,
        "WatchRule",
        Some("shop"),
        "to-later",
        "Ready",
        "True",
    )
    .await;
    wait("the later repository to get the ConfigMaps", || {
        later
            .read(BRANCH, "clusters/later/core/v1/configmaps/shop/app.yaml")
            .filter(|t| t.contains("color"))
    })
    .await;

    // The writer goes away: WriterConnected=False on the destinations; back when it returns.
    let addr = world.stop_writer().await;
    let (reason, message) = wait_for_condition(
        &client,
        "GitDestination",
        ns,
        "prod",
        "WriterConnected",
        "False",
    )
    .await;
    assert_eq!(reason, "Disconnected");
    assert!(!message.is_empty());
    wait_for_condition(
        &client,
        "GitDestination",
        ns,
        "later",
        "WriterConnected",
        "False",
    )
    .await;
    world.restart_writer(addr).await;
    wait_for_condition(
        &client,
        "GitDestination",
        ns,
        "prod",
        "WriterConnected",
        "True",
    )
    .await;
    wait_for_condition(
        &client,
        "GitDestination",
        ns,
        "later",
        "WriterConnected",
        "True",
    )
    .await;

    agent.terminate().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_selecting_secrets_say_they_are_skipped_and_no_secret_reaches_git() {
    let world = World::start().await;
    world
        .cluster
        .apply_yaml(
            "
apiVersion: v1
kind: Secret
metadata: {name: db-password, namespace: shop}
type: Opaque
stringData: {password: hunter2}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: configmaps-only, namespace: shop}
spec:
  destinationRef: {name: prod, namespace: gitops-reverser}
  rules: [{resources: [configmaps]}]
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {name: all-secrets}
spec:
  destinationRef: {name: prod, namespace: gitops-reverser}
  rules: [{scope: Namespaced, resources: [secrets]}]
",
        )
        .await;
    let agent = world.agent(&["--controller-namespace", "gitops-reverser"], &[]);
    let client = world.cluster.client().await;

    // The preset (WatchRule shop: `rules: [{}]`) and an explicit `secrets` entry select Secrets.
    for (kind, ns, name) in [
        ("WatchRule", Some("shop"), "shop"),
        ("ClusterWatchRule", None, "all-secrets"),
    ] {
        let (reason, message) =
            wait_for_condition(&client, kind, ns, name, "SecretsSkipped", "True").await;
        assert_eq!(reason, "EncryptionNotConfigured");
        assert!(message.contains("no plaintext Secret"), "{message}");
    }
    world.wait_for_file(CONFIGMAP_APP, "color").await;
    wait_for_condition(
        &client,
        "WatchRule",
        Some("shop"),
        "configmaps-only",
        "Ready",
        "True",
    )
    .await;
    agent.settle().await;
    for (kind, ns, name) in [
        ("WatchRule", Some("shop"), "configmaps-only"),
        ("ClusterWatchRule", None, "rbac"),
    ] {
        assert_eq!(
            condition(&client, kind, ns, name, "SecretsSkipped").await,
            None,
            "{kind} {name} does not select Secrets"
        );
    }
    let files = world.files();
    assert!(
        !files.iter().any(|f| f.contains("/secrets/")),
        "no Secret reaches Git: {files:#?}"
    );
    assert!(
        !files
            .iter()
            .filter_map(|f| world.repo.read(BRANCH, f))
            .any(|text| text.contains("hunter2") || text.contains("aHVudGVyMg")),
        "no Secret value reaches Git"
    );

    agent.terminate().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_agent_exports_valid_prometheus_metrics_with_per_resource_counters() {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "/usr/bin/promtool".into());
    assert!(
        std::path::Path::new(&promtool).exists(),
        "promtool is required for this test (expected at {promtool}; scripts/install-test-deps.sh installs it)"
    );
    let world = World::start().await;
    let agent = world.agent(&["--controller-namespace", "gitops-reverser"], &[]);
    world.wait_for_file(CONFIGMAP_FLAGS, "beta").await;
    agent.settle().await;
    let text = agent.metrics().await.expect("/metrics answers");

    let m = |name: &str| metric(&text, name);
    assert!(
        m("gitops_reverser_agent_objects_scanned_total{resource=\"configmaps\"}") >= 2.0,
        "{text}"
    );
    assert!(
        m("gitops_reverser_agent_objects_scanned_total{resource=\"deployments.apps\"}") >= 1.0,
        "{text}"
    );
    assert!(
        m(
            "gitops_reverser_agent_objects_scanned_total{resource=\"clusterroles.rbac.authorization.k8s.io\"}"
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(m("gitops_reverser_agent_leader"), 1.0);
    assert_eq!(m("gitops_reverser_agent_stream_connected"), 1.0);
    assert!(m("gitops_reverser_agent_events_total{kind=\"upsert\"}") >= 5.0);
    assert!(m("gitops_reverser_agent_stream_messages_sent_total") >= 5.0);
    for name in [
        "gitops_reverser_agent_watch_restarts_total{resource=\"configmaps\"}",
        "gitops_reverser_agent_watch_relists_total{resource=\"configmaps\"}",
        "gitops_reverser_agent_watch_errors_total",
        "gitops_reverser_agent_encryption_failures_total",
        "gitops_reverser_agent_snapshots_withheld_total",
        "gitops_reverser_agent_stream_reconnects_total",
        "gitops_reverser_agent_stream_unacked",
        "gitops_reverser_agent_stream_messages_acked_total",
        "gitops_reverser_agent_ingestion_restarts_total",
        "gitops_reverser_agent_active_watches",
        "gitops_reverser_agent_status_writes_total",
        "gitops_reverser_agent_resolutions_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} is exported:\n{text}"
        );
    }

    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics rejects the exposition: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    agent.terminate().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_created_at_runtime_is_mirrored_without_waiting_for_the_discovery_timer() {
    let world = World::start().await;
    // An hour-long timer: only the CRD watch can make the new type appear within the test.
    let agent = world.agent(&["--discovery-refresh", "1h"], &[]);
    world.wait_for_file(DEPLOYMENT, "metadata").await;
    world
        .cluster
        .apply_yaml(
            "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gadgets.demo.example.com}
spec:
  group: demo.example.com
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget, listKind: GadgetList}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {name: gadgets}
spec:
  destinationRef: {name: prod, namespace: gitops-reverser}
  rules: [{scope: Namespaced, apiGroups: [demo.example.com], resources: [gadgets]}]
---
apiVersion: demo.example.com/v1
kind: Gadget
metadata: {name: g1, namespace: shop}
spec: {size: 3}
",
        )
        .await;
    world
        .wait_for_file(
            "clusters/prod/demo.example.com/v1/gadgets/shop/g1.yaml",
            "size: 3",
        )
        .await;
    agent.terminate().await;
    world.stop().await;
}

/// `git log --format=%an` of one file, newest first (the git CLI, as a user would check).
fn authors_of(repo: &BareRepo, path: &str) -> Vec<String> {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo.path())
        .args(["log", "--format=%an", BRANCH, "--", path])
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A client acting as `user` (the `Impersonate-User` header, sent by the admin), in namespace `shop`.
async fn as_user(cluster: &TestCluster, user: &str) -> Api<ConfigMap> {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&cluster.kubeconfig_yaml(None)).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.default_namespace = "shop".into();
    config.auth_info.impersonate = Some(user.to_owned());
    config.auth_info.impersonate_groups = Some(vec!["devs".to_owned()]);
    Api::namespaced(kube::Client::try_from(config).unwrap(), "shop")
}

fn configmap(name: &str, owner: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "shop"},
        "data": {"owner": owner}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_authored_by_the_users_the_webhook_saw_and_by_the_bot_without_it() {
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    use kube::api::PostParams;

    let world = World::start().await;
    let admin = world.cluster.client().await;
    // Narrow the selection to ConfigMaps of `shop`, so the watched set is known exactly.
    world
        .cluster
        .apply_yaml(
            "
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: shop, namespace: shop}
spec:
  destinationRef: {name: prod, namespace: gitops-reverser}
  rules: [{apiGroups: [''], resources: [configmaps]}]
",
        )
        .await;
    let cluster_rules = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("configbutler.ai", "v1alpha1", "ClusterWatchRule"),
        "clusterwatchrules",
    );
    Api::<DynamicObject>::all_with(admin.clone(), &cluster_rules)
        .delete("rbac", &DeleteParams::default())
        .await
        .unwrap();

    let pki = webhook_support::Pki::new();
    let ca_file = pki.dir.path().join("ca.crt");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = world.agent(
        &[
            "--controller-namespace",
            "gitops-reverser",
            "--webhook-addr",
            &addr,
            "--webhook-cert",
            pki.cert_file().to_str().unwrap(),
            "--webhook-key",
            pki.key_file().to_str().unwrap(),
            "--webhook-manage-configuration",
            "--webhook-ca-bundle",
            ca_file.to_str().unwrap(),
            "--webhook-url",
            &format!("https://{addr}"),
        ],
        &[],
    );

    // The leader registers the webhook for exactly the watched types, never for its own namespace.
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    let expected_rules = serde_json::json!([{
        "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE", "DELETE"],
        "resources": ["configmaps"], "scope": "*"
    }]);
    let hook = wait_async("the agent's webhook configuration", || async {
        let vwc = configurations.get_opt("gitops-reverser").await.ok()??;
        let hook = serde_json::to_value(&vwc.webhooks?[0]).ok()?;
        (hook["rules"] == expected_rules).then_some(hook)
    })
    .await;
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["matchPolicy"], "Equivalent");
    assert_eq!(
        hook["clientConfig"]["url"],
        format!("https://{addr}/process-validating-webhook")
    );
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][0]["values"],
        serde_json::json!(["gitops-reverser"])
    );
    world.wait_for_file(CONFIGMAP_APP, "blue").await;
    agent.settle().await;

    let path = "clusters/prod/core/v1/configmaps/shop/team.yaml";
    // alice (group devs) and bob may edit ConfigMaps in `shop` (a real server checks RBAC for impersonated users).
    world
        .cluster
        .apply_yaml(
            "
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: configmap-editor, namespace: shop}
rules: [{apiGroups: [''], resources: [configmaps], verbs: [get, list, watch, create, update, patch, delete]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: devs-edit-configmaps, namespace: shop}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-editor}
subjects:
- {kind: Group, name: devs, apiGroup: rbac.authorization.k8s.io}
- {kind: User, name: bob, apiGroup: rbac.authorization.k8s.io}
",
        )
        .await;
    let alice = as_user(&world.cluster, "alice").await;
    alice
        .create(&PostParams::default(), &configmap("team", "alice-1"))
        .await
        .unwrap();
    world.wait_for_file(path, "alice-1").await;
    // The edit and the delete go through the real kubectl (`--as`: over plain HTTP client-go sends no bearer token).
    kubectl(
        &world,
        &[
            "--as",
            "alice",
            "--as-group",
            "devs",
            "-n",
            "shop",
            "patch",
            "configmap",
            "team",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"owner":"alice-2"}}"#,
        ],
        None,
    )
    .await;
    world.wait_for_file(path, "alice-2").await;
    kubectl(
        &world,
        &["--as", "bob", "-n", "shop", "delete", "configmap", "team"],
        None,
    )
    .await;
    world.wait_until_gone(path).await;
    assert_eq!(authors_of(&world.repo, path), ["bob", "alice", "alice"]);

    // Without the webhook (its configuration removed) changes still land, as the bot's.
    configurations
        .delete("gitops-reverser", &DeleteParams::default())
        .await
        .unwrap();
    let late = "clusters/prod/core/v1/configmaps/shop/late.yaml";
    alice
        .create(&PostParams::default(), &configmap("late", "nobody-knows"))
        .await
        .unwrap();
    world.wait_for_file(late, "nobody-knows").await;
    assert_eq!(authors_of(&world.repo, late), ["GitOps Reverser"]);

    agent.settle().await;
    let text = agent.metrics().await.expect("metrics");
    assert_eq!(
        metric(&text, "gitops_reverser_agent_attribution_matches_total"),
        3.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "gitops_reverser_agent_webhook_requests_total{outcome=\"recorded\"}"
        ) >= 3.0
    );
    agent.terminate().await;
    world.stop().await;
}

/// Runs the real `kubectl` against the API server with the world's kubeconfig; panics with its stderr on failure.
async fn kubectl(world: &World, args: &[&str], stdin: Option<&str>) -> String {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(world.cluster.kubectl_binary())
        .args(args)
        .env("KUBECONFIG", &world.kubeconfig.path)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed (scripts/install-test-deps.sh installs it)");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_with_kubectl_land_as_commits_and_a_second_apply_changes_nothing() {
    let world = World::start().await;
    let agent = world.agent(&["--controller-namespace", "gitops-reverser"], &[]);
    world.wait_for_file(DEPLOYMENT, "replicas: 2").await;
    world.wait_for_file(CONFIGMAP_APP, "color: blue").await;
    agent.settle().await;

    // Client-side apply creates (and records last-applied, which must not reach Git).
    let created = "clusters/prod/core/v1/configmaps/shop/settings.yaml";
    let manifest = |level: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: shop\ndata:\n  level: {level}\n"
        )
    };
    kubectl(&world, &["apply", "-f", "-"], Some(&manifest("debug"))).await;
    let text = world.wait_for_file(created, "level: debug").await;
    assert!(
        !text.contains("last-applied-configuration"),
        "kubectl's bookkeeping annotation is stripped: {text}"
    );
    // A second apply of a change is a strategic-merge PATCH.
    kubectl(&world, &["apply", "-f", "-"], Some(&manifest("info"))).await;
    world.wait_for_file(created, "level: info").await;

    // Patch (as `kubectl scale` would, the emulator has no /scale), label, create, delete.
    kubectl(
        &world,
        &[
            "-n",
            "shop",
            "patch",
            "deployment",
            "web",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"replicas":4}}"#,
        ],
        None,
    )
    .await;
    kubectl(
        &world,
        &["-n", "shop", "label", "configmap", "app", "tier=frontend"],
        None,
    )
    .await;
    // (`kubectl create configmap NAME` would send protobuf, which the JSON-only emulator refuses.)
    kubectl(
        &world,
        &["create", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: literal, namespace: shop}\ndata: {greeting: hello}\n"),
    )
    .await;
    kubectl(&world, &["-n", "shop", "delete", "service", "web"], None).await;
    world.wait_for_file(DEPLOYMENT, "replicas: 4").await;
    world.wait_for_file(CONFIGMAP_APP, "tier: frontend").await;
    world
        .wait_for_file(
            "clusters/prod/core/v1/configmaps/shop/literal.yaml",
            "greeting: hello",
        )
        .await;
    world.wait_until_gone(SERVICE).await;
    agent.settle().await;

    // Re-applying what is already live changes nothing in the cluster, so nothing in Git either.
    let commits = world.repo.commit_count(BRANCH);
    let unchanged = kubectl(&world, &["apply", "-f", "-"], Some(&manifest("info"))).await;
    assert!(unchanged.contains("unchanged"), "{unchanged}");
    agent.settle().await;
    assert_eq!(world.repo.commit_count(BRANCH), commits);

    // Server-side apply takes a field over; the change lands like any other.
    kubectl(
        &world,
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&manifest("warn")),
    )
    .await;
    let text = world.wait_for_file(created, "level: warn").await;
    assert!(!text.contains("managedFields"), "{text}");

    agent.terminate().await;
    world.stop().await;
}

/// The prune mode the writer holds for the destination, as its admin API shows it.
async fn declared_prune(world: &World) -> Option<i32> {
    use reverser_proto::v1::{ListDestinationsRequest, writer_admin_client::WriterAdminClient};
    let mut admin = WriterAdminClient::connect(world.writer_url()).await.ok()?;
    let destinations = admin
        .list_destinations(ListDestinationsRequest {})
        .await
        .ok()?
        .into_inner()
        .destinations;
    destinations
        .iter()
        .find(|d| d.key == "gitops-reverser/prod")
        .map(|d| d.prune)
}

async fn set_prune(world: &World, mode: &str, wire: reverser_proto::v1::PruneMode) {
    kubectl(
        world,
        &[
            "patch",
            "gitdestination",
            "prod",
            "-n",
            "gitops-reverser",
            "--type=merge",
            "-p",
            &format!("{{\"spec\":{{\"prune\":\"{mode}\"}}}}"),
        ],
        None,
    )
    .await;
    let wanted = wire as i32;
    let mut declared = None;
    for _ in 0..150 {
        declared = declared_prune(world).await;
        if declared == Some(wanted) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("the writer never saw prune {mode}: {declared:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_modes_keep_what_the_cluster_deleted_until_on_snapshot_sweeps_it() {
    use reverser_proto::v1::PruneMode;
    let world = World::start().await;
    let flags = ["--controller-namespace", "gitops-reverser"];
    let agent = world.agent(&flags, &[]);
    world.wait_for_file(CONFIGMAP_FLAGS, "beta").await;
    world.wait_for_file(CONFIGMAP_APP, "blue").await;
    set_prune(&world, "OnDelete", PruneMode::OnDelete).await;
    let wide = kubectl(
        &world,
        &[
            "get",
            "gitdestinations",
            "-n",
            "gitops-reverser",
            "-o",
            "wide",
        ],
        None,
    )
    .await;
    assert!(
        wide.lines().next().unwrap_or_default().contains("PRUNE") && wide.contains("OnDelete"),
        "{wide}"
    );
    agent.settle().await;
    agent.terminate().await;

    // OnDelete: deleted while no agent ran, so only the next snapshot could notice; it deletes nothing.
    let client = world.cluster.client().await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client, "shop");
    configmaps
        .delete("flags", &DeleteParams::default())
        .await
        .unwrap();
    let second = world.agent(&flags, &[]);
    second.settle().await;
    assert!(
        world.repo.read(BRANCH, CONFIGMAP_FLAGS).is_some(),
        "OnDelete keeps the orphan: {:?}",
        world.files()
    );
    // …but a deletion the agent sees still removes the file.
    configmaps
        .delete("app", &DeleteParams::default())
        .await
        .unwrap();
    world.wait_until_gone(CONFIGMAP_APP).await;

    // Never: a watched deletion keeps the file too. A later change to the same type is the barrier that
    // shows the delete went through the writer.
    set_prune(&world, "Never", PruneMode::Never).await;
    let temp = "clusters/prod/core/v1/configmaps/shop/temp.yaml";
    kubectl(
        &world,
        &[
            "create",
            "configmap",
            "temp",
            "-n",
            "shop",
            "--from-literal=k=v",
        ],
        None,
    )
    .await;
    world.wait_for_file(temp, "temp").await;
    kubectl(&world, &["delete", "configmap", "temp", "-n", "shop"], None).await;
    kubectl(
        &world,
        &[
            "create",
            "configmap",
            "barrier",
            "-n",
            "shop",
            "--from-literal=k=v",
        ],
        None,
    )
    .await;
    world
        .wait_for_file(
            "clusters/prod/core/v1/configmaps/shop/barrier.yaml",
            "barrier",
        )
        .await;
    second.settle().await;
    assert!(
        world.repo.read(BRANCH, temp).is_some(),
        "Never keeps a deleted object's file: {:?}",
        world.files()
    );

    // Back to OnSnapshot: the next complete List removes both files the cluster no longer has.
    set_prune(&world, "OnSnapshot", PruneMode::OnSnapshot).await;
    second.terminate().await;
    let third = world.agent(&flags, &[]);
    world.wait_until_gone(CONFIGMAP_FLAGS).await;
    world.wait_until_gone(temp).await;
    assert!(world.repo.read(BRANCH, DEPLOYMENT).is_some());
    third.terminate().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_request_relists_now_and_sweeps_a_file_nobody_has_in_the_cluster() {
    let world = World::start().await;
    let flags = ["--controller-namespace", "gitops-reverser"];
    let agent = world.agent(&flags, &[]);
    world.wait_for_file(CONFIGMAP_FLAGS, "beta").await;
    agent.settle().await;
    let begins = || async {
        agent
            .metric("gitops_reverser_agent_events_total{kind=\"snapshot_begin\"}")
            .await
            .expect("the agent's metrics answer")
    };
    let before = begins().await;

    // A person adds a file for an object the cluster does not have. Nothing notices it until the next full list:
    // the watches only report changes.
    let stray = "clusters/prod/core/v1/configmaps/shop/stray.yaml";
    world.repo.commit_as_human(
        BRANCH,
        stray,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: stray, namespace: shop}\n",
        "a hand-made file",
    );
    // The writer refetches before a flush once its last fetch is 30 s old (README "How it writes"), so the sweep
    // will see the file.
    tokio::time::sleep(std::time::Duration::from_secs(31)).await;
    agent.settle().await;
    assert_eq!(begins().await, before, "no relist without a request");
    assert!(world.repo.read(BRANCH, stray).is_some());

    kubectl(
        &world,
        &[
            "annotate",
            "--overwrite",
            "gitdestination",
            "prod",
            "-n",
            "gitops-reverser",
            "configbutler.ai/reconcile-requested-at=2026-12-06T22:00:00Z",
        ],
        None,
    )
    .await;
    world.wait_until_gone(stray).await;
    assert!(begins().await > before, "the request relisted");
    // The sweep is an Event on the GitDestination, with its count.
    wait_async("an OrphansDeleted Event on the GitDestination", || async {
        let events = kubectl(
            &world,
            &[
                "get",
                "events",
                "-n",
                "gitops-reverser",
                "--field-selector",
                "involvedObject.kind=GitDestination,involvedObject.name=prod,reason=OrphansDeleted",
                "-o",
                "jsonpath={.items[*].message}",
            ],
            None,
        )
        .await;
        events
            .contains("deleted 1 orphan file (objects no longer in the cluster) in commit")
            .then_some(())
    })
    .await;
    assert!(world.repo.read(BRANCH, CONFIGMAP_FLAGS).is_some());
    let client = world.cluster.client().await;
    wait_async("status.lastHandledReconcileAt", || async {
        let obj =
            configbutler_object(&client, "GitDestination", Some("gitops-reverser"), "prod").await?;
        (obj.data
            .pointer("/status/lastHandledReconcileAt")?
            .as_str()?
            == "2026-12-06T22:00:00Z")
            .then_some(())
    })
    .await;
    agent.terminate().await;
    world.stop().await;
}
