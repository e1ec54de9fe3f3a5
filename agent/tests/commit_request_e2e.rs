//! CommitRequest end to end on the real API server (the emulator with `REVERSER_E2E_BACKEND=emulator`): the
//! `reverser-agent` binary with its admission webhook registered, the real writer (in-process) with a batch window
//! far longer than the test, and a bare Git repository read back with the git CLI.
//!
//! alice changes two ConfigMaps, then creates a CommitRequest (`kubectl --as alice`, so RBAC authorizes her):
//! the commit lands at once (the window would hold it for an hour), authored by alice as the webhook saw her, with
//! her message and the writer's trailers, and the request's status names that commit (`git rev-parse`). A second
//! request with nothing pending makes no commit and names the same tip.
//!
//! Every wait has a generous bound only to turn a hang into a failure; nothing asserts on time.

mod support;
mod webhook_support;

use std::path::PathBuf;
use std::process::Stdio;

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::api::Api;
use serde_json::json;
use support::cluster::TestCluster;
use support::world::{self, KubeconfigFile, start_writer};
use support::{configbutler_object, free_port, wait_async, wait_for_condition};
use testkit::BareRepo;
use tokio::process::Command;
use webhook_support::Pki;

const BRANCH: &str = "main";
const OURS: &str = "gitops-reverser";

fn cluster_yaml(repo_url: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: front, namespace: shop}}
data: {{color: blue}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: back, namespace: shop}}
data: {{color: blue}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: gitops-reverser}}
---
apiVersion: v1
kind: Pod
metadata: {{name: agent-a, namespace: gitops-reverser}}
spec: {{containers: [{{name: agent, image: reverser-agent}}]}}
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
---
# alice may change the shop's ConfigMaps and ask for commits of the destination (nothing more).
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: configmap-editor, namespace: shop}}
rules: [{{apiGroups: [''], resources: [configmaps], verbs: [get, list, watch, update, patch]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: alice-edits-configmaps, namespace: shop}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-editor}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: commit-requester, namespace: gitops-reverser}}
rules: [{{apiGroups: [configbutler.ai], resources: [commitrequests], verbs: [get, list, create]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: alice-requests-commits, namespace: gitops-reverser}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: commit-requester}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}}]
"
    )
}

fn commit_request(name: &str, message: &str) -> String {
    serde_json::to_string(&json!({
        "apiVersion": "configbutler.ai/v1alpha1",
        "kind": "CommitRequest",
        "metadata": {"name": name, "namespace": "gitops-reverser"},
        "spec": {"destinationRef": {"name": "prod"}, "message": message},
    }))
    .unwrap()
}

