//! What only a real control plane can show: the `reverser-agent` binary against etcd + kube-apiserver +
//! kube-controller-manager v1.37.2 ([`testkit::RealCluster`]), streaming to the real writer (in-process) that pushes to
//! a bare Git repository. Every test here needs the real server (admission chain, `/scale`, defaulting, field
//! managers, controllers and their churn, etcd compaction, garbage collection, CRD versions), so none runs on the
//! emulator.
//!
//! ```text
//! test ──kubectl (--as alice, --server-side, scale, delete --cascade)──▶ kube-apiserver ◀── kube-controller-manager
//!                                                        │   ▲ AdmissionReview            (ReplicaSets, Pods, GC,
//!                                     etcd (compaction) ◀┘   └── agent webhook             EndpointSlices, namespaces)
//!                                                        └──List/Watch──▶ reverser-agent ──gRPC──▶ writer ──▶ BareRepo
//! ```
//!
//! Tests start one control plane each (15–40 s, ~1 GB) and run one at a time (`.config/nextest.toml` puts them in a
//! test group of one). `REVERSER_CHURN_SECS` sets how long the churn test churns (60 s by default; the soak is 600).
//! Every wait has a generous upper bound only to turn a hang into a failure; nothing asserts on time.

mod support;
mod webhook_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use support::cluster::{Backend, TestCluster};
use support::{PATIENCE, free_port, http_get, metric, wait, wait_async};
use testkit::{BareRepo, RealCluster};
use tokio::process::{Child, Command};

const BRANCH: &str = "main";
const BASE: &str = "clusters/prod";
const NS: &str = "gitops-reverser";

/// The agent's repository, destination and access policy; rules are added per test.
fn destination(repo_url: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitRepoConfig
metadata: {{name: repo, namespace: {NS}}}
spec:
  repoUrl: '{repo_url}'
  allowedBranches: [{BRANCH}]
  accessPolicy: {{allowClusterRules: true, namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: prod, namespace: {NS}}}
spec:
  repoRef: {{namespace: {NS}, name: repo}}
  branch: {BRANCH}
  baseFolder: {BASE}
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
"
    )
}

/// The README's Install rule: everything of the desired-state preset, namespaced and cluster-scoped.
const EVERYTHING: &str = "
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {name: desired-state}
spec:
  destinationRef: {name: prod, namespace: gitops-reverser}
  rules: [{scope: Namespaced}, {scope: Cluster}]
";

struct World {
    cluster: TestCluster,
    repo: BareRepo,
    writer: Option<reverser_writer::RunningWriter>,
    _writer_dir: tempfile::TempDir,
    /// Holds the agents' kubeconfigs.
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl World {
    /// A real control plane (with `cluster` if given) with the CRDs and the destination; `setup` is applied next.
    async fn start(cluster: Option<RealCluster>, setup: &str) -> World {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cluster = match cluster {
            Some(real) => TestCluster::Real(Box::new(real)),
            None => TestCluster::start_backend(Backend::Real).await,
        };
        let crds = testkit::manifest_dir().join("../crds");
        cluster.apply_dir(&crds).await;
        let repo = BareRepo::new();
        cluster.apply_yaml(&destination(&repo.file_url())).await;
        if !setup.trim().is_empty() {
            cluster.apply_yaml(setup).await;
        }
        let writer_dir = tempfile::tempdir().unwrap();
        let writer = start_writer(&writer_dir).await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, cluster.kubeconfig_yaml(None)).unwrap();
        World {
            cluster,
            repo,
            writer: Some(writer),
            _writer_dir: writer_dir,
            dir,
            kubeconfig,
        }
    }

    fn real(&self) -> &RealCluster {
        match &self.cluster {
            TestCluster::Real(real) => real,
            TestCluster::Emulator(_) => unreachable!("these tests start the real control plane"),
        }
    }

    /// The real `kubectl` as admin, whatever its exit status.
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.real().kubectl_with_stdin(args, stdin)
    }

    /// The real `kubectl` as admin; panics with its stderr on failure, returns stdout.
    fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the agent binary with the admin kubeconfig.
    fn agent(&self, extra: &[&str]) -> Agent {
        self.agent_with_kubeconfig(&self.kubeconfig, extra)
    }

    fn agent_with_kubeconfig(&self, kubeconfig: &Path, extra: &[&str]) -> Agent {
        let admin_port = free_port();
        let writer = format!("http://{}", self.writer.as_ref().unwrap().grpc_addr);
        let child = Command::new(env!("CARGO_BIN_EXE_reverser-agent"))
            .args(["--writer-url", &writer])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args(["--cluster-name", "real", "--controller-namespace", NS])
            .args([
                "--leader-election-lease-sec",
                "3",
                "--leader-election-renew-sec",
                "1",
            ])
            .args(extra)
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
        Agent {
            child,
            admin: format!("127.0.0.1:{admin_port}"),
        }
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

    fn tip(&self) -> String {
        self.repo.rev_parse(BRANCH).expect("the branch exists")
    }

    /// `git log` of `path`: the authors, newest first.
    fn authors_of(&self, path: &str) -> Vec<String> {
        git(&self.repo, &["log", "--format=%an", BRANCH, "--", path])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The commits after `since`, oldest first: (author, [(status letter, path)]).
    fn commits_since(&self, since: &str) -> Vec<(String, Vec<(String, String)>)> {
        let log = git(
            &self.repo,
            &[
                "log",
                "--reverse",
                "--format=%x01%an",
                "--name-status",
                "--no-renames",
                &format!("{since}..{BRANCH}"),
            ],
        );
        log.split('\u{1}')
            .filter(|c| !c.trim().is_empty())
            .map(|commit| {
                let mut lines = commit.lines();
                let author = lines.next().unwrap_or_default().to_owned();
                let changes = lines
                    .filter_map(|l| l.split_once('\t'))
                    .map(|(s, p)| (s.to_owned(), p.to_owned()))
                    .collect();
                (author, changes)
            })
            .collect()
    }

    async fn stop(mut self) {
        if let Some(w) = self.writer.take() {
            w.stop().await.unwrap();
        }
        self.cluster.shutdown().await;
    }
}

fn git(repo: &BareRepo, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo.path())
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn start_writer(work_dir: &tempfile::TempDir) -> reverser_writer::RunningWriter {
    let work = work_dir.path().display().to_string();
    let args = reverser_writer::Args::try_parse_from([
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
    ])
    .unwrap();
    args.start().await.expect("writer starts")
}

struct Agent {
    child: Child,
    admin: String,
}

impl Agent {
    async fn metrics(&self) -> Option<String> {
        http_get(&self.admin, "/metrics").await
    }

    async fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics().await.expect("/metrics answers"), name)
    }

    /// Waits until everything ingestion produced was acked by the writer (so pushed) and every running watch
    /// completed a snapshot: the same totals on two reads a pump tick (1 s) apart.
    async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut last = None;
        loop {
            let current = self.settled_totals().await;
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

    async fn settled_totals(&self) -> Option<(u64, u64)> {
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
        let settled = m("gitops_reverser_agent_active_watches") > 0.0
            && m("gitops_reverser_agent_watch_snapshots_completed")
                >= m("gitops_reverser_agent_active_watches")
            && m("gitops_reverser_agent_stream_connected") == 1.0
            && m("gitops_reverser_agent_stream_unacked") == 0.0
            && produced > 0.0
            && acked >= produced;
        settled.then_some((produced as u64, acked as u64))
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("the agent runs")
    }

    /// SIGKILL: no chance to release the Lease or flush anything.
    async fn kill(&mut self) {
        self.child.kill().await.expect("kill the agent");
    }

    /// SIGTERM, as Kubernetes stops a Pod, and a clean exit.
    async fn terminate(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the agent exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "the agent exits cleanly: {status}");
    }
}

