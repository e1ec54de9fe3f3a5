//! `spec.ignore` end to end on the real API server (field ownership is real only there): the
//! `reverser-agent` binary with its attribution webhook, the real writer, a bare Git repository.
//!
//! A Flux-like writer (`kubectl apply --server-side --field-manager=kustomize-controller`) changes
//! and creates ConfigMaps: no commit. A person's `kubectl edit` (token user alice, seen by the
//! webhook) then makes exactly one commit, authored by alice, whose file equals the live object,
//! Flux's pending change included. An ignored user's edit (bob) makes no commit either.
//!
//! A name the rule's `excludeNames` matches is never mirrored.
//!
//! Ignored changes send nothing, so "no commit" is checked behind a barrier: a marker ConfigMap
//! created after them in the same watch must reach Git first (a watch delivers changes in order).

use std::process::Stdio;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use testkit::BareRepo;
use tokio::process::Command;

mod support;
mod webhook_support;

use support::cluster::{Backend, TestCluster};
use support::world::{self, Agent, KubeconfigFile, start_writer};
use support::{free_port, wait, wait_for_condition};

const BRANCH: &str = "main";

fn config(repo_url: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: gitops-reverser}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitRepoConfig
metadata: {{name: repo, namespace: gitops-reverser}}
spec:
  repoUrl: '{repo_url}'
  allowedBranches: [{BRANCH}]
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: prod, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: {BRANCH}
  baseFolder: clusters/prod
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {{name: shop, namespace: shop}}
spec:
  destinationRef: {{name: prod, namespace: gitops-reverser}}
  rules: [{{apiGroups: [''], resources: [configmaps]}}]
  ignore:
    presets: [Flux]
    users: [bob]
  excludeNames: ['*-lock']
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {{name: typo, namespace: shop}}
spec:
  destinationRef: {{name: prod, namespace: gitops-reverser}}
  rules: [{{apiGroups: [''], resources: [services]}}]
  ignore: {{presets: [flux]}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: app, namespace: shop}}
data: {{color: blue}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: leader-lock, namespace: shop}}
data: {{holder: a}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: configmap-editor, namespace: shop}}
rules: [{{apiGroups: [''], resources: [configmaps], verbs: [get, list, watch, create, update, patch, delete]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: people-edit-configmaps, namespace: shop}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-editor}}
subjects:
- {{kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}}
- {{kind: User, name: bob, apiGroup: rbac.authorization.k8s.io}}
"
    )
}

const APP: &str = "clusters/prod/core/v1/configmaps/shop/app.yaml";
const FLUX_MADE: &str = "clusters/prod/core/v1/configmaps/shop/flux-made.yaml";
const LOCK: &str = "clusters/prod/core/v1/configmaps/shop/leader-lock.yaml";

struct World {
    cluster: TestCluster,
    repo: BareRepo,
    writer: reverser_writer::RunningWriter,
    _writer_dir: tempfile::TempDir,
    admin: KubeconfigFile,
    alice: KubeconfigFile,
    bob: KubeconfigFile,
    markers: usize,
}

impl World {
    async fn kubectl(
        &self,
        user: &KubeconfigFile,
        args: &[&str],
        stdin: Option<&str>,
        editor: Option<&str>,
    ) {
        use tokio::io::AsyncWriteExt;
        let mut cmd = Command::new(self.cluster.kubectl_binary());
        cmd.args(args)
            .env("KUBECONFIG", &user.path)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(editor) = editor {
            cmd.env("KUBE_EDITOR", editor);
        }
        let mut child = cmd.spawn().expect("kubectl runs");
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
    }

