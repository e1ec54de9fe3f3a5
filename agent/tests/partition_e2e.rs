//! Network faults between real hosts: the agent, the writer and the Git server each run in a network namespace
//! of their own (the API server and the test in the root namespace), joined by veth links. Faults are made where
//! they happen on real networks: packets that vanish (nftables drop rules: nothing is refused, no RST, no ICMP),
//! random loss, and a slow link (500 ms each way, 1 Mbit/s). Each test checks that nothing is lost, nothing is
//! duplicated and nothing stays stuck: at the end the Git tree equals the cluster's ConfigMaps.
//!
//! ```text
//!  root ns: test, kube-apiserver (127.0.0.1) ◄── forwarder on link ── agent ns ── link ── writer ns ── link ── git ns
//!                                                                        (gRPC)             (git://)
//! ```
//!
//! Real API server only: the agent reaches it through a link address that must be in its serving certificate,
//! which the real cluster's PKI can add. Needs root (network namespaces) and `nft`.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use support::cluster::TestCluster;
use support::http_get;
use support::world::{self, Agent};
use testkit::fault_proxy::{FaultProxy, LinkShape};
use testkit::metric_sum;
use testkit::netns::{Link, Netns};
use testkit::{BareRepo, HttpGitServer, RealCluster};
use tokio::process::Child;
use tokio::time::Instant;

const NAMESPACE: &str = "shop";
const BRANCH: &str = "main";
const FOLDER: &str = "clusters/prod/core/v1/configmaps/shop";
const WRITER_GRPC_PORT: u16 = 7000;
const WRITER_ADMIN_PORT: u16 = 7001;
const GIT_PORT: u16 = 9418;
/// How long a test waits for the system to converge after a fault ends.
const CONVERGE: Duration = Duration::from_secs(240);

/// The writer binary, built next to the agent's (`cargo build --workspace`, which the test command does).
fn writer_binary() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_BIN_EXE_reverser-agent")).with_file_name("reverser-writer");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p reverser-writer` (./scripts/test.sh builds the workspace)",
        path.display()
    );
    path
}

/// The namespaces, links, servers and the writer; agents are started by the tests.
struct Net {
    cluster: TestCluster,
    repo: BareRepo,
    agent_ns: Netns,
    writer_ns: Netns,
    _git_ns: Netns,
    /// root (a) ⇄ agent (b): the agent reaches the API server's forwarder at `a`; the test reads the agent at `b`.
    agent_root: Link,
    /// root (a) ⇄ writer (b): the test reads the writer's metrics at `b`.
    writer_root: Link,
    /// agent (a) ⇄ writer (b): the gRPC stream.
    agent_writer: Link,
    /// writer (a) ⇄ git (b): pushes and fetches.
    writer_git: Link,
    api_proxy: FaultProxy,
    kubeconfig: PathBuf,
    _git_daemon: Child,
    writer: Option<Child>,
    writer_extra: Vec<String>,
    /// The HTTPS Git server, when the options asked for one.
    _https: Option<HttpGitServer>,
    work: tempfile::TempDir,
}

/// How a [`Net`] is set up.
struct NetOptions {
    writer_extra: Vec<String>,
    /// Git over HTTPS (git http-backend behind TLS with basic auth, on the root namespace's end of the writer's
    /// link) instead of `git daemon` in its own namespace.
    https: bool,
    /// The configbutler objects for a repository URL.
    config: fn(&str) -> String,
}

impl NetOptions {
    fn new(writer_extra: &[&str]) -> NetOptions {
        NetOptions {
            writer_extra: writer_extra.iter().map(|s| (*s).to_owned()).collect(),
            https: false,
            config: |url| world::configmap_mirror_config(url, BRANCH, NAMESPACE),
        }
    }
}

impl Net {
    async fn start(writer_extra: &[&str]) -> Net {
        Net::start_with(NetOptions::new(writer_extra)).await
    }