/// A CA and a serving certificate for 127.0.0.1 (the agent's webhook, another team's webhook).
fn webhook_flags(pki: &webhook_support::Pki, addr: &str) -> Vec<String> {
    let ca_file = pki.dir.path().join("ca.crt");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    [
        "--webhook-addr",
        addr,
        "--webhook-cert",
        pki.cert_file().to_str().unwrap(),
        "--webhook-key",
        pki.key_file().to_str().unwrap(),
        "--webhook-manage-configuration",
        "--webhook-ca-bundle",
        ca_file.to_str().unwrap(),
        "--webhook-url",
        &format!("https://{addr}"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// 1. The real kube-apiserver calls the agent's webhook
// ---------------------------------------------------------------------------------------------------------------

/// Another team's validating webhook on the real admission chain: denies every write by `denied_user`.
struct Denier {
    addr: SocketAddr,
    pki: webhook_support::Pki,
    denials: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Denier {
    async fn start(denied_user: &'static str) -> Denier {
        use bytes::Bytes;
        use http_body_util::{BodyExt, Full};
        use hyper_util::rt::TokioIo;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pki = webhook_support::Pki::new();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.cert_file())
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(pki.key_file()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let denials = Arc::<AtomicU64>::default();
        let counter = denials.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, counter) = (acceptor.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        let counter = counter.clone();
                        async move {
                            let body: Bytes = BodyExt::collect(req.into_body())
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                            let request = &review["request"];
                            let deny = request["userInfo"]["username"] == denied_user;
                            let mut response = json!({"uid": request["uid"], "allowed": !deny});
                            if deny {
                                counter.fetch_add(1, Ordering::SeqCst);
                                response["status"] = json!({"code": 403, "reason": "Forbidden",
                                    "message": format!("{denied_user} is frozen out of shop")});
                            }
                            let out = json!({"apiVersion": "admission.k8s.io/v1",
                                             "kind": "AdmissionReview", "response": response});
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(out.to_string()),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Denier {
            addr,
            pki,
            denials,
            task,
        }
    }

    /// Its configuration: every ConfigMap write in `shop`, `failurePolicy: Fail`.
    fn configuration(&self) -> String {
        use base64::Engine as _;
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "freeze"},
            "webhooks": [{
                "name": "freeze.policy.example.com",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "clientConfig": {
                    "url": format!("https://{}/validate", self.addr),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(&self.pki.ca_pem),
                },
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"],
                           "operations": ["CREATE", "UPDATE", "DELETE"],
                           "resources": ["configmaps"], "scope": "*"}]
            }]
        })
        .to_string()
    }
}

/// `shop` with a ConfigMap and a Deployment, alice and bob allowed to edit them (and to scale), and a rule for
/// exactly those two types (so the registered webhook rules are known).
const SHOP: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: app, namespace: shop}
data: {color: blue}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: 'nginx:1.27'}]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: editors, namespace: shop}
rules:
  - apiGroups: ['', apps]
    resources: [configmaps, deployments, deployments/scale]
    verbs: ['*']
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: editors, namespace: shop}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: editors}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: shop, namespace: shop}
spec:
  destinationRef: {name: prod, namespace: gitops-reverser}
  rules: [{apiGroups: ['', apps], resources: [configmaps, deployments]}]
";

const SHOP_APP: &str = "clusters/prod/core/v1/configmaps/shop/app.yaml";
const SHOP_WEB: &str = "clusters/prod/apps/v1/deployments/shop/web.yaml";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_apiserver_calls_the_webhook_and_commits_name_who_changed_what() {
    let world = World::start(None, SHOP).await;
    let pki = webhook_support::Pki::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let flags = webhook_flags(&pki, &addr);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = world.agent(&flags);

    // The leader registers its webhook for the watched types and the Deployment's /scale.
    wait("the agent's webhook configuration", || {
        let out = world.kubectl(
            &[
                "get",
                "validatingwebhookconfiguration",
                "gitops-reverser",
                "-o",
                "json",
            ],
            None,
        );
        let vwc: Value = serde_json::from_slice(&out.stdout).ok()?;
        let rules = vwc.pointer("/webhooks/0/rules")?.to_string();
        (rules.contains("deployments/scale") && rules.contains("configmaps")).then_some(())
    })
    .await;
    world.wait_for_file(SHOP_APP, "blue").await;
    world.wait_for_file(SHOP_WEB, "replicas: 2").await;
    agent.settle().await;

    // Alice creates (kubectl's protobuf, impersonated by the admin): the real server calls the webhook.
    let team = "clusters/prod/core/v1/configmaps/shop/team.yaml";
    world.kubectl_ok(
        &[
            "--as",
            "alice",
            "-n",
            "shop",
            "create",
            "configmap",
            "team",
            "--from-literal=owner=alice",
        ],
        None,
    );
    world.wait_for_file(team, "owner: alice").await;
    assert_eq!(world.authors_of(team), ["alice"]);

    // A server-side dry run: admitted (our webhook is called, with dryRun), persisted nowhere, so no commit; and it
    // leaves no fact: when the admin then makes exactly that change, the commit is the admin's alone (a lingering
    // fact of alice's for the same content would make it ambiguous, the bot's).
    agent.settle().await;
    let before_dry_run = world.tip();
    let dry = world.kubectl_ok(
        &[
            "--as",
            "alice",
            "-n",
            "shop",
            "patch",
            "configmap",
            "team",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"owner":"dry"}}"#,
            "--dry-run=server",
            "-o",
            "jsonpath={.data.owner}",
        ],
        None,
    );
    assert_eq!(
        dry, "dry",
        "the server answered the dry run with its result"
    );
    agent.settle().await;
    assert_eq!(world.tip(), before_dry_run, "a dry run makes no commit");
    assert_eq!(
        agent
            .metric("gitops_reverser_agent_webhook_requests_total{outcome=\"dry_run\"}")
            .await,
        1.0,
        "the real server called the webhook for the dry run:\n{}",
        agent.metrics().await.unwrap_or_default()
    );
    world.kubectl_ok(
        &[
            "-n",
            "shop",
            "patch",
            "configmap",
            "team",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"owner":"dry"}}"#,
        ],
        None,
    );
    world.wait_for_file(team, "owner: dry").await;
    assert_eq!(world.authors_of(team), ["admin", "alice"]);

    // Another webhook denies alice: the real server calls both (in parallel), ours records her attempt, nothing
    // persists. Her fact must author nothing: the admin's next change (other content) makes it stale, and the admin's
    // change to exactly her content is the admin's.
    let denier = Denier::start("alice").await;
    world.kubectl_ok(&["apply", "-f", "-"], Some(&denier.configuration()));
    let denied = wait("the other webhook to deny alice", || {
        let out = world.kubectl(
            &[
                "--as",
                "alice",
                "-n",
                "shop",
                "patch",
                "configmap",
                "team",
                "--type",
                "merge",
                "-p",
                r#"{"data":{"owner":"red"}}"#,
            ],
            None,
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() || denier.denials.load(Ordering::SeqCst) == 0,
            "a denied patch cannot succeed"
        );
        // Until the new configuration is in the server's admission cache, alice's patch goes through: undo it.
        if out.status.success() {
            world.kubectl_ok(
                &[
                    "-n",
                    "shop",
                    "patch",
                    "configmap",
                    "team",
                    "--type",
                    "merge",
                    "-p",
                    r#"{"data":{"owner":"dry"}}"#,
                ],
                None,
            );
            return None;
        }
        Some(stderr)
    })
    .await;
    assert!(
        denied.contains("admission webhook \"freeze.policy.example.com\" denied the request"),
        "{denied}"
    );
    let live = world.kubectl_ok(
        &[
            "-n",
            "shop",
            "get",
            "configmap",
            "team",
            "-o",
            "jsonpath={.data.owner}",
        ],
        None,
    );
    assert_eq!(live, "dry", "nothing persisted");
    agent.settle().await;
    let since_denial = world.tip();
    for owner in ["green", "red"] {
        world.kubectl_ok(
            &[
                "-n",
                "shop",
                "patch",
                "configmap",
                "team",
                "--type",
                "merge",
                "-p",
                &format!(r#"{{"data":{{"owner":"{owner}"}}}}"#),
            ],
            None,
        );
        world.wait_for_file(team, &format!("owner: {owner}")).await;
    }
    let after: Vec<String> = world
        .commits_since(&since_denial)
        .into_iter()
        .map(|(author, _)| author)
        .collect();
    assert!(
        !after.iter().any(|a| a == "alice"),
        "alice's denied request authored nothing: {after:?}"
    );
    assert_eq!(world.authors_of(team)[..2], ["admin", "admin"]);
    world.kubectl_ok(
        &["delete", "validatingwebhookconfiguration", "freeze"],
        None,
    );

    // `kubectl scale` goes through the real /scale subresource: the Deployment's commit is the user's.
    world.kubectl_ok(
        &[
            "--as",
            "alice",
            "-n",
            "shop",
            "scale",
            "deployment",
            "web",
            "--replicas=5",
        ],
        None,
    );
    world.wait_for_file(SHOP_WEB, "replicas: 5").await;
    assert_eq!(world.authors_of(SHOP_WEB)[0], "alice");
    world.kubectl_ok(
        &[
            "--as",
            "bob",
            "-n",
            "shop",
            "scale",
            "deployment",
            "web",
            "--replicas=1",
        ],
        None,
    );
    world.wait_for_file(SHOP_WEB, "replicas: 1").await;
    // And a delete is the deleter's.
    world.kubectl_ok(
        &["--as", "bob", "-n", "shop", "delete", "configmap", "team"],
        None,
    );
    world.wait_until_gone(team).await;
    assert_eq!(world.authors_of(SHOP_WEB)[..2], ["bob", "alice"]);
    assert_eq!(world.authors_of(team)[0], "bob");
    agent.settle().await;
    assert!(
        agent
            .metric("gitops_reverser_agent_attribution_matches_total")
            .await
            >= 7.0
    );
    denier.task.abort();
    agent.terminate().await;
    world.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Controller churn: only intended changes are committed; defaulted objects are stable across restarts
// ---------------------------------------------------------------------------------------------------------------

/// A CRD with schema defaults and a field that keeps unknown fields, one object of it, a Deployment and a Service
/// the server defaults, and a rule for the CRD's objects (the preset has CRDs, not their objects).
const DEFAULTED: &str = "
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.demo.example.com}
spec:
  group: demo.example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
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
                size: {type: integer, default: 1}
                mode: {type: string, default: fast}
                config: {type: object, x-kubernetes-preserve-unknown-fields: true}