    /// Applies `data` to ConfigMap `name` as Flux's kustomize-controller does (server-side apply).
    async fn flux_apply(&self, name: &str, data: &str) {
        let manifest = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: shop}}\ndata: {data}\n"
        );
        self.kubectl(
            &self.admin,
            &[
                "apply",
                "--server-side",
                "--field-manager=kustomize-controller",
                "-f",
                "-",
            ],
            Some(&manifest),
            None,
        )
        .await;
    }

    /// `kubectl edit` of ConfigMap `name` by `user`, the editor replacing `from` with `to`.
    async fn edit(&self, user: &KubeconfigFile, name: &str, from: &str, to: &str) {
        let editor = format!("sed -i 's/{from}/{to}/'");
        self.kubectl(
            user,
            &["-n", "shop", "edit", "configmap", name],
            None,
            Some(&editor),
        )
        .await;
    }

    /// Creates a new marker ConfigMap (not ignored) and waits for its file: every change of the
    /// ConfigMaps watch made before it has then been handled.
    async fn barrier(&mut self) {
        self.markers += 1;
        let name = format!("marker-{}", self.markers);
        self.cluster
            .apply_yaml(&format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: shop}}\ndata: {{n: '1'}}\n"
            ))
            .await;
        let path = format!("clusters/prod/core/v1/configmaps/shop/{name}.yaml");
        wait(&path, || self.repo.read(BRANCH, &path)).await;
    }

    fn commits(&self) -> usize {
        self.repo.commit_count(BRANCH)
    }

    async fn wait_for_file(&self, path: &str, contains: &str) -> String {
        wait(&format!("{path} containing {contains:?}"), || {
            self.repo
                .read(BRANCH, path)
                .filter(|t| t.contains(contains))
        })
        .await
    }

    /// The canonical YAML of the live ConfigMap, as the agent would write it now.
    async fn live(&self, name: &str) -> String {
        let api: Api<ConfigMap> = Api::namespaced(self.cluster.client().await, "shop");
        let mut value = serde_json::to_value(api.get(name).await.unwrap()).unwrap();
        value["apiVersion"] = "v1".into();
        value["kind"] = "ConfigMap".into();
        reverser_agent::canonical::to_canonical_yaml(&value).unwrap()
    }
}