    async fn start_with(options: NetOptions) -> Net {
        world::init();
        let agent_ns = Netns::create("agent");
        let writer_ns = Netns::create("writer");
        let git_ns = Netns::create("git");
        let agent_root = Link::connect(None, &agent_ns);
        let writer_root = Link::connect(None, &writer_ns);
        let git_root = Link::connect(None, &git_ns);
        let agent_writer = Link::connect(Some(&agent_ns), &writer_ns);
        let writer_git = Link::connect(Some(&writer_ns), &git_ns);

        let cluster = TestCluster::Real(Box::new(
            RealCluster::builder()
                .serving_name(&agent_root.a)
                .start()
                .await,
        ));
        let TestCluster::Real(real) = &cluster else {
            unreachable!()
        };
        let api_addr: std::net::SocketAddr =
            real.url().trim_start_matches("https://").parse().unwrap();
        let api_proxy = FaultProxy::start(&format!("{}:0", agent_root.a), api_addr).await;
        let work = tempfile::tempdir().unwrap();
        let kubeconfig = work.path().join("agent.kubeconfig");
        std::fs::write(
            &kubeconfig,
            cluster
                .kubeconfig_yaml(None)
                .replace(&real.url(), &format!("https://{}", api_proxy.addr)),
        )
        .unwrap();

        let repo = BareRepo::new();
        // git-daemon itself, not `git daemon`: killing the `git` wrapper would leave the daemon running in the
        // namespace (and the namespace with its links alive).
        let exec_path = std::process::Command::new("git")
            .arg("--exec-path")
            .output()
            .expect("git runs (apt-get install -y git)");
        let daemon =
            PathBuf::from(String::from_utf8_lossy(&exec_path.stdout).trim()).join("git-daemon");
        let git_daemon = git_ns
            .command(daemon)
            .args([
                "--export-all",
                "--enable=receive-pack",
                "--reuseaddr",
                "--listen=0.0.0.0",
                &format!("--port={GIT_PORT}"),
            ])
            .arg(format!("--base-path={}", repo.root().display()))
            .arg(repo.root())
            // It says "the remote end hung up" for every connection the writer only probes.
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("git daemon starts");
        wait_for_port(&git_root.b, GIT_PORT).await;

        let mut writer_extra = options.writer_extra;
        let (repo_url, https) = if options.https {
            let server = HttpGitServer::start_root_at(
                repo.root(),
                repo.name(),
                "soak",
                "soak-token",
                writer_root.a.parse().unwrap(),
            );
            let credentials = work.path().join("git-credentials.yaml");
            let password = work.path().join("git-password");
            std::fs::write(&password, "soak-token").unwrap();
            std::fs::write(
                &credentials,
                format!(
                    "credentials:\n  - urlPrefix: https://{}:{}/\n    username: soak\n    passwordFile: {}\n",
                    writer_root.a,
                    server.port(),
                    password.display()
                ),
            )
            .unwrap();
            writer_extra.extend([
                "--git-ca-file".to_owned(),
                server.ca_file().display().to_string(),
                "--git-credentials".to_owned(),
                credentials.display().to_string(),
            ]);
            (server.url(), Some(server))
        } else {
            (
                format!("git://{}:{GIT_PORT}/{}", writer_git.b, repo.name()),
                None,
            )
        };
        cluster.apply_dir(&world::crds_dir()).await;
        cluster.apply_yaml(&(options.config)(&repo_url)).await;

        let mut net = Net {
            cluster,
            repo,
            agent_ns,
            writer_ns,
            _git_ns: git_ns,
            agent_root,
            writer_root,
            agent_writer,
            writer_git,
            api_proxy,
            kubeconfig,
            _git_daemon: git_daemon,
            writer: None,
            writer_extra,
            _https: https,
            work,
        };
        net.start_writer().await;
        net
    }

    async fn start_writer(&mut self) {
        let dir = self.work.path().join("writer");
        let child = self
            .writer_ns
            .command(writer_binary())
            .args(["--grpc-addr", &format!("0.0.0.0:{WRITER_GRPC_PORT}")])
            .args(["--admin-addr", &format!("0.0.0.0:{WRITER_ADMIN_PORT}")])
            .arg("--work-dir")
            .arg(&dir)
            .args(["--git-batch-max-wait-sec", "0.2", "--leases", "off"])
            // The test's links are private to its namespaces.
            .arg("--allow-plaintext")
            .args(&self.writer_extra)
            .env(
                "WRITER_LOG_LEVEL",
                std::env::var("WRITER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .kill_on_drop(true)
            .spawn()
            .expect("the writer binary starts");
        self.writer = Some(child);
        wait_for_port(&self.writer_root.b, WRITER_ADMIN_PORT).await;
    }

    /// An agent in the agent namespace; `index` picks its admin port (several agents share the namespace).
    fn agent(&self, index: u16, writer_url: &str, extra: &[&str]) -> Agent {
        let admin_port = 7100 + index;
        let mut cmd = Agent::command_in(
            Some(&self.agent_ns),
            writer_url,
            &self.kubeconfig,
            &format!("0.0.0.0:{admin_port}"),
        );
        cmd.args(["--cluster-name", "partition"]).args(extra);
        let mut agent = Agent::spawn(&mut cmd, &format!("{}:{admin_port}", self.agent_root.b));
        assert!(agent.is_running(), "the agent starts");
        agent
    }

    fn writer_url(&self) -> String {
        format!("http://{}:{WRITER_GRPC_PORT}", self.agent_writer.b)
    }

    /// Failed pushes so far, every kind.
    async fn writer_push_failures(&self) -> f64 {
        let text = http_get(
            &format!("{}:{WRITER_ADMIN_PORT}", self.writer_root.b),
            "/metrics",
        )
        .await
        .expect("the writer's admin port answers");
        metric_sum(&text, "gitops_reverser_push_failures_total")
    }

    async fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.cluster.client().await, NAMESPACE)
    }