---
apiVersion: v1
kind: Namespace
metadata: {name: churn}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {name: widgets}
spec:
  destinationRef: {name: prod, namespace: gitops-reverser}
  rules: [{scope: Namespaced, apiGroups: [demo.example.com], resources: [widgets]}]
";

fn deployment(name: &str, replicas: u32, image: &str) -> String {
    format!(
        "
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: churn, labels: {{app: {name}}}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec: {{containers: [{{name: main, image: '{image}', ports: [{{containerPort: 80}}]}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: churn}}
spec:
  selector: {{app: {name}}}
  ports: [{{port: 80}}]
"
    )
}

fn churn_path(resource: &str, name: &str) -> String {
    match resource {
        "deployments" => format!("{BASE}/apps/v1/deployments/churn/{name}.yaml"),
        "widgets" => format!("{BASE}/demo.example.com/v1/widgets/churn/{name}.yaml"),
        other => format!("{BASE}/core/v1/{other}/churn/{name}.yaml"),
    }
}

/// Renews a Lease and records an Event every half second until `stop`: changes of types nothing may mirror.
fn background_churn(client: kube::Client, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        use k8s_openapi::api::core::v1::Event;
        let leases: Api<Lease> = Api::namespaced(client.clone(), "churn");
        let events: Api<Event> = Api::namespaced(client, "churn");
        let mut writes = 0u64;
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "churner", "namespace": "churn"},
                "spec": {"holderIdentity": format!("churner-{}", n % 3), "leaseDurationSeconds": 5,
                         "leaseTransitions": n}});
            if leases
                .patch(
                    "churner",
                    &PatchParams::apply("churner").force(),
                    &Patch::Apply(lease),
                )
                .await
                .is_ok()
            {
                writes += 1;
            }
            let event = json!({"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": format!("churner.{n}"), "namespace": "churn"},
                "involvedObject": {"kind": "Lease", "name": "churner", "namespace": "churn"},
                "reason": "Renewed", "message": "still here", "type": "Normal"});
            if events
                .create(&Default::default(), &serde_json::from_value(event).unwrap())
                .await
                .is_ok()
            {
                writes += 1;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        writes
    })
}