/// The real `kubectl` with `kubeconfig`, as alice (`--as`); panics with its stderr on failure.
async fn kubectl(cluster: &TestCluster, kubeconfig: &PathBuf, args: &[&str], stdin: Option<&str>) {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(cluster.kubectl_binary())
        .args(["--as", "alice"])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
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

/// `git log -1 --format=...` of `commit` in the bare repository.
fn git_show(repo: &BareRepo, format: &str, commit: &str) -> String {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo.path())
        .args(["log", "-1", &format!("--format={format}"), commit, "--"])
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn alices_commit_request_lands_before_the_window_with_her_message_and_authorship() {
    world::init();
    let cluster = TestCluster::start().await;
    cluster.apply_dir(&world::crds_dir()).await;
    let repo = BareRepo::new();
    cluster.apply_yaml(&cluster_yaml(&repo.file_url())).await;
    let writer_dir = tempfile::tempdir().unwrap();
    // An hour: only a flush can make a commit within this test.
    let writer = start_writer(
        "127.0.0.1:0",
        writer_dir.path(),
        &["--git-batch-max-wait-sec", "3600"],
    )
    .await;
    let admin_kubeconfig = KubeconfigFile::write(&cluster, None);
    let pki = Pki::new();
    let ca_file = pki.dir.path().join("ca.crt");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();

    let admin = format!("127.0.0.1:{}", free_port());
    let webhook = format!("127.0.0.1:{}", free_port());
    let writer_url = format!("http://{}", writer.grpc_addr);
    let mut cmd = world::Agent::command(&writer_url, &admin_kubeconfig.path, &admin);
    cmd.args(["--cluster-name", "e2e"])
        .args(["--controller-namespace", "gitops-reverser"])
        // Short Lease timings keep the restart below quick; the logic is the same.
        .args([
            "--leader-election-lease-sec",
            "3",
            "--leader-election-renew-sec",
            "1",
        ])
        .args(["--webhook-addr", &webhook])
        .arg("--webhook-cert")
        .arg(pki.cert_file())
        .arg("--webhook-key")
        .arg(pki.key_file())
        .arg("--webhook-manage-configuration")
        .arg("--webhook-ca-bundle")
        .arg(&ca_file)
        .args(["--webhook-url", &format!("https://{webhook}")])
        .env("POD_NAME", "agent-a")
        .env("POD_NAMESPACE", "gitops-reverser");
    let mut agent = world::Agent::spawn(&mut cmd, &admin);

    // The leader registered both webhooks: the watched ConfigMaps, and CommitRequest CREATEs (from every
    // namespace: this GitDestination lives in the agent's own).
    let client = cluster.client().await;
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    wait_async("the webhook configuration", || async {
        let vwc = serde_json::to_value(configurations.get_opt(OURS).await.ok()??).ok()?;
        let hooks = vwc["webhooks"].as_array()?;
        (hooks.len() == 2
            && hooks[0]["rules"][0]["resources"] == json!(["configmaps"])
            && hooks[1]["name"] == "commitrequests.gitops-reverser.configbutler.ai"
            && hooks[1]["rules"][0]["resources"] == json!(["commitrequests"]))
        .then_some(())
    })
    .await;
    // The ConfigMaps were listed and sent; the writer holds them for its window.
    wait_async("the first snapshot sent", || async {
        let sent = agent
            .metric("gitops_reverser_agent_events_total{kind=\"upsert\"}")
            .await?;
        let watches = agent.metric("gitops_reverser_agent_active_watches").await?;
        let listed = agent
            .metric("gitops_reverser_agent_watch_snapshots_completed")
            .await?;
        (sent >= 2.0 && watches > 0.0 && listed >= watches).then_some(())
    })
    .await;
    assert_eq!(repo.rev_parse(BRANCH), None, "nothing pushed yet");

    for name in ["front", "back"] {
        kubectl(
            &cluster,
            &admin_kubeconfig.path,
            &[
                "-n",
                "shop",
                "patch",
                "configmap",
                name,
                "--type",
                "merge",
                "-p",
                r#"{"data":{"color":"green"}}"#,
            ],
            None,
        )
        .await;
    }
    kubectl(
        &cluster,
        &admin_kubeconfig.path,
        &["create", "-f", "-"],
        Some(&commit_request(
            "release-42",
            "Shop goes green\n\nAgreed in the release review.",
        )),
    )
    .await;

    let (reason, message) = wait_for_condition(
        &client,
        "CommitRequest",
        Some("gitops-reverser"),
        "release-42",
        "Completed",
        "True",
    )
    .await;
    assert_eq!(reason, "Committed", "{message}");
    let request = configbutler_object(
        &client,
        "CommitRequest",
        Some("gitops-reverser"),
        "release-42",
    )
    .await
    .expect("the request");
    let status = &request.data["status"];
    let sha = status["commitSHA"]
        .as_str()
        .expect("status.commitSHA")
        .to_owned();
    assert_eq!(
        repo.rev_parse(BRANCH).as_deref(),
        Some(sha.as_str()),
        "git rev-parse {BRANCH}"
    );
    assert_eq!(status["branch"], BRANCH);
    assert_eq!(
        status["author"], "alice",
        "the requester, as admission saw her"
    );
    assert_eq!(git_show(&repo, "%an", &sha).trim(), "alice");
    let commit_message = git_show(&repo, "%B", &sha);
    assert!(
        commit_message.starts_with("Shop goes green\n\nAgreed in the release review.\n\n"),
        "{commit_message}"
    );
    assert!(
        commit_message.contains("X-ConfigButler-CommitRequest: gitops-reverser/release-42"),
        "{commit_message}"
    );
    assert!(commit_message.contains("X-ConfigButler-ControllerNS: gitops-reverser"));
    for name in ["front", "back"] {
        let file = repo
            .read(
                &sha,
                &format!("clusters/prod/core/v1/configmaps/shop/{name}.yaml"),
            )
            .unwrap_or_else(|| panic!("{name} in {sha}"));
        assert!(file.contains("color: green"), "{file}");
    }
    let commits = repo.commit_count(BRANCH);

    // Nothing pending now: no empty commit, and the status names the tip that holds everything.
    kubectl(
        &cluster,
        &admin_kubeconfig.path,
        &["create", "-f", "-"],
        Some(&commit_request("nothing-new", "Nothing to see")),
    )
    .await;
    let (reason, _) = wait_for_condition(
        &client,
        "CommitRequest",
        Some("gitops-reverser"),
        "nothing-new",
        "Completed",
        "True",
    )
    .await;
    assert_eq!(reason, "NothingPending");
    let again = configbutler_object(
        &client,
        "CommitRequest",
        Some("gitops-reverser"),
        "nothing-new",
    )
    .await
    .unwrap();
    assert_eq!(again.data["status"]["commitSHA"], sha.as_str());
    assert_eq!(repo.commit_count(BRANCH), commits, "no empty commit");

    // A restarted agent handles neither again: their statuses stay as they were. A third request, created after
    // the restart, shows that the new leader went through every request (its list comes first).
    let transition = |object: &kube::api::DynamicObject| {
        object.data["status"]["conditions"][0]["lastTransitionTime"].clone()
    };
    let before = [transition(&request), transition(&again)];
    agent.kill().await;
    let mut agent = world::Agent::spawn(&mut cmd, &admin);
    kubectl(
        &cluster,
        &admin_kubeconfig.path,
        &["create", "-f", "-"],
        Some(&commit_request("after-restart", "After the restart")),
    )
    .await;
    let (reason, _) = wait_for_condition(
        &client,
        "CommitRequest",
        Some("gitops-reverser"),
        "after-restart",
        "Completed",
        "True",
    )
    .await;
    assert_eq!(reason, "NothingPending");
    for (name, before) in ["release-42", "nothing-new"].into_iter().zip(before) {
        let now = configbutler_object(&client, "CommitRequest", Some("gitops-reverser"), name)
            .await
            .unwrap();
        assert_eq!(transition(&now), before, "{name} was not handled again");
    }
    assert_eq!(repo.commit_count(BRANCH), commits);

    agent.kill().await;
    writer.stop().await.unwrap();
    cluster.shutdown().await;
}