    /// The cluster's ConfigMaps of the namespace: name → data.
    async fn live(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let list = self
            .configmaps()
            .await
            .list(&Default::default())
            .await
            .unwrap();
        list.items
            .into_iter()
            .filter(|cm| cm.metadata.name.as_deref() != Some("kube-root-ca.crt"))
            .map(|cm| {
                (
                    cm.metadata.name.unwrap(),
                    cm.data.unwrap_or_default().into_iter().collect(),
                )
            })
            .collect()
    }

    /// The mirrored ConfigMaps on the remote's branch: name → data.
    fn mirrored(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let prefix = format!("{FOLDER}/");
        if self.repo.rev_parse(BRANCH).is_none() {
            return BTreeMap::new();
        }
        self.repo
            .ls_tree(BRANCH)
            .into_iter()
            .filter_map(|path| {
                let name = path
                    .strip_prefix(&prefix)?
                    .strip_suffix(".yaml")?
                    .to_owned();
                let text = self.repo.read(BRANCH, &path)?;
                let object = reverser_common::yaml::parse_object(text.as_bytes()).ok()?;
                let data = object["data"]
                    .as_object()
                    .map(|d| {
                        d.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                Some((name, data))
            })
            .collect()
    }

    /// Waits until the Git tree equals the cluster (after a fault has ended).
    async fn converged(&self, what: &str) {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let live = self.live().await;
            let mirrored = self.mirrored();
            if live == mirrored {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the Git tree did not converge to the cluster within {CONVERGE:?}\n\
                 only live: {:?}\nonly in Git: {:?}\ndiffering: {:?}",
                live.keys()
                    .filter(|k| !mirrored.contains_key(*k))
                    .collect::<Vec<_>>(),
                mirrored
                    .keys()
                    .filter(|k| !live.contains_key(*k))
                    .collect::<Vec<_>>(),
                live.iter()
                    .filter(|(k, v)| mirrored.get(*k).is_some_and(|m| m != *v))
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>(),
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// How many commits added or changed each mirrored file (from `git log`).
    fn commits_per_file(&self) -> BTreeMap<String, usize> {
        let out = testkit::git(
            Some(&self.repo.path()),
            &["log", BRANCH, "--format=", "--name-only", "--", FOLDER],
        );
        let mut counts = BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line
                .strip_prefix(&format!("{FOLDER}/"))
                .and_then(|n| n.strip_suffix(".yaml"))
            {
                *counts.entry(name.to_owned()).or_insert(0) += 1;
            }
        }
        counts
    }

    async fn create(&self, name: &str, value: &str) {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": NAMESPACE},
            "data": {"value": value},
        }))
        .unwrap();
        self.configmaps()
            .await
            .create(&PostParams::default(), &cm)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }

    async fn update(&self, name: &str, value: &str) {
        self.configmaps()
            .await
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"data": {"value": value}})),
            )
            .await
            .unwrap_or_else(|e| panic!("update {name}: {e}"));
    }

    async fn delete(&self, name: &str) {
        self.configmaps()
            .await
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }
}