/// Number of objects of a type in the cluster (`kubectl get -A`).
fn count(world: &World, resource: &str) -> usize {
    world
        .kubectl_ok(&["get", resource, "-A", "--no-headers"], None)
        .lines()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_churn_commits_only_intended_changes_and_defaulted_yaml_survives_a_restart() {
    let churn_secs: u64 = std::env::var("REVERSER_CHURN_SECS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("REVERSER_CHURN_SECS is a number of seconds")
        })
        .unwrap_or(60);
    let world = World::start(None, &format!("{EVERYTHING}---{DEFAULTED}")).await;
    world
        .cluster
        .apply_yaml(&deployment("d0", 2, "nginx:1.0"))
        .await;
    world
        .cluster
        .apply_yaml(&deployment("d1", 1, "nginx:1.0"))
        .await;
    world
        .cluster
        .apply_yaml(
            "
apiVersion: demo.example.com/v1
kind: Widget
metadata: {name: w, namespace: churn}
spec:
  config: {nested: {anything: [1, two, {three: 3}]}, revision: 0}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: churn}
data: {revision: '0'}
",
        )
        .await;
    let agent = world.agent(&[]);
    world
        .wait_for_file(&churn_path("deployments", "d0"), "replicas: 2")
        .await;
    world
        .wait_for_file(&churn_path("widgets", "w"), "anything")
        .await;
    world
        .wait_for_file(&churn_path("services", "d1"), "port: 80")
        .await;
    agent.settle().await;

    // What the real server defaults, as it lands in Git.
    let web = world
        .repo
        .read(BRANCH, &churn_path("deployments", "d0"))
        .unwrap();
    let svc = world
        .repo
        .read(BRANCH, &churn_path("services", "d0"))
        .unwrap();
    let widget = world
        .repo
        .read(BRANCH, &churn_path("widgets", "w"))
        .unwrap();
    let crd = world
        .repo
        .read(
            BRANCH,
            &format!(
                "{BASE}/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.demo.example.com.yaml"
            ),
        )
        .expect("the CRD is mirrored");
    eprintln!(
        "--- Deployment ---\n{web}--- Service ---\n{svc}--- Widget ---\n{widget}--- CRD ---\n{crd}"
    );
    for defaulted in [
        "progressDeadlineSeconds: 600",
        "revisionHistoryLimit: 10",
        "maxSurge: 25%",
        "terminationMessagePath: /dev/termination-log",
        "dnsPolicy: ClusterFirst",
        "protocol: TCP",
    ] {
        assert!(web.contains(defaulted), "{defaulted} in\n{web}");
    }
    for dropped in [
        "status:",
        "uid:",
        "resourceVersion",
        "managedFields",
        "deployment.kubernetes.io/revision",
        "creationTimestamp",
        "generation",
    ] {
        assert!(!web.contains(dropped), "{dropped} in\n{web}");
        assert!(!widget.contains(dropped), "{dropped} in\n{widget}");
    }
    assert!(
        svc.contains("sessionAffinity: None") && svc.contains("targetPort: 80"),
        "{svc}"
    );
    assert!(
        !svc.contains("clusterIP") && !svc.contains("ipFamilies"),
        "{svc}"
    );
    assert!(
        widget.contains("size: 1") && widget.contains("mode: fast"),
        "schema defaults:\n{widget}"
    );
    assert!(
        widget.contains("three: 3"),
        "unknown fields kept:\n{widget}"
    );
    assert!(
        !crd.contains("storedVersions") && !crd.contains("acceptedNames"),
        "{crd}"
    );

    // Churn: intended changes, one at a time, each waited for in Git; the controllers churn on their own
    // (ReplicaSets, Pods that stay Pending, EndpointSlices, Events, Deployment status), plus Lease renewals and
    // Events from the test.
    let base = world.tip();
    let stop = Arc::new(AtomicBool::new(false));
    let background = background_churn(world.cluster.client().await, stop.clone());
    let started = std::time::Instant::now();
    let mut intended: Vec<String> = Vec::new();
    let mut live: Vec<String> = vec!["d0".into(), "d1".into()];
    let mut next_deployment = 2;
    let mut replicas: std::collections::HashMap<String, u32> =
        [("d0".to_owned(), 2), ("d1".to_owned(), 1)]
            .into_iter()
            .collect();
    let mut step = 0u64;
    while started.elapsed() < Duration::from_secs(churn_secs) {
        step += 1;
        let target = live[(step as usize) % live.len()].clone();
        let path = churn_path("deployments", &target);
        match step % 6 {
            0 => {
                // Always a different count: scaling to the current one is no change at all.
                let current = replicas.get(&target).copied().unwrap_or(1);
                let next = current % 3 + 1;
                replicas.insert(target.clone(), next);
                let replicas = next.to_string();
                world.kubectl_ok(
                    &[
                        "-n",
                        "churn",
                        "scale",
                        "deployment",
                        &target,
                        "--replicas",
                        &replicas,
                    ],
                    None,
                );
                world
                    .wait_for_file(&path, &format!("replicas: {replicas}\n"))
                    .await;
                intended.push(path);
            }
            1 => {
                let image = format!("nginx:1.{step}");
                world.kubectl_ok(
                    &[
                        "-n",
                        "churn",
                        "set",
                        "image",
                        &format!("deployment/{target}"),
                        &format!("main={image}"),
                    ],
                    None,
                );
                world.wait_for_file(&path, &image).await;
                intended.push(path);
            }
            2 => {
                let name = format!("d{next_deployment}");
                next_deployment += 1;
                world.kubectl_ok(
                    &["apply", "-f", "-"],
                    Some(&deployment(&name, 1, "nginx:2.0")),
                );
                world
                    .wait_for_file(&churn_path("deployments", &name), "nginx:2.0")
                    .await;
                world
                    .wait_for_file(&churn_path("services", &name), "port: 80")
                    .await;
                // One apply of two objects: one commit or two, each path once.
                intended.push(churn_path("deployments", &name));
                intended.push(churn_path("services", &name));
                live.push(name);
            }
            3 => {
                world.kubectl_ok(
                    &[
                        "-n",
                        "churn",
                        "patch",
                        "configmap",
                        "settings",
                        "--type",
                        "merge",
                        "-p",
                        &format!(r#"{{"data":{{"revision":"{step}"}}}}"#),
                    ],
                    None,
                );
                let path = churn_path("configmaps", "settings");
                // A numeric string is quoted (either style) so that it stays a string.
                wait(&format!("{path} at revision {step}"), || {
                    world.repo.read(BRANCH, &path).filter(|t| {
                        t.contains(&format!("revision: '{step}'"))
                            || t.contains(&format!("revision: \"{step}\""))
                    })
                })
                .await;
                intended.push(path);
            }
            4 => {
                world.kubectl_ok(
                    &[
                        "-n",
                        "churn",
                        "patch",
                        "widget",
                        "w",
                        "--type",
                        "merge",
                        "-p",
                        &format!(r#"{{"spec":{{"config":{{"revision":{step}}}}}}}"#),
                    ],
                    None,
                );
                let path = churn_path("widgets", "w");
                world
                    .wait_for_file(&path, &format!("revision: {step}\n"))
                    .await;
                intended.push(path);
            }
            _ => {
                if live.len() > 3 {
                    let name = live.remove(2);
                    world.kubectl_ok(
                        &["-n", "churn", "delete", "deployment,service", &name],
                        None,
                    );
                    world
                        .wait_until_gone(&churn_path("deployments", &name))
                        .await;
                    world.wait_until_gone(&churn_path("services", &name)).await;
                    intended.push(churn_path("deployments", &name));
                    intended.push(churn_path("services", &name));
                }
            }
        }
        // A pause for the controllers to react (ReplicaSets, Pods, EndpointSlices, status).
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let churned = started.elapsed();
    agent.settle().await;
    // Let the controllers finish reacting to the last change, then settle again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    agent.settle().await;
    stop.store(true, Ordering::SeqCst);
    let background_writes = background.await.unwrap();

    let commits = world.commits_since(&base);
    let committed: Vec<String> = commits
        .iter()
        .flat_map(|(_, changes)| changes.iter().map(|(_, p)| p.clone()))
        .collect();
    let figures = format!(
        "churn: {:.0} s, {} steps, {} intended path changes, {} commits, {} test Lease/Event writes; now {} \
         replicasets, {} pods, {} endpointslices, {} events, {} leases; {} files in Git",
        churned.as_secs_f64(),
        step,
        intended.len(),
        commits.len(),
        background_writes,
        count(&world, "replicasets"),
        count(&world, "pods"),
        count(&world, "endpointslices"),
        count(&world, "events"),
        count(&world, "leases"),
        world.files().len()
    );
    eprintln!("{figures}");
    // As multisets: a Deployment and its Service applied (or deleted) together may land in either order.
    let (mut committed, mut intended) = (committed, intended);
    committed.sort();
    intended.sort();
    assert_eq!(
        committed, intended,
        "only the intended changes, each once ({figures})"
    );
    assert!(
        commits.len() <= intended.len() && commits.len() * 2 >= intended.len(),
        "{figures}"
    );
    let files = world.files();
    for noise in [
        "/replicasets/",
        "/endpointslices/",
        "/leases/",
        "/events/",
        "/pods/",
        "/endpoints/",
        "/controllerrevisions/",
    ] {
        assert!(
            !files.iter().any(|f| f.contains(noise)),
            "{noise} in Git: {files:#?}"
        );
    }

    // A restart over the churned cluster: every file renders to the same bytes, so nothing is committed.
    agent.terminate().await;
    let tip = world.tip();
    let again = world.agent(&[]);
    again.settle().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    again.settle().await;
    assert_eq!(
        world.tip(),
        tip,
        "no commit after a restart: {:?}",
        world.commits_since(&tip)
    );
    assert!(
        again
            .metric("gitops_reverser_agent_events_total{kind=\"upsert\"}")
            .await
            >= files.len() as f64 - 2.0,
        "the restarted agent did send every object again"
    );
    again.terminate().await;
    world.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Field managers, client- and server-side apply; 6. leader election on the real server
// ---------------------------------------------------------------------------------------------------------------

fn settings(data: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: shop}}\ndata: {data}\n"
    )
}

