//! Leader fencing end to end: two `reverser-agent` processes (Lease 12 s, renew 4 s) against an
//! API server (real by default, the emulator with `REVERSER_E2E_BACKEND=emulator`), one writer (in-process, real gRPC) pushing to a bare repository, 50 ConfigMaps.
//!
//! The leader is frozen (`SIGSTOP`) or killed (`SIGKILL`) while the ConfigMaps keep changing (or
//! not); the standby takes the Lease and mirrors the new state; then the frozen leader is thawed
//! (`SIGCONT`). Whatever the old leader had queued (watch events buffered in its sockets, messages
//! in its gRPC send buffer) must never reach Git: the final tree equals the cluster, and once a
//! commit of the newer leader term is in the history no later commit carries an older term
//! (`X-ConfigButler-InstanceID` / `X-ConfigButler-LeaderTerm` trailers).
//!
//! Every wait has a generous upper bound only to turn a hang into a failure; no test asserts on
//! how long something took.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use testkit::BareRepo;

mod support;

use support::cluster::TestCluster;
use support::world::{self, Agent, KubeconfigFile, configmap_mirror_config, start_writer};
use support::{PATIENCE, free_port, wait, wait_async};

const BRANCH: &str = "main";
const NS: &str = "shop";
const COUNT: usize = 50;
const LEASE: &str = "gitops-reverser-agent";

fn cluster_yaml(repo_url: &str) -> String {
    let mut yaml = configmap_mirror_config(repo_url, BRANCH, NS);
    for i in 0..COUNT {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}, namespace: {NS}}}\ndata: {{v: r0}}\n"
        ));
    }
    yaml
}

fn file(i: usize) -> String {
    format!("clusters/prod/core/v1/configmaps/{NS}/cm-{i}.yaml")
}

struct World {
    cluster: TestCluster,
    client: kube::Client,
    repo: BareRepo,
    writer: Option<reverser_writer::RunningWriter>,
    writer_dir: tempfile::TempDir,
    kubeconfig: KubeconfigFile,
}

impl World {
    async fn start() -> World {
        world::init();
        let cluster = TestCluster::start().await;
        cluster.apply_dir(&world::crds_dir()).await;
        let repo = BareRepo::new();
        cluster.apply_yaml(&cluster_yaml(&repo.file_url())).await;
        let writer_dir = tempfile::tempdir().unwrap();
        let writer = start_writer("127.0.0.1:0", writer_dir.path(), &[]).await;
        let kubeconfig = KubeconfigFile::write(&cluster, None);
        let client = cluster.client().await;
        World {
            cluster,
            client,
            repo,
            writer: Some(writer),
            writer_dir,
            kubeconfig,
        }
    }

    fn agent(&self, name: &str) -> Agent {
        let admin = format!("127.0.0.1:{}", free_port());
        let writer_url = format!(
            "http://{}",
            self.writer.as_ref().expect("a writer").grpc_addr
        );
        let mut cmd = Agent::command(&writer_url, &self.kubeconfig.path, &admin);
        cmd.args(["--cluster-name", "e2e"])
            .args(["--controller-namespace", "gitops-reverser"])
            .args(["--instance-id", name])
            .args([
                "--leader-election-lease-sec",
                "12",
                "--leader-election-renew-sec",
                "4",
            ]);
        Agent::spawn(&mut cmd, &admin)
    }

