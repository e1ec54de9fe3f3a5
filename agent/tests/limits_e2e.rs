//! Objects larger than the writer's limits, end to end: an API server (real by default, the emulator
//! with `REVERSER_E2E_BACKEND=emulator`), the `reverser-agent` binary and a
//! writer (in-process, real gRPC, `--max-object-bytes 1024`, so its message limit is 65 KiB) pushing to a bare
//! repository. One ConfigMap is far above the limit, the others are small: the small ones land, the huge one is
//! named in the GitDestination's `ObjectsSkipped` condition and counted per destination, and the stream does not
//! reconnect or relist in a loop.
//!
//! Every wait has a generous upper bound only to turn a hang into a failure; no test asserts on how long
//! something took.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use testkit::BareRepo;

mod support;

use support::cluster::{Backend, TestCluster};
use support::world::{self, Agent, KubeconfigFile, configmap_mirror_config, start_writer};
use support::{free_port, http_get, metric, wait, wait_async, wait_for_condition};

const BRANCH: &str = "main";
const NS: &str = "shop";
const SMALL: usize = 5;

fn cluster_yaml(repo_url: &str) -> String {
    let mut yaml = configmap_mirror_config(repo_url, BRANCH, NS);
    yaml.push_str(&format!(
        "---
apiVersion: v1
kind: ConfigMap
metadata: {{name: huge, namespace: {NS}}}
data: {{blob: {}}}
",
        "x".repeat(100 * 1024)
    ));
    for i in 0..SMALL {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: small-{i}, namespace: {NS}}}\ndata: {{v: r0}}\n"
        ));
    }
    yaml
}

fn file(name: &str) -> String {
    format!("clusters/prod/core/v1/configmaps/{NS}/{name}.yaml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_above_the_writers_limit_is_skipped_and_named_and_everything_else_flows() {
    world::init();
    let cluster = TestCluster::start().await;
    cluster.apply_dir(&world::crds_dir()).await;
    let repo = BareRepo::new();
    cluster.apply_yaml(&cluster_yaml(&repo.file_url())).await;
    let writer_dir = tempfile::tempdir().unwrap();
    let writer = start_writer(
        "127.0.0.1:0",
        writer_dir.path(),
        &["--max-object-bytes", "1024"],
    )
    .await;
    let kubeconfig = KubeconfigFile::write(&cluster, None);
    let admin = format!("127.0.0.1:{}", free_port());
    let _agent = Agent::spawn(
        Agent::command(
            &format!("http://{}", writer.grpc_addr),
            &kubeconfig.path,
            &admin,
        )
        .args(["--cluster-name", "e2e"])
        .args(["--controller-namespace", "gitops-reverser"])
        .arg("--leader-election=false"),
        &admin,
    );

    // The small ones land.
    for i in 0..SMALL {
        let path = file(&format!("small-{i}"));
        wait(&format!("{path} in Git"), || repo.read(BRANCH, &path)).await;
    }
    // The huge one is named in a condition and counted, per destination.
    let client = cluster.client().await;
    let (reason, message) = wait_for_condition(
        &client,
        "GitDestination",
        Some("gitops-reverser"),
        "prod",
        "ObjectsSkipped",
        "True",
    )
    .await;
    assert_eq!(reason, "ObjectTooLarge");
    assert!(message.contains("shop/huge"), "{message}");
    let metrics = || async { http_get(&admin, "/metrics").await };
    let too_large = r#"gitops_reverser_agent_stream_objects_too_large_total{destination="gitops-reverser/prod"}"#;
    wait_async("the too-large counter", || async {
        (metric(&metrics().await?, too_large) >= 1.0).then_some(())
    })
    .await;

    // No reconnect or relist loop: over a window, the connection stays up and nothing restarts.
    let before = metrics().await.expect("metrics");
    let counters = |text: &str| {
        (
            metric(text, "gitops_reverser_agent_stream_reconnects_total"),
            metric(text, "gitops_reverser_agent_ingestion_restarts_total"),
            metric(text, too_large),
        )
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = metrics().await.expect("metrics");
    assert_eq!(
        counters(&before),
        counters(&after),
        "reconnects, ingestion restarts and skips stay put while nothing changes"
    );
    assert_eq!(
        metric(&after, "gitops_reverser_agent_stream_connected"),
        1.0
    );
    assert!(repo.read(BRANCH, &file("huge")).is_none());

    // Later changes still flow; the huge object shrinking clears the condition.
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    api.patch(
        "small-0",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"v": "r1"}})),
    )
    .await
    .unwrap();
    wait("small-0 at r1", || {
        repo.read(BRANCH, &file("small-0"))
            .filter(|t| t.contains("v: r1"))
    })
    .await;
    api.patch(
        "huge",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"blob": "small now"}})),
    )
    .await
    .unwrap();
    wait("huge in Git once it fits", || {
        repo.read(BRANCH, &file("huge"))
    })
    .await;
    let (recovered, _) = wait_for_condition(
        &client,
        "GitDestination",
        Some("gitops-reverser"),
        "prod",
        "ObjectsSkipped",
        "False",
    )
    .await;

    // The condition changes were Kubernetes Events on the GitDestination: it becoming Ready, the skip (a Warning
    // naming the object) and its recovery.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "gitops-reverser");
    let expected = [
        ("Normal", "Ready".to_owned()),
        ("Warning", "ObjectTooLarge".to_owned()),
        ("Normal", recovered.clone()),
    ];
    let listed = wait_async("the Events on the GitDestination", || async {
        let listed = events.list(&Default::default()).await.ok()?.items;
        let about_prod: Vec<(String, String, String)> = listed
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("prod")
                    && e.reporting_controller.as_deref() == Some("gitops-reverser-agent")
            })
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect();
        expected
            .iter()
            .all(|(kind, reason)| about_prod.iter().any(|(k, r, _)| k == kind && r == reason))
            .then_some(about_prod)
    })
    .await;
    let (_, _, note) = listed
        .iter()
        .find(|(kind, reason, _)| kind == "Warning" && reason == "ObjectTooLarge")
        .unwrap();
    assert!(note.contains("shop/huge"), "{note}");
    // And `kubectl describe` shows them (the emulator has no describe-side event lookup to speak of).
    if cluster.backend() == Backend::Real {
        let out = std::process::Command::new(cluster.kubectl_binary())
            .arg("--kubeconfig")
            .arg(&kubeconfig.path)
            .args([
                "describe",
                "gitdestination",
                "prod",
                "-n",
                "gitops-reverser",
            ])
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        for (kind, reason) in &expected {
            assert!(
                text.lines()
                    .any(|line| line.split_whitespace().take(2).eq([*kind, reason.as_str()])),
                "kubectl describe lacks {kind} {reason}:\n{text}"
            );
        }
    }
    writer.stop().await.unwrap();
    cluster.shutdown().await;
}