async fn wait_for_port(host: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect((host, port)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{host}:{port} never accepted a connection"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` every 500 ms until it gives `Some` or `limit` passes (then panics with `what`); returns the
/// value and how long it took.
async fn within<T, F: Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return (value, start.elapsed());
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every file was written once per change made to its object: a re-sent message after a reconnect never made a
/// second commit.
fn assert_no_duplicate_commits(net: &Net, changes: &BTreeMap<String, usize>) {
    let commits = net.commits_per_file();
    for (name, expected) in changes {
        let got = commits.get(name).copied().unwrap_or(0);
        assert!(
            got <= *expected,
            "{name}: {got} commits for {expected} changes (a re-sent change was committed twice)"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_writer_partition_that_drops_packets_loses_and_duplicates_nothing_and_heals() {
    let net = Net::start(&[]).await;
    // A small unacked budget, so the long partition shows backpressure instead of memory growth.
    let max_unacked = 40;
    let agent = net.agent(
        0,
        &net.writer_url(),
        &["--max-unacked", &max_unacked.to_string()],
    );
    let mut changes: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..5 {
        net.create(&format!("before-{i}"), "v1").await;
        changes.insert(format!("before-{i}"), 1);
    }
    net.converged("before the partition").await;
    agent.settle().await;

    // 30 s: shorter than the keepalive's detection (30 s ping + 20 s), so the connection itself survives and
    // delivers once packets flow again.
    net.agent_ns.drop_host(&net.agent_writer.b);
    for i in 0..5 {
        net.create(&format!("short-{i}"), "v1").await;
        changes.insert(format!("short-{i}"), 1);
    }
    net.update("before-0", "v2").await;
    *changes.get_mut("before-0").unwrap() += 1;
    net.delete("before-1").await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        net.mirrored().keys().all(|k| !k.starts_with("short-")),
        "nothing crossed the partition: {}",
        net.agent_ns.faults()
    );
    net.agent_ns.heal();
    net.converged("after a 30 s partition").await;
    assert_no_duplicate_commits(&net, &changes);

    // 5 minutes, with more changes than the agent may keep unacked.
    let partition = Instant::now();
    net.agent_ns.drop_host(&net.agent_writer.b);
    for i in 0..(max_unacked * 3) {
        net.create(&format!("long-{i}"), "v1").await;
        changes.insert(format!("long-{i}"), 1);
    }
    // The dead connection is noticed (keepalive) within a bound, without anything refused.
    let ((), noticed) = within(
        "the agent notices the dead writer connection",
        Duration::from_secs(120),
        || async {
            (agent.metric("gitops_reverser_agent_stream_connected").await == Some(0.0))
                .then_some(())
        },
    )
    .await;
    println!("dead agent→writer connection noticed after {noticed:?}");
    let mut most_unacked = 0.0f64;
    while partition.elapsed() < Duration::from_secs(300) {
        let unacked = agent
            .metric("gitops_reverser_agent_stream_unacked")
            .await
            .expect("the agent's admin port answers during the partition");
        most_unacked = most_unacked.max(unacked);
        assert!(
            unacked <= max_unacked as f64,
            "the agent keeps at most --max-unacked {max_unacked} messages, not {unacked}"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert!(
        net.mirrored().keys().all(|k| !k.starts_with("long-")),
        "nothing crossed the 5-minute partition"
    );
    println!("most unacked messages during the 5-minute partition: {most_unacked}");
    assert!(
        most_unacked >= max_unacked as f64,
        "backpressure held the agent at --max-unacked {max_unacked} (most seen: {most_unacked})"
    );
    net.agent_ns.heal();
    net.converged("after a 5-minute partition").await;
    assert_no_duplicate_commits(&net, &changes);
    agent.terminate().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_git_remote_behind_a_partition_or_a_lossy_link_reports_push_failing_and_gets_every_change_later()
 {
    // Short Git timeouts, so a push into the void fails in seconds rather than minutes.
    let net = Net::start(&[
        "--git-connect-timeout-sec",
        "5",
        "--git-io-timeout-sec",
        "5",
        "--git-operation-timeout-sec",
        "20",
    ])
    .await;
    let agent = net.agent(0, &net.writer_url(), &[]);
    let client = net.cluster.client().await;
    let mut changes: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..3 {
        net.create(&format!("a-{i}"), "v1").await;
        changes.insert(format!("a-{i}"), 1);
    }
    net.converged("before the partition").await;
    agent.settle().await;

    net.writer_ns.drop_host(&net.writer_git.b);
    let head = net.repo.rev_parse(BRANCH);
    for i in 0..5 {
        net.create(&format!("b-{i}"), "v1").await;
        changes.insert(format!("b-{i}"), 1);
    }
    net.update("a-0", "v2").await;
    *changes.get_mut("a-0").unwrap() += 1;
    let ((reason, message), reported) = within(
        "the destination reports PushFailing",
        Duration::from_secs(150),
        || async {
            support::condition(
                &client,
                "GitDestination",
                Some("gitops-reverser"),
                "prod",
                "PushFailing",
            )
            .await
            .filter(|(status, _, _)| status == "True")
            .map(|(_, reason, message)| (reason, message))
        },
    )
    .await;
    println!("PushFailing ({reason}: {message}) reported {reported:?} into the partition");
    assert_eq!(
        net.repo.rev_parse(BRANCH),
        head,
        "nothing reached the remote"
    );
    let unacked = agent
        .metric("gitops_reverser_agent_stream_unacked")
        .await
        .unwrap();
    assert!(
        unacked > 0.0,
        "the changes stay pending in the agent until pushed ({unacked} unacked)"
    );
    net.writer_ns.heal();
    net.converged("after the Git partition").await;
    support::wait_for_condition(
        &client,
        "GitDestination",
        Some("gitops-reverser"),
        "prod",
        "PushFailing",
        "False",
    )
    .await;

    // 30 % of the packets each way vanish: TCP retransmits, Git operations may time out; nothing is lost.
    let failures_before = net.writer_push_failures().await;
    net.writer_ns.lose(&net.writer_git.b, 30);
    for i in 0..10 {
        net.create(&format!("c-{i}"), "v1").await;
        changes.insert(format!("c-{i}"), 1);
    }
    net.update("b-0", "v2").await;
    *changes.get_mut("b-0").unwrap() += 1;
    net.delete("a-1").await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    let lossy_failures = net.writer_push_failures().await - failures_before;
    let landed = net
        .mirrored()
        .keys()
        .filter(|k| k.starts_with("c-"))
        .count();
    println!(
        "with 30 % loss for 40 s: {landed}/10 new files landed, {lossy_failures} failed pushes"
    );
    net.writer_ns.heal();
    net.converged("after the lossy link").await;
    assert_no_duplicate_commits(&net, &changes);
    agent.terminate().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_server_behind_a_partition_deletes_nothing_until_a_list_completes_and_watches_resume()
 {
    let net = Net::start(&[]).await;
    let mut agent = net.agent(0, &net.writer_url(), &[]);
    for i in 0..4 {
        net.create(&format!("k-{i}"), "v1").await;
    }
    net.converged("before the partition").await;
    agent.settle().await;
    let before = net.mirrored();

    // The agent's packets to the API server vanish. The cluster changes meanwhile, and a restarted agent has
    // to list everything again but cannot: it must not sweep anything on what it could not list.
    net.agent_ns
        .drop_service(&net.agent_root.a, net.api_proxy.addr.port());
    net.delete("k-0").await;
    net.create("k-4", "v1").await;
    net.update("k-1", "v2").await;
    agent.kill().await;
    let restarted = net.agent(0, &net.writer_url(), &[]);
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(
        net.mirrored(),
        before,
        "nothing changed in Git while the agent could not list (no sweep on an incomplete snapshot)"
    );
    net.agent_ns.heal();
    net.converged("after the API server partition, with a restarted agent")
        .await;

    // A running agent's watches across a 45 s partition: they resume or are re-established.
    net.agent_ns
        .drop_service(&net.agent_root.a, net.api_proxy.addr.port());
    net.create("k-5", "v1").await;
    net.delete("k-2").await;
    tokio::time::sleep(Duration::from_secs(45)).await;
    net.agent_ns.heal();
    net.converged("after a partition of a running agent's watches")
        .await;
    restarted.terminate().await;
}

/// The Lease the agents elect their leader with.
async fn lease_transitions(net: &Net) -> Option<(String, i32)> {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(net.cluster.client().await, "gitops-reverser");
    let list = leases.list(&Default::default()).await.ok()?;
    let lease = list.items.into_iter().find(|l| {
        l.metadata
            .name
            .as_deref()
            .is_some_and(|n| n.contains("agent") || n.contains("reverser"))
    })?;
    let spec = lease.spec?;
    Some((spec.holder_identity?, spec.lease_transitions.unwrap_or(0)))
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_links_make_no_leader_failover_and_no_reconnect_loop() {
    let net = Net::start(&[]).await;
    // The agents reach the writer through a forwarder too, so both of their links are slow.
    let writer_proxy = FaultProxy::start(
        &format!("{}:0", net.agent_root.a),
        format!("{}:{WRITER_GRPC_PORT}", net.writer_root.b)
            .parse()
            .unwrap(),
    )
    .await;
    let slow = LinkShape {
        delay: Duration::from_millis(500),
        bytes_per_sec: Some(125_000),
    };
    net.api_proxy.shape(slow);
    writer_proxy.shape(slow);
    let url = format!("http://{}", writer_proxy.addr);
    // Default Lease timings (24 s, renew every 8 s), as installed.
    let first = net.agent(0, &url, &[]);
    let second = net.agent(1, &url, &[]);
    let ((holder, transitions), elected) = within(
        "a leader is elected over the slow link",
        Duration::from_secs(120),
        || lease_transitions(&net),
    )
    .await;
    println!("leader {holder} elected after {elected:?} (transitions {transitions})");

    let mut changes = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let name = format!("s-{}", changes % 10);
        if changes < 10 {
            net.create(&name, "v0").await;
        } else {
            net.update(&name, &format!("v{changes}")).await;
        }
        changes += 1;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    net.converged("over slow links").await;
    let (holder_after, transitions_after) = lease_transitions(&net).await.expect("the Lease");
    assert_eq!(
        (holder_after.as_str(), transitions_after),
        (holder.as_str(), transitions),
        "no leader failover over a slow but working link"
    );
    for (name, agent) in [("first", &first), ("second", &second)] {
        let reconnects = agent
            .metric("gitops_reverser_agent_stream_reconnects_total")
            .await
            .expect("the agent answers");
        assert_eq!(
            reconnects, 0.0,
            "the {name} agent's stream never timed out and reconnected"
        );
    }
    println!("{changes} changes over 60 s of 500 ms / 1 Mbit/s links");
    first.terminate().await;
    second.terminate().await;
}

/// The soak's objects: ConfigMaps, Deployments (scaled by the workload, rolled by kube-controller-manager) and
/// Widgets of a CRD whose schema the workload changes, all in `shop`.
fn soak_config(repo_url: &str) -> String {
    world::configmap_mirror_config(repo_url, BRANCH, NAMESPACE).replace(
        "rules: [{resources: [configmaps]}]",
        "rules: [{resources: [configmaps]}, {apiGroups: [apps], resources: [deployments]}, \
         {apiGroups: [soak.example.com], resources: [widgets]}]",
    ) + "---\n"
        + &widget_crd("")
}

/// The Widget CRD; `extra_field` adds a property to its schema (a CRD change the agent must follow).
fn widget_crd(extra_field: &str) -> String {
    let extra = if extra_field.is_empty() {
        String::new()
    } else {
        format!("\n                {extra_field}: {{type: string}}")
    };
    format!(
        "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: widgets.soak.example.com}}
spec:
  group: soak.example.com
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget}}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {{type: integer}}{extra}
"
    )
}

/// What the soak compares: kind/name → the fields the workload changes, from the cluster.
async fn soak_live(net: &Net) -> BTreeMap<String, String> {
    let mut state = BTreeMap::new();
    for (name, data) in net.live().await {
        state.insert(format!("configmap/{name}"), format!("{data:?}"));
    }
    let client = net.cluster.client().await;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), NAMESPACE);
    for d in deployments.list(&Default::default()).await.unwrap().items {
        let replicas = d.spec.and_then(|s| s.replicas).unwrap_or(1);
        state.insert(
            format!("deployment/{}", d.metadata.name.unwrap()),
            replicas.to_string(),
        );
    }
    let ar = kube::discovery::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
        "soak.example.com",
        "v1",
        "Widget",
    ));
    let widgets: Api<kube::api::DynamicObject> = Api::namespaced_with(client, NAMESPACE, &ar);
    if let Ok(list) = widgets.list(&Default::default()).await {
        for w in list.items {
            state.insert(
                format!("widget/{}", w.metadata.name.unwrap()),
                w.data["spec"]["size"].to_string(),
            );
        }
    }
    state
}

/// [`soak_live`] read from the Git tree.
fn soak_mirrored(net: &Net) -> BTreeMap<String, String> {
    let mut state = BTreeMap::new();
    for (name, data) in net.mirrored() {
        state.insert(format!("configmap/{name}"), format!("{data:?}"));
    }
    if net.repo.rev_parse(BRANCH).is_none() {
        return state;
    }
    for path in net.repo.ls_tree(BRANCH) {
        let (kind, rest) =
            if let Some(rest) = path.strip_prefix("clusters/prod/apps/v1/deployments/shop/") {
                ("deployment", rest)
            } else if let Some(rest) =
                path.strip_prefix("clusters/prod/soak.example.com/v1/widgets/shop/")
            {
                ("widget", rest)
            } else {
                continue;
            };
        let Some(name) = rest.strip_suffix(".yaml") else {
            continue;
        };
        let Some(object) = net
            .repo
            .read(BRANCH, &path)
            .and_then(|t| reverser_common::yaml::parse_object(t.as_bytes()).ok())
        else {
            state.insert(format!("{kind}/{name}"), "<unreadable>".into());
            continue;
        };
        let value = match kind {
            "deployment" => object["spec"]["replicas"].as_i64().unwrap_or(1).to_string(),
            _ => object["spec"]["size"].to_string(),
        };
        state.insert(format!("{kind}/{name}"), value);
    }
    state
}

fn deployment(name: &str, replicas: i32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
            }
        }
    })
}

