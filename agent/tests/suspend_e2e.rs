//! GitDestination `spec.suspend` end to end, as users run it: the `reverser-agent` binary against an API server
//! (the real kube-apiserver by default; `REVERSER_E2E_BACKEND=emulator` for the emulator), the real writer
//! in-process, a bare Git repository over `file://`.
//!
//! Suspended, the destination keeps observing: a create, an update, a delete and a file a person pushed show up in
//! `status.suspendPreview` (and `kubectl get gitdestination -o yaml`) while the remote gets no commit. Resumed,
//! exactly the previewed files land in one push. The `Suspended`/`Resumed` Events and the condition say so.

use std::collections::BTreeSet;
use std::process::Stdio;

use testkit::BareRepo;
use tokio::process::Command;

mod support;

use support::cluster::TestCluster;
use support::world::{self, Agent, KubeconfigFile, configmap_mirror_config, start_writer};
use support::{condition, configbutler_object, free_port, wait, wait_async};

const BRANCH: &str = "main";
const NS: &str = "shop";
const CM: &str = "clusters/prod/core/v1/configmaps/shop";

async fn kubectl(cluster: &TestCluster, kubeconfig: &KubeconfigFile, args: &[&str]) -> String {
    let out = Command::new(cluster.kubectl_binary())
        .args(args)
        .env("KUBECONFIG", &kubeconfig.path)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("kubectl is installed");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(name: &str) -> String {
    format!("{CM}/{name}.yaml")
}

/// The preview's paths (added, changed, deleted), when the status has one.
fn preview_paths(preview: &serde_json::Value) -> [BTreeSet<String>; 3] {
    let list = |key: &str| -> BTreeSet<String> {
        preview[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    [
        list("addedPaths"),
        list("changedPaths"),
        list("deletedPaths"),
    ]
}

/// Files that differ between two commits.
fn changed_between(repo: &BareRepo, from: &str, to: &str) -> BTreeSet<String> {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo.path())
        .args(["diff", "--no-renames", "--name-only", from, to])
        .output()
        .expect("git diff");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn events(cluster: &TestCluster, kubeconfig: &KubeconfigFile, reason: &str) -> String {
    kubectl(
        cluster,
        kubeconfig,
        &[
            "get",
            "events",
            "-n",
            "gitops-reverser",
            "--field-selector",
            &format!("involvedObject.kind=GitDestination,involvedObject.name=prod,reason={reason}"),
            "-o",
            "jsonpath={.items[*].type} {.items[*].message}",
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_destination_previews_in_status_pushes_nothing_and_resuming_writes_exactly_the_preview()
 {
    world::init();
    let cluster = TestCluster::start().await;
    cluster.apply_dir(&world::crds_dir()).await;
    let repo = BareRepo::new();
    cluster
        .apply_yaml(&configmap_mirror_config(&repo.file_url(), BRANCH, NS))
        .await;
    cluster
        .apply_yaml(
            "
apiVersion: v1
kind: ConfigMap
metadata: {name: app, namespace: shop}
data: {color: blue}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: flags, namespace: shop}
data: {beta: 'on'}
",
        )
        .await;
    let writer_dir = tempfile::tempdir().unwrap();
    let writer = start_writer("127.0.0.1:0", writer_dir.path(), &[]).await;
    let kubeconfig = KubeconfigFile::write(&cluster, None);
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = Agent::command(
        &format!("http://{}", writer.grpc_addr),
        &kubeconfig.path,
        &admin,
    );
    cmd.args([
        "--cluster-name",
        "e2e",
        "--controller-namespace",
        "gitops-reverser",
    ]);
    let agent = Agent::spawn(&mut cmd, &admin);
    wait("the first sync", || repo.read(BRANCH, &path("flags"))).await;
    agent.settle().await;
    let client = cluster.client().await;

    // Suspend.
    kubectl(
        &cluster,
        &kubeconfig,
        &[
            "patch",
            "gitdestination",
            "prod",
            "-n",
            "gitops-reverser",
            "--type=merge",
            "-p",
            r#"{"spec":{"suspend":true}}"#,
        ],
    )
    .await;
    wait_async("Suspended=True", || async {
        let (status, reason, _) = condition(
            &client,
            "GitDestination",
            Some("gitops-reverser"),
            "prod",
            "Suspended",
        )
        .await?;
        (status == "True" && reason == "Suspended").then_some(())
    })
    .await;
    let listed = kubectl(
        &cluster,
        &kubeconfig,
        &["get", "gitdestinations", "-n", "gitops-reverser"],
    )
    .await;
    let header = listed.lines().next().unwrap_or_default();
    assert!(
        header.contains("SUSPENDED") && listed.contains("true"),
        "{listed}"
    );
    wait_async("a Normal Suspended Event", || async {
        let found = events(&cluster, &kubeconfig, "Suspended").await;
        found.starts_with("Normal").then_some(())
    })
    .await;

    // Changes while suspended: a create, an update, a delete, and a file a person pushes that no object backs.
    kubectl(
        &cluster,
        &kubeconfig,
        &["create", "configmap", "new", "-n", NS, "--from-literal=k=v"],
    )
    .await;
    kubectl(
        &cluster,
        &kubeconfig,
        &[
            "patch",
            "configmap",
            "app",
            "-n",
            NS,
            "--type=merge",
            "-p",
            r#"{"data":{"color":"green"}}"#,
        ],
    )
    .await;
    kubectl(
        &cluster,
        &kubeconfig,
        &["delete", "configmap", "flags", "-n", NS],
    )
    .await;
    repo.commit_as_human(
        BRANCH,
        &path("stray"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: stray, namespace: shop}\n",
        "a hand-made file",
    );
    let before = repo.rev_parse(BRANCH).unwrap();
    // The writer refetches before planning once its last fetch is 30 s old, so the relist's sweep sees the file.
    tokio::time::sleep(std::time::Duration::from_secs(31)).await;
    kubectl(
        &cluster,
        &kubeconfig,
        &[
            "annotate",
            "--overwrite",
            "gitdestination",
            "prod",
            "-n",
            "gitops-reverser",
            "configbutler.ai/reconcile-requested-at=2026-12-07T00:30:00Z",
        ],
    )
    .await;
    let expected = [
        BTreeSet::from([path("new")]),
        BTreeSet::from([path("app")]),
        BTreeSet::from([path("flags"), path("stray")]),
    ];
    let preview = wait_async("the preview of the held changes in status", || async {
        let obj =
            configbutler_object(&client, "GitDestination", Some("gitops-reverser"), "prod").await?;
        let preview = obj.data.pointer("/status/suspendPreview")?.clone();
        (preview_paths(&preview) == expected).then_some(preview)
    })
    .await;
    assert_eq!(
        (
            preview["added"].as_u64(),
            preview["changed"].as_u64(),
            preview["deleted"].as_u64()
        ),
        (Some(1), Some(1), Some(2)),
        "{preview}"
    );
    assert_eq!(preview["pathsCap"].as_u64(), Some(50));
    assert_eq!(preview["baseCommit"].as_str(), Some(before.as_str()));
    let yaml = kubectl(
        &cluster,
        &kubeconfig,
        &[
            "get",
            "gitdestination",
            "prod",
            "-n",
            "gitops-reverser",
            "-o",
            "yaml",
        ],
    )
    .await;
    assert!(
        yaml.contains("suspendPreview:")
            && yaml.contains(&path("stray"))
            && yaml.contains(&path("new")),
        "{yaml}"
    );
    agent.settle().await;
    assert_eq!(
        repo.rev_parse(BRANCH).as_deref(),
        Some(before.as_str()),
        "nothing pushed while suspended"
    );
    assert!(repo.read(BRANCH, &path("new")).is_none());

    // Resume: one push writes exactly the previewed files.
    kubectl(
        &cluster,
        &kubeconfig,
        &[
            "patch",
            "gitdestination",
            "prod",
            "-n",
            "gitops-reverser",
            "--type=merge",
            "-p",
            r#"{"spec":{"suspend":false}}"#,
        ],
    )
    .await;
    let pushed = wait("the resumed push", || {
        repo.rev_parse(BRANCH).filter(|tip| *tip != before)
    })
    .await;
    let previewed: BTreeSet<String> = expected.iter().flatten().cloned().collect();
    assert_eq!(changed_between(&repo, &before, &pushed), previewed);
    assert!(repo.read(BRANCH, &path("app")).unwrap().contains("green"));
    wait_async("Suspended=False and the preview cleared", || async {
        let (status, reason, _) = condition(
            &client,
            "GitDestination",
            Some("gitops-reverser"),
            "prod",
            "Suspended",
        )
        .await?;
        let obj =
            configbutler_object(&client, "GitDestination", Some("gitops-reverser"), "prod").await?;
        (status == "False"
            && reason == "Resumed"
            && obj.data.pointer("/status/suspendPreview").is_none())
        .then_some(())
    })
    .await;
    wait_async("a Normal Resumed Event", || async {
        let found = events(&cluster, &kubeconfig, "Resumed").await;
        found.starts_with("Normal").then_some(())
    })
    .await;
    agent.settle().await;
    assert_eq!(
        repo.rev_parse(BRANCH).as_deref(),
        Some(pushed.as_str()),
        "one push"
    );

    agent.terminate().await;
    writer.stop().await.unwrap();
    cluster.shutdown().await;
}