fn lease_holder(world: &World) -> Option<String> {
    let out = world.kubectl(
        &[
            "-n",
            NS,
            "get",
            "lease",
            "gitops-reverser-agent",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    );
    let holder = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !holder.is_empty()).then_some(holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_managers_and_kubectl_apply_leave_no_bookkeeping_in_git_and_a_killed_leader_is_replaced()
 {
    let world = World::start(None, SHOP).await;
    let mut a = world.agent(&["--instance-id", "agent-a"]);
    let mut b = world.agent(&["--instance-id", "agent-b"]);
    world.wait_for_file(SHOP_APP, "blue").await;
    let leader_name = wait("a Lease holder", || lease_holder(&world)).await;
    // The holder is the instance id and a per-process suffix.
    let (leader, standby, standby_name) = if leader_name.starts_with("agent-a") {
        (&mut a, &mut b, "agent-b")
    } else {
        assert!(leader_name.starts_with("agent-b"), "{leader_name}");
        (&mut b, &mut a, "agent-a")
    };
    leader.settle().await;
    assert_eq!(standby.metric("gitops_reverser_agent_leader").await, 0.0);

    let path = "clusters/prod/core/v1/configmaps/shop/settings.yaml";
    let apply = |manager: &str, data: &str, force: bool| {
        let mut args = vec![
            "apply",
            "--server-side",
            "--field-manager",
            manager,
            "-f",
            "-",
        ];
        if force {
            args.push("--force-conflicts");
        }
        world.kubectl(&args, Some(&settings(data)))
    };
    let start = world.tip();
    // Two managers, each owning one key.
    assert!(apply("team-a", "{a: one}", false).status.success());
    world.wait_for_file(path, "a: one").await;
    assert!(apply("team-b", "{b: two}", false).status.success());
    world.wait_for_file(path, "b: two").await;
    let text = world.repo.read(BRANCH, path).unwrap();
    assert!(text.contains("a: one"), "team-a's key stays: {text}");
    leader.settle().await;
    // team-b claims team-a's key: a conflict, nothing changes.
    let conflict = apply("team-b", "{a: nine, b: two}", false);
    assert!(!conflict.status.success());
    let stderr = String::from_utf8_lossy(&conflict.stderr);
    assert!(
        stderr.contains("conflict") && stderr.contains("team-a"),
        "{stderr}"
    );
    leader.settle().await;
    assert_eq!(
        world.commits_since(&start).len(),
        2,
        "a refused apply makes no commit"
    );
    // Forced, it takes the key over.
    assert!(apply("team-b", "{a: nine, b: two}", true).status.success());
    world.wait_for_file(path, "a: nine").await;
    leader.settle().await;
    let managers = world.kubectl_ok(
        &[
            "-n",
            "shop",
            "get",
            "configmap",
            "settings",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
        None,
    );
    assert!(managers.contains("team-b"), "{managers}");

    // Client-side apply: the last-applied annotation lives in the cluster, not in Git; an unchanged re-apply and a
    // switch to server-side apply (only managedFields change) commit nothing.
    let legacy = "clusters/prod/core/v1/configmaps/shop/legacy.yaml";
    let manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: legacy, namespace: shop}\ndata: {x: first}\n";
    world.kubectl_ok(&["apply", "-f", "-"], Some(manifest));
    world.wait_for_file(legacy, "x: first").await;
    let annotations = world.kubectl_ok(
        &[
            "-n",
            "shop",
            "get",
            "configmap",
            "legacy",
            "-o",
            "jsonpath={.metadata.annotations}",
        ],
        None,
    );
    assert!(
        annotations.contains("last-applied-configuration"),
        "{annotations}"
    );
    leader.settle().await;
    let tip = world.tip();
    assert!(
        world
            .kubectl_ok(&["apply", "-f", "-"], Some(manifest))
            .contains("unchanged")
    );
    world.kubectl_ok(&["apply", "--server-side", "-f", "-"], Some(manifest));
    world.kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "other",
            "-f",
            "-",
        ],
        Some(manifest),
    );
    leader.settle().await;
    assert_eq!(
        world.tip(),
        tip,
        "ownership changes alone commit nothing: {:?}",
        world.commits_since(&tip)
    );
    world.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&manifest.replace("x: first", "x: second")),
    );
    world.wait_for_file(legacy, "x: second").await;
    leader.settle().await;

    let commits = world.commits_since(&start);
    assert_eq!(
        commits.iter().map(|(_, c)| c.len()).collect::<Vec<_>>(),
        [1, 1, 1, 1, 1],
        "one commit per real change: {commits:?}"
    );
    for file in world.files() {
        let text = world.repo.read(BRANCH, &file).unwrap();
        assert!(
            !text.contains("managedFields") && !text.contains("last-applied-configuration"),
            "{file}:\n{text}"
        );
    }

    // kill -9 the leader: the standby takes the Lease once it expires, re-mirrors without a commit, and changes
    // made after keep landing.
    let before_failover = world.tip();
    leader.kill().await;
    wait("the standby to hold the Lease", || {
        lease_holder(&world).filter(|h| h.starts_with(standby_name))
    })
    .await;
    wait_async("the standby to lead", || async {
        (standby.metric("gitops_reverser_agent_leader").await == 1.0).then_some(())
    })
    .await;
    standby.settle().await;
    assert_eq!(
        world.tip(),
        before_failover,
        "the new leader's snapshot commits nothing"
    );
    assert!(apply("team-b", "{a: ten, b: two}", true).status.success());
    world.wait_for_file(path, "a: ten").await;
    assert!(
        world.repo.tip_message(BRANCH).contains(standby_name),
        "the commit carries the new leader's term: {}",
        world.repo.tip_message(BRANCH)
    );
    assert_eq!(world.commits_since(&before_failover).len(), 1);
    let transitions = world.kubectl_ok(
        &[
            "-n",
            NS,
            "get",
            "lease",
            "gitops-reverser-agent",
            "-o",
            "jsonpath={.spec.leaseTransitions}",
        ],
        None,
    );
    assert!(
        transitions.trim().parse::<u32>().unwrap_or(0) >= 1,
        "{transitions}"
    );
    let survivor = if standby_name == "agent-a" { a } else { b };
    survivor.terminate().await;
    world.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// 4. 410 Gone after compaction, bookmarks, streaming and paginated lists
// ---------------------------------------------------------------------------------------------------------------