/// Peak resident memory (VmHWM) of a process, KiB.
fn peak_rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The chaos soak (issue: reliability under hostile conditions). Not part of the test command: it runs for
/// `SOAK_MINUTES` (30 by default); `scripts/chaos-soak.sh` runs it and its last result is in the README.
///
/// A real API server (with kube-controller-manager), two agents, the writer and Git over HTTPS, each agent and the
/// writer in a network namespace. A workload makes creates, updates, deletes, scales and CRD changes about every
/// 300 ms; every 5–15 s a random fault: kill -9 of an agent or the writer, a partition of one link (agent ⇄
/// writer, agent ⇄ API server, writer ⇄ Git), a remote that hangs, a burst of 403s (the agents' ServiceAccount
/// loses its binding), a discovery blink (a CRD created and deleted), a human push to the branch. etcd is
/// compacted every 10 s throughout. At the end the faults stop, everything is healed and restarted, and the Git
/// tree must equal the cluster exactly.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a 30-minute chaos soak, run by scripts/chaos-soak.sh (not part of the test command)"]
async fn chaos_soak() {
    let minutes: u64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(30);
    let mut options = NetOptions::new(&[
        "--git-connect-timeout-sec",
        "5",
        "--git-io-timeout-sec",
        "10",
        "--git-operation-timeout-sec",
        "60",
        "--git-batch-max-wait-sec",
        "1",
    ]);
    options.https = true;
    options.config = soak_config;
    let mut net = Net::start_with(options).await;
    // The agents authenticate as a ServiceAccount bound to cluster-admin: removing the binding makes 403s.
    net.cluster
        .apply_yaml(
            "apiVersion: v1
kind: ServiceAccount
metadata: {name: soak-agent, namespace: gitops-reverser}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: soak-agent}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}
subjects: [{kind: ServiceAccount, name: soak-agent, namespace: gitops-reverser}]
",
        )
        .await;
    let sa_kubeconfig = {
        let TestCluster::Real(real) = &net.cluster else {
            unreachable!()
        };
        real.service_account_kubeconfig("gitops-reverser", "soak-agent")
            .replace(&real.url(), &format!("https://{}", net.api_proxy.addr))
    };
    std::fs::write(&net.kubeconfig, sa_kubeconfig).unwrap();
    let binding = "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: soak-agent}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}