    async fn holder(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "gitops-reverser");
        leases
            .get_opt(LEASE)
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
    }

    async fn wait_for_holder(&self, prefix: &str) {
        wait_async(&format!("a Lease held by {prefix}"), || async {
            self.holder()
                .await
                .filter(|h| h.starts_with(&format!("{prefix}-")))
        })
        .await;
    }

    /// Sets every ConfigMap's value to `r{round}`.
    async fn patch_all(&self, round: usize) {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), NS);
        for i in 0..COUNT {
            api.patch(
                &format!("cm-{i}"),
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"data": {"v": format!("r{round}")}})),
            )
            .await
            .expect("patch");
        }
    }

    /// The files that differ from the cluster (every ConfigMap at `r{round}`).
    fn stale_files(&self, round: usize) -> Vec<String> {
        (0..COUNT)
            .filter(|i| {
                !self
                    .repo
                    .read(BRANCH, &file(*i))
                    .is_some_and(|text| text.contains(&format!("v: r{round}\n")))
            })
            .map(file)
            .collect()
    }

    async fn wait_for_tree(&self, round: usize) {
        wait(&format!("every ConfigMap at r{round} in Git"), || {
            self.stale_files(round).is_empty().then_some(())
        })
        .await;
    }

    /// `(instance id, leader term)` of every commit, oldest first.
    fn commit_terms(&self) -> Vec<(String, String)> {
        let out = std::process::Command::new("git")
            .arg("--git-dir")
            .arg(self.repo.path())
            .args(["log", "--reverse", "--format=%B%x00", BRANCH])
            .output()
            .expect("git log");
        assert!(out.status.success(), "git log fails");
        String::from_utf8(out.stdout)
            .unwrap()
            .split('\0')
            .filter(|m| !m.trim().is_empty())
            .map(|message| {
                let trailer = |key: &str| {
                    message
                        .lines()
                        .find_map(|l| l.strip_prefix(key))
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                };
                (
                    trailer("X-ConfigButler-InstanceID:"),
                    trailer("X-ConfigButler-LeaderTerm:"),
                )
            })
            .collect()
    }

    /// No commit of `old` after the first commit of `new`, nor after the first `settled` commits (the history
    /// when the new leader had mirrored the cluster: it may have had nothing to commit).
    fn assert_no_superseded_commit(&self, old: &str, new: &str, settled: usize) {
        let commits = self.commit_terms();
        let first_new = commits
            .iter()
            .position(|(instance, _)| instance == new)
            .unwrap_or(settled)
            .min(settled);
        let late: Vec<_> = commits[first_new..]
            .iter()
            .filter(|(instance, _)| instance == old)
            .collect();
        assert!(
            late.is_empty(),
            "commits of the superseded leader {old} after {new} took over: {late:?} (history {commits:#?})"
        );
        // Terms never go backwards along the history.
        let terms: Vec<u64> = commits
            .iter()
            .filter_map(|(_, term)| term.split('/').next()?.parse().ok())
            .collect();
        assert!(
            terms.windows(2).all(|w| w[0] <= w[1]),
            "leader terms go backwards in the history: {commits:#?}"
        );
    }

    async fn restart_writer(&mut self) {
        let writer = self.writer.take().expect("a running writer");
        let addr = writer.grpc_addr;
        writer.stop().await.expect("the writer stops cleanly");
        self.writer = Some(start_writer(&addr.to_string(), self.writer_dir.path(), &[]).await);
    }

    async fn stop(mut self) {
        if let Some(w) = self.writer.take() {
            w.stop().await.unwrap();
        }
        self.cluster.shutdown().await;
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// SIGSTOP the leader, SIGCONT it once the standby mirrored the new state.
    Freeze,
    /// SIGKILL the leader.
    Kill,
}

/// Leader `agent-a` fails (`fault`); with `changes` the ConfigMaps keep changing until `agent-b`
/// holds the Lease. With `restart_writer` the writer restarts (same work dir) while `agent-a` is
/// frozen, so only what it persisted tells it which term is current.
async fn failover(fault: Fault, changes: bool, restart_writer: bool) {
    let mut world = World::start().await;
    let a = world.agent("agent-a");
    world.wait_for_holder("agent-a").await;
    world.wait_for_tree(0).await;
    let b = world.agent("agent-b");
    wait_async("agent-b to stand by", || async {
        (b.metric("gitops_reverser_agent_leader").await? == 0.0).then_some(())
    })
    .await;
    // Some work of the leader in flight before the fault.
    world.patch_all(1).await;
    let mut a = a;
    match fault {
        Fault::Freeze => a.signal("STOP"),
        Fault::Kill => a.child.kill().await.expect("kill -9"),
    }
    let mut round = 1;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if changes {
            round += 1;
            world.patch_all(round).await;
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if world
            .holder()
            .await
            .is_some_and(|h| h.starts_with("agent-b-"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent-b never took the Lease"
        );
    }
    // The cluster is quiet from here on; the new leader mirrors it.
    world.wait_for_tree(round).await;
    let settled = world.commit_terms().len();
    if restart_writer {
        world.restart_writer().await;
    }
    if fault == Fault::Freeze {
        a.signal("CONT");
        // The thawed agent notices it lost the Lease and stops leading.
        wait_async("agent-a to step down", || async {
            (a.metric("gitops_reverser_agent_leader").await? == 0.0).then_some(())
        })
        .await;
    }
    // Whatever the old leader had queued would land within a few batch periods (0.2 s): watch a
    // while, then look. Nothing changes in the cluster, so Git must stay equal to it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    wait_async("agent-b to be connected", || async {
        (b.metric("gitops_reverser_agent_stream_connected").await? == 1.0).then_some(())
    })
    .await;
    let stale = world.stale_files(round);
    assert!(
        stale.is_empty(),
        "Git differs from the cluster (every ConfigMap at r{round}): {stale:#?}"
    );
    world.assert_no_superseded_commit("agent-a", "agent-b", settled);
    drop(a);
    drop(b);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thawed_leader_never_writes_over_its_successor_while_changes_go_on() {
    failover(Fault::Freeze, true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thawed_leader_never_writes_over_its_successor_in_a_quiet_cluster() {
    failover(Fault::Freeze, false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_the_tree_follows_the_cluster() {
    failover(Fault::Kill, true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_in_a_quiet_cluster() {
    failover(Fault::Kill, false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thawed_leader_is_fenced_by_a_restarted_writer() {
    failover(Fault::Freeze, true, true).await;
}