/// `git log --format=%an` of one file, newest first.
fn authors_of(repo: &BareRepo, path: &str) -> Vec<String> {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo.path())
        .args(["log", "--format=%an", BRANCH, "--", path])
        .output()
        .expect("git runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_writes_make_no_commit_and_a_persons_edit_then_commits_the_live_object() {
    world::init();
    // Field managers and token users are real only on the real API server.
    let cluster = TestCluster::start_backend(Backend::Real).await;
    cluster.apply_dir(&world::crds_dir()).await;
    let repo = BareRepo::new();
    cluster.apply_yaml(&config(&repo.file_url())).await;
    let writer_dir = tempfile::tempdir().unwrap();
    let writer = start_writer("127.0.0.1:0", writer_dir.path(), &[]).await;
    let mut world = World {
        admin: KubeconfigFile::write(&cluster, None),
        alice: KubeconfigFile::write(&cluster, Some("alice")),
        bob: KubeconfigFile::write(&cluster, Some("bob")),
        cluster,
        repo,
        writer,
        _writer_dir: writer_dir,
        markers: 0,
    };

    let pki = webhook_support::Pki::new();
    let ca_file = pki.dir.path().join("ca.crt");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let webhook = format!("127.0.0.1:{}", free_port());
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Agent::command(
        &format!("http://{}", world.writer.grpc_addr),
        &world.admin.path,
        &admin_addr,
    );
    cmd.args([
        "--cluster-name",
        "e2e",
        "--controller-namespace",
        "gitops-reverser",
    ])
    .args(["--webhook-addr", &webhook])
    .args(["--webhook-cert", pki.cert_file().to_str().unwrap()])
    .args(["--webhook-key", pki.key_file().to_str().unwrap()])
    .args(["--webhook-manage-configuration"])
    .args(["--webhook-ca-bundle", ca_file.to_str().unwrap()])
    .args(["--webhook-url", &format!("https://{webhook}")]);
    let agent = Agent::spawn(&mut cmd, &admin_addr);

    // A bad preset is a condition on its rule, and the other rule keeps working.
    let client = world.cluster.client().await;
    let (reason, message) =
        wait_for_condition(&client, "WatchRule", Some("shop"), "typo", "Ready", "False").await;
    assert_eq!(reason, "InvalidIgnore");
    assert!(message.contains("unknown preset \"flux\""), "{message}");
    wait_for_condition(&client, "WatchRule", Some("shop"), "shop", "Ready", "True").await;
    world.wait_for_file(APP, "color: blue").await;
    // The webhook must be registered before people write, or their commits are the bot's.
    let hooks: Api<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration> =
        Api::all(client.clone());
    support::wait_async("the webhook configuration", || async {
        hooks.get_opt("gitops-reverser").await.ok()?.map(|_| ())
    })
    .await;
    agent.settle().await;
    let before = world.commits();

    // Flux changes `app` and creates `flux-made`: no commit.
    world.flux_apply("app", "{color: blue, flux: v1}").await;
    world.flux_apply("flux-made", "{origin: flux}").await;
    world.barrier().await;
    assert_eq!(
        world.commits(),
        before + 1,
        "only the marker's commit: {:?}",
        world.repo.log_subjects(BRANCH)
    );
    assert!(!world.repo.read(BRANCH, APP).unwrap().contains("flux"));
    assert!(world.repo.read(BRANCH, FLUX_MADE).is_none());

    // alice edits `app`: one commit, hers, of the whole live object (Flux's `flux: v1` included).
    let before = world.commits();
    world.edit(&world.alice, "app", "blue", "green").await;
    let text = world.wait_for_file(APP, "color: green").await;
    assert_eq!(world.commits(), before + 1);
    assert_eq!(authors_of(&world.repo, APP)[0], "alice");
    assert!(text.contains("flux: v1"), "{text}");
    assert_eq!(text, world.live("app").await);

    // The object Flux created gets its file once alice changes it, authored by her.
    let before = world.commits();
    world
        .edit(&world.alice, "flux-made", "origin: flux", "origin: alice")
        .await;
    let text = world.wait_for_file(FLUX_MADE, "origin: alice").await;
    assert_eq!(world.commits(), before + 1);
    assert_eq!(authors_of(&world.repo, FLUX_MADE), ["alice"]);
    assert_eq!(text, world.live("flux-made").await);

    // Mixed: Flux changes a key again, then alice another one: one commit (hers) with both.
    let before = world.commits();
    world.flux_apply("app", "{color: green, flux: v2}").await;
    world.barrier().await;
    assert_eq!(
        world.commits(),
        before + 1,
        "only the marker's commit: {:?}",
        world.repo.log_subjects(BRANCH)
    );
    let before = world.commits();
    world.edit(&world.alice, "app", "green", "red").await;
    let text = world.wait_for_file(APP, "color: red").await;
    assert_eq!(world.commits(), before + 1);
    assert!(text.contains("flux: v2"), "{text}");
    assert_eq!(authors_of(&world.repo, APP)[..2], ["alice", "alice"]);
    assert_eq!(text, world.live("app").await);

    // bob is an ignored user: his edit (seen by the webhook) makes no commit; alice's next one
    // brings it along.
    let before = world.commits();
    world.edit(&world.bob, "app", "red", "bob-red").await;
    world.barrier().await;
    assert_eq!(
        world.commits(),
        before + 1,
        "only the marker's commit: {:?}",
        world.repo.log_subjects(BRANCH)
    );
    assert!(!world.repo.read(BRANCH, APP).unwrap().contains("bob-red"));
    world.edit(&world.alice, "app", "v2", "v2-by-alice").await;
    let text = world.wait_for_file(APP, "v2-by-alice").await;
    assert!(text.contains("bob-red"), "{text}");
    assert_eq!(authors_of(&world.repo, APP)[0], "alice");
    assert_eq!(text, world.live("app").await);

    // `excludeNames: ['*-lock']`: neither listed nor changed, whoever writes it.
    assert!(world.repo.read(BRANCH, LOCK).is_none());
    world
        .edit(&world.alice, "leader-lock", "holder: a", "holder: b")
        .await;
    world.barrier().await;
    assert!(world.repo.read(BRANCH, LOCK).is_none());

    agent.terminate().await;
    let World {
        cluster, writer, ..
    } = world;
    writer.stop().await.unwrap();
    cluster.shutdown().await;
}