subjects: [{kind: ServiceAccount, name: soak-agent, namespace: gitops-reverser}]
";
    let url = net.writer_url();
    let mut agents = [Some(net.agent(0, &url, &[])), Some(net.agent(1, &url, &[]))];

    // The workload, in the background.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = {
        let client = net.cluster.client().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
            let deploys: Api<k8s_openapi::api::apps::v1::Deployment> =
                Api::namespaced(client.clone(), NAMESPACE);
            let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
                Api::all(client.clone());
            let ar = kube::discovery::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
                "soak.example.com",
                "v1",
                "Widget",
            ));
            let widgets: Api<kube::api::DynamicObject> =
                Api::namespaced_with(client.clone(), NAMESPACE, &ar);
            let mut ops = 0u64;
            let mut errors = 0u64;
            let mut crd_generation = 0u64;
            let pp = PostParams::default();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = rand::random::<u32>() % 40;
                let name = format!("o-{n}");
                let result: Result<(), kube::Error> = match rand::random::<u32>() % 10 {
                    0..=2 => cms
                        .patch(
                            &name,
                            &PatchParams::apply("soak").force(),
                            &Patch::Apply(serde_json::json!({
                                "apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"name": name, "namespace": NAMESPACE},
                                "data": {"value": ops.to_string()},
                            })),
                        )
                        .await
                        .map(|_| ()),
                    3 => cms
                        .delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ()),
                    4 => deploys
                        .patch(
                            &name,
                            &PatchParams::apply("soak").force(),
                            &Patch::Apply(deployment(&name, (ops % 4) as i32)),
                        )
                        .await
                        .map(|_| ()),
                    5 => deploys
                        .delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ()),
                    6 | 7 => widgets
                        .patch(
                            &name,
                            &PatchParams::apply("soak").force(),
                            &Patch::Apply(serde_json::json!({
                                "apiVersion": "soak.example.com/v1", "kind": "Widget",
                                "metadata": {"name": name, "namespace": NAMESPACE},
                                "spec": {"size": ops},
                            })),
                        )
                        .await
                        .map(|_| ()),
                    8 => widgets
                        .delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ()),
                    _ => {
                        // A CRD change: the Widget schema gains a property.
                        crd_generation += 1;
                        let crd: serde_json::Value =
                            serde_yaml_value(&widget_crd(&format!("field{crd_generation}")));
                        crds.patch(
                            "widgets.soak.example.com",
                            &PatchParams::apply("soak").force(),
                            &Patch::Apply(crd),
                        )
                        .await
                        .map(|_| ())
                    }
                };
                if result.is_err() {
                    errors += 1; // deleting what is gone, a conflict: the workload goes on
                }
                ops += 1;
                let _ = &pp;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            (ops, errors)
        })
    };

    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut max_unacked = 0.0f64;
    let mut peak = BTreeMap::<&str, u64>::new();
    let mut human = 0u32;
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let admin = net.cluster.client().await;
    let crbs: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(admin.clone());
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(admin.clone());
    while Instant::now() < end {
        let pause = Duration::from_secs(5 + u64::from(rand::random::<u32>() % 11));
        let sample_until = Instant::now() + pause;
        while Instant::now() < sample_until {
            for agent in agents.iter().flatten() {
                if let Some(unacked) = agent.metric("gitops_reverser_agent_stream_unacked").await {
                    max_unacked = max_unacked.max(unacked);
                }
            }
            for (i, agent) in agents.iter().enumerate() {
                let key = if i == 0 { "agent-0" } else { "agent-1" };
                let rss = peak_rss_kib(agent.as_ref().and_then(|a| a.child.id()));
                let slot = peak.entry(key).or_default();
                *slot = (*slot).max(rss);
            }
            let rss = peak_rss_kib(net.writer.as_ref().and_then(|w| w.id()));
            let slot = peak.entry("writer").or_default();
            *slot = (*slot).max(rss);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let hold = Duration::from_secs(3 + u64::from(rand::random::<u32>() % 28));
        match rand::random::<u32>() % 9 {
            0 => {
                let i = (rand::random::<u32>() % 2) as usize;
                if let Some(mut agent) = agents[i].take() {
                    agent.kill().await;
                }
                tokio::time::sleep(Duration::from_secs(
                    1 + u64::from(rand::random::<u32>() % 5),
                ))
                .await;
                agents[i] = Some(net.agent(i as u16, &url, &[]));
                *faults.entry("kill -9 agent").or_default() += 1;
            }
            1 => {
                if let Some(mut writer) = net.writer.take() {
                    let _ = writer.kill().await;
                }
                tokio::time::sleep(Duration::from_secs(
                    1 + u64::from(rand::random::<u32>() % 5),
                ))
                .await;
                net.start_writer().await;
                *faults.entry("kill -9 writer").or_default() += 1;
            }
            2 => {
                net.agent_ns.drop_host(&net.agent_writer.b);
                tokio::time::sleep(hold).await;
                net.agent_ns.heal();
                *faults.entry("partition agent-writer").or_default() += 1;
            }
            3 => {
                net.agent_ns
                    .drop_service(&net.agent_root.a, net.api_proxy.addr.port());
                tokio::time::sleep(hold).await;
                net.agent_ns.heal();
                *faults.entry("partition agent-API server").or_default() += 1;
            }
            4 => {
                // The remote hangs: its packets vanish (the writer's link to the HTTPS server).
                net.writer_ns.drop_host(&net.writer_root.a);
                tokio::time::sleep(hold).await;
                net.writer_ns.heal();
                *faults.entry("remote hangs").or_default() += 1;
            }
            5 => {
                let _ = crbs.delete("soak-agent", &DeleteParams::default()).await;
                tokio::time::sleep(Duration::from_secs(
                    3 + u64::from(rand::random::<u32>() % 10),
                ))
                .await;
                net.cluster.apply_yaml(binding).await;
                *faults.entry("403 burst").or_default() += 1;
            }
            6 => {
                let blink = serde_yaml_value(
                    &widget_crd("")
                        .replace("widgets.soak.example.com", "blinks.soak.example.com")
                        .replace(
                            "plural: widgets, singular: widget, kind: Widget",
                            "plural: blinks, singular: blink, kind: Blink",
                        ),
                );
                let _ = crds
                    .patch(
                        "blinks.soak.example.com",
                        &PatchParams::apply("soak").force(),
                        &Patch::Apply(blink),
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = crds
                    .delete("blinks.soak.example.com", &DeleteParams::default())
                    .await;
                *faults.entry("discovery blink").or_default() += 1;
            }
            _ => {
                human += 1;
                if net.repo.rev_parse(BRANCH).is_some() && human_push(&net.repo, human) {
                    *faults.entry("human push").or_default() += 1;
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ops, workload_errors) = workload.await.unwrap();
    net.agent_ns.heal();
    net.writer_ns.heal();
    net.cluster.apply_yaml(binding).await;
    for (i, slot) in agents.iter_mut().enumerate() {
        if slot.as_mut().is_none_or(|a| !a.is_running()) {
            *slot = Some(net.agent(i as u16, &url, &[]));
        }
    }
    if net
        .writer
        .as_mut()
        .is_none_or(|w| w.try_wait().ok().flatten().is_some())
    {
        net.start_writer().await;
    }
    let settle = Instant::now();
    let deadline = settle + Duration::from_secs(600);
    let (live, mirrored) = loop {
        let live = soak_live(&net).await;
        let mirrored = soak_mirrored(&net);
        if live == mirrored || Instant::now() > deadline {
            break (live, mirrored);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let commits = net.repo.commit_count(BRANCH);
    let TestCluster::Real(real) = &net.cluster else {
        unreachable!()
    };
    println!(
        "chaos soak: {minutes} min, {ops} workload operations ({workload_errors} refused), {} faults:",
        faults.values().sum::<u64>()
    );
    for (kind, count) in &faults {
        println!("  {kind}: {count}");
    }
    println!(
        "commits {commits}; most unacked messages (backlog) {max_unacked}; peak RSS KiB: {peak:?}, kube-apiserver+etcd {:?}; settled after the faults in {:?}",
        real.rss_kib(),
        settle.elapsed()
    );
    let divergent: Vec<_> = live
        .iter()
        .filter(|(k, v)| mirrored.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: cluster {v}, git {:?}", mirrored.get(k)))
        .chain(
            mirrored
                .keys()
                .filter(|k| !live.contains_key(*k))
                .map(|k| format!("{k}: only in git")),
        )
        .collect();
    assert!(
        divergent.is_empty(),
        "Git diverges from the cluster after the soak: {divergent:#?}"
    );
    println!("Git equals the cluster: {} objects", live.len());
}

/// A person's commit of a note outside the mirrored folders, pushed like a person would: clone, commit, push,
/// and again from a fresh clone when the writer pushed first (at most 5 tries).
fn human_push(repo: &BareRepo, n: u32) -> bool {
    let git = |dir: &std::path::Path, args: &[&str]| {
        std::process::Command::new("git")
            .args([
                "-c",
                "user.name=Human",
                "-c",
                "user.email=human@example.com",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for _ in 0..5 {
        let work = tempfile::tempdir().unwrap();
        let url = repo.file_url();
        if !git(work.path(), &["clone", "-q", "--branch", BRANCH, &url, "w"]) {
            continue;
        }
        let dir = work.path().join("w");
        std::fs::create_dir_all(dir.join("notes")).unwrap();
        std::fs::write(dir.join(format!("notes/human-{n}.md")), "a person's note\n").unwrap();
        if git(&dir, &["add", "-A"])
            && git(
                &dir,
                &["commit", "-q", "-m", "a person's push during the soak"],
            )
            && git(
                &dir,
                &["push", "-q", "origin", &format!("HEAD:refs/heads/{BRANCH}")],
            )
        {
            return true;
        }
    }
    false
}

fn serde_yaml_value(yaml: &str) -> serde_json::Value {
    reverser_common::yaml::parse_document(yaml.as_bytes()).expect("test YAML")
}
