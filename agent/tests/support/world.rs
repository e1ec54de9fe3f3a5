//! The pieces every agent end-to-end suite builds its world from: process set-up, the writer, a
//! kubeconfig file for the API server, and agent processes with their settle/wait helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use tokio::process::{Child, Command};

use super::cluster::TestCluster;
use super::{PATIENCE, http_get, metric};

/// Tracing to the test output (`RUST_LOG`, `warn` by default) and the TLS crypto provider.
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The project's CRDs (`crds/`).
pub fn crds_dir() -> PathBuf {
    testkit::manifest_dir().join("../crds")
}

/// An in-process writer on `grpc_addr` with its work dir in `work_dir`, batching for 0.2 s,
/// without leases; `extra` are more flags.
pub async fn start_writer(
    grpc_addr: &str,
    work_dir: &Path,
    extra: &[&str],
) -> reverser_writer::RunningWriter {
    let work = work_dir.display().to_string();
    let mut argv = vec![
        "reverser-writer",
        "--grpc-addr",
        grpc_addr,
        "--admin-addr",
        "127.0.0.1:0",
        "--work-dir",
        &work,
        "--git-batch-max-wait-sec",
        "0.2",
        "--leases",
        "off",
    ];
    argv.extend_from_slice(extra);
    reverser_writer::Args::try_parse_from(argv)
        .unwrap()
        .start()
        .await
        .expect("writer starts")
}

/// A kubeconfig file for the backend (`user`: `None` is the admin), removed on drop.
pub struct KubeconfigFile {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl KubeconfigFile {
    pub fn write(cluster: &TestCluster, user: Option<&str>) -> KubeconfigFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, cluster.kubeconfig_yaml(user)).unwrap();
        KubeconfigFile { path, _dir: dir }
    }
}

/// A running `reverser-agent` binary and its admin address.
pub struct Agent {
    pub child: Child,
    pub admin: String,
}

impl Agent {
    /// The agent binary with the flags every suite passes: the writer, the kubeconfig, the admin
    /// address, `AGENT_LOG` as its log level, and no Pod identity from the test's environment.
    /// Add flags and call [`Agent::spawn`].
    pub fn command(writer_url: &str, kubeconfig: &Path, admin: &str) -> Command {
        Self::command_in(None, writer_url, kubeconfig, admin)
    }

    /// [`Agent::command`] inside a network namespace (`None`: this process's).
    pub fn command_in(
        netns: Option<&testkit::netns::Netns>,
        writer_url: &str,
        kubeconfig: &Path,
        admin: &str,
    ) -> Command {
        let binary = env!("CARGO_BIN_EXE_reverser-agent");
        let mut cmd = match netns {
            Some(ns) => ns.command(binary),
            None => Command::new(binary),
        };
        cmd.arg("--writer-url")
            .arg(writer_url)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--admin-addr", admin])
            .env(
                "AGENT_LOG_LEVEL",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    pub fn spawn(cmd: &mut Command, admin: &str) -> Agent {
        Agent {
            child: cmd.spawn().expect("the agent binary starts"),
            admin: admin.to_owned(),
        }
    }

    pub async fn metrics(&self) -> Option<String> {
        http_get(&self.admin, "/metrics").await
    }

    /// One metric, `None` when the admin port does not answer.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        Some(metric(&self.metrics().await?, name))
    }

    /// Waits until everything ingestion produced was acked by the writer (so pushed) and every
    /// running watch completed a snapshot.
    pub async fn settle(&self) {
        self.settle_when(false).await
    }

    /// [`Agent::settle`], and the agent leads.
    pub async fn settle_as_leader(&self) {
        self.settle_when(true).await
    }

    async fn settle_when(&self, leading: bool) {
        // The same totals on two reads a pump tick (1 s) apart: nothing was still on its way.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut last = None;
        loop {
            let current = self.settled_totals(leading).await;
            if current.is_some() && current == last {
                return;
            }
            last = current;
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for the agent to settle"
            );
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    }

    /// (produced, acked) when everything produced was acked and every watch listed once.
    pub async fn settled_totals(&self, leading: bool) -> Option<(u64, u64)> {
        let text = self.metrics().await?;
        let m = |name: &str| metric(&text, name);
        let produced = ["upsert", "delete", "snapshot_begin", "snapshot_end"]
            .iter()
            .map(|k| {
                m(&format!(
                    "gitops_reverser_agent_events_total{{kind=\"{k}\"}}"
                ))
            })
            .sum::<f64>();
        let acked = m("gitops_reverser_agent_stream_messages_acked_total");
        let settled = (!leading || m("gitops_reverser_agent_leader") == 1.0)
            && m("gitops_reverser_agent_active_watches") > 0.0
            && m("gitops_reverser_agent_watch_snapshots_completed")
                >= m("gitops_reverser_agent_active_watches")
            && m("gitops_reverser_agent_stream_connected") == 1.0
            && m("gitops_reverser_agent_stream_unacked") == 0.0
            && produced > 0.0
            && acked >= produced;
        settled.then_some((produced as u64, acked as u64))
    }

    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill the agent");
    }

    /// SIGTERM, as Kubernetes stops a Pod, and wait for a clean exit.
    pub async fn terminate(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the agent exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "the agent exits cleanly: {status}");
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("child status").is_none()
    }

    /// `kill -{signal}` to the agent process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the agent runs");
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }
}

/// The agent configuration several e2e tests share: the `gitops-reverser` and `namespace` namespaces, repository
/// `repo` at `repo_url`, destination `prod` (`clusters/prod` on `branch`) and a WatchRule mirroring the
/// ConfigMaps of `namespace`.
pub fn configmap_mirror_config(repo_url: &str, branch: &str, namespace: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: gitops-reverser}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: {namespace}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitRepoConfig
metadata: {{name: repo, namespace: gitops-reverser}}
spec:
  repoUrl: '{repo_url}'
  allowedBranches: [{branch}]
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: prod, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: {branch}
  baseFolder: clusters/prod
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {{name: config, namespace: {namespace}}}
spec:
  destinationRef: {{name: prod, namespace: gitops-reverser}}
  rules: [{{resources: [configmaps]}}]
"
    )
}
