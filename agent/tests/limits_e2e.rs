//! Objects larger than the writer's limits, end to end: the kube-emulator, the `reverser-agent` binary and a
//! writer (in-process, real gRPC, `--max-object-bytes 1024`, so its message limit is 65 KiB) pushing to a bare
//! repository. One ConfigMap is far above the limit, the others are small: the small ones land, the huge one is
//! named in the GitDestination's `ObjectsSkipped` condition and counted per destination, and the stream does not
//! reconnect or relist in a loop.
//!
//! Every wait has a generous upper bound only to turn a hang into a failure; no test asserts on how long
//! something took.

use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube_emulator::Emulator;
use testkit::BareRepo;
use tokio::process::Command;

mod support;

use support::{free_port, http_get, metric, wait, wait_async, wait_for_condition};

const BRANCH: &str = "main";
const NS: &str = "shop";
const SMALL: usize = 5;

fn cluster(repo_url: &str) -> String {
    let mut yaml = format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: gitops-reverser}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
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
metadata: {{name: config, namespace: {NS}}}
spec:
  destinationRef: {{name: prod, namespace: gitops-reverser}}
  rules: [{{resources: [configmaps]}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: huge, namespace: {NS}}}
data: {{blob: {}}}
",
        "x".repeat(100 * 1024)
    );
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let emu = Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator starts");
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    emu.apply_dir(&crds).await.expect("CRDs apply");
    let repo = BareRepo::new();
    emu.apply_yaml(&cluster(&repo.file_url()))
        .await
        .expect("cluster applies");
    let writer_dir = tempfile::tempdir().unwrap();
    let work = writer_dir.path().display().to_string();
    let writer = reverser_writer::Args::try_parse_from([
        "reverser-writer",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--work-dir",
        &work,
        "--git-batch-max-wait-sec",
        "0.2",
        "--leases",
        "off",
        "--max-object-bytes",
        "1024",
    ])
    .unwrap()
    .start()
    .await
    .expect("writer starts");
    let kubeconfig_dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig_dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, emu.kubeconfig_yaml(None)).unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let _agent = Command::new(env!("CARGO_BIN_EXE_reverser-agent"))
        .arg("--writer-url")
        .arg(format!("http://{}", writer.grpc_addr))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--admin-addr", &admin, "--cluster-name", "e2e"])
        .args(["--controller-namespace", "gitops-reverser"])
        .arg("--leader-election=false")
        .env(
            "AGENT_LOG_LEVEL",
            std::env::var("AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the agent binary starts");

    // The small ones land.
    for i in 0..SMALL {
        let path = file(&format!("small-{i}"));
        wait(&format!("{path} in Git"), || repo.read(BRANCH, &path)).await;
    }
    // The huge one is named in a condition and counted, per destination.
    let client = emu.client().await;
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
    wait_for_condition(
        &client,
        "GitDestination",
        Some("gitops-reverser"),
        "prod",
        "ObjectsSkipped",
        "False",
    )
    .await;
    writer.stop().await.unwrap();
    emu.shutdown().await;
}