/// A TCP relay between the agent and the API server that the test can cut: a network partition.
struct Partition {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    async fn start(upstream: SocketAddr) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, conns) = (cut.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(relay);
            }
        });
        Partition {
            addr,
            cut,
            connections,
            task,
        }
    }

    /// Drops every open connection and refuses new ones.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for relay in self.connections.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Audit policy: the agent's and everyone's list/watch of ConfigMaps, with their URLs.
const AUDIT_POLICY: &str = "
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [list, watch]
    resources: [{group: '', resources: [configmaps]}]
  - level: None
";

/// (verb, requestURI, response code) of the agent's ConfigMap list/watch requests in namespace `bulk` or
/// cluster-wide, in order (the first audit stage of each request).
fn agent_requests(audit_log: &Path) -> Vec<(String, String, i64)> {
    let text = std::fs::read_to_string(audit_log).unwrap_or_default();
    let mut seen = BTreeSet::new();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| {
            let ua = e["userAgent"].as_str().unwrap_or_default();
            !ua.starts_with("kubectl")
                && !ua.starts_with("kube-controller-manager")
                && !ua.starts_with("kube-apiserver")
        })
        .filter(|e| {
            let uri = e["requestURI"].as_str().unwrap_or_default();
            uri.starts_with("/api/v1/namespaces/bulk/configmaps")
                || uri.starts_with("/api/v1/configmaps")
        })
        .filter(|e| seen.insert(e["auditID"].as_str().unwrap_or_default().to_owned()))
        .map(|e| {
            (
                e["verb"].as_str().unwrap_or_default().to_owned(),
                e["requestURI"].as_str().unwrap_or_default().to_owned(),
                e["responseStatus"]["code"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

const BULK: usize = 1100;

fn bulk_configmaps(count: usize) -> String {
    let mut yaml = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bulk}\n");
    for i in 0..count {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i:04}, namespace: bulk}}\ndata: {{n: '{i}'}}\n"
        ));
    }
    yaml
}

/// The configmaps of `bulk` in Git, by name.
fn bulk_in_git(world: &World) -> BTreeSet<String> {
    let prefix = format!("{BASE}/core/v1/configmaps/bulk/");
    if world.repo.rev_parse(BRANCH).is_none() {
        return BTreeSet::new();
    }
    world
        .files()
        .into_iter()
        .filter_map(|f| {
            f.strip_prefix(&prefix)
                .and_then(|n| n.strip_suffix(".yaml"))
                .map(str::to_owned)
        })
        .collect()
}

fn bulk_live(world: &World) -> BTreeSet<String> {
    world
        .kubectl_ok(&["-n", "bulk", "get", "configmaps", "-o", "name"], None)
        .lines()
        .filter_map(|l| l.strip_prefix("configmap/"))
        .filter(|n| *n != "kube-root-ca.crt")
        .map(str::to_owned)
        .collect()
}

/// One scenario on a server with or without the WatchList feature (streaming lists): ConfigMaps bypass the
/// watch cache, so a resume point etcd compacted away is a 410 Gone straight from etcd.
async fn watch_survives_compaction(watch_list: bool) {
    let audit_dir = tempfile::tempdir().unwrap();
    let policy = audit_dir.path().join("policy.yaml");
    let audit_log = audit_dir.path().join("audit.log");
    std::fs::write(&policy, AUDIT_POLICY).unwrap();
    let mut builder = RealCluster::builder()
        .user("alice", &["developers"])
        .user("bob", &["developers"])
        .apiserver_arg(&format!("--audit-policy-file={}", policy.display()))
        .apiserver_arg(&format!("--audit-log-path={}", audit_log.display()))
        .apiserver_arg("--watch-cache-sizes=configmaps#0");
    if !watch_list {
        builder = builder.apiserver_arg("--feature-gates=WatchList=false");
    }
    let real = builder.start().await;
    let upstream: SocketAddr = real.url().trim_start_matches("https://").parse().unwrap();
    let world = World::start(
        Some(real),
        "
apiVersion: v1
kind: Namespace
metadata: {name: bulk}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: bulk, namespace: bulk}
spec:
  destinationRef: {name: prod, namespace: gitops-reverser}
  rules: [{resources: [configmaps]}]
",
    )
    .await;
    world.kubectl_ok(&["apply", "-f", "-"], Some(&bulk_configmaps(BULK)));

    // The agent reaches the API server through a relay the test can cut; it runs alone (a partition longer than
    // the Lease would otherwise end its term, and a new term relists everything anyway).
    let partition = Partition::start(upstream).await;
    let kubeconfig = world.dir.path().join("relayed");
    std::fs::write(
        &kubeconfig,
        world.cluster.kubeconfig_yaml(None).replace(
            &format!("https://{upstream}"),
            &format!("https://{}", partition.addr),
        ),
    )
    .unwrap();
    let agent = world.agent_with_kubeconfig(&kubeconfig, &["--leader-election=false"]);
    wait("every bulk ConfigMap in Git", || {
        (bulk_in_git(&world).len() == BULK).then_some(())
    })
    .await;
    agent.settle().await;

    let initial = agent_requests(&audit_log);
    eprintln!(
        "initial list/watch requests of the agent ({}):",
        initial.len()
    );
    for r in &initial {
        eprintln!("  {r:?}");
    }
    let watches: Vec<_> = initial.iter().filter(|(v, _, _)| v == "watch").collect();
    let lists: Vec<_> = initial.iter().filter(|(v, _, _)| v == "list").collect();
    assert!(
        watches
            .iter()
            .all(|(_, uri, _)| uri.contains("allowWatchBookmarks=true")),
        "every watch asks for bookmarks: {watches:#?}"
    );
    if watch_list {
        assert!(lists.is_empty(), "a streaming list, no LIST: {initial:#?}");
        assert!(
            watches[0].1.contains("sendInitialEvents=true") && watches[0].2 == 200,
            "{initial:#?}"
        );
    } else {
        assert!(
            watches[0].1.contains("sendInitialEvents=true") && watches[0].2 == 422,
            "the server refuses the streaming list first: {initial:#?}"
        );
        let pages: Vec<_> = lists
            .iter()
            .filter(|(_, uri, _)| uri.contains("limit=500"))
            .collect();
        assert!(
            pages.len() >= BULK.div_ceil(500)
                && pages
                    .iter()
                    .skip(1)
                    .all(|(_, uri, _)| uri.contains("continue=")),
            "paged by 500 with continue tokens: {initial:#?}"
        );
    }
    let relists_before = agent
        .metric("gitops_reverser_agent_watch_relists_total{resource=\"configmaps\"}")
        .await;
    let before = world.tip();

    // Partition: changes the agent cannot see, for more than two compaction intervals.
    partition.cut();
    world.kubectl_ok(
        &[
            "-n",
            "bulk",
            "create",
            "configmap",
            "new-one",
            "--from-literal=n=new",
        ],
        None,
    );
    world.kubectl_ok(
        &["-n", "bulk", "delete", "configmap", "cm-0001", "cm-0002"],
        None,
    );
    for round in 0..15 {
        world.kubectl_ok(
            &[
                "-n",
                "bulk",
                "patch",
                "configmap",
                "cm-0003",
                "--type",
                "merge",
                "-p",
                &format!(r#"{{"data":{{"n":"round-{round}"}}}}"#),
            ],
            None,
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    partition.heal();

    // The resume point is gone: 410, a relist, and Git converges without losing or wrongly deleting anything.
    world
        .wait_for_file(
            &format!("{BASE}/core/v1/configmaps/bulk/cm-0003.yaml"),
            "round-14",
        )
        .await;
    world
        .wait_until_gone(&format!("{BASE}/core/v1/configmaps/bulk/cm-0002.yaml"))
        .await;
    agent.settle().await;
    assert_eq!(
        bulk_in_git(&world),
        bulk_live(&world),
        "Git holds exactly the live ConfigMaps"
    );
    assert!(
        world
            .repo
            .read(
                BRANCH,
                &format!("{BASE}/core/v1/configmaps/bulk/new-one.yaml")
            )
            .is_some()
    );
    let relists = agent
        .metric("gitops_reverser_agent_watch_relists_total{resource=\"configmaps\"}")
        .await;
    let after = agent_requests(&audit_log);
    let resumed: Vec<_> = after[initial.len()..].to_vec();
    eprintln!("requests after the partition: {resumed:#?}");
    // The watch resumes from where it was (an old resourceVersion), etcd answers that it was compacted (a 410
    // error event in the watch stream), and the agent lists again from scratch, the way the server supports.
    let resumed_at_old_version = resumed.iter().position(|(verb, uri, _)| {
        verb == "watch" && !uri.contains("sendInitialEvents") && !uri.contains("resourceVersion=0")
    });
    let relisted = resumed.iter().rposition(|(verb, uri, code)| {
        *code == 200
            && if watch_list {
                verb == "watch" && uri.contains("sendInitialEvents=true")
            } else {
                verb == "list"
            }
    });
    assert!(
        matches!((resumed_at_old_version, relisted), (Some(w), Some(l)) if w < l),
        "a resumed watch, then a fresh list: {resumed:#?}"
    );
    assert!(
        relists > relists_before,
        "relists {relists_before} -> {relists}"
    );
    let deleted: BTreeSet<String> = world
        .commits_since(&before)
        .into_iter()
        .flat_map(|(_, c)| c.into_iter())
        .filter(|(s, _)| s == "D")
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        deleted,
        ["cm-0001", "cm-0002"]
            .iter()
            .map(|n| format!("{BASE}/core/v1/configmaps/bulk/{n}.yaml"))
            .collect::<BTreeSet<_>>(),
        "no spurious delete"
    );
    partition.task.abort();
    agent.terminate().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_then_410_gone_after_compaction_relists_and_converges() {
    watch_survives_compaction(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paginated_list_without_watch_list_then_410_gone_after_compaction_relists_and_converges() {
    watch_survives_compaction(false).await;
}

// ---------------------------------------------------------------------------------------------------------------
// 5. Namespace deletion, garbage collection, CRD versions
// ---------------------------------------------------------------------------------------------------------------

const GIZMO_CRD_V1: &str = "
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gizmos.demo.example.com}
spec:
  group: demo.example.com
  scope: Namespaced
  names: {plural: gizmos, singular: gizmo, kind: Gizmo, listKind: GizmoList}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
";

const GIZMO: &str = "apiVersion: demo.example.com/v1\nkind: Gizmo\nmetadata: {name: g1, namespace: keep}\nspec: {size: 3}\n";

/// The gizmos CRD with `versions` (name, storage), all served.
fn gizmo_crd(versions: &[(&str, bool)]) -> String {
    let mut yaml = GIZMO_CRD_V1.split("  versions:").next().unwrap().to_owned();
    yaml.push_str("  versions:\n");
    for (name, storage) in versions {
        yaml.push_str(&format!(
            "    - name: {name}\n      served: true\n      storage: {storage}\n      schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}\n"
        ));
    }
    yaml
}

/// A namespace to delete, with content.
const DOOMED: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: doomed}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: a, namespace: doomed}
data: {x: one}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: doomed}
spec: {selector: {app: s}, ports: [{port: 80}]}
";

/// A namespace that stays, a ConfigMap that owns another one, a bystander, and a rule for the gizmos.
const KEEP: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: keep}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: parent, namespace: keep}
data: {role: parent}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: bystander, namespace: keep}
data: {role: bystander}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {name: gizmos}
spec:
  destinationRef: {name: prod, namespace: gitops-reverser}
  rules: [{scope: Namespaced, apiGroups: [demo.example.com], resources: [gizmos]}]
";

fn keep_deployment(name: &str) -> String {
    format!(
        "
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: keep}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec: {{containers: [{{name: main, image: 'nginx:1.27'}}]}}
"
    )
}

fn cm_path(ns: &str, name: &str) -> String {
    format!("{BASE}/core/v1/configmaps/{ns}/{name}.yaml")
}

fn keep_deployment_path(name: &str) -> String {
    format!("{BASE}/apps/v1/deployments/keep/{name}.yaml")
}

fn gizmo_path(version: &str) -> String {
    format!("{BASE}/demo.example.com/{version}/gizmos/keep/g1.yaml")
}

const GIZMO_CRD_FILE: &str =
    "clusters/prod/apiextensions.k8s.io/v1/customresourcedefinitions/gizmos.demo.example.com.yaml";

/// Names of the Pods of a Deployment of `keep`.
fn pods_of(world: &World, app: &str) -> Vec<String> {
    world
        .kubectl_ok(
            &[
                "-n",
                "keep",
                "get",
                "pods",
                "-l",
                &format!("app={app}"),
                "-o",
                "name",
            ],
            None,
        )
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_deletion_garbage_collection_and_crd_deletion_remove_the_files_and_nothing_else()
{
    let world = World::start(
        None,
        &format!(
            "{EVERYTHING}---{DOOMED}---{KEEP}---{GIZMO_CRD_V1}---{}---{}",
            keep_deployment("fg"),
            keep_deployment("bg")
        ),
    )
    .await;
    world.kubectl_ok(&["apply", "-f", "-"], Some(GIZMO));
    let parent_uid = world.kubectl_ok(
        &[
            "-n",
            "keep",
            "get",
            "configmap",
            "parent",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
        None,
    );
    world.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: child\n  namespace: keep\n  ownerReferences:\n  - {{apiVersion: v1, kind: ConfigMap, name: parent, uid: {parent_uid}}}\ndata: {{role: child}}\n"
        )),
    );
    // The foreground deletion of `fg` waits for its Pods; one finalizer on them holds it in that state.
    let fg_pods = wait("fg's two Pods", || {
        Some(pods_of(&world, "fg")).filter(|p| p.len() == 2)
    })
    .await;
    for pod in &fg_pods {
        world.kubectl_ok(
            &[
                "-n",
                "keep",
                "patch",
                pod,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":["example.com/hold"]}}"#,
            ],
            None,
        );
    }
    let agent = world.agent(&[]);
    for path in [
        cm_path("doomed", "a"),
        cm_path("keep", "child"),
        keep_deployment_path("fg"),
        keep_deployment_path("bg"),
        gizmo_path("v1"),
        GIZMO_CRD_FILE.to_owned(),
        format!("{BASE}/core/v1/services/doomed/s.yaml"),
    ] {
        world.wait_for_file(&path, "metadata").await;
    }
    agent.settle().await;
    // The APIServices the server registers itself (one per built-in group/version, one for the gizmos) are not
    // desired state.
    let files = world.files();
    assert!(
        !files.iter().any(|f| f.contains("/apiservices/")),
        "{files:#?}"
    );
    let start = world.tip();

    // A namespace is deleted: Terminating while the namespace controller deletes its content, then gone; the files
    // go with the objects.
    world.kubectl_ok(&["delete", "namespace", "doomed", "--wait=false"], None);
    let phase = world.kubectl_ok(
        &[
            "get",
            "namespace",
            "doomed",
            "-o",
            "jsonpath={.status.phase}",
        ],
        None,
    );
    eprintln!("namespace doomed: {phase}");
    wait("namespace doomed to be gone", || {
        (!world
            .kubectl(&["get", "namespace", "doomed"], None)
            .status
            .success())
        .then_some(())
    })
    .await;
    world.wait_until_gone(&cm_path("doomed", "a")).await;
    world
        .wait_until_gone(&format!("{BASE}/core/v1/services/doomed/s.yaml"))
        .await;
    // Everything else of the namespace too (its `default` ServiceAccount).
    wait("no file of namespace doomed", || {
        (!world.files().iter().any(|f| f.contains("/doomed/"))).then_some(())
    })
    .await;

    // Cascading deletion by the garbage collector. Foreground: the Deployment stays, with a deletionTimestamp and
    // the `foregroundDeletion` finalizer, while its dependents go; that is no change of what the user wants, so no
    // commit. Background and an owner-referenced ConfigMap: the dependents go after the owner.
    world.kubectl_ok(
        &[
            "-n",
            "keep",
            "delete",
            "deployment",
            "fg",
            "--cascade=foreground",
            "--wait=false",
        ],
        None,
    );
    wait("fg to be held by its Pods", || {
        let finalizers = world.kubectl_ok(
            &[
                "-n",
                "keep",
                "get",
                "deployment",
                "fg",
                "-o",
                "jsonpath={.metadata.finalizers}",
            ],
            None,
        );
        finalizers.contains("foregroundDeletion").then_some(())
    })
    .await;
    world.kubectl_ok(
        &[
            "-n",
            "keep",
            "delete",
            "deployment",
            "bg",
            "--cascade=background",
        ],
        None,
    );
    world.kubectl_ok(&["-n", "keep", "delete", "configmap", "parent"], None);
    world.wait_until_gone(&keep_deployment_path("bg")).await;
    world.wait_until_gone(&cm_path("keep", "child")).await;
    agent.settle().await;
    let while_deleting = world.repo.read(BRANCH, &keep_deployment_path("fg"));
    assert!(
        while_deleting
            .as_deref()
            .is_some_and(|t| !t.contains("finalizers")),
        "a deletion in progress is not a change of the desired state: {while_deleting:?}"
    );
    for pod in &fg_pods {
        world.kubectl_ok(
            &[
                "-n",
                "keep",
                "patch",
                pod,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ],
            None,
        );
    }
    world.wait_until_gone(&keep_deployment_path("fg")).await;
    wait("the ReplicaSets to be collected", || {
        world
            .kubectl_ok(&["-n", "keep", "get", "replicasets", "--no-headers"], None)
            .trim()
            .is_empty()
            .then_some(())
    })
    .await;
    agent.settle().await;
    let changes: Vec<(String, String)> = world
        .commits_since(&start)
        .into_iter()
        .flat_map(|(_, c)| c)
        .collect();
    eprintln!("namespace and cascading deletions: {changes:?}");
    assert!(
        changes.iter().all(|(status, _)| status == "D"),
        "only deletions: {changes:?}"
    );

    // A CRD is deleted: its objects and its file go, nothing else.
    let before_delete = world.tip();
    let files_before: BTreeSet<String> = world.files().into_iter().collect();
    world.kubectl_ok(&["delete", "crd", "gizmos.demo.example.com"], None);
    world.wait_until_gone(GIZMO_CRD_FILE).await;
    world.wait_until_gone(&gizmo_path("v1")).await;
    agent.settle().await;
    let removed: BTreeSet<String> = world
        .commits_since(&before_delete)
        .into_iter()
        .flat_map(|(_, c)| c)
        .map(|(s, p)| format!("{s} {p}"))
        .collect();
    assert_eq!(
        removed,
        [
            format!("D {GIZMO_CRD_FILE}"),
            format!("D {}", gizmo_path("v1"))
        ]
        .into_iter()
        .collect::<BTreeSet<_>>()
    );
    let files: BTreeSet<String> = world.files().into_iter().collect();
    assert_eq!(files_before.len() - 2, files.len());
    assert!(files.contains(&cm_path("keep", "bystander")));
    agent.terminate().await;
    world.stop().await;
}

/// A CRD gets a new version (served, storage) and its old one is removed. The agent mirrors each resource at one
/// version (the preferred one), so the object's file moves from `v1/` to `v2/`; the `v1/` file must not stay behind
/// as a stale duplicate: once the `v2` snapshot is complete, the agent sends an empty, complete snapshot of the same
/// scope at `v1`, and the writer removes the `v1/` file (and nothing outside the group's folder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_version_change_moves_the_files_to_the_new_version() {
    let world = World::start(None, &format!("{EVERYTHING}---{KEEP}---{GIZMO_CRD_V1}")).await;
    world.kubectl_ok(&["apply", "-f", "-"], Some(GIZMO));
    let agent = world.agent(&[]);
    world.wait_for_file(&gizmo_path("v1"), "size: 3").await;
    world
        .wait_for_file(&cm_path("keep", "bystander"), "bystander")
        .await;
    agent.settle().await;
    let before = world.tip();

    // v2 becomes the storage (and preferred) version; v1 is still served.
    world
        .cluster
        .apply_yaml(&gizmo_crd(&[("v1", false), ("v2", true)]))
        .await;
    world.wait_for_file(&gizmo_path("v2"), "size: 3").await;
    // v1 is still served, but the agent mirrors the preferred v2 only: the v1 copy goes.
    world.wait_until_gone(&gizmo_path("v1")).await;
    agent.settle().await;
    // Objects are re-stored at v2, v1 leaves storedVersions and then the CRD.
    let json = world.kubectl_ok(
        &[
            "-n",
            "keep",
            "get",
            "gizmos.v2.demo.example.com",
            "-o",
            "json",
        ],
        None,
    );
    world.kubectl_ok(&["replace", "-f", "-"], Some(&json));
    world.kubectl_ok(
        &[
            "patch",
            "crd",
            "gizmos.demo.example.com",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"storedVersions":["v2"]}}"#,
        ],
        None,
    );
    world.kubectl_ok(
        &[
            "patch",
            "crd",
            "gizmos.demo.example.com",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/versions/0"}]"#,
        ],
        None,
    );
    wait("the CRD file to list only v2", || {
        world
            .repo
            .read(BRANCH, GIZMO_CRD_FILE)
            .filter(|t| t.contains("name: v2") && !t.contains("name: v1"))
            .map(|_| ())
    })
    .await;
    agent.settle().await;
    let changes: Vec<(String, String)> = world
        .commits_since(&before)
        .into_iter()
        .flat_map(|(_, c)| c)
        .collect();
    eprintln!("changes for the CRD versions: {changes:?}");
    assert!(
        world.repo.read(BRANCH, &gizmo_path("v2")).is_some(),
        "the object is mirrored at v2"
    );
    assert!(
        world
            .repo
            .read(BRANCH, &cm_path("keep", "bystander"))
            .is_some(),
        "nothing else is swept"
    );
    assert!(
        changes.iter().all(
            |(_, p)| p == GIZMO_CRD_FILE || p.starts_with(&format!("{BASE}/demo.example.com/"))
        ),
        "{changes:?}"
    );
    assert!(
        changes.contains(&("D".to_owned(), gizmo_path("v1"))),
        "{changes:?}"
    );
    assert!(world.repo.read(BRANCH, &gizmo_path("v1")).is_none());
    agent.terminate().await;
    world.stop().await;
}
